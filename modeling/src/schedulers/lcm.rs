//! diffusers' `LCMScheduler`: the sampler of latent consistency models such as
//! PixArt-LCM (4 steps, no guidance). Its timesteps are a few of the
//! distillation's `original_inference_steps` evenly spaced ones; each step
//! predicts x0, mixes it with the sample by the consistency boundary condition
//! (c_skip, c_out), and noises the result to the next timestep.

use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

/// The data standard deviation the boundary condition assumes (diffusers' 0.5).
const SIGMA_DATA: f32 = 0.5;

pub struct Lcm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    timestep_scaling: f32,
    clip: Option<f64>,
    index: usize,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Lcm, String> {
        let n = cfg.num_train_timesteps;
        let original = cfg.original_inference_steps;
        if original == 0 || original > n {
            return Err(format!(
                "original_inference_steps {original} must be 1..={n} (num_train_timesteps)"
            ));
        }
        if steps > original {
            return Err(format!(
                "LCM takes at most original_inference_steps = {original} steps, not {steps}"
            ));
        }
        // The distillation's schedule, newest first: k-1, 2k-1, … reversed.
        let k = n / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        // `floor(np.linspace(0, len, steps, endpoint=False))`.
        let timesteps = (0..steps)
            .map(|i| {
                let at = (i as f64 * origin.len() as f64 / steps as f64).floor() as usize;
                origin[at.min(origin.len() - 1)] as f64
            })
            .collect();
        Ok(Lcm {
            timesteps,
            alphas_cumprod: cfg.alphas_cumprod(),
            timestep_scaling: cfg.timestep_scaling as f32,
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then_some(cfg.clip_sample_range),
            index: 0,
        })
    }

    /// `(c_skip, c_out)` at timestep `t`, in float32 as torch computes them.
    fn boundary(&self, t: usize) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let d = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / d, scaled / d.sqrt())
    }
}

impl Sampler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Every step but the last noises its estimate to the next timestep.
    fn needs_noise(&self) -> bool {
        self.index + 1 < self.timesteps.len()
    }

    fn step(&mut self, eps: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(self.index) else {
            candle_core::bail!("LCM: more steps than timesteps");
        };
        let t = t as usize;
        let eps = eps.to_dtype(sample.dtype())?;
        let a_t = self.alphas_cumprod[t];
        let mut x0 = ((sample - (&eps * f64::from((1.0 - a_t).sqrt()))?)? / f64::from(a_t.sqrt()))?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let (c_skip, c_out) = self.boundary(t);
        let denoised = ((x0 * f64::from(c_out))? + (sample * f64::from(c_skip))?)?;
        let next = match self.timesteps.get(self.index + 1) {
            Some(&prev) => {
                let Some(noise) = noise else {
                    candle_core::bail!("LCM: every step but the last needs noise");
                };
                let a_prev = self.alphas_cumprod[prev as usize];
                ((denoised * f64::from(a_prev.sqrt()))?
                    + (noise.to_dtype(sample.dtype())? * f64::from((1.0 - a_prev).sqrt()))?)?
            }
            None => denoised,
        };
        self.index += 1;
        Ok(next)
    }
}
