//! What a store holds while a plugin runs: the tensors it can see, its limits
//! and the node context it reports to.

use crate::limits::{Cancelled, Limiter, Limits, OutputLimit};
use pixart_runtime::candle_core::Tensor;
use pixart_runtime::NodeContext;
use std::path::PathBuf;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};

/// A host tensor as a plugin sees it: a handle, never the data itself.
pub struct PluginTensor(pub Tensor);

/// How many log lines one call may write before the rest are dropped.
const MAX_LOG_LINES: usize = 1000;
/// Handles (tensors) one call may hold at once.
const MAX_HANDLES: usize = 100_000;

pub struct StoreState {
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) plugin: String,
    /// The run's context; `None` while the plugin describes itself.
    pub(crate) ctx: Option<NodeContext>,
    pub(crate) deadline: Instant,
    pub(crate) output_limit: usize,
    pub(crate) output_used: usize,
    /// The granted read-only folder, if any.
    pub(crate) read_dir: Option<PathBuf>,
    pub(crate) log_lines: usize,
    /// The last error the guest logged: its panic message when it panics.
    pub(crate) last_error: Option<String>,
}

impl StoreState {
    /// Charges `bytes` of guest-made output against the limit.
    pub(crate) fn charge(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.output_used = self.output_used.saturating_add(bytes);
        if self.output_used > self.output_limit {
            return Err(OutputLimit {
                limit: self.output_limit,
            }
            .into());
        }
        Ok(())
    }

    pub(crate) fn log(&mut self, level: tracing::Level, message: &str) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        let node = self.ctx.as_ref().map(|c| c.node_id()).unwrap_or("-");
        match level {
            tracing::Level::ERROR => tracing::error!(plugin = %self.plugin, node, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin = %self.plugin, node, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin = %self.plugin, node, "{message}"),
            _ => tracing::debug!(plugin = %self.plugin, node, "{message}"),
        }
    }
}

/// A store for a plugin instance. Instances are reused between calls (memory
/// the guest grew stays warm, so calls cost microseconds and tensors cross
/// without page faults); [`begin_call`] resets everything a call may use, and
/// an instance that trapped is dropped, never reused.
pub(crate) fn new_store(
    plugin: &str,
    limits: &Limits,
    read_dir: Option<PathBuf>,
) -> Store<StoreState> {
    let state = StoreState {
        table: ResourceTable::new(),
        limiter: Limiter {
            memory_bytes: limits.memory_bytes,
        },
        plugin: plugin.to_string(),
        ctx: None,
        deadline: Instant::now() + limits.timeout,
        output_limit: limits.output_bytes,
        output_used: 0,
        read_dir,
        log_lines: 0,
        last_error: None,
    };
    let mut store = Store::new(crate::engine::engine(), state);
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|cx| {
        let state = cx.data();
        if state.ctx.as_ref().is_some_and(NodeContext::is_cancelled) {
            return Err(Cancelled.into());
        }
        if Instant::now() >= state.deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Continue(1))
    });
    store
}

/// Prepares a store for the next call: a new deadline, empty handle table,
/// zeroed output budget, the call's context.
pub(crate) fn begin_call(store: &mut Store<StoreState>, limits: &Limits, ctx: Option<NodeContext>) {
    let state = store.data_mut();
    // Handles a guest kept from an earlier call are gone: using one traps.
    state.table = ResourceTable::new();
    state.table.set_max_capacity(MAX_HANDLES);
    state.ctx = ctx;
    state.deadline = Instant::now() + limits.timeout;
    state.output_used = 0;
    state.log_lines = 0;
    state.last_error = None;
    store.set_epoch_deadline(1);
}

/// Drops what a finished call held (its context, its tensors).
pub(crate) fn end_call(store: &mut Store<StoreState>) {
    let state = store.data_mut();
    state.ctx = None;
    state.table = ResourceTable::new();
}
