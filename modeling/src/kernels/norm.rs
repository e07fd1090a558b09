//! Layer norm without affine over the last dimension, with its backward pass.

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
