//! The matrix product the fused ops are built on: gemm's kernels on raw strided
//! buffers, split over rayon's threads when large or run on the calling thread
//! (inside a task that already owns one block of a parallel loop); or, where the
//! process asked for bf16 products and the CPU has an engine for them, in bf16.

use std::sync::atomic::{AtomicU8, Ordering};

/// How the kernels compute f32 matrix products: PyTorch's `fp32_precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 throughout: what the parity tests hold the models to.
    F32,
    /// Operands rounded to bf16 (8 significant bits), products and sums in f32,
    /// on AMX tiles where the CPU has them (Intel Sapphire Rapids and later);
    /// elsewhere the products stay f32 (unless `PIXART_BF16_ENGINE=avx512_bf16`
    /// asks for AVX512_BF16 dot products). Weights and activations stay f32 in
    /// memory: only the inputs of each product are rounded.
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every later product in this process.
pub fn set_matmul_precision(precision: MatmulPrecision) {
    PRECISION.store(precision as u8, Ordering::Relaxed);
}

/// The precision products run at now.
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => MatmulPrecision::F32,
        _ => MatmulPrecision::Bf16,
    }
}

/// Whether large products run in bf16 now: [`MatmulPrecision::Bf16`] is set
/// and the CPU has an engine for it.
pub fn bf16_products() -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && bf16_engine().is_some()
}

/// What runs [`MatmulPrecision::Bf16`] products here: `"AMX"` (tiles),
/// `"AVX512_BF16"` (dot products), or `None`, where they stay f32.
pub fn bf16_engine() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    return super::bf16::engine().map(super::bf16::Engine::name);
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Who computes a product.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Threads {
    /// rayon's threads, when the product is large enough to pay for it.
    Split,
    /// The calling thread.
    One,
}

/// How a product is written: `dst = beta·lhs·rhs`, or with `accumulate`
/// `dst += beta·lhs·rhs`.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub beta: f32,
    pub accumulate: bool,
    pub threads: Threads,
}

impl Product {
    /// `dst = lhs·rhs` over rayon's threads.
    pub(super) const SPLIT: Product = Product {
        beta: 1.0,
        accumulate: false,
        threads: Threads::Split,
    };

    /// `dst = beta·lhs·rhs` on the calling thread.
    pub(super) const fn one_thread(beta: f32) -> Product {
        Product {
            beta,
            accumulate: false,
            threads: Threads::One,
        }
    }
}

/// `dst[m×n] (+)= beta·lhs[m×k]·rhs[k×n]` as `how` says; strides as (row, column).
///
/// # Safety
/// Each pointer must address a buffer that holds its matrix at those strides,
/// and `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    how: Product,
) {
    #[cfg(target_arch = "x86_64")]
    if matmul_precision() == MatmulPrecision::Bf16 && super::bf16::worth_it(m, n, k) {
        if let Some(engine) = super::bf16::engine() {
            return super::bf16::matmul(
                engine,
                (m, n, k),
                dst,
                (dst_rs, dst_cs),
                lhs,
                (lhs_rs, lhs_cs),
                rhs,
                (rhs_rs, rhs_cs),
                super::bf16::Write {
                    beta: how.beta,
                    accumulate: how.accumulate,
                    parallel: how.threads == Threads::Split,
                },
            );
        }
    }
    let threads = rayon::current_num_threads();
    let parallelism = if how.threads == Threads::Split && threads > 1 && m * n * k >= 1 << 18 {
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
        how.accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        how.beta,
        false,
        false,
        false,
        parallelism,
    )
}
