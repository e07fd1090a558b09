//! PixArt-α's optimisation step, as its training loop does it: global-norm
//! gradient clipping, AdamW (decoupled weight decay, PyTorch's arithmetic), a
//! constant learning rate after a linear warm-up, and an EMA of the weights.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Clips the gradients of `vars` in place to a global L2 norm of at most
/// `max_norm` (torch.nn.utils.clip_grad_norm_); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    if let Some(coef) = clip_scale(norm, max_norm) {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            // f32 sums, as before the fused update: the resume test across
            // world sizes (tests/training.rs) diverged with f64 ones.
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// The factor clipping multiplies the gradients by, when it clips.
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (coef < 1.0).then_some(coef)
}

/// AdamW with PyTorch's update order and bias corrections.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: u64,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// PixArt's settings: betas (0.9, 0.999), eps 1e-10, weight decay 0.03.
    pub fn pixart(vars: &[Var]) -> Result<AdamW> {
        AdamW::new(vars, 0.9, 0.999, 1e-10, 0.03)
    }

    pub fn new(vars: &[Var], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<AdamW> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            moments,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments, one pair per variable, in creation order.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// Continues from a saved state (a resumed run).
    pub fn restore(&mut self, step: u64, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.moments.len() {
            candle_core::bail!(
                "the optimiser state has {} variables, the model {}",
                moments.len(),
                self.moments.len()
            );
        }
        for ((m, v), (cm, _)) in moments.iter().zip(&self.moments) {
            if m.dims() != cm.dims() || v.dims() != cm.dims() {
                candle_core::bail!(
                    "the optimiser state does not fit the model ({:?})",
                    cm.dims()
                );
            }
        }
        self.step = step;
        self.moments = moments;
        Ok(())
    }

    /// One update of `vars` (the same list, in the same order, as at creation).
    pub fn step(&mut self, vars: &[Var], grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(vars, grads, lr, None)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (what
    /// clipping would have done to the gradients, without a pass of its own).
    pub fn step_scaled(
        &mut self,
        vars: &[Var],
        grads: &GradStore,
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let fused = pixart_models::kernels::AdamWStep {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: 1.0 - lr * self.weight_decay,
            bias2: 1.0 - self.beta2.powi(t),
            step_size: lr / (1.0 - self.beta1.powi(t)),
            grad_scale,
        };
        for (v, (m, s)) in vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            // A gradient made through another variable (a LoRA's B·A) carries
            // that graph: detached, the moments do not keep every step's alive.
            let g = &g.detach();
            if let Some((m1, s1)) =
                pixart_models::kernels::adamw_update(v.as_tensor(), g, m, s, &fused)?
            {
                (*m, *s) = (m1, s1);
                continue;
            }
            let g = &match grad_scale {
                Some(k) => (g * k)?,
                None => g.clone(),
            };
            let p = v.as_tensor().detach();
            let p = (&p * fused.decay)?;
            *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            *s = ((&*s * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((s.sqrt()? / fused.bias2.sqrt())? + self.eps)?;
            let update = (m.div(&denom)? * fused.step_size)?;
            v.set(&(p - update)?)?;
        }
        Ok(())
    }
}

/// diffusers' `get_constant_schedule_with_warmup` as PixArt uses it: the
/// learning rate of optimiser step `step` (0-based) is `lr·min(1, step/warmup)`,
/// so the very first step has a learning rate of 0.
pub fn warmup_lr(base_lr: f64, step: u64, warmup: u64) -> f64 {
    if step < warmup {
        base_lr * step as f64 / warmup.max(1) as f64
    } else {
        base_lr
    }
}

/// How the learning rate moves after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrSchedule {
    /// PixArt's: the base rate to the end.
    Constant,
    /// A straight line down to 0 at the last step.
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
}

impl LrSchedule {
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];

    pub fn parse(name: &str) -> Option<LrSchedule> {
        match name {
            "constant" => Some(LrSchedule::Constant),
            "linear" => Some(LrSchedule::Linear),
            "cosine" => Some(LrSchedule::Cosine),
            _ => None,
        }
    }
}

/// The learning rate of optimiser step `step` (0-based) of `steps`: the warm-up of
/// [`warmup_lr`], then the base rate, annealed to 0 over the last `decay_steps`
/// steps (0: all the steps after the warm-up, as diffusers'
/// `get_{linear,cosine}_schedule_with_warmup`; otherwise a warmup-stable-decay
/// schedule, whose stable part a constant-rate run's checkpoints share).
pub fn scheduled_lr(
    base_lr: f64,
    step: u64,
    steps: u64,
    warmup: u64,
    schedule: LrSchedule,
    decay_steps: u64,
) -> f64 {
    if step < warmup {
        return warmup_lr(base_lr, step, warmup);
    }
    let start = if decay_steps == 0 {
        warmup
    } else {
        steps.saturating_sub(decay_steps).max(warmup)
    };
    if step < start {
        return base_lr;
    }
    let progress = ((step - start) as f64 / steps.saturating_sub(start).max(1) as f64).min(1.0);
    let factor = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => 1.0 - progress,
        LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    base_lr * factor
}

/// PixArt's `auto_scale_lr` rule 'sqrt': lr·√(effective batch / 256).
pub fn scale_lr(base_lr: f64, effective_batch: usize) -> f64 {
    base_lr * (effective_batch as f64 / 256.0).sqrt()
}

/// An exponential moving average of weights: `ema = rate·ema + (1 − rate)·p`.
pub struct Ema {
    pub rate: f64,
    pub weights: Vec<Tensor>,
}

impl Ema {
    pub fn new(vars: &[Var], rate: f64) -> Result<Ema> {
        Ok(Ema {
            rate,
            weights: vars
                .iter()
                .map(|v| v.as_tensor().detach().copy())
                .collect::<Result<_>>()?,
        })
    }

    pub fn update(&mut self, vars: &[Var]) -> Result<()> {
        self.update_at(vars, self.rate)
    }

    /// One update with an explicit rate (a warmed-up average).
    pub fn update_at(&mut self, vars: &[Var], rate: f64) -> Result<()> {
        for (e, v) in self.weights.iter_mut().zip(vars) {
            *e = ((&*e * rate)? + (v.as_tensor().detach() * (1.0 - rate))?)?;
        }
        Ok(())
    }

    /// The warmed-up rate of update `step` (0-based): min(rate, (1 + step)/(10 + step)),
    /// as diffusers' `EMAModel` with `use_ema_warmup` — an average over the steps
    /// so far rather than one dominated by the initial weights in a short run.
    pub fn warmup_rate(rate: f64, step: u64) -> f64 {
        rate.min((1.0 + step as f64) / (10.0 + step as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::{scheduled_lr, Ema, LrSchedule};

    #[test]
    fn schedules_warm_up_alike_then_anneal_to_zero() {
        use LrSchedule::*;
        for schedule in [Constant, Linear, Cosine] {
            assert_eq!(scheduled_lr(1.0, 5, 100, 10, schedule, 0), 0.5);
            assert_eq!(scheduled_lr(1.0, 10, 100, 10, schedule, 0), 1.0);
        }
        assert_eq!(scheduled_lr(1.0, 99, 100, 10, Constant, 0), 1.0);
        // diffusers: linear is (steps − step)/(steps − warmup) after the warm-up.
        assert!((scheduled_lr(1.0, 55, 100, 10, Linear, 0) - 0.5).abs() < 1e-12);
        assert!((scheduled_lr(1.0, 55, 100, 10, Cosine, 0) - 0.5).abs() < 1e-12);
        assert!((scheduled_lr(1.0, 99, 100, 10, Linear, 0) - 1.0 / 90.0).abs() < 1e-12);
        // Warmup-stable-decay: the base rate until the last 20 steps.
        assert_eq!(scheduled_lr(1.0, 79, 100, 10, Linear, 20), 1.0);
        assert_eq!(scheduled_lr(1.0, 80, 100, 10, Linear, 20), 1.0);
        assert!((scheduled_lr(1.0, 90, 100, 10, Linear, 20) - 0.5).abs() < 1e-12);
        assert!((scheduled_lr(1.0, 90, 100, 10, Cosine, 20) - 0.5).abs() < 1e-12);
        // A decay longer than the run starts after the warm-up.
        assert_eq!(
            scheduled_lr(1.0, 55, 100, 10, Linear, 500),
            scheduled_lr(1.0, 55, 100, 10, Linear, 0)
        );
    }

    #[test]
    fn ema_warmup_averages_the_steps_so_far_then_the_set_rate() {
        assert_eq!(Ema::warmup_rate(0.999, 0), 0.1);
        assert!((Ema::warmup_rate(0.999, 90) - 0.91).abs() < 1e-12);
        assert_eq!(Ema::warmup_rate(0.999, 1_000_000), 0.999);
    }
}
