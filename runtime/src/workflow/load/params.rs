//! The `params:` section: declarations (type, default, range, choices) and the
//! overrides applied to them (`--set` on the command line, or a request's `params`).

use super::{Loader, OverrideSource, PARAM_KEYS};
use crate::registry::closest;
use crate::spec::{is_identifier, InputSpec};
use crate::types::PortType;
use crate::value::{literal_to_value, Value};
use crate::workflow::diagnostics::{Diagnostic, DiagnosticKind as K, Span};
use crate::workflow::yaml::{YNode, YValue};
use crate::workflow::Param;
use std::collections::HashMap;

/// A parameter declaration, before overrides.
pub(super) struct ParamDecl {
    name: String,
    span: Span,
    ty: PortType,
    default: Option<Value>,
    range: InputSpec,
    description: String,
}

impl<'a> Loader<'a> {
    pub(super) fn param_decls(&mut self, yaml: Option<&YNode>) -> Vec<ParamDecl> {
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

    pub(super) fn apply_overrides(
        &mut self,
        decls: Vec<ParamDecl>,
        overrides: &[(String, String)],
        from: OverrideSource,
    ) -> Vec<(Param, Span)> {
        let cli = from == OverrideSource::CommandLine;
        let mut values: HashMap<String, Value> = HashMap::new();
        for (key, text) in overrides {
            let Some(decl) = decls.iter().find(|d| &d.name == key) else {
                let message = if cli {
                    format!("--set {key}: this workflow has no param `{key}`")
                } else {
                    format!("this workflow has no param `{key}`")
                };
                let mut d = Diagnostic::error(K::InvalidValue, message);
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
                    let message = if cli {
                        format!("--set {key}={text}: {e}")
                    } else {
                        format!("param `{key}` = {text}: {e}")
                    };
                    self.push(Diagnostic::error(kind, message).at(Some(decl.span)));
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
                    .help(if cli {
                        format!("pass `--set {}=…` or give it a `default:`", decl.name)
                    } else {
                        format!(
                            "send a value for `{}` in `params` or give it a `default:`",
                            decl.name
                        )
                    }),
                ),
            }
        }
        params
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
