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
                let first_channel = (i % self.groups) * (c / self.groups);
                // f64 sums: a group holds up to millions of values (128 channels
                // of a 1024 px image over 32 groups: 4 · 2^20).
                let n = src.len() as f64;
                let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let inv = (1.0 / (var + self.eps as f64).sqrt()) as f32;
                let mean = mean as f32;
                for (ch, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
                    let scale = inv * weight[first_channel + ch];
                    let shift = bias[first_channel + ch] - mean * scale;
                    if self.silu {
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
            });
        debug_assert_eq!(b * c * spatial, out.len());
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
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
