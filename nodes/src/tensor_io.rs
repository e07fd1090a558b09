//! Tensors to and from safetensors files.

use crate::fsutil::{atomic_write, input_file_fingerprint};
use pixart_runtime::candle_core::safetensors::Load;
use pixart_runtime::candle_core::{Device, Tensor};
use pixart_runtime::registry::closest;
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::sync::Arc;

pub struct LoadTensor {
    spec: NodeSpec,
}

impl LoadTensor {
    fn new() -> LoadTensor {
        LoadTensor {
            spec: NodeSpec::new("tensor.load", 1)
                .category("tensor")
                .describe("Reads one tensor from a .safetensors file (relative paths from the base directory).")
                .input(InputSpec::new("path", PortType::Path))
                .input(
                    InputSpec::new("key", PortType::String)
                        .optional()
                        .describe("Tensor name; may be left out when the file holds one tensor."),
                )
                .output("tensor", PortType::Tensor, "The tensor, in its stored dtype."),
        }
    }
}

impl Node for LoadTensor {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.input_path(inputs.path("path")?)?;
        let bytes = std::fs::read(&path).map_err(|e| NodeError::io(&path, e))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| {
            NodeError::msg(format!(
                "{}: not a readable safetensors file: {e}",
                path.display()
            ))
        })?;
        let mut names = file.names();
        names.sort_unstable();
        let key = match inputs.get("key") {
            Some(Value::String(k)) => k.clone(),
            _ if names.len() == 1 => names[0].to_string(),
            _ => {
                return Err(NodeError::input(
                    "key",
                    format!(
                        "{} holds {} tensors: say which ({})",
                        path.display(),
                        names.len(),
                        names.join(", ")
                    ),
                ))
            }
        };
        let view = file.tensor(&key).map_err(|_| {
            let hint = closest(&key, names.iter().copied())
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_else(|| format!("; it has: {}", names.join(", ")));
            NodeError::input(
                "key",
                format!("{} has no tensor `{key}`{hint}", path.display()),
            )
        })?;
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| NodeError::msg(format!("{}: tensor `{key}`: {e}", path.display())))?;
        Ok(Outputs::one("tensor", Value::Tensor(tensor)))
    }
}

pub struct SaveTensor {
    spec: NodeSpec,
}

impl SaveTensor {
    fn new() -> SaveTensor {
        SaveTensor {
            spec: NodeSpec::new("tensor.save", 1)
                .category("tensor")
                .describe(
                    "Writes tensor data to a .safetensors file (relative paths under the output directory), \
                     atomically; the run's parameters go into the file's metadata. A Tensor or Latents is \
                     stored under `key`; an Image as float [N, C, H, W] in 0..1; a Conditioning as \
                     `key.embeddings` and `key.mask`.",
                )
                .input(InputSpec::new("tensor", PortType::TensorLike))
                .input(InputSpec::new("path", PortType::Path))
                .input(InputSpec::new("key", PortType::String).default("tensor"))
                .output("path", PortType::Path, "The file written.")
                .output_node(),
        }
    }
}

impl Node for SaveTensor {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let key = inputs.str("key")?;
        if key.is_empty() {
            return Err(NodeError::input("key", "must not be empty"));
        }
        let named: Vec<(String, Tensor)> = match inputs.get("tensor") {
            Some(Value::Tensor(t)) => vec![(key.to_string(), t.clone())],
            Some(Value::Latents(l)) => vec![(key.to_string(), l.tensor.clone())],
            Some(Value::Image(t)) => {
                vec![(key.to_string(), t.permute((0, 3, 1, 2))?.contiguous()?)]
            }
            Some(Value::Conditioning(c)) => vec![
                (format!("{key}.embeddings"), c.embeddings.clone()),
                (format!("{key}.mask"), c.mask.clone()),
            ],
            other => {
                let got = other.map_or("nothing", Value::kind_name);
                return Err(NodeError::input(
                    "tensor",
                    format!("expected tensor data, got {got}"),
                ));
            }
        };
        let path = ctx.output_file(inputs.path("path")?)?;
        let metadata = HashMap::from([("pixart.params".to_string(), ctx.params().to_string())]);
        let bytes =
            safetensors::serialize(named.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
                .map_err(|e| NodeError::msg(format!("cannot serialise the tensor: {e}")))?;
        atomic_write(ctx, &path, &bytes)?;
        Ok(Outputs::one("path", Value::Path(path)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(LoadTensor::new()), Arc::new(SaveTensor::new())]
}
