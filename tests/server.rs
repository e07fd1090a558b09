//! The HTTP/WebSocket API, driven through warp's test client (no sockets).

mod common;

use common::api::{call, send, wait_done};

use pixart_runtime::executor::{CachePolicy, Executor};
use pixart_runtime::server::{routes, ServerConfig, State};
use serde_json::Value as J;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use warp::http::StatusCode;

fn server(out: &Path) -> Arc<State> {
    let (reg, _) = common::registry();
    let config = ServerConfig {
        out_dir: out.to_path_buf(),
        base_dir: out.to_path_buf(),
        upload_limit: 4096,
        ..ServerConfig::default()
    };
    State::start(reg, Executor::new(CachePolicy::default()), config)
}

const SAVE: &str = "version: 1
name: save-noise
params: {seed: 1}
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [2, 3], seed: \"${params.seed}\"}}
  save: {type: tensor.save, inputs: {tensor: \"${noise.tensor}\", path: \"t/n-${params.seed}.safetensors\"}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_validation_and_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let (status, nodes, _) = call(&s, "GET", "/api/nodes", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "pixart.sample"));

    let (_, ok, _) = call(&s, "POST", "/api/validate", SAVE).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let (_, bad, _) = call(
        &s,
        "POST",
        "/api/validate",
        "version: 1\nnodes: {a: [1, 2}\n",
    )
    .await;
    assert_eq!(
        (bad["ok"].clone(), bad["diagnostics"][0]["kind"].clone()),
        (J::Bool(false), J::from("syntax"))
    );
    assert_eq!(bad["diagnostics"][0]["line"], 2);
    let unknown = SAVE.replace("noise.gaussian", "noise.gausian");
    let (_, bad, _) = call(&s, "POST", "/api/validate", &unknown).await;
    assert_eq!(bad["diagnostics"][0]["kind"], "unknown_node_type");
    assert_eq!(bad["diagnostics"][0]["node"], "noise");
    let mismatch = SAVE.replace(
        "path: \"t/n-${params.seed}.safetensors\"",
        "path: \"${noise.tensor}\"",
    );
    let body = serde_json::json!({ "workflow": mismatch, "params": {"seed": 4} }).to_string();
    let (_, bad, _) = call(&s, "POST", "/api/validate", body).await;
    assert_eq!(bad["diagnostics"][0]["kind"], "type_mismatch", "{bad}");
    assert_eq!(bad["diagnostics"][0]["port"], "path");

    let (status, spec, _) = call(&s, "GET", "/api/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["paths"]["/api/runs/{id}/cancel"].is_object());
    let (status, _, _) = call(&s, "GET", "/api/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_queued_executed_kept_in_history_and_its_files_served_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let (status, bad, _) = call(
        &s,
        "POST",
        "/api/runs",
        SAVE.replace("noise.gaussian", "nope"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["diagnostics"][0]["kind"], "unknown_node_type");

    let body = serde_json::json!({ "workflow": SAVE, "params": {"seed": 7} }).to_string();
    let (status, queued, _) = call(&s, "POST", "/api/runs", body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = queued["run_id"].as_str().unwrap().to_string();
    let run = wait_done(&s, &id).await;
    assert_eq!(run["state"], "finished", "{run}");
    assert_eq!(run["name"], "save-noise");
    let file = run["outputs"][0]["files"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, bytes) = call(&s, "GET", &format!("/api/files/{file}"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        bytes,
        std::fs::read(dir.path().join("t/n-7.safetensors")).unwrap()
    );

    let (_, history, _) = call(&s, "GET", "/api/history", "").await;
    assert_eq!(history[0]["id"], id.as_str());
    let (_, queue, _) = call(&s, "GET", "/api/runs", "").await;
    assert_eq!(queue.as_array().unwrap().len(), 0);

    // Unknown ids; cancelling a finished run.
    let (status, _, _) = call(&s, "GET", "/api/runs/r0-999", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&s, "POST", "/api/runs/r0-999/cancel", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, msg, _) = call(&s, "POST", &format!("/api/runs/{id}/cancel"), "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{msg}");

    // A restarted server keeps the history and still serves the files.
    let again = server(dir.path());
    let (_, history, _) = call(&again, "GET", "/api/history", "").await;
    assert_eq!(history[0]["id"], id.as_str());
    let (status, _, _) = call(&again, "GET", &format!("/api/files/{file}"), "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cannot_be_reached_by_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
    let s = server(dir.path());
    for path in [
        "/api/files/..%2Fsecret.txt",
        "/api/files/../secret.txt",
        "/api/files/%2Fetc%2Fpasswd",
        "/api/files//etc/passwd",
        "/api/files/secret.txt",
        "/api/files/..%252F..%252Fetc%252Fpasswd",
    ] {
        let (status, _, bytes) = call(&s, "GET", path, "").await;
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
            "{path}: {status}"
        );
        assert!(
            !String::from_utf8_lossy(&bytes).contains("secret\""),
            "{path}"
        );
        assert_ne!(bytes, b"secret", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_size_limited_and_type_checked() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let png = pixart_nodes::image_io::encode_png(&[255, 0, 0, 0, 255, 0], 2, 1, 3, &[]).unwrap();
    let (status, up, _) = call(&s, "POST", "/api/uploads", &png).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    let path = up["path"].as_str().unwrap();
    // Named relative to the folder workflows read from (here the output folder).
    assert!(Path::new(path).starts_with(".pixart/uploads"), "{path}");
    let (status, _, bytes) = call(
        &s,
        "GET",
        &format!("/api/files/{}", up["id"].as_str().unwrap()),
        "",
    )
    .await;
    assert_eq!((status, bytes), (StatusCode::OK, png.clone()));
    // The uploaded image is usable by a workflow.
    let wf = format!(
        "version: 1\nnodes:\n  l: {{type: image.load, inputs: {{path: \"{path}\"}}}}\n  s: {{type: image.save, inputs: {{image: \"${{l.image}}\", path: again.png}}}}\n"
    );
    let (_, queued, _) = call(&s, "POST", "/api/runs", wf).await;
    let run = wait_done(&s, queued["run_id"].as_str().unwrap()).await;
    assert_eq!(run["state"], "finished", "{run}");

    let (status, _, _) = call(&s, "POST", "/api/uploads", b"GIF89a not accepted").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut big = png.clone();
    big.resize(10_000, 0);
    let (status, _, _) = call(&s, "POST", "/api/uploads", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_one_run_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let slow = "version: 1\nnodes:\n  w: {type: test.until_cancelled}\n  o: {type: test.output, inputs: {a: \"${w.out}\"}}\n";
    let (_, first, _) = call(&s, "POST", "/api/runs", slow).await;
    let (_, second, _) = call(&s, "POST", "/api/runs", slow).await;
    let (_, third, _) = call(&s, "POST", "/api/runs", SAVE).await;
    let (first, second, third) = (
        first["run_id"].as_str().unwrap().to_string(),
        second["run_id"].as_str().unwrap().to_string(),
        third["run_id"].as_str().unwrap().to_string(),
    );
    // The second is still queued (one run at a time): cancelling it never runs it.
    let (status, c, _) = call(&s, "POST", &format!("/api/runs/{second}/cancel"), "").await;
    assert_eq!(
        (status, c["state"].clone()),
        (StatusCode::OK, J::from("cancelled"))
    );
    // Wait until the first is running, then cancel it.
    for _ in 0..500 {
        let (_, r, _) = call(&s, "GET", &format!("/api/runs/{first}"), "").await;
        if r["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call(&s, "POST", &format!("/api/runs/{first}/cancel"), "").await;
    assert_eq!(wait_done(&s, &first).await["state"], "cancelled");
    assert_eq!(wait_done(&s, &second).await["state"], "cancelled");
    assert_eq!(wait_done(&s, &third).await["state"], "finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_runs_from_several_clients_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut clients = Vec::new();
    for client in 0..5 {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                let seed = client * 10 + i;
                let body =
                    serde_json::json!({ "workflow": SAVE, "params": {"seed": seed} }).to_string();
                let (status, q, _) = call(&s, "POST", "/api/runs", body).await;
                assert_eq!(status, StatusCode::ACCEPTED);
                ids.push(q["run_id"].as_str().unwrap().to_string());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.unwrap());
    }
    assert_eq!(ids.len(), 50);
    for id in &ids {
        assert_eq!(wait_done(&s, id).await["state"], "finished");
    }
    for seed in 0..50 {
        assert!(
            dir.path().join(format!("t/n-{seed}.safetensors")).is_file(),
            "seed {seed}"
        );
    }
    let (_, history, _) = call(&s, "GET", "/api/history", "").await;
    assert_eq!(history.as_array().unwrap().len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut ws = warp::test::ws()
        .path("/api/events")
        .handshake(routes(s.clone()))
        .await
        .expect("handshake");
    let (_, queued, _) = call(&s, "POST", "/api/runs", SAVE).await;
    let id = queued["run_id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &J| e["event"] == "run_finished") {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.recv())
            .await
            .expect("an event")
            .unwrap();
        let e: J = serde_json::from_str(msg.to_str().unwrap()).unwrap();
        assert_eq!(e["run_id"], id.as_str());
        seen.push(e);
    }
    let kinds: Vec<&str> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run_queued"));
    assert!(
        kinds.contains(&"run_started") && kinds.contains(&"node_finished"),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_and_wrong_content_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let local = [
        ("host", "127.0.0.1:8188"),
        ("content-type", "application/yaml"),
    ];
    let (status, _, _) = send(&s, "POST", "/api/runs", SAVE.as_bytes(), &local).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // A page on another site posting to the local server.
    let evil = [
        ("host", "127.0.0.1:8188"),
        ("origin", "https://evil.example"),
        ("content-type", "application/yaml"),
    ];
    let (status, _, _) = send(&s, "POST", "/api/runs", SAVE.as_bytes(), &evil).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // DNS rebinding: the browser thinks it talks to evil.example.
    let rebound = [
        ("host", "evil.example:8188"),
        ("origin", "http://evil.example:8188"),
        ("content-type", "application/yaml"),
    ];
    let (status, _, _) = send(&s, "GET", "/api/history", b"", &rebound).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Same origin is fine; a "simple" content type is not.
    let same = [
        ("host", "localhost:8188"),
        ("origin", "http://localhost:8188"),
        ("content-type", "application/yaml"),
    ];
    let (status, _, _) = send(&s, "POST", "/api/validate", SAVE.as_bytes(), &same).await;
    assert_eq!(status, StatusCode::OK);
    let plain = [("host", "localhost:8188"), ("content-type", "text/plain")];
    let (status, _, _) = send(&s, "POST", "/api/runs", SAVE.as_bytes(), &plain).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_workflows_cannot_touch_files_outside_the_server_folders() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(root.path().join("outside.txt"), "keep").unwrap();
    let s = server(&out);
    let write = |path: &str| {
        format!("version: 1\nnodes:\n  t: {{type: text.save, inputs: {{text: pwned, path: \"{path}\"}}}}\n")
    };
    let outside = root.path().join("outside.txt");
    for path in [
        "../outside.txt",
        outside.to_str().unwrap(),
        ".pixart/history.json",
        "sub/../../outside.txt",
    ] {
        let (_, q, _) = call(&s, "POST", "/api/runs", write(path)).await;
        let run = wait_done(&s, q["run_id"].as_str().unwrap()).await;
        assert_eq!(run["state"], "failed", "{path}: {run}");
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
    let read = "version: 1\nnodes:\n  l: {type: tensor.load, inputs: {path: /etc/passwd}}\n  s: {type: tensor.save, inputs: {tensor: \"${l.tensor}\", path: x.safetensors}}\n";
    let (_, q, _) = call(&s, "POST", "/api/runs", read).await;
    let run = wait_done(&s, q["run_id"].as_str().unwrap()).await;
    assert!(
        run["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("inside the server's folders"),
        "{run}"
    );
    // Inside the output folder is fine.
    let (_, q, _) = call(&s, "POST", "/api/runs", write("notes/ok.txt")).await;
    assert_eq!(
        wait_done(&s, q["run_id"].as_str().unwrap()).await["state"],
        "finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_editor_is_served_from_its_embedded_files_only() {
    static FILES: &[(&str, &[u8])] = &[
        ("index.html", b"<!doctype html><title>editor</title>"),
        ("assets/editor.js", b"console.log(1)"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = common::registry();
    let config = ServerConfig {
        out_dir: dir.path().to_path_buf(),
        base_dir: dir.path().to_path_buf(),
        editor: FILES,
        ..ServerConfig::default()
    };
    let s = State::start(reg, Executor::new(CachePolicy::default()), config);
    let host = [("host", "127.0.0.1:8188")];
    let (status, _, body) = send(&s, "GET", "/", b"", &host).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, FILES[0].1);
    let res = warp::test::request()
        .path("/assets/editor.js")
        .header("host", "127.0.0.1:8188")
        .reply(&routes(s.clone()))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    for path in [
        "/assets/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/etc/passwd",
        "/assets/missing.js",
    ] {
        let (status, _, _) = send(&s, "GET", path, b"", &host).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // The API keeps its own answers.
    let (status, _, _) = send(&s, "GET", "/api/nope", b"", &host).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, json, _) = send(&s, "GET", "/api/nodes", b"", &host).await;
    assert_eq!(status, StatusCode::OK);
    assert!(json.as_array().is_some());

    // Built without the editor: the page says so instead of a bare 404.
    let bare = server(dir.path());
    let (status, _, body) = send(&bare, "GET", "/", b"", &host).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("built without the browser editor"));
}

/// Two runs that name the same file keep both (the second gets a counter, as
/// ComfyUI numbers its outputs), and each run's file id serves what that run
/// wrote (issue 23, item 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_never_overwrites_an_earlier_runs_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut served = Vec::new();
    for text in ["first", "second", "third"] {
        let yaml = format!(
            "version: 1\nnodes:\n  t: {{type: text.save, inputs: {{text: {text}, path: notes/note.txt}}}}\n"
        );
        let (status, queued, _) = call(&s, "POST", "/api/runs", yaml).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let run = wait_done(&s, queued["run_id"].as_str().unwrap()).await;
        assert_eq!(run["state"], "finished", "{run}");
        let file = &run["outputs"][0]["files"][0];
        served.push((
            text,
            file["id"].as_str().unwrap().to_string(),
            file["path"].clone(),
        ));
    }
    for (text, id, _) in &served {
        let (status, _, bytes) = call(&s, "GET", &format!("/api/files/{id}"), "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bytes, text.as_bytes());
    }
    let paths: Vec<String> = served.iter().map(|(_, _, p)| p.to_string()).collect();
    assert_eq!(
        paths,
        [
            "\"notes/note.txt\"",
            "\"notes/note_00001.txt\"",
            "\"notes/note_00002.txt\""
        ]
    );
}

/// A run's record keeps when it was submitted, started and ended, the
/// workflow text and the params sent, and its node states as an object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_times_workflow_and_params() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let body = serde_json::json!({ "workflow": SAVE, "params": {"seed": 7} }).to_string();
    let (_, queued, _) = call(&s, "POST", "/api/runs", body).await;
    let run = wait_done(&s, queued["run_id"].as_str().unwrap()).await;
    assert_eq!(run["state"], "finished", "{run}");
    let at = |k: &str| run[k].as_u64().unwrap_or_else(|| panic!("{k}: {run}"));
    assert!(at("submitted_at") > 1_600_000_000_000, "{run}");
    assert!(at("submitted_at") <= at("started_at"), "{run}");
    assert!(at("started_at") <= at("finished_at"), "{run}");
    assert_eq!(run["workflow"], SAVE);
    assert_eq!(run["params"], serde_json::json!({"seed": 7}));
    assert_eq!(
        run["node_states"],
        serde_json::json!({"noise": "executed", "save": "executed"})
    );
    // The history has the same; a workflow over 256 KiB is not kept.
    let (_, history, _) = call(&s, "GET", "/api/history", "").await;
    assert_eq!(history[0]["workflow"], SAVE);
    let long = format!("# {}\n{SAVE}", "x".repeat(300 << 10));
    let (_, queued, _) = call(&s, "POST", "/api/runs", long).await;
    let run = wait_done(&s, queued["run_id"].as_str().unwrap()).await;
    assert_eq!(run["state"], "finished", "{run}");
    assert_eq!(
        (run["workflow"].clone(), run["params"].clone()),
        (J::Null, serde_json::json!({}))
    );
}

/// Waiting runs stay queued while the queue is paused, can be moved, and
/// start in the new order once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_move_and_the_queue_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut ws = warp::test::ws()
        .path("/api/events")
        .handshake(routes(s.clone()))
        .await
        .expect("handshake");
    let (status, q, _) = call(&s, "POST", "/api/queue/pause", "").await;
    assert_eq!(
        (status, q["paused"].clone()),
        (StatusCode::OK, J::Bool(true))
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.recv())
        .await
        .expect("an event")
        .unwrap();
    let e: J = serde_json::from_str(msg.to_str().unwrap()).unwrap();
    assert_eq!(
        e,
        serde_json::json!({"event": "queue_changed", "paused": true})
    );

    let mut ids = Vec::new();
    for seed in 1..=4 {
        let body = serde_json::json!({ "workflow": SAVE, "params": {"seed": seed} }).to_string();
        let (status, q, _) = call(&s, "POST", "/api/runs", body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        ids.push(q["run_id"].as_str().unwrap().to_string());
    }
    // Cancelling a waiting run takes it out of the queue.
    let (status, _, _) = call(&s, "POST", &format!("/api/runs/{}/cancel", ids[3]), "").await;
    assert_eq!(status, StatusCode::OK);
    let ids = &ids[..3];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let order = |runs: &J| -> Vec<String> {
        runs.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, q, _) = call(&s, "GET", "/api/queue", "").await;
    assert_eq!(q["paused"], true);
    assert_eq!(order(&q["runs"]), ids, "{q}");
    assert!(
        q["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "queued"),
        "{q}"
    );

    // The third goes first.
    let path = format!("/api/runs/{}/move", ids[2]);
    let (status, q, _) = call(&s, "POST", &path, r#"{"position": 0}"#).await;
    assert_eq!(status, StatusCode::OK, "{q}");
    let moved = vec![ids[2].clone(), ids[0].clone(), ids[1].clone()];
    assert_eq!(order(&q["runs"]), moved);
    let (_, list, _) = call(&s, "GET", "/api/runs", "").await;
    assert_eq!(order(&list), moved);
    // Past the end is last; then back to the front.
    let (_, q, _) = call(&s, "POST", &path, r#"{"position": 99}"#).await;
    assert_eq!(order(&q["runs"]), ids);
    let (_, q, _) = call(&s, "POST", &path, r#"{"position": 0}"#).await;
    assert_eq!(order(&q["runs"]), moved);
    // Bad bodies, unknown and cancelled runs.
    let (status, _, _) = call(&s, "POST", &path, r#"{"position": -1}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let host = [("host", "127.0.0.1:8188"), ("content-type", "text/plain")];
    let (status, _, _) = send(&s, "POST", &path, br#"{"position": 0}"#, &host).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _, _) = call(&s, "POST", "/api/runs/r0-999/move", r#"{"position": 0}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, q, _) = call(&s, "POST", "/api/queue/resume", "").await;
    assert_eq!(
        (status, q["paused"].clone()),
        (StatusCode::OK, J::Bool(false))
    );
    let mut runs = Vec::new();
    for id in &moved {
        let run = wait_done(&s, id).await;
        assert_eq!(run["state"], "finished", "{run}");
        runs.push(run);
    }
    // One at a time, in the new order.
    for pair in runs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a["finished_at"].as_u64().unwrap() <= b["started_at"].as_u64().unwrap(),
            "{a}\n{b}"
        );
        assert!(
            a["started_at"].as_u64().unwrap() <= b["started_at"].as_u64().unwrap(),
            "{a}\n{b}"
        );
    }
    let (status, _, _) = call(&s, "POST", &path, r#"{"position": 0}"#).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _, _) = call(&s, "POST", "/api/queue/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A history written before node states became an object loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_of_an_earlier_version_loads() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(".pixart/history.jsonl");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    std::fs::write(
        &journal,
        "{\"id\":\"r1-4\",\"name\":\"old\",\"state\":\"finished\",\"outputs\":[],\"failures\":[],\"node_states\":[[\"noise\",\"executed\"],[\"save\",\"cached\"]]}\n",
    )
    .unwrap();
    let s = server(dir.path());
    let (status, run, _) = call(&s, "GET", "/api/runs/r1-4", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        run["node_states"],
        serde_json::json!({"noise": "executed", "save": "cached"})
    );
    assert_eq!(
        (run["started_at"].clone(), run["workflow"].clone()),
        (J::Null, J::Null)
    );
    // Rewritten in the new form.
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(
        text.contains("\"node_states\":{\"noise\":\"executed\""),
        "{text}"
    );
}

/// Param errors of a request speak of its `params`, not of `--set`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_errors_read_in_the_apis_terms() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let messages = |bad: &J| -> Vec<String> {
        bad["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| format!("{} / {}", d["message"].as_str().unwrap(), d["help"]))
            .collect()
    };
    let body = serde_json::json!({ "workflow": SAVE, "params": {"seed": "abc"} }).to_string();
    let (status, bad, _) = call(&s, "POST", "/api/runs", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let m = messages(&bad);
    assert!(m[0].starts_with("param `seed` = abc: "), "{m:?}");
    let body = serde_json::json!({ "workflow": SAVE, "params": {"sed": 3} }).to_string();
    let (_, bad, _) = call(&s, "POST", "/api/validate", body).await;
    let m = messages(&bad);
    assert!(
        m[0].starts_with("this workflow has no param `sed`"),
        "{m:?}"
    );
    let needs = SAVE.replace("params: {seed: 1}", "params: {seed: {type: int}}");
    let (_, bad, _) = call(&s, "POST", "/api/validate", &needs).await;
    let m = messages(&bad);
    assert!(
        m[0].contains("send a value for `seed` in `params` or give it a `default:`"),
        "{m:?}"
    );
    for m in m {
        assert!(!m.contains("--set"), "{m}");
    }
}
