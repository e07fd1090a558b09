//! A loaded PixArt transformer with what sampling and training need besides its
//! weights. Loading (load.rs), sampling (sample.rs) and the trainer all meet here,
//! so none of them imports another for these pieces.

use candle_core::{Result, Tensor};
use pixart_models::pixart::{Control, ControlNet, PixArtTransformer, SizeConditions};
use std::collections::HashMap;
use std::sync::Arc;

/// The file our trainer stores the learned null caption in, next to a diffusers
/// transformer's weights (tensor `y_embedding`, as in the official checkpoints).
pub const NULL_CAPTION: &str = "null_caption.safetensors";

/// The SD VAE's downsampling factor: the latent cell size when no VAE says
/// otherwise (every PixArt-α release uses that VAE).
pub const DEFAULT_VAE_SCALE: usize = 8;

pub struct Denoiser {
    /// Shared by the denoisers derived from it (`controlnet.apply`).
    pub model: Arc<PixArtTransformer>,
    /// The official checkpoints' learned null caption (`y_embedding`,
    /// `[tokens, caption_channels]`), used as the negative when none is given.
    pub null_caption: Option<Tensor>,
    /// The weights by diffusers name, shared with the model: where training starts.
    pub weights: HashMap<String, Tensor>,
    /// Pixels per latent cell of the VAE this transformer was trained with: the
    /// pipeline folder's `vae/config.json` when there is one, else
    /// [`DEFAULT_VAE_SCALE`].
    pub vae_scale_factor: usize,
    /// A ControlNet leading every forward (`controlnet.apply`); none for the
    /// transformer alone.
    pub control: Option<DenoiserControl>,
}

/// A ControlNet with the control image's latent and its scale.
#[derive(Clone)]
pub struct DenoiserControl {
    pub net: Arc<ControlNet>,
    /// `[1, C, h, w]`: shared by the batch (both halves of CFG).
    pub latents: Tensor,
    pub scale: f64,
}

impl Denoiser {
    /// The same transformer (shared, not copied) led by `control`, or alone.
    pub fn with_control(&self, control: Option<DenoiserControl>) -> Denoiser {
        Denoiser {
            model: self.model.clone(),
            null_caption: self.null_caption.clone(),
            weights: self.weights.clone(),
            vae_scale_factor: self.vae_scale_factor,
            control,
        }
    }

    /// One forward of the transformer, led by the ControlNet when there is one.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
    ) -> Result<Tensor> {
        match &self.control {
            None => self.model.forward(x, t, text, text_mask, sizes),
            Some(c) => self.model.forward_controlled(
                x,
                t,
                text,
                text_mask,
                sizes,
                &Control {
                    net: &c.net,
                    latents: &c.latents,
                    scale: c.scale,
                },
            ),
        }
    }
}
