//! Where the CLI finds plugins: a plugins folder (`--plugins DIR`, else the
//! default folder when it exists) and the `plugins:` section of a workflow.

use pixart_plugins::{Limits, PluginHost, PluginOptions};
use pixart_runtime::workflow::{plugin_refs, Diagnostic, DiagnosticKind, WorkflowError};
use pixart_runtime::Registry;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Sets the plugins folder for this process (`--plugins`); without it, the
/// default folder is used when it exists. A folder the user named
/// (`--plugins`, `$PIXART_PLUGINS`) must exist: a typo is not "no plugins".
pub fn set_dir(dir: Option<PathBuf>) -> Result<(), String> {
    let named = dir.or_else(|| {
        std::env::var_os("PIXART_PLUGINS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(d) = &named {
        if !d.is_dir() {
            return Err(format!("plugins folder {}: no such folder", d.display()));
        }
    }
    let _ = DIR.set(named.or_else(default_dir).filter(|d| d.is_dir()));
    Ok(())
}

/// `$PIXART_PLUGINS`, else `$XDG_DATA_HOME/pixart/plugins`, else
/// `~/.local/share/pixart/plugins`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PIXART_PLUGINS").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("pixart").join("plugins"))
}

fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(PluginHost::default)
}

/// The built-in nodes and those of the plugins folder. A plugin that fails to
/// load is reported and left out; the others still load.
pub fn base_registry() -> Registry {
    static BASE: OnceLock<Registry> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut registry = pixart_nodes::builtin_registry();
        let Some(dir) = DIR.get().cloned().flatten() else {
            return registry;
        };
        match host().load_dir(&dir) {
            Ok((plugins, failed)) => {
                for e in failed {
                    eprintln!("warning: plugin not loaded: {e}");
                }
                for plugin in plugins {
                    if let Err(e) = plugin.register(&mut registry) {
                        eprintln!("warning: plugin not loaded: {e}");
                    }
                }
            }
            Err(e) => eprintln!("warning: plugins folder not read: {e}"),
        }
        registry
    })
    .clone()
}

/// The registry a workflow file is loaded with: the base registry plus the
/// plugins its `plugins:` section names (relative paths from the current
/// folder, like every input path of a run).
pub fn registry_for(workflow: &Path) -> Result<Registry, WorkflowError> {
    let mut registry = base_registry();
    let Ok(source) = pixart_runtime::workflow::read_source(workflow) else {
        return Ok(registry); // loading the workflow reports it
    };
    let file = Some(workflow.display().to_string());
    let with_file = |mut d: Diagnostic| {
        d.file = file.clone();
        d
    };
    let refs = plugin_refs(&source).map_err(|diagnostics| WorkflowError {
        diagnostics: diagnostics.into_iter().map(with_file).collect(),
    })?;
    let mut errors = Vec::new();
    for r in refs {
        let defaults = Limits::default();
        let mb = |v: Option<f64>, default: usize| v.map_or(default, |mb| (mb * 1048576.0) as usize);
        let options = PluginOptions {
            limits: Limits {
                timeout: r
                    .timeout_s
                    .map_or(defaults.timeout, Duration::from_secs_f64),
                memory_bytes: mb(r.memory_mb, defaults.memory_bytes),
                output_bytes: mb(r.output_mb, defaults.output_bytes),
            },
            read_dir: r.read_dir.as_ref().map(PathBuf::from),
        };
        let loaded = host()
            .load(Path::new(&r.path), options)
            .and_then(|plugin| plugin.register(&mut registry));
        if let Err(e) = loaded {
            errors.push(with_file(
                Diagnostic::error(DiagnosticKind::Plugin, e.to_string()).at(Some(r.span)),
            ));
        }
    }
    if errors.is_empty() {
        Ok(registry)
    } else {
        Err(WorkflowError {
            diagnostics: errors,
        })
    }
}
