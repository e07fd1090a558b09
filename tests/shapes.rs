//! The shapes world and the from-scratch pieces of the default model's recipe:
//! the dataset is deterministic and reused; a tokenizer, a T5 encoder and a VAE
//! are made from nothing, a transformer trains on their features, and
//! `eval.shapes` scores it — a short version of the recipe, run by CI.

use std::path::Path;
use std::process::{Command, Stdio};

fn run(workflow: &str, dir: &Path) {
    let file = dir.join("wf.yaml");
    std::fs::write(&file, workflow).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_shapes_dataset_is_deterministic_and_kept_when_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let wf = |folder: &str, captions: &str| {
        format!(
            "version: 1\nnodes:\n  d: {{type: dataset.shapes, inputs: {{path: {folder}, count: 40, seed: 5, captions: {captions}}}}}\n"
        )
    };
    run(&wf("a", "dense"), tmp.path());
    run(&wf("b", "dense"), tmp.path());
    let a = files(&tmp.path().join("a"));
    assert_eq!(a.len(), 40 * 3 + 1);
    assert_eq!(a, files(&tmp.path().join("b")));
    let caption =
        String::from_utf8(a.iter().find(|f| f.0 == "000007.txt").unwrap().1.clone()).unwrap();
    assert!(caption.ends_with(" background"), "{caption}");

    // Unchanged settings: nothing is rewritten.
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let png = tmp.path().join("a/000003.png");
    let before = stamp(&png);
    std::thread::sleep(std::time::Duration::from_millis(20));
    run(&wf("a", "dense"), tmp.path());
    assert_eq!(before, stamp(&png));

    // Sparse captions: the same images, shorter text.
    run(&wf("a", "sparse"), tmp.path());
    let sparse = files(&tmp.path().join("a"));
    for ((name, dense), (_, thin)) in a.iter().zip(&sparse) {
        if name.ends_with(".png") || name.ends_with(".label") {
            assert_eq!(dense, thin, "{name}");
        } else if name.ends_with(".txt") {
            assert!(thin.len() < dense.len(), "{name}");
        }
    }
}

const VAE: &str = r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 8, 16], "layers_per_block": 1,
 "latent_channels": 4, "norm_num_groups": 4, "sample_size": 64}"#;

const TRANSFORMER: &str = r#"{"_class_name": "PixArtTransformer2DModel", "sample_size": 16, "patch_size": 2,
 "in_channels": 4, "out_channels": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 12,
 "cross_attention_dim": 24, "caption_channels": 16, "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
 "activation_fn": "gelu-approximate", "attention_bias": true, "norm_elementwise_affine": false, "norm_eps": 1e-6}"#;

#[test]
fn a_model_is_made_from_nothing_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("vae.json"), VAE).unwrap();
    std::fs::write(tmp.path().join("transformer.json"), TRANSFORMER).unwrap();
    let workflow = r#"version: 1
nodes:
  shapes: {type: dataset.shapes, inputs: {path: data, count: 24, seed: 1}}
  data: {type: dataset.folder, inputs: {path: "${shapes.path}", resolution: 64}}
  tok: {type: tokenizer.train, inputs: {dataset: "${data.dataset}", out: model/tokenizer}}
  t5: {type: t5.init, inputs: {tokenizer: "${tok.tokenizer}", d_model: 16, d_kv: 8, d_ff: 32, heads: 2, out: model/text_encoder}}
  vae: {type: train.vae, inputs: {dataset: "${data.dataset}", config: vae.json, steps: 3, batch: 4, crop: 32, out: model/vae}}
  feats:
    type: train.precompute
    inputs: {dataset: "${data.dataset}", tokenizer: "${tok.tokenizer}", encoder: "${t5.encoder}", vae: "${vae.vae}", path: cache}
  stage:
    type: train.pixart
    inputs: {features: "${feats.features}", config: transformer.json, steps: 4, batch: 4, lr: 1.0e-3, warmup: 0, checkpoint_every: 0, out: run}
  eval:
    type: eval.shapes
    inputs: {transformer: "${stage.transformer}", tokenizer: "${tok.tokenizer}", encoder: "${t5.encoder}", vae: "${vae.vae}", steps: 2, out: eval}
  save:
    type: pipeline.save
    inputs: {transformer: "${stage.transformer}", tokenizer: "${tok.path}", text_encoder: "${t5.path}", vae: "${vae.path}", out: pipeline}
"#;
    run(workflow, tmp.path());
    let model = tmp.path().join("model");
    for part in [
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(model.join(part).is_file(), "{part}");
    }
    let vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("vae/config.json")).unwrap())
            .unwrap();
    let scaling = vae["scaling_factor"].as_f64().unwrap();
    assert!(
        scaling.is_finite() && scaling > 0.0 && scaling != 0.18215,
        "{scaling}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("eval/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["prompts"], 90);
    assert_eq!(report["scores"]["held_out"]["objects"], 13);
    for attr in ["colour", "shape", "position"] {
        let rate = report["scores"]["all"][attr].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate), "{attr}: {rate}");
    }
    assert!(tmp.path().join("eval/sheet.png").is_file());

    // The assembled pipeline loads as one and scores the same.
    run(
        r#"version: 1
nodes:
  pipe: {type: pixart.load, inputs: {path: pipeline}}
  eval:
    type: eval.shapes
    inputs: {transformer: "${pipe.transformer}", tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", vae: "${pipe.vae}", steps: 2, out: eval2}
"#,
        tmp.path(),
    );
    let again: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("eval2/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(again["scores"], report["scores"]);

    // The same VAE request again reuses the trained folder.
    let weights = model.join("vae/diffusion_pytorch_model.safetensors");
    let before = std::fs::metadata(&weights).unwrap().modified().unwrap();
    run(workflow, tmp.path());
    assert_eq!(
        before,
        std::fs::metadata(&weights).unwrap().modified().unwrap()
    );
}
