//! Running one submitted workflow under the server's rules, and what of it goes
//! into the run's record: shared by the in-process queue and `pixart worker`,
//! so a run is checked, confined and recorded the same way wherever it runs.

use super::state::{FileRef, OutputRecord, RunRecord, RunState, ServerConfig};
use crate::budget::DiskQuota;
use crate::executor::{Executor, NodeStatus, RunOptions};
use crate::registry::Registry;
use crate::value::Value;
use crate::workflow::{
    load_workflow, Diagnostic, DiagnosticKind, LoadOptions, OverrideSource, Workflow, WorkflowError,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Node states kept in a run's record (a run of 100,000 nodes keeps the first).
pub const MAX_RECORDED_NODE_STATES: usize = 10_000;
/// Failures kept in a run's record, and the characters kept of each message.
pub const MAX_RECORDED_FAILURES: usize = 100;
pub const MAX_FAILURE_CHARS: usize = 4096;
/// Files listed per output of a run's record.
pub const MAX_RECORDED_FILES: usize = 10_000;

/// Loads a submitted workflow with the client's param values, and refuses one
/// whose nodes' estimates pass the per-run memory budget.
pub(crate) fn load_request(
    registry: &Registry,
    config: &ServerConfig,
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
    let wf = load_workflow(text, registry, &opts)?;
    within_budget(config, &wf)?;
    Ok(wf)
}

fn within_budget(config: &ServerConfig, wf: &Workflow) -> Result<(), WorkflowError> {
    use crate::executor::human_bytes;
    let limit = config.run_memory_limit;
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

/// How a run ended and what it leaves in its record.
pub(crate) struct Outcome {
    pub state: RunState,
    pub outputs: Vec<OutputRecord>,
    pub failures: Vec<serde_json::Value>,
    pub node_states: Vec<(String, String)>,
}

impl Outcome {
    /// A run that never started: its workflow no longer loads (a worker
    /// without a plugin the front end has, say).
    pub fn refused(e: &WorkflowError) -> Outcome {
        Outcome {
            state: RunState::Failed,
            outputs: Vec::new(),
            failures: e
                .diagnostics
                .iter()
                .take(MAX_RECORDED_FAILURES)
                .map(|d| serde_json::json!({ "message": shortened(&d.to_string()) }))
                .collect(),
            node_states: Vec::new(),
        }
    }

    /// Writes the outcome into `record`, which ends now.
    pub fn apply(self, record: &mut RunRecord, finished_at: u64) {
        record.state = self.state;
        record.finished_at = Some(finished_at);
        record.outputs = self.outputs;
        record.failures = self.failures;
        record.node_states = self.node_states;
    }

    /// The files of the run's outputs.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.outputs.iter().flat_map(|o| &o.files)
    }
}

/// The output folder, resolved (where file ids are counted from).
pub(crate) fn out_root(out_dir: &Path) -> PathBuf {
    (out_dir.canonicalize())
        .or_else(|_| std::path::absolute(out_dir))
        .unwrap_or_else(|_| out_dir.to_path_buf())
}

/// The id the server hands file `path` out by (derived from its place below
/// the output folder, so every front end and worker derives the same), and that
/// place; `None` for a file elsewhere.
pub(crate) fn file_ref(out_root: &Path, path: &Path) -> Option<FileRef> {
    let resolved = path.canonicalize().ok()?;
    let rel = resolved.strip_prefix(out_root).ok()?.to_path_buf();
    Some(FileRef {
        id: file_id(&rel),
        path: Some(rel),
    })
}

pub(crate) fn file_id(rel: &Path) -> String {
    blake3::hash(rel.to_string_lossy().as_bytes()).to_hex()[..20].to_string()
}

/// Runs `wf` as run `id` under `config`'s rules (paths confined to its folders,
/// memory and disk budgets, previews on) until it ends or `cancel` fires.
pub(crate) async fn execute_run(
    executor: &Executor,
    config: &ServerConfig,
    disk: &Arc<DiskQuota>,
    id: &str,
    wf: &Workflow,
    targets: Vec<String>,
    cancel: CancellationToken,
) -> Outcome {
    let opts = RunOptions {
        targets,
        out_dir: config.out_dir.clone(),
        base_dir: config.base_dir.clone(),
        cancel,
        run_id: Some(id.to_string()),
        confine_paths: true,
        previews: true,
        memory_limit: Some(config.run_memory_limit),
        model_memory_limit: Some(config.run_model_memory_limit),
        disk_quota: Some(disk.clone()),
        read_also: None,
    };
    let report = match executor.run(wf, opts).await {
        Ok(report) => report,
        Err(e) => {
            return Outcome {
                state: RunState::Failed,
                outputs: Vec::new(),
                failures: vec![serde_json::json!({"message": e.to_string()})],
                node_states: Vec::new(),
            }
        }
    };
    let out = out_root(&config.out_dir);
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
                .filter_map(|p| file_ref(&out, &p))
                .collect();
            outputs.push(OutputRecord {
                node: node.id.to_string(),
                output: name.clone(),
                value: relative_paths(value, &out).to_json(),
                files,
            });
        }
    }
    let failures = report
        .failures
        .iter()
        .take(MAX_RECORDED_FAILURES)
        .map(|f| serde_json::json!({"node": f.node, "node_type": f.node_type, "message": shortened(&without_backtrace(&f.message)), "lost_outputs": f.lost_outputs.iter().take(100).collect::<Vec<_>>()}))
        .collect();
    let node_states = report
        .nodes
        .iter()
        .take(MAX_RECORDED_NODE_STATES)
        .map(|n| (n.id.to_string(), status_name(&n.status).into()))
        .collect();
    let state = if report.cancelled {
        RunState::Cancelled
    } else if report.ok() {
        RunState::Finished
    } else {
        RunState::Failed
    };
    Outcome {
        state,
        outputs,
        failures,
        node_states,
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

#[cfg(test)]
mod tests {
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
