//! PixArt-α text-to-image: the loaded denoiser, loading, sampling, and the nodes.

pub mod binning;
pub mod controlnet;
pub mod denoiser;
pub mod latents;
pub mod load;
pub mod lora;
pub mod nodes;
pub mod sample;
pub mod text_encoder;

pub use denoiser::Denoiser;
