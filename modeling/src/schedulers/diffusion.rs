//! The tables of a discrete-time Gaussian diffusion (Ho et al.; Nichol & Dhariwal's
//! `gaussian_diffusion.py`) in float64, as the official code builds them with
//! numpy: shared by the IDDPM sampler and the trainer's loss, so the two cannot
//! drift apart.

/// PixArt-α's training noise schedule: linear betas from 1e-4 to 0.02 over 1000
/// steps (the official config and diffusers' scheduler configs).
pub const PIXART_BETA_START: f64 = 1e-4;
pub const PIXART_BETA_END: f64 = 0.02;
pub const PIXART_TRAIN_TIMESTEPS: usize = 1000;

/// numpy's `linspace(start, end, n, dtype=float64)`: the last value exactly `end`.
pub fn linear_betas(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n - 1).max(1) as f64;
    (0..n)
        .map(|i| {
            if i + 1 == n {
                end
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// ᾱ_t = Π_{s ≤ t} (1 − β_s).
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0, |acc, b| {
            *acc *= 1.0 - b;
            Some(*acc)
        })
        .collect()
}

/// What a reverse step from t needs, per timestep of a (possibly respaced)
/// schedule: x̂₀ from ε, the posterior q(x_{t−1} | x_t, x₀) and the two ends of the
/// learned variance range.
pub struct Posterior {
    /// √(1/ᾱ_t) and √(1/ᾱ_t − 1): x̂₀ = √(1/ᾱ)·x_t − √(1/ᾱ − 1)·ε.
    pub sqrt_recip_ac: Vec<f64>,
    pub sqrt_recipm1_ac: Vec<f64>,
    /// The posterior mean is coef1·x₀ + coef2·x_t.
    pub coef1: Vec<f64>,
    pub coef2: Vec<f64>,
    /// log of the posterior variance, its first entry (zero) replaced by the
    /// second: the lower end of the learned range.
    pub log_var_clipped: Vec<f64>,
    /// log β: the upper end of the learned range.
    pub log_betas: Vec<f64>,
}

impl Posterior {
    pub fn new(betas: &[f64]) -> Posterior {
        let n = betas.len();
        let ac = alphas_cumprod(betas);
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n.saturating_sub(1)].iter().copied())
            .collect();
        let post_var: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]))
            .collect();
        Posterior {
            sqrt_recip_ac: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_ac: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            coef1: (0..n)
                .map(|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            coef2: (0..n)
                .map(|i| (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
                .collect(),
            log_var_clipped: (0..n)
                .map(|i| {
                    if i == 0 && n > 1 {
                        post_var[1]
                    } else {
                        post_var[i]
                    }
                })
                .map(f64::ln)
                .collect(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixart_schedule_matches_numpy() {
        let betas = linear_betas(PIXART_BETA_START, PIXART_BETA_END, PIXART_TRAIN_TIMESTEPS);
        assert_eq!((betas[0], betas[999]), (1e-4, 0.02));
        let ac = alphas_cumprod(&betas);
        let direct: f64 = betas.iter().map(|b| 1.0 - b).product();
        assert!((ac[999] - direct).abs() < 1e-15);
        let p = Posterior::new(&betas);
        // The clipped log variance repeats the second entry first.
        assert_eq!(p.log_var_clipped[0], p.log_var_clipped[1]);
        assert_eq!(p.log_betas[999], 0.02f64.ln());
    }
}
