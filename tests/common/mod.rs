//! Nodes that exist only for tests: they count executions, sleep, wait for each
//! other, fail on demand or wait for cancellation.
#![allow(dead_code)]

pub mod api;

use pixart_runtime::workflow::{load_workflow, LoadOptions};
use pixart_runtime::{
    Event, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Registry,
    Value, Workflow,
};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Executions per node id, shared by all test nodes of one registry.
#[derive(Default, Clone)]
pub struct Counts(Arc<Mutex<HashMap<String, usize>>>);

impl Counts {
    pub fn get(&self, node: &str) -> usize {
        self.0.lock().unwrap().get(node).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }

    fn bump(&self, node: &str) {
        *self.0.lock().unwrap().entry(node.to_string()).or_default() += 1;
    }
}

/// A barrier that gives up after a timeout instead of hanging the test.
#[derive(Default)]
pub struct Rendezvous {
    arrived: Mutex<usize>,
    cv: Condvar,
}

impl Rendezvous {
    /// True when `n` parties arrived within `timeout`.
    fn wait(&self, n: usize, timeout: Duration) -> bool {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.cv.notify_all();
        let (guard, result) = self
            .cv
            .wait_timeout_while(arrived, timeout, |a| *a < n)
            .unwrap();
        drop(guard);
        !result.timed_out()
    }
}

enum Behaviour {
    /// out = a + b (absent inputs count as 0), after `ms` input milliseconds.
    Add,
    Fail,
    /// Fails as a library error does that captured a backtrace (candle's under
    /// `RUST_BACKTRACE=1`).
    FailWithBacktrace,
    /// Waits until `parties` nodes are inside at once; fails if they never are.
    Meet(Arc<Rendezvous>),
    /// Loops until cancelled (or 10 s, then fails).
    UntilCancelled,
    Panic,
    /// Declares `out: Int` but produces a String.
    WrongType,
}

pub struct TestNode {
    spec: NodeSpec,
    counts: Counts,
    behaviour: Behaviour,
}

impl Node for TestNode {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        self.counts.bump(ctx.node_id());
        let get = |name: &str| inputs.get(name).and_then(Value::as_int).unwrap_or(0);
        let ms = get("ms");
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms as u64));
        }
        match &self.behaviour {
            Behaviour::Add => Ok(Outputs::one("out", Value::Int(get("a") + get("b")))),
            Behaviour::Fail => Err(NodeError::msg("failed on purpose")),
            Behaviour::FailWithBacktrace => Err(NodeError::msg(format!(
                "failed on purpose\n{}",
                std::backtrace::Backtrace::force_capture()
            ))),
            Behaviour::Meet(r) => {
                if r.wait(2, Duration::from_secs(10)) {
                    Ok(Outputs::one("out", Value::Int(get("a"))))
                } else {
                    Err(NodeError::msg(
                        "the other branch never ran at the same time",
                    ))
                }
            }
            Behaviour::UntilCancelled => {
                for step in 0..1000 {
                    ctx.check_cancelled()?;
                    ctx.progress(step, 1000);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(NodeError::msg("was never cancelled"))
            }
            Behaviour::Panic => panic!("boom"),
            Behaviour::WrongType => Ok(Outputs::one("out", Value::String("not an int".into()))),
        }
    }
}

fn spec(name: &str) -> NodeSpec {
    NodeSpec::new(name, 1)
        .category("test")
        .input(InputSpec::new("a", PortType::Int).optional())
        .input(InputSpec::new("b", PortType::Int).optional())
        .input(InputSpec::new("ms", PortType::Int).default(0).min(0.0))
        .output("out", PortType::Int, "")
}

/// The built-in nodes plus `test.add`, `test.add_inline`, `test.random`,
/// `test.output`, `test.fail`, `test.fail_backtrace`, `test.meet`, `test.until_cancelled`, `test.panic`,
/// `test.wrong_type`, all counting into the returned [`Counts`].
pub fn registry() -> (Registry, Counts) {
    let mut reg = pixart_nodes::builtin_registry();
    let counts = Counts::default();
    let rendezvous = Arc::new(Rendezvous::default());
    let mk = |spec: NodeSpec, behaviour: Behaviour| -> Arc<dyn Node> {
        Arc::new(TestNode {
            spec,
            counts: counts.clone(),
            behaviour,
        })
    };
    let nodes = vec![
        mk(spec("test.add"), Behaviour::Add),
        mk(spec("test.add_inline").inline(), Behaviour::Add),
        mk(spec("test.random").nondeterministic(), Behaviour::Add),
        mk(spec("test.output").output_node(), Behaviour::Add),
        mk(spec("test.fail"), Behaviour::Fail),
        mk(spec("test.fail_backtrace"), Behaviour::FailWithBacktrace),
        mk(spec("test.meet"), Behaviour::Meet(rendezvous)),
        mk(spec("test.until_cancelled"), Behaviour::UntilCancelled),
        mk(spec("test.panic"), Behaviour::Panic),
        mk(spec("test.wrong_type"), Behaviour::WrongType),
    ];
    for n in nodes {
        reg.register(n).unwrap();
    }
    (reg, counts)
}

pub fn load(yaml: &str, reg: &Registry) -> Workflow {
    load_with(yaml, reg, &[])
}

pub fn load_with(yaml: &str, reg: &Registry, overrides: &[(&str, &str)]) -> Workflow {
    let opts = LoadOptions {
        file_name: Some("test.yaml".into()),
        overrides: overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LoadOptions::default()
    };
    match load_workflow(yaml, reg, &opts) {
        Ok(wf) => wf,
        Err(e) => panic!("workflow should load:\n{e}"),
    }
}

/// Events about nodes, as `kind:node` strings, in the order received.
pub fn node_events(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            let kind = match e {
                Event::NodeStarted { .. } => "started",
                Event::NodeCached { .. } => "cached",
                Event::NodeFinished { .. } => "finished",
                Event::NodeFailed { .. } => "failed",
                Event::NodeSkipped { .. } => "skipped",
                _ => return None,
            };
            Some(format!("{kind}:{}", e.node()?))
        })
        .collect()
}

/// Drains what a receiver has buffered.
pub fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// The 1-based line of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

/// The largest absolute element of a tensor.
pub fn abs_max(t: &pixart_runtime::candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest absolute element-wise difference of two tensors of one shape.
pub fn max_abs_diff(
    a: &pixart_runtime::candle_core::Tensor,
    b: &pixart_runtime::candle_core::Tensor,
) -> f32 {
    abs_max(&(a - b).unwrap())
}

/// max |got − want| / max |want|, compared in f32 on the CPU.
pub fn rel_err(
    got: &pixart_runtime::candle_core::Tensor,
    want: &pixart_runtime::candle_core::Tensor,
) -> f32 {
    use pixart_runtime::candle_core::{DType, Device};
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let f32_cpu = |t: &pixart_runtime::candle_core::Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let (got, want) = (f32_cpu(got), f32_cpu(want));
    max_abs_diff(&got, &want) / abs_max(&want).max(1e-12)
}
