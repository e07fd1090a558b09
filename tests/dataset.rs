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
