//! Softmax over the last dimension (with its backward pass), and the row-wise
//! softmax with an additive bias that attention runs on its score blocks.

use super::activation::exp_f32;
use super::{contiguous_f32, last_dim, par_rows, use_kernels};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s, l)?;
        let w = last_dim(l);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            dst.copy_from_slice(&x[rows.start * w..rows.end * w]);
            softmax_rows_dispatch(dst, w, None);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// (y, dy) → dx = y·(dy − Σ dy·y)
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(self.name(), s1, l1)?;
        let g = contiguous_f32(self.name(), s2, l2)?;
        let w = last_dim(l1);
        let out = par_rows(y.len() / w, w, |rows, dst| {
            for (i, d) in rows.zip(dst.chunks_mut(w)) {
                let (yr, gr) = (&y[i * w..(i + 1) * w], &g[i * w..(i + 1) * w]);
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if use_kernels(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Row-wise softmax of `p` (rows of `width`) after adding `bias` to each row.
/// Max and sum in sixteen lanes so the compiler vectorises them (one AVX-512
/// register, two AVX2 ones). With `inverse`,
/// the rows are left as exp(s − max) and each row's 1/Σ goes into `inverse`
/// instead (the caller scales something smaller than the row: attention's
/// output row), saving a pass over the scores.
#[inline(always)]
fn softmax_rows(p: &mut [f32], width: usize, bias: Option<&[f32]>, inverse: Option<&mut [f32]>) {
    let mut inverse = inverse;
    for (r, row) in p.chunks_mut(width).enumerate() {
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp_f32(c[i] - max);
                sums[i] += c[i];
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for s in chunks.into_remainder() {
            *s = exp_f32(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        match inverse.as_deref_mut() {
            Some(out) => out[r] = inv,
            None => row.iter_mut().for_each(|s| *s *= inv),
        }
    }
}

const LANES: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_rows_avx512(
    p: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    inverse: Option<&mut [f32]>,
) {
    softmax_rows(p, width, bias, inverse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(
    p: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    inverse: Option<&mut [f32]>,
) {
    softmax_rows(p, width, bias, inverse)
}

pub(super) fn softmax_rows_dispatch(p: &mut [f32], width: usize, bias: Option<&[f32]>) {
    softmax_rows_with(p, width, bias, None)
}

/// [`softmax_rows_dispatch`] without the final scaling: rows hold exp(s − max),
/// `inverse[r]` the reciprocal of row r's sum.
pub(super) fn exp_rows_dispatch(
    p: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    inverse: &mut [f32],
) {
    softmax_rows_with(p, width, bias, Some(inverse))
}

fn softmax_rows_with(
    p: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    inverse: Option<&mut [f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { softmax_rows_avx512(p, width, bias, inverse) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { softmax_rows_avx2(p, width, bias, inverse) };
    }
    softmax_rows(p, width, bias, inverse)
}
