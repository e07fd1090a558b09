//! Weights that stay in the file they came from: a safetensors file mapped
//! read-only, each tensor a vector over its bytes in the mapping.
//!
//! Why: reading a 2.4 GB transformer copies every byte into fresh memory, and on
//! the VMs we run on, fresh memory costs ~1–2 s per GiB the first time a process
//! touches it (the host backs the guest's pages on first use). A mapping costs
//! nothing until a weight is read, and then only maps the page cache's pages, as
//! PyTorch does for safetensors. Changing the file under a running process is
//! then as unsafe as it is for PyTorch: the loaders never write weights in place
//! (checkpoints are written to a new file and renamed). The mapping is
//! read-only: nothing writes into a loaded weight, and a write would fault
//! loudly rather than copy pages unseen.
//!
//! candle keeps CPU tensors in `Vec`s, so a mapped tensor is a `Vec` whose
//! memory the global allocator did not hand out. That is sound only where the
//! global allocator is a [`MappedAware`], which sends such pointers back here
//! instead of freeing them itself: a program opts in with [`enable`]. Elsewhere
//! (other binaries, most tests) weights are read as before.

use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Set once the global allocator hands mapped pointers back here.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Mappings alive now: a free looks no further while there are none.
static ALIVE: AtomicUsize = AtomicUsize::new(0);

/// Mappings alive at once (a sharded T5 has a few files; every model of a
/// pipeline, several pipelines in a server's cache). Past this, files are read.
const SLOTS: usize = 256;

/// Where one mapping lies. Every free asks whether its pointer lies in a
/// mapping, so the answer is read without a lock: a slot's `version` is odd
/// while it is being rewritten, and a reader that saw it change reads again.
struct Slot {
    version: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            version: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
        }
    }

    /// Rewritten under [`HOLDS`]' lock (one writer at a time).
    fn set(&self, start: usize, len: usize) {
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.version.store(v.wrapping_add(2), Ordering::Release);
    }

    /// Whether `p` lies in this slot's mapping, read consistently.
    fn holds(&self, p: usize) -> bool {
        loop {
            let v = self.version.load(Ordering::Acquire);
            if v % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let start = self.start.load(Ordering::Relaxed);
            let len = self.len.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.version.load(Ordering::Relaxed) == v {
                return len > 0 && p >= start && p - start < len;
            }
        }
    }
}

static SLOT_TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// Slots ever used: lookups scan no further.
static USED: AtomicUsize = AtomicUsize::new(0);

/// Per slot, the vectors over its mapping not yet freed plus the loader's own
/// hold (0: the slot is free). The lock also makes one writer of the slots at
/// a time. Nothing done under it allocates: the allocator calls in here.
static HOLDS: Mutex<[usize; SLOTS]> = Mutex::new([0; SLOTS]);

fn holds() -> std::sync::MutexGuard<'static, [usize; SLOTS]> {
    // Nothing panics while holding the lock; a poisoned one is still consistent.
    HOLDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lets the loaders map weights. The `PIXART_MAP_WEIGHTS=0` environment
/// variable keeps them reading.
///
/// # Safety
/// The global allocator must be a [`MappedAware`].
pub unsafe fn enable() {
    let off = std::env::var("PIXART_MAP_WEIGHTS").is_ok_and(|v| v == "0");
    ENABLED.store(!off, Ordering::Release);
}

/// Whether loaders map weights in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Files mapped now (for tests and diagnostics).
pub fn mappings_alive() -> usize {
    ALIVE.load(Ordering::Acquire)
}

/// The slot whose mapping `p` lies in, without a lock.
fn slot_of(p: usize) -> Option<usize> {
    if ALIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let used = USED.load(Ordering::Acquire);
    (0..used).find(|&i| SLOT_TABLE[i].holds(p))
}

/// Whether `p` points into a live mapping.
pub fn is_mapped(p: *const u8) -> bool {
    slot_of(p as usize).is_some()
}

/// Drops one hold of slot `i`; the last one frees the slot and unmaps the file
/// (after the lock is let go: unmapping gigabytes takes a while).
fn drop_hold(i: usize) {
    let mut holds = holds();
    holds[i] -= 1;
    if holds[i] > 0 {
        return;
    }
    let slot = &SLOT_TABLE[i];
    let (start, len) = (
        slot.start.load(Ordering::Relaxed),
        slot.len.load(Ordering::Relaxed),
    );
    slot.set(0, 0);
    ALIVE.fetch_sub(1, Ordering::AcqRel);
    drop(holds);
    // SAFETY: the range is the mapping `Mapping::new` made, nothing refers to
    // it any more (every vector over it has been freed), and no slot names it.
    unsafe { libc::munmap(start as *mut libc::c_void, len) };
}

/// A mapped vector's memory freed (`size` bytes at `p`): `true` when `p` was
/// one (its hold is dropped), `false` when the allocator frees it itself.
fn release(p: *const u8, size: usize) -> bool {
    let Some(i) = slot_of(p as usize) else {
        return false;
    };
    // This vector's hold keeps the mapping until `drop_hold`.
    forget_pages(p as usize, size);
    drop_hold(i);
    true
}

/// A freed vector's pages need not stay in the process while the mapping stays
/// for other tensors (a weight converted at load read them once). Only pages
/// wholly inside the freed range go; the file's pages stay in the page cache.
fn forget_pages(start: usize, size: usize) {
    const PAGE: usize = 4096;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(PAGE);
    let first = start.div_ceil(page) * page;
    let end = (start + size) / page * page;
    if end > first {
        // SAFETY: whole pages inside a live private file mapping that no
        // tensor refers to any more; they would read back from the file.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
    }
}

/// Plain data whose every bit pattern is a value: what a tensor's bytes in a
/// file may be read as.
pub trait Plain: Copy + private::Sealed {}

mod private {
    pub trait Sealed {}
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl private::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(f32, f64, half::f16, half::bf16, i64, u32, u8);

/// A file mapped for the time a loader reads it; vectors taken from it
/// ([`Mapping::vec`]) keep it mapped after the loader is done.
pub struct Mapping {
    slot: usize,
    start: usize,
    len: usize,
}

impl Mapping {
    /// `file` (of `len` bytes) mapped, or `None` where mapping is not enabled,
    /// not possible here, or every slot is taken (the caller reads instead).
    pub fn new(file: &std::fs::File, len: u64) -> Option<Mapping> {
        use std::os::fd::AsRawFd;
        if !enabled() || len == 0 || cfg!(target_endian = "big") {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        // SAFETY: a fresh read-only private mapping of an open file; the kernel
        // picks the address. Nothing is read until a weight is used.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let mut holds = holds();
        let Some(slot) = holds.iter().position(|&h| h == 0) else {
            drop(holds);
            // SAFETY: the mapping just made, not handed out.
            unsafe { libc::munmap(p, len) };
            return None;
        };
        holds[slot] = 1;
        SLOT_TABLE[slot].set(start, len);
        USED.fetch_max(slot + 1, Ordering::AcqRel);
        ALIVE.fetch_add(1, Ordering::AcqRel);
        Some(Mapping { slot, start, len })
    }

    /// The `n` elements of `T` at byte `offset` as a vector over the mapping,
    /// or `None` where they are not aligned for `T` or lie past the end (the
    /// caller reads them).
    pub fn vec<T: Plain>(&self, offset: usize, n: usize) -> Option<Vec<T>> {
        let bytes = n.checked_mul(std::mem::size_of::<T>())?;
        if offset.checked_add(bytes)? > self.len {
            return None;
        }
        let p = self.start + offset;
        if !p.is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        if bytes == 0 {
            return Some(Vec::new());
        }
        holds()[self.slot] += 1;
        // SAFETY: `n` aligned elements of a type every bit pattern of which is
        // a value, inside a live mapping that stays until this vector is freed:
        // the global allocator is a `MappedAware` (the contract of `enable`,
        // without which `new` maps nothing), which gives the pointer to
        // `release` rather than freeing it.
        Some(unsafe { Vec::from_raw_parts(p as *mut T, n, n) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        drop_hold(self.slot);
    }
}

/// A global allocator around `inner` that gives mapped vectors' pointers back
/// to this module and everything else to `inner`.
pub struct MappedAware<A> {
    inner: A,
}

impl<A> MappedAware<A> {
    /// # Safety
    /// Only as the global allocator (`#[global_allocator]`), and then call
    /// [`enable`] to let the loaders map weights.
    pub const unsafe fn new(inner: A) -> MappedAware<A> {
        MappedAware { inner }
    }
}

// SAFETY: every request goes to `inner` but the pointers of mapped vectors,
// which `release` accounts for and which a reallocation copies into memory from
// `inner` first.
unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for MappedAware<A> {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.inner.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.inner.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        if release(p, layout.size()) {
            return;
        }
        self.inner.dealloc(p, layout)
    }

    unsafe fn realloc(&self, p: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        if is_mapped(p) {
            let moved = self
                .inner
                .alloc(std::alloc::Layout::from_size_align_unchecked(
                    size,
                    layout.align(),
                ));
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(p, moved, size.min(layout.size()));
                release(p, layout.size());
            }
            return moved;
        }
        self.inner.realloc(p, layout, size)
    }
}
