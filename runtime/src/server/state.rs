//! The server's run queue, run records, history and file registry.

use super::execute::{execute_run, file_ref, load_request, out_root};
use super::journal::Journal;
use super::shared::{Enqueued, QueueError, SharedQueue};
use crate::events::Event;
use crate::executor::Executor;
use crate::registry::Registry;
use crate::workflow::{Workflow, WorkflowError};
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
    /// The worker that ran it, or runs it (shared queue only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Times the run was started: more than 1 when a worker died holding it
    /// and another took it over (shared queue only; 0 in this process).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
#[derive(Debug, Serialize, Deserialize)]
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
    /// What the event streams send, as JSON text: the runs' events and
    /// `queue_changed` notices (a run was moved, the queue paused or resumed).
    feed: broadcast::Sender<Arc<str>>,
    /// The history on disk (the queue in this process only).
    journal: Mutex<Option<Journal>>,
    /// The queue, run states, history and events in Redis, shared by every
    /// front end and worker (`pixart serve --queue`); `None`: all in this process.
    shared: Option<SharedQueue>,
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
    /// The shared queue cannot be reached.
    Unavailable(String),
}

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
    /// The shared queue cannot be reached.
    Unavailable(String),
}

#[derive(Debug, PartialEq)]
pub enum MoveError {
    Unknown,
    /// Only waiting runs move: this one is running or done.
    NotQueued(RunState),
    /// The shared queue cannot be reached.
    Unavailable(String),
}

impl From<QueueError> for CancelError {
    fn from(e: QueueError) -> Self {
        CancelError::Unavailable(e.to_string())
    }
}

impl From<QueueError> for MoveError {
    fn from(e: QueueError) -> Self {
        MoveError::Unavailable(e.to_string())
    }
}

/// Workflow text kept in a run's record at most, bytes (longer: not kept).
pub const MAX_RECORDED_WORKFLOW: usize = 256 << 10;
/// Param values kept in a run's record at most, bytes of JSON (more: none kept).
pub const MAX_RECORDED_PARAMS: usize = 64 << 10;

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// Creates the state with the queue in this process, reloads the persisted
    /// history and starts the queue worker.
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
        let state = Arc::new(State::new(registry, executor, config, Some(journal), None));
        state.load_history(recorded);
        tokio::spawn(forward_executor_events(
            state.executor.subscribe(),
            state.feed.clone(),
        ));
        tokio::spawn(worker(state.clone()));
        state
    }

    /// Creates a front end of a shared queue: runs, their states, the history and
    /// events live in `queue` (Redis), and `pixart worker`s execute the runs. The
    /// output folder is shared with the workers; nothing is swept from it, since
    /// writers on other machines cannot be looked up.
    pub fn start_shared(
        registry: Registry,
        executor: Executor,
        config: ServerConfig,
        queue: SharedQueue,
    ) -> Arc<State> {
        let state = Arc::new(State::new(registry, executor, config, None, Some(queue)));
        if let Some(queue) = &state.shared {
            tokio::spawn(queue.clone().forward_events(state.feed.clone()));
        }
        state
    }

    fn new(
        registry: Registry,
        executor: Executor,
        config: ServerConfig,
        journal: Option<Journal>,
        shared: Option<SharedQueue>,
    ) -> State {
        let disk = Arc::new(crate::budget::DiskQuota::new(
            &config.out_dir,
            config.out_quota,
            config.keep_free,
        ));
        let event_streams = Arc::new(Semaphore::new(config.max_event_streams));
        State {
            registry,
            executor,
            config,
            runs: Mutex::new(Runs::default()),
            files: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            feed: broadcast::channel(EVENT_BACKLOG).0,
            journal: Mutex::new(journal),
            shared,
            event_streams,
            disk,
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether runs, history and events live in a shared queue.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn validate(
        &self,
        text: &str,
        params: &HashMap<String, serde_json::Value>,
    ) -> Result<Workflow, WorkflowError> {
        load_request(&self.registry, &self.config, text, params)
    }

    /// Validates the run (off the async threads: a large workflow takes a while)
    /// and queues it; returns its id.
    pub async fn submit(self: &Arc<State>, req: RunRequest) -> Result<String, SubmitError> {
        let state = self.clone();
        let (req, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = state.validate(&req.workflow, &req.params);
            (req, loaded)
        })
        .await
        .map_err(|_| SubmitError::Unavailable("validating the workflow failed".into()))?;
        let wf = loaded.map_err(SubmitError::Invalid)?;
        match &self.shared {
            Some(queue) => self.submit_shared(queue, req, &wf).await,
            None => self.submit_local(req, wf),
        }
    }

    async fn submit_shared(
        &self,
        queue: &SharedQueue,
        req: RunRequest,
        wf: &Workflow,
    ) -> Result<String, SubmitError> {
        let unavailable = |e: QueueError| SubmitError::Unavailable(e.to_string());
        let id = queue.next_id().await.map_err(unavailable)?;
        let record = new_record(&id, wf, &req);
        match queue
            .enqueue(&record, &req, MAX_QUEUED, MAX_QUEUED_BYTES)
            .await
            .map_err(unavailable)?
        {
            Enqueued::Queued => Ok(id),
            Enqueued::TooManyRuns => Err(SubmitError::QueueFull(format!(
                "{MAX_QUEUED} runs are already waiting"
            ))),
            Enqueued::TooManyBytes => Err(SubmitError::QueueFull(format!(
                "the waiting runs' workflows already hold {} MiB",
                MAX_QUEUED_BYTES >> 20
            ))),
        }
    }

    fn submit_local(&self, req: RunRequest, wf: Workflow) -> Result<String, SubmitError> {
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
            runs.records.insert(id.clone(), new_record(&id, &wf, &req));
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

    pub async fn cancel(&self, id: &str) -> Result<RunState, CancelError> {
        if let Some(queue) = &self.shared {
            return queue.cancel(id, self.config.history_limit).await;
        }
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

    pub async fn get(&self, id: &str) -> Result<Option<RunRecord>, QueueError> {
        match &self.shared {
            Some(queue) => queue.get(id).await,
            None => Ok(self.get_local(id)),
        }
    }

    fn get_local(&self, id: &str) -> Option<RunRecord> {
        self.runs().records.get(id).cloned()
    }

    /// Running runs (in the order they started), then waiting ones in the
    /// order they will start.
    pub async fn queue(&self) -> Result<Vec<RunRecord>, QueueError> {
        Ok(self.queue_view().await?.runs)
    }

    /// The queue and whether it is paused, read together.
    pub async fn queue_view(&self) -> Result<QueueView, QueueError> {
        if let Some(queue) = &self.shared {
            return queue.queue_view().await;
        }
        let runs = self.runs();
        Ok(QueueView {
            paused: runs.paused,
            runs: runs.queue(),
        })
    }

    /// Moves waiting run `id` to `position` among the waiting runs (past the
    /// end: last).
    pub async fn move_run(&self, id: &str, position: usize) -> Result<QueueView, MoveError> {
        if let Some(queue) = &self.shared {
            queue.move_run(id, position).await?;
        } else {
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
            let paused = runs.paused;
            drop(runs);
            self.queue_changed(paused);
        }
        self.queue_view()
            .await
            .map_err(|e| MoveError::Unavailable(e.to_string()))
    }

    /// Pauses (no run starts; running ones go on) or resumes the queue.
    pub async fn set_paused(&self, paused: bool) -> Result<QueueView, QueueError> {
        if let Some(queue) = &self.shared {
            queue.set_paused(paused).await?;
            return queue.queue_view().await;
        }
        let changed = {
            let mut runs = self.runs();
            std::mem::replace(&mut runs.paused, paused) != paused
        };
        if changed {
            if !paused {
                self.wake.notify_one();
            }
            self.queue_changed(paused);
        }
        self.queue_view().await
    }

    /// Tells the event streams that the queue's order or pause changed.
    fn queue_changed(&self, paused: bool) {
        let _ = self.feed.send(queue_changed_event(paused));
    }

    /// Every event for the clients' event streams, as JSON text: the runs'
    /// events and `queue_changed` notices, from this process or (shared queue)
    /// from every front end and worker.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.feed.subscribe()
    }

    /// Finished runs, newest first.
    pub async fn history(&self) -> Result<Vec<RunRecord>, QueueError> {
        if let Some(queue) = &self.shared {
            return queue.history().await;
        }
        Ok(self.history_local())
    }

    fn history_local(&self) -> Vec<RunRecord> {
        let runs = self.runs();
        runs.history
            .iter()
            .rev()
            .filter_map(|id| runs.records.get(id).cloned())
            .collect()
    }

    /// Where file `id` is (below the output folder).
    pub async fn file(&self, id: &str) -> Result<Option<PathBuf>, QueueError> {
        let rel = match &self.shared {
            Some(queue) => queue.file(id).await?,
            None => {
                let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
                files.get(id).cloned()
            }
        };
        Ok(rel.map(|rel| self.config.out_dir.join(rel)))
    }

    /// The output folder, resolved.
    pub fn out_root(&self) -> PathBuf {
        out_root(&self.config.out_dir)
    }

    /// Registers a file below the output folder that the server may hand out;
    /// returns its id (derived from its path) and its path relative to the
    /// output folder, or `None` for a file elsewhere. With a shared queue the
    /// id is recorded there, for every front end.
    pub async fn register_file(
        &self,
        path: &Path,
    ) -> Result<Option<(String, PathBuf)>, QueueError> {
        let Some(FileRef {
            id,
            path: Some(rel),
        }) = file_ref(&self.out_root(), path)
        else {
            return Ok(None);
        };
        match &self.shared {
            Some(queue) => queue.register_file(&id, &rel).await?,
            None => self.register_relative(&id, &rel),
        }
        Ok(Some((id, rel)))
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

    fn register_relative(&self, id: &str, rel: &Path) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), rel.to_path_buf());
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
        let Some(journal) = journal.as_mut() else {
            return;
        };
        let Some(record) = self.get_local(id) else {
            return;
        };
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
        let mut all = self.history_local();
        all.reverse();
        all.extend(self.runs().queue());
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
        let Some(journal) = journal.as_mut() else {
            return;
        };
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
        let outcome = execute_run(
            &self.executor,
            &self.config,
            &self.disk,
            &id,
            &wf,
            targets,
            cancel,
        )
        .await;
        for file in outcome.files() {
            if let Some(rel) = &file.path {
                self.register_relative(&file.id, rel);
            }
        }
        let mut runs = self.runs();
        let state = outcome.state;
        if let Some(r) = runs.records.get_mut(&id) {
            outcome.apply(r, now_millis());
        }
        self.finish_record(&mut runs, &id, state);
        drop(runs);
        self.record(&id);
    }
}

/// A new run's record: queued now, with the workflow and params as sent (when
/// they are small enough to keep).
fn new_record(id: &str, wf: &Workflow, req: &RunRequest) -> RunRecord {
    let params: BTreeMap<String, serde_json::Value> = req
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let params_size = serde_json::to_vec(&params).map_or(usize::MAX, |j| j.len());
    RunRecord {
        id: id.to_string(),
        name: wf.name.clone(),
        state: RunState::Queued,
        submitted_at: Some(now_millis()),
        started_at: None,
        finished_at: None,
        workflow: (req.workflow.len() <= MAX_RECORDED_WORKFLOW).then(|| req.workflow.clone()),
        params: if params_size <= MAX_RECORDED_PARAMS {
            params
        } else {
            BTreeMap::new()
        },
        outputs: Vec::new(),
        failures: Vec::new(),
        node_states: Vec::new(),
        worker: None,
        attempts: 0,
    }
}

/// Events the event streams may fall behind by before they are told they lagged.
const EVENT_BACKLOG: usize = 4096;

/// The `queue_changed` notice of the event stream.
pub(crate) fn queue_changed_event(paused: bool) -> Arc<str> {
    Arc::from(serde_json::json!({ "event": "queue_changed", "paused": paused }).to_string())
}

/// The `lagged` notice: `missed` events were dropped for a slow listener.
pub(crate) fn lagged_event(missed: u64) -> Arc<str> {
    Arc::from(serde_json::json!({ "event": "lagged", "missed": missed }).to_string())
}

/// Sends the executor's events, as JSON text, to the event streams.
async fn forward_executor_events(
    mut events: broadcast::Receiver<Event>,
    feed: broadcast::Sender<Arc<str>>,
) {
    use broadcast::error::RecvError;
    loop {
        let text = match events.recv().await {
            Ok(e) => match serde_json::to_string(&e) {
                Ok(text) => Arc::from(text),
                Err(_) => continue,
            },
            Err(RecvError::Lagged(n)) => lagged_event(n),
            Err(RecvError::Closed) => break,
        };
        let _ = feed.send(text);
    }
}

/// The number at the end of a run id (`r123-7`: 7), which orders runs
/// submitted to one process.
pub(crate) fn run_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
}
