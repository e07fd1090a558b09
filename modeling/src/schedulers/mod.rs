//! Samplers for PixArt-α: DPM-Solver++ (the pipeline's default), DDIM, the
//! official IDDPM ancestral sampler that uses the learned variance, and LCM
//! (PixArt-LCM's few-step sampler), SA-Solver (stochastic Adams predictor and
//! corrector), and the one-step call of distilled models
//! (PixArt-α-DMD).
//!
//! A [`SchedulerConfig`] comes from `scheduler_config.json` (or a scheduler node);
//! [`SchedulerConfig::start`] gives a [`Sampler`] holding the state of one sampling
//! run.

mod ddim;
pub mod diffusion;
mod dpm_solver;
mod iddpm;
mod lcm;
mod one_step;
mod sa_solver;

pub use ddim::Ddim;
pub use dpm_solver::DpmSolverPP;
pub use iddpm::Iddpm;
pub use lcm::Lcm;
pub use one_step::{OneStep, DMD_TIMESTEP};
pub use sa_solver::SaSolver;

use candle_core::{Result, Tensor};
use serde::Deserialize;

/// The training noise schedule and the solver settings, as diffusers' configs
/// write them (unknown keys are ignored, missing ones take diffusers' defaults).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default = "default_class")]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default = "default_order")]
    pub solver_order: usize,
    #[serde(default = "default_algorithm")]
    pub algorithm_type: String,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default)]
    pub variance_type: Option<String>,
    /// DDIM and LCM: clamp the predicted x0 (unset: DDIM's default on, LCM's off).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// LCM: the distillation's step count the few steps are taken from.
    #[serde(default = "default_original_steps")]
    pub original_inference_steps: usize,
    /// LCM: how timesteps scale into its boundary condition.
    #[serde(default = "default_timestep_scaling")]
    pub timestep_scaling: f64,
    /// SA-Solver: the predictor's order (its multistep history).
    #[serde(default = "default_order")]
    pub predictor_order: usize,
    /// SA-Solver: the corrector's order.
    #[serde(default = "default_order")]
    pub corrector_order: usize,
    /// dmd: the one step's timestep (not a diffusers key: diffusers takes it as the
    /// call's `timesteps=[400]`; `scheduler.select` sets it).
    #[serde(default = "default_one_step_timestep")]
    pub one_step_timestep: usize,
}

fn default_one_step_timestep() -> usize {
    DMD_TIMESTEP
}

fn default_original_steps() -> usize {
    50
}
fn default_timestep_scaling() -> f64 {
    10.0
}

fn default_class() -> String {
    "DPMSolverMultistepScheduler".into()
}
fn default_train_steps() -> usize {
    diffusion::PIXART_TRAIN_TIMESTEPS
}
fn default_beta_start() -> f64 {
    diffusion::PIXART_BETA_START
}
fn default_beta_end() -> f64 {
    diffusion::PIXART_BETA_END
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_order() -> usize {
    2
}
fn default_algorithm() -> String {
    "dpmsolver++".into()
}
fn default_solver_type() -> String {
    "midpoint".into()
}
fn default_spacing() -> String {
    "linspace".into()
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// The samplers a workflow can name.
pub const SAMPLER_NAMES: &[&str] = &["dpm_solver++", "ddim", "iddpm", "lcm", "sa_solver", "dmd"];

impl SchedulerConfig {
    /// The sampler a diffusers config names by its class.
    pub fn default_sampler(&self) -> &'static str {
        match self.class_name.as_str() {
            "DDIMScheduler" => "ddim",
            "LCMScheduler" => "lcm",
            "SASolverScheduler" => "sa_solver",
            // PixArt's DDPMScheduler folder is PixArt-α-DMD's, made for one step.
            "DDPMScheduler" => "dmd",
            _ => "dpm_solver++",
        }
    }

    /// Checks what this implementation supports, with a clear message otherwise.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.beta_schedule != "linear" && self.beta_schedule != "scaled_linear" {
            return Err(format!(
                "beta_schedule {:?} is not supported (linear, scaled_linear)",
                self.beta_schedule
            ));
        }
        if self.prediction_type != "epsilon" {
            return Err(format!(
                "prediction_type {:?} is not supported (epsilon)",
                self.prediction_type
            ));
        }
        if self.use_karras_sigmas || self.thresholding || self.euler_at_final || self.use_lu_lambdas
        {
            return Err(
                "use_karras_sigmas, thresholding, euler_at_final and use_lu_lambdas are not supported".into(),
            );
        }
        // DDPMScheduler's variance matters only to its ancestral steps, which the
        // one-step call does not take.
        if let Some(v) = self
            .variance_type
            .as_ref()
            .filter(|_| self.class_name != "DDPMScheduler")
        {
            return Err(format!(
                "variance_type {v:?} in the scheduler config is not supported (the iddpm sampler uses the learned variance)"
            ));
        }
        Ok(())
    }

    /// diffusers' `betas` (float32) and their cumulative product (accumulated in
    /// double, stored in float32, as torch.cumprod on the CPU does).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "scaled_linear" => linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            _ => linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
        };
        let mut acc = 1f64;
        betas
            .iter()
            .map(|b| {
                acc *= f64::from(1.0 - b);
                acc as f32
            })
            .collect()
    }

    pub fn start(
        &self,
        sampler: &str,
        steps: usize,
    ) -> std::result::Result<Box<dyn Sampler>, String> {
        self.check()?;
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(format!("steps must be 1..={}", self.num_train_timesteps));
        }
        Ok(match sampler {
            "dpm_solver++" => Box::new(DpmSolverPP::new(self, steps)?),
            "ddim" => Box::new(Ddim::new(self, steps)),
            "iddpm" if self.beta_schedule != "linear" => {
                return Err("the IDDPM sampler uses the official linear schedule only".into())
            }
            "iddpm" => Box::new(Iddpm::new(self, steps)),
            "lcm" => Box::new(Lcm::new(self, steps)?),
            "sa_solver" => Box::new(SaSolver::new(self, steps)?),
            "dmd" => Box::new(OneStep::new(self, steps)?),
            other => {
                return Err(format!(
                    "unknown sampler {other:?}; one of {}",
                    SAMPLER_NAMES.join(", ")
                ))
            }
        })
    }
}

/// `np.linspace(start, stop, n).round()` as integers: `i·step + start`, the last
/// point exactly `stop`, rounded half to even as numpy does.
pub(crate) fn np_linspace_round(start: f64, stop: f64, n: usize) -> Vec<usize> {
    let step = if n > 1 {
        (stop - start) / (n - 1) as f64
    } else {
        0.0
    };
    (0..n)
        .map(|i| {
            if i + 1 == n && n > 1 {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .map(|x| x.round_ties_even().max(0.0) as usize)
        .collect()
}

/// The step index a sampler of `len` steps starts at after skipping `steps`
/// (img2img), or why it cannot: at least one step must remain.
pub(crate) fn begin_index(steps: usize, len: usize) -> std::result::Result<usize, String> {
    if steps >= len {
        return Err(format!("cannot skip {steps} of {len} steps"));
    }
    Ok(steps)
}

/// torch.linspace in float32: from both ends towards the middle.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// One sampling run's state.
pub trait Sampler: Send {
    /// The model's timesteps, in sampling order.
    fn timesteps(&self) -> &[f64];

    /// What the initial noise is multiplied by.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Whether `step` wants the variance half of a learned-σ output (8 channels)
    /// rather than only ε.
    fn uses_variance(&self) -> bool {
        false
    }

    /// Whether the next step draws fresh noise (ancestral samplers).
    fn needs_noise(&self) -> bool {
        false
    }

    /// Starts `steps` timesteps into the schedule, with no solver history (img2img:
    /// diffusers' `set_begin_index`). Samplers that cannot say so.
    fn skip(&mut self, steps: usize) -> std::result::Result<(), String> {
        let _ = steps;
        Err(
            "this sampler cannot start part-way (img2img and inpainting need dpm_solver++, ddim or sa_solver)"
                .into(),
        )
    }

    /// `x0` noised to the current timestep, as diffusers' `add_noise` at the
    /// scheduler's step index.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let _ = (x0, noise);
        candle_core::bail!("this sampler cannot noise a sample to its timestep")
    }

    /// Advances one step: `model_output` at `timesteps()[i]` for the current `sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_endpoints() {
        let v = linspace_f32(1e-4, 0.02, 1000);
        assert_eq!(v[0], 1e-4f32);
        assert_eq!(v[999], 0.02f32);
        let ac = SchedulerConfig::default().alphas_cumprod();
        assert!((ac[999] - 4.035e-5).abs() < 1e-7, "{}", ac[999]);
    }
}
