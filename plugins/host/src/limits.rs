//! What one plugin call may use: time, guest memory, and host memory for the
//! values it returns.

use std::time::Duration;

/// Per-call limits. A call past one fails with an error naming the limit; the
/// host and other runs are unaffected.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Wall-clock time of one node run (checked every few milliseconds).
    pub timeout: Duration,
    /// The guest's linear memory.
    pub memory_bytes: usize,
    /// Host memory for what the guest makes: tensors it creates and the
    /// strings and lists it returns.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(60),
            memory_bytes: 512 << 20,
            output_bytes: 1 << 30,
        }
    }
}

/// Raised from inside wasm when the guest grows its memory past the limit.
#[derive(Debug, thiserror::Error)]
#[error("used more memory than its limit of {limit} MiB (asked for {desired} MiB)", limit = .limit >> 20, desired = .desired >> 20)]
pub struct MemoryLimit {
    pub desired: usize,
    pub limit: usize,
}

/// Raised when the guest makes more output data than the limit.
#[derive(Debug, thiserror::Error)]
#[error("made more output than its limit of {limit} MiB", limit = .limit >> 20)]
pub struct OutputLimit {
    pub limit: usize,
}

/// Raised by the epoch check when the run was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// The store's resource limiter: memory by our limit, a handful of tables and
/// instances (a component needs a few of each).
pub(crate) struct Limiter {
    pub memory_bytes: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(MemoryLimit {
                desired,
                limit: self.memory_bytes,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}
