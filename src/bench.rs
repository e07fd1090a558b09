//! `pixart bench`: the runtime's own cost per node, measured on generated graphs
//! of nodes that do nothing, so only parsing, validation, scheduling, caching and
//! events are timed.

use anyhow::Result;
use clap::{Args, ValueEnum};
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions};
use pixart_runtime::workflow::{load_workflow, LoadOptions};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Registry, Value,
};
use std::fmt::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// Nodes in the generated graph.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Graph shape.
    #[arg(long, value_enum, default_value_t = Shape::Layered)]
    shape: Shape,
    /// Measured repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Shape {
    /// Each node reads the previous one: no parallelism.
    Chain,
    /// Layers of 100 nodes, each reading two nodes of the layer before.
    Layered,
}

struct NoOp {
    spec: NodeSpec,
}

impl NoOp {
    fn new(name: &str, inline: bool) -> NoOp {
        let mut spec = NodeSpec::new(name, 1)
            .category("bench")
            .input(InputSpec::new("a", PortType::Int).optional())
            .input(InputSpec::new("b", PortType::Int).optional())
            .output("out", PortType::Int, "");
        if inline {
            spec = spec.inline();
        }
        NoOp { spec }
    }
}

impl Node for NoOp {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, _inputs: Inputs) -> Result<Outputs, NodeError> {
        Ok(Outputs::one("out", Value::Int(0)))
    }
}

fn workflow_yaml(n: usize, shape: Shape, node_type: &str) -> String {
    let mut s = String::from("version: 1\nnodes:\n");
    for i in 0..n {
        let _ = write!(s, "  n{i}:\n    type: {node_type}\n");
        let (a, b) = match shape {
            Shape::Chain => (i.checked_sub(1), None),
            Shape::Layered => {
                let width = 100;
                let layer = i / width;
                if layer == 0 {
                    (None, None)
                } else {
                    let prev = (layer - 1) * width;
                    (Some(prev + i % width), Some(prev + (i + 1) % width))
                }
            }
        };
        if a.is_some() || b.is_some() {
            s.push_str("    inputs:\n");
            if let Some(a) = a {
                let _ = writeln!(s, "      a: ${{n{a}.out}}");
            }
            if let Some(b) = b {
                let _ = writeln!(s, "      b: ${{n{b}.out}}");
            }
        }
    }
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per_node(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    let n = args.nodes.max(1);
    let repeat = args.repeat.max(1);
    let mut registry = Registry::new();
    registry.register(Arc::new(NoOp::new("bench.noop", true)))?;
    registry.register(Arc::new(NoOp::new("bench.noop_thread", false)))?;
    println!(
        "pixart bench: {n} no-op nodes, shape {:?}, median of {repeat}",
        args.shape
    );
    println!("{:<44} {:>12} {:>12}", "phase", "total", "per node");
    for (node_type, label) in [
        ("bench.noop", "inline"),
        ("bench.noop_thread", "worker thread"),
    ] {
        let yaml = workflow_yaml(n, args.shape, node_type);
        let mut validate = Vec::new();
        let mut cold = Vec::new();
        let mut cached = Vec::new();
        for _ in 0..repeat {
            let t = Instant::now();
            let wf = load_workflow(&yaml, &registry, &LoadOptions::default())?;
            validate.push(t.elapsed());
            let executor = Executor::new(CachePolicy::default());
            for times in [&mut cold, &mut cached] {
                let t = Instant::now();
                let report = executor.run(&wf, RunOptions::default()).await?;
                times.push(t.elapsed());
                anyhow::ensure!(report.ok() && report.nodes.len() == n, "bench run failed");
            }
        }
        for (phase, times) in [
            ("parse + validate", validate),
            ("execute (cold cache)", cold),
            ("execute (all cached)", cached),
        ] {
            let d = median(times);
            println!(
                "{:<44} {:>10.2}ms {:>10.2}µs",
                format!("{phase}, {label}"),
                d.as_secs_f64() * 1e3,
                per_node(d, n)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
