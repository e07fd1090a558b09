//! One training step split across the ranks of an MPI job (issue 24): every
//! rank builds the same global batch, computes its slice's share of the batch
//! mean, and the shares' gradients, loss and per-sample terms are summed across
//! the ranks, so clipping, AdamW and EMA see what one process would have seen.

use super::loss::{Diffusion, LossTerms};
use super::step::{share_gradients, Batch, StepPlan};
use crate::distributed::World;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use pixart_models::pixart::{ControlNet, PixArtTransformer};
use pixart_runtime::NodeError;

/// The whole batch's loss terms, mean and gradients with respect to `vars`,
/// this rank computing its slice of `batch`.
pub fn gradients(
    world: &World,
    model: &PixArtTransformer,
    controlnet: Option<&ControlNet>,
    diffusion: &Diffusion,
    batch: &Batch,
    vars: &[Var],
    plan: StepPlan,
) -> Result<(LossTerms, f64, GradStore), NodeError> {
    let b = batch.t.len();
    let (start, len) = world.slice_of(b);
    let part = batch.slice(start, len)?;
    let (terms, share, mut grads) =
        share_gradients(model, controlnet, diffusion, &part, b, vars, plan)?;

    sum_gradients(world, &mut grads, vars)?;

    let mut loss = [share];
    world
        .sum_f64(&mut loss, "summing the loss")
        .map_err(NodeError::msg)?;
    // Each rank writes its samples' rows; the sum is every sample's.
    let mut rows = vec![0f32; 3 * b];
    for (k, term) in [&terms.mse, &terms.vb, &terms.loss].into_iter().enumerate() {
        let values = term.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        rows[k * b + start..k * b + start + len].copy_from_slice(&values);
    }
    world
        .sum_f32(&mut rows, "gathering the loss terms")
        .map_err(NodeError::msg)?;
    let device = batch.x0.device();
    let term = |k: usize| Tensor::from_slice(&rows[k * b..(k + 1) * b], b, device);
    let terms = LossTerms {
        mse: term(0)?,
        vb: term(1)?,
        loss: term(2)?,
    };
    Ok((terms, loss[0], grads))
}

/// Every variable's gradient summed over the ranks, in one buffer and one
/// collective: on the GPUs through NCCL when pixart has it, through MPI on the
/// host otherwise. A variable this rank has no gradient for counts as zeros.
fn sum_gradients(world: &World, grads: &mut GradStore, vars: &[Var]) -> Result<(), NodeError> {
    let Some(first) = vars.first() else {
        return Ok(());
    };
    let device = first.as_tensor().device().clone();
    let parts = vars
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
            None => Tensor::zeros(v.as_tensor().elem_count(), DType::F32, &device),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    drop(parts);
    let what = "summing the gradients";
    let flat = if world.sum_on_device(&flat, what).map_err(NodeError::msg)? {
        flat
    } else {
        let mut host = flat.to_vec1::<f32>()?;
        world.sum_f32(&mut host, what).map_err(NodeError::msg)?;
        Tensor::from_vec(host, flat.shape(), &device)?
    };
    let mut at = 0;
    for v in vars {
        let t = v.as_tensor();
        let n = t.elem_count();
        let g = flat
            .narrow(0, at, n)?
            .reshape(t.shape())?
            .to_dtype(t.dtype())?;
        grads.insert(t, g);
        at += n;
    }
    Ok(())
}

/// `t` as rank 0 has it, on every rank.
pub fn broadcast_tensor(world: &World, t: &Tensor, what: &str) -> Result<Tensor, NodeError> {
    let mut values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    world
        .broadcast_f32(&mut values, what)
        .map_err(NodeError::msg)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
}
