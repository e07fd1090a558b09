//! The linear layer `x·Wᵀ + b` as one graph node, with its backward pass.

use super::gemm::{matmul, Product};
use super::reduce::TokenSum;
use super::{contiguous_f32, last_dim, use_kernels};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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
            matmul(
                (rows, o, k),
                y.as_mut_ptr(),
                (o, 1),
                x.as_ptr(),
                (k, 1),
                w.as_ptr(),
                (1, k),
                Product {
                    accumulate: true,
                    ..Product::SPLIT
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
