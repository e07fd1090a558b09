//! Sums over the token axis of `[B, N, D]` tensors: the bias and modulation
//! gradients of the linear and adaLN ops.

use super::{bnd, contiguous_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};

/// `[B, N, D]` → `[B, 1, D]`: the sum over tokens.
pub(super) struct TokenSum;

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
pub(super) struct TokenSumProduct;

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
