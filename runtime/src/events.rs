//! Progress events of a run, broadcast to the CLI (and later the server).

use serde::Serialize;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Accepted by the server's queue, not started yet.
    RunQueued {
        run_id: Arc<str>,
    },
    RunStarted {
        run_id: Arc<str>,
        /// How many nodes this run needs (cached ones included).
        nodes: usize,
    },
    NodeStarted {
        run_id: Arc<str>,
        node: Arc<str>,
        node_type: Arc<str>,
    },
    NodeCached {
        run_id: Arc<str>,
        node: Arc<str>,
    },
    NodeProgress {
        run_id: Arc<str>,
        node: Arc<str>,
        value: u64,
        max: u64,
        /// What the node reports beside the count (a trainer's loss and rate).
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<Arc<str>>,
    },
    /// A preview of what a long node is making (a sampler's current estimate of
    /// the image), as a `data:image/png;base64,…` URL. Only in runs that ask
    /// for previews (the server's).
    NodePreview {
        run_id: Arc<str>,
        node: Arc<str>,
        step: u64,
        image: Arc<str>,
    },
    NodeFinished {
        run_id: Arc<str>,
        node: Arc<str>,
        millis: u64,
    },
    NodeFailed {
        run_id: Arc<str>,
        node: Arc<str>,
        error: String,
    },
    /// Not run because something it needs failed.
    NodeSkipped {
        run_id: Arc<str>,
        node: Arc<str>,
        because: Arc<str>,
    },
    RunFinished {
        run_id: Arc<str>,
        ok: bool,
        failed: usize,
    },
    RunCancelled {
        run_id: Arc<str>,
    },
}

impl Event {
    pub fn run_id(&self) -> &str {
        match self {
            Event::RunQueued { run_id }
            | Event::RunStarted { run_id, .. }
            | Event::NodeStarted { run_id, .. }
            | Event::NodeCached { run_id, .. }
            | Event::NodeProgress { run_id, .. }
            | Event::NodePreview { run_id, .. }
            | Event::NodeFinished { run_id, .. }
            | Event::NodeFailed { run_id, .. }
            | Event::NodeSkipped { run_id, .. }
            | Event::RunFinished { run_id, .. }
            | Event::RunCancelled { run_id } => run_id,
        }
    }

    /// The node an event is about, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Event::NodeStarted { node, .. }
            | Event::NodeCached { node, .. }
            | Event::NodeProgress { node, .. }
            | Event::NodePreview { node, .. }
            | Event::NodeFinished { node, .. }
            | Event::NodeFailed { node, .. }
            | Event::NodeSkipped { node, .. } => Some(node),
            _ => None,
        }
    }
}
