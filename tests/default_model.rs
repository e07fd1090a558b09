//! The committed default model (models/pixart-shapes) keeps drawing what it is
//! asked for: the detector scores its pictures of every single-object prompt of
//! the shapes grammar (13 colour-shape-position combinations of them never seen in
//! training), and no attribute may fall below the committed model's level.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(workflow: &str, dir: &Path) {
    let file = dir.join("wf.yaml");
    std::fs::write(&file, workflow).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The committed model's measured rates (BENCHMARKS.md: 0.656 / 0.300 / 0.656 on
/// this prompt set) less a margin for floating-point differences between
/// machines, which can flip a detection here and there. The issue's goals (0.9 /
/// 0.8 / 0.8) are not reached yet: raise these floors to them with the model
/// that reaches them.
const FLOORS: [(&str, f64); 3] = [("colour", 0.60), ("shape", 0.25), ("position", 0.60)];

#[test]
fn the_default_model_draws_the_prompted_colour_shape_and_position() {
    let model = root().join("models/pixart-shapes");
    assert!(
        model.join("model_index.json").is_file(),
        "the default model is committed"
    );
    let tmp = tempfile::tempdir().unwrap();
    run(
        &format!(
            r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: "{}"}}}}
  eval:
    type: eval.shapes
    inputs: {{transformer: "${{pipe.transformer}}", tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", vae: "${{pipe.vae}}", samples: 1, steps: 20, guidance: 4.5, seed: 0, out: eval}}
"#,
            model.display()
        ),
        tmp.path(),
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("eval/report.json")).unwrap(),
    )
    .unwrap();
    let scores = &report["scores"];
    assert_eq!(scores["all"]["images"], 90);
    assert_eq!(scores["held_out"]["images"], 13);
    for (attribute, floor) in FLOORS {
        let rate = scores["all"][attribute].as_f64().unwrap();
        assert!(
            rate >= floor,
            "{attribute}: {rate:.3} < {floor} (report: {scores})"
        );
    }
}
