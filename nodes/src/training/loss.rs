//! The official PixArt-α training objective (IDDPM with learned-range variance):
//! MSE on ε plus the variational bound on the variance half — the KL between the
//! true and the predicted posterior for t > 0, the discretized Gaussian decoder NLL
//! at t = 0 — with the mean frozen in the bound (the ε half learns from the MSE
//! only). Linear betas, 1000 steps, no respacing. Differentiable candle ops only.

use candle_core::{Result, Tensor, D};
use pixart_models::schedulers::diffusion::{
    alphas_cumprod, linear_betas, Posterior, PIXART_BETA_END, PIXART_BETA_START,
    PIXART_TRAIN_TIMESTEPS,
};

/// Noise-schedule tables (float64, as the original builds them with numpy).
pub struct Diffusion {
    pub num_timesteps: usize,
    sqrt_ac: Vec<f64>,
    sqrt_1m_ac: Vec<f64>,
    posterior: Posterior,
}

/// The loss terms, one value per sample.
pub struct LossTerms {
    pub mse: Tensor,
    pub vb: Tensor,
    pub loss: Tensor,
}

impl Diffusion {
    /// PixArt's schedule: linear betas 1e-4 … 0.02 over 1000 steps.
    pub fn pixart() -> Diffusion {
        Diffusion::linear(PIXART_BETA_START, PIXART_BETA_END, PIXART_TRAIN_TIMESTEPS)
    }

    /// Linear betas `beta_start..=beta_end` over `n` steps.
    pub fn linear(beta_start: f64, beta_end: f64, n: usize) -> Diffusion {
        let betas = linear_betas(beta_start, beta_end, n);
        let ac = alphas_cumprod(&betas);
        Diffusion {
            num_timesteps: n,
            sqrt_ac: ac.iter().map(|a| a.sqrt()).collect(),
            sqrt_1m_ac: ac.iter().map(|a| (1.0 - a).sqrt()).collect(),
            posterior: Posterior::new(&betas),
        }
    }

    /// A per-sample coefficient `[B, 1, 1, 1]`, extracted as float32 like the original.
    fn coef(table: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
        let values: Vec<f32> = t.iter().map(|&i| table[i] as f32).collect();
        Tensor::from_vec(values, (t.len(), 1, 1, 1), like.device())?.to_dtype(like.dtype())
    }

    /// Min-SNR-γ loss weights for ε-prediction (Hang et al., 2023), one per
    /// sample: min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t). They take
    /// weight off the nearly clean timesteps, whose ε errors are large but decide
    /// little, so that the steps which lay out the image learn sooner.
    pub fn min_snr_weights(&self, t: &[usize], gamma: f64) -> Vec<f32> {
        t.iter()
            .map(|&i| {
                let snr = (self.sqrt_ac[i] / self.sqrt_1m_ac[i]).powi(2);
                (snr.min(gamma) / snr) as f32
            })
            .collect()
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε
    pub fn q_sample(&self, x0: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        Self::coef(&self.sqrt_ac, t, x0)?.broadcast_mul(x0)?
            + Self::coef(&self.sqrt_1m_ac, t, x0)?.broadcast_mul(noise)?
    }

    /// The loss for `model_output` = [ε̂, v] (2C channels) at x_t = q_sample(x₀, t, noise).
    pub fn loss(
        &self,
        x0: &Tensor,
        t: &[usize],
        noise: &Tensor,
        model_output: &Tensor,
    ) -> Result<LossTerms> {
        let (mse, kl, nll) = self.terms(x0, t, noise, model_output)?;
        let at_zero: Vec<u8> = t.iter().map(|&i| u8::from(i == 0)).collect();
        let at_zero = Tensor::from_vec(at_zero, t.len(), x0.device())?;
        let vb = at_zero.where_cond(&nll, &kl)?;
        let loss = (&mse + &vb)?;
        Ok(LossTerms { mse, vb, loss })
    }

    /// Per sample: the MSE on ε, the KL term and the decoder NLL (both in bits),
    /// whatever t is.
    pub fn terms(
        &self,
        x0: &Tensor,
        t: &[usize],
        noise: &Tensor,
        model_output: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if let Some(&bad) = t.iter().find(|&&i| i >= self.num_timesteps) {
            candle_core::bail!("timestep {bad} is outside 0..{}", self.num_timesteps);
        }
        let c = x0.dim(1)?;
        let x_t = self.q_sample(x0, t, noise)?;
        let eps = model_output.narrow(1, 0, c)?;
        let v = model_output.narrow(1, c, c)?;
        let mse = mean_flat(&(noise - &eps)?.sqr()?)?;

        // The bound sees the mean as a constant: its gradients reach only v.
        let eps_frozen = eps.detach();
        let k = |table: &[f64]| Self::coef(table, t, x0);
        let true_mean = (k(&self.posterior.coef1)?.broadcast_mul(x0)?
            + k(&self.posterior.coef2)?.broadcast_mul(&x_t)?)?;
        let true_log_var = k(&self.posterior.log_var_clipped)?;
        let pred_x0 = (k(&self.posterior.sqrt_recip_ac)?.broadcast_mul(&x_t)?
            - k(&self.posterior.sqrt_recipm1_ac)?.broadcast_mul(&eps_frozen)?)?;
        let model_mean = (k(&self.posterior.coef1)?.broadcast_mul(&pred_x0)?
            + k(&self.posterior.coef2)?.broadcast_mul(&x_t)?)?;
        // log σ² = frac·log β + (1 − frac)·log β̃, frac = (v + 1)/2
        let frac = ((v + 1.0)? * 0.5)?;
        let model_log_var = (frac.broadcast_mul(&k(&self.posterior.log_betas)?)?
            + (1.0 - &frac)?.broadcast_mul(&true_log_var)?)?;

        let ln2 = std::f64::consts::LN_2;
        let kl = (mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &model_mean,
            &model_log_var,
        )?)? / ln2)?;
        let nll = (mean_flat(&discretized_gaussian_nll(
            x0,
            &model_mean,
            &(&model_log_var * 0.5)?,
        )?)? / ln2)?;
        Ok((mse, kl, nll))
    }
}

/// Mean over all but the batch dimension.
fn mean_flat(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(D::Minus1)
}

/// KL(N(m1, e^lv1) ‖ N(m2, e^lv2)), element-wise.
fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let lv1 = lv1.broadcast_as(m1.shape())?;
    let d = ((lv1.broadcast_sub(lv2)?.exp()?
        + (m1 - m2)?.sqr()?.broadcast_mul(&lv2.neg()?.exp()?)?)?
        - 1.0)?;
    (lv2.broadcast_sub(&lv1)? + d)? * 0.5
}

/// 0.5·(1 + tanh(√(2/π)(x + 0.044715x³))), the original's normal CDF.
fn approx_cdf(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// −log p(x) of x under N(mean, e^{2·log_scale}) discretized into 1/127.5-wide bins
/// on [−1, 1], with the edge bins open.
fn discretized_gaussian_nll(x: &Tensor, mean: &Tensor, log_scale: &Tensor) -> Result<Tensor> {
    let centred = (x - mean)?;
    let inv_std = log_scale.neg()?.exp()?;
    let plus = approx_cdf(&(&centred + 1.0 / 255.0)?.broadcast_mul(&inv_std)?)?;
    let minus = approx_cdf(&(&centred - 1.0 / 255.0)?.broadcast_mul(&inv_std)?)?;
    let log_plus = plus.clamp(1e-12, f64::MAX)?.log()?;
    let log_one_minus = (1.0 - &minus)?.clamp(1e-12, f64::MAX)?.log()?;
    let log_delta = (&plus - &minus)?.clamp(1e-12, f64::MAX)?.log()?;
    let low = x.lt(-0.999)?;
    let high = x.gt(0.999)?;
    let log_probs = low.where_cond(&log_plus, &high.where_cond(&log_one_minus, &log_delta)?)?;
    log_probs.neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// min(SNR, γ)/SNR from ᾱ computed afresh: 1 where the image is mostly
    /// noise, γ/SNR where it is nearly clean, never above 1.
    #[test]
    fn min_snr_weights_follow_the_schedule() {
        let d = Diffusion::pixart();
        let alpha_bar = |t: usize| -> f64 {
            (0..=t)
                .map(|i| 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0))
                .product()
        };
        let ts = [0usize, 10, 100, 250, 500, 999];
        for gamma in [1.0, 5.0] {
            let w = d.min_snr_weights(&ts, gamma);
            for (&t, &w) in ts.iter().zip(&w) {
                let a = alpha_bar(t);
                let snr = a / (1.0 - a);
                let want = snr.min(gamma) / snr;
                assert!(
                    (w as f64 - want).abs() < 1e-5 * want.max(1e-3),
                    "t {t} γ {gamma}: {w} vs {want}"
                );
                assert!(w <= 1.0);
            }
            assert!(w[0] < 0.01, "nearly clean steps weigh little: {}", w[0]);
            assert_eq!(w[5], 1.0);
        }
    }
}
