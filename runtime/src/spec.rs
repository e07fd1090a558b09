//! The one declaration of a node: the validator, the catalog, the executor (and
//! later the editor and the plugin host) all read it.

use crate::types::PortType;
use crate::value::{literal_to_value, Value};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct InputSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: PortType,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// An input with no default that must be given. Inputs that are neither
    /// required nor defaulted are optional: the node sees them as absent.
    pub required: bool,
}

impl InputSpec {
    pub fn new(name: &str, ty: PortType) -> InputSpec {
        InputSpec {
            name: name.to_string(),
            ty,
            description: String::new(),
            default: None,
            min: None,
            max: None,
            required: true,
        }
    }

    pub fn describe(mut self, text: &str) -> Self {
        self.description = text.to_string();
        self
    }

    pub fn default(mut self, value: impl Into<serde_json::Value>) -> Self {
        self.default = Some(value.into());
        self.required = false;
        self
    }

    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    pub fn min(mut self, min: f64) -> Self {
        self.min = Some(min);
        self
    }

    pub fn max(mut self, max: f64) -> Self {
        self.max = Some(max);
        self
    }

    /// Checks a value of this input's type against its range and choices.
    /// For lists the bounds apply to every item.
    pub fn check_range(&self, value: &Value) -> Result<(), String> {
        match value {
            Value::List(items) => items.iter().try_for_each(|v| self.check_range(v)),
            Value::Int(_) | Value::Float(_) => {
                let x = value.as_float().unwrap_or(f64::NAN);
                if x.is_nan() {
                    return Err("is NaN".into());
                }
                if let Some(min) = self.min {
                    if x < min {
                        return Err(format!("{} is below the minimum {min}", value_text(value)));
                    }
                }
                if let Some(max) = self.max {
                    if x > max {
                        return Err(format!("{} is above the maximum {max}", value_text(value)));
                    }
                }
                Ok(())
            }
            Value::String(s) => match &self.ty {
                PortType::Enum(choices) if !choices.contains(s) => Err(format!(
                    "{s:?} is not one of the choices: {}",
                    choices.join(", ")
                )),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The default as a typed value.
    pub fn default_value(&self) -> Option<Result<Value, String>> {
        self.default.as_ref().map(|d| literal_to_value(d, &self.ty))
    }
}

fn value_text(v: &Value) -> String {
    v.to_text().unwrap_or_else(|| v.kind_name().to_string())
}

#[derive(Clone, Debug, Serialize)]
pub struct OutputSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: PortType,
    pub description: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeSpec {
    pub name: String,
    pub version: u32,
    pub category: String,
    pub description: String,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Output nodes are what a run is for (savers, previews): a run without
    /// `--target` executes them and everything they need. They always execute.
    pub output_node: bool,
    /// Same inputs give the same outputs, so results may be cached.
    pub deterministic: bool,
    /// Trivial work (literals, arithmetic) that the executor runs in place instead
    /// of handing to a worker thread.
    pub inline: bool,
    /// The bytes its outputs take, from the inputs known when a workflow loads;
    /// a server refuses a workflow whose estimates pass its per-run budget.
    #[serde(skip)]
    pub estimate: Option<SizeEstimate>,
}

/// Bytes a node's outputs will take, given its inputs in the spec's order where
/// they are known when the workflow loads (literals, defaults, params) and `None`
/// where another node gives them; `None` when the known inputs do not tell.
pub type SizeEstimate = fn(&[Option<&crate::value::Value>]) -> Option<u64>;

/// Input `index` of a [`SizeEstimate`]'s known inputs as a count (negative
/// values count as 0); `None` when it is not known at load.
pub fn known_count(known: &[Option<&crate::value::Value>], index: usize) -> Option<u64> {
    let value = known.get(index).copied().flatten()?;
    value.as_int().map(|v| v.max(0) as u64)
}

impl NodeSpec {
    pub fn new(name: &str, version: u32) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            version,
            category: String::new(),
            description: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            output_node: false,
            deterministic: true,
            inline: false,
            estimate: None,
        }
    }

    pub fn category(mut self, category: &str) -> Self {
        self.category = category.to_string();
        self
    }

    pub fn describe(mut self, text: &str) -> Self {
        self.description = text.to_string();
        self
    }

    pub fn input(mut self, input: InputSpec) -> Self {
        self.inputs.push(input);
        self
    }

    pub fn output(mut self, name: &str, ty: PortType, description: &str) -> Self {
        self.outputs.push(OutputSpec {
            name: name.to_string(),
            ty,
            description: description.to_string(),
        });
        self
    }

    pub fn output_node(mut self) -> Self {
        self.output_node = true;
        self
    }

    pub fn nondeterministic(mut self) -> Self {
        self.deterministic = false;
        self
    }

    pub fn inline(mut self) -> Self {
        self.inline = true;
        self
    }

    /// Declares how the size of the outputs follows from the inputs.
    pub fn estimate(mut self, estimate: SizeEstimate) -> Self {
        self.estimate = Some(estimate);
        self
    }

    /// `name@version`, the identity used in cache keys and messages.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|i| i.name == name)
    }

    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Whether the executor may reuse a cached result: deterministic nodes that
    /// have no side effects.
    pub fn cacheable(&self) -> bool {
        self.deterministic && !self.output_node
    }

    /// Checks the declaration itself (used when a node is registered, which is
    /// where a plugin's malformed declaration must be refused).
    pub fn check(&self) -> Result<(), String> {
        if !is_node_type_name(&self.name) {
            return Err(format!(
                "node name {:?} must be dot-separated words of letters, digits, '_' or '-' \
                 (plugins: 'plugin/word.word')",
                self.name
            ));
        }
        if self.version == 0 {
            return Err(format!("{}: versions start at 1", self.name));
        }
        let mut seen = std::collections::HashSet::new();
        for input in &self.inputs {
            if !is_identifier(&input.name) || !seen.insert(input.name.as_str()) {
                return Err(format!(
                    "{}: bad or repeated input name {:?}",
                    self.name, input.name
                ));
            }
            if let Some(default) = input.default_value() {
                let value = default
                    .map_err(|e| format!("{}: default of {}: {e}", self.name, input.name))?;
                input
                    .check_range(&value)
                    .map_err(|e| format!("{}: default of {}: {e}", self.name, input.name))?;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for output in &self.outputs {
            if !is_identifier(&output.name) || !seen.insert(output.name.as_str()) {
                return Err(format!(
                    "{}: bad or repeated output name {:?}",
                    self.name, output.name
                ));
            }
        }
        Ok(())
    }
}

/// Node ids, port names and param names: what `${a.b}` references can spell.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_node_type_name(s: &str) -> bool {
    let (namespace, rest) = match s.split_once('/') {
        Some((ns, rest)) => (Some(ns), rest),
        None => (None, s),
    };
    namespace.is_none_or(is_identifier) && !rest.is_empty() && rest.split('.').all(is_identifier)
}
