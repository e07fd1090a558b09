//! The official PixArt-α sampler: IDDPM ancestral sampling (Nichol & Dhariwal's
//! `gaussian_diffusion.py` with `respace.py`) on a respaced schedule, using the
//! transformer's learned variance (`learned_range`): the model's second half of
//! channels interpolates, in log space, between the posterior variance and β.
//! Schedule arithmetic in f64 like the original's numpy; coefficients applied in f32.

use super::diffusion::{alphas_cumprod, linear_betas, Posterior};
use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct Iddpm {
    /// Original-scale timesteps the model sees, in sampling order.
    timesteps: Vec<f64>,
    /// Per respaced step k (ascending): coefficients.
    tables: Posterior,
    index: usize,
}

/// `space_timesteps(num_timesteps, [steps])`: `steps` indices evenly spread over
/// the whole range, both ends included, rounded.
fn spaced(num_timesteps: usize, steps: usize) -> Vec<usize> {
    if steps == 1 {
        return vec![0];
    }
    // As the original: a running float index, Python's round-half-to-even.
    let stride = (num_timesteps - 1) as f64 / (steps - 1) as f64;
    let mut index = 0.0f64;
    let mut taken = Vec::with_capacity(steps);
    for _ in 0..steps {
        taken.push(index.round_ties_even() as usize);
        index += stride;
    }
    taken.dedup();
    taken
}

impl Iddpm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let base_ac = alphas_cumprod(&linear_betas(
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
        ));
        let use_steps = spaced(cfg.num_train_timesteps, steps);
        let mut betas = Vec::with_capacity(use_steps.len());
        let mut last = 1.0;
        for &t in &use_steps {
            betas.push(1.0 - base_ac[t] / last);
            last = base_ac[t];
        }
        Iddpm {
            timesteps: use_steps.iter().rev().map(|&t| t as f64).collect(),
            tables: Posterior::new(&betas),
            index: 0,
        }
    }

    /// The respaced index of the current step (counting down to 0).
    fn k(&self) -> usize {
        self.timesteps.len() - 1 - self.index
    }
}

impl Sampler for Iddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn uses_variance(&self) -> bool {
        true
    }

    fn needs_noise(&self) -> bool {
        self.index < self.timesteps.len() && self.k() != 0
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.index >= self.timesteps.len() {
            candle_core::bail!("IDDPM: more steps than timesteps");
        }
        let k = self.k();
        let c = x.dim(1)?;
        if model_output.dim(1)? != 2 * c {
            candle_core::bail!(
                "IDDPM needs a learned-variance output with {} channels, got {}",
                2 * c,
                model_output.dim(1)?
            );
        }
        let out = model_output.to_dtype(x.dtype())?;
        let eps = out.narrow(1, 0, c)?;
        let v = out.narrow(1, c, c)?;
        // The original extracts each coefficient as a float32 tensor.
        let f = |a: f64| f64::from(a as f32);
        let p = &self.tables;
        let x0 = ((x * f(p.sqrt_recip_ac[k]))? - (eps * f(p.sqrt_recipm1_ac[k]))?)?;
        let mean = ((x0 * f(p.coef1[k]))? + (x * f(p.coef2[k]))?)?;
        self.index += 1;
        if k == 0 {
            return Ok(mean);
        }
        let Some(noise) = noise else {
            candle_core::bail!("IDDPM: this step needs noise");
        };
        // log σ² = frac·log β + (1 − frac)·log σ²_posterior, frac = (v + 1)/2
        let frac = ((v + 1.0)? * 0.5)?;
        let log_var = ((&frac * f(p.log_betas[k]))? + ((1.0 - frac)? * f(p.log_var_clipped[k]))?)?;
        mean + ((log_var * 0.5)?.exp()? * noise.to_dtype(x.dtype())?)?
    }
}

#[cfg(test)]
mod tests {
    use super::spaced;

    #[test]
    fn respacing_spreads_over_the_whole_range() {
        let s = spaced(1000, 100);
        assert_eq!(s.len(), 100);
        assert_eq!((s[0], s[1], s[2], s[99]), (0, 10, 20, 999));
    }
}
