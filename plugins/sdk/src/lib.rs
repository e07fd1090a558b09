//! Write pixart-flow nodes in Rust, built into a sandboxed WebAssembly
//! component.
//!
//! ```ignore
//! use pixart_plugin_sdk::*;
//!
//! struct Mine;
//!
//! impl Plugin for Mine {
//!     fn info() -> PluginInfo {
//!         PluginInfo::new("mine", "0.1.0", "My nodes").node(
//!             NodeDecl::new("text.shout", 1)
//!                 .input(InputDecl::new("text", PortType::Text))
//!                 .output("text", PortType::Text, "the text in capitals"),
//!         )
//!     }
//!
//!     fn run(node: &str, mut inputs: Inputs) -> Result<Outputs, RunError> {
//!         match node {
//!             "text.shout" => Ok(Outputs::new().text("text", inputs.text("text")?.to_uppercase())),
//!             _ => Err(RunError::unknown_node(node)),
//!         }
//!     }
//! }
//!
//! plugin!(Mine);
//! ```
//!
//! The host (`pixart`) names the nodes `mine/text.shout`, checks every input
//! against the declaration before `run` and every output after it.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/0.1.0",
        world: "node-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "pixart_plugin_sdk::bindings",
    });
}

pub use bindings::pixart::plugin::files;
pub use bindings::pixart::plugin::host::{is_cancelled, progress, LogLevel};
pub use bindings::pixart::plugin::types::{
    InputDecl, ItemType, Latents, Literal, NamedValue, NodeDecl, OutputDecl, PluginInfo, PortType,
    RunError, Scalar, Tensor, Value,
};

/// What a plugin implements: its declaration and how to run each node.
pub trait Plugin {
    /// The plugin's id, version and nodes; the host calls it once at load.
    fn info() -> PluginInfo;
    /// Runs `node` (its name without the plugin's prefix).
    fn run(node: &str, inputs: Inputs) -> Result<Outputs, RunError>;
}

/// Exports a [`Plugin`] implementation as the component's plugin interface.
#[macro_export]
macro_rules! plugin {
    ($plugin:ty) => {
        const _: () = {
            struct PixartPluginExport;
            impl $crate::bindings::exports::pixart::plugin::plugin::Guest for PixartPluginExport {
                fn describe() -> $crate::PluginInfo {
                    <$plugin as $crate::Plugin>::info()
                }
                fn run(
                    node: ::std::string::String,
                    inputs: ::std::vec::Vec<$crate::NamedValue>,
                ) -> ::std::result::Result<::std::vec::Vec<$crate::NamedValue>, $crate::RunError>
                {
                    $crate::run_node::<$plugin>(&node, inputs)
                }
            }
    $crate::bindings::__export_plugin!(PixartPluginExport with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
pub fn run_node<P: Plugin>(
    node: &str,
    inputs: Vec<NamedValue>,
) -> Result<Vec<NamedValue>, RunError> {
    // Plugins abort on panic; the hook gets the message to the host first.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| log(LogLevel::Error, &info.to_string())));
    });
    P::run(node, Inputs(inputs)).map(|o| o.0)
}

/// Writes a line to the host's log.
pub fn log(level: LogLevel, message: &str) {
    bindings::pixart::plugin::host::log(level, message);
}

// ---- declarations ------------------------------------------------------------

impl PluginInfo {
    pub fn new(id: &str, version: &str, description: &str) -> PluginInfo {
        PluginInfo {
            id: id.into(),
            version: version.into(),
            description: description.into(),
            nodes: Vec::new(),
        }
    }

    pub fn node(mut self, node: NodeDecl) -> Self {
        self.nodes.push(node);
        self
    }
}

impl NodeDecl {
    /// A deterministic node named `name` (dot-separated words), version ≥ 1.
    pub fn new(name: &str, version: u32) -> NodeDecl {
        NodeDecl {
            name: name.into(),
            version,
            category: String::new(),
            description: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            output_node: false,
            deterministic: true,
        }
    }

    pub fn category(mut self, category: &str) -> Self {
        self.category = category.into();
        self
    }

    pub fn describe(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }

    pub fn input(mut self, input: InputDecl) -> Self {
        self.inputs.push(input);
        self
    }

    pub fn output(mut self, name: &str, ty: PortType, description: &str) -> Self {
        self.outputs.push(OutputDecl {
            name: name.into(),
            ty,
            description: description.into(),
        });
        self
    }

    /// Results depend on more than the inputs (randomness, files): never cached.
    pub fn nondeterministic(mut self) -> Self {
        self.deterministic = false;
        self
    }

    /// Has side effects the workflow wants: always runs.
    pub fn output_node(mut self) -> Self {
        self.output_node = true;
        self
    }
}

impl InputDecl {
    /// A required input.
    pub fn new(name: &str, ty: PortType) -> InputDecl {
        InputDecl {
            name: name.into(),
            ty,
            description: String::new(),
            default: None,
            min: None,
            max: None,
            required: true,
        }
    }

    pub fn describe(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }

    pub fn default(mut self, value: impl Into<Literal>) -> Self {
        self.default = Some(value.into());
        self.required = false;
        self
    }

    /// Neither required nor defaulted: absent from the inputs when not given.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }
}

impl From<i64> for Literal {
    fn from(v: i64) -> Literal {
        Literal::One(Scalar::Int(v))
    }
}

impl From<f64> for Literal {
    fn from(v: f64) -> Literal {
        Literal::One(Scalar::Float(v))
    }
}

impl From<bool> for Literal {
    fn from(v: bool) -> Literal {
        Literal::One(Scalar::Boolean(v))
    }
}

impl From<&str> for Literal {
    fn from(v: &str) -> Literal {
        Literal::One(Scalar::Text(v.into()))
    }
}

impl PortType {
    pub fn choice(choices: &[&str]) -> PortType {
        PortType::Choice(choices.iter().map(|c| c.to_string()).collect())
    }
}

impl RunError {
    pub fn failed(message: impl std::fmt::Display) -> RunError {
        RunError::Failed(message.to_string())
    }

    pub fn bad_input(name: &str, message: impl std::fmt::Display) -> RunError {
        RunError::BadInput((name.into(), message.to_string()))
    }

    pub fn unknown_node(node: &str) -> RunError {
        RunError::Failed(format!("this plugin has no node `{node}`"))
    }
}

// ---- tensors -------------------------------------------------------------------

impl Tensor {
    /// A new host tensor of `shape` from row-major `data`.
    pub fn new(shape: &[usize], data: &[f32]) -> Result<Tensor, RunError> {
        let shape: Vec<u32> = shape.iter().map(|&d| d as u32).collect();
        Tensor::from_f32(&shape, data).map_err(RunError::Failed)
    }

    pub fn dims(&self) -> Vec<usize> {
        self.shape().into_iter().map(|d| d as usize).collect()
    }
}

// ---- inputs and outputs ------------------------------------------------------

/// A node's inputs by name (absent optional inputs are missing).
pub struct Inputs(Vec<NamedValue>);

impl Inputs {
    /// Removes and returns an input (tensors can only be taken, not copied).
    pub fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.0.iter().position(|nv| nv.name == name)?;
        Some(self.0.swap_remove(i).value)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|nv| nv.name == name)
    }

    fn required(&mut self, name: &str) -> Result<Value, RunError> {
        self.take(name)
            .ok_or_else(|| RunError::bad_input(name, "no value was given"))
    }

    pub fn int(&mut self, name: &str) -> Result<i64, RunError> {
        match self.required(name)? {
            Value::Int(i) => Ok(i),
            other => Err(wrong(name, "an int", &other)),
        }
    }

    pub fn float(&mut self, name: &str) -> Result<f64, RunError> {
        match self.required(name)? {
            Value::Float(f) => Ok(f),
            Value::Int(i) => Ok(i as f64),
            other => Err(wrong(name, "a float", &other)),
        }
    }

    pub fn boolean(&mut self, name: &str) -> Result<bool, RunError> {
        match self.required(name)? {
            Value::Boolean(b) => Ok(b),
            other => Err(wrong(name, "a bool", &other)),
        }
    }

    /// Text, a choice, or a path.
    pub fn text(&mut self, name: &str) -> Result<String, RunError> {
        match self.required(name)? {
            Value::Text(s) | Value::Path(s) => Ok(s),
            other => Err(wrong(name, "text", &other)),
        }
    }

    pub fn list(&mut self, name: &str) -> Result<Vec<Scalar>, RunError> {
        match self.required(name)? {
            Value::List(items) => Ok(items),
            other => Err(wrong(name, "a list", &other)),
        }
    }

    /// A tensor, or the tensor of latents or an image.
    pub fn tensor(&mut self, name: &str) -> Result<Tensor, RunError> {
        match self.required(name)? {
            Value::Tensor(t) | Value::Image(t) => Ok(t),
            Value::Latents(l) => Ok(l.data),
            other => Err(wrong(name, "a tensor", &other)),
        }
    }

    pub fn image(&mut self, name: &str) -> Result<Tensor, RunError> {
        match self.required(name)? {
            Value::Image(t) => Ok(t),
            other => Err(wrong(name, "an image", &other)),
        }
    }

    pub fn latents(&mut self, name: &str) -> Result<Latents, RunError> {
        match self.required(name)? {
            Value::Latents(l) => Ok(l),
            other => Err(wrong(name, "latents", &other)),
        }
    }
}

fn wrong(name: &str, want: &str, got: &Value) -> RunError {
    let got = match got {
        Value::Int(_) => "an int",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a bool",
        Value::Text(_) => "text",
        Value::Path(_) => "a path",
        Value::List(_) => "a list",
        Value::Tensor(_) => "a tensor",
        Value::Image(_) => "an image",
        Value::Latents(_) => "latents",
    };
    RunError::bad_input(name, format!("expected {want}, got {got}"))
}

/// A node's outputs, by name.
#[derive(Default)]
pub struct Outputs(Vec<NamedValue>);

impl Outputs {
    pub fn new() -> Outputs {
        Outputs::default()
    }

    pub fn value(mut self, name: &str, value: Value) -> Self {
        self.0.push(NamedValue {
            name: name.into(),
            value,
        });
        self
    }

    pub fn int(self, name: &str, v: i64) -> Self {
        self.value(name, Value::Int(v))
    }

    pub fn float(self, name: &str, v: f64) -> Self {
        self.value(name, Value::Float(v))
    }

    pub fn boolean(self, name: &str, v: bool) -> Self {
        self.value(name, Value::Boolean(v))
    }

    pub fn text(self, name: &str, v: impl Into<String>) -> Self {
        self.value(name, Value::Text(v.into()))
    }

    pub fn tensor(self, name: &str, t: Tensor) -> Self {
        self.value(name, Value::Tensor(t))
    }

    pub fn image(self, name: &str, t: Tensor) -> Self {
        self.value(name, Value::Image(t))
    }

    pub fn latents(self, name: &str, l: Latents) -> Self {
        self.value(name, Value::Latents(l))
    }
}
