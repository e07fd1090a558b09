//! One-step generation for distribution-matching distilled models such as
//! PixArt-α-DMD, as diffusers documents the call: the pipeline with a
//! `DDPMScheduler`, `timesteps=[400]`, one step and guidance 1, whose single step
//! keeps the scheduler's predicted x0 (`pred_original_sample`) instead of the
//! next sample.

use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

/// The start timestep of PixArt-α-DMD (its official demo and diffusers' docs).
pub const DMD_TIMESTEP: usize = 400;

pub struct OneStep {
    timesteps: Vec<f64>,
    alpha_cumprod: f32,
    clip: Option<f64>,
    done: bool,
}

impl OneStep {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<OneStep, String> {
        if steps != 1 {
            return Err(format!(
                "the dmd sampler takes exactly one step (steps: 1, guidance: 1), not {steps}"
            ));
        }
        let t = cfg.one_step_timestep;
        let alphas_cumprod = cfg.alphas_cumprod();
        let Some(&alpha_cumprod) = alphas_cumprod.get(t) else {
            return Err(format!(
                "one_step_timestep {t} is outside the {} training timesteps",
                alphas_cumprod.len()
            ));
        };
        Ok(OneStep {
            timesteps: vec![t as f64],
            alpha_cumprod,
            // DDPMScheduler clamps its x0 unless the config says otherwise.
            clip: cfg
                .clip_sample
                .unwrap_or(cfg.class_name == "DDPMScheduler")
                .then_some(cfg.clip_sample_range),
            done: false,
        })
    }
}

impl Sampler for OneStep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// x0 = (x − √(1−ᾱ)·ε) / √ᾱ, in float32 as DDPMScheduler computes it.
    fn step(&mut self, eps: &Tensor, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        if self.done {
            candle_core::bail!("the dmd sampler takes one step");
        }
        self.done = true;
        let a = self.alpha_cumprod;
        let eps = eps.to_dtype(sample.dtype())?;
        let x0 = ((sample - (eps * f64::from((1.0 - a).sqrt()))?)? / f64::from(a.sqrt()))?;
        match self.clip {
            Some(range) => x0.clamp(-range, range),
            None => Ok(x0),
        }
    }
}
