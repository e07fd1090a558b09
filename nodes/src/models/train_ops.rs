//! Fused CPU kernels for training, with their backward passes: GELU (tanh),
//! layer norm without affine, and softmax over the last dimension. candle's own
//! fused versions have no backward, and the differentiable compositions of
//! primitive ops cost many passes over memory (and scalar libm calls for tanh and
//! powf); these compute each direction in one vectorised pass per row. Other
//! devices and dtypes use the differentiable compositions.

use super::fast_ops::{exp_f32, gelu_dispatch};
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

fn gelu_grad_dispatch(x: &[f32], g: &[f32], dst: &mut [f32]) {
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

// ---------------------------------------------------------------- linear, modulation

/// `[B, N, D]` as (batch, tokens, width) from a layout.
fn bnd(l: &Layout) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, n, d] => Ok((b, n, d)),
        ref other => candle_core::bail!("expected [batch, tokens, width], got {other:?}"),
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

/// `dst[m×n] = lhs·rhs`, strides as (row,
/// column), on rayon's threads when the product is large.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// y = x·Wᵀ + b over rows: x `[.., K]`, W `[O, K]`, b `[O]`; one graph node, its
/// backward three products (dx = dy·W, dW = dyᵀ·x, db = Σ dy).
struct LinearOp;

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-train"
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
        let w = contiguous_f32(self.name(), s2, l2)?;
        let b = contiguous_f32(self.name(), s3, l3)?;
        let (o, k) = (b.len(), last_dim(l1));
        let rows = x.len() / k;
        let mut y = vec![0f32; rows * o];
        for row in y.chunks_mut(o) {
            row.copy_from_slice(b);
        }
        // SAFETY: shapes checked by the caller; dst accumulates onto the bias.
        unsafe {
            gemm::gemm(
                rows,
                o,
                k,
                y.as_mut_ptr(),
                1,
                o as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                if rayon::current_num_threads() > 1 && rows * o * k >= 1 << 18 {
                    gemm::Parallelism::Rayon(rayon::current_num_threads())
                } else {
                    gemm::Parallelism::None
                },
            );
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = o;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &LinearGradInput)?;
        let dw = g.apply_op2_no_bwd(x, &LinearGradWeight)?;
        let o = w.dim(0)?;
        let rows = g.elem_count() / o;
        let db = g
            .reshape((1, rows, o))?
            .apply_op1_no_bwd(&TokenSum)?
            .reshape(o)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (dy `[.., O]`, W `[O, K]`) → dx = dy·W `[.., K]`
struct LinearGradInput;

impl CustomOp2 for LinearGradInput {
    fn name(&self) -> &'static str {
        "linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(self.name(), s1, l1)?;
        let w = contiguous_f32(self.name(), s2, l2)?;
        let (o, k) = (last_dim(l1), last_dim(l2));
        let rows = g.len() / o;
        let mut dx = vec![0f32; rows * k];
        // SAFETY: [rows×o]·[o×k] within the buffers.
        unsafe {
            gemm_par(
                (rows, k, o),
                dx.as_mut_ptr(),
                (k, 1),
                g.as_ptr(),
                (o, 1),
                w.as_ptr(),
                (k, 1),
            )
        };
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = k;
        }
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

/// (dy `[.., O]`, x `[.., K]`) → dW = dyᵀ·x `[O, K]`
struct LinearGradWeight;

impl CustomOp2 for LinearGradWeight {
    fn name(&self) -> &'static str {
        "linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(self.name(), s1, l1)?;
        let x = contiguous_f32(self.name(), s2, l2)?;
        let (o, k) = (last_dim(l1), last_dim(l2));
        let rows = g.len() / o;
        let mut dw = vec![0f32; o * k];
        // SAFETY: [o×rows]·[rows×k] within the buffers (dyᵀ read by strides).
        unsafe {
            gemm_par(
                (o, k, rows),
                dw.as_mut_ptr(),
                (k, 1),
                g.as_ptr(),
                (1, o),
                x.as_ptr(),
                (k, 1),
            )
        };
        Ok((CpuStorage::F32(dw), Shape::from((o, k))))
    }
}

/// A linear layer with gradients as one fused node (candle's version is four —
/// reshape, matmul, broadcast bias, reshape — each with its own gradient buffer,
/// and reduces the bias gradient one strided element at a time).
pub fn linear(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    match layer.bias() {
        Some(b) if use_kernels(x) => {
            x.contiguous()?
                .apply_op3(&layer.weight().contiguous()?, &b.contiguous()?, LinearOp)
        }
        _ => layer.forward(x),
    }
}

/// The same fused linear without gradients (inference): the bias is written
/// first and the product accumulated onto it, one pass instead of two.
pub fn linear_inference(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    match layer.bias() {
        Some(b) if use_kernels(x) => x.contiguous()?.apply_op3_no_bwd(
            &layer.weight().contiguous()?,
            &b.contiguous()?,
            &LinearOp,
        ),
        _ => layer.forward(x),
    }
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

// ---------------------------------------------------------------- attention

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes only its own (batch, head) block.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// A method, so closures capture the whole (Send) wrapper, not the bare pointer.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `dst[m×n] = beta·lhs[m×k]·rhs[k×n]`, strides as (row, column), one thread.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Multi-head attention on `q` `[B, N, H·d]`, `k`, `v` `[B, L, H·d]` (heads side by
/// side in the last dimension, as the projections produce them), with an
/// additive key bias `[B, L]`: softmax(q·kᵀ/√d + bias)·v per head, output
/// `[B, N, H·d]`. The probabilities are never kept: the backward pass recomputes
/// them one (batch, head) block at a time.
struct Attention {
    heads: usize,
    bias: Option<Vec<f32>>,
}

struct Dims {
    b: usize,
    n: usize,
    l: usize,
    width: usize,
    dh: usize,
    scale: f32,
    /// Rows between one sample's q (k and v) and the next's, and where k and v
    /// start within a sample: q, k and v may be separate buffers or one packed.
    q_stride: usize,
    kv_stride: usize,
    k_start: usize,
    v_start: usize,
}

impl Dims {
    /// Offsets of block (sample `bi`, head `h`) in q, k and v.
    fn q_at(&self, bi: usize, h: usize) -> usize {
        bi * self.q_stride * self.width + h * self.dh
    }

    fn k_at(&self, bi: usize, h: usize) -> usize {
        (bi * self.kv_stride + self.k_start) * self.width + h * self.dh
    }

    fn v_at(&self, bi: usize, h: usize) -> usize {
        (bi * self.kv_stride + self.v_start) * self.width + h * self.dh
    }
}

impl Attention {
    fn dims(&self, lq: &Layout, lk: &Layout) -> Result<Dims> {
        let (b, n, width) = bnd(lq)?;
        let (_, l, _) = bnd(lk)?;
        let dh = width / self.heads;
        Ok(Dims {
            b,
            n,
            l,
            width,
            dh,
            scale: 1.0 / (dh as f32).sqrt(),
            q_stride: n,
            kv_stride: l,
            k_start: 0,
            v_start: 0,
        })
    }

    /// The probabilities of block (batch `bi`, head `h`) into `p` `[N, L]`.
    fn probabilities(&self, d: &Dims, q: &[f32], k: &[f32], bi: usize, h: usize, p: &mut [f32]) {
        let (off_q, off_k) = (d.q_at(bi, h), d.k_at(bi, h));
        // SAFETY: the pointers and strides stay inside q, k and p.
        unsafe {
            matmul(
                (d.n, d.l, d.dh),
                p.as_mut_ptr(),
                (d.l, 1),
                q[off_q..].as_ptr(),
                (d.width, 1),
                k[off_k..].as_ptr(),
                (1, d.width),
                d.scale,
            );
        }
        let bias = self.bias.as_ref().map(|b| &b[bi * d.l..(bi + 1) * d.l]);
        softmax_rows_dispatch(p, d.l, bias);
    }
}

/// Row-wise softmax of `p` (rows of `width`) after adding `bias` to each row.
/// Max and sum in eight lanes so the compiler vectorises them.
#[inline(always)]
fn softmax_rows(p: &mut [f32], width: usize, bias: Option<&[f32]>) {
    for row in p.chunks_mut(width) {
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
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
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(p: &mut [f32], width: usize, bias: Option<&[f32]>) {
    softmax_rows(p, width, bias)
}

fn softmax_rows_dispatch(p: &mut [f32], width: usize, bias: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { softmax_rows_avx2(p, width, bias) };
    }
    softmax_rows(p, width, bias)
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-train"
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
        let (q, k, v) = (
            contiguous_f32(self.name(), s1, l1)?,
            contiguous_f32(self.name(), s2, l2)?,
            contiguous_f32(self.name(), s3, l3)?,
        );
        let d = self.dims(l1, l2)?;
        let mut out = vec![0f32; q.len()];
        let dst = Shared(out.as_mut_ptr());
        (0..d.b * self.heads).into_par_iter().for_each(|i| {
            let (bi, h) = (i / self.heads, i % self.heads);
            let mut p = vec![0f32; d.n * d.l];
            self.probabilities(&d, q, k, bi, h, &mut p);
            // SAFETY: block (bi, h) of `out` is written by this task only.
            unsafe {
                matmul(
                    (d.n, d.dh, d.l),
                    dst.ptr().add(bi * d.n * d.width + h * d.dh),
                    (d.width, 1),
                    p.as_ptr(),
                    (d.l, 1),
                    v[d.v_at(bi, h)..].as_ptr(),
                    (d.width, 1),
                    1.0,
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let grads = AttentionGrad {
            forward: Attention {
                heads: self.heads,
                bias: self.bias.clone(),
            },
        };
        // One op computes the three gradients, packed side by side.
        let packed = Tensor::cat(&[q, k, v], 1)?.apply_op2_no_bwd(&g, &grads)?;
        let (n, l) = (q.dim(1)?, k.dim(1)?);
        Ok((
            Some(packed.narrow(1, 0, n)?),
            Some(packed.narrow(1, n, l)?),
            Some(packed.narrow(1, n + l, l)?),
        ))
    }
}

/// (`[q; k; v]` packed along tokens, dO) → `[dq; dk; dv]` packed the same way.
struct AttentionGrad {
    forward: Attention,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let packed = contiguous_f32(self.name(), s1, l1)?;
        let g = contiguous_f32(self.name(), s2, l2)?;
        let (b, total, width) = bnd(l1)?;
        let (_, n, _) = bnd(l2)?;
        let l = (total - n) / 2;
        let heads = self.forward.heads;
        // q, k and v are read in place from the packed rows.
        let (q, k, v) = (packed, packed, packed);
        let d = Dims {
            b,
            n,
            l,
            width,
            dh: width / heads,
            scale: 1.0 / ((width / heads) as f32).sqrt(),
            q_stride: total,
            kv_stride: total,
            k_start: n,
            v_start: n + l,
        };
        let mut out = vec![0f32; packed.len()];
        let dst = Shared(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|i| {
            let (bi, h) = (i / heads, i % heads);
            let mut p = vec![0f32; n * l];
            self.forward.probabilities(&d, q, k, bi, h, &mut p);
            let go = &g[bi * n * width + h * d.dh..];
            let base = bi * total * width + h * d.dh;
            let mut dp = vec![0f32; n * l];
            // SAFETY: each task writes only block (bi, h) of dq, dk and dv, and
            // reads its inputs within bounds.
            unsafe {
                // dV = Pᵀ·dO
                matmul(
                    (l, d.dh, n),
                    dst.ptr().add(base + (n + l) * width),
                    (width, 1),
                    p.as_ptr(),
                    (1, l),
                    go.as_ptr(),
                    (width, 1),
                    1.0,
                );
                // dP = dO·Vᵀ
                matmul(
                    (n, l, d.dh),
                    dp.as_mut_ptr(),
                    (l, 1),
                    go.as_ptr(),
                    (width, 1),
                    v[d.v_at(bi, h)..].as_ptr(),
                    (1, width),
                    1.0,
                );
            }
            // dS = P ∘ (dP − Σ dP∘P), in place
            for (prow, drow) in p.chunks(l).zip(dp.chunks_mut(l)) {
                let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                drow.iter_mut()
                    .zip(prow)
                    .for_each(|(ds, &pv)| *ds = pv * (*ds - dot));
            }
            // SAFETY: as above.
            unsafe {
                // dQ = scale·dS·K
                matmul(
                    (n, d.dh, l),
                    dst.ptr().add(base),
                    (width, 1),
                    dp.as_ptr(),
                    (l, 1),
                    k[d.k_at(bi, h)..].as_ptr(),
                    (width, 1),
                    d.scale,
                );
                // dK = scale·dSᵀ·Q
                matmul(
                    (l, d.dh, n),
                    dst.ptr().add(base + n * width),
                    (width, 1),
                    dp.as_ptr(),
                    (1, l),
                    q[d.q_at(bi, h)..].as_ptr(),
                    (width, 1),
                    d.scale,
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Multi-head attention with gradients: `q` `[B, N, H·d]`, `k` and `v`
/// `[B, L, H·d]`, an optional additive key bias `[B, L]` (no gradient). `None`
/// where the fused kernel does not apply (not CPU f32): use the composition.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, heads, bias, true)
}

/// Attention without gradients (inference), or `None` as [`attention`].
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, heads, bias, false)
}

fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    grad: bool,
) -> Result<Option<Tensor>> {
    if !use_kernels(q) || q.rank() != 3 {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = Attention { heads, bias };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(if grad {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    }))
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
    fn fused_attention_matches_the_composition() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + seed) * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        let (b, n, l, heads, dh) = (2, 5, 7, 3, 4);
        let (q, k, v) = (
            var(&[b, n, heads * dh], 1),
            var(&[b, l, heads * dh], 2),
            var(&[b, l, heads * dh], 3),
        );
        let mask: Vec<f32> = (0..b * l)
            .map(|i| if i % l < 4 + i / l { 0.0 } else { -10000.0 })
            .collect();
        let bias = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let probe = var(&[b, n, heads * dh], 4);
        let split = |x: &Tensor| {
            x.reshape((b, (), heads, dh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let run = |fused: bool| {
            let out = if fused {
                attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    heads,
                    Some(&bias),
                )
                .unwrap()
                .unwrap()
            } else {
                let scores = (split(q.as_tensor())
                    .matmul(&split(k.as_tensor()).t().unwrap())
                    .unwrap()
                    * (1.0 / (dh as f64).sqrt()))
                .unwrap()
                .broadcast_add(&bias.reshape((b, 1, 1, l)).unwrap())
                .unwrap();
                let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                p.matmul(&split(v.as_tensor()))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, n, heads * dh))
                    .unwrap()
            };
            let g = (&out * probe.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut all = vec![out.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            for x in [&q, &k, &v] {
                all.push(
                    g.get(x.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            all
        };
        for (i, (a, c)) in run(true).iter().zip(run(false)).enumerate() {
            for (p, r) in a.iter().zip(&c) {
                assert!(
                    (p - r).abs() <= 1e-5 * r.abs().max(1.0),
                    "part {i}: {p} vs {r}"
                );
            }
        }
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
