//! Seeded Gaussian noise, bit-identical on every platform.
//!
//! ChaCha20 (a fixed, documented stream for a given key) gives 53-bit uniforms;
//! Box–Muller turns pairs into normals using `libm`'s pure-Rust `log`/`cos`/`sin`
//! (not the platform's libm, whose last bits differ between systems).

use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::sync::Arc;

/// Refuse shapes above 2^28 elements (1 GiB of f32): almost surely a typo.
const MAX_ELEMENTS: u64 = 1 << 28;

/// `n` samples of N(0, 1) from `seed`. The same seed always gives the same values,
/// and a longer draw starts with the values of a shorter one.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    normals(&mut ChaCha20Rng::from_seed(key), n)
}

/// `n` samples of N(0, 1) drawn from `rng` (Box–Muller on 53-bit uniforms).
pub fn normals(rng: &mut ChaCha20Rng, n: usize) -> Vec<f32> {
    let mut uniform = || (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = 1.0 - uniform(); // (0, 1]: log stays finite
        let u2 = uniform();
        let radius = (-2.0 * libm::log(u1)).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((radius * libm::cos(theta)) as f32);
        out.push((radius * libm::sin(theta)) as f32);
    }
    out.truncate(n);
    out
}

pub struct GaussianNoise {
    spec: NodeSpec,
}

impl GaussianNoise {
    fn new() -> GaussianNoise {
        GaussianNoise {
            spec: NodeSpec::new("noise.gaussian", 1)
                .category("latent")
                .describe(
                    "Standard normal noise of the given shape from a seed; identical across runs \
                     and platforms (ChaCha20 + Box–Muller).",
                )
                .input(
                    InputSpec::new("shape", PortType::list_of(PortType::Int))
                        .min(1.0)
                        .describe("Dimensions, e.g. [1, 4, 64, 64]."),
                )
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(
                    InputSpec::new(
                        "dtype",
                        PortType::Enum(vec!["f32".into(), "f16".into(), "bf16".into()]),
                    )
                    .default("f32"),
                )
                .output("tensor", PortType::Tensor, "The noise.")
                .estimate(noise_bytes),
        }
    }
}

/// The noise is drawn in f32 and then converted: both are held for a moment.
fn noise_bytes(known: &[Option<&Value>]) -> Option<u64> {
    let Some(Value::List(dims)) = known.first().copied().flatten() else {
        return None;
    };
    let count = dims
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(d.as_int()?.max(0) as u64))?;
    let extra = match known.get(2).copied().flatten() {
        Some(Value::String(t)) if t != "f32" => 2,
        _ => 0,
    };
    Some(count.saturating_mul(4 + extra))
}

impl Node for GaussianNoise {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let mut dims = Vec::new();
        for v in inputs.list("shape")? {
            let d = v.as_int().filter(|&d| d >= 1).ok_or_else(|| {
                NodeError::input("shape", "dimensions must be integers of at least 1")
            })?;
            dims.push(d as usize);
        }
        if dims.is_empty() {
            return Err(NodeError::input("shape", "give at least one dimension"));
        }
        let count = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let count = match count {
            Some(c) if c <= MAX_ELEMENTS => c as usize,
            _ => {
                return Err(NodeError::input(
                    "shape",
                    format!("{dims:?} is more than {MAX_ELEMENTS} elements"),
                ))
            }
        };
        let seed = inputs.int("seed")?;
        let seed =
            u64::try_from(seed).map_err(|_| NodeError::input("seed", "must be at least 0"))?;
        let dtype = match inputs.str("dtype")? {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            _ => DType::F32,
        };
        let t = Tensor::from_vec(gaussian(seed, count), dims, &Device::Cpu)?.to_dtype(dtype)?;
        Ok(Outputs::one("tensor", Value::Tensor(t)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(GaussianNoise::new())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_stable_and_standard_normal() {
        let long = gaussian(7, 200_001);
        assert_eq!(&gaussian(7, 5)[..], &long[..5]);
        assert_ne!(gaussian(8, 5), gaussian(7, 5));
        let n = long.len() as f64;
        let mean = long.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = long.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }
}
