//! Strings: formatting and saving text.

use crate::fsutil::atomic_write;
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::sync::Arc;

const SLOTS: &[&str] = &["a", "b", "c", "d"];

pub struct Format {
    spec: NodeSpec,
}

impl Format {
    fn new() -> Format {
        let mut spec = NodeSpec::new("string.format", 1)
            .category("text")
            .describe(
                "Fills `{a}`…`{d}` in a template with the given values; `{a:.2}` rounds a number \
                 to 2 decimals; `{{` and `}}` write braces.",
            )
            .input(
                InputSpec::new("template", PortType::String)
                    .describe("Text with {a} … {d} placeholders."),
            );
        for slot in SLOTS {
            spec = spec.input(InputSpec::new(slot, PortType::Scalar).optional());
        }
        Format {
            spec: spec
                .output("text", PortType::String, "The filled-in template.")
                .inline(),
        }
    }
}

/// Fills `template`; `lookup` gives the value of a placeholder name.
pub fn format_template(
    template: &str,
    lookup: impl Fn(&str) -> Option<Value>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return Err("unmatched `}` in template (write `}}` for a brace)".into()),
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => field.push(c),
                        None => {
                            return Err(
                                "unterminated `{` in template (write `{{` for a brace)".into()
                            )
                        }
                    }
                }
                let (name, format) = match field.split_once(':') {
                    Some((n, f)) => (n.trim(), Some(f.trim())),
                    None => (field.trim(), None),
                };
                let value =
                    lookup(name).ok_or_else(|| format!("placeholder `{{{name}}}` has no value"))?;
                match format {
                    None => out.push_str(&value.to_text().unwrap_or_default()),
                    Some(f) => {
                        let digits: usize = f
                            .strip_prefix('.')
                            .and_then(|d| d.parse().ok())
                            .filter(|d| *d <= 30)
                            .ok_or_else(|| format!("format `{f}` in `{{{field}}}`: only `.N` with N ≤ 30 (decimals) is supported"))?;
                        let x = value.as_float().ok_or_else(|| {
                            format!("`{{{field}}}`: decimals apply to numbers only")
                        })?;
                        out.push_str(&format!("{x:.digits$}"));
                    }
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

impl Node for Format {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let text = format_template(inputs.str("template")?, |name| {
            SLOTS
                .contains(&name)
                .then(|| inputs.get(name).cloned())
                .flatten()
        })
        .map_err(|e| NodeError::input("template", e))?;
        Ok(Outputs::one("text", Value::String(text)))
    }
}

pub struct SaveText {
    spec: NodeSpec,
}

impl SaveText {
    fn new() -> SaveText {
        SaveText {
            spec: NodeSpec::new("text.save", 1)
                .category("text")
                .describe("Writes text to a UTF-8 file (relative paths go under the output directory), atomically.")
                .input(InputSpec::new("text", PortType::String))
                .input(InputSpec::new("path", PortType::Path).describe("Output file, relative to the output folder (`--out`), e.g. caption.txt."))
                .output("path", PortType::Path, "The file written.")
                .output_node(),
        }
    }
}

impl Node for SaveText {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.output_file(inputs.path("path")?)?;
        atomic_write(ctx, &path, inputs.str("text")?.as_bytes())?;
        Ok(Outputs::one("path", Value::Path(path)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(Format::new()), Arc::new(SaveText::new())]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<Value> {
        match name {
            "a" => Some(Value::Int(3)),
            "b" => Some(Value::Float(0.123456)),
            "c" => Some(Value::String("cat".into())),
            _ => None,
        }
    }

    #[test]
    fn formats_placeholders_precision_and_braces() {
        assert_eq!(
            format_template("{c} #{a}: {b:.2} {{x}}", lookup).unwrap(),
            "cat #3: 0.12 {x}"
        );
        assert!(format_template("{d}", lookup)
            .unwrap_err()
            .contains("`{d}`"));
        assert!(format_template("{a", lookup).is_err());
        assert!(format_template("a}", lookup).is_err());
        assert!(format_template("{c:.2}", lookup).is_err());
    }
}
