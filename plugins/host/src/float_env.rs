//! WebAssembly's floats are IEEE 754's, subnormals included; wasmtime compiles
//! them to the host's SSE instructions, which obey the thread's MXCSR. The
//! `pixart` CLI flushes subnormals on its threads for the models' speed (see
//! `pixart_models::denormals`), so a guest runs inside [`IeeeFloats`], which
//! clears FTZ and DAZ for the call and puts the caller's setting back after.

/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

/// While alive, the thread keeps subnormals; dropping it restores the control
/// register as it was.
pub(crate) struct IeeeFloats {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl IeeeFloats {
    pub(crate) fn enter() -> IeeeFloats {
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
/// Only FTZ/DAZ may differ from what [`read_csr`] gave.
#[cfg(target_arch = "x86_64")]
unsafe fn write_csr(csr: u32) {
    std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::hint::black_box;

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
