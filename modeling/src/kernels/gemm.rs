//! The matrix product the fused ops are built on: gemm's kernels on raw strided
//! buffers, split over rayon's threads when large or run on the calling thread
//! (inside a task that already owns one block of a parallel loop).

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
