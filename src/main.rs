//! `pixart`: the command line of pixart-flow. Thin: it wires the runtime and the
//! built-in nodes together.

mod bench;
mod cli;
mod progress;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // candle's element-wise thread pool spins 25,000 times before parking; on a
    // machine with few cores the spinning worker takes the core gemm's threads
    // need (measured: a PixArt forward went from 233 to 169 ms on 2 cores).
    // Set before any thread exists; a user's own setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
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
