//! Loading a workflow: YAML → validated [`Workflow`], reporting every finding at once.

use super::diagnostics::{Diagnostic, DiagnosticKind as K, Span, WorkflowError};
use super::template::{self, Part};
use super::yaml::{self, YNode, YValue};
use super::{Binding, EdgeInfo, Param, Piece, PlannedNode, Workflow};
use crate::node::Node;
use crate::registry::{closest, LookupError, Registry};
use crate::spec::{is_identifier, InputSpec, NodeSpec};
use crate::types::PortType;
use crate::value::{literal_to_value, Value};
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// How to load: the name to print in messages and `--set` overrides.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub file_name: Option<String>,
    pub overrides: Vec<(String, String)>,
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
    let source = std::fs::read_to_string(path).map_err(|e| WorkflowError {
        diagnostics: vec![Diagnostic {
            file: Some(file_name.clone()),
            ..Diagnostic::error(K::Syntax, format!("cannot read the workflow: {e}"))
        }],
    })?;
    let opts = LoadOptions {
        file_name: Some(file_name),
        overrides: overrides.to_vec(),
    };
    load_workflow(&source, registry, &opts)
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

/// A parameter declaration, before overrides.
struct ParamDecl {
    name: String,
    span: Span,
    ty: PortType,
    default: Option<Value>,
    range: InputSpec,
    description: String,
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
            .apply_overrides(decls, &opts.overrides)
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

    fn param_decls(&mut self, yaml: Option<&YNode>) -> Vec<ParamDecl> {
        let Some(yaml) = yaml.filter(|y| !y.is_null()) else {
            return Vec::new();
        };
        let Some(map) = yaml.as_map() else {
            self.push(
                Diagnostic::error(
                    K::Schema,
                    "`params:` must be a mapping from name to declaration",
                )
                .at(Some(yaml.span)),
            );
            return Vec::new();
        };
        let mut decls = Vec::new();
        for (key, decl) in map {
            let name = key.text();
            if !is_identifier(&name) || name == "params" {
                self.push(
                    Diagnostic::error(
                        K::InvalidValue,
                        format!("`{name}` is not a valid param name"),
                    )
                    .at(Some(key.span))
                    .help("use letters, digits, '_' and '-', starting with a letter"),
                );
                continue;
            }
            self.declared_params.insert(name.clone());
            if let Some(d) = self.param_decl(&name, key.span, decl) {
                decls.push(d);
            }
        }
        decls
    }

    fn param_decl(&mut self, name: &str, key_span: Span, decl: &YNode) -> Option<ParamDecl> {
        let err = |kind, msg: String| Diagnostic::error(kind, msg).port(name);
        let Some(map) = decl.as_map() else {
            // Shorthand `seed: 3`: the type follows the value.
            let (ty, value) = match &decl.value {
                YValue::Bool(b) => (PortType::Bool, Value::Bool(*b)),
                YValue::Int(i) => (PortType::Int, Value::Int(*i)),
                YValue::Float(f) => (PortType::Float, Value::Float(*f)),
                YValue::Str(s) => (PortType::String, Value::String(s.clone())),
                _ => {
                    self.push(
                        err(K::Schema, format!("param `{name}`: write `{{type: …, default: …}}` or a scalar default"))
                            .at(Some(decl.span)),
                    );
                    return None;
                }
            };
            return Some(ParamDecl {
                name: name.to_string(),
                span: key_span,
                range: InputSpec::new(name, ty.clone()),
                ty,
                default: Some(value),
                description: String::new(),
            });
        };
        for (key, _) in map {
            let k = key.text();
            if !PARAM_KEYS.contains(&k.as_str()) {
                let mut d =
                    err(K::Schema, format!("param `{name}`: unknown key `{k}`")).at(Some(key.span));
                if let Some(s) = closest(&k, PARAM_KEYS.iter().copied()) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                self.push(d);
            }
        }
        let choices = match decl.get("choices") {
            None => None,
            Some(YNode {
                value: YValue::Seq(items),
                ..
            }) => Some(items.iter().map(YNode::text).collect::<Vec<_>>()),
            Some(other) => {
                self.push(
                    err(
                        K::Schema,
                        format!("param `{name}`: `choices` must be a list"),
                    )
                    .at(Some(other.span)),
                );
                None
            }
        };
        let type_node = decl.get("type");
        let type_name = match type_node {
            Some(t) => t.text(),
            None if choices.is_some() => "enum".to_string(),
            None => {
                self.push(
                    err(K::Schema, format!("param `{name}` has no `type`"))
                        .at(Some(key_span))
                        .help(format!("one of: {}", PortType::PARAM_TYPE_NAMES.join(", "))),
                );
                return None;
            }
        };
        let Some(ty) = PortType::from_param_name(&type_name, choices) else {
            let help = if type_name == "enum" {
                "an enum param needs `choices: [...]`".to_string()
            } else {
                format!("one of: {}", PortType::PARAM_TYPE_NAMES.join(", "))
            };
            self.push(
                err(
                    K::Schema,
                    format!("param `{name}`: unknown type `{type_name}`"),
                )
                .at(type_node.map(|t| t.span))
                .help(help),
            );
            return None;
        };
        let mut range = InputSpec::new(name, ty.clone());
        for (bound, slot) in [("min", &mut range.min), ("max", &mut range.max)] {
            if let Some(v) = decl.get(bound) {
                match v.as_f64() {
                    Some(x) => *slot = Some(x),
                    None => self.push(
                        err(
                            K::Schema,
                            format!("param `{name}`: `{bound}` must be a number"),
                        )
                        .at(Some(v.span)),
                    ),
                }
            }
        }
        let mut default = None;
        if let Some(d) = decl.get("default") {
            let checked = d
                .to_json()
                .and_then(|j| literal_to_value(&j, &ty))
                .and_then(|v| range.check_range(&v).map(|_| v));
            match checked {
                Ok(v) => default = Some(v),
                Err(e) => self.push(
                    err(K::InvalidValue, format!("param `{name}`: default {e}")).at(Some(d.span)),
                ),
            }
        }
        Some(ParamDecl {
            name: name.to_string(),
            span: key_span,
            ty,
            default,
            range,
            description: decl.get("description").map(YNode::text).unwrap_or_default(),
        })
    }

    fn apply_overrides(
        &mut self,
        decls: Vec<ParamDecl>,
        overrides: &[(String, String)],
    ) -> Vec<(Param, Span)> {
        let mut values: HashMap<String, Value> = HashMap::new();
        for (key, text) in overrides {
            let Some(decl) = decls.iter().find(|d| &d.name == key) else {
                let mut d = Diagnostic::error(
                    K::InvalidValue,
                    format!("--set {key}: this workflow has no param `{key}`"),
                );
                if let Some(s) = closest(key, decls.iter().map(|d| d.name.as_str())) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                self.push(d);
                continue;
            };
            match parse_override(text, &decl.ty).and_then(|v| decl.range.check_range(&v).map(|_| v))
            {
                Ok(v) => {
                    values.insert(decl.name.clone(), v);
                }
                Err(e) => {
                    let kind = if decl.range.min.is_some() || decl.range.max.is_some() {
                        K::OutOfRange
                    } else {
                        K::InvalidValue
                    };
                    self.push(
                        Diagnostic::error(kind, format!("--set {key}={text}: {e}"))
                            .at(Some(decl.span)),
                    );
                }
            }
        }
        let mut params = Vec::new();
        for decl in decls {
            let value = values.remove(decl.name.as_str()).or(decl.default);
            match value {
                Some(value) => params.push((
                    Param {
                        name: decl.name,
                        ty: decl.ty,
                        value,
                        description: decl.description,
                    },
                    decl.span,
                )),
                None => self.push(
                    Diagnostic::error(
                        K::MissingInput,
                        format!("param `{}` has no default and was not set", decl.name),
                    )
                    .at(Some(decl.span))
                    .help(format!(
                        "pass `--set {}=…` or give it a `default:`",
                        decl.name
                    )),
                ),
            }
        }
        params
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

    fn bind_inputs(
        &mut self,
        entry: &Entry,
        spec: &NodeSpec,
        entries: &[Entry],
        ids: &HashMap<&str, usize>,
        params: &[Param],
        used_params: &mut HashSet<String>,
    ) -> Vec<Binding> {
        let id = entry.id.as_str();
        let mut bindings: Vec<Option<Binding>> = vec![None; spec.inputs.len()];
        for (key, value) in entry.inputs.into_iter().flatten() {
            let port = key.text();
            let Some(idx) = spec.input_index(&port) else {
                let names = spec.inputs.iter().map(|i| i.name.as_str());
                let help = match closest(&port, names.clone()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!(
                        "{} has inputs: {}",
                        spec.id(),
                        names.collect::<Vec<_>>().join(", ")
                    ),
                };
                self.push(
                    Diagnostic::error(
                        K::UnknownPort,
                        format!("{} has no input `{port}`", spec.id()),
                    )
                    .at(Some(key.span))
                    .node(id)
                    .port(&port)
                    .help(help),
                );
                continue;
            };
            let cx = BindCx {
                id,
                input: &spec.inputs[idx],
                span: Some(value.span),
                entries,
                ids,
                params,
            };
            bindings[idx] = self.bind(&cx, value, used_params);
        }
        spec.inputs
            .iter()
            .zip(bindings)
            .map(|(input, bound)| match bound {
                Some(b) => b,
                None => match input.default_value() {
                    Some(Ok(v)) => Binding::Literal(v),
                    Some(Err(_)) | None => {
                        let written = entry.inputs.is_some_and(|m| {
                            m.iter()
                                .any(|(k, _)| k.as_str() == Some(input.name.as_str()))
                        });
                        if input.required && !written {
                            self.push(
                                Diagnostic::error(
                                    K::MissingInput,
                                    format!(
                                        "required input `{}` ({}) is not given",
                                        input.name, input.ty
                                    ),
                                )
                                .at(Some(entry.span))
                                .node(id)
                                .port(&input.name),
                            );
                        }
                        Binding::Absent
                    }
                },
            })
            .collect()
    }

    /// Binds one written value to an input; `None` after reporting an error.
    fn bind(
        &mut self,
        cx: &BindCx,
        value: &YNode,
        used_params: &mut HashSet<String>,
    ) -> Option<Binding> {
        let input = cx.input;
        if let Some(text) = value.as_str().filter(|s| s.contains('$')) {
            let parts = match template::parse(text) {
                Ok(parts) => parts,
                Err(e) => {
                    self.push(cx.error(K::InvalidValue, e));
                    return None;
                }
            };
            if let [Part::Ref { scope, name }] = parts.as_slice() {
                return if scope == "params" {
                    let param = self.param_ref(cx, name, used_params)?;
                    self.typed_param(cx, param).map(Binding::Literal)
                } else {
                    let (from, output, ty) = self.output_ref(cx, scope, name)?;
                    if !input.ty.accepts(&ty) {
                        self.push(cx.error(
                            K::TypeMismatch,
                            format!(
                                "`{scope}.{name}` is {ty}, but input `{}` expects {}",
                                input.name, input.ty
                            ),
                        ));
                        return None;
                    }
                    Some(Binding::Edge { from, output })
                };
            }
            return self.bind_template(cx, parts, used_params);
        }
        if let YValue::Seq(_) = value.value {
            // Lists may hold params: `shape: [1, 4, "${params.h}", "${params.w}"]`.
            let json = self.substitute_params(cx, value, used_params)?;
            return self.literal(cx, &json, None).map(Binding::Literal);
        }
        match value.to_json() {
            Ok(json) => self.literal(cx, &json, None).map(Binding::Literal),
            Err(e) => {
                self.push(cx.error(K::InvalidValue, e));
                None
            }
        }
    }

    fn bind_template(
        &mut self,
        cx: &BindCx,
        parts: Vec<Part>,
        used_params: &mut HashSet<String>,
    ) -> Option<Binding> {
        let mut pieces = Vec::new();
        let mut ok = true;
        for part in parts {
            match part {
                Part::Text(t) => pieces.push(Piece::Text(t)),
                Part::Ref { scope, name } if scope == "params" => {
                    match self.param_ref(cx, &name, used_params) {
                        Some(p) => pieces.push(Piece::Text(p.value.to_text().unwrap_or_default())),
                        None => ok = false,
                    }
                }
                Part::Ref { scope, name } => match self.output_ref(cx, &scope, &name) {
                    Some((_, _, ty)) if !ty.is_scalar() => {
                        self.push(cx.error(
                            K::TypeMismatch,
                            format!("`{scope}.{name}` is {ty}: only scalars can be interpolated into text"),
                        ).help(format!("write `${{{scope}.{name}}}` as the whole value to connect it")));
                        ok = false;
                    }
                    Some((from, output, _)) => pieces.push(Piece::Output { from, output }),
                    None => ok = false,
                },
            }
        }
        if !ok {
            return None;
        }
        let dynamic = pieces.iter().any(|p| matches!(p, Piece::Output { .. }));
        if !dynamic {
            let text: String = pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.as_str(),
                    Piece::Output { .. } => "",
                })
                .collect();
            return self
                .literal(cx, &serde_json::Value::String(text), None)
                .map(Binding::Literal);
        }
        let ty = &cx.input.ty;
        if !(ty.accepts(&PortType::String) || matches!(ty, PortType::Enum(_))) {
            self.push(cx.error(
                K::TypeMismatch,
                format!(
                    "interpolated text is a String, but input `{}` expects {ty}",
                    cx.input.name
                ),
            ));
            return None;
        }
        Some(Binding::Template(pieces))
    }

    fn param_ref<'p>(
        &mut self,
        cx: &BindCx<'_, 'p>,
        name: &str,
        used: &mut HashSet<String>,
    ) -> Option<&'p Param> {
        match cx.params.iter().find(|p| p.name == name) {
            Some(p) => {
                used.insert(p.name.clone());
                Some(p)
            }
            None => {
                let mut d = cx.error(K::MissingReference, format!("there is no param `{name}`"));
                if let Some(s) = closest(name, cx.params.iter().map(|p| p.name.as_str())) {
                    d = d.help(format!("did you mean `${{params.{s}}}`?"));
                }
                // A param that failed its own checks is already reported.
                if !self.declared_params.contains(name) {
                    self.push(d);
                }
                None
            }
        }
    }

    /// A whole-value `${params.x}`: the param's typed value, checked like a literal.
    fn typed_param(&mut self, cx: &BindCx, param: &Param) -> Option<Value> {
        let ty = &cx.input.ty;
        if !ty.accepts(&param.ty) {
            self.push(cx.error(
                K::TypeMismatch,
                format!(
                    "param `{}` is {}, but input `{}` expects {ty}",
                    param.name, param.ty, cx.input.name
                ),
            ));
            return None;
        }
        let value = match param.value.clone().coerce(ty) {
            Ok(v) => v,
            Err(v) => {
                // e.g. a String param whose value is not among an Enum input's choices
                let json = v.to_json();
                return self.literal(cx, &json, Some(&param.name));
            }
        };
        self.check_range(cx, value, Some(&param.name))
    }

    fn output_ref(
        &mut self,
        cx: &BindCx,
        scope: &str,
        name: &str,
    ) -> Option<(usize, usize, PortType)> {
        let Some(&from) = cx.ids.get(scope) else {
            let mut d = cx.error(K::MissingReference, format!("there is no node `{scope}`"));
            if let Some(s) = closest(scope, cx.ids.keys().copied()) {
                d = d.help(format!("did you mean `${{{s}.{name}}}`?"));
            } else if scope == "param" {
                d = d.help(format!("parameters are written `${{params.{name}}}`"));
            }
            self.push(d);
            return None;
        };
        // A node whose type did not resolve is reported already.
        let spec = cx.entries[from].node.as_ref()?.spec();
        match spec.output_index(name) {
            Some(output) => Some((from, output, spec.outputs[output].ty.clone())),
            None => {
                let outputs: Vec<&str> = spec.outputs.iter().map(|o| o.name.as_str()).collect();
                let help = match closest(name, outputs.iter().copied()) {
                    Some(s) => format!("did you mean `${{{scope}.{s}}}`?"),
                    None if outputs.is_empty() => format!("{} has no outputs", spec.id()),
                    None => format!("{} has outputs: {}", spec.id(), outputs.join(", ")),
                };
                self.push(
                    cx.error(
                        K::MissingReference,
                        format!("node `{scope}` ({}) has no output `{name}`", spec.id()),
                    )
                    .help(help),
                );
                None
            }
        }
    }

    /// Replaces `${params.x}` inside a YAML list by the params' values.
    fn substitute_params(
        &mut self,
        cx: &BindCx,
        value: &YNode,
        used: &mut HashSet<String>,
    ) -> Option<serde_json::Value> {
        match &value.value {
            YValue::Seq(items) => items
                .iter()
                .map(|v| self.substitute_params(cx, v, used))
                .collect::<Option<Vec<_>>>()
                .map(serde_json::Value::Array),
            YValue::Str(s) if s.contains('$') => {
                let parts = match template::parse(s) {
                    Ok(p) => p,
                    Err(e) => {
                        self.push(cx.error(K::InvalidValue, e));
                        return None;
                    }
                };
                if let [Part::Ref { scope, name }] = parts.as_slice() {
                    if scope == "params" {
                        return self.param_ref(cx, name, used).map(|p| p.value.to_json());
                    }
                }
                let mut text = String::new();
                for part in parts {
                    match part {
                        Part::Text(t) => text.push_str(&t),
                        Part::Ref { scope, name } if scope == "params" => text.push_str(
                            &self
                                .param_ref(cx, &name, used)?
                                .value
                                .to_text()
                                .unwrap_or_default(),
                        ),
                        Part::Ref { scope, name } => {
                            self.push(cx.error(
                                K::InvalidValue,
                                format!("`${{{scope}.{name}}}` inside a list: a node output can only be connected as a whole input value"),
                            ));
                            return None;
                        }
                    }
                }
                Some(serde_json::Value::String(text))
            }
            _ => match value.to_json() {
                Ok(j) => Some(j),
                Err(e) => {
                    self.push(cx.error(K::InvalidValue, e));
                    None
                }
            },
        }
    }

    /// Converts a literal to the input's type and checks range and choices.
    fn literal(
        &mut self,
        cx: &BindCx,
        json: &serde_json::Value,
        via_param: Option<&str>,
    ) -> Option<Value> {
        match literal_to_value(json, &cx.input.ty) {
            Ok(v) => self.check_range(cx, v, via_param),
            Err(e) => {
                let kind = match (&cx.input.ty, json) {
                    (PortType::Enum(_), serde_json::Value::String(_)) => K::NotInChoices,
                    _ => K::TypeMismatch,
                };
                let via = via_param
                    .map(|p| format!(" (from param `{p}`)"))
                    .unwrap_or_default();
                self.push(cx.error(kind, format!("{e}{via}")));
                None
            }
        }
    }

    fn check_range(&mut self, cx: &BindCx, value: Value, via_param: Option<&str>) -> Option<Value> {
        match cx.input.check_range(&value) {
            Ok(()) => Some(value),
            Err(e) => {
                let kind = if matches!(cx.input.ty, PortType::Enum(_)) {
                    K::NotInChoices
                } else {
                    K::OutOfRange
                };
                let via = via_param
                    .map(|p| format!(" (from param `{p}`)"))
                    .unwrap_or_default();
                self.push(cx.error(kind, format!("{e}{via}")));
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
        for scc in petgraph::algo::tarjan_scc(&graph) {
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

struct BindCx<'e, 'p> {
    id: &'e str,
    input: &'e InputSpec,
    span: Option<Span>,
    entries: &'e [Entry<'e>],
    ids: &'e HashMap<&'e str, usize>,
    params: &'p [Param],
}

impl BindCx<'_, '_> {
    fn error(&self, kind: K, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(kind, message)
            .at(self.span)
            .node(self.id)
            .port(&self.input.name)
    }
}

/// Parses a `--set name=value` value for a param of type `ty`.
fn parse_override(text: &str, ty: &PortType) -> Result<Value, String> {
    let bad = || format!("`{text}` is not a valid {ty}");
    Ok(match ty {
        PortType::Int => Value::Int(text.trim().parse().map_err(|_| bad())?),
        PortType::Float => Value::Float(text.trim().parse().map_err(|_| bad())?),
        PortType::Bool => match text.trim() {
            "true" | "yes" | "1" => Value::Bool(true),
            "false" | "no" | "0" => Value::Bool(false),
            _ => return Err(bad()),
        },
        PortType::Path => Value::Path(text.into()),
        PortType::Enum(choices) if !choices.iter().any(|c| c == text) => {
            return Err(format!(
                "`{text}` is not one of the choices: {}",
                choices.join(", ")
            ))
        }
        _ => Value::String(text.to_string()),
    })
}
