//! Fused CPU kernels for training, with their backward passes: GELU (tanh),
//! layer norm without affine, and softmax over the last dimension. candle's own
//! fused versions have no backward, and the differentiable compositions of
//! primitive ops cost many passes over memory (and scalar libm calls for tanh and
//! powf); these compute each direction in one vectorised pass per row. Other
//! devices and dtypes use the differentiable compositions.

use super::fast_ops::{exp_f32, gelu_tanh};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Runs `f(row_range, dst_chunk)` over `rows` rows of `width` values, split over
/// rayon's threads when the tensor is large enough to pay for it (inside a
/// batch-parallel forward, rayon keeps the nesting from oversubscribing).
fn par_rows(
    rows: usize,
    width: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; rows * width];
    let threads = rayon::current_num_threads();
    if threads == 1 || rows * width < (1 << 15) || rows < 2 {
        f(0..rows, &mut out);
        return out;
    }
    let per = rows.div_ceil(threads);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, chunk)| f(i * per..i * per + chunk.len() / width, chunk));
    out
}

fn contiguous_f32<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&data[a..b]),
        _ => candle_core::bail!("{name}: contiguous f32 only, got {:?}", s.dtype()),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

fn use_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
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

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s, l)?;
        let w = last_dim(l);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            for (d, &v) in dst.iter_mut().zip(&x[rows.start * w..rows.end * w]) {
                *d = gelu_tanh(v);
            }
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
            for ((d, &v), &gv) in dst.iter_mut().zip(&x[r.clone()]).zip(&g[r]) {
                *d = gv * gelu_tanh_grad(v);
            }
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

// ---------------------------------------------------------------- layer norm

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

// ---------------------------------------------------------------- softmax

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s, l)?;
        let w = last_dim(l);
        let out = par_rows(x.len() / w, w, |rows, dst| {
            for (i, d) in rows.zip(dst.chunks_mut(w)) {
                let row = &x[i * w..(i + 1) * w];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in d.iter_mut().zip(row) {
                    *o = exp_f32(v - max);
                    sum += *o;
                }
                let inv = 1.0 / sum;
                d.iter_mut().for_each(|o| *o *= inv);
            }
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

// ---------------------------------------------------------------- linear, modulation

/// `[B, N, D]` as (batch, tokens, width) from a layout.
fn bnd(l: &Layout) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, n, d] => Ok((b, n, d)),
        ref other => candle_core::bail!("expected [batch, tokens, width], got {other:?}"),
    }
}

/// Rows `[R, D]` plus a bias `[D]`; the bias gradient is a column sum.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), s1, l1)?;
        let b = contiguous_f32(self.name(), s2, l2)?;
        let w = b.len();
        let out = par_rows(x.len() / w, w, |rows, dst| {
            for (i, d) in rows.zip(dst.chunks_mut(w)) {
                for ((o, &v), &bv) in d.iter_mut().zip(&x[i * w..(i + 1) * w]).zip(b) {
                    *o = v + bv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let rows = g.elem_count() / b.elem_count();
        let db = g
            .reshape((1, rows, b.elem_count()))?
            .apply_op1_no_bwd(&TokenSum)?
            .reshape(b.shape())?;
        Ok((Some(g), Some(db)))
    }
}

/// `[B, N, D]` → `[B, 1, D]`: the sum over tokens.
struct TokenSum;

impl CustomOp1 for TokenSum {
    fn name(&self) -> &'static str {
        "token-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(self.name(), s, l)?;
        let (b, n, d) = bnd(l)?;
        let mut out = vec![0f32; b * d];
        for (bi, acc) in out.chunks_mut(d).enumerate() {
            for row in a[bi * n * d..(bi + 1) * n * d].chunks(d) {
                acc.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 1, d))))
    }
}

/// (`[B, N, D]`, `[B, N, D]`) → `[B, 1, D]`: Σ over tokens of the product.
struct TokenSumProduct;

impl CustomOp2 for TokenSumProduct {
    fn name(&self) -> &'static str {
        "token-sum-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(self.name(), s1, l1)?;
        let c = contiguous_f32(self.name(), s2, l2)?;
        let (b, n, d) = bnd(l1)?;
        let mut out = vec![0f32; b * d];
        for (bi, acc) in out.chunks_mut(d).enumerate() {
            let r = bi * n * d..(bi + 1) * n * d;
            for (ra, rc) in a[r.clone()].chunks(d).zip(c[r].chunks(d)) {
                for ((o, &va), &vc) in acc.iter_mut().zip(ra).zip(rc) {
                    *o += va * vc;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 1, d))))
    }
}

/// A linear layer with gradients whose bias gradient is one vectorised column
/// sum (candle reduces over the broadcast rows one strided element at a time).
pub fn linear(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    if !use_kernels(x) {
        return layer.forward(x);
    }
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(1);
    let w = layer.weight();
    let mut y = x.reshape((x.elem_count() / k, k))?.matmul(&w.t()?)?;
    if let Some(b) = layer.bias() {
        y = y.apply_op2(b, BiasAdd)?;
    }
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)
}

/// Runs `f(token_row, sample, out_row)` over every token row of `x` `[B, N, D]`.
fn per_token(
    x: &[f32],
    l: &Layout,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (_, n, d) = bnd(l)?;
    let out = par_rows(x.len() / d, d, |rows, dst| {
        for (i, o) in rows.zip(dst.chunks_mut(d)) {
            f(i, i / n, o);
        }
    });
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// x·(1 + scale) + shift, x `[B, N, D]`, shift and scale `[B, 1, D]`.
struct Modulate;

impl candle_core::CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "modulate-train"
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
        let x = contiguous_f32(self.name(), s1, l1)?;
        let shift = contiguous_f32(self.name(), s2, l2)?;
        let scale = contiguous_f32(self.name(), s3, l3)?;
        let d = last_dim(l1);
        per_token(x, l1, |i, b, o| {
            let (sh, sc) = (&shift[b * d..(b + 1) * d], &scale[b * d..(b + 1) * d]);
            for (((o, &v), &a), &c) in o.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(sh).zip(sc) {
                *o = v * (1.0 + c) + a;
            }
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = g.broadcast_mul(&(scale + 1.0)?)?;
        let dshift = g.apply_op1_no_bwd(&TokenSum)?;
        let dscale = g.apply_op2_no_bwd(x, &TokenSumProduct)?;
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

/// adaLN modulation `x·(1 + scale) + shift` (x `[B, N, D]`, shift and scale
/// `[B, 1, D]`), with gradients.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if use_kernels(x) && x.rank() == 3 {
        return x
            .contiguous()?
            .apply_op3(&shift.contiguous()?, &scale.contiguous()?, Modulate);
    }
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// x + gate·y, x and y `[B, N, D]`, gate `[B, 1, D]`.
struct GatedAdd;

impl candle_core::CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "gated-add-train"
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
        let x = contiguous_f32(self.name(), s1, l1)?;
        let gate = contiguous_f32(self.name(), s2, l2)?;
        let y = contiguous_f32(self.name(), s3, l3)?;
        let d = last_dim(l1);
        per_token(x, l1, |i, b, o| {
            let (r, gt) = (i * d..(i + 1) * d, &gate[b * d..(b + 1) * d]);
            for (((o, &xv), &yv), &gv) in o.iter_mut().zip(&x[r.clone()]).zip(&y[r]).zip(gt) {
                *o = xv + gv * yv;
            }
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        gate: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dgate = g.apply_op2_no_bwd(y, &TokenSumProduct)?;
        let dy = g.broadcast_mul(gate)?;
        Ok((Some(g), Some(dgate), Some(dy)))
    }
}

/// The gated residual `x + gate·y` of a PixArt block, with gradients.
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    if use_kernels(x) && x.rank() == 3 {
        return x
            .contiguous()?
            .apply_op3(&gate.contiguous()?, &y.contiguous()?, GatedAdd);
    }
    x + gate.broadcast_mul(y)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and the composition of primitive ops agree, forward and backward.
    fn check(
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        reference: impl Fn(&Tensor) -> Result<Tensor>,
    ) {
        let n = 7 * 300;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 25.0) - 2.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (7, 300), &Device::Cpu).unwrap()).unwrap();
        let w: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0).collect();
        let w = Tensor::from_vec(w, (7, 300), &Device::Cpu).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&reference);
        let err = |a: &Tensor, b: &Tensor| {
            let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            a.iter()
                .zip(&b)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
                / scale
        };
        assert!(err(&y1, &y2) < 1e-5, "forward {}", err(&y1, &y2));
        assert!(err(&g1, &g2) < 1e-4, "backward {}", err(&g1, &g2));
    }

    #[test]
    fn fused_ops_match_their_compositions() {
        check(gelu, |x| x.gelu());
        check(
            |x| layer_norm(x, 1e-6),
            |x| {
                let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)
            },
        );
        check(softmax_last_dim, |x| candle_nn::ops::softmax(x, D::Minus1));
    }

    #[test]
    fn linear_modulate_and_gate_match_broadcast_ops() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + seed) * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        let (x, shift, scale, y) = (
            var(&[2, 5, 8], 1),
            var(&[2, 1, 8], 2),
            var(&[2, 1, 8], 3),
            var(&[2, 5, 8], 4),
        );
        let w = var(&[6, 8], 5);
        let b = var(&[6], 6);
        let layer = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let probe = var(&[2, 5, 6], 7);
        let all = [&x, &shift, &scale, &y, &w, &b];
        let grads = |fused: bool| {
            let (m, ga, l) = if fused {
                (
                    modulate(x.as_tensor(), shift.as_tensor(), scale.as_tensor()).unwrap(),
                    gated_add(x.as_tensor(), scale.as_tensor(), y.as_tensor()).unwrap(),
                    linear(&layer, x.as_tensor()).unwrap(),
                )
            } else {
                use candle_core::Module;
                (
                    x.as_tensor()
                        .broadcast_mul(&(scale.as_tensor() + 1.0).unwrap())
                        .unwrap()
                        .broadcast_add(shift.as_tensor())
                        .unwrap(),
                    (x.as_tensor() + scale.as_tensor().broadcast_mul(y.as_tensor()).unwrap())
                        .unwrap(),
                    layer.forward(x.as_tensor()).unwrap(),
                )
            };
            let total = ((m.sqr().unwrap().sum_all().unwrap()
                + (ga * 0.5).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap()
                + (l * probe.as_tensor()).unwrap().sum_all().unwrap())
            .unwrap();
            let g = total.backward().unwrap();
            all.iter()
                .map(|v| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        for (i, (a, b)) in grads(true).iter().zip(grads(false)).enumerate() {
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                    "variable {i}: {p} vs {q}"
                );
            }
        }
    }
}
