//! diffusers' `SASolverScheduler` (SA-Solver, Xue et al. 2023): a stochastic
//! Adams method on the diffusion SDE. Each step first corrects the sample the
//! last step predicted (Adams–Moulton, using the new model output), then predicts
//! the next one (Adams–Bashforth) from the last few outputs, adding noise scaled
//! by τ(t) (1 for 200 ≤ t ≤ 800, else 0: the ODE at both ends).
//!
//! PixArt-α's README builds it with `SASolverScheduler.from_config(pipeline
//! config, algorithm_type="data_prediction")`; that is what this sampler does for
//! any config but one saying `noise_prediction`. The step coefficients are
//! integrals of exponentials times Lagrange polynomials in λ = log(α/σ), in
//! closed form up to order 4.

use super::dpm_solver::{alpha_sigma_lambda, timesteps_for};
use super::{Sampler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct SaSolver {
    timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is σ at timestep 0.
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    predictor_order: usize,
    corrector_order: usize,
    lower_order_final: bool,
    /// Data (or noise) predictions of the last steps, newest last.
    outputs: Vec<Tensor>,
    /// What the last step predicted from, its noise and timestep, and the
    /// corrector order it chose, for this step's correction.
    last: Option<Last>,
    lower_order_nums: usize,
    predict_x0: bool,
    index: usize,
}

struct Last {
    sample: Tensor,
    noise: Tensor,
    timestep: usize,
    corrector_order: usize,
}

/// The stochasticity of diffusers' default `tau_func`.
fn tau(timestep: usize) -> f64 {
    if (200..=800).contains(&timestep) {
        1.0
    } else {
        0.0
    }
}

/// The highest predictor or corrector order the closed forms reach.
const MAX_ORDER: usize = 4;

impl SaSolver {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Self, String> {
        let (p, c) = (cfg.predictor_order, cfg.corrector_order);
        if !(1..=MAX_ORDER).contains(&p) || !(1..=MAX_ORDER).contains(&c) {
            return Err(format!(
                "SA-Solver orders must be 1..={MAX_ORDER}: predictor_order {p}, corrector_order {c}"
            ));
        }
        let alphas_cumprod = cfg.alphas_cumprod();
        let all_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let ts = timesteps_for(cfg, steps)?;
        let mut sigmas: Vec<f32> = ts.iter().map(|&t| all_sigmas[t]).collect();
        sigmas.push(all_sigmas[0]);
        Ok(SaSolver {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            sigmas,
            alphas_cumprod,
            predictor_order: p,
            corrector_order: c,
            lower_order_final: cfg.lower_order_final,
            outputs: Vec::new(),
            last: None,
            lower_order_nums: 0,
            predict_x0: cfg.algorithm_type != "noise_prediction",
            index: 0,
        })
    }

    fn lambda(&self, i: usize) -> f64 {
        f64::from(alpha_sigma_lambda(self.sigmas[i]).2)
    }

    /// ∫ₛᵉ w(λ)·ℓᵢ(λ) dλ for each Lagrange basis polynomial ℓᵢ on `nodes`, with
    /// w = exp((1+τ²)λ) (data prediction) or exp(−λ) (noise prediction).
    fn coefficients(&self, start: f64, end: f64, nodes: &[f64], tau: f64) -> Vec<f64> {
        let order = nodes.len();
        (0..order)
            .map(|i| {
                lagrange_basis(nodes, i)
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let power = order - 1 - j;
                        c * if self.predict_x0 {
                            exp_positive_moment(power, start, end, tau)
                        } else {
                            exp_negative_moment(power, start, end)
                        }
                    })
                    .sum()
            })
            .collect()
    }

    /// One stochastic Adams update from `x` at sigma index `from` to `to`, with
    /// `models` newest first and the Lagrange nodes at indices `to`, `to − 1`, …
    /// (predictor: `to = from + 1`, nodes from `from`; corrector: nodes from `to`).
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        x: &Tensor,
        models: &[&Tensor],
        noise: &Tensor,
        from: usize,
        to: usize,
        node_start: usize,
        tau: f64,
        correcting: bool,
    ) -> Result<Tensor> {
        let order = models.len();
        let (alpha_s0, sigma_s0, _) = alpha_sigma_lambda(self.sigmas[from]);
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[to]);
        let (alpha_s0, sigma_s0) = (f64::from(alpha_s0), f64::from(sigma_s0));
        let (alpha_t, sigma_t) = (f64::from(alpha_t), f64::from(sigma_t));
        let (lambda_s0, lambda_t) = (self.lambda(from), self.lambda(to));
        let h = lambda_t - lambda_s0;
        let nodes: Vec<f64> = (0..order).map(|k| self.lambda(node_start - k)).collect();
        let mut coef = self.coefficients(lambda_s0, lambda_t, &nodes, tau);
        let t2 = 1.0 + tau * tau;
        if self.predict_x0 && order == 2 {
            // diffusers' O(h³) adjustment of the second-order coefficients (as UniPC).
            let inner = h * t2 - 1.0 + (-t2 * h).exp();
            let extra = (t2 * lambda_t).exp()
                * if correcting {
                    h / 2.0 - inner / (t2 * t2 * h)
                } else {
                    (h * h / 2.0 - inner / (t2 * t2)) / (lambda_s0 - self.lambda(from - 1))
                };
            coef[0] += extra;
            coef[1] -= extra;
        }
        let (mut out, scale, noise_scale) = if self.predict_x0 {
            (
                (x * ((-tau * tau * h).exp() * sigma_t / sigma_s0))?,
                t2 * sigma_t * (-tau * tau * lambda_t).exp(),
                sigma_t * (1.0 - (-2.0 * tau * tau * h).exp()).sqrt(),
            )
        } else {
            (
                (x * (alpha_t / alpha_s0))?,
                -t2 * alpha_t,
                tau * sigma_t * ((2.0 * h).exp() - 1.0).sqrt(),
            )
        };
        for (model, c) in models.iter().zip(&coef) {
            out = (out + (*model * (scale * c))?)?;
        }
        out + (noise * noise_scale)?
    }
}

/// Coefficients of the Lagrange basis polynomial `i` on `nodes`, highest power first.
fn lagrange_basis(nodes: &[f64], i: usize) -> Vec<f64> {
    let mut poly = vec![1.0];
    let mut denominator = 1.0;
    for (k, &node) in nodes.iter().enumerate() {
        if k == i {
            continue;
        }
        // poly · (x − node)
        let mut next = vec![0.0; poly.len() + 1];
        for (j, &c) in poly.iter().enumerate() {
            next[j] += c;
            next[j + 1] -= c * node;
        }
        poly = next;
        denominator *= nodes[i] - node;
    }
    poly.iter().map(|c| c / denominator).collect()
}

/// ∫ₛᵉ exp((1+τ²)x)·xᵏ dx, k ≤ 3.
fn exp_positive_moment(k: usize, s: f64, e: f64, tau: f64) -> f64 {
    let c = 1.0 + tau * tau;
    let (ec, sc) = (c * e, c * s);
    let decay = (-(ec - sc)).exp();
    // P(y) with d/dy[exp(y)·P(y)] = exp(y)·yᵏ
    let p = |y: f64| match k {
        0 => 1.0,
        1 => y - 1.0,
        2 => y * y - 2.0 * y + 2.0,
        _ => y * y * y - 3.0 * y * y + 6.0 * y - 6.0,
    };
    ec.exp() * (p(ec) - p(sc) * decay) / c.powi(k as i32 + 1)
}

/// ∫ₛᵉ exp(−x)·xᵏ dx, k ≤ 3.
fn exp_negative_moment(k: usize, s: f64, e: f64) -> f64 {
    // Q(y) with d/dy[−exp(−y)·Q(y)] = exp(−y)·yᵏ
    let q = |y: f64| match k {
        0 => 1.0,
        1 => y + 1.0,
        2 => y * y + 2.0 * y + 2.0,
        _ => y * y * y + 3.0 * y * y + 6.0 * y + 6.0,
    };
    (-e).exp() * (q(s) * (e - s).exp() - q(e))
}

impl Sampler for SaSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Every step draws noise (scaled to zero where τ is 0).
    fn needs_noise(&self) -> bool {
        true
    }

    fn skip(&mut self, steps: usize) -> std::result::Result<(), String> {
        self.index = super::begin_index(steps, self.timesteps.len())?;
        Ok(())
    }

    /// DDPMScheduler's `add_noise`, which diffusers' SA-Solver shares.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let a = self.alphas_cumprod[self.timesteps[self.index] as usize];
        (x0 * f64::from(a.sqrt()))? + (noise * f64::from((1.0 - a).sqrt()))?
    }

    fn step(&mut self, eps: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let i = self.index;
        let n = self.timesteps.len();
        if i >= n {
            candle_core::bail!("SA-Solver: more steps than timesteps");
        }
        let Some(noise) = noise else {
            candle_core::bail!("SA-Solver: every step needs noise");
        };
        let eps = eps.to_dtype(sample.dtype())?;
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[i]);
        let model = if self.predict_x0 {
            ((sample - (&eps * f64::from(sigma)))? / f64::from(alpha))?
        } else {
            eps
        };

        // Correct what the last step predicted, with this step's model output.
        let mut sample = sample.clone();
        if let Some(last) = self.last.take().filter(|_| i > 0) {
            let order = last.corrector_order;
            let mut models = vec![&model];
            models.extend(self.outputs.iter().rev().take(order - 1));
            sample = self.update(
                &last.sample,
                &models,
                &last.noise,
                i - 1,
                i,
                i,
                tau(last.timestep),
                true,
            )?;
        }

        let history = self.predictor_order.max(self.corrector_order - 1);
        if self.outputs.len() == history {
            self.outputs.remove(0);
        }
        self.outputs.push(model);

        let (mut p, mut c) = (self.predictor_order, self.corrector_order);
        if self.lower_order_final {
            p = p.min(n - i);
            c = c.min(n - i + 1);
        }
        let p = p.min(self.lower_order_nums + 1);
        let c = c.min(self.lower_order_nums + 2);
        let timestep = self.timesteps[i] as usize;
        let models: Vec<&Tensor> = self.outputs.iter().rev().take(p).collect();
        let next = self.update(&sample, &models, noise, i, i + 1, i, tau(timestep), false)?;
        self.last = Some(Last {
            sample,
            noise: noise.to_dtype(next.dtype())?,
            timestep,
            corrector_order: c,
        });
        if self.lower_order_nums < history {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lagrange_basis_is_one_at_its_node_and_zero_at_the_others() {
        let nodes = [0.3, -1.2, 2.5, 0.9];
        for i in 0..nodes.len() {
            let poly = lagrange_basis(&nodes, i);
            for (k, &x) in nodes.iter().enumerate() {
                let value = poly.iter().fold(0.0, |acc, c| acc * x + c);
                let want = if k == i { 1.0 } else { 0.0 };
                assert!(
                    (value - want).abs() < 1e-12,
                    "basis {i} at node {k}: {value}"
                );
            }
        }
    }

    #[test]
    fn moments_match_numerical_integration() {
        let (s, e, tau) = (-1.3, -0.4, 1.0);
        for k in 0..4 {
            let n = 20_000;
            let dx = (e - s) / n as f64;
            let mid = |j: usize| s + (j as f64 + 0.5) * dx;
            let pos: f64 = (0..n)
                .map(|j| ((1.0 + tau * tau) * mid(j)).exp() * mid(j).powi(k as i32) * dx)
                .sum();
            let neg: f64 = (0..n)
                .map(|j| (-mid(j)).exp() * mid(j).powi(k as i32) * dx)
                .sum();
            assert!(
                (exp_positive_moment(k, s, e, tau) - pos).abs() < 1e-7,
                "k {k}"
            );
            assert!((exp_negative_moment(k, s, e) - neg).abs() < 1e-7, "k {k}");
        }
    }
}
