//! Binding a node's `inputs:` to values: literals, `${param}` references,
//! `${node.output}` edges and string templates, each checked against the
//! input's type and range.

use super::{Entry, Loader};
use crate::registry::closest;
use crate::spec::{InputSpec, NodeSpec};
use crate::types::PortType;
use crate::value::{literal_to_value, Value};
use crate::workflow::diagnostics::{Diagnostic, DiagnosticKind as K, Span};
use crate::workflow::template::{self, Part};
use crate::workflow::yaml::{YNode, YValue};
use crate::workflow::{Binding, Param, Piece};
use std::collections::{HashMap, HashSet};

impl<'a> Loader<'a> {
    pub(super) fn bind_inputs(
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
