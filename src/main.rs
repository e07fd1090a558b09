//! `pixart`: the command line of pixart-flow. Thin: it wires the runtime and the
//! built-in nodes together.

mod bench;
mod cli;
mod editor {
    include!(concat!(env!("OUT_DIR"), "/editor_files.rs"));
}
mod plugins;
mod progress;
mod serve;

use clap::Parser;
use pixart_models::mapped::MappedAware;
use std::process::ExitCode;

/// Tensors are large and short-lived: glibc maps every buffer over 32 MiB fresh
/// and faults in zeroed pages on each allocation (a 512 px VAE decode spent 12%
/// of its time zeroing pages); mimalloc keeps freed memory for the next tensor.
/// Wrapped so that weights can stay in their mapped files (see
/// `pixart_models::mapped`): their vectors' pointers are not mimalloc's.
#[global_allocator]
// SAFETY: the global allocator, as `MappedAware::new` asks.
static ALLOCATOR: MappedAware<mimalloc::MiMalloc> = unsafe { MappedAware::new(mimalloc::MiMalloc) };

/// How long freed memory stays with the process before mimalloc returns it.
const PURGE_DELAY_MS: std::ffi::c_long = 5_000;

/// mimalloc v3's `mi_option_purge_delay` (its `mi_option_e` in mimalloc.h; the
/// Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // mimalloc hands freed memory back to the kernel 1 s after it is freed (v3's
    // default); the next tensor of that size then faults in fresh zeroed pages
    // (a 512 px load takes longer than that delay), which on
    // these VMs costs ~1 s per GiB (`clear_page_erms`: 13% of a 512 px VAE
    // decode, most of loading). Purging after PURGE_DELAY_MS keeps memory for
    // reuse within a run and still returns it when a process idles (the
    // server). A user's MIMALLOC_PURGE_DELAY wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options; any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    // candle's element-wise thread pool spins 25,000 times before parking; on a
    // machine with few cores the spinning worker takes the core gemm's threads
    // need (measured: a PixArt forward went from 233 to 169 ms on 2 cores).
    // Set before any thread exists; a user's own setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Element-wise ops run on the thread that asks for them: the models split
    // batches over threads themselves and gemm has rayon's pool; candle's own
    // element-wise pool handing work back and forth with it cost more than it
    // gained, on 2 cores and on 16 alike (BENCHMARKS.md).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // SAFETY: ALLOCATOR is a MappedAware.
    unsafe { pixart_models::mapped::enable() };
    // Subnormal floats cost Intel cores a microcode assist per instruction (a
    // training step ran 5× slower on a Xeon); every thread that computes flushes
    // them (`pixart_runtime::float_env`). rayon's pool is built here so its
    // threads start that way; a pool that exists already is left as it is.
    pixart_runtime::float_env::flush_to_zero();
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| {
            pixart_runtime::float_env::flush_to_zero();
        })
        .build_global();
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            pixart_runtime::float_env::flush_to_zero();
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
