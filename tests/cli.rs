//! The `pixart` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn pixart(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("pixart runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_lists_every_error_with_lines_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join("wf.yaml");
    std::fs::write(
        &wf,
        "version: 1
params:
  unused: 3
nodes:
  noise:
    type: noise.gausian
  save:
    type: tensor.save
    inputs: {tensor: \"${noise.tensor}\", path: 5}
",
    )
    .unwrap();
    let out = pixart(&["validate", "wf.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("wf.yaml:3:3: warning[unused-param]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("wf.yaml:6:11: error[unknown-node-type]: node `noise`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("did you mean `noise.gaussian`?"),
        "{stdout}"
    );
    assert!(
        stdout.contains("wf.yaml:9:47: error[type-mismatch]: node `save`, port `path`"),
        "{stdout}"
    );

    let json = pixart(&["validate", "--json", "wf.yaml"], dir.path());
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["diagnostics"][1]["kind"], "unknown_node_type");
    assert_eq!(v["diagnostics"][1]["line"], 6);

    let good = pixart(&["validate", "workflows/noise-preview.yaml"], repo());
    assert!(good.status.success(), "{}", text(&good.stdout));
    assert!(text(&good.stdout).contains("ok (4 nodes, 3 edges)"));
}

#[test]
fn run_writes_outputs_and_reports_them() {
    let out = tempfile::tempdir().unwrap();
    let wf = repo().join("workflows/noise-preview.yaml");
    let res = pixart(
        &[
            "run",
            wf.to_str().unwrap(),
            "--set",
            "seed=5",
            "--set",
            "size=16",
            "--out",
            out.path().to_str().unwrap(),
        ],
        repo(),
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    let stdout = text(&res.stdout);
    assert!(
        stdout.contains("4 nodes: 4 executed, 0 cached, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("noise-5.png"), "{stdout}");
    assert!(out.path().join("noise-5.png").exists());
    assert!(out.path().join("noise-5.safetensors").exists());
    // A relative --out, as the README's main job gives it: files land under it once.
    let res = pixart(
        &[
            "run",
            wf.to_str().unwrap(),
            "--set",
            "size=8",
            "--out",
            "rel/dir",
        ],
        out.path(),
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert!(out.path().join("rel/dir/noise-0.png").is_file());
    assert!(out.path().join("rel/dir/noise-0.safetensors").is_file());

    // Without --out, outputs go under ./out; a later workflow reads what that
    // run wrote by the name it wrote it under.
    let res = pixart(
        &[
            "run",
            wf.to_str().unwrap(),
            "--set",
            "size=8",
            "--set",
            "seed=2",
        ],
        out.path(),
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert!(out.path().join("out/noise-2.safetensors").is_file());
    std::fs::write(
        out.path().join("read.yaml"),
        "version: 1\nnodes:\n  t: {type: tensor.load, inputs: {path: noise-2.safetensors}}\n  \
         s: {type: tensor.save, inputs: {tensor: \"${t.tensor}\", path: copy.safetensors}}\n",
    )
    .unwrap();
    let res = pixart(&["run", "read.yaml"], out.path());
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert!(out.path().join("out/copy.safetensors").is_file());

    // --target runs only what the target needs.
    let res = pixart(
        &[
            "run",
            wf.to_str().unwrap(),
            "--set",
            "seed=6",
            "--set",
            "size=8",
            "--target",
            "save_tensor",
            "--out",
            out.path().to_str().unwrap(),
        ],
        repo(),
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert!(out.path().join("noise-6.safetensors").exists());
    assert!(!out.path().join("noise-6.png").exists());
}

#[test]
fn bad_arguments_and_failures_exit_1_with_a_message() {
    let wf = "workflows/noise-preview.yaml";
    let res = pixart(&["run", wf, "--set", "size=1"], repo());
    assert_eq!(res.status.code(), Some(1));
    assert!(
        text(&res.stderr).contains("--set size=1: 1 is below the minimum 8"),
        "{}",
        text(&res.stderr)
    );
    let res = pixart(&["run", wf, "--set", "seed"], repo());
    assert_eq!(res.status.code(), Some(1));
    assert!(text(&res.stderr).contains("write NAME=VALUE"));
    let res = pixart(&["run", "no/such/file.yaml"], repo());
    assert_eq!(res.status.code(), Some(1));
    assert!(
        text(&res.stderr).contains("no/such/file.yaml"),
        "{}",
        text(&res.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fail.yaml"),
        "version: 1\nnodes:\n  l: {type: tensor.load, inputs: {path: absent.safetensors}}\n  s: {type: tensor.save, inputs: {tensor: \"${l.tensor}\", path: o.safetensors}}\n  n: {type: noise.gaussian, inputs: {shape: [2]}}\n  t: {type: tensor.save, inputs: {tensor: \"${n.tensor}\", path: n.safetensors}}\n",
    )
    .unwrap();
    let res = pixart(&["run", "fail.yaml"], dir.path());
    assert_eq!(res.status.code(), Some(1));
    let stderr = text(&res.stderr);
    assert!(
        stderr.contains("node `l` (tensor.load@1) failed") && stderr.contains("absent.safetensors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("not produced: l.tensor, s.path"),
        "{stderr}"
    );
    assert!(
        dir.path().join("out/n.safetensors").exists(),
        "the independent branch still ran"
    );
}

#[test]
fn nodes_catalog_and_graph_export() {
    let res = pixart(&["nodes", "--json"], repo());
    assert!(res.status.success());
    let catalog: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let noise = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "noise.gaussian")
        .expect("noise.gaussian in the catalog");
    assert_eq!(noise["version"], 1);
    assert_eq!(noise["inputs"][1]["name"], "seed");
    assert_eq!(noise["inputs"][1]["min"], 0.0);
    assert_eq!(
        noise["inputs"][2]["type"]["enum"],
        serde_json::json!(["f32", "f16", "bf16"])
    );
    let res = pixart(&["nodes"], repo());
    assert!(text(&res.stdout).contains("noise.gaussian@1"));

    let res = pixart(
        &[
            "graph",
            "workflows/noise-preview.yaml",
            "--format",
            "mermaid",
        ],
        repo(),
    );
    let mermaid = text(&res.stdout);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(
        mermaid.contains("noise -- \"tensor → tensor\" --> image"),
        "{mermaid}"
    );
    let res = pixart(&["graph", "workflows/noise-preview.yaml"], repo());
    assert!(text(&res.stdout).contains("\"image\" -> \"save_image\" [label=\"image → image\"]"));

    let help = pixart(&["--help"], repo());
    let help = text(&help.stdout);
    for cmd in ["run", "validate", "nodes", "graph", "bench"] {
        assert!(help.contains(cmd), "{help}");
    }
}
