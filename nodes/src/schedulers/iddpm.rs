//! The official PixArt-α sampler: IDDPM ancestral sampling (Nichol & Dhariwal's
//! `gaussian_diffusion.py` with `respace.py`) on a respaced schedule, using the
//! transformer's learned variance (`learned_range`): the model's second half of
//! channels interpolates, in log space, between the posterior variance and β.
//! Schedule arithmetic in f64 like the original's numpy; coefficients applied in f32.

use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct Iddpm {
    /// Original-scale timesteps the model sees, in sampling order.
    timesteps: Vec<f64>,
    /// Per respaced step k (ascending): coefficients.
    recip_ac: Vec<f64>,
    recipm1_ac: Vec<f64>,
    coef1: Vec<f64>,
    coef2: Vec<f64>,
    min_log: Vec<f64>,
    max_log: Vec<f64>,
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
        let n = cfg.num_train_timesteps;
        // The original builds its betas with numpy's float64 linspace.
        let step = (cfg.beta_end - cfg.beta_start) / (n - 1).max(1) as f64;
        let base_betas: Vec<f64> = (0..n)
            .map(|i| {
                if i + 1 == n {
                    cfg.beta_end
                } else {
                    i as f64 * step + cfg.beta_start
                }
            })
            .collect();
        let mut base_ac = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &base_betas {
            acc *= 1.0 - b;
            base_ac.push(acc);
        }
        let use_steps = spaced(n, steps);
        let mut betas = Vec::with_capacity(use_steps.len());
        let mut last = 1.0;
        for &t in &use_steps {
            betas.push(1.0 - base_ac[t] / last);
            last = base_ac[t];
        }
        let k = betas.len();
        let mut ac = Vec::with_capacity(k);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            ac.push(acc);
        }
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..k - 1].iter().copied())
            .collect();
        let post_var: Vec<f64> = (0..k)
            .map(|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]))
            .collect();
        // log of the posterior variance, its first entry (zero) replaced by the second.
        let min_log: Vec<f64> = (0..k)
            .map(|i| {
                if i == 0 && k > 1 {
                    post_var[1]
                } else {
                    post_var[i]
                }
            })
            .map(f64::ln)
            .collect();
        Iddpm {
            timesteps: use_steps.iter().rev().map(|&t| t as f64).collect(),
            recip_ac: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            recipm1_ac: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            coef1: (0..k)
                .map(|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            coef2: (0..k)
                .map(|i| (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
                .collect(),
            min_log,
            max_log: betas.iter().map(|b| b.ln()).collect(),
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
        let x0 = ((x * f(self.recip_ac[k]))? - (eps * f(self.recipm1_ac[k]))?)?;
        let mean = ((x0 * f(self.coef1[k]))? + (x * f(self.coef2[k]))?)?;
        self.index += 1;
        if k == 0 {
            return Ok(mean);
        }
        let Some(noise) = noise else {
            candle_core::bail!("IDDPM: this step needs noise");
        };
        // log σ² = frac·log β + (1 − frac)·log σ²_posterior, frac = (v + 1)/2
        let frac = ((v + 1.0)? * 0.5)?;
        let log_var = ((&frac * f(self.max_log[k]))? + ((1.0 - frac)? * f(self.min_log[k]))?)?;
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
