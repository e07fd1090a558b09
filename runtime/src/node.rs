//! The trait every node implements (built-in and, through the plugin host, WebAssembly).

use crate::events::Event;
use crate::spec::NodeSpec;
use crate::value::{Conditioning, Latents, Value};
use candle_core::Tensor;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cancelled")]
    Cancelled,
    #[error("input `{port}`: {message}")]
    Input { port: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Message(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl NodeError {
    pub fn msg(message: impl Display) -> NodeError {
        NodeError::Message(message.to_string())
    }

    pub fn input(port: &str, message: impl Display) -> NodeError {
        NodeError::Input {
            port: port.to_string(),
            message: message.to_string(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> NodeError {
        NodeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub trait Node: Send + Sync + 'static {
    fn spec(&self) -> &NodeSpec;

    /// Extra cache-key material for nodes whose result depends on more than
    /// their inputs, e.g. a loader returns the file's size and modification time
    /// so an edited file is read again.
    fn fingerprint(&self, _ctx: &NodeContext, _inputs: &Inputs) -> Option<String> {
        None
    }

    /// Does the work. Runs on a worker thread (or in place for `inline` nodes):
    /// it may block, and long work should call [`NodeContext::check_cancelled`]
    /// and [`NodeContext::progress`].
    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError>;
}

/// What a run shares with all its nodes.
pub(crate) struct RunShared {
    pub run_id: Arc<str>,
    pub cancel: CancellationToken,
    pub events: broadcast::Sender<Event>,
    pub out_dir: PathBuf,
    pub base_dir: PathBuf,
    /// Looked in for relative inputs after `out_dir` ([`RunOptions::read_also`](crate::executor::RunOptions::read_also)).
    pub read_also: Option<PathBuf>,
    pub workflow_source: Arc<str>,
    pub params: serde_json::Value,
    /// Keeps file access inside `base_dir` / `out_dir` (workflows from the network).
    pub confinement: Option<crate::confine::Confinement>,
    /// Someone watches this run: previews are worth making.
    pub previews: bool,
    /// Bytes the run's values and the working memory of its nodes may hold
    /// (the server's per-run budget).
    pub memory: Arc<crate::budget::MemoryBudget>,
    /// Bytes of the models the run loads (the server's per-run model budget).
    pub model_memory: Arc<crate::budget::MemoryBudget>,
    /// Room left in the output folder (the server's quota).
    pub disk: Option<Arc<crate::budget::DiskQuota>>,
}

/// A node's view of the run it is part of (cheap to clone: the plugin host keeps
/// one in each sandbox).
#[derive(Clone)]
pub struct NodeContext {
    pub(crate) node_id: Arc<str>,
    pub(crate) run: Arc<RunShared>,
}

impl NodeContext {
    /// A context outside any workflow run, for using nodes directly (tests,
    /// tools): relative inputs resolve against `base_dir`, outputs against `out_dir`.
    pub fn detached(base_dir: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> NodeContext {
        let (events, _) = broadcast::channel(16);
        NodeContext {
            node_id: Arc::from("detached"),
            run: Arc::new(RunShared {
                run_id: Arc::from("detached"),
                cancel: CancellationToken::new(),
                events,
                out_dir: out_dir.into(),
                base_dir: base_dir.into(),
                read_also: None,
                workflow_source: Arc::from(""),
                params: serde_json::Value::Null,
                confinement: None,
                previews: false,
                memory: Arc::new(crate::budget::MemoryBudget::new("memory", None)),
                model_memory: Arc::new(crate::budget::MemoryBudget::new("model memory", None)),
                disk: None,
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn run_id(&self) -> &str {
        &self.run.run_id
    }

    pub fn is_cancelled(&self) -> bool {
        self.run.cancel.is_cancelled()
    }

    /// Returns `Err(Cancelled)` once the run is cancelled; call it in long loops.
    pub fn check_cancelled(&self) -> Result<(), NodeError> {
        if self.is_cancelled() {
            Err(NodeError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Reports progress `value` of `max` (steps, images, batches).
    pub fn progress(&self, value: u64, max: u64) {
        self.send_progress(value, max, None);
    }

    /// Progress with a short line of figures (loss, learning rate, rate) for the
    /// progress bar and the event stream.
    pub fn progress_detail(&self, value: u64, max: u64, detail: &str) {
        self.send_progress(value, max, Some(detail.into()));
    }

    fn send_progress(&self, value: u64, max: u64, detail: Option<Arc<str>>) {
        let _ = self.run.events.send(Event::NodeProgress {
            run_id: self.run.run_id.clone(),
            node: self.node_id.clone(),
            value,
            max,
            detail,
        });
    }

    /// Whether the run wants preview images (making one costs time: check first).
    pub fn wants_previews(&self) -> bool {
        self.run.previews
    }

    /// Sends a preview image (PNG bytes) of work in progress at `step`.
    pub fn preview_png(&self, step: u64, png: &[u8]) {
        if !self.run.previews {
            return;
        }
        let image = format!("data:image/png;base64,{}", crate::fsutil::base64(png));
        let _ = self.run.events.send(Event::NodePreview {
            run_id: self.run.run_id.clone(),
            node: self.node_id.clone(),
            step,
            image: image.into(),
        });
    }

    /// Where an input path points: relative paths under the run's base directory.
    /// In a confined run (the server) it is resolved and must lead inside the base
    /// or output directory; a folder is checked with everything in it.
    ///
    /// A relative path that names nothing under the base directory but names
    /// something under the output directory is read from there: a workflow reads
    /// what an earlier run wrote (a trained model, a cache) by the name that run
    /// gave it.
    pub fn input_path(&self, path: &Path) -> Result<PathBuf, NodeError> {
        let mut full = self.run.base_dir.join(path);
        if path.is_relative() && std::fs::symlink_metadata(&full).is_err() {
            let written = std::iter::once(&self.run.out_dir)
                .chain(&self.run.read_also)
                .map(|dir| dir.join(path))
                .find(|p| std::fs::symlink_metadata(p).is_ok());
            if let Some(written) = written {
                full = written;
            }
        }
        match &self.run.confinement {
            Some(c) => c.read(path, &full).map_err(NodeError::Message),
            None => Ok(full),
        }
    }

    /// Where an output path points: relative paths under the run's output
    /// directory. In a confined run it is resolved and must lead strictly inside
    /// it, outside hidden folders (where the server keeps its own data).
    pub fn output_path(&self, path: &Path) -> Result<PathBuf, NodeError> {
        let full = self.run.out_dir.join(path);
        match &self.run.confinement {
            Some(c) => c.write(path, &full).map_err(NodeError::Message),
            None => Ok(full),
        }
    }

    /// Where an output *file* goes ([`output_path`](Self::output_path)): in a
    /// served run, a name no earlier run has used, a counter added before the
    /// extension when the name is taken (`img.png`, `img_00001.png`, … as
    /// ComfyUI numbers its outputs), so an earlier run's file is never
    /// overwritten and its id keeps serving what it wrote. The CLI overwrites,
    /// as a script expects of a name it chose.
    pub fn output_file(&self, path: &Path) -> Result<PathBuf, NodeError> {
        let full = self.output_path(path)?;
        if self.run.confinement.is_none() || std::fs::symlink_metadata(&full).is_err() {
            return Ok(full);
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        for n in 1..100_000u32 {
            // Named as the node named it (relative to the output folder), then
            // resolved like it.
            let candidate =
                self.output_path(&path.with_file_name(format!("{stem}_{n:05}{ext}")))?;
            if std::fs::symlink_metadata(&candidate).is_err() {
                return Ok(candidate);
            }
        }
        Err(NodeError::msg(format!(
            "{stem}{ext}: 100,000 files of that name already; choose another"
        )))
    }

    /// A folder a node reads and rewrites in place (a dataset it relabels):
    /// relative paths under the base directory, like inputs; in a confined run it
    /// must also be writable, that is inside the output directory.
    pub fn in_place_path(&self, path: &Path) -> Result<PathBuf, NodeError> {
        let full = self.run.base_dir.join(path);
        match &self.run.confinement {
            Some(c) => c.write(path, &full).map_err(NodeError::Message),
            None => Ok(full),
        }
    }

    /// Reserves working memory the node is about to allocate inside itself
    /// (a model and optimiser it trains, buffers sized by a config file) against
    /// the run's memory budget, before allocating it; the reservation ends when
    /// the returned guard is dropped. `purpose` names it in the error.
    pub fn reserve_memory(
        &self,
        bytes: u64,
        purpose: &str,
    ) -> Result<crate::budget::Reservation, NodeError> {
        self.run
            .memory
            .reserve(bytes, purpose)
            .map_err(NodeError::Message)
    }

    /// Counts a model the node is about to load against the run's model budget
    /// (held until the run ends: handles outlive the node that made them).
    pub fn take_model_memory(&self, bytes: u64, purpose: &str) -> Result<(), NodeError> {
        self.run
            .model_memory
            .take(bytes, purpose)
            .map_err(NodeError::Message)
    }

    /// Counts `bytes` the node is about to write into the output folder against
    /// the server's quota (nothing to count outside the server).
    pub fn charge_disk(&self, bytes: u64) -> Result<(), NodeError> {
        match &self.run.disk {
            Some(quota) => quota.charge(bytes).map_err(NodeError::Message),
            None => Ok(()),
        }
    }

    /// The YAML source of the running workflow (saved into PNG metadata).
    pub fn workflow_source(&self) -> &str {
        &self.run.workflow_source
    }

    /// The parameter values of this run, as JSON.
    pub fn params(&self) -> &serde_json::Value {
        &self.run.params
    }
}

/// The values given to one node execution, in the order its spec declares.
pub struct Inputs {
    node: Arc<dyn Node>,
    values: Vec<Option<Value>>,
}

impl Inputs {
    pub fn new(node: Arc<dyn Node>, values: Vec<Option<Value>>) -> Inputs {
        Inputs { node, values }
    }

    /// Builds inputs by name, filling declared defaults (for calling nodes directly).
    pub fn from_pairs(
        node: Arc<dyn Node>,
        pairs: impl IntoIterator<Item = (&'static str, Value)>,
    ) -> Result<Inputs, NodeError> {
        let spec = node.spec();
        let mut values: Vec<Option<Value>> = spec
            .inputs
            .iter()
            .map(|i| i.default_value().and_then(Result::ok))
            .collect();
        for (name, value) in pairs {
            let idx = spec
                .input_index(name)
                .ok_or_else(|| NodeError::input(name, "no such input"))?;
            let ty = &spec.inputs[idx].ty;
            let value = value.coerce(ty).map_err(|v| {
                NodeError::input(name, format!("expected {ty}, got {}", v.kind_name()))
            })?;
            values[idx] = Some(value);
        }
        Ok(Inputs { node, values })
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.node.spec().input_index(name)
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.index(name).and_then(|i| self.values[i].as_ref())
    }

    pub fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.index(name)?;
        self.values[i].take()
    }

    pub fn values(&self) -> impl Iterator<Item = (&str, Option<&Value>)> {
        self.node
            .spec()
            .inputs
            .iter()
            .zip(&self.values)
            .map(|(spec, v)| (spec.name.as_str(), v.as_ref()))
    }

    fn required(&self, name: &str) -> Result<&Value, NodeError> {
        self.get(name)
            .ok_or_else(|| NodeError::input(name, "no value was given"))
    }

    fn wrong(name: &str, want: &str, got: &Value) -> NodeError {
        NodeError::input(name, format!("expected {want}, got {}", got.kind_name()))
    }

    pub fn int(&self, name: &str) -> Result<i64, NodeError> {
        match self.required(name)? {
            Value::Int(i) => Ok(*i),
            v => Err(Self::wrong(name, "Int", v)),
        }
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        match self.required(name)? {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            v => Err(Self::wrong(name, "Float", v)),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool, NodeError> {
        match self.required(name)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong(name, "Bool", v)),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str, NodeError> {
        match self.required(name)? {
            Value::String(s) => Ok(s),
            v => Err(Self::wrong(name, "String", v)),
        }
    }

    pub fn path(&self, name: &str) -> Result<&Path, NodeError> {
        match self.required(name)? {
            Value::Path(p) => Ok(p),
            v => Err(Self::wrong(name, "Path", v)),
        }
    }

    pub fn list(&self, name: &str) -> Result<&[Value], NodeError> {
        match self.required(name)? {
            Value::List(items) => Ok(items),
            v => Err(Self::wrong(name, "List", v)),
        }
    }

    pub fn tensor(&self, name: &str) -> Result<&Tensor, NodeError> {
        match self.required(name)? {
            Value::Tensor(t) => Ok(t),
            Value::Latents(l) => Ok(&l.tensor),
            v => Err(Self::wrong(name, "Tensor", v)),
        }
    }

    pub fn latents(&self, name: &str) -> Result<&Latents, NodeError> {
        match self.required(name)? {
            Value::Latents(l) => Ok(l),
            v => Err(Self::wrong(name, "Latents", v)),
        }
    }

    pub fn image(&self, name: &str) -> Result<&Tensor, NodeError> {
        match self.required(name)? {
            Value::Image(t) => Ok(t),
            v => Err(Self::wrong(name, "Image", v)),
        }
    }

    pub fn conditioning(&self, name: &str) -> Result<&Conditioning, NodeError> {
        match self.required(name)? {
            Value::Conditioning(c) => Ok(c),
            v => Err(Self::wrong(name, "Conditioning", v)),
        }
    }

    /// A model handle of the declared kind, downcast to the node's own type.
    pub fn handle<T: Send + Sync + 'static>(&self, name: &str) -> Result<&T, NodeError> {
        match self.required(name)? {
            Value::Handle(h) => match h.resolve::<T>() {
                Ok(Some(t)) => Ok(t),
                Ok(None) => Err(NodeError::input(
                    name,
                    format!("this {} handle was made by another node family", h.kind),
                )),
                Err(e) => Err(NodeError::input(
                    name,
                    format!("loading the {}: {e}", h.kind),
                )),
            },
            v => Err(Self::wrong(name, "a model handle", v)),
        }
    }
}

/// What a node produced, by output name. The executor checks names and types
/// against the spec, so a misbehaving node (or plugin) cannot smuggle a wrong type
/// downstream.
#[derive(Default, Debug)]
pub struct Outputs(pub Vec<(String, Value)>);

impl Outputs {
    pub fn new() -> Outputs {
        Outputs(Vec::new())
    }

    pub fn one(name: &str, value: Value) -> Outputs {
        Outputs(vec![(name.to_string(), value)])
    }

    pub fn with(mut self, name: &str, value: Value) -> Outputs {
        self.0.push((name.to_string(), value));
        self
    }
}
