//! One training step as the official loop does it: noise the latents at the
//! sampled timesteps, predict with the transformer, the IDDPM learned-range loss
//! averaged over the batch, backward, clip, AdamW.

use super::loss::{Diffusion, LossTerms};
use super::optim::{clip_scale, grad_norm, AdamW};
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

/// How a step computes its gradients; every way gives the plain step's
/// gradients up to rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// The batch in this many micro-batches, one after the other (gradient
    /// accumulation): memory for a micro-batch's activations only.
    pub micro_batches: usize,
    /// Activation checkpointing of the transformer blocks.
    pub checkpoint: bool,
}

impl Default for StepPlan {
    fn default() -> Self {
        StepPlan {
            micro_batches: 1,
            checkpoint: false,
        }
    }
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
    let plan = StepPlan::default();
    let b = batch.t.len();
    share_gradients(model, controlnet, diffusion, batch, b, vars, plan)
}

/// [`loss_and_gradients`] of the samples of `batch`, as their share of a
/// batch of `total` samples (their loss sum / `total`), computed as `plan`
/// says. A step split across processes has each compute its slice's share;
/// the shares' sums are the whole batch's mean and gradients.
pub fn share_gradients(
    model: &PixArtTransformer,
    controlnet: Option<&ControlNet>,
    diffusion: &Diffusion,
    batch: &Batch,
    total: usize,
    vars: &[Var],
    plan: StepPlan,
) -> Result<(LossTerms, f64, GradStore)> {
    if plan.checkpoint && controlnet.is_some() {
        candle_core::bail!("grad_checkpoint does not cover ControlNet training yet: leave it off");
    }
    let share = Share {
        model,
        controlnet,
        diffusion,
        total,
        vars,
        checkpoint: plan.checkpoint,
    };
    let b = batch.t.len();
    let micro = plan.micro_batches.clamp(1, b.max(1));
    let mut parts = Vec::with_capacity(micro);
    let mut start = 0;
    for k in 0..micro {
        // Sizes differ by at most one sample.
        let len = b / micro + usize::from(k < b % micro);
        parts.push(share.parallel(&batch.slice(start, len)?)?);
        start += len;
    }
    merge(parts, vars)
}

/// What every part of one step's share shares.
struct Share<'a> {
    model: &'a PixArtTransformer,
    controlnet: Option<&'a ControlNet>,
    diffusion: &'a Diffusion,
    /// Samples in the whole batch: each part's loss sum is divided by it.
    total: usize,
    vars: &'a [Var],
    checkpoint: bool,
}

impl Share<'_> {
    /// `batch`'s gradients with its two halves on two threads (CPU).
    fn parallel(&self, batch: &Batch) -> Result<(LossTerms, f64, GradStore)> {
        let b = batch.t.len();
        if !batch_parallel(&batch.x0, b) {
            return self.part(batch);
        }
        let half = b / 2;
        let (first, second) = rayon::join(
            || self.part(&batch.slice(0, half)?),
            || self.part(&batch.slice(half, b - half)?),
        );
        merge(vec![first?, second?], self.vars)
    }

    /// Loss terms of part of a batch and the gradients of its share of the
    /// batch mean (its sum / `total`); returns that share.
    fn part(&self, batch: &Batch) -> Result<(LossTerms, f64, GradStore)> {
        let diffusion = self.diffusion;
        let x_t = diffusion.q_sample(&batch.x0, &batch.t, &batch.noise)?;
        let t: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, batch.t.len(), batch.x0.device())?;
        let sizes = batch.sizes.as_ref().map(|(r, a)| SizeConditions {
            resolution: r,
            aspect_ratio: a,
        });
        let loss_of = |out: &Tensor| -> Result<(Tensor, LossTerms)> {
            let out = out.to_dtype(DType::F32)?;
            let mut terms = diffusion.loss(&batch.x0, &batch.t, &batch.noise, &out)?;
            if let Some(w) = &batch.mse_weights {
                terms.loss = ((&terms.mse * w)? + &terms.vb)?;
            }
            let share = (terms.loss.sum_all()? / self.total as f64)?;
            Ok((share, terms))
        };
        let (share, terms, grads) = if self.checkpoint {
            self.model.checkpointed_backward(
                &x_t,
                &t,
                &batch.text,
                Some(&batch.mask),
                sizes.as_ref(),
                self.vars,
                loss_of,
            )?
        } else {
            let out = match (self.controlnet, &batch.control) {
                (Some(net), Some(latents)) => self.model.forward_train_controlled(
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
                (None, None) => self.model.forward_train(
                    &x_t,
                    &t,
                    &batch.text,
                    Some(&batch.mask),
                    sizes.as_ref(),
                )?,
                _ => candle_core::bail!("a ControlNet trains on batches with control latents"),
            };
            let (share, terms) = loss_of(&out)?;
            let grads = share.backward()?;
            (share, terms, grads)
        };
        let value = share.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((terms, value, grads))
    }
}

/// Parts of one batch, in order, as one: terms concatenated, shares and
/// gradients summed.
fn merge(
    parts: Vec<(LossTerms, f64, GradStore)>,
    vars: &[Var],
) -> Result<(LossTerms, f64, GradStore)> {
    let mut parts = parts.into_iter();
    let Some((first_terms, mut total, mut grads)) = parts.next() else {
        candle_core::bail!("an empty batch has no gradients");
    };
    let (mut mse, mut vb, mut loss) = (
        vec![first_terms.mse],
        vec![first_terms.vb],
        vec![first_terms.loss],
    );
    for (terms, share, more) in parts {
        for v in vars {
            let t = v.as_tensor();
            let sum = match (grads.get(t), more.get(t)) {
                (Some(a), Some(c)) => Some((a + c)?),
                (None, Some(c)) => Some(c.clone()),
                _ => None,
            };
            if let Some(sum) = sum {
                grads.insert(t, sum);
            }
        }
        mse.push(terms.mse);
        vb.push(terms.vb);
        loss.push(terms.loss);
        total += share;
    }
    let terms = LossTerms {
        mse: Tensor::cat(&mse, 0)?,
        vb: Tensor::cat(&vb, 0)?,
        loss: Tensor::cat(&loss, 0)?,
    };
    Ok((terms, total, grads))
}

impl Batch {
    /// Samples `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Result<Batch> {
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
        // Clipping's scale goes into AdamW's pass instead of a pass of its own.
        let norm = grad_norm(grads, &self.vars)?;
        let scale = clip_scale(norm, self.max_grad_norm);
        self.adam.step_scaled(&self.vars, grads, lr, scale)?;
        Ok(norm)
    }
}
