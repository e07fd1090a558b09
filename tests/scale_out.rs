//! Serving on a shared queue: Redis (Debian's `redis-server`), two `pixart serve
//! --queue` front ends and two `pixart worker`s, as separate processes on
//! loopback. A worker is SIGKILLed while it holds a run; a cancel goes to the
//! front end that did not queue the run.

use serde_json::Value as J;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Children killed when the test ends, however it ends.
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn start(&mut self, name: &str, cmd: &mut Command) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.0.push((name.to_string(), child));
    }

    fn kill(&mut self, name: &str) {
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == name).unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Last started first: Redis goes after those that use it.
        for (_, child) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request (the server closes each connection after one).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answers are not read here"
    );
    (status, raw[head_end + 4..].to_vec())
}

fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> J {
    let (status, body) = http(addr, method, path, body);
    assert!(
        status < 300,
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap()
}

fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Text frames of `/api/events` on `addr`, read by a thread into a channel.
fn event_stream(addr: SocketAddr) -> std::sync::mpsc::Receiver<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let mut h = [0u8; 2];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let len = match h[1] & 0x7f {
            126 => {
                let mut n = [0u8; 2];
                s.read_exact(&mut n).unwrap();
                u16::from_be_bytes(n) as usize
            }
            127 => {
                let mut n = [0u8; 8];
                s.read_exact(&mut n).unwrap();
                u64::from_be_bytes(n) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        if h[0] & 0x0f == 1 && tx.send(String::from_utf8(payload).unwrap()).is_err() {
            return;
        }
    });
    rx
}

fn txt2img(seed: u64, steps: u64) -> String {
    let workflow = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/txt2img.yaml"),
    )
    .unwrap();
    serde_json::json!({"workflow": workflow, "params": {"seed": seed, "steps": steps}}).to_string()
}

#[test]
fn two_workers_on_one_queue_finish_every_run_once_through_a_killed_worker_and_a_remote_cancel() {
    let Ok(redis_server) = which("redis-server") else {
        panic!("this test needs Debian's redis-server (apt-get install redis-server; .ci/run installs it)");
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shared");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pixart = env!("CARGO_BIN_EXE_pixart");
    let mut procs = Processes(Vec::new());

    let redis_port = free_port();
    procs.start(
        "redis",
        Command::new(redis_server)
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path()),
    );
    let queue = format!("redis://127.0.0.1:{redis_port}/0");
    wait_for("redis", Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", redis_port)).ok()
    });

    let front = |procs: &mut Processes, name: &str| {
        let port = free_port();
        procs.start(
            name,
            Command::new(pixart)
                .current_dir(repo)
                .args(["serve", "--port", &port.to_string(), "--queue", &queue])
                .arg("--out")
                .arg(&out),
        );
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_for(name, Duration::from_secs(60), || {
            TcpStream::connect(addr).ok()
        });
        addr
    };
    let a = front(&mut procs, "front-a");
    let b = front(&mut procs, "front-b");
    for name in ["w1", "w2"] {
        procs.start(
            name,
            Command::new(pixart)
                .current_dir(repo)
                .args([
                    "worker",
                    "--queue",
                    &queue,
                    "--lease-secs",
                    "3",
                    "--name",
                    name,
                ])
                .arg("--out")
                .arg(&out),
        );
    }
    let events = event_stream(b);

    // Twelve runs through front end A; the first is long enough to be killed in.
    let ids: Vec<String> = (0..12)
        .map(|seed| {
            let steps = if seed == 0 { 200 } else { 30 };
            let r = api(a, "POST", "/api/runs", &txt2img(seed, steps));
            r["run_id"].as_str().unwrap().to_string()
        })
        .collect();
    // Both front ends show the same queue.
    let queued = |addr| -> Vec<String> {
        let q = api(addr, "GET", "/api/queue", "");
        let runs = q["runs"].as_array().unwrap();
        runs.iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (on_a, on_b) = (queued(a), queued(b));
    assert!(!on_a.is_empty());
    assert_eq!(
        on_a.iter().collect::<std::collections::BTreeSet<_>>(),
        on_b.iter().collect::<std::collections::BTreeSet<_>>()
    );

    // Kill the worker that holds the long run, while it runs.
    let first = &ids[0];
    let holder = wait_for("the long run to start", Duration::from_secs(60), || {
        let r = api(a, "GET", &format!("/api/runs/{first}"), "");
        (r["state"] == "running").then(|| r["worker"].as_str().unwrap().to_string())
    });
    std::thread::sleep(Duration::from_millis(500));
    procs.kill(&holder);
    let survivor = if holder == "w1" { "w2" } else { "w1" };

    let history = wait_for("all twelve runs", Duration::from_secs(240), || {
        let h = api(b, "GET", "/api/history", "");
        let h = h.as_array().unwrap().clone();
        (h.len() >= 12).then_some(h)
    });
    assert_eq!(history.len(), 12, "each run is in the history once");
    let mut seen = std::collections::BTreeSet::new();
    for r in &history {
        let id = r["id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "{id} twice");
        assert_eq!(r["state"], "finished", "{r}");
        let files = r["outputs"][0]["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{r}");
        let (status, png) = http(
            a,
            "GET",
            &format!("/api/files/{}", files[0]["id"].as_str().unwrap()),
            "",
        );
        assert_eq!(status, 200);
        assert!(png.starts_with(b"\x89PNG"));
        if id == first {
            assert_eq!(r["worker"], survivor, "{r}");
            assert_eq!(r["attempts"], 2, "{r}");
        } else {
            assert_eq!(r["attempts"], 1, "{r}");
        }
    }
    assert_eq!(seen, ids.iter().cloned().collect());

    // A cancel sent to front end B stops a run that A queued, on the worker.
    let long = api(a, "POST", "/api/runs", &txt2img(99, 1000))["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the run to start", Duration::from_secs(60), || {
        let r = api(b, "GET", &format!("/api/runs/{long}"), "");
        (r["state"] == "running").then_some(())
    });
    let asked = Instant::now();
    let c = api(b, "POST", &format!("/api/runs/{long}/cancel"), "");
    assert_eq!(c["state"], "running");
    let r = wait_for("the cancel", Duration::from_secs(60), || {
        let r = api(a, "GET", &format!("/api/runs/{long}"), "");
        (r["state"] != "running").then_some(r)
    });
    assert_eq!(r["state"], "cancelled", "{r}");
    assert_eq!(r["worker"], survivor);
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "cancelled after {:?}",
        asked.elapsed()
    );

    // Pause, reorder and cancel a waiting run from B, resume from A.
    assert_eq!(api(b, "POST", "/api/queue/pause", "")["paused"], true);
    let waiting: Vec<String> = (100..102)
        .map(|seed| {
            api(a, "POST", "/api/runs", &txt2img(seed, 5))["run_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500)); // no worker starts one
    let moved = api(
        b,
        "POST",
        &format!("/api/runs/{}/move", waiting[1]),
        r#"{"position": 0}"#,
    );
    let order: Vec<&str> = moved["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(order, [waiting[1].as_str(), waiting[0].as_str()]);
    assert_eq!(queued(a), [waiting[1].clone(), waiting[0].clone()]);
    let c = api(b, "POST", &format!("/api/runs/{}/cancel", waiting[0]), "");
    assert_eq!(c["state"], "cancelled");
    assert_eq!(api(a, "POST", "/api/queue/resume", "")["paused"], false);
    let r = wait_for("the resumed run", Duration::from_secs(60), || {
        let r = api(b, "GET", &format!("/api/runs/{}", waiting[1]), "");
        (r["state"] == "finished").then_some(r)
    });
    assert_eq!(r["worker"], survivor);
    let r = api(a, "GET", &format!("/api/runs/{}", waiting[0]), "");
    assert_eq!(
        (r["state"].as_str(), &r["started_at"]),
        (Some("cancelled"), &J::Null)
    );

    // A worker keeps the server's sandbox: no writing outside the output folder.
    let escape = r#"version: 1
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [2, 3], seed: 1}}
  save: {type: tensor.save, inputs: {tensor: "${noise.tensor}", path: "../escaped.safetensors"}}
"#;
    let body = serde_json::json!({ "workflow": escape }).to_string();
    let run = api(a, "POST", "/api/runs", &body)["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = wait_for("the escaping run", Duration::from_secs(60), || {
        let r = api(a, "GET", &format!("/api/runs/{run}"), "");
        (r["state"] != "queued" && r["state"] != "running").then_some(r)
    });
    assert_eq!(r["state"], "failed", "{r}");
    assert!(!dir.path().join("escaped.safetensors").exists());

    // Front end B's event stream carried what the workers did.
    let got: Vec<J> = events
        .try_iter()
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    for id in ids.iter().chain([&long]) {
        assert!(
            got.iter()
                .any(|e| e["run_id"] == id.as_str() && e["event"] == "run_queued"),
            "no run_queued for {id}"
        );
    }
    for id in &ids {
        assert!(
            got.iter()
                .any(|e| e["run_id"] == id.as_str() && e["event"] == "run_finished"),
            "no run_finished for {id}"
        );
    }
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}
