//! `pixart serve` and `pixart worker`: the API with its queue in this process,
//! or front ends and workers sharing one queue in Redis.

use crate::cli::{gib_flag, registry};
use anyhow::{bail, Context, Result};
use pixart_runtime::executor::{CachePolicy, Executor};
use pixart_runtime::server::{ServerConfig, SharedQueue, State, WorkerConfig};
use pixart_runtime::CancellationToken;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to bind; anything but loopback needs --allow-remote.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8188)]
    port: u16,
    /// Outputs, uploads and the run history (with --queue: the folder the
    /// workers write into, shared with them).
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Allow binding a non-loopback address (the API runs workflows that read
    /// and write files: expose it only to people you trust).
    #[arg(long)]
    allow_remote: bool,
    /// Runs executed at once (without --queue).
    #[arg(long, default_value_t = 1)]
    parallel_runs: usize,
    /// Keep the run queue, run states, history and events in Redis, shared
    /// with every other `pixart serve --queue` and the `pixart worker`s that
    /// execute the runs: redis://HOST:PORT/DB. Without it, all stays in this
    /// process, which executes the runs itself.
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    #[command(flatten)]
    rules: RunRules,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The shared queue: redis://HOST:PORT/DB, as given to `pixart serve --queue`.
    #[arg(long, value_name = "URL")]
    queue: String,
    /// Where runs write (relative output paths): the folder the front ends
    /// serve, shared between hosts (NFS or the like).
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Runs executed at once.
    #[arg(long, default_value_t = 1)]
    parallel_runs: usize,
    /// Seconds a worker may go without renewing its hold on a run (every half
    /// second while alive) before another worker takes the run over and starts
    /// it again.
    #[arg(long, default_value_t = 30.0)]
    lease_secs: f64,
    /// This worker's name in the queue and in run records (unique per queue).
    /// Default: host/pid/device.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    rules: RunRules,
}

/// How runs are executed: where models go and what a run may take.
#[derive(clap::Args)]
struct RunRules {
    /// Where model nodes with `device: auto` run: cpu, cuda (the first GPU) or
    /// cuda:N (GPU N; one worker per GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GiB the values of one run (tensors, images) and the working memory
    /// of its nodes (a model being trained, with its optimiser) may hold.
    /// Default: an eighth of this machine's memory, between 1 and 8 GiB.
    #[arg(long)]
    run_memory_gib: Option<f64>,
    /// GiB of models one run may load. Default: five eighths of this
    /// machine's memory, at least 2.
    #[arg(long)]
    model_memory_gib: Option<f64>,
    /// GiB the output folder may hold, uploads included. Default: no quota.
    #[arg(long)]
    out_quota_gib: Option<f64>,
    /// GiB left free on the output folder's disk: writes that would pass it fail.
    #[arg(long, default_value_t = 1.0)]
    keep_free_gib: f64,
}

impl RunRules {
    /// Checks the device (and makes it what `auto` means) and the sizes.
    fn server_config(&self, out: PathBuf) -> Result<ServerConfig> {
        pixart_nodes::device::device(&self.device).map_err(anyhow::Error::msg)?;
        pixart_nodes::device::set_default_device(&self.device);
        Ok(ServerConfig {
            out_dir: out,
            base_dir: PathBuf::from("."),
            run_memory_limit: match self.run_memory_gib {
                Some(gib) => gib_flag("--run-memory-gib", gib)?,
                None => pixart_runtime::server::default_run_memory_limit(),
            },
            run_model_memory_limit: match self.model_memory_gib {
                Some(gib) => gib_flag("--model-memory-gib", gib)?,
                None => pixart_runtime::server::default_run_model_memory_limit(),
            },
            out_quota: self
                .out_quota_gib
                .map(|gib| gib_flag("--out-quota-gib", gib))
                .transpose()?,
            keep_free: if self.keep_free_gib == 0.0 {
                0
            } else {
                gib_flag("--keep-free-gib", self.keep_free_gib)?
            },
            ..Default::default()
        })
    }
}

pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let ServeArgs {
        host,
        port,
        out,
        allow_remote,
        parallel_runs,
        queue,
        rules,
    } = args;
    if !host.is_loopback() && !allow_remote {
        bail!("refusing to bind {host}: pass --allow-remote to serve beyond this machine");
    }
    if !host.is_loopback() {
        eprintln!("warning: serving on {host}: anyone who can reach it can run workflows that read and write files here");
    }
    let config = ServerConfig {
        max_parallel_runs: parallel_runs,
        allow_remote,
        editor: crate::editor::EDITOR,
        ..rules.server_config(out)?
    };
    let executor = Executor::new(CachePolicy::default());
    let state = match queue {
        None => State::start(registry(), executor, config),
        Some(url) => {
            let queue = SharedQueue::connect(&url).await?;
            eprintln!(
                "pixart serve: runs go to the shared queue at {}; start `pixart worker --queue {}` to execute them",
                queue.location(),
                queue.location()
            );
            State::start_shared(registry(), executor, config, queue)
        }
    };
    let addr = std::net::SocketAddr::new(host, port);
    eprintln!("pixart serve: the editor at http://{addr}/, the API at http://{addr}/api (OpenAPI at /api/openapi.json)");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    pixart_runtime::server::serve(state, listener).await;
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let WorkerArgs {
        queue,
        out,
        parallel_runs,
        lease_secs,
        name,
        rules,
    } = args;
    let lease = std::time::Duration::try_from_secs_f64(lease_secs)
        .ok()
        .filter(|l| *l >= pixart_runtime::server::MIN_LEASE)
        .with_context(|| {
            format!(
                "--lease-secs {lease_secs}: give at least {} seconds",
                pixart_runtime::server::MIN_LEASE.as_secs()
            )
        })?;
    if parallel_runs == 0 {
        bail!("--parallel-runs 0: give at least 1");
    }
    let name = name.unwrap_or_else(|| pixart_runtime::server::default_worker_name(&rules.device));
    let config = WorkerConfig {
        server: rules.server_config(out)?,
        parallel_runs,
        lease,
        name: name.clone(),
    };
    std::fs::create_dir_all(&config.server.out_dir).with_context(|| {
        format!(
            "cannot make the output folder {}",
            config.server.out_dir.display()
        )
    })?;
    let queue = SharedQueue::connect(&queue).await?;
    eprintln!(
        "pixart worker {name}: taking runs from {} ({parallel_runs} at a time); Ctrl+C stops taking new ones",
        queue.location()
    );
    // First Ctrl+C or SIGTERM: finish the running runs, take no new ones;
    // a second: leave now (the runs are taken over after the lease).
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    tokio::spawn(async move {
        terminated().await;
        eprintln!("pixart worker: finishing the running runs; signal again to leave now");
        stopping.cancel();
        terminated().await;
        std::process::exit(130);
    });
    pixart_runtime::server::run_worker(
        registry(),
        Executor::new(CachePolicy::default()),
        config,
        queue,
        stop,
    )
    .await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl+C or SIGTERM (what `kill`, systemd and container runtimes send).
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
