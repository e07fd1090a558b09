//! Files written by nodes appear whole or not at all.

use pixart_runtime::{Inputs, NodeContext, NodeError};
use std::path::Path;

/// [`pixart_runtime::fsutil::atomic_write`], charged to the server's quota of
/// the output folder first, with the error naming the file.
pub fn atomic_write(ctx: &NodeContext, path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    // Named by the file alone: the server's own paths stay its own.
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    ctx.charge_disk(bytes.len() as u64)
        .map_err(|e| NodeError::msg(format!("{name}: {e}")))?;
    pixart_runtime::fsutil::atomic_write(path, bytes).map_err(|e| NodeError::io(path, e))
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
