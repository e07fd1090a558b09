//! Sums over the ranks of tensors that live on GPUs, with NCCL: the data never
//! leaves the devices. The communicator is made the way `torch.distributed`
//! makes its NCCL process group: rank 0 asks NCCL for a unique id, MPI carries
//! it to the other ranks, and every rank joins with it, on the CUDA stream its
//! tensors are computed on (so the sum is ordered after the backward that made
//! the gradients, without a host synchronisation in between).

use super::World;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp1, Layout, Tensor};
use std::sync::Mutex;

pub struct Nccl {
    comm: Mutex<SendComm>,
    /// The device the communicator was made for: one per rank.
    device: CudaDevice,
}

/// NCCL's communicator handle is a pointer, so cudarc's `Comm` is not `Send`.
/// NCCL allows a communicator to be used from any thread as long as calls on it
/// do not overlap, which the mutex around it ensures.
struct SendComm(Comm);
unsafe impl Send for SendComm {}

impl Nccl {
    /// Joins every rank of `world` into one NCCL communicator on `device`.
    /// Every rank must call this at the same point (it is a collective).
    pub fn join(world: &World, device: &CudaDevice) -> Result<Nccl, String> {
        let id = if world.rank() == 0 {
            new_id()?
        } else {
            Id::uninit([0; 128])
        };
        let mut bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        world.broadcast_bytes(&mut bytes, "sending NCCL's unique id")?;
        let bytes: [u8; 128] = bytes
            .try_into()
            .map_err(|_| "rank 0 sent an NCCL id of the wrong size".to_string())?;
        let internal = bytes.map(|b| b as std::ffi::c_char);
        world.timed("joining the NCCL communicator", || {
            Nccl::with_id(Id::uninit(internal), world.rank(), world.size(), device)
        })
    }

    /// A communicator of this process alone: what a one-GPU job runs, and how a
    /// machine with one GPU checks the NCCL path.
    pub fn single(device: &CudaDevice) -> Result<Nccl, String> {
        Nccl::with_id(new_id()?, 0, 1, device)
    }

    fn with_id(id: Id, rank: usize, size: usize, device: &CudaDevice) -> Result<Nccl, String> {
        let comm = Comm::from_rank(device.cuda_stream(), rank, size, id)
            .map_err(|e| format!("NCCL cannot make its communicator: {e:?}"))?;
        Ok(Nccl {
            comm: Mutex::new(SendComm(comm)),
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// Sums the contiguous f32 tensor `t` over the ranks, in place, and waits
    /// for the sum to finish (a caller's deadline then covers the whole of it).
    pub fn sum_in_place(&self, t: &Tensor) -> Result<(), String> {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            return Err("NCCL sums contiguous f32 tensors only".into());
        }
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        t.inplace_op1(&AllReduceSum(&comm.0))
            .map_err(|e| e.to_string())?;
        comm.0
            .stream()
            .synchronize()
            .map_err(|e| format!("CUDA: {e:?}"))
    }
}

fn new_id() -> Result<Id, String> {
    Id::new().map_err(|e| format!("NCCL cannot make a unique id: {e:?}"))
}

/// candle's in-place op interface gives the op the tensor's CUDA storage.
struct AllReduceSum<'a>(&'a Comm);

impl InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums tensors on GPUs; this one is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL sums contiguous tensors only");
        };
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(start..end);
        self.0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(())
    }
}
