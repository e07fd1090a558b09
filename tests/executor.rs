//! The executor: deterministic order, parallel branches, the output cache,
//! per-run cancellation, failure isolation and targets.

mod common;

use common::{drain, load, load_with, node_events, registry};
use pixart_runtime::executor::{CachePolicy, Executor, NodeStatus, RunOptions};
use pixart_runtime::{CancellationToken, Event, Value};

const DIAMOND: &str = "version: 1
nodes:
  a: {type: test.add, inputs: {a: 1}}
  b: {type: test.add, inputs: {a: \"${a.out}\", b: 10}}
  c: {type: test.add, inputs: {a: 2}}
  out: {type: test.output, inputs: {a: \"${b.out}\", b: \"${c.out}\"}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_deterministic_and_results_correct() {
    let (reg, _) = registry();
    let wf = load(DIAMOND, &reg);
    let mut sequences = Vec::new();
    for _ in 0..3 {
        let exec = Executor::new(CachePolicy::None).with_max_parallel(1);
        let mut rx = exec.subscribe();
        let report = exec.run(&wf, RunOptions::default()).await.unwrap();
        assert!(report.ok());
        assert_eq!(
            report.output("out", "out").and_then(Value::as_int),
            Some(13)
        );
        let events = drain(&mut rx);
        assert!(matches!(
            events.first(),
            Some(Event::RunStarted { nodes: 4, .. })
        ));
        assert!(matches!(
            events.last(),
            Some(Event::RunFinished {
                ok: true,
                failed: 0,
                ..
            })
        ));
        sequences.push(node_events(&events));
    }
    assert_eq!(
        sequences[0],
        [
            "started:a",
            "finished:a",
            "started:b",
            "finished:b",
            "started:c",
            "finished:c",
            "started:out",
            "finished:out"
        ]
    );
    assert!(sequences.iter().all(|s| s == &sequences[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_branches_overlap() {
    // Each `test.meet` waits until the other one is running too; run one after the
    // other, both would time out and fail.
    let yaml = "version: 1
nodes:
  left: {type: test.meet, inputs: {a: 1}}
  right: {type: test.meet, inputs: {a: 2}}
  out: {type: test.output, inputs: {a: \"${left.out}\", b: \"${right.out}\"}}
";
    let (reg, counts) = registry();
    let wf = load(yaml, &reg);
    let exec = Executor::new(CachePolicy::None).with_max_parallel(2);
    let mut rx = exec.subscribe();
    let report = exec.run(&wf, RunOptions::default()).await.unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.output("out", "out").and_then(Value::as_int), Some(3));
    assert_eq!(counts.total(), 3);
    let seq = node_events(&drain(&mut rx));
    let pos = |s: &str| seq.iter().position(|e| e == s).unwrap();
    assert!(pos("started:right") < pos("finished:left"), "{seq:?}");
    assert!(pos("started:left") < pos("finished:right"), "{seq:?}");
}

const CACHED: &str = "version: 1
params: {x: 1, y: 2}
nodes:
  a: {type: test.add, inputs: {a: \"${params.x}\"}}
  b: {type: test.add, inputs: {a: \"${params.y}\"}}
  a2: {type: test.add_inline, inputs: {a: \"${a.out}\"}}
  b2: {type: test.add_inline, inputs: {a: \"${b.out}\"}}
  out: {type: test.output, inputs: {a: \"${a2.out}\", b: \"${b2.out}\"}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_param_reruns_only_what_is_downstream() {
    let (reg, counts) = registry();
    let exec = Executor::new(CachePolicy::default());
    let wf = load(CACHED, &reg);

    let first = exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(first.output("out", "out").and_then(Value::as_int), Some(3));
    assert_eq!(counts.total(), 5);

    // The same again: everything cached but the output node, which always runs.
    let second = exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(second.count(|s| *s == NodeStatus::Cached), 4);
    assert_eq!(counts.total(), 6);
    assert_eq!(counts.get("out"), 2);

    // x changes: a and a2 run again, b and b2 come from the cache.
    let wf = load_with(CACHED, &reg, &[("x", "5")]);
    let mut rx = exec.subscribe();
    let third = exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(third.output("out", "out").and_then(Value::as_int), Some(7));
    assert_eq!((counts.get("a"), counts.get("a2")), (2, 2));
    assert_eq!((counts.get("b"), counts.get("b2")), (1, 1));
    let seq = node_events(&drain(&mut rx));
    assert!(
        seq.contains(&"cached:b".to_string()) && seq.contains(&"cached:b2".to_string()),
        "{seq:?}"
    );

    // Back to x = 1: still cached from the first run.
    let wf = load(CACHED, &reg);
    exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(counts.get("a"), 2);

    exec.clear_cache();
    exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(counts.get("a"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_policy_and_nondeterministic_nodes_always_run() {
    let yaml = "version: 1
nodes:
  r: {type: test.random, inputs: {a: 1}}
  down: {type: test.add, inputs: {a: \"${r.out}\"}}
  other: {type: test.add, inputs: {a: 5}}
  out: {type: test.output, inputs: {a: \"${down.out}\", b: \"${other.out}\"}}
";
    let (reg, counts) = registry();
    let wf = load(yaml, &reg);
    let exec = Executor::new(CachePolicy::default());
    exec.run(&wf, RunOptions::default()).await.unwrap();
    exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(counts.get("r"), 2, "non-deterministic: never cached");
    assert_eq!(
        counts.get("down"),
        2,
        "downstream of a non-deterministic node: recomputed"
    );
    assert_eq!(counts.get("other"), 1, "independent: cached");

    let (reg, counts) = registry();
    let wf = load(yaml, &reg);
    let exec = Executor::new(CachePolicy::None);
    exec.run(&wf, RunOptions::default()).await.unwrap();
    exec.run(&wf, RunOptions::default()).await.unwrap();
    assert_eq!(counts.get("other"), 2);
    assert_eq!(exec.cached_entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_run_leaves_another_running() {
    let slow = "version: 1
nodes:
  wait: {type: test.until_cancelled}
  after: {type: test.output, inputs: {a: \"${wait.out}\"}}
";
    let quick = "version: 1
nodes:
  one: {type: test.add, inputs: {a: 1, ms: 200}}
  two: {type: test.output, inputs: {a: \"${one.out}\"}}
";
    let (reg, counts) = registry();
    let (slow, quick) = (load(slow, &reg), load(quick, &reg));
    let exec = Executor::new(CachePolicy::None).with_max_parallel(4);
    let mut rx = exec.subscribe();
    let cancel = CancellationToken::new();
    let slow_opts = RunOptions {
        cancel: cancel.clone(),
        run_id: Some("slow".into()),
        ..RunOptions::default()
    };
    let quick_opts = RunOptions {
        run_id: Some("quick".into()),
        ..RunOptions::default()
    };
    let canceller = async {
        // Cancel once the slow node reports progress: it is surely running.
        loop {
            match rx.recv().await {
                Ok(Event::NodeProgress { run_id, .. }) if &*run_id == "slow" => break,
                Ok(_) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        cancel.cancel();
    };
    let (slow_report, quick_report, ()) = tokio::join!(
        exec.run(&slow, slow_opts),
        exec.run(&quick, quick_opts),
        canceller
    );
    let slow_report = slow_report.unwrap();
    let quick_report = quick_report.unwrap();
    assert!(slow_report.cancelled);
    assert_eq!(
        slow_report.node("wait").unwrap().status,
        NodeStatus::Cancelled
    );
    assert_eq!(
        slow_report.node("after").unwrap().status,
        NodeStatus::Cancelled
    );
    assert_eq!(counts.get("after"), 0);
    assert!(quick_report.ok());
    assert_eq!(
        quick_report.output("two", "out").and_then(Value::as_int),
        Some(1)
    );
    let rest = drain(&mut rx);
    assert!(
        rest.iter()
            .any(|e| matches!(e, Event::RunCancelled { run_id } if &**run_id == "slow")),
        "{rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_before_start_runs_nothing() {
    let (reg, counts) = registry();
    let wf = load(DIAMOND, &reg);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let exec = Executor::new(CachePolicy::None);
    let report = exec
        .run(
            &wf,
            RunOptions {
                cancel,
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(report.cancelled && !report.ok());
    assert_eq!(counts.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_stops_only_what_depends_on_it() {
    let yaml = "version: 1
nodes:
  bad: {type: test.fail}
  after_bad: {type: test.add, inputs: {a: \"${bad.out}\"}}
  saved_bad: {type: test.output, inputs: {a: \"${after_bad.out}\"}}
  good: {type: test.add, inputs: {a: 4, ms: 50}}
  saved_good: {type: test.output, inputs: {a: \"${good.out}\"}}
  boom: {type: test.panic}
  liar: {type: test.wrong_type}
  saved_odd: {type: test.output, inputs: {a: \"${boom.out}\", b: \"${liar.out}\"}}
";
    let (reg, counts) = registry();
    let wf = load(yaml, &reg);
    let exec = Executor::new(CachePolicy::None);
    let mut rx = exec.subscribe();
    let report = exec.run(&wf, RunOptions::default()).await.unwrap();
    assert!(!report.ok());
    assert_eq!(
        report.output("saved_good", "out").and_then(Value::as_int),
        Some(4)
    );
    assert_eq!((counts.get("after_bad"), counts.get("saved_bad")), (0, 0));

    let bad = report.failures.iter().find(|f| f.node == "bad").unwrap();
    assert_eq!(bad.node_type, "test.fail@1");
    assert_eq!(bad.message, "failed on purpose");
    assert_eq!(
        bad.lost_outputs,
        ["bad.out", "after_bad.out", "saved_bad.out"]
    );
    assert_eq!(
        report.node("after_bad").unwrap().status,
        NodeStatus::Skipped {
            because: "bad".into()
        }
    );
    let boom = report.failures.iter().find(|f| f.node == "boom").unwrap();
    assert_eq!(boom.message, "node panicked: boom");
    let liar = report.failures.iter().find(|f| f.node == "liar").unwrap();
    assert!(
        liar.message
            .contains("declared Int but the node produced String"),
        "{}",
        liar.message
    );
    assert_eq!(report.failures.len(), 3);

    let events = drain(&mut rx);
    assert!(matches!(
        events.last(),
        Some(Event::RunFinished {
            ok: false,
            failed: 3,
            ..
        })
    ));
    assert!(node_events(&events).contains(&"skipped:saved_bad".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_run_only_what_they_need() {
    let (reg, counts) = registry();
    let wf = load(DIAMOND, &reg);
    let exec = Executor::new(CachePolicy::None);
    let opts = RunOptions {
        targets: vec!["b".into()],
        ..RunOptions::default()
    };
    let report = exec.run(&wf, opts).await.unwrap();
    assert_eq!(report.nodes.len(), 2);
    assert_eq!(report.output("b", "out").and_then(Value::as_int), Some(11));
    assert_eq!((counts.get("c"), counts.get("out")), (0, 0));

    let opts = RunOptions {
        targets: vec!["bb".into()],
        ..RunOptions::default()
    };
    let err = exec.run(&wf, opts).await.unwrap_err().to_string();
    assert!(
        err.contains("`bb`") && err.contains("did you mean `b`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lru_cache_is_bounded_by_bytes() {
    let (reg, counts) = registry();
    let yaml = "version: 1
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [1000]}}
  out: {type: test.output, inputs: {a: 1}}
  save: {type: tensor.save, inputs: {tensor: \"${noise.tensor}\", path: x.safetensors}}
";
    let dir = tempfile::tempdir().unwrap();
    let wf = load(yaml, &reg);
    // 1000 f32 = 4000 bytes: a 1000-byte cache cannot keep them.
    let exec = Executor::new(CachePolicy::Lru { max_bytes: 1000 });
    let opts = RunOptions {
        out_dir: dir.path().into(),
        ..RunOptions::default()
    };
    let first = exec.run(&wf, opts.clone()).await.unwrap();
    let second = exec.run(&wf, opts.clone()).await.unwrap();
    assert!(first.ok() && second.ok());
    assert!(matches!(
        second.node("noise").unwrap().status,
        NodeStatus::Executed { .. }
    ));
    assert!(exec.cached_bytes() <= 1000);
    let exec = Executor::new(CachePolicy::Lru { max_bytes: 1 << 20 });
    exec.run(&wf, opts.clone()).await.unwrap();
    let again = exec.run(&wf, opts).await.unwrap();
    assert_eq!(again.node("noise").unwrap().status, NodeStatus::Cached);
    assert_eq!(counts.get("out"), 4);
}

/// A handle hears of its last use when the last node reading *that output* is
/// done, not when every reader of its node is (a loader's T5 is freed before the
/// sampler reads the transformer), and a failed run still lets it know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_hear_of_their_last_use_per_output() {
    use pixart_runtime::{
        Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType,
    };
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// `make`: outputs `first` (hooked) and `second`; `use`: reads a handle and
    /// an int, outputs whether `first` had heard at that moment (and can fail).
    struct Probe {
        spec: NodeSpec,
        heard: Arc<AtomicUsize>,
        seen: Arc<AtomicBool>,
    }
    impl Node for Probe {
        fn spec(&self) -> &NodeSpec {
            &self.spec
        }
        fn run(&self, _: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
            if self.spec.name == "probe.make" {
                let heard = self.heard.clone();
                let first = Handle::new(PortType::Vae, 0, 1u8).on_last_use(move || {
                    heard.fetch_add(1, Ordering::SeqCst);
                });
                let second = Handle::new(PortType::Vae, 0, 2u8);
                return Ok(Outputs::one("first", Value::Handle(first))
                    .with("second", Value::Handle(second)));
            }
            if inputs.int("fail")? == 1 {
                return Err(NodeError::msg("asked to fail"));
            }
            let heard = self.heard.load(Ordering::SeqCst) > 0;
            if inputs.int("after")? == 1 {
                self.seen.store(heard, Ordering::SeqCst);
            }
            Ok(Outputs::one("out", Value::Int(1)))
        }
    }
    let heard = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    let mut reg = pixart_nodes::builtin_registry();
    let probe = |spec: NodeSpec| -> Arc<dyn Node> {
        Arc::new(Probe {
            spec,
            heard: heard.clone(),
            seen: seen.clone(),
        })
    };
    reg.register(probe(
        NodeSpec::new("probe.make", 1)
            .output("first", PortType::Vae, "hooked")
            .output("second", PortType::Vae, "plain"),
    ))
    .unwrap();
    reg.register(probe(
        NodeSpec::new("probe.use", 1)
            .input(InputSpec::new("handle", PortType::Vae))
            .input(InputSpec::new("after", PortType::Int).default(0))
            .input(InputSpec::new("fail", PortType::Int).default(0))
            .input(InputSpec::new("wait", PortType::Int).default(0))
            .output("out", PortType::Int, "1"),
    ))
    .unwrap();
    // `late` reads `second` after `early` (the only reader of `first`) is done.
    let wf = load(
        "version: 1
nodes:
  make: {type: probe.make}
  early: {type: probe.use, inputs: {handle: \"${make.first}\"}}
  late: {type: probe.use, inputs: {handle: \"${make.second}\", after: 1, wait: \"${early.out}\"}}
",
        &reg,
    );
    let report = Executor::new(CachePolicy::None)
        .run(&wf, RunOptions::default())
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    assert!(
        seen.load(Ordering::SeqCst),
        "`first` heard only after `late`"
    );
    assert_eq!(heard.load(Ordering::SeqCst), 1);

    // The reader fails: the run is over, the handle hears all the same.
    heard.store(0, Ordering::SeqCst);
    let wf = load(
        "version: 1
nodes:
  make: {type: probe.make}
  early: {type: probe.use, inputs: {handle: \"${make.second}\", fail: 1}}
  late: {type: probe.use, inputs: {handle: \"${make.first}\", wait: \"${early.out}\"}}
",
        &reg,
    );
    let report = Executor::new(CachePolicy::None)
        .run(&wf, RunOptions::default())
        .await
        .unwrap();
    assert!(!report.ok());
    assert_eq!(heard.load(Ordering::SeqCst), 1);
}
