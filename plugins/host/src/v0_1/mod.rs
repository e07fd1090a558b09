//! Bindings for interface `pixart:plugin@0.1.x` (`plugins/wit/0.1.0`), the host
//! side of its imports, and conversions between its types and the runtime's.

use crate::state::{PluginTensor, StoreState};
use crate::{Described, RunFailure};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::{InputSpec, Latents, NodeSpec, OutputSpec, PortType, Value};
use std::path::{Component as PathPart, Path};
use std::sync::OnceLock;
use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::Store;

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "node-plugin",
        with: { "pixart:plugin/types.tensor": crate::state::PluginTensor },
        imports: { default: trappable },
    });
}

use generated::pixart::plugin::{files, host, types as wit};
use generated::{NodePlugin, NodePluginPre};

/// A component checked against this version's world, ready to instantiate.
#[derive(Clone)]
pub(crate) struct Bindings {
    pre: NodePluginPre<StoreState>,
}

fn linker() -> Result<&'static Linker<StoreState>, String> {
    static LINKER: OnceLock<Result<Linker<StoreState>, String>> = OnceLock::new();
    LINKER
        .get_or_init(|| {
            let mut linker = Linker::new(crate::engine::engine());
            NodePlugin::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
                .map_err(|e| format!("cannot set up the plugin host: {e}"))?;
            Ok(linker)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Bindings {
    pub(crate) fn new(component: &Component) -> Result<Bindings, String> {
        let pre = linker()?
            .instantiate_pre(component)
            .map_err(|e| format!("does not fit interface 0.1: {e}"))?;
        let pre =
            NodePluginPre::new(pre).map_err(|e| format!("does not fit interface 0.1: {e}"))?;
        Ok(Bindings { pre })
    }

    pub(crate) fn instantiate(&self, mut store: Store<StoreState>) -> wasmtime::Result<Live> {
        let _ieee = pixart_runtime::float_env::IeeeFloats::enter();
        let plugin = self.pre.instantiate(&mut store)?;
        Ok(Live { store, plugin })
    }
}

/// A running instance of a plugin with its store.
pub(crate) struct Live {
    pub store: Store<StoreState>,
    plugin: NodePlugin,
}

impl Live {
    pub(crate) fn describe(&mut self) -> wasmtime::Result<Result<Described, String>> {
        let _ieee = pixart_runtime::float_env::IeeeFloats::enter();
        let info = self
            .plugin
            .pixart_plugin_plugin()
            .call_describe(&mut self.store)?;
        Ok(described(info))
    }

    pub(crate) fn run(
        &mut self,
        node: &str,
        inputs: Vec<(String, Value)>,
    ) -> wasmtime::Result<Result<Vec<(String, Value)>, RunFailure>> {
        let mut args = Vec::with_capacity(inputs.len());
        for (name, value) in inputs {
            match to_guest(value, self.store.data_mut()) {
                Ok(value) => args.push(wit::NamedValue { name, value }),
                Err(message) => return Ok(Err(RunFailure::BadInput(name, message))),
            }
        }
        let result = {
            let _ieee = pixart_runtime::float_env::IeeeFloats::enter();
            self.plugin
                .pixart_plugin_plugin()
                .call_run(&mut self.store, node, &args)?
        };
        let state = self.store.data_mut();
        Ok(match result {
            Ok(values) => values
                .into_iter()
                .map(|nv| Ok((nv.name, from_guest(nv.value, state)?)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(RunFailure::Malformed),
            Err(wit::RunError::BadInput((port, message))) => {
                Err(RunFailure::BadInput(port, message))
            }
            Err(wit::RunError::Cancelled) => Err(RunFailure::Cancelled),
            Err(wit::RunError::Failed(message)) => Err(RunFailure::Failed(message)),
        })
    }
}

// ---- the plugin's declaration -------------------------------------------------

fn described(info: wit::PluginInfo) -> Result<Described, String> {
    let nodes = info
        .nodes
        .into_iter()
        .map(|decl| node_spec(&info.id, decl))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Described {
        id: info.id,
        version: info.version,
        description: info.description,
        nodes,
    })
}

fn node_spec(plugin: &str, decl: wit::NodeDecl) -> Result<(String, NodeSpec), String> {
    let mut spec = NodeSpec::new(&format!("{plugin}/{}", decl.name), decl.version)
        .category(if decl.category.is_empty() {
            plugin
        } else {
            &decl.category
        })
        .describe(&decl.description);
    spec.output_node = decl.output_node;
    spec.deterministic = decl.deterministic;
    for input in decl.inputs {
        let mut i = InputSpec::new(&input.name, port_type(input.ty)).describe(&input.description);
        i.min = input.min;
        i.max = input.max;
        i.required = input.required;
        if let Some(default) = input.default {
            i = i.default(literal_json(default));
        }
        spec = spec.input(i);
    }
    spec.outputs = decl
        .outputs
        .into_iter()
        .map(|o| OutputSpec {
            name: o.name,
            ty: port_type(o.ty),
            description: o.description,
        })
        .collect();
    spec.check()?;
    Ok((decl.name, spec))
}

fn port_type(ty: wit::PortType) -> PortType {
    use wit::PortType as W;
    match ty {
        W::Int => PortType::Int,
        W::Float => PortType::Float,
        W::Boolean => PortType::Bool,
        W::Text => PortType::String,
        W::Path => PortType::Path,
        W::Choice(choices) => PortType::Enum(choices),
        W::Scalar => PortType::Scalar,
        W::ListOf(item) => PortType::list_of(item_type(item)),
        W::Tensor => PortType::Tensor,
        W::TensorLike => PortType::TensorLike,
        W::Latents => PortType::Latents,
        W::Image => PortType::Image,
    }
}

fn item_type(ty: wit::ItemType) -> PortType {
    use wit::ItemType as W;
    match ty {
        W::Int => PortType::Int,
        W::Float => PortType::Float,
        W::Boolean => PortType::Bool,
        W::Text => PortType::String,
        W::Path => PortType::Path,
        W::Choice(choices) => PortType::Enum(choices),
        W::Scalar => PortType::Scalar,
    }
}

fn literal_json(literal: wit::Literal) -> serde_json::Value {
    match literal {
        wit::Literal::One(s) => scalar_json(s),
        wit::Literal::Many(items) => items.into_iter().map(scalar_json).collect(),
    }
}

fn scalar_json(s: wit::Scalar) -> serde_json::Value {
    match s {
        wit::Scalar::Int(i) => i.into(),
        wit::Scalar::Float(f) => f.into(),
        wit::Scalar::Boolean(b) => b.into(),
        wit::Scalar::Text(t) | wit::Scalar::Path(t) => t.into(),
    }
}

// ---- values ------------------------------------------------------------------

fn to_guest(value: Value, state: &mut StoreState) -> Result<wit::Value, String> {
    Ok(match value {
        Value::Int(i) => wit::Value::Int(i),
        Value::Float(f) => wit::Value::Float(f),
        Value::Bool(b) => wit::Value::Boolean(b),
        Value::String(s) => wit::Value::Text(s),
        Value::Path(p) => wit::Value::Path(p.to_string_lossy().into_owned()),
        Value::List(items) => wit::Value::List(
            items
                .into_iter()
                .map(|v| match v {
                    Value::Int(i) => Ok(wit::Scalar::Int(i)),
                    Value::Float(f) => Ok(wit::Scalar::Float(f)),
                    Value::Bool(b) => Ok(wit::Scalar::Boolean(b)),
                    Value::String(s) => Ok(wit::Scalar::Text(s)),
                    Value::Path(p) => Ok(wit::Scalar::Path(p.to_string_lossy().into_owned())),
                    other => Err(format!(
                        "plugins take lists of scalars, not of {}",
                        other.kind_name()
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        Value::Tensor(t) => wit::Value::Tensor(push(state, t)?),
        Value::Image(t) => wit::Value::Image(push(state, t)?),
        Value::Latents(l) => wit::Value::Latents(wit::Latents {
            data: push(state, l.tensor)?,
            image_size: l.image_size.map(|(h, w)| (h as u32, w as u32)),
        }),
        other => {
            return Err(format!(
                "interface 0.1 cannot pass a {} to a plugin",
                other.kind_name()
            ))
        }
    })
}

fn push(state: &mut StoreState, tensor: Tensor) -> Result<Resource<PluginTensor>, String> {
    state
        .table
        .push(PluginTensor(tensor))
        .map_err(|e| format!("too many tensors: {e}"))
}

fn from_guest(value: wit::Value, state: &mut StoreState) -> Result<Value, String> {
    let text = |state: &mut StoreState, s: &str| {
        state
            .charge(s.len())
            .map_err(|e| e.to_string())
            .map(|()| s.to_string())
    };
    Ok(match value {
        wit::Value::Int(i) => Value::Int(i),
        wit::Value::Float(f) => Value::Float(f),
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Text(s) => Value::String(text(state, &s)?),
        wit::Value::Path(p) => Value::Path(text(state, &p)?.into()),
        wit::Value::List(items) => {
            state
                .charge(items.len() * std::mem::size_of::<Value>())
                .map_err(|e| e.to_string())?;
            Value::List(
                items
                    .into_iter()
                    .map(|s| {
                        Ok(match s {
                            wit::Scalar::Int(i) => Value::Int(i),
                            wit::Scalar::Float(f) => Value::Float(f),
                            wit::Scalar::Boolean(b) => Value::Bool(b),
                            wit::Scalar::Text(t) => Value::String(text(state, &t)?),
                            wit::Scalar::Path(p) => Value::Path(text(state, &p)?.into()),
                        })
                    })
                    .collect::<Result<_, String>>()?,
            )
        }
        wit::Value::Tensor(t) => Value::Tensor(take(state, t)?),
        wit::Value::Image(t) => Value::Image(take(state, t)?),
        wit::Value::Latents(l) => Value::Latents(Latents {
            tensor: take(state, l.data)?,
            image_size: l.image_size.map(|(h, w)| (h as usize, w as usize)),
        }),
    })
}

fn take(state: &mut StoreState, handle: Resource<PluginTensor>) -> Result<Tensor, String> {
    state
        .table
        .delete(handle)
        .map(|t| t.0)
        .map_err(|e| format!("returned a tensor handle that is not its own: {e}"))
}

// ---- host imports ------------------------------------------------------------

impl wit::Host for StoreState {}

impl wit::HostTensor for StoreState {
    fn from_f32(
        &mut self,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> wasmtime::Result<Result<Resource<PluginTensor>, String>> {
        self.charge(data.len() * 4)?;
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let numel = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(data.len()) {
            return Ok(Err(format!(
                "shape {shape:?} needs {} values, {} were given",
                numel.map_or("too many".into(), |n| n.to_string()),
                data.len()
            )));
        }
        let tensor = match Tensor::from_vec(data, dims, &Device::Cpu) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.to_string())),
        };
        Ok(Ok(self.table.push(PluginTensor(tensor))?))
    }

    fn shape(&mut self, this: Resource<PluginTensor>) -> wasmtime::Result<Vec<u32>> {
        let t = &self.table.get(&this)?.0;
        Ok(t.dims().iter().map(|&d| d as u32).collect())
    }

    fn numel(&mut self, this: Resource<PluginTensor>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.0.elem_count() as u64)
    }

    fn to_f32(&mut self, this: Resource<PluginTensor>) -> wasmtime::Result<Vec<f32>> {
        let t = &self.table.get(&this)?.0;
        Ok(f32_data(t)?)
    }

    fn read_f32(
        &mut self,
        this: Resource<PluginTensor>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Result<Vec<f32>, String>> {
        let t = &self.table.get(&this)?.0;
        let numel = t.elem_count() as u64;
        if offset.saturating_add(len as u64) > numel {
            return Ok(Err(format!(
                "elements {offset}..{} are outside a tensor of {numel}",
                offset.saturating_add(len as u64)
            )));
        }
        let flat = t.flatten_all()?.narrow(0, offset as usize, len as usize)?;
        Ok(Ok(f32_data(&flat)?))
    }

    fn drop(&mut self, this: Resource<PluginTensor>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

/// Row-major f32 values of a tensor of any dtype or device.
fn f32_data(t: &Tensor) -> pixart_runtime::candle_core::Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl host::Host for StoreState {
    fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        let level = match level {
            host::LogLevel::Debug => tracing::Level::DEBUG,
            host::LogLevel::Info => tracing::Level::INFO,
            host::LogLevel::Warn => tracing::Level::WARN,
            host::LogLevel::Error => {
                self.last_error = Some(message.chars().take(2000).collect());
                tracing::Level::ERROR
            }
        };
        StoreState::log(self, level, &message);
        Ok(())
    }

    fn progress(&mut self, value: u64, max: u64) -> wasmtime::Result<()> {
        if let Some(ctx) = &self.ctx {
            ctx.progress(value, max);
        }
        Ok(())
    }

    fn is_cancelled(&mut self) -> wasmtime::Result<bool> {
        Ok(self.ctx.as_ref().is_some_and(|c| c.is_cancelled()))
    }
}

impl files::Host for StoreState {
    fn read_file(&mut self, path: String) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let file = match self.granted(&path) {
            Ok(file) => file,
            Err(e) => return Ok(Err(e)),
        };
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if size > self.limiter.memory_bytes as u64 {
            return Ok(Err(format!(
                "{path}: {size} bytes is more than the plugin's memory"
            )));
        }
        Ok(std::fs::read(&file).map_err(|e| format!("{path}: {e}")))
    }

    fn list_dir(&mut self, path: String) -> wasmtime::Result<Result<Vec<String>, String>> {
        let dir = match self.granted(&path) {
            Ok(dir) => dir,
            Err(e) => return Ok(Err(e)),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return Ok(Err(format!("{path}: {e}"))),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(Ok(names))
    }
}

impl StoreState {
    /// The host path of `path` inside the granted folder, or why not.
    fn granted(&mut self, path: &str) -> Result<std::path::PathBuf, String> {
        let Some(root) = &self.read_dir else {
            let message = format!(
                "plugin `{}` has no file access: the workflow did not grant it a folder \
                 (`plugins: [{{path: …, read_dir: …}}]`)",
                self.plugin
            );
            self.log(tracing::Level::WARN, &format!("refused to read {path:?}"));
            return Err(message);
        };
        let relative = Path::new(path);
        if relative
            .components()
            .any(|c| !matches!(c, PathPart::Normal(_) | PathPart::CurDir))
        {
            return Err(format!(
                "{path}: only relative paths inside the granted folder, without `..`"
            ));
        }
        let full = root.join(relative);
        // Symbolic links must not lead out of the folder either.
        match (full.canonicalize(), root.canonicalize()) {
            (Ok(full), Ok(root)) if full.starts_with(&root) => Ok(full),
            (Ok(_), Ok(_)) => Err(format!("{path}: leads outside the granted folder")),
            (Err(e), _) | (_, Err(e)) => Err(format!("{path}: {e}")),
        }
    }
}
