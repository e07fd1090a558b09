//! The server's run queue, run records, history and file registry.

use crate::events::Event;
use crate::executor::{Executor, NodeStatus, RunOptions};
use crate::registry::Registry;
use crate::value::Value;
use crate::workflow::{load_workflow, LoadOptions, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Semaphore};
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
}

impl RunState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            RunState::Finished | RunState::Failed | RunState::Cancelled
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

/// A file the server hands out by `id` (never by path).
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
    pub outputs: Vec<OutputRecord>,
    pub failures: Vec<serde_json::Value>,
    pub node_states: Vec<(String, String)>,
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
    queue: mpsc::UnboundedSender<String>,
    persisting: Mutex<()>,
}

#[derive(Default)]
struct Runs {
    records: HashMap<String, RunRecord>,
    /// Finished runs, oldest first (bounded by `history_limit`).
    history: VecDeque<String>,
    pending: HashMap<String, (Arc<Workflow>, Vec<String>)>,
    cancels: HashMap<String, CancellationToken>,
    counter: u64,
}

#[derive(Debug)]
pub enum SubmitError {
    Invalid(WorkflowError),
    /// Too many runs waiting.
    QueueFull(usize),
}

/// Runs waiting at most; more are refused until the queue drains.
pub const MAX_QUEUED: usize = 1000;

#[derive(Debug, PartialEq)]
pub enum CancelError {
    Unknown,
    AlreadyDone(RunState),
}

impl State {
    /// Creates the state, reloads the persisted history and starts the queue worker.
    pub fn start(registry: Registry, executor: Executor, config: ServerConfig) -> Arc<State> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            registry,
            executor,
            config,
            runs: Mutex::new(Runs::default()),
            files: Mutex::new(HashMap::new()),
            queue: tx,
            persisting: Mutex::new(()),
        });
        state.load_history();
        tokio::spawn(worker(state.clone(), rx));
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
        };
        load_workflow(text, &self.registry, &opts)
    }

    pub fn submit(&self, req: RunRequest) -> Result<String, SubmitError> {
        let wf = self
            .validate(&req.workflow, &req.params)
            .map_err(SubmitError::Invalid)?;
        let id = {
            let mut runs = self.runs();
            if runs.pending.len() >= MAX_QUEUED {
                return Err(SubmitError::QueueFull(MAX_QUEUED));
            }
            runs.counter += 1;
            let id = format!("r{}-{}", std::process::id(), runs.counter);
            runs.records.insert(
                id.clone(),
                RunRecord {
                    id: id.clone(),
                    name: wf.name.clone(),
                    state: RunState::Queued,
                    outputs: Vec::new(),
                    failures: Vec::new(),
                    node_states: Vec::new(),
                },
            );
            runs.pending.insert(id.clone(), (Arc::new(wf), req.targets));
            runs.cancels.insert(id.clone(), CancellationToken::new());
            id
        };
        self.executor.publish(Event::RunQueued {
            run_id: Arc::from(id.as_str()),
        });
        let _ = self.queue.send(id.clone());
        Ok(id)
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
            runs.pending.remove(id);
            self.finish_record(&mut runs, id, RunState::Cancelled);
            drop(runs);
            self.persist();
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

    /// Queued and running runs, in submission order.
    pub fn queue(&self) -> Vec<RunRecord> {
        let runs = self.runs();
        let mut list: Vec<RunRecord> = runs
            .records
            .values()
            .filter(|r| !r.state.is_done())
            .cloned()
            .collect();
        list.sort_by_key(|r| run_number(&r.id));
        list
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

    pub fn file(&self, id: &str) -> Option<PathBuf> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Registers a file the server may hand out; its id is derived from its path.
    pub fn register_file(&self, path: &Path) -> String {
        let id = blake3::hash(path.to_string_lossy().as_bytes()).to_hex()[..20].to_string();
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), path.to_path_buf());
        id
    }

    fn finish_record(&self, runs: &mut Runs, id: &str, state: RunState) {
        if let Some(r) = runs.records.get_mut(id) {
            r.state = state;
        }
        runs.cancels.remove(id);
        runs.history.push_back(id.to_string());
        while runs.history.len() > self.config.history_limit {
            if let Some(old) = runs.history.pop_front() {
                runs.records.remove(&old);
            }
        }
    }

    /// The server's own files live in a hidden folder that workflows cannot write.
    pub fn data_dir(&self) -> PathBuf {
        self.config.out_dir.join(".pixart")
    }

    fn history_path(&self) -> PathBuf {
        self.data_dir().join("history.json")
    }

    fn persist(&self) {
        // One writer at a time, each writing the newest history.
        let _guard = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        let list = self.history();
        let Ok(text) = serde_json::to_vec_pretty(&list) else {
            return;
        };
        let path = self.history_path();
        let written = crate::fsutil::atomic_write(&path, &text);
        if let Err(e) = written {
            tracing::warn!("cannot persist the run history to {}: {e}", path.display());
        }
    }

    fn load_history(&self) {
        let Ok(text) = std::fs::read_to_string(self.history_path()) else {
            return;
        };
        let Ok(list) = serde_json::from_str::<Vec<RunRecord>>(&text) else {
            tracing::warn!("ignoring an unreadable {}", self.history_path().display());
            return;
        };
        let mut runs = self.runs();
        let out = std::path::absolute(&self.config.out_dir)
            .unwrap_or_else(|_| self.config.out_dir.clone());
        for record in list.into_iter().rev() {
            // Only files inside the output folder, whatever the file claims.
            for file in record.outputs.iter().flat_map(|o| &o.files) {
                let Some(path) = &file.path else { continue };
                let inside = std::path::absolute(path).is_ok_and(|p| p.starts_with(&out))
                    && !path
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir));
                if inside {
                    self.files
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(file.id.clone(), path.clone());
                }
            }
            runs.counter = runs.counter.max(run_number(&record.id));
            runs.history.push_back(record.id.clone());
            runs.records.insert(record.id.clone(), record);
        }
    }

    async fn execute(self: &Arc<State>, id: String) {
        let (wf, targets, cancel) = {
            let mut runs = self.runs();
            let Some((wf, targets)) = runs.pending.remove(&id) else {
                return;
            }; // cancelled while queued
            let cancel = runs.cancels.get(&id).cloned().unwrap_or_default();
            if let Some(r) = runs.records.get_mut(&id) {
                r.state = RunState::Running;
            }
            (wf, targets, cancel)
        };
        let opts = RunOptions {
            targets,
            out_dir: self.config.out_dir.clone(),
            base_dir: self.config.base_dir.clone(),
            cancel,
            run_id: Some(id.clone()),
            confine_paths: true,
            previews: true,
        };
        let result = self.executor.run(&wf, opts).await;
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
                            .filter(|p| p.starts_with(&self.config.out_dir))
                            .map(|p| FileRef {
                                id: self.register_file(&p),
                                path: Some(p),
                            })
                            .collect();
                        outputs.push(OutputRecord {
                            node: node.id.to_string(),
                            output: name.clone(),
                            value: value.to_json(),
                            files,
                        });
                    }
                }
                if let Some(r) = runs.records.get_mut(&id) {
                    r.outputs = outputs;
                    r.failures = report
                        .failures
                        .iter()
                        .map(|f| serde_json::json!({"node": f.node, "node_type": f.node_type, "message": f.message, "lost_outputs": f.lost_outputs}))
                        .collect();
                    r.node_states = report
                        .nodes
                        .iter()
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
        self.persist();
    }
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

fn paths_of(value: &Value) -> Vec<PathBuf> {
    match value {
        Value::Path(p) => vec![p.clone()],
        Value::List(items) => items.iter().flat_map(paths_of).collect(),
        _ => Vec::new(),
    }
}

/// Takes queued runs in order and executes up to `max_parallel_runs` at once.
async fn worker(state: Arc<State>, mut rx: mpsc::UnboundedReceiver<String>) {
    let slots = Arc::new(Semaphore::new(state.config.max_parallel_runs.max(1)));
    while let Some(id) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let state = state.clone();
        tokio::spawn(async move {
            state.execute(id).await;
            drop(permit);
        });
    }
}
