//! Loading a workflow: YAML → validated [`Workflow`], reporting every finding at once.

mod binding;
mod params;

use super::diagnostics::{Diagnostic, DiagnosticKind as K, Span, WorkflowError};
use super::yaml::{self, YNode};
use super::{Binding, EdgeInfo, Param, Piece, PlannedNode, Workflow};
use crate::node::Node;
use crate::registry::{closest, LookupError, Registry};
use crate::spec::is_identifier;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// How to load: the name to print in messages and `--set` overrides.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub file_name: Option<String>,
    pub overrides: Vec<(String, String)>,
    /// Where `overrides` come from: messages about them use its terms.
    pub overrides_from: OverrideSource,
}

/// Where a load's param values come from, for the wording of its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverrideSource {
    /// `--set name=value` on the command line ("--set steps=5000: …").
    #[default]
    CommandLine,
    /// The `params` of an API request ("param `steps` = 5000: …").
    Request,
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "params",
    "nodes",
    "plugins",
    "ui",
];
const NODE_KEYS: &[&str] = &["type", "inputs", "title", "description", "ui"];
const PARAM_KEYS: &[&str] = &["type", "default", "min", "max", "choices", "description"];
const FORMAT_VERSION: i64 = 1;

pub fn load_workflow_file(
    path: &Path,
    registry: &Registry,
    overrides: &[(String, String)],
) -> Result<Workflow, WorkflowError> {
    let file_name = path.display().to_string();
    let source = read_source(path).map_err(|e| WorkflowError {
        diagnostics: vec![Diagnostic {
            file: Some(file_name.clone()),
            ..Diagnostic::error(K::Syntax, format!("cannot read the workflow: {e}"))
        }],
    })?;
    let opts = LoadOptions {
        file_name: Some(file_name),
        overrides: overrides.to_vec(),
        overrides_from: OverrideSource::CommandLine,
    };
    load_workflow(&source, registry, &opts)
}

/// The largest workflow file read: far above any real one (a 100,000-node
/// chain is 6 MiB), and a bound for `pixart validate /dev/zero`.
pub const MAX_WORKFLOW_BYTES: u64 = 64 << 20;

/// A workflow file's text, read up to [`MAX_WORKFLOW_BYTES`].
pub fn read_source(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_WORKFLOW_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_WORKFLOW_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {} MiB", MAX_WORKFLOW_BYTES >> 20),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

pub fn load_workflow(
    source: &str,
    registry: &Registry,
    opts: &LoadOptions,
) -> Result<Workflow, WorkflowError> {
    let mut loader = Loader {
        registry,
        declared_params: HashSet::new(),
        diags: Vec::new(),
    };
    // Editors on Windows start files with a byte-order mark; it is not a key.
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let result = loader.load(source, opts);
    let Loader { mut diags, .. } = loader;
    for d in &mut diags {
        d.file = opts.file_name.clone();
    }
    diags.sort_by_key(|d| (d.line.unwrap_or(0), d.column.unwrap_or(0)));
    match result {
        Some(mut wf) if !diags.iter().any(Diagnostic::is_error) => {
            wf.file = opts.file_name.clone();
            wf.warnings = diags;
            Ok(wf)
        }
        _ => Err(WorkflowError { diagnostics: diags }),
    }
}

struct Loader<'a> {
    registry: &'a Registry,
    /// Every declared param name, including those whose declaration failed
    /// (references to them are not reported a second time).
    declared_params: HashSet<String>,
    diags: Vec<Diagnostic>,
}

/// A node entry after its type was resolved.
struct Entry<'y> {
    id: String,
    span: Span,
    node: Option<Arc<dyn Node>>,
    inputs: Option<&'y [(YNode, YNode)]>,
}

impl<'a> Loader<'a> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn load(&mut self, source: &str, opts: &LoadOptions) -> Option<Workflow> {
        let doc = match yaml::parse(source) {
            Ok(Some(doc)) => doc,
            Ok(None) => {
                self.push(Diagnostic::error(K::Schema, "the workflow file is empty"));
                return None;
            }
            Err(e) => {
                self.push(
                    Diagnostic::error(K::Syntax, format!("not valid YAML: {}", e.message))
                        .at(Some(e.span)),
                );
                return None;
            }
        };
        let Some(top) = doc.as_map() else {
            self.push(
                Diagnostic::error(
                    K::Schema,
                    "a workflow is a YAML mapping with `version: 1` and `nodes:`",
                )
                .at(Some(doc.span)),
            );
            return None;
        };

        let mut name = None;
        let mut params_yaml = None;
        let mut nodes_yaml = None;
        let mut version_seen = false;
        for (key_node, value) in top {
            let Some(key) = key_node.as_str() else {
                self.push(
                    Diagnostic::error(K::Schema, "top-level keys must be strings")
                        .at(Some(key_node.span)),
                );
                continue;
            };
            match key {
                "version" => {
                    version_seen = true;
                    if value.as_i64() != Some(FORMAT_VERSION) {
                        self.push(
                            Diagnostic::error(
                                K::Schema,
                                format!("unsupported workflow format version {}", value.text()),
                            )
                            .at(Some(value.span))
                            .help("this pixart reads `version: 1`"),
                        );
                    }
                }
                "name" => name = value.as_str().map(str::to_string),
                "params" => params_yaml = Some(value),
                "nodes" => nodes_yaml = Some(value),
                // `plugins:` is read (and checked) by `plugin_refs` before loading.
                "description" | "ui" | "plugins" => {}
                other => {
                    let mut d =
                        Diagnostic::error(K::Schema, format!("unknown top-level key `{other}`"))
                            .at(Some(key_node.span));
                    if let Some(s) = closest(other, TOP_KEYS.iter().copied()) {
                        d = d.help(format!("did you mean `{s}`?"));
                    }
                    self.push(d);
                }
            }
        }
        if !version_seen {
            self.push(
                Diagnostic::error(K::Schema, "missing `version: 1`")
                    .at(Some(Span { line: 1, column: 1 })),
            );
        }

        let decls = self.param_decls(params_yaml);
        let (params, param_spans): (Vec<Param>, Vec<Span>) = self
            .apply_overrides(decls, &opts.overrides, opts.overrides_from)
            .into_iter()
            .unzip();

        let Some(nodes_map) = nodes_yaml.and_then(YNode::as_map) else {
            let span = nodes_yaml.map(|n| n.span);
            self.push(
                Diagnostic::error(K::Schema, "`nodes:` must be a mapping from node id to node")
                    .at(span),
            );
            return None;
        };
        let nodes_span = nodes_yaml.map_or(doc.span, |n| n.span);
        let entries = self.node_entries(nodes_map, nodes_span);
        let ids: HashMap<&str, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();

        let mut used_params = HashSet::new();
        let mut planned = Vec::with_capacity(entries.len());
        for entry in &entries {
            let Some(node) = &entry.node else { continue };
            let inputs = self.bind_inputs(
                entry,
                node.spec(),
                &entries,
                &ids,
                &params,
                &mut used_params,
            );
            planned.push(PlannedNode {
                id: Arc::from(entry.id.as_str()),
                type_id: Arc::from(node.spec().id()),
                node: node.clone(),
                inputs,
                span: Some(entry.span),
            });
        }

        for (p, span) in params.iter().zip(&param_spans) {
            if !used_params.contains(p.name.as_str()) {
                self.push(
                    Diagnostic::warning(
                        K::UnusedParam,
                        format!("param `{}` is never used", p.name),
                    )
                    .at(Some(*span)),
                );
            }
        }

        // Every entry must have resolved for the indices in bindings to be valid.
        if planned.len() != entries.len() {
            return None;
        }
        let graph = self.build_graph(&planned)?;
        let ids = planned
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        Some(Workflow {
            name,
            file: None,
            source: Arc::from(source),
            params,
            nodes: planned,
            warnings: Vec::new(),
            graph,
            ids,
        })
    }

    fn node_entries<'y>(&mut self, map: &'y [(YNode, YNode)], nodes_span: Span) -> Vec<Entry<'y>> {
        if map.is_empty() {
            self.push(Diagnostic::error(K::Schema, "`nodes:` is empty").at(Some(nodes_span)));
        }
        let mut entries = Vec::with_capacity(map.len());
        for (key, body) in map {
            let id = key.text();
            let span = key.span;
            if !is_identifier(&id) || id == "params" {
                self.push(
                    Diagnostic::error(K::InvalidValue, format!("`{id}` is not a valid node id"))
                        .at(Some(span))
                        .help("node ids use letters, digits, '_' and '-', start with a letter, and `params` is reserved"),
                );
                continue;
            }
            let Some(fields) = body.as_map() else {
                self.push(
                    Diagnostic::error(K::Schema, "a node is a mapping with `type:` and `inputs:`")
                        .at(Some(span))
                        .node(&id),
                );
                entries.push(Entry {
                    id,
                    span,
                    node: None,
                    inputs: None,
                });
                continue;
            };
            for (k, _) in fields {
                let k_text = k.text();
                if !NODE_KEYS.contains(&k_text.as_str()) {
                    let mut d = Diagnostic::error(K::Schema, format!("unknown key `{k_text}`"))
                        .at(Some(k.span))
                        .node(&id);
                    if let Some(s) = closest(&k_text, NODE_KEYS.iter().copied()) {
                        d = d.help(format!("did you mean `{s}`?"));
                    }
                    self.push(d);
                }
            }
            let node = match body.get("type") {
                Some(t) if t.as_str().is_some() => self.resolve_type(&id, t),
                _ => {
                    self.push(
                        Diagnostic::error(K::Schema, "missing `type:` (a node type name)")
                            .at(Some(span))
                            .node(&id)
                            .help("e.g. `type: noise.gaussian`; `pixart nodes` lists the types"),
                    );
                    None
                }
            };
            let inputs = match body.get("inputs") {
                None => None,
                Some(n) if n.is_null() => None,
                Some(n) => match n.as_map() {
                    Some(m) => Some(m),
                    None => {
                        self.push(
                            Diagnostic::error(
                                K::Schema,
                                "`inputs:` must be a mapping from port to value",
                            )
                            .at(Some(n.span))
                            .node(&id),
                        );
                        None
                    }
                },
            };
            entries.push(Entry {
                id,
                span,
                node,
                inputs,
            });
        }
        entries
    }

    fn resolve_type(&mut self, id: &str, type_node: &YNode) -> Option<Arc<dyn Node>> {
        let type_name = type_node.as_str().unwrap_or_default();
        match self.registry.lookup(type_name) {
            Ok(node) => Some(node),
            Err(e) => {
                let span = Some(type_node.span);
                let d = match e {
                    LookupError::UnknownType { suggestion } => {
                        let d = Diagnostic::error(
                            K::UnknownNodeType,
                            format!("unknown node type `{type_name}`"),
                        );
                        match suggestion {
                            Some(s) => d.help(format!("did you mean `{s}`?")),
                            None => d.help("`pixart nodes` lists the node types"),
                        }
                    }
                    LookupError::UnknownVersion { available } => Diagnostic::error(
                        K::UnknownNodeType,
                        format!("no such version: `{type_name}`"),
                    )
                    .help(format!(
                        "available versions: {}",
                        available
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                self.push(d.at(span).node(id));
                None
            }
        }
    }

    fn build_graph(&mut self, nodes: &[PlannedNode]) -> Option<DiGraph<(), EdgeInfo>> {
        let mut graph = DiGraph::with_capacity(nodes.len(), nodes.len());
        for _ in nodes {
            graph.add_node(());
        }
        for (to, node) in nodes.iter().enumerate() {
            for (input, binding) in node.inputs.iter().enumerate() {
                let mut add = |from: usize, output: usize| {
                    graph.add_edge(
                        NodeIndex::new(from),
                        NodeIndex::new(to),
                        EdgeInfo { output, input },
                    );
                };
                match binding {
                    Binding::Edge { from, output } => add(*from, *output),
                    Binding::Template(pieces) => {
                        for piece in pieces {
                            if let Piece::Output { from, output } = piece {
                                add(*from, *output);
                            }
                        }
                    }
                    Binding::Absent | Binding::Literal(_) => {}
                }
            }
        }
        let mut acyclic = true;
        // Kosaraju's passes walk with an explicit stack: a chain of a million nodes
        // must not overflow a (2 MiB) worker thread's stack, as recursive Tarjan did.
        let mut components = petgraph::algo::kosaraju_scc(&graph);
        components.iter_mut().for_each(|scc| scc.sort());
        components.sort_by_key(|scc| scc[0]);
        for scc in components {
            let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
            if scc.len() < 2 && !self_loop {
                continue;
            }
            acyclic = false;
            let path = cycle_path(&graph, &scc);
            let names: Vec<&str> = path.iter().map(|&i| &*nodes[i].id).collect();
            let first = path[0];
            self.push(
                Diagnostic::error(
                    K::Cycle,
                    format!("the workflow has a cycle: {}", names.join(" → ")),
                )
                .at(nodes[first].span)
                .node(&nodes[first].id)
                .help("a node cannot depend on its own output, directly or through others"),
            );
        }
        acyclic.then_some(graph)
    }
}

/// The nodes of a strongly connected component in the order of one cycle through
/// its first node in file order, closed by that node again.
fn cycle_path(graph: &DiGraph<(), EdgeInfo>, scc: &[NodeIndex]) -> Vec<usize> {
    let members: HashSet<NodeIndex> = scc.iter().copied().collect();
    let start = *scc.iter().min().expect("non-empty component");
    // Breadth-first from start's successors back to start, inside the component.
    let mut parent: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = graph.neighbors(n).filter(|m| members.contains(m)).collect();
        next.sort();
        for m in next {
            if m == start {
                // Walk back from n to start, then read the cycle forwards.
                let mut back = Vec::new();
                let mut cur = n;
                while cur != start {
                    back.push(cur.index());
                    cur = parent[&cur];
                }
                let mut path = vec![start.index()];
                path.extend(back.into_iter().rev());
                path.push(start.index());
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    scc.iter().map(|n| n.index()).collect()
}
