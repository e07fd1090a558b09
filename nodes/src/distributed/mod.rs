//! Training across processes (issue 24): the world this process belongs to
//! (rank, size) when an MPI launcher started it (`mpirun -np N pixart run …`,
//! `srun`), and the collectives data-parallel training needs. Without a
//! launcher there is no world and everything runs as one process.
//!
//! Every collective has a deadline: a rank that died or hangs ends the whole job
//! with a message on every rank (`MPI_Abort`) instead of leaving the others
//! waiting forever. `PIXART_COLLECTIVE_TIMEOUT` (seconds, default 600) sets it.

mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct World {
    rank: usize,
    size: usize,
    /// This rank's place among the ranks on its machine: the GPU it takes.
    local_rank: usize,
    mpi: mpi::Mpi,
    /// Milliseconds since `epoch` by which the collective under way must end;
    /// 0 when none is.
    deadline: AtomicU64,
    epoch: Instant,
    timeout: Duration,
    /// What the collective under way is for, for the watchdog's message.
    current: std::sync::Mutex<String>,
    /// Nanoseconds spent in collectives so far (moving data and waiting for
    /// the other ranks).
    spent: AtomicU64,
    /// The NCCL communicator, made at the first sum of tensors on a GPU.
    #[cfg(feature = "nccl")]
    nccl: OnceLock<nccl::Nccl>,
}

static WORLD: OnceLock<Option<World>> = OnceLock::new();

/// Environment variables MPI launchers set in the processes they start.
const LAUNCHER_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"];

/// Joins the MPI job this process was launched into, once; `None` when no
/// launcher started it (or it started one process only).
pub fn init_from_env() -> Result<Option<&'static World>, String> {
    if let Some(world) = WORLD.get() {
        return Ok(world.as_ref());
    }
    if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        return Ok(WORLD.get_or_init(|| None).as_ref());
    }
    let mpi = mpi::Mpi::init()?;
    let (rank, size) = mpi.rank_and_size()?;
    let timeout = std::env::var("PIXART_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(Duration::from_secs(600), Duration::from_secs_f64);
    let local_rank = local_rank_from(|v| std::env::var(v).ok()).unwrap_or(0);
    let world = World {
        rank,
        size,
        local_rank,
        mpi,
        deadline: AtomicU64::new(0),
        epoch: Instant::now(),
        timeout,
        current: std::sync::Mutex::new(String::new()),
        spent: AtomicU64::new(0),
        #[cfg(feature = "nccl")]
        nccl: OnceLock::new(),
    };
    let world = WORLD.get_or_init(|| Some(world)).as_ref();
    if let Some(w) = world {
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || w.watch())
            .map_err(|e| format!("cannot start the collective watchdog: {e}"))?;
    }
    Ok(world)
}

/// Variables in which launchers give a rank's place on its machine: Open MPI's
/// `mpirun`, SLURM's `srun`, MPICH's and Intel MPI's Hydra, and torchrun's
/// (for a user's wrapper script that sets it).
const LOCAL_RANK_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
    "MPI_LOCALRANKID",
    "LOCAL_RANK",
];

fn local_rank_from(get: impl Fn(&str) -> Option<String>) -> Option<usize> {
    LOCAL_RANK_VARS
        .iter()
        .find_map(|v| get(v).and_then(|s| s.trim().parse().ok()))
}

/// The GPU `cuda` means for this process: its local rank in a job of several
/// ranks (one GPU per rank, as `torch.distributed` users set it), 0 otherwise.
pub fn local_gpu() -> usize {
    world().map_or(0, |w| w.local_rank)
}

/// The nodes that run on every rank (the training nodes and what they need):
/// only these may take part in collectives, so that the ranks' collectives meet
/// in the same order. Set once by the CLI, on every rank alike.
static JOINED: OnceLock<std::collections::HashSet<String>> = OnceLock::new();

pub fn set_nodes_on_every_rank(ids: impl IntoIterator<Item = String>) {
    let _ = JOINED.set(ids.into_iter().collect());
}

/// The world, when node `id` runs on every rank of it (see
/// [`set_nodes_on_every_rank`]); `None` otherwise, and without a world.
pub fn world_for(id: &str) -> Option<&'static World> {
    world().filter(|_| JOINED.get().is_some_and(|ids| ids.contains(id)))
}

/// The job this process is a rank of, when it has more than one.
pub fn world() -> Option<&'static World> {
    WORLD.get().and_then(Option::as_ref).filter(|w| w.size > 1)
}

impl World {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Sums the contiguous f32 tensor `t` over the ranks, in place, when NCCL can:
    /// `t` on a GPU and pixart built with the `nccl` feature. Returns whether it
    /// did; the caller sums through MPI otherwise. The communicator is made at
    /// the first call, which every rank makes at the same point of the step.
    pub fn sum_on_device(&self, t: &candle_core::Tensor, what: &str) -> Result<bool, String> {
        #[cfg(feature = "nccl")]
        if let candle_core::Device::Cuda(device) = t.device() {
            let comm = match self.nccl.get() {
                Some(comm) => comm,
                None => {
                    let comm = nccl::Nccl::join(self, device)?;
                    self.nccl.get_or_init(|| comm)
                }
            };
            if !candle_core::backend::BackendDevice::same_device(comm.device(), device) {
                return Err(format!(
                    "{what}: the tensor is on another GPU than the one this rank's NCCL communicator was made for"
                ));
            }
            self.timed(what, || comm.sum_in_place(t))?;
            return Ok(true);
        }
        let _ = (t, what);
        Ok(false)
    }

    /// The samples `start..start + len` of a batch of `total` that this rank
    /// takes: contiguous, sizes differing by at most one, in rank order.
    pub fn slice_of(&self, total: usize) -> (usize, usize) {
        let (base, extra) = (total / self.size, total % self.size);
        let start = self.rank * base + self.rank.min(extra);
        (start, base + usize::from(self.rank < extra))
    }

    /// Sums `data` over the ranks, in place on every rank.
    pub fn sum_f32(&self, data: &mut [f32], what: &str) -> Result<(), String> {
        self.timed(what, || self.mpi.allreduce_sum_f32(data))
    }

    pub fn sum_f64(&self, data: &mut [f64], what: &str) -> Result<(), String> {
        self.timed(what, || self.mpi.allreduce_sum_f64(data))
    }

    /// Rank 0's values into `data` on every rank.
    pub fn broadcast_f32(&self, data: &mut [f32], what: &str) -> Result<(), String> {
        self.timed(what, || self.mpi.broadcast(mpi::Mpi::float_bytes(data)))
    }

    pub fn broadcast_u64(&self, value: u64, what: &str) -> Result<u64, String> {
        let mut bytes = value.to_le_bytes();
        self.timed(what, || self.mpi.broadcast(&mut bytes))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Rank 0's bytes into `data` on every rank (at most 1 MiB).
    pub fn broadcast_bytes(&self, data: &mut Vec<u8>, what: &str) -> Result<(), String> {
        let len = self.broadcast_u64(data.len() as u64, what)?;
        if len > 1 << 20 {
            return Err(format!("{what}: rank 0 sent {len} bytes, more than 1 MiB"));
        }
        data.resize(len as usize, 0);
        self.timed(what, || self.mpi.broadcast(data))
    }

    pub fn barrier(&self, what: &str) -> Result<(), String> {
        self.timed(what, || self.mpi.barrier())
    }

    /// Ends every rank of the job, after saying why on this one.
    pub fn abort(&self, why: &str) -> ! {
        eprintln!(
            "rank {} of {}: {why}; ending every rank",
            self.rank, self.size
        );
        self.mpi.abort(1)
    }

    /// Time this rank has spent in collectives: moving data, and waiting for
    /// the other ranks to arrive.
    pub fn time_in_collectives(&self) -> Duration {
        Duration::from_nanos(self.spent.load(Ordering::Relaxed))
    }

    /// Leaves the job (after the last collective).
    pub fn finalize(&self) -> Result<(), String> {
        self.mpi.finalize()
    }

    fn timed<T>(&self, what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let until = self.epoch.elapsed() + self.timeout;
        self.deadline
            .store(until.as_millis().max(1) as u64, Ordering::SeqCst);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = what.to_string();
        let started = Instant::now();
        let out = f();
        self.deadline.store(0, Ordering::SeqCst);
        self.spent
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out.map_err(|e| format!("{what}: {e}"))
    }

    /// Ends the job when a collective passes its deadline: another rank died or
    /// hangs, and MPI itself would wait forever.
    fn watch(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let deadline = self.deadline.load(Ordering::SeqCst);
            if deadline != 0 && self.epoch.elapsed().as_millis() as u64 > deadline {
                let what = self
                    .current
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                self.abort(&format!(
                    "{what} waited more than {:.0} s for the other ranks (one died or hangs; \
                     PIXART_COLLECTIVE_TIMEOUT sets the limit)",
                    self.timeout.as_secs_f64()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local_rank_from;

    #[test]
    fn local_rank_comes_from_the_launchers_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |v: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| x.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])), None);
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])),
            Some(3)
        );
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", "5")])), Some(5));
        // mpirun's own variable wins over a stale one from the batch system.
        assert_eq!(
            local_rank_from(env(&[
                ("SLURM_LOCALID", "0"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1")
            ])),
            Some(1)
        );
        assert_eq!(
            local_rank_from(env(&[("LOCAL_RANK", "x"), ("MPI_LOCALRANKID", "2")])),
            Some(2)
        );
    }
}
