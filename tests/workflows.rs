//! Every workflow shipped in `workflows/` validates and runs.

use pixart_runtime::executor::{CachePolicy, Executor, RunOptions};
use pixart_runtime::workflow::load_workflow_file;
use std::path::PathBuf;

fn shipped() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_workflow_validates_without_warnings_and_runs() {
    let reg = pixart_nodes::builtin_registry();
    for file in shipped() {
        // The default model's recipe and its ablations take hours: validated
        // here, a short version runs in tests/shapes.rs.
        if file.ends_with("train-default.yaml") || file.ends_with("ablations.yaml") {
            let wf = load_workflow_file(&file, &reg, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(wf.warnings.is_empty(), "{:?}", wf.warnings);
            continue;
        }
        // Relabelling needs a LLaVA folder and images: tests/captioner.rs runs it
        // on the tiny fixture model and a generated folder.
        if file.ends_with("caption-dataset.yaml") {
            let wf = load_workflow_file(&file, &reg, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(wf.warnings.is_empty(), "{:?}", wf.warnings);
            continue;
        }
        // Training needs data: tests/training.rs runs it on a generated set.
        if file.ends_with("train-3stage.yaml") {
            let data: Vec<(String, String)> = ["class_data", "text_data", "aesthetic_data"]
                .iter()
                .map(|k| (k.to_string(), "data".to_string()))
                .collect();
            let wf = load_workflow_file(&file, &reg, &data).unwrap_or_else(|e| panic!("{e}"));
            assert!(wf.warnings.is_empty(), "{:?}", wf.warnings);
            continue;
        }
        // The adapter recipes train for minutes: a few steps on a few images
        // here (tests/training.rs trains LoRAs and ControlNets to the
        // checkpoint), through the CLI, whose thread settings keep candle's
        // pool from spinning against the model's threads.
        if file.ends_with("train-lora.yaml") || file.ends_with("train-controlnet.yaml") {
            let wf = load_workflow_file(&file, &reg, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(wf.warnings.is_empty(), "{:?}", wf.warnings);
            let out = tempfile::tempdir().unwrap();
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_pixart"))
                .arg("run")
                .arg(&file)
                .arg("--out")
                .arg(out.path())
                .args([
                    "--set",
                    "steps=2",
                    "--set",
                    "images=16",
                    "--set",
                    "samples=1",
                ])
                .args(["--set", "eval_steps=2", "--set", "work=work"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(out.path().join("work/train/checkpoint-000002").is_dir());
            continue;
        }
        let wf = load_workflow_file(&file, &reg, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            wf.warnings.is_empty(),
            "{}: {:?}",
            file.display(),
            wf.warnings
        );
        let out = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            out_dir: out.path().into(),
            ..RunOptions::default()
        };
        let report = Executor::new(CachePolicy::None)
            .run(&wf, opts)
            .await
            .unwrap();
        assert!(report.ok(), "{}: {:?}", file.display(), report.failures);
        assert!(
            std::fs::read_dir(out.path()).unwrap().count() > 0,
            "{} wrote nothing",
            file.display()
        );
    }
}
