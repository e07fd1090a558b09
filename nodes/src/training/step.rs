//! One training step as the official loop does it: noise the latents at the
//! sampled timesteps, predict with the transformer, the IDDPM learned-range loss
//! averaged over the batch, backward, clip, AdamW.

use super::loss::{Diffusion, LossTerms};
use super::optim::{clip_grad_norm, AdamW};
use crate::models::pixart::{PixArtTransformer, SizeConditions};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// One batch, ready for the model.
pub struct Batch {
    /// Scaled latents `[B, C, h, w]` (posterior sample × scaling factor).
    pub x0: Tensor,
    pub t: Vec<usize>,
    pub noise: Tensor,
    /// Caption features `[B, L, caption_channels]` and mask `[B, L]`.
    pub text: Tensor,
    pub mask: Tensor,
    /// Micro-conditions for models that take them: `[B, 2]` (height, width) and `[B, 1]`.
    pub sizes: Option<(Tensor, Tensor)>,
}

/// The per-sample loss terms, their batch mean and the gradients of that mean.
pub fn loss_and_gradients(
    model: &PixArtTransformer,
    diffusion: &Diffusion,
    batch: &Batch,
) -> Result<(LossTerms, f64, GradStore)> {
    let x_t = diffusion.q_sample(&batch.x0, &batch.t, &batch.noise)?;
    let t: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, batch.t.len(), batch.x0.device())?;
    let sizes = batch.sizes.as_ref().map(|(r, a)| SizeConditions {
        resolution: r,
        aspect_ratio: a,
    });
    let out = model.forward_train(&x_t, &t, &batch.text, Some(&batch.mask), sizes.as_ref())?;
    let terms = diffusion.loss(
        &batch.x0,
        &batch.t,
        &batch.noise,
        &out.to_dtype(DType::F32)?,
    )?;
    let mean = terms.loss.mean_all()?;
    let grads = mean.backward()?;
    let value = mean.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((terms, value, grads))
}

/// The optimiser side of a step: clip, then AdamW on the trainable variables.
pub struct Optimizer {
    pub vars: Vec<Var>,
    pub adam: AdamW,
    pub max_grad_norm: f64,
}

impl Optimizer {
    /// Returns the gradient norm before clipping.
    pub fn apply(&mut self, grads: &mut GradStore, lr: f64) -> Result<f64> {
        let norm = clip_grad_norm(grads, &self.vars, self.max_grad_norm)?;
        self.adam.step(&self.vars, grads, lr)?;
        Ok(norm)
    }
}
