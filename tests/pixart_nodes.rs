//! The PixArt-α nodes in workflows: the issue's workflow as written, node-level
//! parity with diffusers, official checkpoints, samplers, cancellation, errors.

mod common;

use common::{load, max_abs_diff, registry};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::executor::{CachePolicy, Executor, NodeStatus, RunOptions, RunReport};
use pixart_runtime::{CancellationToken, Event, Value, Workflow};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

async fn run(wf: &Workflow, dir: &Path) -> RunReport {
    let opts = RunOptions {
        out_dir: dir.into(),
        base_dir: fixtures(),
        ..RunOptions::default()
    };
    Executor::new(CachePolicy::None)
        .run(wf, opts)
        .await
        .unwrap()
}

fn image(report: &RunReport, node: &str) -> Tensor {
    match report.output(node, "image") {
        Some(Value::Image(t)) => t.clone(),
        other => panic!("{node}.image: {other:?}; failures {:?}", report.failures),
    }
}

/// The issue's workflow, verbatim but for the model path (the fixture pipeline).
const ISSUE_WORKFLOW: &str = r#"version: 1
params:
  prompt: {type: string, default: "a small cactus with a happy face in the sahara desert"}
  seed: {type: int, default: 0}
nodes:
  pipe:   {type: pixart.load, inputs: {path: "tiny-pixart"}}
  pos:    {type: t5.encode, inputs: {tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", text: "${params.prompt}"}}
  neg:    {type: t5.encode, inputs: {tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", text: ""}}
  sample:
    type: pixart.sample
    inputs:
      transformer: "${pipe.transformer}"
      scheduler: "${pipe.scheduler}"
      positive: "${pos.conditioning}"
      negative: "${neg.conditioning}"
      steps: 20
      guidance: 4.5
      width: 512
      height: 512
      seed: "${params.seed}"
      resolution_binning: true
  decode: {type: vae.decode, inputs: {vae: "${pipe.vae}", latents: "${sample.latents}"}}
  save:   {type: image.save, inputs: {image: "${decode.image}", path: "out/cactus-${params.seed}.png"}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issue_workflow_runs_as_written() {
    let (reg, _) = registry();
    let out = tempfile::tempdir().unwrap();
    let report = run(&load(ISSUE_WORKFLOW, &reg), out.path()).await;
    assert!(report.ok(), "{:?}", report.failures);
    // sample_size 32 bins at 256 px: generated at 256×256, resized back to 512×512.
    assert_eq!(image(&report, "decode").dims(), [1, 512, 512, 3]);
    assert!(out.path().join("out/cactus-0.png").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_pipeline_equals_diffusers_given_the_same_noise() {
    let cases = [("square", 256, 256), ("resized", 112, 152)];
    nodes_match_diffusers("tiny-pixart", "pipeline.safetensors", &cases).await;
}

/// A PixArt-Σ folder runs the same workflow with only the model changed: the
/// prompt length (300) and the VAE's scale come from the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigma_folder_runs_the_same_workflow() {
    let cases = [("square", 256, 256), ("binned", 200, 304)];
    nodes_match_diffusers("tiny-pixart-sigma", "sigma_pipeline.safetensors", &cases).await;
}

async fn nodes_match_diffusers(folder: &str, reference_file: &str, cases: &[(&str, usize, usize)]) {
    let reference = pixart_runtime::candle_core::safetensors::load(
        fixtures().join("reference").join(reference_file),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for &(case, h, w) in cases {
        let noise = dir.path().join(format!("{case}.safetensors"));
        let latents = reference[&format!("{case}.latents")].clone();
        pixart_runtime::candle_core::safetensors::save(
            &std::collections::HashMap::from([("noise", latents)]),
            &noise,
        )
        .unwrap();
        let yaml = ISSUE_WORKFLOW
            .replace("path: \"tiny-pixart\"", &format!("path: \"{folder}\""))
            .replace("width: 512", &format!("width: {w}"))
            .replace("height: 512", &format!("height: {h}"))
            .replace(
                "      seed: \"${params.seed}\"\n",
                "      seed: \"${params.seed}\"\n      latents: \"${noise.tensor}\"\n",
            )
            .replace(
                "  decode:",
                &format!(
                    "  noise: {{type: tensor.load, inputs: {{path: \"{}\"}}}}\n  decode:",
                    noise.display()
                ),
            );
        let (reg, _) = registry();
        let report = run(&load(&yaml, &reg), dir.path()).await;
        assert!(report.ok(), "{:?}", report.failures);
        let got = image(&report, "decode").permute((0, 3, 1, 2)).unwrap();
        let want = &reference[&format!("{case}.image")];
        let diff = max_abs_diff(&got, want);
        assert!(diff <= 1e-3, "{folder} {case}: max difference {diff}");
    }
}

/// The official-format fixture checkpoint with its config.json beside it.
fn official_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-pixart-official.pth"),
        dir.path().join("model.pth"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("tiny-pixart/transformer/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_checkpoint_samples_with_its_null_caption_and_other_samplers() {
    let dir = official_checkpoint();
    for sampler in ["iddpm", "ddim", "dpm_solver++"] {
        let yaml = format!(
            r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: tiny-pixart, transformer: "{}"}}}}
  pos: {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: a red circle}}}}
  sched: {{type: scheduler.select, inputs: {{name: {sampler}, from: "${{pipe.scheduler}}"}}}}
  sample: {{type: pixart.sample, inputs: {{transformer: "${{pipe.transformer}}", scheduler: "${{sched.scheduler}}", positive: "${{pos.conditioning}}", steps: 4, width: 64, height: 64, seed: 3}}}}
  decode: {{type: vae.decode, inputs: {{vae: "${{pipe.vae}}", latents: "${{sample.latents}}"}}}}
  keep: {{type: tensor.save, inputs: {{tensor: "${{decode.image}}", path: img.safetensors}}}}
"#,
            dir.path().join("model.pth").display()
        );
        let (reg, _) = registry();
        let report = run(&load(&yaml, &reg), dir.path()).await;
        assert!(report.ok(), "{sampler}: {:?}", report.failures);
        let img = image(&report, "decode");
        assert_eq!(img.dims(), [1, 64, 64, 3]);
        let mean = img.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            mean.is_finite() && mean > 0.0 && mean < 1.0,
            "{sampler}: {mean}"
        );
    }
    // Without a negative and without a learned null caption, guidance is refused.
    let yaml = r#"version: 1
nodes:
  pipe: {type: pixart.load, inputs: {path: tiny-pixart}}
  pos: {type: t5.encode, inputs: {tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", text: x}}
  sample: {type: pixart.sample, inputs: {transformer: "${pipe.transformer}", scheduler: "${pipe.scheduler}", positive: "${pos.conditioning}", steps: 2, width: 64, height: 64}}
  keep: {type: tensor.save, inputs: {tensor: "${sample.latents}", path: l.safetensors}}
"#;
    let (reg, _) = registry();
    let report = run(&load(yaml, &reg), dir.path()).await;
    assert!(
        report.failures[0].message.contains("negative"),
        "{:?}",
        report.failures
    );
}

/// An empty negative prompt stands for "no negative": a checkpoint with a learned
/// null caption samples exactly as without a negative (the official sampler); a
/// real negative prompt changes the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_negative_uses_the_learned_null_caption() {
    let dir = official_checkpoint();
    let latents = |negative: Option<&str>| {
        let (neg_node, neg_input) = match negative {
            Some(text) => (
                format!(
                    "  neg: {{type: t5.encode, inputs: {{tokenizer: \"${{pipe.tokenizer}}\", encoder: \"${{pipe.text_encoder}}\", text: \"{text}\"}}}}\n"
                ),
                ", negative: \"${neg.conditioning}\"".to_string(),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: tiny-pixart, transformer: "{}"}}}}
  pos: {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: a red circle}}}}
{neg_node}  sample: {{type: pixart.sample, inputs: {{transformer: "${{pipe.transformer}}", scheduler: "${{pipe.scheduler}}", positive: "${{pos.conditioning}}"{neg_input}, steps: 3, width: 64, height: 64, seed: 1}}}}
  keep: {{type: tensor.save, inputs: {{tensor: "${{sample.latents}}", path: l.safetensors}}}}
"#,
            dir.path().join("model.pth").display()
        )
    };
    let mut results = Vec::new();
    for negative in [None, Some(""), Some("blurry")] {
        let (reg, _) = registry();
        let report = run(&load(&latents(negative), &reg), dir.path()).await;
        assert!(report.ok(), "{negative:?}: {:?}", report.failures);
        match report.output("sample", "latents") {
            Some(Value::Latents(l)) => results.push(l.tensor.clone()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(max_abs_diff(&results[0], &results[1]), 0.0);
    assert!(max_abs_diff(&results[0], &results[2]) > 1e-4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vae_round_trip_and_tensor_like_saving() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"version: 1
nodes:
  vae: {type: vae.load, inputs: {path: tiny-pixart/vae}}
  t5: {type: t5.load, inputs: {path: tiny-pixart/text_encoder, tokenizer: tiny-pixart/tokenizer}}
  cond: {type: t5.encode, inputs: {tokenizer: "${t5.tokenizer}", encoder: "${t5.text_encoder}", text: hello, max_length: 16}}
  noise: {type: noise.gaussian, inputs: {shape: [1, 3, 32, 48], seed: 1}}
  img: {type: image.from_tensor, inputs: {tensor: "${noise.tensor}"}}
  enc: {type: vae.encode, inputs: {vae: "${vae.vae}", image: "${img.image}", mode: mean}}
  dec: {type: vae.decode, inputs: {vae: "${vae.vae}", latents: "${enc.latents}"}}
  save_img: {type: tensor.save, inputs: {tensor: "${dec.image}", path: out/img.safetensors}}
  save_cond: {type: tensor.save, inputs: {tensor: "${cond.conditioning}", path: out/cond.safetensors, key: prompt}}
"#;
    let (reg, _) = registry();
    let report = run(&load(yaml, &reg), dir.path()).await;
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(image(&report, "dec").dims(), [1, 32, 48, 3]);
    let cond = pixart_runtime::candle_core::safetensors::load(
        dir.path().join("out/cond.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(cond["prompt.embeddings"].dims(), [1, 16, 32]);
    // "hello" and </s>: some tokens, then padding to 16.
    let tokens = cond["prompt.mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((2.0..16.0).contains(&tokens), "{tokens}");
    let img = pixart_runtime::candle_core::safetensors::load(
        dir.path().join("out/img.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(img["tensor"].dims(), [1, 3, 32, 48]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_reports_steps_and_stops_when_cancelled() {
    let yaml = ISSUE_WORKFLOW
        .replace("steps: 20", "steps: 1000")
        .replace("width: 512", "width: 256")
        .replace("height: 512", "height: 256");
    let (reg, _) = registry();
    let wf = load(&yaml, &reg);
    let exec = Executor::new(CachePolicy::None);
    let mut rx = exec.subscribe();
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out_dir: dir.path().into(),
        base_dir: fixtures(),
        cancel: cancel.clone(),
        ..RunOptions::default()
    };
    let watcher = async {
        loop {
            if let Ok(Event::NodeProgress {
                node, value, max, ..
            }) = rx.recv().await
            {
                if &*node == "sample" && value >= 2 {
                    assert_eq!(max, 1000);
                    cancel.cancel();
                    break;
                }
            }
        }
    };
    let (report, ()) = tokio::join!(exec.run(&wf, opts), watcher);
    let report = report.unwrap();
    assert!(report.cancelled);
    assert_eq!(report.node("sample").unwrap().status, NodeStatus::Cancelled);
    assert!(!dir.path().join("out/cactus-0.png").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    let failure = |report: RunReport| {
        report
            .failures
            .into_iter()
            .next()
            .map(|f| f.message)
            .unwrap_or_default()
    };
    let load_yaml = |path: &Path| {
        format!(
            "version: 1\nnodes:\n  p: {{type: pixart.load, inputs: {{path: \"{}\"}}}}\n  e: {{type: t5.encode, inputs: {{tokenizer: \"${{p.tokenizer}}\", encoder: \"${{p.text_encoder}}\", text: x}}}}\n  s: {{type: tensor.save, inputs: {{tensor: \"${{e.conditioning}}\", path: c.safetensors}}}}\n",
            path.display()
        )
    };
    let (reg, _) = registry();

    // Not a pipeline folder.
    let msg = failure(
        run(
            &load(&load_yaml(&fixtures().join("tiny-pixart/vae")), &reg),
            dir.path(),
        )
        .await,
    );
    assert!(msg.contains("model_index.json"), "{msg}");

    // A corrupt weights file: named.
    let broken = dir.path().join("broken");
    for part in pixart_nodes::pixart::load::PipelineFolder::PARTS {
        copy(
            &fixtures().join("tiny-pixart").join(part),
            &broken.join(part),
        );
    }
    std::fs::copy(
        fixtures().join("tiny-pixart/model_index.json"),
        broken.join("model_index.json"),
    )
    .unwrap();
    std::fs::write(
        broken.join("text_encoder/model-00002-of-00004.safetensors"),
        b"garbage",
    )
    .unwrap();
    let msg = failure(run(&load(&load_yaml(&broken), &reg), dir.path()).await);
    assert!(
        msg.contains("model-00002-of-00004.safetensors")
            && msg.contains("not a readable safetensors"),
        "{msg}"
    );

    // A missing tensor: named, with where it was looked for.
    copy(
        &fixtures().join("tiny-pixart/text_encoder"),
        &broken.join("text_encoder"),
    );
    let vae_dir = broken.join("vae");
    let weights = pixart_runtime::candle_core::safetensors::load(
        vae_dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut fewer = weights.clone();
    fewer.remove("decoder.conv_in.weight");
    pixart_runtime::candle_core::safetensors::save(
        &fewer,
        vae_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let msg = failure(run(&load(&load_yaml(&broken), &reg), dir.path()).await);
    assert!(
        msg.contains("decoder.conv_in.weight") && msg.contains("VAE"),
        "{msg}"
    );

    // A wrong shape: named with both shapes.
    let mut wrong = weights;
    wrong.insert(
        "decoder.conv_in.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    pixart_runtime::candle_core::safetensors::save(
        &wrong,
        vae_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let msg = failure(run(&load(&load_yaml(&broken), &reg), dir.path()).await);
    assert!(
        msg.contains("decoder.conv_in.weight") && msg.contains("shape"),
        "{msg}"
    );
}

/// `memory: low`: models load when first read, T5's weights go once the run's
/// last T5 reader is done (the handle says so), the image is the same, and a
/// later run that encodes again loads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_encoder_can_be_released_after_encoding() {
    use pixart_nodes::pixart::text_encoder::TextEncoder;
    let (reg, _) = registry();
    let yaml = |memory: &str| {
        format!(
            r#"version: 1
params:
  prompt: {{type: string, default: "a cactus"}}
nodes:
  pipe: {{type: pixart.load, inputs: {{path: "tiny-pixart", memory: {memory}}}}}
  pos:  {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: "${{params.prompt}}"}}}}
  neg:  {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: ""}}}}
  sample:
    type: pixart.sample
    inputs: {{transformer: "${{pipe.transformer}}", scheduler: "${{pipe.scheduler}}", positive: "${{pos.conditioning}}",
             negative: "${{neg.conditioning}}", steps: 2, width: 256, height: 256, seed: 1}}
  decode: {{type: vae.decode, inputs: {{vae: "${{pipe.vae}}", latents: "${{sample.latents}}"}}}}
"#
        )
    };
    let loaded = |report: &RunReport| match report.output("pipe", "text_encoder") {
        Some(Value::Handle(h)) => h.downcast::<TextEncoder>().unwrap().is_loaded(),
        other => panic!("pipe.text_encoder: {other:?}"),
    };
    let out = tempfile::tempdir().unwrap();
    let opts = || RunOptions {
        out_dir: out.path().into(),
        base_dir: fixtures(),
        ..RunOptions::default()
    };
    // One executor: its output cache keeps `pipe` (and the handle) between runs.
    let exec = Executor::new(CachePolicy::default());
    let kept = exec.run(&load(&yaml("keep"), &reg), opts()).await.unwrap();
    assert!(kept.ok(), "{:?}", kept.failures);
    assert!(loaded(&kept));

    let released_wf = load(&yaml("low"), &reg);
    // Loading reads no weights: the handles are made when first read.
    let lazy = exec
        .run(
            &released_wf,
            RunOptions {
                targets: vec!["pipe".into()],
                ..opts()
            },
        )
        .await
        .unwrap();
    assert!(lazy.ok(), "{:?}", lazy.failures);
    for port in ["text_encoder", "transformer", "vae"] {
        match lazy.output("pipe", port) {
            Some(Value::Handle(h)) if port == "text_encoder" => {
                assert!(!h.downcast::<TextEncoder>().unwrap().is_loaded())
            }
            Some(Value::Handle(h)) => assert!(!h.is_resolved(), "{port} was loaded"),
            other => panic!("pipe.{port}: {other:?}"),
        }
    }
    let released = exec.run(&released_wf, opts()).await.unwrap();
    assert!(released.ok(), "{:?}", released.failures);
    assert!(
        !loaded(&released),
        "the weights outlived the run's last encode"
    );
    assert_eq!(
        max_abs_diff(&image(&kept, "decode"), &image(&released, "decode")),
        0.0
    );

    // A new prompt: the cached loader's handle loads T5 again, and lets it go again.
    let again_wf = common::load_with(&yaml("low"), &reg, &[("prompt", "a rose")]);
    let again = exec.run(&again_wf, opts()).await.unwrap();
    assert!(again.ok(), "{:?}", again.failures);
    assert!(!loaded(&again));
    assert!(max_abs_diff(&image(&kept, "decode"), &image(&again, "decode")) > 0.0);
}
