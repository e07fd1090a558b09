//! `train.pixart` end to end on the tiny fixture pipeline: the loss goes down, a
//! run killed with SIGKILL resumes to the very same weights, checkpoints are
//! whole and load as diffusers transformers, stages chain.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A small dataset: coloured squares at a few places on a few backgrounds.
fn make_dataset(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [
        ("red", [220, 40, 40]),
        ("blue", [40, 80, 220]),
        ("green", [40, 180, 60]),
    ];
    let places = [("left", 8usize), ("center", 24), ("right", 40)];
    for i in 0..count {
        let (cname, c) = colours[i % 3];
        let (pname, x0) = places[(i / 3) % 3];
        let bg = if i % 2 == 0 { 245u8 } else { 20 };
        let mut px = vec![bg; 64 * 64 * 3];
        for y in 20..44 {
            for x in x0..x0 + 16 {
                px[(y * 64 + x) * 3..][..3].copy_from_slice(&c);
            }
        }
        let png = pixart_nodes::image_io::encode_png(&px, 64, 64, 3, &[]).unwrap();
        std::fs::write(dir.join(format!("img{i:02}.png")), png).unwrap();
        std::fs::write(
            dir.join(format!("img{i:02}.txt")),
            format!("a {cname} square on the {pname}"),
        )
        .unwrap();
        std::fs::write(dir.join(format!("img{i:02}.label")), cname).unwrap();
    }
}

/// A workflow training the tiny pipeline's transformer on `data`.
fn workflow(dir: &Path, data: &Path, steps: u64, every: u64, extra: &str) -> PathBuf {
    let yaml = format!(
        r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: "{model}"}}}}
  data: {{type: dataset.folder, inputs: {{path: "{data}", resolution: 64}}}}
  feats:
    type: train.precompute
    inputs: {{dataset: "${{data.dataset}}", tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", vae: "${{pipe.vae}}", path: "cache"}}
  stage:
    type: train.pixart
    inputs:
      features: "${{feats.features}}"
      init: "${{pipe.transformer}}"
      steps: {steps}
      batch: 4
      lr: 1.0e-3
      warmup: 5
      ema_rate: 0.9
      seed: 3
      checkpoint_every: {every}
      out: "run"
{extra}
"#,
        model = repo().join("tests/fixtures/tiny-pixart").display(),
        data = data.display(),
    );
    let path = dir.join("train.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn pixart(workflow: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixart"));
    cmd.arg("run")
        .arg(workflow)
        .arg("--out")
        .arg(out)
        .current_dir(out.parent().unwrap())
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn run_ok(workflow: &Path, out: &Path) {
    let o = pixart(workflow, out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn losses(run: &Path) -> Vec<f64> {
    logged(run, "loss")
}

/// One number from every line of a run's loss.jsonl.
fn logged(run: &Path, field: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("loss.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[field]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file a checkpoint is made of.
const PARTS: &[&str] = &[
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/null_caption.safetensors",
    "state/params.safetensors",
    "state/optimizer.safetensors",
    "state/trainer.json",
];

#[test]
fn a_killed_run_resumes_to_the_same_weights_and_checkpoints_are_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let (steps, every) = (400, 25);
    let wf = workflow(tmp.path(), &data, steps, every, "");

    let straight = tmp.path().join("straight");
    std::fs::create_dir(&straight).unwrap();
    run_ok(&wf, &straight);

    // The same run, killed (SIGKILL) once a few checkpoints exist, then resumed.
    let killed = tmp.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let mut child = pixart(&wf, &killed).spawn().unwrap();
    wait_for(&killed.join("run/checkpoint-000075"), &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = losses(&killed.join("run")).len() as u64;
    assert!(logged < steps, "killed after the end ({logged} steps)");
    let found: Vec<String> = std::fs::read_dir(killed.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert!(!found.is_empty());
    for name in &found {
        for part in PARTS {
            let path = killed.join("run").join(name).join(part);
            assert!(path.is_file(), "{} is missing", path.display());
            if part.ends_with(".safetensors") {
                safetensors::SafeTensors::deserialize(&read(&path))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }

    run_ok(&wf, &killed);
    let last = format!("run/checkpoint-{steps:06}");
    for part in PARTS {
        assert!(
            read(&straight.join(&last).join(part)) == read(&killed.join(&last).join(part)),
            "{part} differs after resuming"
        );
    }
    assert_eq!(losses(&straight.join("run")), losses(&killed.join("run")));
}

/// `accumulate` and `grad_checkpoint` train as the plain run does: the same
/// losses and, after 10 steps, the same weights (issue 24), each within 1e-5 of
/// the largest value; the plain run resumes with them.
#[test]
fn accumulated_and_checkpointed_runs_train_as_the_plain_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let plain = workflow(tmp.path(), &data, 10, 5, "");
    let plain_out = tmp.path().join("plain");
    std::fs::create_dir(&plain_out).unwrap();
    run_ok(&plain, &plain_out);
    let weights = |dir: &Path| {
        pixart_runtime::candle_core::safetensors::load(
            dir.join("run/checkpoint-000010/state/params.safetensors"),
            &pixart_runtime::candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let want = weights(&plain_out);
    let want_losses = losses(&plain_out.join("run"));
    for (name, extra) in [
        ("accumulate", "      accumulate: 3"),
        ("checkpoint", "      grad_checkpoint: true"),
        ("both", "      accumulate: 2\n      grad_checkpoint: true"),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let wf = workflow(&dir, &data, 10, 5, extra);
        run_ok(&wf, &dir);
        let got_losses = losses(&dir.join("run"));
        assert_eq!(got_losses.len(), want_losses.len());
        for (step, (a, b)) in got_losses.iter().zip(&want_losses).enumerate() {
            assert!(
                (a / b - 1.0).abs() < 1e-5,
                "{name}: step {step}: loss {a} vs {b}"
            );
        }
        assert_same_weights(&want, &weights(&dir));
    }

    // Mixed precision trains the same f32 weights, up to bf16's rounding: the
    // losses within 2⁻⁶ of the plain run's, the saved state f32.
    let dir = tmp.path().join("bf16");
    std::fs::create_dir(&dir).unwrap();
    run_ok(
        &workflow(&dir, &data, 10, 5, "      mixed_precision: bf16"),
        &dir,
    );
    let got_losses = losses(&dir.join("run"));
    assert_eq!(got_losses.len(), want_losses.len());
    let mut largest = 0f64;
    for (step, (a, b)) in got_losses.iter().zip(&want_losses).enumerate() {
        let e = (a / b - 1.0).abs();
        largest = largest.max(e);
        assert!(e < 1.0 / 64.0, "bf16: step {step}: loss {a} vs {b}");
    }
    assert!(
        largest > 0.0,
        "bf16: the losses equal f32's: bf16 did not run"
    );
    eprintln!("bf16: losses within {largest:e} of f32's");
    let got = weights(&dir);
    let mut largest = 0f32;
    for (key, w) in &want {
        let g = &got[key];
        assert_eq!(g.dtype(), pixart_runtime::candle_core::DType::F32, "{key}");
        // Key biases' gradients are zero but for rounding, which AdamW's
        // normalisation turns into whole steps either way: no precision
        // agrees there.
        if key.ends_with("to_k.bias") {
            continue;
        }
        let e = common::rel_err(g, w);
        largest = largest.max(e);
        assert!(
            e < 1.0 / 64.0,
            "bf16: {key} differs by {e:e} of its largest value"
        );
    }
    eprintln!("bf16: weights within {largest:e} of f32's");
}

/// Waits until `path` exists, while `child` (the run writing it) goes on.
fn wait_for(path: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} after 300 s",
            path.display()
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Tensors equal within 1e-5 of each one's largest value.
fn assert_same_weights(
    want: &std::collections::HashMap<String, pixart_runtime::candle_core::Tensor>,
    got: &std::collections::HashMap<String, pixart_runtime::candle_core::Tensor>,
) {
    for (key, w) in want {
        let scale = common::abs_max(w).max(1e-12);
        let diff = common::abs_max(&(w - &got[key]).unwrap());
        // Key biases get no gradient but rounding, which AdamW turns into ±lr steps.
        let tol = if key.ends_with("to_k.bias") {
            2e-2
        } else {
            1e-5
        };
        assert!(
            diff <= tol * scale,
            "{key} differs by {diff:e} (largest {scale:e})"
        );
    }
}

/// `mpirun -np N pixart run WORKFLOW --out OUT`, as CI can run it.
fn mpirun(np: usize, workflow: &Path, out: &Path) -> Command {
    let mpirun = Path::new("/usr/bin/mpirun");
    assert!(
        mpirun.exists(),
        "the data-parallel tests need Open MPI: apt-get install openmpi-bin"
    );
    let mut cmd = Command::new(mpirun);
    cmd.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_pixart"))
        .arg("run")
        .arg(workflow)
        .arg("--out")
        .arg(out)
        .current_dir(out.parent().unwrap())
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        // CI runs as root, in containers without a shared-memory copy path.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The `pixart` processes below `parent` (mpirun's ranks).
fn pixart_children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![parent];
    while let Some(p) = queue.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let exe = std::fs::read_link(format!("/proc/{c}/exe")).unwrap_or_default();
            if exe.file_name().is_some_and(|n| n == "pixart") {
                found.push(c);
            }
            queue.push(c);
        }
    }
    found
}

/// A two-rank run with its rank 1 SIGKILLed mid-run ends on every rank, and
/// resuming it as one process reaches the uninterrupted two-rank run's weights.
#[test]
fn a_killed_rank_ends_the_job_and_one_process_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let (steps, every) = (400, 25);
    let wf = workflow(tmp.path(), &data, steps, every, "");
    let straight = tmp.path().join("straight");
    std::fs::create_dir(&straight).unwrap();
    let o = mpirun(2, &wf, &straight).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = tmp.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let mut job = mpirun(2, &wf, &killed).spawn().unwrap();
    wait_for(&killed.join("run/checkpoint-000075"), &mut job);
    let ranks = pixart_children(job.id());
    assert_eq!(ranks.len(), 2, "two ranks: {ranks:?}");
    let rank1 = ranks.iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|var| var == b"OMPI_COMM_WORLD_RANK=1")
    });
    let rank1 = *rank1.expect("a rank 1");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    let ended = job.wait().unwrap();
    assert!(
        !ended.success(),
        "the job reported success after a rank was killed"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "the job took {:?} to end",
        killed_at.elapsed()
    );
    assert!(
        losses(&killed.join("run")).len() < steps as usize,
        "killed after the end"
    );

    run_ok(&wf, &killed);
    let last = format!("run/checkpoint-{steps:06}/state/params.safetensors");
    let load = |dir: &Path| {
        pixart_runtime::candle_core::safetensors::load(
            dir.join(&last),
            &pixart_runtime::candle_core::Device::Cpu,
        )
        .unwrap()
    };
    assert_same_weights(&load(&straight), &load(&killed));
}

/// `mpirun -np 2` (oversubscribed on two cores): each rank takes half of every
/// global batch of 4 and the gradients are summed over MPI; the losses and the
/// weights after 20 steps are one process's, within 1e-5 (issue 24). Only rank
/// 0 writes into `--out`.
#[test]
fn two_mpi_ranks_train_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let wf = workflow(tmp.path(), &data, 20, 10, "");
    let one = tmp.path().join("one");
    std::fs::create_dir(&one).unwrap();
    run_ok(&wf, &one);
    let two = tmp.path().join("two");
    std::fs::create_dir(&two).unwrap();
    let o = mpirun(2, &wf, &two).output().unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{said}");
    // Rank 0 made the feature cache once; rank 1 read it.
    assert!(
        said.contains("rank 1: `feats` uses rank 0's feature cache at "),
        "{said}"
    );
    let (a, b) = (losses(&one.join("run")), losses(&two.join("run")));
    assert_eq!(a.len(), 20);
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x / y - 1.0).abs() < 1e-5, "step {step}: loss {x} vs {y}");
    }
    let weights = |dir: &Path| {
        pixart_runtime::candle_core::safetensors::load(
            dir.join("run/checkpoint-000020/state/params.safetensors"),
            &pixart_runtime::candle_core::Device::Cpu,
        )
        .unwrap()
    };
    assert_same_weights(&weights(&one), &weights(&two));
    // What the two ranks wrote into --out: rank 0's run and cache, nothing else.
    let mut written: Vec<String> = std::fs::read_dir(&two)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["cache", "run"]);
}

/// Warmup-stable-decay: a run at a constant rate, resumed from a checkpoint with an
/// anneal over its last steps, ends exactly where the annealed run from the start
/// does (the schedule is not part of what a resume must share).
#[test]
fn a_constant_rate_checkpoint_resumes_into_its_anneal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let constant = tmp.path().join("constant.yaml");
    std::fs::rename(workflow(tmp.path(), &data, 10, 10, ""), &constant).unwrap();
    let annealed = tmp.path().join("annealed.yaml");
    let yaml = std::fs::read_to_string(workflow(tmp.path(), &data, 20, 10, ""))
        .unwrap()
        .replace(
            "      out: \"run\"",
            "      lr_schedule: linear\n      decay_steps: 10\n      out: \"run\"",
        );
    std::fs::write(&annealed, yaml).unwrap();

    let straight = tmp.path().join("straight");
    std::fs::create_dir(&straight).unwrap();
    run_ok(&annealed, &straight);
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir(&resumed).unwrap();
    run_ok(&constant, &resumed);
    run_ok(&annealed, &resumed);

    for last in ["run/checkpoint-000010", "run/checkpoint-000020"] {
        // trainer.json records each run's own step count (10 against 20).
        for part in PARTS
            .iter()
            .filter(|p| !(last.ends_with("10") && p.ends_with("trainer.json")))
        {
            assert!(
                read(&straight.join(last).join(part)) == read(&resumed.join(last).join(part)),
                "{last}/{part} differs"
            );
        }
    }
    // Warm-up over 5 steps, the base rate, then a line to 0 over the last 10.
    let rates = logged(&straight.join("run"), "lr");
    let expected: Vec<f64> = (0..20)
        .map(|k| match k {
            0..5 => 1e-3 * k as f64 / 5.0,
            5..10 => 1e-3,
            _ => 1e-3 * (1.0 - (k - 10) as f64 / 10.0),
        })
        .collect();
    assert_eq!(rates.len(), expected.len());
    for (k, (got, want)) in rates.iter().zip(&expected).enumerate() {
        assert!(
            (got - want).abs() < 1e-12,
            "step {k}: lr {got}, expected {want}"
        );
    }
}

#[test]
fn the_loss_goes_down_and_stages_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 12);
    let stage2 = r#"  prompt: {type: t5.encode, inputs: {tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", text: "a red square on the left"}}
  stage2:
    type: train.pixart
    inputs:
      features: "${feats.features}"
      init: "${stage.transformer}"
      steps: 20
      batch: 4
      lr: 1.0e-4
      warmup: 0
      out: "run2"
      checkpoint_every: 0
      freeze: "pos_embed, adaln_single"
      sample_every: 10
      sample_prompt: "${prompt.conditioning}"
      sample_vae: "${pipe.vae}"
      sample_steps: 4"#;
    let wf = workflow(tmp.path(), &data, 150, 50, stage2);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_ok(&wf, &out);
    let l = losses(&out.join("run"));
    assert_eq!(l.len(), 150);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&l[..20]), mean(&l[130..]));
    assert!(last < 0.7 * first, "loss {first:.4} → {last:.4}");

    // Stage 2 started from stage 1's EMA weights and wrote its own checkpoint.
    assert!(out
        .join("run2/checkpoint-000020/state/trainer.json")
        .is_file());
    assert_eq!(losses(&out.join("run2")).len(), 20);

    // Frozen parts kept stage 1's (EMA) values; the rest moved.
    let load = |p: &str| {
        pixart_runtime::candle_core::safetensors::load(
            out.join(p),
            &pixart_runtime::candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let before = load("run/checkpoint-000150/transformer/diffusion_pytorch_model.safetensors");
    let after = load("run2/checkpoint-000020/state/params.safetensors");
    let moved = |name: &str| {
        let d = (&before[name] - &after[name]).unwrap().abs().unwrap();
        d.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
    };
    assert!(!moved("pos_embed.proj.weight") && !moved("adaln_single.linear.weight"));
    assert!(moved("proj_out.weight") && moved("transformer_blocks.0.attn1.to_q.weight"));

    // Sample images every 10 steps, at the training resolution.
    for step in [10, 20] {
        let png = read(&out.join(format!("run2/samples/step-{step:06}.png")));
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let info = decoder.read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), (64, 64));
    }
    let config: serde_json::Value = serde_json::from_slice(&read(
        &out.join("run/checkpoint-000150/transformer/config.json"),
    ))
    .unwrap();
    assert_eq!(config["_class_name"], "PixArtTransformer2DModel");
}

fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = read(path);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(str::to_string).collect()
}

#[test]
fn class_conditional_pretraining_carries_into_a_text_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 9);
    let extra = r#"      condition: class
  text_stage:
    type: train.pixart
    inputs: {features: "${feats.features}", init: "${stage.transformer}", steps: 5, batch: 3, warmup: 0, out: "run2", checkpoint_every: 0}"#;
    let wf = workflow(tmp.path(), &data, 10, 0, extra);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_ok(&wf, &out);
    let ck = out.join("run/checkpoint-000010");
    let trainer: serde_json::Value =
        serde_json::from_slice(&read(&ck.join("state/trainer.json"))).unwrap();
    assert_eq!(
        trainer["meta"]["settings"]["classes"],
        serde_json::json!(["blue", "green", "red"])
    );
    // The class table trains and is kept for resuming, but is not a transformer weight.
    assert!(
        tensor_names(&ck.join("state/params.safetensors")).contains(&"class_embedding".to_string())
    );
    assert!(
        !tensor_names(&ck.join("transformer/diffusion_pytorch_model.safetensors"))
            .iter()
            .any(|n| n.contains("class"))
    );
    let text_stage: serde_json::Value = serde_json::from_slice(&read(
        &out.join("run2/checkpoint-000005/state/trainer.json"),
    ))
    .unwrap();
    assert_eq!(text_stage["meta"]["settings"]["condition"], "text");
}

#[test]
fn multi_scale_stage_trains_on_aspect_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (i, (w, h)) in [
        (64, 64),
        (128, 64),
        (64, 128),
        (96, 96),
        (130, 60),
        (60, 130),
    ]
    .into_iter()
    .enumerate()
    {
        let px: Vec<u8> = (0..w * h * 3)
            .map(|k| ((k * 7 + i * 31) % 251) as u8)
            .collect();
        let png = pixart_nodes::image_io::encode_png(&px, w, h, 3, &[]).unwrap();
        std::fs::write(data.join(format!("{i}.png")), png).unwrap();
        std::fs::write(data.join(format!("{i}.txt")), format!("picture {i}")).unwrap();
    }
    let yaml = format!(
        r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: "{model}"}}}}
  ms: {{type: transformer.load, inputs: {{path: "{ms}"}}}}
  data: {{type: dataset.folder, inputs: {{path: "{data}", resolution: 64, buckets: true}}}}
  feats:
    type: train.precompute
    inputs: {{dataset: "${{data.dataset}}", tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", vae: "${{pipe.vae}}", path: "cache"}}
  stage:
    type: train.pixart
    inputs: {{features: "${{feats.features}}", init: "${{ms.transformer}}", steps: 6, batch: 2, warmup: 0, out: "run"}}
"#,
        model = repo().join("tests/fixtures/tiny-pixart").display(),
        ms = repo()
            .join("tests/fixtures/tiny-pixart-ms/transformer")
            .display(),
        data = data.display(),
    );
    let wf = tmp.path().join("ms.yaml");
    std::fs::write(&wf, yaml).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_ok(&wf, &out);
    // Wide, tall and square images went to different buckets.
    let mut shapes = std::collections::BTreeSet::new();
    for i in 0..6 {
        let bytes = read(&out.join(format!("cache/item-{i:06}.safetensors")));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        shapes.insert(st.tensor("vae_mean").unwrap().shape().to_vec());
    }
    assert!(shapes.len() >= 3, "{shapes:?}");
    assert_eq!(losses(&out.join("run")).len(), 6);
    let config: serde_json::Value = serde_json::from_slice(&read(
        &out.join("run/checkpoint-000006/transformer/config.json"),
    ))
    .unwrap();
    assert_eq!(config["use_additional_conditions"], true);
}

#[test]
fn the_three_stage_workflow_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 6);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let set = |k: &str, v: &str| ["--set".to_string(), format!("{k}={v}")];
    let fixtures = repo().join("tests/fixtures");
    let mut args: Vec<String> = vec![
        "run".into(),
        repo()
            .join("workflows/train-3stage.yaml")
            .display()
            .to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for (k, v) in [
        ("model", fixtures.join("tiny-pixart").display().to_string()),
        (
            "ms_config",
            fixtures
                .join("tiny-pixart-ms/transformer/config.json")
                .display()
                .to_string(),
        ),
        ("class_data", data.display().to_string()),
        ("text_data", data.display().to_string()),
        ("aesthetic_data", data.display().to_string()),
        ("resolution", "64".into()),
        ("high_resolution", "128".into()),
        ("steps1", "4".into()),
        ("steps2", "3".into()),
        ("steps3", "2".into()),
        ("batch", "2".into()),
        ("warmup", "0".into()),
    ] {
        args.extend(set(k, &v));
    }
    let o = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(&args)
        .current_dir(tmp.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (stage, steps) in [("stage1", 4), ("stage2", 3), ("stage3", 2)] {
        let ck = out.join(format!("runs/{stage}/checkpoint-{steps:06}/transformer"));
        assert!(
            ck.join("diffusion_pytorch_model.safetensors").is_file(),
            "{stage}"
        );
    }
    // Stage 3 grew the micro-condition embedders.
    let names = tensor_names(
        &out.join("runs/stage3/checkpoint-000002/transformer/diffusion_pytorch_model.safetensors"),
    );
    assert!(names.iter().any(|n| n.contains("resolution_embedder")));
    assert!(!tensor_names(
        &out.join("runs/stage2/checkpoint-000003/transformer/diffusion_pytorch_model.safetensors")
    )
    .iter()
    .any(|n| n.contains("resolution_embedder")));
    assert!(out.join("runs/stage3-sample.png").is_file());
}

/// Every file a LoRA checkpoint is made of.
const LORA_PARTS: &[&str] = &[
    "lora/adapter_model.safetensors",
    "lora/adapter_config.json",
    "lora/null_caption.safetensors",
    "state/params.safetensors",
    "state/optimizer.safetensors",
];

#[test]
fn a_lora_trains_alone_resumes_and_loads_as_peft_and_lora_load_read_it() {
    use pixart_runtime::candle_core::{DType, Device};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let lora =
        "      lora_rank: 4\n      lora_alpha: 8\n      lora_targets: \"to_q,to_v,ff.net.2\"";
    let ten = tmp.path().join("ten.yaml");
    std::fs::rename(workflow(tmp.path(), &data, 10, 5, lora), &ten).unwrap();
    let five = workflow(tmp.path(), &data, 5, 5, lora);

    let straight = tmp.path().join("straight");
    std::fs::create_dir(&straight).unwrap();
    run_ok(&ten, &straight);
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir(&resumed).unwrap();
    run_ok(&five, &resumed);
    run_ok(&ten, &resumed);
    // The second run went on from the first's checkpoint (it did not redo it).
    let first: serde_json::Value = serde_json::from_slice(&read(
        &resumed.join("run/checkpoint-000005/state/trainer.json"),
    ))
    .unwrap();
    assert_eq!(first["meta"]["total_steps"], 5);
    let last = "run/checkpoint-000010";
    for part in LORA_PARTS {
        assert!(
            read(&straight.join(last).join(part)) == read(&resumed.join(last).join(part)),
            "{part} differs after a resume"
        );
    }
    let ckpt = straight.join(last);
    assert!(
        !ckpt.join("transformer").exists(),
        "a LoRA run saves no transformer"
    );
    // Resuming onto another base of the same shape is refused.
    let other = std::fs::read_to_string(&ten)
        .unwrap()
        .replace(
            "init: \"${pipe.transformer}\"",
            "init: \"${other.transformer}\"",
        )
        .replace(
            "  data:",
            &format!(
                "  other: {{type: transformer.load, inputs: {{path: \"{}\"}}}}\n  data:",
                repo()
                    .join("tests/fixtures/tiny-pixart-sigma/transformer")
                    .display()
            ),
        )
        .replace("steps: 10", "steps: 12");
    let other_path = tmp.path().join("other.yaml");
    std::fs::write(&other_path, other).unwrap();
    let o = pixart(&other_path, &straight).output().unwrap();
    assert!(!o.status.success(), "a LoRA resumed onto another base");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("other settings") && said.contains("lora"),
        "{said}"
    );
    // Only the adapter trains: two matrices for each adapted linear (2 blocks ×
    // to_q, to_v of both attentions, ff.net.2), under peft's names.
    let names = tensor_names(&ckpt.join("lora/adapter_model.safetensors"));
    assert_eq!(names.len(), 2 * 2 * 5, "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.starts_with("base_model.model.transformer_blocks.")
            && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    let params = tensor_names(&ckpt.join("state/params.safetensors"));
    assert!(params.iter().all(|n| n.contains(".lora_")), "{params:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&read(&ckpt.join("lora/adapter_config.json"))).unwrap();
    assert_eq!(
        (config["peft_type"].as_str(), config["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    assert_eq!(config["lora_alpha"].as_f64(), Some(8.0));
    assert!(losses(&straight.join("run")).iter().all(|l| l.is_finite()));

    // lora.load reads it, and it changes only the weights it adapts.
    let base = pixart_nodes::pixart::load::transformer(
        &repo().join("tests/fixtures/tiny-pixart/transformer"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let trained = pixart_models::lora::Lora::load(&ckpt.join("lora")).unwrap();
    assert_eq!(trained.layout, "peft");
    let merged = pixart_models::lora::apply(&base.weights, &[(&trained, 1.0)]).unwrap();
    let mut changed: Vec<&String> = merged
        .iter()
        .filter(|(n, t)| {
            let d = (*t - &base.weights[*n])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            d.to_scalar::<f32>().unwrap() > 0.0
        })
        .map(|(n, _)| n)
        .collect();
    changed.sort();
    assert_eq!(changed.len(), 10, "{changed:?}");
    assert!(changed.iter().all(|n| n.ends_with("to_q.weight")
        || n.ends_with("to_v.weight")
        || n.ends_with("ff.net.2.weight")));
}

const CONTROLNET_PARTS: &[&str] = &[
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
    "state/params.safetensors",
    "state/optimizer.safetensors",
];

/// Control images for `make_dataset`'s: each square's outline, white on black.
fn make_controls(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let places = [8usize, 24, 40];
    for i in 0..count {
        let x0 = places[(i / 3) % 3];
        let mut px = vec![0u8; 64 * 64 * 3];
        for y in 20..44 {
            for x in x0..x0 + 16 {
                if y == 20 || y == 43 || x == x0 || x == x0 + 15 {
                    px[(y * 64 + x) * 3..][..3].copy_from_slice(&[255; 3]);
                }
            }
        }
        let png = pixart_nodes::image_io::encode_png(&px, 64, 64, 3, &[]).unwrap();
        std::fs::write(dir.join(format!("img{i:02}.png")), png).unwrap();
    }
}

#[test]
fn a_controlnet_trains_alone_from_copied_blocks_resumes_and_controlnet_load_reads_it() {
    use pixart_runtime::candle_core::{DType, Device};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8);
    let controls = tmp.path().join("edges");
    make_controls(&controls, 8);
    let with_control = |path: PathBuf| {
        let yaml = std::fs::read_to_string(&path).unwrap().replace(
            "path: \"cache\"}",
            &format!("path: \"cache\", control: \"{}\"}}", controls.display()),
        );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let extra = "      controlnet_blocks: 1";
    let ten = tmp.path().join("ten.yaml");
    std::fs::rename(
        with_control(workflow(tmp.path(), &data, 10, 5, extra)),
        &ten,
    )
    .unwrap();
    let five = with_control(workflow(tmp.path(), &data, 5, 5, extra));

    let straight = tmp.path().join("straight");
    std::fs::create_dir(&straight).unwrap();
    run_ok(&ten, &straight);
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir(&resumed).unwrap();
    run_ok(&five, &resumed);
    run_ok(&ten, &resumed);
    let last = "run/checkpoint-000010";
    for part in CONTROLNET_PARTS {
        assert!(
            read(&straight.join(last).join(part)) == read(&resumed.join(last).join(part)),
            "{part} differs after a resume"
        );
    }
    let ckpt = straight.join(last);
    assert!(!ckpt.join("transformer").exists());
    // Only the ControlNet trains: one copied block and its projections.
    let names = tensor_names(&ckpt.join("controlnet/diffusion_pytorch_model.safetensors"));
    assert!(
        names.iter().all(|n| n.starts_with("controlnet_blocks.0.")),
        "{names:?}"
    );
    for part in [
        "before_proj.weight",
        "after_proj.weight",
        "transformer_block.attn2.to_k.weight",
    ] {
        assert!(
            names.contains(&format!("controlnet_blocks.0.{part}")),
            "no {part}"
        );
    }
    let params = tensor_names(&ckpt.join("state/params.safetensors"));
    assert!(params.iter().all(|n| n.starts_with("controlnet_blocks.")));
    assert!(losses(&straight.join("run")).iter().all(|l| l.is_finite()));

    // controlnet.load's reader takes the folder; training moved the projections
    // off zero and the copy off the base block it started as.
    let (net, copies) =
        pixart_models::pixart::read_controlnet(&ckpt.join("controlnet"), DType::F32, &Device::Cpu)
            .unwrap();
    assert_eq!(copies, 1);
    let base = pixart_nodes::pixart::load::transformer(
        &repo().join("tests/fixtures/tiny-pixart/transformer"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(common::abs_max(&net["controlnet_blocks.0.after_proj.weight"]) > 0.0);
    let copy = &net["controlnet_blocks.0.transformer_block.attn1.to_q.weight"];
    let source = &base.weights["transformer_blocks.0.attn1.to_q.weight"];
    let moved = common::max_abs_diff(copy, source);
    assert!(moved > 0.0 && moved < 0.1, "the copy moved by {moved}");

    // Features without control images are refused, naming the port.
    let plain = workflow(tmp.path(), &data, 10, 5, extra);
    let o = pixart(&plain, &straight).output().unwrap();
    assert!(!o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("features") && said.contains("control"),
        "{said}"
    );
    // A control image of another aspect than its image is refused by name.
    let wide = pixart_nodes::image_io::encode_png(&vec![0u8; 64 * 32 * 3], 64, 32, 3, &[]).unwrap();
    std::fs::write(controls.join("img03.png"), wide).unwrap();
    let o = pixart(&ten, &tmp.path().join("resumed")).output().unwrap();
    assert!(!o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("img03.png") && said.contains("aspect"),
        "{said}"
    );
    // A full run does not resume from the ControlNet's checkpoint.
    let full = workflow(tmp.path(), &data, 12, 5, "");
    let o = pixart(&full, &straight).output().unwrap();
    assert!(
        !o.status.success(),
        "a full run resumed a ControlNet's checkpoint"
    );
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("other settings") && said.contains("controlnet"),
        "{said}"
    );
}
