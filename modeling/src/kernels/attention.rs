//! Multi-head attention with an additive key bias, softmax(q·kᵀ/√d + bias)·v,
//! with its backward pass. The forward works in tiles of query rows — one task
//! per (batch, head, row tile), the scores of a tile never more than a few MiB —
//! so no `[N, L]` score matrix exists even at 1024 px (4096 tokens in the
//! transformer, 16,384 in the VAE's mid-block), and a single head still spreads
//! over every thread.

use super::gemm::{matmul, Product};
use super::softmax::{exp_rows_dispatch, softmax_rows_dispatch};
use super::{bnd, contiguous_f32, use_kernels, Shared};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Scores a forward task may hold: 2^20 f32 (4 MiB), a tile of query rows
/// times every key.
const TILE_SCORES: usize = 1 << 20;

/// Query rows per tile for `l` keys: within `budget` scores, at least 16 rows
/// (below that the products lose their efficiency), at most `n`.
fn tile_rows(n: usize, l: usize, budget: usize) -> usize {
    (budget / l.max(1)).max(16).min(n.max(1))
}

/// Multi-head attention on `q` `[B, N, H·d]`, `k`, `v` `[B, L, H·d]` (heads side by
/// side in the last dimension, as the projections produce them), with an
/// additive key bias `[B, L]`: softmax(q·kᵀ/√d + bias)·v per head, output
/// `[B, N, H·d]`. The probabilities are never kept: the backward pass recomputes
/// them one (batch, head) block at a time.
struct Attention {
    heads: usize,
    bias: Option<Vec<f32>>,
    /// Scores a forward tile may hold ([`TILE_SCORES`] but in tests).
    tile_scores: usize,
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
        self.score_rows(d, q, k, (bi, h), 0..d.n, p);
        let bias = self.bias.as_ref().map(|b| &b[bi * d.l..(bi + 1) * d.l]);
        softmax_rows_dispatch(&mut p[..d.n * d.l], d.l, bias);
    }

    /// q·kᵀ·scale of query rows `rows` of block (`bi`, `h`) into `p` `[rows, L]`
    /// (the key bias not yet added).
    fn score_rows(
        &self,
        d: &Dims,
        q: &[f32],
        k: &[f32],
        (bi, h): (usize, usize),
        rows: std::ops::Range<usize>,
        p: &mut [f32],
    ) {
        let (off_q, off_k) = (d.q_at(bi, h) + rows.start * d.width, d.k_at(bi, h));
        // SAFETY: the pointers and strides stay inside q, k and p.
        unsafe {
            matmul(
                (rows.len(), d.l, d.dh),
                p.as_mut_ptr(),
                (d.l, 1),
                q[off_q..].as_ptr(),
                (d.width, 1),
                k[off_k..].as_ptr(),
                (1, d.width),
                Product::one_thread(d.scale),
            );
        }
    }
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
        let rows = tile_rows(d.n, d.l, self.tile_scores);
        let tiles = d.n.div_ceil(rows);
        (0..d.b * self.heads * tiles).into_par_iter().for_each_init(
            || (vec![0f32; rows * d.l], vec![0f32; rows]),
            |(p, inverse), i| {
                let (block, t) = (i / tiles, i % tiles);
                let (bi, h) = (block / self.heads, block % self.heads);
                let span = t * rows..((t + 1) * rows).min(d.n);
                let m = span.len();
                self.score_rows(&d, q, k, (bi, h), span.clone(), p);
                let bias = self.bias.as_ref().map(|b| &b[bi * d.l..(bi + 1) * d.l]);
                // exp(s − max) only: each output row is divided by its sum below,
                // a pass over m·d values instead of m·L.
                exp_rows_dispatch(&mut p[..m * d.l], d.l, bias, inverse);
                // SAFETY: rows `span` of head h of sample bi in `out` are
                // written by this task only.
                unsafe {
                    let at = dst.ptr().add((bi * d.n + span.start) * d.width + h * d.dh);
                    matmul(
                        (m, d.dh, d.l),
                        at,
                        (d.width, 1),
                        p.as_ptr(),
                        (d.l, 1),
                        v[d.v_at(bi, h)..].as_ptr(),
                        (d.width, 1),
                        Product::one_thread(1.0),
                    );
                    for (r, inv) in inverse[..m].iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(at.add(r * d.width), d.dh);
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                }
            },
        );
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
                tile_scores: self.tile_scores,
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
                    Product::one_thread(1.0),
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
                    Product::one_thread(1.0),
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
                    Product::one_thread(d.scale),
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
                    Product::one_thread(d.scale),
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Multi-head attention: `q` `[B, N, H·d]`, `k` and `v` `[B, L, H·d]`, an
/// optional additive key bias `[B, L]` (no gradient); with gradients for `q`, `k`
/// and `v` when `grad`. `None` where the fused kernel does not apply (not CPU
/// f32): use [`attention_composed`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    grad: bool,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, heads, bias, grad, TILE_SCORES)
}

/// Attention by candle's ops, for any device and dtype: `q` `[B, H, N, d]`,
/// `k` and `v` `[B, H, L, d]`, an optional additive bias broadcast to the scores
/// (`[B, 1, 1, L]`), output `[B, H, N, d]`. Computed in chunks of query rows so
/// the scores never exceed about 2^26 values (256 MiB in f32) however long the
/// sequence; `differentiable` keeps the softmax on ops with a backward pass.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    differentiable: bool,
) -> Result<Tensor> {
    composed_in_chunks(q, k, v, bias, differentiable, TILE_SCORES << 6)
}

/// [`attention_composed`] with at most about `budget` scores at once.
pub(super) fn composed_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    differentiable: bool,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, n, dh) = q.dims4()?;
    let l = k.dim(2)?;
    // Scaling q (tokens × head_dim) is cheaper than scaling the scores.
    let q = (q * (1.0 / (dh as f64).sqrt()))?;
    let kt = k.t()?;
    let rows = tile_rows(n, b * h * l, budget);
    let chunk = |start: usize, len: usize| -> Result<Tensor> {
        let mut scores = q.narrow(2, start, len)?.matmul(&kt)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = if differentiable {
            super::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        probs.matmul(v)
    };
    if rows >= n {
        return chunk(0, n);
    }
    let parts = (0..n)
        .step_by(rows)
        .map(|start| chunk(start, rows.min(n - start)))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)
}

/// The fused attention with forward tiles of at most `tile_scores` scores.
pub(super) fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    grad: bool,
    tile_scores: usize,
) -> Result<Option<Tensor>> {
    if !use_kernels(q) || q.rank() != 3 {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = Attention {
        heads,
        bias,
        tile_scores,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(if grad {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    }))
}
