//! Model folders written whole: files go into a hidden staging folder that is
//! renamed into place, so a reader sees the old folder or the new one, never a mix.

use candle_core::Tensor;
use std::io;
use std::path::Path;

/// safetensors bytes of `tensors`, in name order.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> io::Result<Vec<u8>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(sorted.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Replaces folder `dir` by one holding exactly `files` (relative path → bytes).
pub fn write(dir: &Path, files: &[(&str, Vec<u8>)]) -> io::Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let staging = parent.join(format!(".{name}.partial"));
    let old = parent.join(format!(".{name}.old"));
    for leftover in [&staging, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover)?;
        }
    }
    std::fs::create_dir_all(&staging)?;
    for (file, bytes) in files {
        let path = staging.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        pixart_runtime::fsutil::atomic_write(&path, bytes)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&staging, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}
