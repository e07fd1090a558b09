//! Runs a validated workflow as a DAG on tokio.
//!
//! - Only what the output nodes (or `--target` nodes) need is run.
//! - Ready nodes start in file order; independent ones run concurrently on the
//!   blocking pool (CPU-heavy work never blocks the async runtime), `inline`
//!   nodes run in place.
//! - Results of deterministic nodes are cached by a key of their type, literal
//!   inputs and their ancestors' keys.
//! - A failure stops only what depends on it; cancellation is per run.

mod cache;

pub use cache::{CacheKey, CachePolicy};

use crate::events::Event;
use crate::node::{Inputs, Node, NodeContext, NodeError, Outputs, RunShared};
use crate::value::Value;
use crate::workflow::{Binding, Piece, Workflow};
use cache::OutputCache;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Node ids to produce; empty means every output node.
    pub targets: Vec<String>,
    /// Where relative output paths go.
    pub out_dir: PathBuf,
    /// Where relative input paths are read from.
    pub base_dir: PathBuf,
    pub cancel: CancellationToken,
    pub run_id: Option<String>,
    /// Refuse file paths outside `base_dir` / `out_dir` (for untrusted workflows).
    pub confine_paths: bool,
    /// Let nodes send preview images (someone is watching, e.g. the editor).
    pub previews: bool,
    /// Bytes the values of the run and the working memory its nodes reserve
    /// may hold at most (models excepted); a node whose outputs pass it fails,
    /// and the run with it.
    pub memory_limit: Option<u64>,
    /// Bytes of the models the run's nodes load, at most.
    pub model_memory_limit: Option<u64>,
    /// The output folder's quota, shared by every run (the server's).
    pub disk_quota: Option<Arc<crate::budget::DiskQuota>>,
    /// A folder relative inputs are also looked for in, after `out_dir`: for
    /// the other ranks of an MPI job, which write into a scratch folder, the
    /// output folder of rank 0.
    pub read_also: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            targets: Vec::new(),
            out_dir: PathBuf::from("."),
            base_dir: PathBuf::from("."),
            cancel: CancellationToken::new(),
            run_id: None,
            previews: false,
            confine_paths: false,
            memory_limit: None,
            model_memory_limit: None,
            disk_quota: None,
            read_also: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeStatus {
    Executed {
        duration: Duration,
    },
    Cached,
    Failed {
        message: String,
    },
    /// Not run: an upstream node failed.
    Skipped {
        because: String,
    },
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct NodeReport {
    pub id: Arc<str>,
    pub node_type: Arc<str>,
    pub status: NodeStatus,
    /// Named outputs, when the node executed or came from the cache.
    pub outputs: Vec<(String, Value)>,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub node: String,
    pub node_type: String,
    pub message: String,
    /// `node.output` of everything this failure left unproduced: the failed node's
    /// own outputs and those of the nodes downstream of it.
    pub lost_outputs: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct RunReport {
    pub run_id: String,
    /// The nodes this run needed, in file order.
    pub nodes: Vec<NodeReport>,
    pub failures: Vec<Failure>,
    pub cancelled: bool,
    pub elapsed: Duration,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && !self.cancelled
    }

    pub fn node(&self, id: &str) -> Option<&NodeReport> {
        self.nodes.iter().find(|n| &*n.id == id)
    }

    pub fn output(&self, node: &str, output: &str) -> Option<&Value> {
        self.node(node)?
            .outputs
            .iter()
            .find(|(name, _)| name == output)
            .map(|(_, v)| v)
    }

    pub fn count(&self, pred: impl Fn(&NodeStatus) -> bool) -> usize {
        self.nodes.iter().filter(|n| pred(&n.status)).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Target(String),
    #[error("the run's folders: {0}")]
    Folders(std::io::Error),
}

pub struct Executor {
    cache: Mutex<OutputCache>,
    events: broadcast::Sender<Event>,
    max_parallel: usize,
    runs: AtomicU64,
    /// Distinguishes this executor's keys for non-deterministic nodes.
    nonce: u64,
}

impl Executor {
    pub fn new(policy: CachePolicy) -> Executor {
        let (events, _) = broadcast::channel(4096);
        let max_parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        Executor {
            cache: Mutex::new(OutputCache::new(policy)),
            events,
            max_parallel,
            runs: AtomicU64::new(0),
            nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }
    }

    /// How many non-inline nodes may run at once (default: the CPU count).
    pub fn with_max_parallel(mut self, n: usize) -> Executor {
        self.max_parallel = n.max(1);
        self
    }

    /// Sends an event to the executor's subscribers (the server adds its own,
    /// e.g. a run being queued or cancelled before it started).
    pub fn publish(&self, event: Event) {
        self.emit(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn clear_cache(&self) {
        self.lock_cache().clear();
    }

    /// Entries currently in the output cache.
    pub fn cached_entries(&self) -> usize {
        self.lock_cache().len()
    }

    /// Approximate bytes held by the output cache.
    pub fn cached_bytes(&self) -> usize {
        self.lock_cache().bytes()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, OutputCache> {
        // The cache holds plain data: a panic elsewhere cannot leave it inconsistent.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub async fn run(&self, wf: &Workflow, opts: RunOptions) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let needed = wf.needed(&opts.targets).map_err(RunError::Target)?;
        let run_no = self.runs.fetch_add(1, Ordering::Relaxed);
        let run_id: Arc<str> = Arc::from(
            opts.run_id
                .clone()
                .unwrap_or_else(|| format!("run-{run_no}")),
        );
        let confinement = if opts.confine_paths {
            let c = crate::confine::Confinement::new(&opts.base_dir, &opts.out_dir);
            Some(c.map_err(RunError::Folders)?)
        } else {
            None
        };
        let shared = Arc::new(RunShared {
            run_id: run_id.clone(),
            cancel: opts.cancel.clone(),
            events: self.events.clone(),
            out_dir: opts.out_dir.clone(),
            base_dir: opts.base_dir.clone(),
            read_also: opts.read_also.clone(),
            workflow_source: wf.source.clone(),
            params: wf.params_json(),
            confinement,
            previews: opts.previews,
            memory: Arc::new(crate::budget::MemoryBudget::new(
                "memory",
                opts.memory_limit,
            )),
            model_memory: Arc::new(crate::budget::MemoryBudget::new(
                "model memory",
                opts.model_memory_limit,
            )),
            disk: opts.disk_quota.clone(),
        });
        let mut run = Run::new(self, wf, needed, shared, run_no);
        self.emit(Event::RunStarted {
            run_id: run_id.clone(),
            nodes: run.needed_count(),
        });
        run.drive().await;
        run.done_reading_all();
        let report = run.finish(started.elapsed());
        if report.cancelled {
            self.emit(Event::RunCancelled { run_id });
        } else {
            self.emit(Event::RunFinished {
                run_id,
                ok: report.ok(),
                failed: report.failures.len(),
            });
        }
        Ok(report)
    }
}

type TaskResult = (usize, Result<Outputs, NodeError>, Duration);

/// The state of one run.
struct Run<'a> {
    exec: &'a Executor,
    wf: &'a Workflow,
    shared: Arc<RunShared>,
    run_no: u64,
    needed: Vec<bool>,
    /// Upstream nodes not yet done, per node.
    waiting: Vec<usize>,
    /// Needed nodes not yet done that read an output, per (node, output): at
    /// zero a handle there hears of its last use.
    readers_left: BTreeMap<(usize, usize), usize>,
    ready: BTreeSet<usize>,
    status: Vec<Option<NodeStatus>>,
    outputs: Vec<Option<Arc<[Value]>>>,
    keys: Vec<CacheKey>,
    tasks: JoinSet<TaskResult>,
    running: usize,
    failures: Vec<Failure>,
}

impl<'a> Run<'a> {
    fn new(
        exec: &'a Executor,
        wf: &'a Workflow,
        needed: Vec<bool>,
        shared: Arc<RunShared>,
        run_no: u64,
    ) -> Run<'a> {
        let n = wf.nodes.len();
        let waiting: Vec<usize> = (0..n).map(|i| wf.upstream(i).len()).collect();
        let ready = (0..n).filter(|&i| needed[i] && waiting[i] == 0).collect();
        let mut readers_left = BTreeMap::new();
        for d in (0..n).filter(|&d| needed[d]) {
            for read in reads(wf, d) {
                *readers_left.entry(read).or_insert(0) += 1;
            }
        }
        Run {
            exec,
            wf,
            shared,
            run_no,
            needed,
            waiting,
            readers_left,
            ready,
            status: vec![None; n],
            outputs: vec![None; n],
            keys: vec![[0; 32]; n],
            tasks: JoinSet::new(),
            running: 0,
            failures: Vec::new(),
        }
    }

    fn needed_count(&self) -> usize {
        self.needed.iter().filter(|&&b| b).count()
    }

    fn node(&self, i: usize) -> &'a Arc<dyn Node> {
        &self.wf.nodes[i].node
    }

    fn emit(&self, event: Event) {
        self.exec.emit(event);
    }

    async fn drive(&mut self) {
        let cancel = self.shared.cancel.clone();
        loop {
            while !cancel.is_cancelled() {
                let Some(i) = self.next_ready() else { break };
                self.ready.remove(&i);
                self.launch(i);
            }
            if self.running == 0 {
                break;
            }
            tokio::select! {
                joined = self.tasks.join_next() => {
                    if let Some(Ok((i, result, took))) = joined {
                        self.running -= 1;
                        self.settle(i, result, took);
                    } else if let Some(Err(e)) = joined {
                        // Tasks catch panics themselves; this is the runtime shutting down.
                        tracing::error!("node task lost: {e}");
                        self.running -= 1;
                    }
                }
                _ = cancel.cancelled(), if !cancel.is_cancelled() => {}
            }
        }
    }

    /// The first ready node in file order that may start now.
    fn next_ready(&self) -> Option<usize> {
        let room = self.running < self.exec.max_parallel;
        self.ready
            .iter()
            .copied()
            .find(|&i| room || self.node(i).spec().inline)
    }

    fn launch(&mut self, i: usize) {
        let wf = self.wf;
        let planned = &wf.nodes[i];
        let node = planned.node.clone();
        let spec = node.spec();
        let ctx = NodeContext {
            node_id: planned.id.clone(),
            run: self.shared.clone(),
        };
        let inputs = match self.gather_inputs(i) {
            Ok(values) => Inputs::new(node.clone(), values),
            Err(message) => return self.fail(i, message),
        };
        self.keys[i] = self.cache_key(i, &ctx, &inputs);
        if spec.cacheable() {
            let hit = self.exec.lock_cache().get(&self.keys[i]);
            if let Some(outputs) = hit {
                self.emit(Event::NodeCached {
                    run_id: self.shared.run_id.clone(),
                    node: planned.id.clone(),
                });
                self.status[i] = Some(NodeStatus::Cached);
                return self.complete(i, outputs);
            }
        }
        tracing::debug!(run = %self.shared.run_id, node = %planned.id, node_type = %planned.type_id, "node started");
        self.emit(Event::NodeStarted {
            run_id: self.shared.run_id.clone(),
            node: planned.id.clone(),
            node_type: planned.type_id.clone(),
        });
        if spec.inline {
            let (i, result, took) = execute(i, &node, &ctx, inputs);
            self.settle(i, result, took);
        } else {
            self.running += 1;
            self.tasks
                .spawn_blocking(move || execute(i, &node, &ctx, inputs));
        }
    }

    fn gather_inputs(&self, i: usize) -> Result<Vec<Option<Value>>, String> {
        let spec = self.node(i).spec();
        let mut values = Vec::with_capacity(spec.inputs.len());
        for (input, binding) in spec.inputs.iter().zip(&self.wf.nodes[i].inputs) {
            let value = match binding {
                Binding::Absent => None,
                Binding::Literal(v) => Some(v.clone()),
                Binding::Edge { from, output } => {
                    let v = self.upstream_value(*from, *output);
                    let v = v.coerce(&input.ty).map_err(|v| {
                        format!(
                            "input `{}` expects {}, but received {}",
                            input.name,
                            input.ty,
                            v.kind_name()
                        )
                    })?;
                    // Values computed upstream meet the same bounds as literals.
                    input
                        .check_range(&v)
                        .map_err(|e| format!("input `{}`: {e}", input.name))?;
                    Some(v)
                }
                Binding::Template(pieces) => {
                    let mut text = String::new();
                    for piece in pieces {
                        match piece {
                            Piece::Text(t) => text.push_str(t),
                            Piece::Output { from, output } => {
                                let v = self.upstream_value(*from, *output);
                                text.push_str(&v.to_text().unwrap_or_default());
                            }
                        }
                    }
                    let v = Value::String(text).coerce(&input.ty).map_err(|_| {
                        format!(
                            "input `{}`: interpolated text cannot become {}",
                            input.name, input.ty
                        )
                    })?;
                    input
                        .check_range(&v)
                        .map_err(|e| format!("input `{}`: {e}", input.name))?;
                    Some(v)
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    fn upstream_value(&self, from: usize, output: usize) -> Value {
        // A node runs only after all its upstream nodes completed.
        self.outputs[from].as_ref().expect("upstream completed")[output].clone()
    }

    /// ComfyUI's scheme: type@version, literal inputs, and the keys of the producers
    /// of connected inputs. Non-deterministic nodes get a key unique to this run, so
    /// neither they nor anything downstream is reused.
    fn cache_key(&self, i: usize, ctx: &NodeContext, inputs: &Inputs) -> CacheKey {
        let planned = &self.wf.nodes[i];
        let mut h = blake3::Hasher::new();
        h.update(planned.type_id.as_bytes());
        if !planned.node.spec().deterministic {
            h.update(b"nondeterministic");
            h.update(&self.exec.nonce.to_le_bytes());
            h.update(&self.run_no.to_le_bytes());
            h.update(&(i as u64).to_le_bytes());
            return *h.finalize().as_bytes();
        }
        let producer = |h: &mut blake3::Hasher, from: usize, output: usize| {
            h.update(&self.keys[from]);
            h.update(&(output as u64).to_le_bytes());
        };
        for binding in &planned.inputs {
            match binding {
                Binding::Absent => {
                    h.update(b"-");
                }
                Binding::Literal(v) => v.hash_literal(&mut h),
                Binding::Edge { from, output } => producer(&mut h, *from, *output),
                Binding::Template(pieces) => {
                    for piece in pieces {
                        match piece {
                            Piece::Text(t) => {
                                h.update(b"t");
                                h.update(&(t.len() as u64).to_le_bytes());
                                h.update(t.as_bytes());
                            }
                            Piece::Output { from, output } => producer(&mut h, *from, *output),
                        }
                    }
                }
            }
        }
        if let Some(extra) = planned.node.fingerprint(ctx, inputs) {
            h.update(b"fingerprint");
            h.update(extra.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    fn settle(&mut self, i: usize, result: Result<Outputs, NodeError>, took: Duration) {
        match result {
            Ok(outputs) => match self
                .check_outputs(i, outputs)
                .and_then(|outputs| self.hold(outputs))
            {
                Ok(outputs) => {
                    let outputs: Arc<[Value]> = Arc::from(outputs);
                    // Model handles are owned by the nodes' model cache, which bounds
                    // their memory; the output cache would keep them alive past it.
                    let holds_model = outputs.iter().any(|v| matches!(v, Value::Handle(_)));
                    if self.node(i).spec().cacheable() && !holds_model {
                        self.exec.lock_cache().insert(self.keys[i], outputs.clone());
                    }
                    tracing::debug!(run = %self.shared.run_id, node = %self.wf.nodes[i].id, ms = took.as_millis() as u64, "node finished");
                    self.emit(Event::NodeFinished {
                        run_id: self.shared.run_id.clone(),
                        node: self.wf.nodes[i].id.clone(),
                        millis: took.as_millis() as u64,
                    });
                    self.status[i] = Some(NodeStatus::Executed { duration: took });
                    self.complete(i, outputs);
                }
                Err(message) => self.fail(i, message),
            },
            Err(NodeError::Cancelled) => self.status[i] = Some(NodeStatus::Cancelled),
            Err(e) => self.fail(i, e.to_string()),
        }
    }

    /// Counts node `i`'s outputs against the run's memory budget (models are
    /// counted when loaded, against the model budget, so handles do not count).
    fn hold(&mut self, outputs: Vec<Value>) -> Result<Vec<Value>, String> {
        let bytes: usize = outputs
            .iter()
            .filter(|v| !matches!(v, Value::Handle(_)))
            .map(Value::approx_bytes)
            .sum();
        self.shared
            .memory
            .take(bytes as u64, "its outputs")
            .map(|()| outputs)
    }

    /// Puts a node's named outputs in declaration order, refusing missing, extra or
    /// mistyped ones.
    fn check_outputs(&self, i: usize, produced: Outputs) -> Result<Vec<Value>, String> {
        let spec = self.node(i).spec();
        let mut slots: Vec<Option<Value>> = vec![None; spec.outputs.len()];
        for (name, value) in produced.0 {
            let Some(idx) = spec.output_index(&name) else {
                return Err(format!("node produced an undeclared output `{name}`"));
            };
            let ty = &spec.outputs[idx].ty;
            let value = value.coerce(ty).map_err(|v| {
                format!(
                    "output `{name}` is declared {ty} but the node produced {}",
                    v.kind_name()
                )
            })?;
            if slots[idx].replace(value).is_some() {
                return Err(format!("node produced output `{name}` twice"));
            }
        }
        slots
            .into_iter()
            .zip(&spec.outputs)
            .map(|(v, o)| v.ok_or_else(|| format!("node did not produce its output `{}`", o.name)))
            .collect()
    }

    fn complete(&mut self, i: usize, outputs: Arc<[Value]>) {
        self.outputs[i] = Some(outputs);
        self.done_reading(i);
        for d in self.wf.downstream(i) {
            if !self.needed[d] {
                continue;
            }
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 {
                self.ready.insert(d);
            }
        }
    }

    /// Node `i` no longer needs its inputs: outputs whose last reader it was
    /// tell their handles.
    fn done_reading(&mut self, i: usize) {
        for read in reads(self.wf, i) {
            let Some(left) = self.readers_left.get_mut(&read) else {
                continue;
            };
            *left -= 1;
            if *left == 0 {
                self.readers_left.remove(&read);
                self.last_use(read);
            }
        }
    }

    /// The run is over (finished, failed or cancelled): outputs that readers
    /// left unread hear of their last use too.
    fn done_reading_all(&mut self) {
        for read in std::mem::take(&mut self.readers_left).into_keys() {
            self.last_use(read);
        }
    }

    fn last_use(&self, (node, output): (usize, usize)) {
        if let Some(Value::Handle(h)) = self.outputs[node].as_ref().and_then(|o| o.get(output)) {
            h.last_use();
        }
    }

    fn fail(&mut self, i: usize, message: String) {
        self.done_reading(i);
        let planned = &self.wf.nodes[i];
        let spec = planned.node.spec();
        tracing::debug!(run = %self.shared.run_id, node = %planned.id, "node failed: {message}");
        self.emit(Event::NodeFailed {
            run_id: self.shared.run_id.clone(),
            node: planned.id.clone(),
            error: message.clone(),
        });
        let mut lost: Vec<String> = spec
            .outputs
            .iter()
            .map(|o| format!("{}.{}", planned.id, o.name))
            .collect();
        // Everything downstream that this run needed can no longer be produced.
        let mut stack = self.wf.downstream(i);
        let mut seen = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if !self.needed[d] || !seen.insert(d) {
                continue;
            }
            stack.extend(self.wf.downstream(d));
        }
        for d in seen {
            let down = &self.wf.nodes[d];
            if self.status[d].is_none() {
                self.status[d] = Some(NodeStatus::Skipped {
                    because: planned.id.to_string(),
                });
                self.emit(Event::NodeSkipped {
                    run_id: self.shared.run_id.clone(),
                    node: down.id.clone(),
                    because: planned.id.clone(),
                });
            }
            lost.extend(
                down.node
                    .spec()
                    .outputs
                    .iter()
                    .map(|o| format!("{}.{}", down.id, o.name)),
            );
        }
        self.status[i] = Some(NodeStatus::Failed {
            message: message.clone(),
        });
        self.failures.push(Failure {
            node: planned.id.to_string(),
            node_type: planned.type_id.to_string(),
            message,
            lost_outputs: lost,
        });
    }

    fn finish(mut self, elapsed: Duration) -> RunReport {
        let cancelled = self.shared.cancel.is_cancelled();
        let mut nodes = Vec::with_capacity(self.needed_count());
        for (i, planned) in self.wf.nodes.iter().enumerate() {
            if !self.needed[i] {
                continue;
            }
            let status = self.status[i].take().unwrap_or(NodeStatus::Cancelled);
            let spec = planned.node.spec();
            let outputs = match &self.outputs[i] {
                Some(values) => spec
                    .outputs
                    .iter()
                    .zip(values.iter())
                    .map(|(o, v)| (o.name.clone(), v.clone()))
                    .collect(),
                None => Vec::new(),
            };
            nodes.push(NodeReport {
                id: planned.id.clone(),
                node_type: planned.type_id.clone(),
                status,
                outputs,
            });
        }
        RunReport {
            run_id: self.shared.run_id.to_string(),
            nodes,
            failures: self.failures,
            cancelled,
            elapsed,
        }
    }
}

/// Runs one node, turning a panic into an error so one bad node cannot take the
/// run (or the server) down.
fn execute(i: usize, node: &Arc<dyn Node>, ctx: &NodeContext, inputs: Inputs) -> TaskResult {
    let start = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| node.run(ctx, inputs)))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(NodeError::msg(format!("node panicked: {msg}")))
        });
    (i, result, start.elapsed())
}

/// The outputs (node, output) node `i` reads, each once.
fn reads(wf: &Workflow, i: usize) -> BTreeSet<(usize, usize)> {
    let mut out = BTreeSet::new();
    for binding in &wf.nodes[i].inputs {
        match binding {
            Binding::Edge { from, output } => {
                out.insert((*from, *output));
            }
            Binding::Template(pieces) => {
                for piece in pieces {
                    if let Piece::Output { from, output } = piece {
                        out.insert((*from, *output));
                    }
                }
            }
            Binding::Absent | Binding::Literal(_) => {}
        }
    }
    out
}

/// `n` bytes as people read them: 812 B, 3.4 MiB, 1.1 GiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
