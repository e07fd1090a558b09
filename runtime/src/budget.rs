//! What a served run may take: memory (its values, the working memory nodes
//! reserve, the models it loads) and room in the output folder. The CLI runs
//! without limits; the server sets them (`pixart serve --run-memory-gib`,
//! `--model-memory-gib`, `--out-quota-gib`, `--keep-free-gib`).

use crate::executor::human_bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes a run may hold of one kind, counted as they are taken. Shared by the
/// executor (which counts the values nodes produce) and the nodes (which reserve
/// what they allocate inside themselves before they allocate it).
#[derive(Debug)]
pub struct MemoryBudget {
    what: &'static str,
    limit: Option<u64>,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(what: &'static str, limit: Option<u64>) -> MemoryBudget {
        MemoryBudget {
            what,
            limit,
            used: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Counts `bytes` for good (until the run ends), or refuses them, counting
    /// nothing, when they would pass the limit.
    pub fn take(&self, bytes: u64, purpose: &str) -> Result<(), String> {
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.saturating_add(bytes);
                match self.limit {
                    Some(limit) if after > limit => None,
                    _ => Some(after),
                }
            });
        match before {
            Ok(_) => Ok(()),
            Err(used) => Err(format!(
                "{purpose}: {} more, with the {} the run already holds, is more than the {} of \
                 {} a run may hold here",
                human_bytes(bytes),
                human_bytes(used),
                human_bytes(self.limit.unwrap_or(0)),
                self.what,
            )),
        }
    }

    /// Like [`take`](Self::take), given back when the reservation is dropped
    /// (working memory a node frees when it ends).
    pub fn reserve(self: &Arc<Self>, bytes: u64, purpose: &str) -> Result<Reservation, String> {
        self.take(bytes, purpose)?;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Memory a node reserved; returned to the run's budget on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Room in the server's output folder: at most `limit` bytes in it (uploads
/// included), and `keep_free` bytes left free on its disk. Writers charge what
/// they are about to write; the folder's real size is measured at start and
/// again when a charge would pass the limit (files deleted since free room).
#[derive(Debug)]
pub struct DiskQuota {
    root: PathBuf,
    limit: Option<u64>,
    keep_free: u64,
    used: AtomicU64,
    last_measured: Mutex<Instant>,
}

/// Entries a measurement of the output folder walks at most; beyond, the
/// folder counts as full (a folder that large is not served from).
const MEASURE_ENTRIES: usize = 2_000_000;
/// The least time between two measurements caused by charges.
const REMEASURE_AFTER: Duration = Duration::from_secs(2);
/// The unit writes are charged in: a file takes whole blocks on the disk.
const BLOCK: u64 = 4096;
/// Files (inodes) left free on the output folder's disk: writes that would
/// take the last of them fail.
const KEEP_FREE_FILES: u64 = 10_000;

impl DiskQuota {
    pub fn new(root: &Path, limit: Option<u64>, keep_free: u64) -> DiskQuota {
        DiskQuota {
            root: root.to_path_buf(),
            limit,
            keep_free,
            used: AtomicU64::new(folder_bytes(root)),
            last_measured: Mutex::new(Instant::now()),
        }
    }

    /// Bytes the output folder holds, as last measured plus what was charged since.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Counts `bytes` about to be written into the output folder, or refuses
    /// them (counting nothing) when they would pass the quota or leave less
    /// than `keep_free` on the disk.
    pub fn charge(&self, bytes: u64) -> Result<(), String> {
        // What the disk gives a file is whole blocks: small files count as one.
        let bytes = bytes.div_ceil(BLOCK).max(1).saturating_mul(BLOCK);
        if let Some(limit) = self.limit {
            let fits = |used: u64| used.saturating_add(bytes) <= limit;
            if !fits(self.used()) {
                self.remeasure();
            }
            let taken = self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    fits(used).then(|| used.saturating_add(bytes))
                });
            if let Err(used) = taken {
                return Err(format!(
                    "writing {} would pass the output folder's quota of {} (it holds {})",
                    human_bytes(bytes),
                    human_bytes(limit),
                    human_bytes(used)
                ));
            }
        } else {
            self.used.fetch_add(bytes, Ordering::AcqRel);
        }
        if let Some((free, files)) = free_space(&self.root) {
            let why = if free < bytes.saturating_add(self.keep_free) {
                Some(format!(
                    "writing {} would leave less than {} free on the output folder's disk \
                     ({} free)",
                    human_bytes(bytes),
                    human_bytes(self.keep_free),
                    human_bytes(free)
                ))
            } else if files < KEEP_FREE_FILES {
                Some(format!(
                    "the output folder's disk has room for only {files} more files"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.used.fetch_sub(bytes, Ordering::AcqRel);
                return Err(why);
            }
        }
        Ok(())
    }

    fn remeasure(&self) {
        let mut last = self.last_measured.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < REMEASURE_AFTER {
            return;
        }
        self.used.store(folder_bytes(&self.root), Ordering::Release);
        *last = Instant::now();
    }
}

/// The bytes of the files below `root` (links not followed), walked without
/// recursion; `u64::MAX` past [`MEASURE_ENTRIES`] entries.
fn folder_bytes(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > MEASURE_ENTRIES {
                return u64::MAX;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                // The blocks the file takes, as charges count them.
                use std::os::unix::fs::MetadataExt;
                total = total.saturating_add(meta.blocks().saturating_mul(512).max(BLOCK));
            }
        }
    }
    total
}

/// Bytes and files (inodes) an unprivileged writer may still use on the disk
/// holding `path`.
fn free_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `stat` is a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::useless_conversion)] // u32 on 32-bit targets
    let (blocks, size, files) = (
        u64::from(stat.f_bavail),
        u64::from(stat.f_frsize),
        u64::from(stat.f_favail),
    );
    Some((blocks.saturating_mul(size), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_passes_it_and_reservations_come_back() {
        let budget = Arc::new(MemoryBudget::new("memory", Some(100)));
        budget.take(60, "a").unwrap();
        let held = budget.reserve(30, "b").unwrap();
        let refused = budget.reserve(20, "training state").unwrap_err();
        assert!(refused.contains("training state: 20 B more"), "{refused}");
        assert_eq!(budget.used(), 90, "a refusal counts nothing");
        drop(held);
        budget.reserve(40, "c").unwrap();
        let open = Arc::new(MemoryBudget::new("memory", None));
        open.take(u64::MAX, "anything").unwrap();
    }

    #[test]
    fn the_quota_counts_charges_and_measures_again_when_full() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.bin"), vec![1u8; 10_000]).unwrap();
        let held = DiskQuota::new(dir.path(), None, 0).used();
        assert!(held >= 10_000, "{held}");
        let quota = DiskQuota::new(dir.path(), Some(held + 3 * BLOCK), 0);
        quota.charge(1).unwrap();
        quota.charge(BLOCK + 1).unwrap();
        assert_eq!(quota.used(), held + 3 * BLOCK, "whole blocks");
        let refused = quota.charge(200).unwrap_err();
        assert!(refused.contains("quota"), "{refused}");
        assert_eq!(quota.used(), held + 3 * BLOCK, "a refusal counts nothing");
        // Deleting files makes room once the folder is measured again.
        std::fs::remove_file(dir.path().join("old.bin")).unwrap();
        *quota.last_measured.lock().unwrap() -= REMEASURE_AFTER;
        quota.charge(200).unwrap();
        assert_eq!(quota.used(), BLOCK);
        let disk = DiskQuota::new(dir.path(), None, u64::MAX / 2);
        let refused = disk.charge(1).unwrap_err();
        assert!(refused.contains("free"), "{refused}");
        assert_eq!(disk.used(), 0, "a refusal counts nothing");
    }
}
