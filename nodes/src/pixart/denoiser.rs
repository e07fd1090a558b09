//! A loaded PixArt transformer with what sampling and training need besides its
//! weights. Loading (load.rs), sampling (sample.rs) and the trainer all meet here,
//! so none of them imports another for these pieces.

use candle_core::Tensor;
use pixart_models::pixart::PixArtTransformer;
use std::collections::HashMap;

/// The file our trainer stores the learned null caption in, next to a diffusers
/// transformer's weights (tensor `y_embedding`, as in the official checkpoints).
pub const NULL_CAPTION: &str = "null_caption.safetensors";

/// The SD VAE's downsampling factor: the latent cell size when no VAE says
/// otherwise (every PixArt-α release uses that VAE).
pub const DEFAULT_VAE_SCALE: usize = 8;

pub struct Denoiser {
    pub model: PixArtTransformer,
    /// The official checkpoints' learned null caption (`y_embedding`,
    /// `[tokens, caption_channels]`), used as the negative when none is given.
    pub null_caption: Option<Tensor>,
    /// The weights by diffusers name, shared with the model: where training starts.
    pub weights: HashMap<String, Tensor>,
    /// Pixels per latent cell of the VAE this transformer was trained with: the
    /// pipeline folder's `vae/config.json` when there is one, else
    /// [`DEFAULT_VAE_SCALE`].
    pub vae_scale_factor: usize,
}
