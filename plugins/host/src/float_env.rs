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
            let mut saved: u32 = 0;
            // SAFETY: reads and writes this thread's SSE control register; the
            // value written differs only in FTZ/DAZ, cleared as in the default
            // environment the compiler assumes.
            unsafe {
                std::arch::asm!("stmxcsr [{}]", in(reg) &mut saved, options(nostack, preserves_flags));
                if saved & FTZ_DAZ != 0 {
                    let cleared = saved & !FTZ_DAZ;
                    std::arch::asm!("ldmxcsr [{}]", in(reg) &cleared, options(nostack, readonly, preserves_flags));
                }
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
            unsafe {
                std::arch::asm!("ldmxcsr [{}]", in(reg) &self.saved, options(nostack, readonly, preserves_flags));
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::hint::black_box;

    fn csr() -> u32 {
        let mut c: u32 = 0;
        // SAFETY: reads this thread's SSE control register.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut c, options(nostack, preserves_flags))
        };
        c
    }

    #[test]
    fn a_guest_call_keeps_subnormals_and_the_caller_gets_its_setting_back() {
        std::thread::spawn(|| {
            let flushed = csr() | FTZ_DAZ;
            // SAFETY: sets FTZ/DAZ on this test thread only.
            unsafe {
                std::arch::asm!("ldmxcsr [{}]", in(reg) &flushed, options(nostack, readonly))
            };
            let half_min = || black_box(black_box(f32::MIN_POSITIVE) * black_box(0.5f32));
            assert_eq!(half_min().to_bits(), 0);
            {
                let _ieee = IeeeFloats::enter();
                assert_eq!(csr() & FTZ_DAZ, 0);
                assert!(half_min().is_subnormal());
            }
            // The control bits; the low six are sticky exception flags.
            assert_eq!(csr() & !0x3f, flushed & !0x3f);
            assert_eq!(half_min().to_bits(), 0);
        })
        .join()
        .expect("test thread");
    }
}
