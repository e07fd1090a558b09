//! Files written by nodes appear whole or not at all.

use pixart_runtime::{Inputs, NodeContext, NodeError};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so an interrupted run never leaves a truncated output behind.
/// Creates missing parent directories.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| NodeError::msg(format!("{}: not a file path", path.display())))?;
    // Unique per process and call, so concurrent writers of one target never share
    // a temporary file (the last rename wins, whole).
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{n}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));

    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        NodeError::io(path, e)
    })
}

/// Size and modification time of the file named by input `port`: cache-key
/// material for loaders, so an edited file is read again.
pub fn input_file_fingerprint(ctx: &NodeContext, inputs: &Inputs, port: &str) -> Option<String> {
    let path = ctx.input_path(inputs.path(port).ok()?).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(format!("{}:{modified}", meta.len()))
}
