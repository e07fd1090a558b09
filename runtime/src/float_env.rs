//! The threads' floating-point environment: subnormal floats flushed to zero
//! on the threads that run the models, and kept for WebAssembly guests.
//!
//! Intel cores take a microcode assist, ~100+ cycles, for every vector
//! instruction that reads or makes a subnormal f32 (AMD's Zen cores do not). A
//! training step makes them: gradients of saturated activations and small
//! attention weights underflow into the subnormal range, and once there they
//! feed gemm's kernel. On a Sapphire Rapids Xeon this made `pixart bench train`
//! 5× slower than PyTorch while the same kernel ran at full speed on random
//! data (BENCHMARKS.md, issue 19). Values under 1.2e-38 carry nothing a model
//! or its parity tolerances could see, so the CPU is told to treat them as zero:
//! FTZ (results flushed) and DAZ (inputs read as zero), as oneDNN, TensorFlow
//! and `torch.set_flush_denormal(True)` do.
//!
//! The control register is per thread, and a new thread starts with its
//! creator's (POSIX threads copy it), so the CLI calls [`flush_to_zero`] first
//! thing in `main`, and again from the start hooks of rayon's and tokio's pools
//! so those hold wherever their threads come from. `PIXART_DENORMALS=keep`
//! leaves the CPU as it is.
//!
//! Rust's compiler assumes the default floating-point environment: a constant
//! it folds at compile time keeps a subnormal that the same operation at run
//! time would flush. Every library that sets FTZ takes that on (PyTorch's
//! `set_flush_denormal`, oneDNN); here it can move a value under 1.2e-38, no
//! more. WebAssembly's floats are IEEE 754's, subnormals included, and wasmtime
//! compiles them to the same SSE instructions: a plugin call runs inside
//! [`IeeeFloats`], which clears FTZ and DAZ for it and restores them after.

/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

/// Whether the user asked for subnormals to be kept (read once).
fn keep() -> bool {
    static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| std::env::var("PIXART_DENORMALS").is_ok_and(|v| v == "keep"))
}

/// Sets FTZ and DAZ on the calling thread (x86-64; a no-op elsewhere and when
/// `PIXART_DENORMALS=keep`). Returns whether the thread now flushes.
pub fn flush_to_zero() -> bool {
    if keep() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: FTZ and DAZ change what subnormal operands and results
        // become, nothing else; the module's comment says what that means for
        // values the compiler folds.
        unsafe { write_csr(read_csr() | FTZ_DAZ) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the calling thread flushes subnormals (FTZ and DAZ both set).
pub fn flushing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        read_csr() & FTZ_DAZ == FTZ_DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// This thread's SSE control and status register.
#[cfg(target_arch = "x86_64")]
fn read_csr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: stmxcsr stores the register into `csr`.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
    csr
}

/// Loads `csr` into this thread's SSE control and status register.
///
/// # Safety
/// Only FTZ/DAZ may differ from what [`read_csr`] gave: other bits (rounding
/// mode, exception masks) would change arithmetic the compiler relies on.
#[cfg(target_arch = "x86_64")]
unsafe fn write_csr(csr: u32) {
    std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
}

/// While alive, the thread keeps subnormals; dropping it restores the control
/// register as it was.
pub struct IeeeFloats {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl IeeeFloats {
    pub fn enter() -> IeeeFloats {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_csr();
            if saved & FTZ_DAZ != 0 {
                // SAFETY: only FTZ/DAZ change, cleared as in the default
                // environment the compiler assumes.
                unsafe { write_csr(saved & !FTZ_DAZ) };
            }
            IeeeFloats { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        IeeeFloats {}
    }
}

impl Drop for IeeeFloats {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.saved & FTZ_DAZ != 0 {
            // SAFETY: puts back the value `enter` read; the guard lives on the
            // stack of the guest call it wraps, on that thread.
            unsafe { write_csr(self.saved) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    #[test]
    fn subnormals_become_zero_on_a_flushing_thread() {
        std::thread::spawn(|| {
            let tiny = std::hint::black_box(f32::MIN_POSITIVE);
            // A product whose exact result is subnormal. The outer black_box
            // keeps the product from moving past the control-register write.
            let before =
                std::hint::black_box(std::hint::black_box(tiny) * std::hint::black_box(0.5f32));
            if flush_to_zero() {
                assert!(flushing());
                let after = std::hint::black_box(tiny) * std::hint::black_box(0.5f32);
                // Bits, not `== 0.0` / `> 0.0`: with DAZ set a comparison
                // reads a subnormal as zero.
                assert_eq!(after.to_bits(), 0);
                assert!(before.to_bits() != 0 && before.is_subnormal());
            }
        })
        .join()
        .expect("test thread");
        // Other threads are untouched.
        assert!(!flushing());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_guest_call_keeps_subnormals_and_the_caller_gets_its_setting_back() {
        std::thread::spawn(|| {
            let flushed = read_csr() | FTZ_DAZ;
            // SAFETY: sets FTZ/DAZ on this test thread only.
            unsafe { write_csr(flushed) };
            let half_min = || black_box(black_box(f32::MIN_POSITIVE) * black_box(0.5f32));
            assert_eq!(half_min().to_bits(), 0);
            {
                let _ieee = IeeeFloats::enter();
                assert_eq!(read_csr() & FTZ_DAZ, 0);
                assert!(half_min().is_subnormal());
            }
            // The control bits; the low six are sticky exception flags.
            assert_eq!(read_csr() & !0x3f, flushed & !0x3f);
            assert_eq!(half_min().to_bits(), 0);
        })
        .join()
        .expect("test thread");
    }
}
