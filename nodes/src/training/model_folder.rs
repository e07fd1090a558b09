//! Model folders written whole: files go into a hidden staging folder that is
//! renamed into place, so a reader sees the old folder or the new one, never a mix.

use candle_core::Tensor;
use pixart_runtime::NodeContext;
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

/// safetensors bytes of `tensors`, in name order.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> io::Result<Vec<u8>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(sorted.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Replaces folder `dir` by one holding exactly `files` (relative path → bytes).
/// An existing folder is replaced only when everything in it is among `files`
/// (an earlier save of the same model): a folder holding anything else — other
/// outputs, someone's data — is refused, never lost.
/// What it writes is charged to the server's quota of the output folder first.
pub fn write(ctx: &NodeContext, dir: &Path, files: &[(&str, Vec<u8>)]) -> io::Result<()> {
    write_with_copies(ctx, dir, files, &[])
}

/// [`write`], with `copies` (relative path → source file) copied in as well,
/// streamed rather than read into memory.
pub fn write_with_copies(
    ctx: &NodeContext,
    dir: &Path,
    files: &[(&str, Vec<u8>)],
    copies: &[(&str, PathBuf)],
) -> io::Result<()> {
    let mut bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    for (_, source) in copies {
        bytes += std::fs::metadata(source)?.len();
    }
    ctx.charge_disk(bytes)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let new: HashSet<PathBuf> = files
        .iter()
        .map(|(f, _)| PathBuf::from(f))
        .chain(copies.iter().map(|(f, _)| PathBuf::from(f)))
        .collect();
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a folder",
            ));
        }
        only_ours(dir, &new)?;
    }
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
    for (file, source) in copies {
        let path = staging.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source, &path)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old)?;
        // Moved aside, the old folder cannot change any more: check it again, as
        // another writer may have added to it since the first look.
        if let Err(e) = only_ours(&old, &new) {
            std::fs::rename(&old, dir)?;
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    }
    std::fs::rename(&staging, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Refuses a folder holding any file that is not among `ours`.
fn only_ours(dir: &Path, ours: &HashSet<PathBuf>) -> io::Result<()> {
    let foreign: Vec<String> = files_in(dir)?
        .into_iter()
        .filter(|f| !ours.contains(f))
        .map(|f| f.display().to_string())
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "the folder exists and holds files this model does not ({}{}); \
             write to a new folder or remove them first",
            shown.join(", "),
            if foreign.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ),
    ))
}

/// Every file below `dir`, relative to it (a link counts as a file: replacing the
/// folder drops it), walked without recursion.
fn files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_replaced_only_when_it_holds_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let ctx = NodeContext::detached(root.path(), root.path());
        let dir = root.path().join("model");
        let files = [("config.json", b"{}".to_vec()), ("sub/w.bin", vec![1u8])];
        write(&ctx, &dir, &files).unwrap();
        write(&ctx, &dir, &files).unwrap(); // the same model again
        std::fs::write(dir.join("sub/photo.png"), b"keep").unwrap();
        let err = write(&ctx, &dir, &files).unwrap_err();
        assert!(err.to_string().contains("sub/photo.png"), "{err}");
        assert_eq!(std::fs::read(dir.join("sub/photo.png")).unwrap(), b"keep");
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(write(&ctx, &file, &files).is_err());
    }
}
