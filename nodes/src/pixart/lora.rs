//! `lora.load` and `lora.apply`: LoRA adapters of the transformer (peft,
//! diffusers and kohya layouts; see `pixart_models::lora`), merged into a
//! derived transformer. Only the adapted weights are new: the rest are shared
//! with the base model, and the executor's output cache keeps the derived
//! model for as long as its inputs do not change.

use super::denoiser::Denoiser;
use crate::fsutil::input_file_fingerprint;
use pixart_models::lora::{self, Lora};
use pixart_models::pixart::PixArtTransformer;
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::sync::Arc;

/// LoRAs one `lora.apply` stacks at most (more: chain another `lora.apply`).
const STACKED: usize = 3;

pub struct LoadLora {
    spec: NodeSpec,
}

impl LoadLora {
    fn new() -> Self {
        LoadLora {
            spec: NodeSpec::new("lora.load", 1)
                .category("pixart")
                .describe(
                    "Reads a LoRA of the PixArt transformer: a peft folder (adapter_model.safetensors + \
                     adapter_config.json), a diffusers file (transformer.<module>.lora_A/B keys, the \
                     config in its metadata) or a kohya file (lora_unet_<module>.lora_down/up with .alpha).",
                )
                .input(InputSpec::new("path", PortType::Path).describe("The LoRA file or folder."))
                .output("lora", PortType::Lora, "the adapter"),
        }
    }
}

impl Node for LoadLora {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.input_path(inputs.path("path")?)?;
        super::nodes::take_model(ctx, "LoRA", &path, |_, stored| {
            pixart_models::weights::Keep::as_is(stored)
        })?;
        let lora = Lora::load(&path).map_err(|e| NodeError::input("path", e))?;
        let bytes = lora.bytes();
        Ok(Outputs::one(
            "lora",
            Value::Handle(Handle::new(PortType::Lora, bytes, lora)),
        ))
    }
}

pub struct ApplyLora {
    spec: NodeSpec,
}

impl ApplyLora {
    fn new() -> Self {
        let mut spec = NodeSpec::new("lora.apply", 1)
            .category("pixart")
            .describe(
                "Adds LoRAs to a transformer: W + strength · (alpha/r) · up · down for every module \
                 they adapt, up to three at once (chain another lora.apply for more). A LoRA naming a \
                 module the transformer lacks is an error that lists them.",
            )
            .input(InputSpec::new("transformer", PortType::Denoiser))
            .input(InputSpec::new("lora", PortType::Lora))
            .input(strength("strength"));
        for i in 2..=STACKED {
            spec = spec
                .input(InputSpec::new(&format!("lora_{i}"), PortType::Lora).optional())
                .input(strength(&format!("strength_{i}")));
        }
        ApplyLora {
            spec: spec.output("transformer", PortType::Denoiser, "the adapted transformer"),
        }
    }
}

fn strength(name: &str) -> InputSpec {
    InputSpec::new(name, PortType::Float)
        .default(1.0)
        .min(-10.0)
        .max(10.0)
        .describe("How much of the LoRA: 1 as trained, 0 none, negative away from it.")
}

impl Node for ApplyLora {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let base = inputs.handle::<Denoiser>("transformer")?;
        let mut stack: Vec<(&Lora, f64)> =
            vec![(inputs.handle::<Lora>("lora")?, inputs.float("strength")?)];
        for i in 2..=STACKED {
            let port = format!("lora_{i}");
            if inputs.get(&port).is_some() {
                stack.push((
                    inputs.handle::<Lora>(&port)?,
                    inputs.float(&format!("strength_{i}"))?,
                ));
            }
        }
        let weights =
            lora::apply(&base.weights, &stack).map_err(|e| NodeError::input("lora", e))?;
        // The adapted weights are new tensors, held as long as the result is.
        let fresh: usize = weights
            .iter()
            .filter(|(name, t)| base.weights.get(*name).is_none_or(|b| b.id() != t.id()))
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        ctx.take_model_memory(fresh as u64, "the LoRA-adapted transformer")?;
        let cfg = base.model.config().clone();
        let vb = candle_nn::VarBuilder::from_tensors(
            weights.clone(),
            base.model.dtype(),
            base.model.device(),
        );
        let model = PixArtTransformer::new(vb, &cfg)?;
        let adapted = Denoiser {
            model: Arc::new(model),
            control: base.control.clone(),
            null_caption: base.null_caption.clone(),
            weights,
            vae_scale_factor: base.vae_scale_factor,
        };
        Ok(Outputs::one(
            "transformer",
            Value::Handle(Handle::shared(PortType::Denoiser, fresh, Arc::new(adapted))),
        ))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(LoadLora::new()), Arc::new(ApplyLora::new())]
}
