//! CPU kernels for the models, each op fused into one vectorised pass over memory,
//! most with their backward pass so the trainer can use them too. candle's CPU
//! backend computes these as chains of primitive ops (many passes, scalar libm
//! calls, a gradient buffer per step) or has no backward for its fused versions.
//! Other devices and dtypes fall back to candle's compositions, so callers need
//! not check where a tensor lives.
//!
//! One file an op family: element-wise activations, layer norm, softmax, the
//! linear layer, adaLN modulation and gated residuals, multi-head attention,
//! 2-D convolution, the optimiser's update; `gemm` and `reduce` hold the matrix
//! products and token sums several of them share.

mod activation;
mod attention;
#[cfg(target_arch = "x86_64")]
mod bf16;
mod conv;
mod gemm;
mod linear;
mod modulation;
mod norm;
mod optim;
mod reduce;
mod softmax;
#[cfg(test)]
mod tests;
mod winograd;

pub use activation::{gelu, gelu_inference};
pub use attention::{attention, attention_composed};
pub use conv::{conv2d, conv2d_upsampled};
pub use gemm::{
    bf16_engine, bf16_products, matmul_precision, set_matmul_precision, MatmulPrecision,
};
pub use linear::{
    dequantize_int8, linear, linear_inference, linear_int8_inference, linear_transposed_inference,
};
pub use modulation::{gated_add, modulate};
pub use norm::{group_norm, layer_norm};
pub use optim::{adamw_update, AdamWStep};
pub use softmax::softmax_last_dim;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

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

/// Whether the CPU runs the kernels' AVX2 + FMA builds (checked once).
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

fn use_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `[B, N, D]` as (batch, tokens, width) from a layout.
fn bnd(l: &Layout) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, n, d] => Ok((b, n, d)),
        ref other => candle_core::bail!("expected [batch, tokens, width], got {other:?}"),
    }
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
struct Shared<T = f32>(*mut T);
// SAFETY: users give each task a part of the buffer no other task touches.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}

impl<T> Shared<T> {
    /// A method, so closures capture the whole (Send) wrapper, not the bare pointer.
    fn ptr(&self) -> *mut T {
        self.0
    }
}
