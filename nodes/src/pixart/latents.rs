//! Latents ↔ images, as diffusers' pipelines convert them: the VAE's
//! `scaling_factor` (and `shift_factor`) between the diffusion latents and the
//! VAE's own z, and the decoder's −1..1 pixels to 0..1 images `[B, H, W, 3]`.

use candle_core::{DType, Device, Result, Tensor};
use pixart_models::vae::AutoencoderKl;

/// Diffusion latents → the z the decoder takes: `latents / scaling + shift`.
pub fn to_vae(vae: &AutoencoderKl, latents: &Tensor) -> Result<Tensor> {
    let cfg = vae.config();
    let z = (latents / cfg.scaling_factor)?;
    match cfg.shift_factor {
        Some(shift) => z + shift,
        None => Ok(z),
    }
}

/// The encoder's z → diffusion latents: `(z − shift) · scaling`.
pub fn from_vae(vae: &AutoencoderKl, z: &Tensor) -> Result<Tensor> {
    let cfg = vae.config();
    let z = match cfg.shift_factor {
        Some(shift) => (z - shift)?,
        None => z.clone(),
    };
    z * cfg.scaling_factor
}

/// Decoder output `[B, 3, H, W]` in −1..1 → images `[B, H, W, 3]` in 0..1 on the CPU.
pub fn to_images(pixels: &Tensor) -> Result<Tensor> {
    ((pixels.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Latents decoded to images `[B, H, W, 3]` in 0..1, on the CPU.
pub fn decode(vae: &AutoencoderKl, latents: &Tensor) -> Result<Tensor> {
    to_images(&vae.decode(&to_vae(vae, latents)?)?)
}
