//! The few MPI calls data-parallel training makes, on the MPI library of the
//! machine, opened when a launcher (`mpirun`, `srun`) started this process: a
//! build of pixart needs no MPI headers or libraries, and a machine without MPI
//! runs everything as one process.
//!
//! Open MPI's ABI (`libmpi.so.40`, Debian's `openmpi-bin`): handles such as
//! `MPI_COMM_WORLD` are the addresses of the library's predefined objects
//! (`ompi_mpi_comm_world`), as its `mpi.h` defines them.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

type Handle = *mut c_void;

/// Open MPI's `MPI_IN_PLACE`: the sentinel address 1, never dereferenced.
#[allow(clippy::manual_dangling_ptr)]
const IN_PLACE: *const c_void = 1 as *const c_void;

type InitThreadFn =
    unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int;
type CommQueryFn = unsafe extern "C" fn(Handle, *mut c_int) -> c_int;
type AllreduceFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle) -> c_int;
type BcastFn = unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle) -> c_int;
type CommFn = unsafe extern "C" fn(Handle) -> c_int;
type AbortFn = unsafe extern "C" fn(Handle, c_int) -> c_int;
type FinalizeFn = unsafe extern "C" fn() -> c_int;
/// `MPI_THREAD_SERIALIZED`: one thread at a time calls MPI (the trainer's).
const THREAD_SERIALIZED: c_int = 2;
const SUCCESS: c_int = 0;
/// Counts are C ints: larger buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

pub struct Mpi {
    comm_world: Handle,
    float: Handle,
    double: Handle,
    byte: Handle,
    sum: Handle,
    comm_rank: CommQueryFn,
    comm_size: CommQueryFn,
    allreduce: AllreduceFn,
    bcast: BcastFn,
    barrier: CommFn,
    abort: AbortFn,
    finalize: FinalizeFn,
}

// The handles are addresses of the library's own immutable objects.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

const LIBRARIES: &[&str] = &["libmpi.so.40", "libmpi.so"];

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a C string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "not found".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Mpi {
    /// Opens Open MPI and initialises it (`MPI_Init_thread`). The library stays
    /// loaded for the process's life (the handles point into it).
    pub fn init() -> Result<Mpi, String> {
        let mut tried = Vec::new();
        let mut lib = std::ptr::null_mut();
        for name in LIBRARIES {
            let c = CString::new(*name).map_err(|e| e.to_string())?;
            // SAFETY: loading a shared library runs its initialisers; Open MPI's
            // are meant to run in any process that links it. RTLD_GLOBAL: its
            // plugins resolve symbols against it.
            lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !lib.is_null() {
                break;
            }
            tried.push(format!("{name}: {}", last_dl_error()));
        }
        if lib.is_null() {
            return Err(format!(
                "this process was started by an MPI launcher, but Open MPI's library is not \
                 here ({}): install openmpi-bin",
                tried.join("; ")
            ));
        }
        let symbol = |name: &str| -> Result<*mut c_void, String> {
            let c = CString::new(name).map_err(|e| e.to_string())?;
            // SAFETY: `lib` is a live handle from dlopen.
            let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
            if p.is_null() {
                Err(format!(
                    "the MPI library has no `{name}`: pixart speaks Open MPI's ABI \
                     (libmpi.so.40); MPICH is not supported yet"
                ))
            } else {
                Ok(p)
            }
        };
        macro_rules! function {
            ($name:literal as $ty:ty) => {
                // SAFETY: the symbol is the function mpi.h declares with this
                // signature (handles are pointers).
                unsafe { std::mem::transmute::<*mut c_void, $ty>(symbol($name)?) }
            };
        }
        let init_thread = function!("MPI_Init_thread" as InitThreadFn);
        let mpi = Mpi {
            comm_world: symbol("ompi_mpi_comm_world")?,
            float: symbol("ompi_mpi_float")?,
            double: symbol("ompi_mpi_double")?,
            byte: symbol("ompi_mpi_byte")?,
            sum: symbol("ompi_mpi_op_sum")?,
            comm_rank: function!("MPI_Comm_rank" as CommQueryFn),
            comm_size: function!("MPI_Comm_size" as CommQueryFn),
            allreduce: function!("MPI_Allreduce" as AllreduceFn),
            bcast: function!("MPI_Bcast" as BcastFn),
            barrier: function!("MPI_Barrier" as CommFn),
            abort: function!("MPI_Abort" as AbortFn),
            finalize: function!("MPI_Finalize" as FinalizeFn),
        };
        let mut provided = 0;
        // SAFETY: MPI may be given no arguments; `provided` is an out-pointer.
        let rc = unsafe {
            init_thread(
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                THREAD_SERIALIZED,
                &mut provided,
            )
        };
        if rc != SUCCESS {
            return Err(format!("MPI_Init_thread failed (error {rc})"));
        }
        if provided < THREAD_SERIALIZED {
            return Err(format!(
                "the MPI library offers thread level {provided}; training calls it from a \
                 worker thread and needs MPI_THREAD_SERIALIZED"
            ));
        }
        Ok(mpi)
    }

    fn check(rc: c_int, what: &str) -> Result<(), String> {
        if rc == SUCCESS {
            Ok(())
        } else {
            Err(format!("{what} failed (MPI error {rc})"))
        }
    }

    pub fn rank_and_size(&self) -> Result<(usize, usize), String> {
        let (mut rank, mut size) = (0, 0);
        // SAFETY: valid out-pointers and the world communicator.
        unsafe {
            Self::check(
                (self.comm_rank)(self.comm_world, &mut rank),
                "MPI_Comm_rank",
            )?;
            Self::check(
                (self.comm_size)(self.comm_world, &mut size),
                "MPI_Comm_size",
            )?;
        }
        Ok((rank as usize, size as usize))
    }

    pub fn allreduce_sum_f32(&self, data: &mut [f32]) -> Result<(), String> {
        self.allreduce_sum(data, self.float)
    }

    pub fn allreduce_sum_f64(&self, data: &mut [f64]) -> Result<(), String> {
        self.allreduce_sum(data, self.double)
    }

    /// Sums `data` in place over the ranks; `datatype` is MPI's name of `T`.
    fn allreduce_sum<T>(&self, data: &mut [T], datatype: Handle) -> Result<(), String> {
        for part in data.chunks_mut(MAX_COUNT) {
            // SAFETY: `part` is `part.len()` values of the type `datatype` names,
            // reduced in place.
            let rc = unsafe {
                (self.allreduce)(
                    IN_PLACE,
                    part.as_mut_ptr().cast(),
                    part.len() as c_int,
                    datatype,
                    self.sum,
                    self.comm_world,
                )
            };
            Self::check(rc, "MPI_Allreduce")?;
        }
        Ok(())
    }

    /// Rank 0's bytes into `data` on every rank.
    pub fn broadcast(&self, data: &mut [u8]) -> Result<(), String> {
        for part in data.chunks_mut(MAX_COUNT) {
            // SAFETY: `part` is `part.len()` bytes.
            let rc = unsafe {
                (self.bcast)(
                    part.as_mut_ptr().cast(),
                    part.len() as c_int,
                    self.byte,
                    0,
                    self.comm_world,
                )
            };
            Self::check(rc, "MPI_Bcast")?;
        }
        Ok(())
    }

    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: the world communicator.
        Self::check(unsafe { (self.barrier)(self.comm_world) }, "MPI_Barrier")
    }

    /// Ends every rank of the job.
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: the world communicator; MPI_Abort does not return.
        unsafe {
            (self.abort)(self.comm_world, code);
        }
        std::process::exit(code)
    }

    pub fn finalize(&self) -> Result<(), String> {
        // SAFETY: called once, after the last collective.
        Self::check(unsafe { (self.finalize)() }, "MPI_Finalize")
    }

    /// A float buffer's bytes, for [`broadcast`](Self::broadcast).
    pub fn float_bytes(data: &mut [f32]) -> &mut [u8] {
        // SAFETY: f32 has no invalid bit patterns and u8 no alignment.
        unsafe {
            std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), std::mem::size_of_val(data))
        }
    }
}
