//! AdamW's update in one pass per tensor: moments, bias corrections, decoupled
//! weight decay and a gradient scale for clipping. As a composition of candle's
//! ops it made eleven full-size temporaries per tensor and a quarter of a small
//! model's training step (BENCHMARKS.md, issue 19); PyTorch runs it in place.
//!
//! The arithmetic is the composition's, operation by operation in f32 (each
//! `affine` is `x·a + b`), so a step gives the same bits either way.

use super::Shared;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};

/// AdamW's settings for one step, the bias corrections already worked out.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 − lr·weight_decay`: the decay applied to the weights first.
    pub decay: f64,
    /// `1 − beta2^t`.
    pub bias2: f64,
    /// `lr / (1 − beta1^t)`.
    pub step_size: f64,
    /// The gradient is multiplied by this first (clipping), when set.
    pub grad_scale: Option<f64>,
}

/// Elements a task takes at a time (a few hundred KiB of each stream).
const CHUNK: usize = 1 << 16;

/// One AdamW update of `param` (a variable: written in place, as `Var::set`
/// does) from gradient `grad` and moments `(m, v)`; returns the new moments. On
/// the CPU with contiguous f32 tensors it is one pass; `None` elsewhere (the
/// caller composes the update from candle's ops).
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamWStep,
) -> Result<Option<(Tensor, Tensor)>> {
    let fits = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == DType::F32
            && t.is_contiguous()
            && t.dims() == param.dims()
    };
    if !(fits(param) && fits(grad) && fits(m) && fits(v)) {
        return Ok(None);
    }
    let n = param.elem_count();
    // Every element is written by the update: no zeroing pass first.
    let mut new_m: Vec<f32> = Vec::with_capacity(n);
    let mut new_v: Vec<f32> = Vec::with_capacity(n);
    // Read (and let go) before the other tensors' locks are taken.
    let Some(weights) = buffer(&param.storage_and_layout().0) else {
        return Ok(None);
    };
    {
        let (gs, gl) = grad.storage_and_layout();
        let (ms, ml) = m.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Some(g), Some(mo), Some(vo)) =
            (cpu_slice(&gs, gl), cpu_slice(&ms, ml), cpu_slice(&vs, vl))
        else {
            return Ok(None);
        };
        // The write lock on the weights is taken with these read locks held:
        // weights sharing a buffer with any of them would wait on themselves.
        if [&*gs, &*ms, &*vs]
            .into_iter()
            .any(|o| buffer(o).is_none_or(|o| overlaps(&o, &weights)))
        {
            return Ok(None);
        }
        let op = Update {
            g,
            m: mo,
            v: vo,
            new_m: Shared(new_m.as_mut_ptr()),
            new_v: Shared(new_v.as_mut_ptr()),
            s: *s,
            done: std::sync::atomic::AtomicBool::new(false),
        };
        param.inplace_op1(&op)?;
        if !op.done.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(None);
        }
    }
    // SAFETY: the update ran (`done`) and wrote all n elements of both: it
    // checked that the weights hold n values, and its chunks cover them.
    unsafe {
        new_m.set_len(n);
        new_v.set_len(n);
    }
    let shape = param.shape();
    Ok(Some((
        Tensor::from_vec(new_m, shape, param.device())?,
        Tensor::from_vec(new_v, shape, param.device())?,
    )))
}

/// The addresses of a CPU f32 tensor's whole buffer (views of one buffer share
/// its lock, whatever part of it each one covers).
fn buffer(s: &Storage) -> Option<std::ops::Range<usize>> {
    match s {
        Storage::Cpu(CpuStorage::F32(d)) => {
            let r = d.as_ptr_range();
            Some(r.start as usize..r.end.max(r.start.wrapping_add(1)) as usize)
        }
        _ => None,
    }
}

fn overlaps(a: &std::ops::Range<usize>, b: &std::ops::Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

fn cpu_slice<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) => Some(&d[a..b]),
        _ => None,
    }
}

struct Update<'a> {
    g: &'a [f32],
    m: &'a [f32],
    v: &'a [f32],
    new_m: Shared,
    new_v: Shared,
    s: AdamWStep,
    /// Set once every chunk is written.
    done: std::sync::atomic::AtomicBool,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let (CpuStorage::F32(data), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw-update: a contiguous f32 variable");
        };
        let p = &mut data[a..b];
        if [self.g.len(), self.m.len(), self.v.len()] != [p.len(); 3] {
            candle_core::bail!(
                "adamw-update: {} weights, {} gradients, moments of {} and {}",
                p.len(),
                self.g.len(),
                self.m.len(),
                self.v.len()
            );
        }
        if crate::mapped::is_mapped(p.as_ptr().cast()) {
            // A view of a read-only file: never written in place.
            candle_core::bail!("adamw-update: the variable is a view of a mapped file");
        }
        let s = &self.s;
        // The composition's constants, as candle's `affine` rounds them.
        let c = Constants {
            decay: s.decay as f32,
            b1: s.beta1 as f32,
            one_b1: (1.0 - s.beta1) as f32,
            b2: s.beta2 as f32,
            one_b2: (1.0 - s.beta2) as f32,
            inv_sqrt_bias2: (1.0 / s.bias2.sqrt()) as f32,
            eps: s.eps as f32,
            step: s.step_size as f32,
            scale: s.grad_scale.map(|x| x as f32),
        };
        p.par_chunks_mut(CHUNK).enumerate().for_each(|(i, p)| {
            let at = i * CHUNK;
            let r = at..at + p.len();
            // SAFETY: chunk i writes only elements r of the new moments, whose
            // buffers have room for as many values as the weights and are owned
            // by the caller meanwhile.
            unsafe {
                update(
                    &c,
                    p,
                    (&self.g[r.clone()], &self.m[r.clone()], &self.v[r]),
                    (self.new_m.ptr().add(at), self.new_v.ptr().add(at)),
                )
            };
        });
        self.done.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

struct Constants {
    decay: f32,
    b1: f32,
    one_b1: f32,
    b2: f32,
    one_b2: f32,
    inv_sqrt_bias2: f32,
    eps: f32,
    step: f32,
    scale: Option<f32>,
}

/// Element by element, in the order of the composition (`optim::AdamW::step`):
/// `p·decay`, `m·β1 + g·(1−β1)`, `v·β2 + g²·(1−β2)`, `√v/√bias2 + eps`,
/// `m/denominator · step`, `p − update`. Written without fused multiply-adds so
/// each operation rounds as candle's does.
///
/// # Safety
/// `nm` and `nv` must have room for `p.len()` values (written, never read).
unsafe fn update(
    c: &Constants,
    p: &mut [f32],
    (g, m, v): (&[f32], &[f32], &[f32]),
    (nm, nv): (*mut f32, *mut f32),
) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    for i in 0..n {
        let g = match c.scale {
            Some(k) => g[i] * k + 0.0,
            None => g[i],
        };
        let decayed = p[i] * c.decay + 0.0;
        let m1 = (m[i] * c.b1 + 0.0) + (g * c.one_b1 + 0.0);
        let v1 = (v[i] * c.b2 + 0.0) + ((g * g) * c.one_b2 + 0.0);
        let denom = (v1.sqrt() * c.inv_sqrt_bias2 + 0.0) * 1.0 + c.eps;
        let update = (m1 / denom) * c.step + 0.0;
        p[i] = decayed - update;
        nm.add(i).write(m1);
        nv.add(i).write(v1);
    }
}
