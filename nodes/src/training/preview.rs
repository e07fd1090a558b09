//! Sample images while training: the EMA weights so far, DPM-Solver++ with
//! classifier-free guidance against the null caption, decoded by the frozen VAE,
//! written as a PNG — so a run can be watched, as the official trainer's
//! visualisation hook does.

use crate::image_io::{encode_png, to_bytes};
use crate::pixart::latents;
use crate::pixart::sample::{sample, Request};
use crate::pixart::Denoiser;
use candle_core::Tensor;
use pixart_models::schedulers::SchedulerConfig;
use pixart_models::vae::AutoencoderKl;
use pixart_runtime::{Conditioning, NodeError};

pub struct Preview<'a> {
    pub vae: &'a AutoencoderKl,
    pub prompt: &'a Conditioning,
    /// Image side in pixels.
    pub size: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

/// One image of `prompt` from `den`, as PNG bytes.
pub fn render(den: &Denoiser, p: &Preview) -> Result<Vec<u8>, NodeError> {
    let image = generate(den, p)?;
    let (_, h, w, c) = image.dims4()?;
    encode_png(&to_bytes(&image)?, w, h, c, &[]).map_err(NodeError::msg)
}

/// One image of `prompt` from `den`: `[1, height, width, 3]` in 0..1, on the CPU.
pub fn generate(den: &Denoiser, p: &Preview) -> Result<Tensor, NodeError> {
    let mut sampler = SchedulerConfig::default()
        .start("dpm_solver++", p.steps)
        .map_err(NodeError::msg)?;
    let req = Request {
        positive: p.prompt,
        negative: None,
        guidance: p.guidance,
        width: p.size,
        height: p.size,
        seed: p.seed,
        latents: None,
        resolution_binning: false,
        vae_scale: p.vae.config().scale_factor(),
        init: None,
    };
    let z = sample(den, sampler.as_mut(), &req, |_| Ok(()))?;
    Ok(latents::decode(p.vae, &z)?)
}
