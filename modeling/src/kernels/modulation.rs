//! adaLN-single's per-sample modulation `x·(1 + scale) + shift` and the gated
//! residual `x + gate·y` of a PixArt block, with their backward passes.

use super::reduce::{TokenSum, TokenSumProduct};
use super::{bnd, contiguous_f32, last_dim, par_rows, use_kernels};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

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
