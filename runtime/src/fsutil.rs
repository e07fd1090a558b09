//! Files appear whole or not at all: outputs of nodes, the server's history and
//! uploads all go through [`atomic_write`].

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so an interrupted run never leaves a truncated file behind. Creates
/// missing parent directories. Temporary names are unique per process and call, so
/// concurrent writers of one target never share one (the last rename wins, whole).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    std::fs::create_dir_all(dir)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
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
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files that [`atomic_write`] calls of processes that no
/// longer run left below `dir` (a process killed mid-write leaves one). Walks
/// without following links, at most `max_entries` entries; returns how many it
/// removed. Only where processes can be looked up (`/proc`).
pub fn sweep_stale_temporaries(dir: &Path, max_entries: usize) -> usize {
    let proc = Path::new("/proc/self");
    if !proc.exists() {
        return 0;
    }
    let mut removed = 0;
    let mut seen = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > max_entries {
                return removed;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let name = entry.file_name();
                let dead = temporary_owner(&name.to_string_lossy())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if dead && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// The process id in a temporary name `.{name}.{pid}-{n}.tmp`.
fn temporary_owner(file: &str) -> Option<u32> {
    let inner = file.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = inner.rsplit_once('.')?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Standard base64 (RFC 4648, with padding), for data URLs.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ABC[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod sweep_tests {
    #[test]
    fn only_temporaries_of_dead_processes_go() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        // pid 0 is never a process of ours; the test's own pid is alive.
        let dead = sub.join(".img.png.0-3.tmp");
        let alive = sub.join(format!(".img.png.{}-4.tmp", std::process::id()));
        let other = sub.join(".notes.tmp");
        for f in [&dead, &alive, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        if !std::path::Path::new("/proc/self").exists() {
            return;
        }
        assert_eq!(super::sweep_stale_temporaries(dir.path(), 1000), 1);
        assert!(!dead.exists() && alive.exists() && other.exists());
    }
}

#[cfg(test)]
mod base64_tests {
    #[test]
    fn matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(input.as_bytes()), want);
        }
    }
}
