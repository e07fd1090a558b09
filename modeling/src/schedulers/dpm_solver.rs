//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`:
//! first- and second-order (midpoint or heun) multistep updates on the data
//! prediction, lower-order final steps, final sigma zero or sigma_min.
//! Scalars follow diffusers' float32 arithmetic.

use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct DpmSolverPP {
    timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is the final sigma.
    sigmas: Vec<f32>,
    order: usize,
    midpoint: bool,
    lower_order_final: bool,
    /// Data predictions of the last `order` steps, newest last.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    index: usize,
}

pub(super) fn timesteps_for(
    cfg: &SchedulerConfig,
    steps: usize,
) -> std::result::Result<Vec<usize>, String> {
    let n = cfg.num_train_timesteps;
    Ok(match cfg.timestep_spacing.as_str() {
        "linspace" => super::np_linspace_round(0.0, (n - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .collect(),
        "leading" => {
            let ratio = n / (steps + 1);
            (0..=steps)
                .rev()
                .take(steps)
                .map(|i| i * ratio + cfg.steps_offset)
                .collect()
        }
        "trailing" => {
            let ratio = n as f64 / steps as f64;
            (0..steps)
                .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as usize - 1)
                .collect()
        }
        other => return Err(format!("timestep_spacing {other:?} is not supported")),
    })
}

impl DpmSolverPP {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Self, String> {
        if cfg.algorithm_type != "dpmsolver++" {
            return Err(format!(
                "algorithm_type {:?} is not supported (dpmsolver++)",
                cfg.algorithm_type
            ));
        }
        if !(1..=2).contains(&cfg.solver_order) {
            return Err(format!(
                "solver_order {} is not supported (1 or 2)",
                cfg.solver_order
            ));
        }
        let ac = cfg.alphas_cumprod();
        let all_sigmas: Vec<f32> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let ts = timesteps_for(cfg, steps)?;
        let mut sigmas: Vec<f32> = ts.iter().map(|&t| all_sigmas[t]).collect();
        sigmas.push(match cfg.final_sigmas_type.as_deref() {
            Some("sigma_min") => all_sigmas[0],
            _ => 0.0,
        });
        Ok(DpmSolverPP {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            sigmas,
            order: cfg.solver_order,
            midpoint: cfg.solver_type != "heun",
            lower_order_final: cfg.lower_order_final,
            outputs: Vec::new(),
            lower_order_nums: 0,
            index: 0,
        })
    }
}

/// (alpha_t, sigma_t, lambda_t) of a sigma, as diffusers computes them in f32.
pub(super) fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl Sampler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn skip(&mut self, steps: usize) -> std::result::Result<(), String> {
        self.index = super::begin_index(steps, self.timesteps.len())?;
        Ok(())
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[self.index]);
        (x0 * f64::from(alpha))? + (noise * f64::from(sigma))?
    }

    fn step(&mut self, eps: &Tensor, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        let i = self.index;
        let n = self.timesteps.len();
        if i >= n {
            candle_core::bail!("DPM-Solver++: more steps than timesteps");
        }
        let eps = eps.to_dtype(sample.dtype())?;
        // Data prediction x0 = (x - σ_t ε) / α_t.
        let (alpha_s, sigma_s, _) = alpha_sigma_lambda(self.sigmas[i]);
        let x0 = ((sample - (eps * f64::from(sigma_s))?)? / f64::from(alpha_s))?;
        if self.outputs.len() == self.order {
            self.outputs.remove(0);
        }
        self.outputs.push(x0);

        let final_zero = self.sigmas[n] == 0.0;
        let lower_final = i == n - 1 && ((self.lower_order_final && n < 15) || final_zero);
        let first_order = self.order == 1 || self.lower_order_nums < 1 || lower_final;

        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0; // exp(-h) - 1
        let m0 = &self.outputs[self.outputs.len() - 1];
        let mut x = ((sample * f64::from(sigma_t / sigma_s0))? - (m0 * f64::from(alpha_t * em1))?)?;
        if !first_order {
            let m1 = &self.outputs[self.outputs.len() - 2];
            let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            let d1 = ((m0 - m1)? * f64::from(1.0 / r0))?;
            // midpoint: − ½·α_t(e^{−h} − 1)·D1; heun: + α_t((e^{−h} − 1)/h + 1)·D1
            let coef = if self.midpoint {
                -0.5 * (alpha_t * em1)
            } else {
                alpha_t * (em1 / h + 1.0)
            };
            x = (x + (d1 * f64::from(coef))?)?;
        }
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixart_timesteps() {
        // numpy rounds half to even: 6 steps give 832 and 166, not 833 and 167.
        let six = timesteps_for(&SchedulerConfig::default(), 6).unwrap();
        assert_eq!(six, [999, 832, 666, 500, 333, 166]);
        let ts = timesteps_for(&SchedulerConfig::default(), 20).unwrap();
        assert_eq!(&ts[..3], &[999, 949, 899]);
        assert_eq!(&ts[9..12], &[549, 500, 450]);
        assert_eq!(ts[19], 50);
    }
}
