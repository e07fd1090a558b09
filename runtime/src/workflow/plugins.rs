//! A workflow's `plugins:` section: the plugin files it needs loaded before its
//! nodes can be resolved, with the capabilities and limits it grants them.
//!
//! ```yaml
//! plugins:
//!   - path: plugins/starter.wasm
//!   - {path: my-tools.wasm, read_dir: data/luts, timeout_s: 30, memory_mb: 256}
//! ```
//!
//! The runtime only reads the section; the plugin host loads the files.

use super::diagnostics::{Diagnostic, DiagnosticKind as K, Span};
use super::yaml::{self, YNode, YValue};

/// One entry of `plugins:`.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginRef {
    /// The component file, relative to the run's base folder.
    pub path: String,
    /// A folder the plugin may read (nothing else on disk is visible to it).
    pub read_dir: Option<String>,
    pub timeout_s: Option<f64>,
    pub memory_mb: Option<f64>,
    pub output_mb: Option<f64>,
    /// Where the entry is written.
    pub span: Span,
}

const KEYS: &[&str] = &["path", "read_dir", "timeout_s", "memory_mb", "output_mb"];

/// The `plugins:` entries of a workflow source. A source that is not YAML has
/// none here: loading it reports that.
pub fn plugin_refs(source: &str) -> Result<Vec<PluginRef>, Vec<Diagnostic>> {
    let Ok(Some(doc)) = yaml::parse(source) else {
        return Ok(Vec::new());
    };
    let Some(section) = doc.get("plugins") else {
        return Ok(Vec::new());
    };
    let items: &[YNode] = match &section.value {
        YValue::Seq(items) => items,
        YValue::Null => &[],
        _ => {
            return Err(vec![Diagnostic::error(
                K::Schema,
                "`plugins:` is a list of `{path: …}` entries",
            )
            .at(Some(section.span))])
        }
    };
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    for item in items {
        match entry(item) {
            Ok(r) => refs.push(r),
            Err(d) => errors.push(*d),
        }
    }
    if errors.is_empty() {
        Ok(refs)
    } else {
        Err(errors)
    }
}

/// One entry, or what is wrong with it (boxed: diagnostics are large).
fn entry(item: &YNode) -> Result<PluginRef, Box<Diagnostic>> {
    let bad = |node: &YNode, message: String| {
        Box::new(Diagnostic::error(K::Schema, message).at(Some(node.span)))
    };
    if let Some(path) = item.as_str() {
        return Ok(PluginRef {
            path: path.to_string(),
            read_dir: None,
            timeout_s: None,
            memory_mb: None,
            output_mb: None,
            span: item.span,
        });
    }
    let Some(map) = item.as_map() else {
        return Err(bad(item, "a plugin entry is a path or `{path: …}`".into()));
    };
    for (key, _) in map {
        if !key.as_str().is_some_and(|k| KEYS.contains(&k)) {
            return Err(bad(
                key,
                format!(
                    "unknown plugin key `{}` (known: {})",
                    key.text(),
                    KEYS.join(", ")
                ),
            ));
        }
    }
    let text = |key: &str| -> Result<Option<String>, Box<Diagnostic>> {
        match item.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| bad(v, format!("`{key}` is a path"))),
        }
    };
    let number = |key: &str| -> Result<Option<f64>, Box<Diagnostic>> {
        match item.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
                _ => Err(bad(v, format!("`{key}` is a positive number"))),
            },
        }
    };
    let Some(path) = text("path")? else {
        return Err(bad(item, "a plugin entry needs `path:`".into()));
    };
    Ok(PluginRef {
        path,
        read_dir: text("read_dir")?,
        timeout_s: number("timeout_s")?,
        memory_mb: number("memory_mb")?,
        output_mb: number("output_mb")?,
        span: item.span,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_short_and_long() {
        let src = "version: 1\nplugins:\n  - a.wasm\n  - {path: b.wasm, read_dir: data, timeout_s: 2}\nnodes: {}\n";
        let refs = plugin_refs(src).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].path, "a.wasm");
        assert_eq!(refs[0].span.line, 3);
        assert_eq!(refs[1].read_dir.as_deref(), Some("data"));
        assert_eq!(refs[1].timeout_s, Some(2.0));
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let src = "version: 1\nplugins:\n  - {path: b.wasm, memory_mb: -3}\n  - {pth: c.wasm}\n";
        let errors = plugin_refs(src).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].line, Some(3));
        assert!(errors[0].message.contains("memory_mb"));
        assert!(errors[1].message.contains("unknown plugin key `pth`"));
    }
}
