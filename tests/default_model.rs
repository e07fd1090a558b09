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

/// The committed model's rates on this prompt set at CFG 3, as txt2img samples it
/// (BENCHMARKS.md: 0.967 / 0.922 / 0.967; shape 0.900 since the detector also
/// reads rings, which takes two blurred blobs for rings), must stay at the issue's goals for colour
/// and shape (0.9 / 0.8), and position at colour's (it is drawn as reliably). These
/// 90 images are one draw (over 2160, shape is 0.84): they leave a margin for
/// floating-point differences between machines, which can flip a detection here
/// and there.
const FLOORS: [(&str, f64); 3] = [("colour", 0.9), ("shape", 0.8), ("position", 0.9)];

/// Runs a workflow of one scoring node over the committed model (`{model}` in
/// it) and returns the `scores` of the report it writes into `out`.
fn scores_of(workflow: &str, out: &str) -> serde_json::Value {
    let model = root().join("models/pixart-shapes");
    assert!(
        model.join("model_index.json").is_file(),
        "the default model is committed"
    );
    let tmp = tempfile::tempdir().unwrap();
    run(
        &workflow.replace("{model}", &model.display().to_string()),
        tmp.path(),
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join(out).join("report.json")).unwrap(),
    )
    .unwrap();
    report["scores"].clone()
}

fn assert_floors(scores: &serde_json::Value, floors: &[(&str, f64)]) {
    for (attribute, floor) in floors {
        let rate = scores["all"][attribute].as_f64().unwrap();
        assert!(
            rate >= *floor,
            "{attribute}: {rate:.3} < {floor} (report: {scores})"
        );
    }
}

#[test]
fn the_default_model_draws_the_prompted_colour_shape_and_position() {
    let scores = scores_of(
        r#"version: 1
nodes:
  pipe: {type: pixart.load, inputs: {path: "{model}"}}
  eval:
    type: eval.shapes
    inputs: {transformer: "${pipe.transformer}", tokenizer: "${pipe.tokenizer}", encoder: "${pipe.text_encoder}", vae: "${pipe.vae}", samples: 1, steps: 20, guidance: 3.0, seed: 0, out: eval}
"#,
        "eval",
    );
    assert_eq!(scores["all"]["images"], 90);
    assert_eq!(scores["held_out"]["images"], 13);
    assert_floors(&scores, &FLOORS);
}

/// The detector judges the committed VAE fairly: true renders of the same prompts,
/// encoded and decoded by it, score near the detector's 98%+ on clean renders
/// (BENCHMARKS.md has the measured ceiling). A model decoded by this VAE can
/// reach at most this.
const RECONSTRUCTION_FLOORS: [(&str, f64); 3] =
    [("colour", 0.93), ("shape", 0.85), ("position", 0.93)];

#[test]
fn the_default_vae_keeps_what_the_detector_reads() {
    let scores = scores_of(
        r#"version: 1
nodes:
  vae: {type: vae.load, inputs: {path: "{model}/vae"}}
  rec: {type: eval.reconstruction, inputs: {vae: "${vae.vae}", samples: 1, out: rec}}
"#,
        "rec",
    );
    assert_floors(&scores, &RECONSTRUCTION_FLOORS);
}
