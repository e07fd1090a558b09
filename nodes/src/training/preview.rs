//! Sample images while training: the EMA weights so far, DPM-Solver++ with
//! classifier-free guidance against the null caption, decoded by the frozen VAE,
//! written as a PNG — so a run can be watched, as the official trainer's
//! visualisation hook does.

use crate::image_io::{encode_png, to_bytes};
use crate::models::vae::AutoencoderKl;
use crate::pixart::load::Denoiser;
use crate::pixart::sample::{sample, Request};
use crate::schedulers::SchedulerConfig;
use candle_core::{DType, Device, Tensor};
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
    };
    let latents = sample(den, sampler.as_mut(), &req, |_| Ok(()))?;
    let cfg = p.vae.config();
    let mut z = (latents / cfg.scaling_factor)?;
    if let Some(shift) = cfg.shift_factor {
        z = (z + shift)?;
    }
    Ok(((p.vae.decode(&z)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .to_device(&Device::Cpu)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}
