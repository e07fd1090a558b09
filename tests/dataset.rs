//! `dataset.folder`: image + caption folders and JSONL manifests, with clear errors.

mod common;

use pixart_nodes::training::dataset::Dataset;
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions, RunReport};
use pixart_runtime::Value;
use std::path::Path;

fn png(path: &Path) {
    let bytes = pixart_nodes::image_io::encode_png(&[10, 20, 30], 1, 1, 3, &[]).unwrap();
    std::fs::write(path, bytes).unwrap();
}

async fn index(dir: &Path, path: &str) -> RunReport {
    let (reg, _) = common::registry();
    let yaml = format!(
        "version: 1\nnodes:\n  data: {{type: dataset.folder, inputs: {{path: \"{path}\", resolution: 256}}}}\n  n: {{type: test.output, inputs: {{a: \"${{data.count}}\"}}}}\n"
    );
    let wf = common::load(&yaml, &reg);
    let opts = RunOptions {
        base_dir: dir.into(),
        out_dir: dir.into(),
        targets: vec!["data".into(), "n".into()],
        ..RunOptions::default()
    };
    Executor::new(CachePolicy::None)
        .run(&wf, opts)
        .await
        .unwrap()
}

fn dataset(report: &RunReport) -> Dataset {
    match report.output("data", "dataset") {
        Some(Value::Handle(h)) => h.downcast::<Dataset>().unwrap().clone(),
        other => panic!("{other:?}: {:?}", report.failures),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_pair_images_with_captions_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for (name, caption) in [
        ("b", "a blue square"),
        ("a", "  a red circle\n"),
        ("c", "a green triangle"),
    ] {
        png(&data.join(format!("{name}.png")));
        std::fs::write(data.join(format!("{name}.txt")), caption).unwrap();
    }
    std::fs::write(data.join("notes.md"), "ignored").unwrap();
    let report = index(dir.path(), "data").await;
    assert!(report.ok(), "{:?}", report.failures);
    let ds = dataset(&report);
    let captions: Vec<&str> = ds.items.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(
        captions,
        ["a red circle", "a blue square", "a green triangle"]
    );
    assert_eq!(
        report.output("data", "count").and_then(Value::as_int),
        Some(3)
    );
    assert_eq!(ds.resolution, 256);

    // An image without a caption is named.
    png(&data.join("d.png"));
    let report = index(dir.path(), "data").await;
    let msg = &report.failures[0].message;
    assert!(msg.contains("d.png") && msg.contains("no caption"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_read_with_line_numbers_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    png(&dir.path().join("img/x.png"));
    png(&dir.path().join("img/y.png"));
    std::fs::write(
        dir.path().join("train.jsonl"),
        "{\"image\": \"img/x.png\", \"caption\": \"a cat\"}\n\n{\"image\": \"img/y.png\", \"caption\": \"a dog\"}\n",
    )
    .unwrap();
    let report = index(dir.path(), "train.jsonl").await;
    let ds = dataset(&report);
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.items[1].image, dir.path().join("img/y.png"));

    std::fs::write(dir.path().join("bad.jsonl"), "{\"image\": \"img/x.png\", \"caption\": \"ok\"}\n{\"image\": \"img/none.png\", \"caption\": \"x\"}\n").unwrap();
    let report = index(dir.path(), "bad.jsonl").await;
    let msg = &report.failures[0].message;
    assert!(
        msg.contains("bad.jsonl:2") && msg.contains("does not exist"),
        "{msg}"
    );
    std::fs::write(dir.path().join("worse.jsonl"), "not json\n").unwrap();
    let report = index(dir.path(), "worse.jsonl").await;
    assert!(
        report.failures[0]
            .message
            .contains("worse.jsonl:1: not JSON"),
        "{:?}",
        report.failures
    );
    let report = index(dir.path(), "missing-folder").await;
    assert!(
        report.failures[0].message.contains("missing-folder"),
        "{:?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_precomputed_once_and_match_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // Two 80×64 images (cropped to the centre 64×64) with captions.
    for (i, caption) in ["a red circle", "a blue square"].iter().enumerate() {
        let pixels: Vec<u8> = (0..80 * 64 * 3)
            .map(|p| ((p * (7 + i)) % 251) as u8)
            .collect();
        let bytes = pixart_nodes::image_io::encode_png(&pixels, 80, 64, 3, &[]).unwrap();
        std::fs::write(data.join(format!("{i}.png")), bytes).unwrap();
        std::fs::write(data.join(format!("{i}.txt")), caption).unwrap();
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-pixart");
    let yaml = format!(
        "version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: \"{}\"}}}}
  data: {{type: dataset.folder, inputs: {{path: data, resolution: 64}}}}
  feats:
    type: train.precompute
    inputs: {{dataset: \"${{data.dataset}}\", tokenizer: \"${{pipe.tokenizer}}\", encoder: \"${{pipe.text_encoder}}\", vae: \"${{pipe.vae}}\", path: cache/feats}}
  n: {{type: test.output, inputs: {{a: \"${{feats.computed}}\"}}}}
",
        fixtures.display()
    );
    let (reg, _) = common::registry();
    let wf = common::load(&yaml, &reg);
    let opts = RunOptions {
        base_dir: dir.path().into(),
        out_dir: dir.path().into(),
        ..RunOptions::default()
    };
    let first = Executor::new(CachePolicy::None)
        .run(&wf, opts.clone())
        .await
        .unwrap();
    assert!(first.ok(), "{:?}", first.failures);
    assert_eq!(first.output("n", "out").and_then(Value::as_int), Some(2));
    let item = pixart_runtime::candle_core::safetensors::load(
        dir.path().join("cache/feats/item-000001.safetensors"),
        &pixart_runtime::candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(item["vae_mean"].dims(), [4, 8, 8]);
    assert_eq!(item["vae_std"].dims(), [4, 8, 8]);
    assert_eq!(item["text"].dims(), [120, 32]);
    // The cached posterior is the VAE's on the centre crop of the image.
    let vae = pixart_nodes::pixart::load::vae(
        &fixtures.join("vae"),
        pixart_runtime::candle_core::DType::F32,
        &pixart_runtime::candle_core::Device::Cpu,
    )
    .unwrap();
    let (pixels, _) = pixart_nodes::training::precompute::load_square(
        &data.join("1.png"),
        64,
        &pixart_runtime::candle_core::Device::Cpu,
    )
    .unwrap();
    let mean = vae.encode(&pixels).unwrap().mean.squeeze(0).unwrap();
    let diff = common::max_abs_diff(&mean, &item["vae_mean"]);
    assert!(diff < 1e-6, "{diff}");

    // Same dataset: the cache is reused.
    let second = Executor::new(CachePolicy::None)
        .run(&wf, opts.clone())
        .await
        .unwrap();
    assert_eq!(second.output("n", "out").and_then(Value::as_int), Some(0));
    // An edited caption invalidates it.
    std::fs::write(data.join("0.txt"), "a green circle").unwrap();
    let third = Executor::new(CachePolicy::None)
        .run(&wf, opts)
        .await
        .unwrap();
    assert_eq!(third.output("n", "out").and_then(Value::as_int), Some(2));
}
