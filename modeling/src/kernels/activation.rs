//! GELU (tanh approximation) and the exponential it is built on. candle's CPU
//! backend computes tanh through scalar libm calls; these are written so the
//! compiler vectorises them. Same formulas, f32 rounding-level differences.

use super::{contiguous_f32, last_dim, par_rows, use_kernels};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// e^x for f32 with ~1 ulp-level relative error: Cody–Waite reduction to
/// r ∈ [−ln2/2, ln2/2], a degree-6 Taylor polynomial, and the exponent by bits.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5·2^23: plain float adds, which
    // vectorise without SSE4.1 (`round` becomes a libm call per element there).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let k = shifted - MAGIC;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^k from the bits of `shifted`, whose low mantissa bits hold k: the shift
    // drops everything above k + 127, which lands in the exponent field. (A
    // `k as i32` would be scalar code: Rust's saturating float-to-int cast.)
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// GELU, tanh approximation: ½x(1 + tanh z) = x·σ(2z), z = √(2/π)(x + 0.044715x³).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let z = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * z))
}

fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_tanh(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_slice(src, dst)
}

/// The same loop in 16 lanes: twice the AVX2 build's work per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_slice_avx512(src: &[f32], dst: &mut [f32]) {
    gelu_slice(src, dst)
}

fn gelu_dispatch(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { gelu_slice_avx512(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { gelu_slice_avx2(src, dst) };
    }
    gelu_slice(src, dst)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!(
                "gelu-tanh-fast: contiguous f32 only, got {:?}",
                storage.dtype()
            );
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        // Two halves on two threads when it is worth it.
        const CHUNK: usize = 1 << 16;
        if src.len() >= 2 * CHUNK {
            std::thread::scope(|s| {
                let threads = candle_core::utils::get_num_threads().max(1);
                let per = src.len().div_ceil(threads);
                for (src, dst) in src.chunks(per).zip(out.chunks_mut(per)) {
                    s.spawn(move || gelu_dispatch(src, dst));
                }
            });
        } else {
            gelu_dispatch(src, &mut out);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// GELU (tanh approximation), as PyTorch's `gelu(approximate="tanh")`.
pub fn gelu_inference(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluTanh)
    } else {
        x.gelu()
    }
}

// ---------------------------------------------------------------- GELU

/// d/dx ½x(1 + tanh z) with z = c(x + a·x³): s + 2x·s(1 − s)·c(1 + 3a·x²), s = σ(2z).
#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    const A: f32 = 0.044_715;
    let z = C * (x + A * x * x * x);
    let s = 1.0 / (1.0 + exp_f32(-2.0 * z));
    s + 2.0 * x * s * (1.0 - s) * C * (1.0 + 3.0 * A * x * x)
}

#[inline(always)]
fn gelu_grad_slice(x: &[f32], g: &[f32], dst: &mut [f32]) {
    for ((d, &v), &gv) in dst.iter_mut().zip(x).zip(g) {
        *d = gv * gelu_tanh_grad(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_grad_avx2(x: &[f32], g: &[f32], dst: &mut [f32]) {
    gelu_grad_slice(x, g, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_grad_avx512(x: &[f32], g: &[f32], dst: &mut [f32]) {
    gelu_grad_slice(x, g, dst)
}

fn gelu_grad_dispatch(x: &[f32], g: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { gelu_grad_avx512(x, g, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { gelu_grad_avx2(x, g, dst) };
    }
    gelu_grad_slice(x, g, dst)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s, l)?;
        let w = last_dim(l);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            gelu_dispatch(&x[rows.start * w..rows.end * w], dst)
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// (x, dy) → dy·gelu'(x)
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s1, l1)?;
        let g = contiguous_f32(self.name(), s2, l2)?;
        let w = last_dim(l1);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            let r = rows.start * w..rows.end * w;
            gelu_grad_dispatch(&x[r.clone()], &g[r], dst)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU (tanh approximation) with gradients.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if use_kernels(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_tanh_formula() {
        for i in -2000..2000 {
            let x = i as f32 / 100.0;
            let want = 0.5
                * x as f64
                * (1.0 + (0.797_884_560_8 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            let got = gelu_tanh(x) as f64;
            assert!(
                (got - want).abs() <= 2e-6 * want.abs().max(1e-3),
                "x={x}: {got} vs {want}"
            );
        }
        for x in [-100.0f32, -30.0, 0.0, 30.0, 100.0] {
            assert!(gelu_tanh(x).is_finite());
        }
    }
}
