//! `controlnet.load` and `controlnet.apply`: PixArt-α's ControlNet
//! (ControlNet-Transformer), read in the official checkpoint's layout or
//! diffusers' PixArt port's, and attached to a transformer with the control
//! image's latent so that `pixart.sample` samples under it (CFG included: both
//! halves see the same control, as in the official sampler).

use super::denoiser::{Denoiser, DenoiserControl};
use crate::fsutil::input_file_fingerprint;
use candle_core::{DType, Device, Tensor};
use pixart_models::pixart::ControlNet;
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::collections::HashMap;
use std::sync::Arc;

/// A ControlNet's weights (diffusers' port names) and how many blocks it
/// copies; modules are made when it meets the transformer it adapts.
pub struct ControlNetWeights {
    pub tensors: HashMap<String, Tensor>,
    pub copies: usize,
}

pub struct LoadControlNet {
    spec: NodeSpec,
}

impl LoadControlNet {
    fn new() -> Self {
        LoadControlNet {
            spec: NodeSpec::new("controlnet.load", 1)
                .category("pixart")
                .describe(
                    "Reads a PixArt ControlNet: the official checkpoint (PixArt-XL-2-1024-ControlNet.pth: \
                     copies of the first 13 blocks with before_proj/after_proj; the base it holds is left \
                     out) or a folder of diffusers' PixArt port (PixArtControlNetAdapterModel).",
                )
                .input(InputSpec::new("path", PortType::Path).describe("The .pth file or the folder."))
                .output("controlnet", PortType::ControlNet, "the ControlNet"),
        }
    }
}

impl Node for LoadControlNet {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.input_path(inputs.path("path")?)?;
        super::nodes::take_model(ctx, "ControlNet", &path, |_, _| {
            pixart_models::weights::Keep::as_is(DType::F32)
        })?;
        let (tensors, copies) =
            pixart_models::pixart::read_controlnet(&path, DType::F32, &Device::Cpu)
                .map_err(|e| NodeError::input("path", e))?;
        let bytes = tensors.values().map(|t| t.elem_count() * 4).sum();
        Ok(Outputs::one(
            "controlnet",
            Value::Handle(Handle::new(
                PortType::ControlNet,
                bytes,
                ControlNetWeights { tensors, copies },
            )),
        ))
    }
}

pub struct ApplyControlNet {
    spec: NodeSpec,
}

impl ApplyControlNet {
    fn new() -> Self {
        ApplyControlNet {
            spec: NodeSpec::new("controlnet.apply", 1)
                .category("pixart")
                .describe(
                    "Puts a ControlNet in front of a transformer: its copies run beside the first blocks, \
                     led by the control image's latent (vae.encode of an edge map), and add to the \
                     transformer's hidden state. The result samples in pixart.sample like any transformer.",
                )
                .input(InputSpec::new("transformer", PortType::Denoiser))
                .input(InputSpec::new("controlnet", PortType::ControlNet))
                .input(
                    InputSpec::new("control", PortType::TensorLike).describe(
                        "The control image's latents (vae.encode of it, or a [1, C, h, w] tensor), \
                         the latent size of the image pixart.sample makes (after its resolution \
                         binning: encode the control image at the binned size).",
                    ),
                )
                .input(
                    InputSpec::new("scale", PortType::Float)
                        .default(1.0)
                        .min(0.0)
                        .max(4.0)
                        .describe(
                            "How much the ControlNet adds (1: the official model, which has no such \
                             setting; 0: none).",
                        ),
                )
                .output("transformer", PortType::Denoiser, "the controlled transformer"),
        }
    }
}

impl Node for ApplyControlNet {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let base = inputs.handle::<Denoiser>("transformer")?;
        if base.control.is_some() {
            return Err(NodeError::input(
                "transformer",
                "this transformer already has a ControlNet; one at a time (apply the next to the \
                 transformer without it)",
            ));
        }
        let weights = inputs.handle::<ControlNetWeights>("controlnet")?;
        let latents = inputs.tensor("control")?;
        let channels = base.model.config().in_channels;
        match latents.dims() {
            [1, c, _, _] if *c == channels => {}
            dims => {
                return Err(NodeError::input(
                    "control",
                    format!(
                        "expected one control image's latents [1, {channels}, h, w], got {dims:?} \
                         (the latent is shared by the whole batch)"
                    ),
                ))
            }
        }
        let (dtype, device) = (base.model.dtype(), base.model.device().clone());
        let net = build_controlnet(ctx, weights, base)?;
        let bytes = net_bytes(weights, dtype);
        let controlled = base.with_control(Some(DenoiserControl {
            net: Arc::new(net),
            latents: latents.to_dtype(dtype)?.to_device(&device)?,
            scale: inputs.float("scale")?,
        }));
        Ok(Outputs::one(
            "transformer",
            Value::Handle(Handle::new(PortType::Denoiser, bytes, controlled)),
        ))
    }
}

fn net_bytes(weights: &ControlNetWeights, dtype: DType) -> usize {
    weights
        .tensors
        .values()
        .map(|t| t.elem_count() * dtype.size_in_bytes())
        .sum()
}

/// The ControlNet's modules for `base`: in its dtype and on its device (new
/// tensors unless those are the loaded f32 CPU ones), charged to the run.
pub fn build_controlnet(
    ctx: &NodeContext,
    weights: &ControlNetWeights,
    base: &Denoiser,
) -> Result<ControlNet, NodeError> {
    let (dtype, device) = (base.model.dtype(), base.model.device().clone());
    ctx.take_model_memory(net_bytes(weights, dtype) as u64, "the ControlNet's modules")?;
    let vb = candle_nn::VarBuilder::from_tensors(weights.tensors.clone(), dtype, &device);
    ControlNet::new(vb, base.model.config(), weights.copies)
        .map_err(|e| NodeError::input("controlnet", e))
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![
        Arc::new(LoadControlNet::new()),
        Arc::new(ApplyControlNet::new()),
    ]
}
