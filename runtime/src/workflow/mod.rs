//! Workflow files: parsing, validation, and the validated plan the executor runs.
//! The file format is documented in `workflows/README.md`.

pub mod diagnostics;
mod load;
pub mod plugins;
pub mod template;
mod yaml;

pub use diagnostics::{Diagnostic, DiagnosticKind, Severity, Span, WorkflowError};
pub use load::{
    load_workflow, load_workflow_file, read_source, LoadOptions, OverrideSource, MAX_WORKFLOW_BYTES,
};
pub use plugins::{plugin_refs, PluginRef};

use crate::node::Node;
use crate::types::PortType;
use crate::value::Value;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;
use std::collections::HashMap;
use std::sync::Arc;

/// A workflow parameter with its value for this run (default or `--set`).
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub ty: PortType,
    pub value: Value,
    pub description: String,
}

/// Where one input of a node gets its value.
#[derive(Clone, Debug)]
pub enum Binding {
    /// An optional input left out.
    Absent,
    /// A literal, a default, or a parameter: known when the workflow loads.
    Literal(Value),
    /// An edge from output `output` of node `from`.
    Edge { from: usize, output: usize },
    /// Text with node outputs interpolated at run time.
    Template(Vec<Piece>),
}

#[derive(Clone, Debug)]
pub enum Piece {
    Text(String),
    Output { from: usize, output: usize },
}

/// One node of a validated workflow.
pub struct PlannedNode {
    pub id: Arc<str>,
    /// `name@version` of the resolved node type.
    pub type_id: Arc<str>,
    pub node: Arc<dyn Node>,
    /// One binding per declared input, in the spec's order.
    pub inputs: Vec<Binding>,
    pub span: Option<Span>,
}

/// The data edge `from.output → to.input`, stored on the petgraph edges.
#[derive(Clone, Copy, Debug)]
pub struct EdgeInfo {
    pub output: usize,
    pub input: usize,
}

/// A workflow that passed validation: every type resolved, every edge type-checked,
/// no cycles. Node indices follow the file's order.
pub struct Workflow {
    pub name: Option<String>,
    pub file: Option<String>,
    pub source: Arc<str>,
    pub params: Vec<Param>,
    pub nodes: Vec<PlannedNode>,
    pub warnings: Vec<Diagnostic>,
    /// Node `i` of `nodes` is `NodeIndex::new(i)`.
    pub graph: DiGraph<(), EdgeInfo>,
    ids: HashMap<Arc<str>, usize>,
}

impl Workflow {
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.ids.get(id).copied()
    }

    /// Nodes whose outputs node `i` reads (each once).
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        self.neighbours(i, Direction::Incoming)
    }

    /// Nodes that read node `i`'s outputs (each once).
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        self.neighbours(i, Direction::Outgoing)
    }

    fn neighbours(&self, i: usize, dir: Direction) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), dir)
            .map(NodeIndex::index)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The nodes a run must execute: `targets` (node ids) or, without targets, every
    /// output node; plus everything they depend on. Returned as a mask over `nodes`.
    pub fn needed(&self, targets: &[String]) -> Result<Vec<bool>, String> {
        let mut roots = Vec::new();
        for t in targets {
            match self.node_index(t) {
                Some(i) => roots.push(i),
                None => {
                    let hint = crate::registry::closest(t, self.nodes.iter().map(|n| &*n.id))
                        .map(|c| format!(" (did you mean `{c}`?)"))
                        .unwrap_or_default();
                    return Err(format!(
                        "--target `{t}` is not a node of this workflow{hint}"
                    ));
                }
            }
        }
        if targets.is_empty() {
            roots = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].node.spec().output_node)
                .collect();
            if roots.is_empty() {
                // A workflow without savers: run the nodes nothing else reads.
                roots = (0..self.nodes.len())
                    .filter(|&i| {
                        self.graph
                            .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
                            .next()
                            .is_none()
                    })
                    .collect();
            }
        }
        let mut mask = vec![false; self.nodes.len()];
        let mut stack = roots;
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut mask[i], true) {
                stack.extend(
                    self.graph
                        .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                        .map(NodeIndex::index),
                );
            }
        }
        Ok(mask)
    }

    /// Parameter values as JSON (recorded in saved images).
    /// The bytes this workflow's values will hold, as far as the nodes' estimates
    /// tell from what is known at load, and the node that holds the most.
    pub fn estimated_bytes(&self) -> (u64, Option<(usize, u64)>) {
        let mut total = 0u64;
        let mut largest: Option<(usize, u64)> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(estimate) = node.node.spec().estimate else {
                continue;
            };
            let known: Vec<Option<&Value>> = node
                .inputs
                .iter()
                .map(|b| match b {
                    Binding::Literal(v) => Some(v),
                    _ => None,
                })
                .collect();
            let Some(bytes) = estimate(&known) else {
                continue;
            };
            total = total.saturating_add(bytes);
            if largest.is_none_or(|(_, b)| bytes > b) {
                largest = Some((i, bytes));
            }
        }
        (total, largest)
    }

    pub fn params_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.params
                .iter()
                .map(|p| (p.name.clone(), p.value.to_json()))
                .collect(),
        )
    }
}
