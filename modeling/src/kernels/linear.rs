//! The linear layer `x·Wᵀ + b` as one graph node, with its backward pass; and the
//! inference product, which also takes bf16 weights and weights stored transposed.

use super::gemm::{matmul, Product};
use super::reduce::TokenSum;
use super::{contiguous_f32, last_dim, use_kernels};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

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
        let b = contiguous_f32(self.name(), s3, l3)?;
        let weight = Weight {
            storage: s2,
            layout: l2,
            transposed: false,
            scales: None,
        };
        dense_cpu(self.name(), s1, l1, weight, Some(b), WIDEN_ELEMENTS)
    }

    /// Only the gradients something needs: a frozen weight (a LoRA's base)
    /// gets none, where candle would keep one for every argument to the end of
    /// the backward pass.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x
            .track_op()
            .then(|| g.apply_op2_no_bwd(w, &LinearGradInput))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| g.apply_op2_no_bwd(x, &LinearGradWeight))
            .transpose()?;
        let o = w.dim(0)?;
        let rows = g.elem_count() / o;
        let db = b
            .track_op()
            .then(|| {
                g.reshape((1, rows, o))?
                    .apply_op1_no_bwd(&TokenSum)?
                    .reshape(o)
            })
            .transpose()?;
        Ok((dx, dw, db))
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
            matmul(
                (rows, k, o),
                dx.as_mut_ptr(),
                (k, 1),
                g.as_ptr(),
                (o, 1),
                w.as_ptr(),
                (k, 1),
                Product::SPLIT,
            )
        };
        Ok((CpuStorage::F32(dx), with_last_dim(l1, k)))
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
            matmul(
                (o, k, rows),
                dw.as_mut_ptr(),
                (k, 1),
                g.as_ptr(),
                (1, o),
                x.as_ptr(),
                (k, 1),
                Product::SPLIT,
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

/// Elements of a bf16 weight widened to f32 at a time (16 MiB): a band of whole
/// rows, so the product over it stays one call, while the whole of T5-XXL's
/// 10,240 × 4,096 `wo` would be 160 MiB.
const WIDEN_ELEMENTS: usize = 1 << 22;

/// `y = x·Wᵀ (+ b)` without gradients: x `[.., K]` f32, W in f32 or bf16, either
/// `[O, K]` as checkpoints store it or `[K, O]` (`transposed`: the layout gemm
/// streams fastest when x has few rows, twice the speed at T5's 120 tokens). The
/// bias, if any, is written first and the product accumulated onto it. A bf16
/// weight is widened to f32 one band of rows at a time, so a model can keep its
/// weights in half the memory and still compute in f32.
struct DenseForward {
    bias: Option<Vec<f32>>,
    transposed: bool,
    /// Elements of a bf16 weight widened at a time ([`WIDEN_ELEMENTS`] but in tests).
    band_elements: usize,
}

impl CustomOp2 for DenseForward {
    fn name(&self) -> &'static str {
        "dense-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let weight = Weight {
            storage: s2,
            layout: l2,
            transposed: self.transposed,
            scales: None,
        };
        let bias = self.bias.as_deref();
        dense_cpu(self.name(), s1, l1, weight, bias, self.band_elements)
    }
}

/// [`DenseForward`] for an 8-bit weight: (x, q, scales), the scales read where
/// they lie (T5-XXL's are 0.6 GB: not copied on every product).
struct DenseInt8 {
    transposed: bool,
    /// Elements widened at a time ([`WIDEN_ELEMENTS`] but in tests).
    band_elements: usize,
}

impl candle_core::CustomOp3 for DenseInt8 {
    fn name(&self) -> &'static str {
        "dense-int8"
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
        let weight = Weight {
            storage: s2,
            layout: l2,
            transposed: self.transposed,
            scales: Some(contiguous_f32(self.name(), s3, l3)?),
        };
        dense_cpu(self.name(), s1, l1, weight, None, self.band_elements)
    }
}

/// A weight as the product finds it.
struct Weight<'a> {
    storage: &'a CpuStorage,
    layout: &'a Layout,
    /// `[K, O]` rather than `[O, K]`.
    transposed: bool,
    /// For 8-bit weights: the scales, per output and block of inputs
    /// (`weights::quantize_int8`).
    scales: Option<&'a [f32]>,
}

/// `y = x·Wᵀ (+ b)` on the CPU (see [`DenseForward`]).
fn dense_cpu(
    name: &str,
    s1: &CpuStorage,
    l1: &Layout,
    weight: Weight,
    bias: Option<&[f32]>,
    band_elements: usize,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(name, s1, l1)?;
    let k = last_dim(l1);
    let (o, width) = match *weight.layout.dims() {
        [a, b] if weight.transposed => (b, a),
        [a, b] => (a, b),
        ref other => candle_core::bail!("{name}: weight {other:?}"),
    };
    if width != k {
        candle_core::bail!(
            "{name}: weight {:?} for inputs of width {k}",
            weight.layout.dims()
        );
    }
    let rows = x.len() / k;
    let mut y = vec![0f32; rows * o];
    let with_bias = match bias {
        Some(b) if b.len() == o => {
            for row in y.chunks_mut(o) {
                row.copy_from_slice(b);
            }
            true
        }
        Some(b) => candle_core::bail!("{name}: bias of {} for {o} outputs", b.len()),
        None => false,
    };
    // Rows of the stored weight, and the length of each.
    let (stored_rows, row_len) = if weight.transposed { (k, o) } else { (o, k) };
    let dims = (rows, o, k);
    let product = |y: &mut [f32], band: &[f32], first: usize, n: usize, accumulate: bool| {
        // SAFETY: x is rows×k, y rows×o, and `band` holds stored rows first..first+n.
        unsafe { band_product(weight.transposed, dims, y, x, band, first, n, accumulate) }
    };
    // A narrow weight is widened to f32 one band of stored rows at a time.
    let in_bands = |y: &mut [f32], widen: &dyn Fn(usize, &mut [f32])| {
        let per_band = (band_elements / row_len).clamp(1, stored_rows);
        let mut band = vec![0f32; per_band * row_len];
        for first in (0..stored_rows).step_by(per_band) {
            let n = per_band.min(stored_rows - first);
            let band = &mut band[..n * row_len];
            widen(first, band);
            // Bands along k accumulate onto each other; along o they fill
            // their own columns.
            let accumulate = with_bias || (weight.transposed && first > 0);
            product(y, band, first, n, accumulate);
        }
    };
    match (
        weight.storage,
        weight.layout.contiguous_offsets(),
        weight.scales,
    ) {
        (CpuStorage::F32(w), Some((a, b)), None) => {
            product(&mut y, &w[a..b], 0, stored_rows, with_bias)
        }
        (CpuStorage::BF16(w), Some((a, b)), None) => {
            let w = &w[a..b];
            in_bands(&mut y, &|first, band| {
                widen_bf16(&w[first * row_len..][..band.len()], band)
            });
        }
        (CpuStorage::U8(w), Some((a, b)), Some(scales))
            if scales.len() * crate::weights::int8_block(k) == o * k =>
        {
            let w = &w[a..b];
            let block = crate::weights::int8_block(k);
            let transposed = weight.transposed;
            in_bands(&mut y, &|first, band| {
                let src = &w[first * row_len..][..band.len()];
                widen_int8(src, row_len, block, transposed, first, scales, band)
            });
        }
        (other, _, scales) => candle_core::bail!(
            "{name}: contiguous f32 or bf16 weights, or u8 with their scales, only; got {:?} \
             with {} scales",
            other.dtype(),
            scales.map_or(0, |s| s.len())
        ),
    }
    Ok((CpuStorage::F32(y), with_last_dim(l1, o)))
}

/// `y (+)= x·band` for one band of the weight (f32), in the band's layout: `[O, K]`
/// rows `first..first+n` (outputs), or `[K, O]` rows `first..first+n` (inputs).
///
/// # Safety
/// `band` holds those n rows; x is rows×k and y rows×o.
#[allow(clippy::too_many_arguments)]
unsafe fn band_product(
    transposed: bool,
    (rows, o, k): (usize, usize, usize),
    y: &mut [f32],
    x: &[f32],
    band: &[f32],
    first: usize,
    n: usize,
    accumulate: bool,
) {
    let how = Product {
        accumulate,
        ..Product::SPLIT
    };
    if transposed {
        matmul(
            (rows, o, n),
            y.as_mut_ptr(),
            (o, 1),
            x.as_ptr().add(first),
            (k, 1),
            band.as_ptr(),
            (o, 1),
            how,
        )
    } else {
        matmul(
            (rows, n, k),
            y.as_mut_ptr().add(first),
            (o, 1),
            x.as_ptr(),
            (k, 1),
            band.as_ptr(),
            (1, k),
            how,
        )
    }
}

/// `l`'s shape with its last dimension `n`.
fn with_last_dim(l: &Layout, n: usize) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// bf16 → f32 is exact: the bf16 bits are the f32's upper half.
fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let widen = |(s, d): (&[half::bf16], &mut [f32])| {
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = f32::from_bits(u32::from(x.to_bits()) << 16);
        }
    };
    if rayon::current_num_threads() > 1 && src.len() > CHUNK {
        src.par_chunks(CHUNK)
            .zip(dst.par_chunks_mut(CHUNK))
            .for_each(widen);
    } else {
        widen((src, dst));
    }
}

/// 8-bit → f32: `(q − 128)·scale` for stored rows `first..` of `width` values,
/// the scales laid out as `weights::quantize_int8` makes them (one per output and
/// `block` inputs).
fn widen_int8(
    src: &[u8],
    width: usize,
    block: usize,
    transposed: bool,
    first: usize,
    scales: &[f32],
    dst: &mut [f32],
) {
    use rayon::prelude::*;
    dst.par_chunks_mut(width)
        .zip(src.par_chunks(width))
        .enumerate()
        .for_each(|(r, (d, s))| {
            let row = first + r;
            if transposed {
                // A row of inputs: one scale per output column.
                let scales = &scales[(row / block) * width..][..width];
                for ((y, q), scale) in d.iter_mut().zip(s).zip(scales) {
                    *y = (f32::from(*q) - 128.0) * scale;
                }
            } else {
                // A row of one output: one scale per block of inputs.
                let blocks = width / block;
                let scales = &scales[row * blocks..][..blocks];
                for ((y, q), scale) in d.chunks_mut(block).zip(s.chunks(block)).zip(scales) {
                    for (y, q) in y.iter_mut().zip(q) {
                        *y = (f32::from(*q) - 128.0) * scale;
                    }
                }
            }
        });
}

/// Whether the fused product takes this input and weight: f32 inputs on the
/// CPU, f32 or bf16 weights there.
fn dense_applies(x: &Tensor, w: &Tensor) -> bool {
    use_kernels(x) && w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16)
}

/// The fused product on the CPU (see [`DenseForward`]).
pub(super) fn dense(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
    band_elements: usize,
) -> Result<Tensor> {
    let op = DenseForward {
        bias: bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?,
        transposed,
        band_elements,
    };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// A linear layer without gradients (inference), bias or not. On the CPU with
/// f32 inputs it is one fused node and takes f32 or bf16 weights (the latter
/// widened as it goes: half the memory, f32 arithmetic); elsewhere candle's
/// layer, the weight cast to the input's dtype where they differ.
pub fn linear_inference(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let w = layer.weight();
    if dense_applies(x, w) {
        return dense(x, w, layer.bias(), false, WIDEN_ELEMENTS);
    }
    if w.dtype() != x.dtype() {
        let b = layer.bias().map(|b| b.to_dtype(x.dtype())).transpose()?;
        return candle_nn::Linear::new(w.to_dtype(x.dtype())?, b).forward(x);
    }
    layer.forward(x)
}

/// [`linear_inference`] with the weight stored transposed, `wt` `[K, O]`
/// (see `Keep::transposed` in the weights loader): `x·wt (+ b)`.
pub fn linear_transposed_inference(
    wt: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> Result<Tensor> {
    if dense_applies(x, wt) {
        return dense(x, wt, bias, true, WIDEN_ELEMENTS);
    }
    let y = x.broadcast_matmul(&wt.to_dtype(x.dtype())?)?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
        None => Ok(y),
    }
}

/// `x·Wᵀ` without gradients for an 8-bit weight (`weights::quantize_int8`): `q`
/// u8 `[O, K]` (or `[K, O]` when `transposed`) and its `scales`
/// (`weights::int8_scales_shape`). On the CPU with f32 inputs the fused product
/// widens it a band at a time (9/32 of f32's memory with the scales); elsewhere
/// the weight is dequantized whole.
pub fn linear_int8_inference(
    q: &Tensor,
    scales: &Tensor,
    transposed: bool,
    x: &Tensor,
) -> Result<Tensor> {
    if use_kernels(x) && q.device().is_cpu() && q.dtype() == DType::U8 {
        return dense_int8(x, q, scales, transposed, WIDEN_ELEMENTS);
    }
    let wt = dequantize_int8(q, scales, transposed)?.to_dtype(x.dtype())?;
    let wt = if transposed { wt } else { wt.t()? };
    x.broadcast_matmul(&wt)
}

/// The fused 8-bit product on the CPU, widening `band_elements` at a time.
pub(super) fn dense_int8(
    x: &Tensor,
    q: &Tensor,
    scales: &Tensor,
    transposed: bool,
    band_elements: usize,
) -> Result<Tensor> {
    let op = DenseInt8 {
        transposed,
        band_elements,
    };
    let scales = scales.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?
        .apply_op3_no_bwd(&q.contiguous()?, &scales, &op)
}

/// An 8-bit weight (`weights::quantize_int8`) back in f32, in its layout.
pub fn dequantize_int8(q: &Tensor, scales: &Tensor, transposed: bool) -> Result<Tensor> {
    let (r, c) = q.dims2()?;
    let centred = (q.to_dtype(DType::F32)? - 128.0)?;
    let (sr, sc) = scales.dims2()?;
    // Each scale repeated over its block of inputs: along rows of a transposed
    // weight, along columns otherwise.
    let scales = scales.to_dtype(DType::F32)?;
    let spread = if transposed {
        scales
            .unsqueeze(1)?
            .broadcast_as((sr, r / sr.max(1), sc))?
            .reshape((r, c))?
    } else {
        scales
            .unsqueeze(2)?
            .broadcast_as((sr, sc, c / sc.max(1)))?
            .reshape((r, c))?
    };
    centred * spread
}
