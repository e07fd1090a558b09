//! Terminal progress for `pixart run`: an overall bar and one bar per node that
//! reports progress. indicatif draws nothing when stderr is not a terminal.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use pixart_runtime::executor::Executor;
use pixart_runtime::workflow::Workflow;
use pixart_runtime::Event;
use std::collections::HashMap;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

pub struct ProgressView {
    task: JoinHandle<()>,
}

impl ProgressView {
    /// Subscribes before the run starts, so no event is missed.
    pub fn start(executor: &Executor, wf: &Workflow) -> ProgressView {
        let mut events = executor.subscribe();
        let types: HashMap<String, String> = wf
            .nodes
            .iter()
            .map(|n| (n.id.to_string(), n.type_id.to_string()))
            .collect();
        let task = tokio::spawn(async move {
            let multi = MultiProgress::new();
            let overall = multi.add(ProgressBar::new(0));
            overall.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} nodes {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            overall.set_prefix("run");
            let node_style =
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            let mut bars: HashMap<String, ProgressBar> = HashMap::new();
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                };
                match event {
                    Event::RunStarted { nodes, .. } => overall.set_length(nodes as u64),
                    Event::NodeStarted { node, .. } => {
                        overall.set_message(format!("running {node}"))
                    }
                    Event::NodeProgress {
                        node,
                        value,
                        max,
                        detail,
                        ..
                    } => {
                        let bar = bars.entry(node.to_string()).or_insert_with(|| {
                            let bar = multi.add(ProgressBar::new(max));
                            bar.set_style(node_style.clone());
                            bar.set_prefix(node.to_string());
                            bar.set_message(types.get(&*node).cloned().unwrap_or_default());
                            bar
                        });
                        bar.set_length(max);
                        bar.set_position(value);
                        if let Some(detail) = detail {
                            bar.set_message(detail.to_string());
                        }
                    }
                    Event::NodeFinished { node, .. } | Event::NodeCached { node, .. } => {
                        if let Some(bar) = bars.remove(&*node) {
                            bar.finish_and_clear();
                        }
                        overall.inc(1);
                    }
                    Event::NodeFailed { node, error, .. } => {
                        if let Some(bar) = bars.remove(&*node) {
                            bar.abandon();
                        }
                        overall.inc(1);
                        let _ = multi.println(format!("node `{node}` failed: {error}"));
                    }
                    Event::NodeSkipped { .. } => overall.inc(1),
                    Event::RunFinished { .. } | Event::RunCancelled { .. } => break,
                    Event::RunQueued { .. } | Event::NodePreview { .. } => {}
                }
            }
            for bar in bars.into_values() {
                bar.abandon();
            }
            overall.finish_and_clear();
        });
        ProgressView { task }
    }

    pub async fn finish(self) {
        let _ = self.task.await;
    }
}
