//! diffusers' `DDIMScheduler` with η = 0 (deterministic), as `DDIMScheduler.from_config`
//! builds it from a pipeline's scheduler config.

use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_size: usize,
    clip: Option<f64>,
    index: usize,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let n = cfg.num_train_timesteps;
        let ts: Vec<usize> = match cfg.timestep_spacing.as_str() {
            // DDIM's linspace has `steps` points (DPM-Solver's has steps + 1).
            "linspace" => super::np_linspace_round(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round() as usize - 1)
                    .collect()
            }
            _ => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + cfg.steps_offset)
                    .collect()
            }
        };
        let alphas_cumprod = cfg.alphas_cumprod();
        Ddim {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            step_size: n / steps,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range),
            index: 0,
        }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn skip(&mut self, steps: usize) -> std::result::Result<(), String> {
        self.index = super::begin_index(steps, self.timesteps.len())?;
        Ok(())
    }

    /// DDPM's forward process at the current timestep.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(self.index) else {
            candle_core::bail!("DDIM: no timestep left to noise to");
        };
        let a = self.alphas_cumprod[t as usize];
        (x0 * f64::from(a.sqrt()))? + (noise * f64::from((1.0 - a).sqrt()))?
    }

    fn step(&mut self, eps: &Tensor, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(self.index) else {
            candle_core::bail!("DDIM: more steps than timesteps");
        };
        let t = t as usize;
        let eps = eps.to_dtype(sample.dtype())?;
        let a_t = self.alphas_cumprod[t];
        let a_prev = match t.checked_sub(self.step_size) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let mut x0 = ((sample - (&eps * f64::from((1.0 - a_t).sqrt()))?)? / f64::from(a_t.sqrt()))?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let direction = (eps * f64::from((1.0 - a_prev).sqrt()))?;
        self.index += 1;
        (x0 * f64::from(a_prev.sqrt()))? + direction
    }
}
