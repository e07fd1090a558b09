//! Layer norm without affine over the last dimension, with its backward pass;
//! group norm (+ SiLU), the VAE's.

use super::activation::exp_f32;
use super::{contiguous_f32, last_dim, par_rows, use_kernels};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Mean and 1/σ of a row.
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s, l)?;
        let w = last_dim(l);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            for (i, d) in rows.zip(dst.chunks_mut(w)) {
                let row = &x[i * w..(i + 1) * w];
                let (mean, inv) = row_stats(row, self.eps);
                for (o, &v) in d.iter_mut().zip(row) {
                    *o = (v - mean) * inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?))
    }
}

/// (x, dy) → dx = (dy − mean(dy) − ŷ·mean(dy·ŷ)) / σ, ŷ the normalised row.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
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
        let n = w as f32;
        let out = par_rows(x.len() / w, w, |rows, dst| {
            for (i, d) in rows.zip(dst.chunks_mut(w)) {
                let (row, grow) = (&x[i * w..(i + 1) * w], &g[i * w..(i + 1) * w]);
                let (mean, inv) = row_stats(row, self.eps);
                let mut g_sum = 0f32;
                let mut gy_sum = 0f32;
                for (&v, &gv) in row.iter().zip(grow) {
                    g_sum += gv;
                    gy_sum += gv * (v - mean) * inv;
                }
                let (g_mean, gy_mean) = (g_sum / n, gy_sum / n);
                for ((o, &v), &gv) in d.iter_mut().zip(row).zip(grow) {
                    *o = (gv - g_mean - (v - mean) * inv * gy_mean) * inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `LayerNorm(elementwise_affine=False)` over the last dimension, with gradients.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if use_kernels(x) {
        return x.contiguous()?.apply_op1(LayerNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)
}

/// GroupNorm (+ SiLU) without gradients on `[B, C, …]`: statistics of each
/// (sample, group) in one pass, then each value normalised, scaled, shifted and
/// (with `silu`) activated as it is written — one output buffer, where the
/// composition of candle's ops makes six.
struct GroupNormForward {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl candle_core::CustomOp3 for GroupNormForward {
    fn name(&self) -> &'static str {
        "group-norm-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(self.name(), s1, l1)?;
        let (weight, bias) = (
            contiguous_f32(self.name(), s2, l2)?,
            contiguous_f32(self.name(), s3, l3)?,
        );
        let dims = l1.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let first = (i % self.groups) * (c / self.groups);
                let channels = c / self.groups;
                let affine = (
                    &weight[first..first + channels],
                    &bias[first..first + channels],
                );
                normalize_group_dispatch(dst, src, spatial, affine, self.eps, self.silu);
            });
        debug_assert_eq!(b * c * spatial, out.len());
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean and variance of one group, summed in f64 (a group holds up to millions
/// of values: 128 channels of a 1024 px image over 32 groups, 4 · 2^20) in eight
/// lanes, so the sums vectorise.
#[inline(always)]
fn group_stats(src: &[f32]) -> (f64, f64) {
    let n = src.len() as f64;
    let lane_sum = |f: &dyn Fn(f32) -> f64| {
        let mut lanes = [0f64; 8];
        let mut chunks = src.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                lanes[i] += f(c[i]);
            }
        }
        lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f64>()
    };
    let mean = lane_sum(&|v| v as f64) / n;
    let var = lane_sum(&|v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean, var)
}

/// One (sample, group) block: `src` normalised, scaled and shifted per channel
/// (`affine`: the group's weights and biases), then SiLU when `silu`, into `dst`.
#[inline(always)]
fn normalize_group(
    dst: &mut [f32],
    src: &[f32],
    spatial: usize,
    (weight, bias): (&[f32], &[f32]),
    eps: f32,
    silu: bool,
) {
    let (mean, var) = group_stats(src);
    let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
    let mean = mean as f32;
    for (ch, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
        let scale = inv * weight[ch];
        let shift = bias[ch] - mean * scale;
        if silu {
            for (o, &v) in d.iter_mut().zip(s) {
                let y = v * scale + shift;
                *o = y / (1.0 + exp_f32(-y));
            }
        } else {
            for (o, &v) in d.iter_mut().zip(s) {
                *o = v * scale + shift;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normalize_group_avx2(
    dst: &mut [f32],
    src: &[f32],
    spatial: usize,
    affine: (&[f32], &[f32]),
    eps: f32,
    silu: bool,
) {
    normalize_group(dst, src, spatial, affine, eps, silu)
}

fn normalize_group_dispatch(
    dst: &mut [f32],
    src: &[f32],
    spatial: usize,
    affine: (&[f32], &[f32]),
    eps: f32,
    silu: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2_fma() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { normalize_group_avx2(dst, src, spatial, affine, eps, silu) };
    }
    normalize_group(dst, src, spatial, affine, eps, silu)
}

/// `GroupNorm(groups, C)` with affine `weight` and `bias` `[C]`, then SiLU when
/// `silu`: fused on the CPU in f32 where no gradient is wanted, else the
/// differentiable composition (statistics in f32 for half-precision inputs, as
/// PyTorch computes them).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {groups} groups over input {dims:?}");
    }
    let wants_grad = x.track_op() || weight.track_op() || bias.track_op();
    if use_kernels(x) && !wants_grad {
        return x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &GroupNormForward {
                groups,
                eps: eps as f32,
                silu,
            },
        );
    }
    let dtype = x.dtype();
    let grouped = x.to_dtype(DType::F32)?.reshape((dims[0], groups, ()))?;
    let centred = grouped.broadcast_sub(&grouped.mean_keepdim(2)?)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let mut affine = vec![1; dims.len()];
    affine[1] = dims[1];
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .reshape(dims.as_slice())?
        .broadcast_mul(&weight.reshape(affine.as_slice())?)?
        .broadcast_add(&bias.reshape(affine.as_slice())?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}
