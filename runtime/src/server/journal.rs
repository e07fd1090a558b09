//! The server's run records on disk: one JSON line per change of a run, appended,
//! so a run's cost on disk is its own record, not a rewrite of the whole history,
//! and a crash loses at most the line being written. Reading keeps the last line
//! of each run; the file is compacted when it has grown to a few times what is kept.

use super::state::RunRecord;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The most of a journal that is read back, bytes (records are bounded, so this
/// is far more than a compacted journal holds).
const MAX_READ: u64 = 256 << 20;

pub struct Journal {
    path: PathBuf,
    lines: usize,
    bytes: u64,
    /// Bytes of the file when it was last compacted (what the kept records take).
    compacted: u64,
}

impl Journal {
    /// Opens the journal at `path` and returns the runs it records, oldest change
    /// first. Lines that do not parse (a torn last line after a crash) are skipped.
    pub fn open(path: &Path) -> (Journal, Vec<RunRecord>) {
        let mut text = Vec::new();
        if let Err(e) = read_tail(path, &mut text) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot read the run history {}: {e}", path.display());
            }
        }
        let bytes = text.len() as u64;
        let mut last: HashMap<String, (usize, RunRecord)> = HashMap::new();
        let mut lines = 0;
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            lines += 1;
            match serde_json::from_slice::<RunRecord>(line) {
                Ok(record) => {
                    last.insert(record.id.clone(), (n, record));
                }
                Err(e) => tracing::warn!("{}:{}: skipped: {e}", path.display(), n + 1),
            }
        }
        let mut records: Vec<(usize, RunRecord)> = last.into_values().collect();
        records.sort_by_key(|(n, _)| *n);
        let journal = Journal {
            path: path.to_path_buf(),
            lines,
            bytes,
            compacted: 0,
        };
        (journal, records.into_iter().map(|(_, r)| r).collect())
    }

    /// Lines in the file now.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Bytes in the file now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the file after its last compaction: the records kept take that
    /// much, so compacting again is worth it only once the file has grown past it.
    pub fn compacted_bytes(&self) -> u64 {
        self.compacted
    }

    /// Appends `record` as one line, written with one call.
    pub fn append(&mut self, record: &RunRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(&line)?;
        self.lines += 1;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Replaces the file by one line per record (atomically).
    pub fn compact(&mut self, records: &[RunRecord]) -> std::io::Result<()> {
        let mut text = Vec::new();
        for r in records {
            serde_json::to_writer(&mut text, r).map_err(std::io::Error::other)?;
            text.push(b'\n');
        }
        crate::fsutil::atomic_write(&self.path, &text)?;
        self.lines = records.len();
        self.bytes = text.len() as u64;
        self.compacted = self.bytes;
        Ok(())
    }
}

/// The last [`MAX_READ`] bytes of the file, from the first whole line on (the
/// newest records are at the end).
fn read_tail(path: &Path, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_READ {
        file.seek(SeekFrom::Start(len - MAX_READ))?;
    }
    file.take(MAX_READ).read_to_end(out)?;
    if len > MAX_READ {
        let first = out
            .iter()
            .position(|&b| b == b'\n')
            .map_or(out.len(), |i| i + 1);
        out.drain(..first);
    }
    Ok(())
}
