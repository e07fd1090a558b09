//! The server's run queue, run records, history and file registry.

use super::journal::Journal;
use crate::events::Event;
use crate::executor::{Executor, NodeStatus, RunOptions};
use crate::registry::Registry;
use crate::value::Value;
use crate::workflow::{
    load_workflow, Diagnostic, DiagnosticKind, LoadOptions, OverrideSource, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Outputs, uploads and the persisted history live here.
    pub out_dir: PathBuf,
    /// Where relative input paths of workflows are read from.
    pub base_dir: PathBuf,
    /// Runs executed at once (model-heavy runs want 1).
    pub max_parallel_runs: usize,
    /// Finished runs kept (and persisted).
    pub history_limit: usize,
    /// Largest accepted upload, bytes.
    pub upload_limit: u64,
    /// Accept requests whose Host is not loopback (bound beyond this machine).
    pub allow_remote: bool,
    /// The browser editor's files (path relative to the site root, bytes),
    /// served at `/`; empty: the page says the editor was not built.
    pub editor: &'static [(&'static str, &'static [u8])],
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: std::time::Duration,
    /// Bytes the values of one run, and the working memory its nodes reserve
    /// (a model being trained), may hold (loaded models excepted): checked
    /// against the nodes' estimates when a run is submitted, and as it goes.
    pub run_memory_limit: u64,
    /// Bytes of the models one run may load (read off their weight files
    /// before loading).
    pub run_model_memory_limit: u64,
    /// Bytes the output folder may hold, uploads included (`None`: no quota).
    pub out_quota: Option<u64>,
    /// Bytes left free on the output folder's disk: writes that would pass it fail.
    pub keep_free: u64,
    /// How long a request body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// Event streams (WebSockets) open at once.
    pub max_event_streams: usize,
}

/// An eighth of this machine's memory (of 16 GiB where it cannot be read),
/// between 1 and 8 GiB: a run's tensors and images are far smaller than its
/// models, which do not count.
pub fn default_run_memory_limit() -> u64 {
    (machine_memory() / 8).clamp(1 << 30, 8 << 30)
}

/// Five eighths of this machine's memory (of 16 GiB where it cannot be read),
/// at least 2 GiB: room for PixArt-XL and a bf16 T5-XXL on a 24 GiB machine.
pub fn default_run_model_memory_limit() -> u64 {
    (machine_memory() / 8 * 5).max(2 << 30)
}

fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(16 << 30)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            out_dir: PathBuf::from("out"),
            base_dir: PathBuf::from("."),
            max_parallel_runs: 1,
            history_limit: 200,
            upload_limit: 32 << 20,
            allow_remote: false,
            editor: &[],
            header_read_timeout: std::time::Duration::from_secs(10),
            run_memory_limit: default_run_memory_limit(),
            run_model_memory_limit: default_run_model_memory_limit(),
            out_quota: None,
            keep_free: 1 << 30,
            body_timeout: std::time::Duration::from_secs(60),
            max_event_streams: 256,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Finished,
    Failed,
    Cancelled,
    /// Queued or running when the server stopped (a crash, a kill): not run to its end.
    Interrupted,
}

impl RunState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            RunState::Finished | RunState::Failed | RunState::Cancelled | RunState::Interrupted
        )
    }
}

/// One output value of a finished run, with the files it wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputRecord {
    pub node: String,
    pub output: String,
    pub value: serde_json::Value,
    pub files: Vec<FileRef>,
}

/// A file the server hands out by `id` (never by path); `path` is relative to
/// the output folder (the server's own paths are not shown to clients).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRef {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub name: Option<String>,
    pub state: RunState,
    /// When the server accepted the run, Unix time in milliseconds (`None` in
    /// records of versions before it was kept).
    #[serde(default)]
    pub submitted_at: Option<u64>,
    /// When the run left the queue and started, Unix milliseconds (`None`: not
    /// yet, or never: cancelled while queued).
    #[serde(default)]
    pub started_at: Option<u64>,
    /// When the run ended (finished, failed or cancelled), Unix milliseconds
    /// (`None`: not yet, or cut short by the server's end).
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// The workflow text as submitted; `None` when it is longer than
    /// [`MAX_RECORDED_WORKFLOW`] (256 KiB), so that the journal and the
    /// history stay bounded (a record is kept for each of `history_limit` runs).
    #[serde(default)]
    pub workflow: Option<String>,
    /// The param values the client sent; empty when none were sent, or when
    /// they take more than [`MAX_RECORDED_PARAMS`] bytes as JSON.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    pub outputs: Vec<OutputRecord>,
    pub failures: Vec<serde_json::Value>,
    /// Each node's end (`executed`, `cached`, `failed`, `skipped`,
    /// `cancelled`), written as a JSON object `{"node": "state", ...}`; the
    /// list of `[node, state]` pairs of earlier versions is read too.
    #[serde(default, with = "node_states")]
    pub node_states: Vec<(String, String)>,
}

/// `node_states` as a JSON object, read from an object or (journals of
/// earlier versions) a list of pairs.
mod node_states {
    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(states: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(states.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        struct States;
        impl<'de> Visitor<'de> for States {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object from node ids to states, or a list of [node, state] pairs")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut states = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    states.push(pair);
                }
                Ok(states)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut states = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(pair) = seq.next_element::<(String, String)>()? {
                    states.push(pair);
                }
                Ok(states)
            }
        }
        d.deserialize_any(States)
    }
}

/// The queue as `GET /api/queue` answers it: whether it is paused, and the
/// running runs then the waiting ones, in the order they will start.
#[derive(Clone, Debug, Serialize)]
pub struct QueueView {
    pub paused: bool,
    pub runs: Vec<RunRecord>,
}

/// What a client submits: a workflow (YAML or JSON text), param values and targets.
#[derive(Debug, Deserialize)]
pub struct RunRequest {
    pub workflow: String,
    #[serde(default)]
    pub params: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub targets: Vec<String>,
}

pub struct State {
    pub registry: Registry,
    pub executor: Executor,
    pub config: ServerConfig,
    runs: Mutex<Runs>,
    files: Mutex<HashMap<String, PathBuf>>,
    /// Wakes the queue worker: a run was submitted, or the queue resumed.
    wake: Notify,
    /// `queue_changed` notices (with whether the queue is paused) for the
    /// event streams: a run was moved, or the queue paused or resumed.
    queue_changes: broadcast::Sender<bool>,
    journal: Mutex<Journal>,
    /// Event streams (WebSockets) open now.
    pub(crate) event_streams: Arc<Semaphore>,
    /// Room in the output folder, shared by runs and uploads.
    pub(crate) disk: Arc<crate::budget::DiskQuota>,
}

#[derive(Default)]
struct Runs {
    records: HashMap<String, RunRecord>,
    /// Finished runs, oldest first (bounded by `history_limit`).
    history: VecDeque<String>,
    pending: HashMap<String, (Arc<Workflow>, Vec<String>)>,
    /// The ids of the runs in `pending`, in the order they are to start.
    order: VecDeque<String>,
    /// No run starts while set (running ones go on).
    paused: bool,
    /// Workflow text of the runs in `pending`, bytes.
    pending_bytes: usize,
    cancels: HashMap<String, CancellationToken>,
    counter: u64,
}

impl Runs {
    fn take_pending(&mut self, id: &str) -> Option<(Arc<Workflow>, Vec<String>)> {
        let taken = self.pending.remove(id)?;
        self.order.retain(|waiting| waiting != id);
        self.pending_bytes = self.pending_bytes.saturating_sub(taken.0.source.len());
        Some(taken)
    }

    /// Running runs (in the order they started), then waiting ones in queue order.
    fn queue(&self) -> Vec<RunRecord> {
        let mut running: Vec<&RunRecord> = self
            .records
            .values()
            .filter(|r| r.state == RunState::Running)
            .collect();
        running.sort_by_key(|r| (r.started_at, run_number(&r.id)));
        let waiting = self.order.iter().filter_map(|id| self.records.get(id));
        running.into_iter().chain(waiting).cloned().collect()
    }
}

/// A run taken off the queue by the worker, to execute.
struct Started {
    id: String,
    workflow: Arc<Workflow>,
    targets: Vec<String>,
    cancel: CancellationToken,
}

#[derive(Debug)]
pub enum SubmitError {
    Invalid(WorkflowError),
    /// Too many runs, or too much workflow text, waiting.
    QueueFull(String),
}

/// Node states kept in a run's record (a run of 100,000 nodes keeps the first).
pub const MAX_RECORDED_NODE_STATES: usize = 10_000;
/// Failures kept in a run's record, and the characters kept of each message.
pub const MAX_RECORDED_FAILURES: usize = 100;
pub const MAX_FAILURE_CHARS: usize = 4096;
/// Files listed per output of a run's record.
pub const MAX_RECORDED_FILES: usize = 10_000;
/// The journal is compacted past this size.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// Runs waiting at most; more are refused until the queue drains.
pub const MAX_QUEUED: usize = 1000;
/// Workflow text waiting at most, bytes: a loaded workflow takes about ten
/// times its text in memory, so this bounds the queue to a few hundred MiB.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

#[derive(Debug, PartialEq)]
pub enum CancelError {
    Unknown,
    AlreadyDone(RunState),
}

#[derive(Debug, PartialEq)]
pub enum MoveError {
    Unknown,
    /// Only waiting runs move: this one is running or done.
    NotQueued(RunState),
}

/// Workflow text kept in a run's record at most, bytes (longer: not kept).
pub const MAX_RECORDED_WORKFLOW: usize = 256 << 10;
/// Param values kept in a run's record at most, bytes of JSON (more: none kept).
pub const MAX_RECORDED_PARAMS: usize = 64 << 10;

/// Now, in milliseconds since the Unix epoch.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// Creates the state, reloads the persisted history and starts the queue worker.
    pub fn start(registry: Registry, executor: Executor, config: ServerConfig) -> Arc<State> {
        let (journal, recorded) = Journal::open(&config.out_dir.join(".pixart/history.jsonl"));
        // What writers killed mid-file left behind (their outputs are whole or absent).
        let swept = crate::fsutil::sweep_stale_temporaries(
            &config.out_dir,
            crate::confine::MAX_FOLDER_ENTRIES,
        );
        if swept > 0 {
            tracing::info!("removed {swept} temporary files of writers that were killed");
        }
        let disk = Arc::new(crate::budget::DiskQuota::new(
            &config.out_dir,
            config.out_quota,
            config.keep_free,
        ));
        let event_streams = Arc::new(Semaphore::new(config.max_event_streams));
        let state = Arc::new(State {
            registry,
            executor,
            config,
            runs: Mutex::new(Runs::default()),
            files: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            queue_changes: broadcast::channel(16).0,
            journal: Mutex::new(journal),
            event_streams,
            disk,
        });
        state.load_history(recorded);
        tokio::spawn(worker(state.clone()));
        state
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn validate(
        &self,
        text: &str,
        params: &HashMap<String, serde_json::Value>,
    ) -> Result<Workflow, WorkflowError> {
        let overrides = params
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect();
        let opts = LoadOptions {
            file_name: Some("workflow".into()),
            overrides,
            overrides_from: OverrideSource::Request,
        };
        let wf = load_workflow(text, &self.registry, &opts)?;
        self.within_budget(&wf)?;
        Ok(wf)
    }

    pub fn submit(&self, req: RunRequest) -> Result<String, SubmitError> {
        let wf = self
            .validate(&req.workflow, &req.params)
            .map_err(SubmitError::Invalid)?;
        let id = {
            let mut runs = self.runs();
            if runs.pending.len() >= MAX_QUEUED {
                return Err(SubmitError::QueueFull(format!(
                    "{MAX_QUEUED} runs are already waiting"
                )));
            }
            if runs.pending_bytes + wf.source.len() > MAX_QUEUED_BYTES {
                return Err(SubmitError::QueueFull(format!(
                    "the waiting runs' workflows already hold {} MiB",
                    runs.pending_bytes >> 20
                )));
            }
            runs.pending_bytes += wf.source.len();
            runs.counter += 1;
            let id = format!("r{}-{}", std::process::id(), runs.counter);
            let params: BTreeMap<String, serde_json::Value> = req.params.into_iter().collect();
            let params_size = serde_json::to_vec(&params).map_or(usize::MAX, |j| j.len());
            runs.records.insert(
                id.clone(),
                RunRecord {
                    id: id.clone(),
                    name: wf.name.clone(),
                    state: RunState::Queued,
                    submitted_at: Some(now_millis()),
                    started_at: None,
                    finished_at: None,
                    workflow: (req.workflow.len() <= MAX_RECORDED_WORKFLOW).then_some(req.workflow),
                    params: if params_size <= MAX_RECORDED_PARAMS {
                        params
                    } else {
                        BTreeMap::new()
                    },
                    outputs: Vec::new(),
                    failures: Vec::new(),
                    node_states: Vec::new(),
                },
            );
            runs.pending.insert(id.clone(), (Arc::new(wf), req.targets));
            runs.order.push_back(id.clone());
            runs.cancels.insert(id.clone(), CancellationToken::new());
            id
        };
        self.record(&id);
        self.executor.publish(Event::RunQueued {
            run_id: Arc::from(id.as_str()),
        });
        self.wake.notify_one();
        Ok(id)
    }

    /// Refuses a workflow whose nodes' estimates pass the per-run memory budget.
    fn within_budget(&self, wf: &Workflow) -> Result<(), WorkflowError> {
        use crate::executor::human_bytes;
        let limit = self.config.run_memory_limit;
        let (total, largest) = wf.estimated_bytes();
        if total <= limit {
            return Ok(());
        }
        let mut d = Diagnostic::error(
            DiagnosticKind::Resources,
            format!(
                "the run's values would take about {}, more than the {} a run may hold on this \
                 server",
                human_bytes(total),
                human_bytes(limit)
            ),
        )
        .help("make tensors smaller or split the work into several runs");
        if let Some((i, bytes)) = largest {
            let node = &wf.nodes[i];
            d = d.at(node.span).node(&node.id);
            d.message += &format!(" (`{}` alone: {})", node.id, human_bytes(bytes));
        }
        d.file = Some("workflow".into());
        Err(WorkflowError {
            diagnostics: vec![d],
        })
    }

    pub fn cancel(&self, id: &str) -> Result<RunState, CancelError> {
        let mut runs = self.runs();
        let state = runs
            .records
            .get(id)
            .map(|r| r.state)
            .ok_or(CancelError::Unknown)?;
        if state.is_done() {
            return Err(CancelError::AlreadyDone(state));
        }
        if let Some(token) = runs.cancels.get(id) {
            token.cancel();
        }
        if state == RunState::Queued {
            runs.take_pending(id);
            self.finish_record(&mut runs, id, RunState::Cancelled);
            drop(runs);
            self.record(id);
            self.executor.publish(Event::RunCancelled {
                run_id: Arc::from(id),
            });
            return Ok(RunState::Cancelled);
        }
        Ok(state)
    }

    pub fn get(&self, id: &str) -> Option<RunRecord> {
        self.runs().records.get(id).cloned()
    }

    /// Running runs (in the order they started), then waiting ones in the
    /// order they will start.
    pub fn queue(&self) -> Vec<RunRecord> {
        self.runs().queue()
    }

    /// The queue and whether it is paused, read together.
    pub fn queue_view(&self) -> QueueView {
        let runs = self.runs();
        QueueView {
            paused: runs.paused,
            runs: runs.queue(),
        }
    }

    /// Moves waiting run `id` to `position` among the waiting runs (past the
    /// end: last).
    pub fn move_run(&self, id: &str, position: usize) -> Result<QueueView, MoveError> {
        {
            let mut runs = self.runs();
            let state = runs
                .records
                .get(id)
                .map(|r| r.state)
                .ok_or(MoveError::Unknown)?;
            let Some(at) = runs.order.iter().position(|waiting| waiting == id) else {
                return Err(MoveError::NotQueued(state));
            };
            if let Some(moved) = runs.order.remove(at) {
                let to = position.min(runs.order.len());
                runs.order.insert(to, moved);
            }
        }
        self.queue_changed();
        Ok(self.queue_view())
    }

    /// Pauses (no run starts; running ones go on) or resumes the queue.
    pub fn set_paused(&self, paused: bool) -> QueueView {
        let changed = {
            let mut runs = self.runs();
            std::mem::replace(&mut runs.paused, paused) != paused
        };
        if changed {
            if !paused {
                self.wake.notify_one();
            }
            self.queue_changed();
        }
        self.queue_view()
    }

    /// Tells the event streams that the queue's order or pause changed.
    fn queue_changed(&self) {
        let paused = self.runs().paused;
        let _ = self.queue_changes.send(paused);
    }

    /// `queue_changed` notices (whether the queue is now paused), for an event stream.
    pub fn subscribe_queue(&self) -> broadcast::Receiver<bool> {
        self.queue_changes.subscribe()
    }

    /// Finished runs, newest first.
    pub fn history(&self) -> Vec<RunRecord> {
        let runs = self.runs();
        runs.history
            .iter()
            .rev()
            .filter_map(|id| runs.records.get(id).cloned())
            .collect()
    }

    /// Where file `id` is (below the output folder).
    pub fn file(&self, id: &str) -> Option<PathBuf> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.get(id).map(|rel| self.config.out_dir.join(rel))
    }

    /// The output folder, resolved.
    pub fn out_root(&self) -> PathBuf {
        (self.config.out_dir.canonicalize())
            .or_else(|_| std::path::absolute(&self.config.out_dir))
            .unwrap_or_else(|_| self.config.out_dir.clone())
    }

    /// Registers a file below the output folder that the server may hand out;
    /// returns its id (derived from its path) and its path relative to the
    /// output folder, or `None` for a file elsewhere.
    pub fn register_file(&self, path: &Path) -> Option<(String, PathBuf)> {
        let resolved = path.canonicalize().ok()?;
        let rel = resolved.strip_prefix(self.out_root()).ok()?.to_path_buf();
        Some((self.register_relative(&rel), rel))
    }

    /// Drops the file ids of a record that left the history, unless a kept
    /// record lists them too.
    fn forget_files(&self, runs: &Runs, gone: &RunRecord) {
        let kept: std::collections::HashSet<&str> = runs
            .records
            .values()
            .flat_map(|r| r.outputs.iter().flat_map(|o| &o.files))
            .map(|f| f.id.as_str())
            .collect();
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for f in gone.outputs.iter().flat_map(|o| &o.files) {
            if !kept.contains(f.id.as_str()) {
                files.remove(&f.id);
            }
        }
    }

    fn register_relative(&self, rel: &Path) -> String {
        let id = blake3::hash(rel.to_string_lossy().as_bytes()).to_hex()[..20].to_string();
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), rel.to_path_buf());
        id
    }

    fn finish_record(&self, runs: &mut Runs, id: &str, state: RunState) {
        if let Some(r) = runs.records.get_mut(id) {
            r.state = state;
            r.finished_at = Some(now_millis());
        }
        runs.cancels.remove(id);
        runs.history.push_back(id.to_string());
        while runs.history.len() > self.config.history_limit {
            if let Some(old) = runs.history.pop_front() {
                if let Some(record) = runs.records.remove(&old) {
                    self.forget_files(runs, &record);
                }
            }
        }
    }

    /// The server's own files live in a hidden folder that workflows cannot write.
    pub fn data_dir(&self) -> PathBuf {
        self.config.out_dir.join(".pixart")
    }

    /// Appends run `id`'s record as it is now to the journal; compacts the
    /// journal when it holds several times the records kept.
    fn record(&self, id: &str) {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(record) = self.get(id) else { return };
        let mut written = journal.append(&record);
        // Records keep their workflow text: when the kept ones alone pass the
        // size bound, compact only once the file has doubled since.
        let grown = journal.lines() > 4 * (self.config.history_limit + MAX_QUEUED)
            || journal.bytes() > MAX_JOURNAL_BYTES.max(2 * journal.compacted_bytes());
        if written.is_ok() && grown {
            written = journal.compact(&self.all_records());
        }
        if let Err(e) = written {
            tracing::warn!("cannot record run {id} in the history: {e}");
        }
    }

    /// Finished runs then waiting ones, oldest first.
    fn all_records(&self) -> Vec<RunRecord> {
        let mut all = self.history();
        all.reverse();
        all.extend(self.queue());
        all
    }

    /// Takes in the runs the journal (or the whole-file history of older
    /// versions) recorded: runs it left queued or running were cut short by the
    /// server's end and become `interrupted`.
    fn load_history(&self, mut recorded: Vec<RunRecord>) {
        let legacy = self.data_dir().join("history.json");
        if recorded.is_empty() {
            let list = crate::workflow::read_source(&legacy)
                .ok()
                .and_then(|text| serde_json::from_str::<Vec<RunRecord>>(&text).ok());
            if let Some(list) = list {
                recorded = list.into_iter().rev().collect();
            }
        }
        let out = self.out_root();
        let mut runs = self.runs();
        let first_kept = recorded.len().saturating_sub(self.config.history_limit);
        for mut record in recorded.into_iter().skip(first_kept) {
            if !record.state.is_done() {
                record.state = RunState::Interrupted;
            }
            // Only files inside the output folder, whatever the file claims
            // (older versions recorded absolute paths).
            for file in record.outputs.iter_mut().flat_map(|o| &mut o.files) {
                let Some(path) = &file.path else { continue };
                let rel = if path.is_absolute() {
                    path.strip_prefix(&out).ok().map(Path::to_path_buf)
                } else {
                    Some(path.clone())
                };
                let rel = rel.filter(|r| {
                    r.components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
                });
                file.path = rel.clone();
                if let Some(rel) = rel {
                    self.files
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(file.id.clone(), rel);
                }
            }
            runs.counter = runs.counter.max(run_number(&record.id));
            runs.history.push_back(record.id.clone());
            runs.records.insert(record.id.clone(), record);
        }
        drop(runs);
        let kept = self.all_records();
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if kept.is_empty() && journal.lines() == 0 {
            return;
        }
        match journal.compact(&kept) {
            Ok(()) => {
                let _ = std::fs::remove_file(&legacy);
            }
            Err(e) => tracing::warn!("cannot rewrite the run history: {e}"),
        }
    }

    /// Takes the first waiting run off the queue and marks it running, unless
    /// the queue is paused or empty.
    fn start_next(&self) -> Option<Started> {
        let started = {
            let mut runs = self.runs();
            if runs.paused {
                return None;
            }
            let (id, (workflow, targets)) = loop {
                let id = runs.order.pop_front()?;
                if let Some(taken) = runs.take_pending(&id) {
                    break (id, taken);
                }
            };
            let cancel = runs.cancels.get(&id).cloned().unwrap_or_default();
            if let Some(r) = runs.records.get_mut(&id) {
                r.state = RunState::Running;
                r.started_at = Some(now_millis());
            }
            Started {
                id,
                workflow,
                targets,
                cancel,
            }
        };
        self.record(&started.id);
        Some(started)
    }

    async fn execute(self: &Arc<State>, started: Started) {
        let Started {
            id,
            workflow: wf,
            targets,
            cancel,
        } = started;
        let opts = RunOptions {
            targets,
            out_dir: self.config.out_dir.clone(),
            base_dir: self.config.base_dir.clone(),
            cancel,
            run_id: Some(id.clone()),
            confine_paths: true,
            previews: true,
            memory_limit: Some(self.config.run_memory_limit),
            model_memory_limit: Some(self.config.run_model_memory_limit),
            disk_quota: Some(self.disk.clone()),
            read_also: None,
        };
        let result = self.executor.run(&wf, opts).await;
        let out = self.out_root();
        let mut runs = self.runs();
        let state = match result {
            Ok(report) => {
                let mut outputs = Vec::new();
                for node in &report.nodes {
                    let spec_is_output = wf
                        .node_index(&node.id)
                        .is_some_and(|i| wf.nodes[i].node.spec().output_node);
                    if !spec_is_output {
                        continue;
                    }
                    for (name, value) in &node.outputs {
                        let files = paths_of(value)
                            .into_iter()
                            .take(MAX_RECORDED_FILES)
                            .filter_map(|p| self.register_file(&p))
                            .map(|(id, rel)| FileRef {
                                id,
                                path: Some(rel),
                            })
                            .collect();
                        outputs.push(OutputRecord {
                            node: node.id.to_string(),
                            output: name.clone(),
                            value: relative_paths(value, &out).to_json(),
                            files,
                        });
                    }
                }
                if let Some(r) = runs.records.get_mut(&id) {
                    r.outputs = outputs;
                    r.failures = report
                        .failures
                        .iter()
                        .take(MAX_RECORDED_FAILURES)
                        .map(|f| serde_json::json!({"node": f.node, "node_type": f.node_type, "message": shortened(&without_backtrace(&f.message)), "lost_outputs": f.lost_outputs.iter().take(100).collect::<Vec<_>>()}))
                        .collect();
                    r.node_states = report
                        .nodes
                        .iter()
                        .take(MAX_RECORDED_NODE_STATES)
                        .map(|n| (n.id.to_string(), status_name(&n.status).into()))
                        .collect();
                }
                if report.cancelled {
                    RunState::Cancelled
                } else if report.ok() {
                    RunState::Finished
                } else {
                    RunState::Failed
                }
            }
            Err(e) => {
                if let Some(r) = runs.records.get_mut(&id) {
                    r.failures = vec![serde_json::json!({"message": e.to_string()})];
                }
                RunState::Failed
            }
        };
        self.finish_record(&mut runs, &id, state);
        drop(runs);
        self.record(&id);
    }
}

/// `message` cut to [`MAX_FAILURE_CHARS`] characters.
fn shortened(message: &str) -> String {
    match message.char_indices().nth(MAX_FAILURE_CHARS) {
        Some((at, _)) => format!("{} …", &message[..at]),
        None => message.to_string(),
    }
}

/// `message` without a backtrace that an error captured (candle's errors do
/// under `RUST_BACKTRACE=1`): clients get the error, the server's log the rest.
fn without_backtrace(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        let t = line.trim_start();
        let numbered = t.split_once(": ").is_some_and(|(n, _)| {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && line.len() > t.len()
        });
        if t == "stack backtrace:" || (numbered && t.starts_with("0: ")) {
            tracing::debug!("backtrace of a run failure: {message}");
            break;
        }
        kept.push(line);
    }
    kept.join("\n").trim_end().to_string()
}

fn status_name(s: &NodeStatus) -> &'static str {
    match s {
        NodeStatus::Executed { .. } => "executed",
        NodeStatus::Cached => "cached",
        NodeStatus::Failed { .. } => "failed",
        NodeStatus::Skipped { .. } => "skipped",
        NodeStatus::Cancelled => "cancelled",
    }
}

fn run_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `value` with paths below `out` written relative to it.
fn relative_paths(value: &Value, out: &Path) -> Value {
    match value {
        Value::Path(p) => Value::Path(
            p.strip_prefix(out)
                .map_or_else(|_| p.clone(), Path::to_path_buf),
        ),
        Value::List(items) => Value::List(items.iter().map(|v| relative_paths(v, out)).collect()),
        other => other.clone(),
    }
}

fn paths_of(value: &Value) -> Vec<PathBuf> {
    match value {
        Value::Path(p) => vec![p.clone()],
        Value::List(items) => items.iter().flat_map(paths_of).collect(),
        _ => Vec::new(),
    }
}

/// Starts the first waiting run whenever a slot is free and the queue is not
/// paused, up to `max_parallel_runs` at once.
async fn worker(state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(state.config.max_parallel_runs.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let started = loop {
            if let Some(started) = state.start_next() {
                break started;
            }
            // A notice sent since the check is kept: none is missed.
            state.wake.notified().await;
        };
        let state = state.clone();
        tokio::spawn(async move {
            state.execute(started).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{RunRecord, RunState};

    /// Journals written before `node_states` became an object (and before
    /// timestamps, workflow text and params were kept) still load.
    #[test]
    fn records_of_earlier_versions_load() {
        let old = r#"{"id":"r7-3","name":"old","state":"finished","outputs":[],"failures":[],"node_states":[["noise","executed"],["save","cached"]]}"#;
        let record: RunRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.state, RunState::Finished);
        assert_eq!(
            record.node_states,
            [
                ("noise".to_string(), "executed".to_string()),
                ("save".to_string(), "cached".to_string())
            ]
        );
        assert_eq!(
            (record.submitted_at, record.workflow.as_deref()),
            (None, None)
        );
        assert!(record.params.is_empty());
        // Written back as an object, which reads again.
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json["node_states"],
            serde_json::json!({"noise": "executed", "save": "cached"})
        );
        let again: RunRecord = serde_json::from_value(json).unwrap();
        assert_eq!(again.node_states, record.node_states);

        // Through the journal, as a server starting on an old folder reads it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, format!("{old}\n")).unwrap();
        let (_, records) = super::Journal::open(&path);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].node_states.len(), 2);
    }

    #[test]
    fn backtraces_are_cut_from_failure_messages() {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let message = format!("tensor error: shape mismatch\n{trace}");
        assert_eq!(
            super::without_backtrace(&message),
            "tensor error: shape mismatch"
        );
        let plain = "line one\n  2: is not a frame";
        assert_eq!(super::without_backtrace(plain), plain);
    }
}
