//! One training step as the official loop does it: noise the latents at the
//! sampled timesteps, predict with the transformer, the IDDPM learned-range loss
//! averaged over the batch, backward, clip, AdamW.

use super::loss::{Diffusion, LossTerms};
use super::optim::{clip_grad_norm, AdamW};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use pixart_models::pixart::{
    batch_parallel, Control, ControlNet, PixArtTransformer, SizeConditions,
};

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
    /// Per-sample weights `[B]` of the ε term (min-SNR); `None` weighs all alike.
    pub mse_weights: Option<Tensor>,
    /// ControlNet training: each sample's control latent `[B, C, h, w]` (scaled
    /// like `x0`).
    pub control: Option<Tensor>,
}

/// The per-sample loss terms, their batch mean and the gradients of that mean
/// with respect to `vars`. On the CPU the two halves of a batch run on two
/// threads (forward and backward each), their gradients summed.
pub fn loss_and_gradients(
    model: &PixArtTransformer,
    controlnet: Option<&ControlNet>,
    diffusion: &Diffusion,
    batch: &Batch,
    vars: &[Var],
) -> Result<(LossTerms, f64, GradStore)> {
    let b = batch.t.len();
    if !batch_parallel(&batch.x0, b) {
        return part_gradients(model, controlnet, diffusion, batch, b);
    }
    let half = b / 2;
    let (first, second) = rayon::join(
        || part_gradients(model, controlnet, diffusion, &batch.slice(0, half)?, b),
        || {
            part_gradients(
                model,
                controlnet,
                diffusion,
                &batch.slice(half, b - half)?,
                b,
            )
        },
    );
    let (t1, l1, mut g1) = first?;
    let (t2, l2, g2) = second?;
    for v in vars {
        let t = v.as_tensor();
        let sum = match (g1.get(t), g2.get(t)) {
            (Some(a), Some(c)) => Some((a + c)?),
            (None, Some(c)) => Some(c.clone()),
            _ => None,
        };
        if let Some(sum) = sum {
            g1.insert(t, sum);
        }
    }
    let terms = LossTerms {
        mse: Tensor::cat(&[t1.mse, t2.mse], 0)?,
        vb: Tensor::cat(&[t1.vb, t2.vb], 0)?,
        loss: Tensor::cat(&[t1.loss, t2.loss], 0)?,
    };
    Ok((terms, l1 + l2, g1))
}

/// Loss terms of part of a batch and the gradients of its share of the batch
/// mean (its sum / `total`); returns that share.
fn part_gradients(
    model: &PixArtTransformer,
    controlnet: Option<&ControlNet>,
    diffusion: &Diffusion,
    batch: &Batch,
    total: usize,
) -> Result<(LossTerms, f64, GradStore)> {
    let x_t = diffusion.q_sample(&batch.x0, &batch.t, &batch.noise)?;
    let t: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, batch.t.len(), batch.x0.device())?;
    let sizes = batch.sizes.as_ref().map(|(r, a)| SizeConditions {
        resolution: r,
        aspect_ratio: a,
    });
    let out = match (controlnet, &batch.control) {
        (Some(net), Some(latents)) => model.forward_train_controlled(
            &x_t,
            &t,
            &batch.text,
            Some(&batch.mask),
            sizes.as_ref(),
            &Control {
                net,
                latents,
                scale: 1.0,
            },
        )?,
        (None, None) => {
            model.forward_train(&x_t, &t, &batch.text, Some(&batch.mask), sizes.as_ref())?
        }
        _ => candle_core::bail!("a ControlNet trains on batches with control latents"),
    };
    let mut terms = diffusion.loss(
        &batch.x0,
        &batch.t,
        &batch.noise,
        &out.to_dtype(DType::F32)?,
    )?;
    if let Some(w) = &batch.mse_weights {
        terms.loss = ((&terms.mse * w)? + &terms.vb)?;
    }
    let share = (terms.loss.sum_all()? / total as f64)?;
    let grads = share.backward()?;
    let value = share.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((terms, value, grads))
}

impl Batch {
    /// Samples `start..start + len`.
    fn slice(&self, start: usize, len: usize) -> Result<Batch> {
        let cut = |x: &Tensor| x.narrow(0, start, len);
        Ok(Batch {
            x0: cut(&self.x0)?,
            t: self.t[start..start + len].to_vec(),
            noise: cut(&self.noise)?,
            text: cut(&self.text)?,
            mask: cut(&self.mask)?,
            sizes: match &self.sizes {
                Some((r, a)) => Some((cut(r)?, cut(a)?)),
                None => None,
            },
            mse_weights: self.mse_weights.as_ref().map(cut).transpose()?,
            control: self.control.as_ref().map(cut).transpose()?,
        })
    }
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
