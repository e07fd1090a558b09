//! Compiled components, kept on disk keyed by the plugin file's hash so a
//! plugin is compiled once, not at every start.

use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The default cache folder: `$XDG_CACHE_HOME/pixart/plugins`, else
/// `~/.cache/pixart/plugins`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("pixart").join("plugins"))
}

/// Compiles `bytes` or loads the artefact this host compiled from them before.
///
/// Only files this function wrote are ever deserialised (deserialising runs
/// native code, so a foreign file would be unsafe): they live in a folder of
/// ours, are written under a temporary name and renamed into place, and their
/// name carries the engine's compatibility hash. An artefact that fails to load
/// (another wasmtime, a damaged file) is compiled again and replaced.
pub(crate) fn compile(
    engine: &Engine,
    dir: Option<&Path>,
    hash: &blake3::Hash,
    bytes: &[u8],
) -> wasmtime::Result<Component> {
    let Some(dir) = dir else {
        return Component::new(engine, bytes);
    };
    let file = dir.join(format!("{}-{}.cwasm", hash.to_hex(), engine_key(engine)));
    // Read, not mapped: a mapped file truncated by someone else would crash
    // the process (SIGBUS) instead of failing.
    if let Ok(artefact) = std::fs::read(&file) {
        // SAFETY: the file was written by `store` below from wasmtime's own
        // serialisation (see the function's comment); wasmtime checks version
        // and configuration compatibility and returns an error if they differ.
        match unsafe { Component::deserialize(engine, &artefact) } {
            Ok(component) => return Ok(component),
            Err(e) => tracing::warn!("recompiling {}: {e}", file.display()),
        }
    }
    let component = Component::new(engine, bytes)?;
    if let Err(e) = store(&file, &component) {
        tracing::warn!(
            "cannot cache the compiled plugin at {}: {e}",
            file.display()
        );
    }
    Ok(component)
}

fn store(file: &Path, component: &Component) -> wasmtime::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin"),
        std::process::id()
    ));
    std::fs::write(&tmp, component.serialize()?)?;
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Short key of everything that makes an artefact loadable by this engine.
fn engine_key(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}
