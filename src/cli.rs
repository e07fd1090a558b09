//! Subcommands.

use crate::progress::ProgressView;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pixart_runtime::executor::{CachePolicy, Executor, NodeStatus, RunOptions};
use pixart_runtime::workflow::{load_workflow_file, Workflow, WorkflowError};
use pixart_runtime::{export, CancellationToken, Registry, Value};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pixart",
    version,
    about = "pixart-flow: run PixArt-α text-to-image workflows"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Load every plugin (`*.wasm` component) in this folder. Default:
    /// $PIXART_PLUGINS, else ~/.local/share/pixart/plugins when it exists.
    #[arg(long, global = true, value_name = "DIR")]
    plugins: Option<PathBuf>,
    /// How the CPU computes f32 matrix products: `f32` (the default, what the
    /// parity tests hold), or `bf16`: operands rounded to bf16, sums in f32, on
    /// AMX tiles (Intel Sapphire Rapids and later; f32 elsewhere), as PyTorch's
    /// `fp32_precision = "bf16"`. Default: $PIXART_MATMUL_PRECISION, else f32.
    #[arg(long, global = true, value_name = "f32|bf16")]
    matmul_precision: Option<String>,
}

/// The `--matmul-precision` in force: the flag, else the environment, else f32.
fn matmul_precision(flag: Option<String>) -> Result<pixart_models::kernels::MatmulPrecision> {
    use pixart_models::kernels::MatmulPrecision;
    let value = flag.or_else(|| std::env::var("PIXART_MATMUL_PRECISION").ok());
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("f32") | Some("highest") => Ok(MatmulPrecision::F32),
        Some("bf16") => Ok(MatmulPrecision::Bf16),
        Some(other) => anyhow::bail!(
            "matmul precision {other:?}: expected f32 or bf16 (--matmul-precision or PIXART_MATMUL_PRECISION)"
        ),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a workflow.
    Run {
        /// The workflow YAML file.
        workflow: PathBuf,
        /// Override a parameter: --set seed=3 (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Folder that relative output paths are written under (relative input
        /// paths that name nothing in the current folder are read from it too).
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Run only what these nodes need (repeatable); default: every output node.
        #[arg(long = "target", value_name = "NODE")]
        targets: Vec<String>,
        /// How many nodes may run at once (default: the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
        /// Where model nodes with `device: auto` run: cpu, or cuda (needs a build
        /// with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Check a workflow without running it; exit 1 with every error found.
    Validate {
        workflow: PathBuf,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the node types: inputs (types, defaults, ranges, choices) and outputs.
    Nodes {
        /// Print the catalog as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a workflow's graph.
    Graph {
        workflow: PathBuf,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Serve the browser editor and the HTTP/WebSocket API.
    Serve(crate::serve::ServeArgs),
    /// Execute the runs of a shared queue (`pixart serve --queue`): one worker
    /// per GPU, on any number of hosts sharing the output folder.
    Worker(crate::serve::WorkerArgs),
    /// Measure the runtime's own overhead per node (validation and execution).
    Bench(crate::bench::BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

/// A size flag in GiB, as bytes: positive and finite.
pub(crate) fn gib_flag(flag: &str, gib: f64) -> Result<u64> {
    if gib.is_finite() && gib > 0.0 {
        Ok((gib * (1u64 << 30) as f64) as u64)
    } else {
        bail!("{flag} {gib}: give a positive size in GiB")
    }
}

pub fn registry() -> Registry {
    crate::plugins::base_registry()
}

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    crate::plugins::set_dir(cli.plugins).map_err(anyhow::Error::msg)?;
    let precision = matmul_precision(cli.matmul_precision)?;
    if precision == pixart_models::kernels::MatmulPrecision::Bf16
        && pixart_models::kernels::bf16_engine().is_none()
    {
        tracing::warn!(
            "bf16 matmul precision asked for, but this CPU has no AMX tiles: products stay f32"
        );
    }
    pixart_models::kernels::set_matmul_precision(precision);
    match cli.command {
        Command::Run {
            workflow,
            set,
            out,
            targets,
            jobs,
            device,
        } => {
            pixart_nodes::device::device(&device).map_err(anyhow::Error::msg)?;
            pixart_nodes::device::set_default_device(&device);
            run(&workflow, &set, out, targets, jobs).await
        }
        Command::Validate {
            workflow,
            set,
            json,
        } => validate(&workflow, &set, json),
        Command::Nodes { json } => nodes(json),
        Command::Graph { workflow, format } => {
            let wf = match load(&workflow, &[])? {
                Ok(wf) => wf,
                Err(code) => return Ok(code),
            };
            emit(&match format {
                GraphFormat::Dot => export::to_dot(&wf),
                GraphFormat::Mermaid => export::to_mermaid(&wf),
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Serve(args) => crate::serve::serve(args).await,
        Command::Worker(args) => crate::serve::worker(args).await,
    }
}

fn parse_sets(set: &[String]) -> Result<Vec<(String, String)>> {
    set.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => bail!("--set {s:?}: write NAME=VALUE"),
        })
        .collect()
}

/// Loads a workflow, printing its findings; `Err(exit code)` when it is invalid.
fn load(path: &Path, set: &[String]) -> Result<Result<Workflow, ExitCode>> {
    let overrides = parse_sets(set)?;
    let loaded = crate::plugins::registry_for(path)
        .and_then(|registry| load_workflow_file(path, &registry, &overrides));
    match loaded {
        Ok(wf) => {
            for w in &wf.warnings {
                eprintln!("{w}");
            }
            Ok(Ok(wf))
        }
        Err(e) => {
            eprint!("{e}");
            Ok(Err(ExitCode::FAILURE))
        }
    }
}

fn validate(path: &Path, set: &[String], json: bool) -> Result<ExitCode> {
    let overrides = parse_sets(set)?;
    let result = crate::plugins::registry_for(path)
        .and_then(|registry| load_workflow_file(path, &registry, &overrides));
    if json {
        let (ok, diagnostics) = match &result {
            Ok(wf) => (true, wf.warnings.clone()),
            Err(WorkflowError { diagnostics }) => (false, diagnostics.clone()),
        };
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(
                &serde_json::json!({ "ok": ok, "diagnostics": diagnostics })
            )?
        ));
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    match result {
        Ok(wf) => {
            let mut out = String::new();
            for w in &wf.warnings {
                let _ = writeln!(out, "{w}");
            }
            let _ = writeln!(
                out,
                "{}: ok ({} nodes, {} edges)",
                path.display(),
                wf.nodes.len(),
                wf.graph.edge_count()
            );
            emit(&out);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            emit(&e.to_string());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn nodes(json: bool) -> Result<ExitCode> {
    let registry = registry();
    let catalog = registry.catalog();
    if json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&catalog)?));
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    let mut category = None;
    for spec in catalog {
        if category != Some(spec.category.as_str()) {
            category = Some(spec.category.as_str());
            let _ = writeln!(out, "\n[{}]", spec.category);
        }
        let mut flags = Vec::new();
        if spec.output_node {
            flags.push("output");
        }
        if !spec.deterministic {
            flags.push("not cached");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        };
        let _ = writeln!(out, "{}{flags}\n    {}", spec.id(), spec.description);
        for i in &spec.inputs {
            let mut line = format!("    in  {}: {}", i.name, i.ty);
            if let Some(d) = &i.default {
                line.push_str(&format!(" = {d}"));
            } else if !i.required {
                line.push_str(" (optional)");
            }
            match (i.min, i.max) {
                (Some(lo), Some(hi)) => line.push_str(&format!(" [{lo}..{hi}]")),
                (Some(lo), None) => line.push_str(&format!(" [>= {lo}]")),
                (None, Some(hi)) => line.push_str(&format!(" [<= {hi}]")),
                _ => {}
            }
            let _ = writeln!(out, "{line}");
        }
        for o in &spec.outputs {
            let _ = writeln!(out, "    out {}: {}", o.name, o.ty);
        }
    }
    emit(&out);
    Ok(ExitCode::SUCCESS)
}

async fn run(
    path: &Path,
    set: &[String],
    out: PathBuf,
    targets: Vec<String>,
    jobs: Option<usize>,
) -> Result<ExitCode> {
    // Under an MPI launcher (`mpirun -np N pixart run …`): one rank of a
    // data-parallel training job.
    let world = pixart_nodes::distributed::init_from_env()
        .map_err(anyhow::Error::msg)?
        .filter(|w| w.size() > 1);
    let wf = match load(path, set)? {
        Ok(wf) => wf,
        Err(code) => return Ok(code),
    };
    let mut executor = Executor::new(CachePolicy::None);
    if let Some(jobs) = jobs {
        executor = executor.with_max_parallel(jobs);
    }
    let mut rank_job = None;
    if let Some(w) = world {
        // Nodes one at a time, in the workflow's order: the training nodes'
        // collectives then meet in the same order on every rank.
        executor = executor.with_max_parallel(1);
        let trainers = trainer_nodes(&wf, &targets)?;
        if !trainers.is_empty() {
            let needed = wf.needed(&trainers).map_err(anyhow::Error::msg)?;
            pixart_nodes::distributed::set_nodes_on_every_rank(
                wf.nodes
                    .iter()
                    .zip(needed)
                    .filter(|(_, needed)| *needed)
                    .map(|(n, _)| n.id.to_string()),
            );
        }
        if w.rank() != 0 {
            match RankJob::new(trainers, &out)? {
                Some(job) => rank_job = Some(job),
                None => {
                    w.finalize().map_err(anyhow::Error::msg)?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: cancelling the run (finished outputs are kept)");
            on_interrupt.cancel();
        }
    });
    // The other ranks draw no progress and write only into their scratch folder.
    let view = rank_job
        .is_none()
        .then(|| ProgressView::start(&executor, &wf));
    let opts = match &rank_job {
        Some(job) => RunOptions {
            targets: job.trainers.clone(),
            out_dir: job.scratch.path().to_path_buf(),
            read_also: Some(out),
            ..RunOptions::default()
        },
        None => RunOptions {
            targets,
            out_dir: out,
            ..RunOptions::default()
        },
    };
    let opts = RunOptions {
        base_dir: PathBuf::from("."),
        cancel,
        run_id: None,
        confine_paths: false,
        previews: false,
        ..opts
    };
    let report = executor
        .run(&wf, opts)
        .await
        .context("cannot start the run")?;
    if let Some(view) = view {
        view.finish().await;
    }
    if let Some(w) = world {
        // A rank that failed ends the job: the others would wait in their next
        // collective.
        if let Some(f) = report.failures.first() {
            w.abort(&format!(
                "node `{}` ({}) failed: {}",
                f.node, f.node_type, f.message
            ));
        }
        if w.rank() == 0 {
            println!(
                "{} ranks; rank 0 spent {:.2?} in collectives (moving gradients and waiting \
                 for the others)",
                w.size(),
                w.time_in_collectives()
            );
        }
        w.finalize().map_err(anyhow::Error::msg)?;
        if rank_job.is_some() {
            return Ok(if report.cancelled {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            });
        }
    }

    let executed = report.count(|s| matches!(s, NodeStatus::Executed { .. }));
    let cached = report.count(|s| matches!(s, NodeStatus::Cached));
    println!(
        "{} nodes: {executed} executed, {cached} cached, {} failed, in {:.2?}",
        report.nodes.len(),
        report.failures.len(),
        report.elapsed
    );
    for n in &report.nodes {
        if !wf
            .node_index(&n.id)
            .is_some_and(|i| wf.nodes[i].node.spec().output_node)
        {
            continue;
        }
        for (name, value) in &n.outputs {
            println!("  {}.{name}: {}", n.id, describe(value));
        }
    }
    for f in &report.failures {
        eprintln!(
            "error: node `{}` ({}) failed: {}",
            f.node, f.node_type, f.message
        );
        if !f.lost_outputs.is_empty() {
            eprintln!("  not produced: {}", f.lost_outputs.join(", "));
        }
    }
    Ok(if report.cancelled {
        eprintln!("run cancelled");
        ExitCode::from(130)
    } else if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What a rank other than 0 of an MPI job runs: the training nodes (and what
/// they need) among what the run produces, writing into a scratch folder of its
/// own; rank 0 runs the whole workflow and alone writes into `--out`.
struct RankJob {
    trainers: Vec<String>,
    scratch: tempfile::TempDir,
}

/// The `train.pixart` nodes among what a run of `targets` produces: under MPI
/// every rank runs these and what they need.
fn trainer_nodes(wf: &Workflow, targets: &[String]) -> Result<Vec<String>> {
    let needed = wf.needed(targets).map_err(anyhow::Error::msg)?;
    Ok(wf
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| needed[*i] && n.node.spec().name == "train.pixart")
        .map(|(_, n)| n.id.to_string())
        .collect())
}

impl RankJob {
    fn new(trainers: Vec<String>, out: &Path) -> Result<Option<RankJob>> {
        if trainers.is_empty() {
            eprintln!("this workflow trains nothing: rank 0 runs it alone");
            return Ok(None);
        }
        let scratch = tempfile::Builder::new()
            .prefix("pixart-rank-")
            .tempdir()
            .with_context(|| {
                format!(
                    "cannot make this rank's scratch folder in the temporary folder (rank 0 writes into {})",
                    out.display()
                )
            })?;
        Ok(Some(RankJob { trainers, scratch }))
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::List(items) => items.iter().map(describe).collect::<Vec<_>>().join(", "),
        other => other
            .to_text()
            .unwrap_or_else(|| other.to_json().to_string()),
    }
}

/// Writes to stdout; a closed pipe (`pixart nodes | head`) ends output quietly.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush());
}
