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

    // Every variable's gradient in one buffer, summed in one collective.
    let sizes: Vec<usize> = vars.iter().map(|v| v.as_tensor().elem_count()).collect();
    let mut flat = Vec::with_capacity(sizes.iter().sum());
    for (v, &n) in vars.iter().zip(&sizes) {
        match grads.get(v.as_tensor()) {
            Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, n)),
        }
    }
    world
        .sum_f32(&mut flat, "summing the gradients")
        .map_err(NodeError::msg)?;
    let mut at = 0;
    for (v, &n) in vars.iter().zip(&sizes) {
        let t = v.as_tensor();
        let g =
            Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
        grads.insert(t, g);
        at += n;
    }

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

/// `t` as rank 0 has it, on every rank.
pub fn broadcast_tensor(world: &World, t: &Tensor, what: &str) -> Result<Tensor, NodeError> {
    let mut values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    world
        .broadcast_f32(&mut values, what)
        .map_err(NodeError::msg)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
}
