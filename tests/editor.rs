//! The browser editor in real headless Chromium: `pixart serve` serves it, and
//! web-ui/tests/editor.mjs (playwright-core) drags, connects, saves, runs and
//! cancels in it. Screenshots go to target/editor-screenshots/.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[test]
fn the_editor_builds_runs_and_saves_a_workflow_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the editor test needs Chromium: apt-get install chromium (or set CHROMIUM)"
    );
    let web = Path::new(ROOT).join("web-ui");
    assert!(
        web.join("node_modules/playwright-core").is_dir(),
        "web-ui/node_modules is missing: building pixart installs it (needs Node.js 20+ and npm)"
    );
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_pixart"))
            .current_dir(ROOT)
            .args(["serve", "--port", &port.to_string(), "--out"])
            .arg(work.path().join("out"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pixart serve"),
    );
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "pixart serve did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shots = Path::new(ROOT).join("target/editor-screenshots");
    let status = Command::new("node")
        .current_dir(&web)
        .arg("tests/editor.mjs")
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(&shots)
        .arg(work.path())
        .arg(env!("CARGO_BIN_EXE_pixart"))
        .env("CHROMIUM", &chromium)
        .status()
        .expect("run node");
    drop(server);
    assert!(
        status.success(),
        "the browser test failed (screenshots in {})",
        shots.display()
    );
}
