//! The HTTP API driven through warp's test client (no sockets), as the editor
//! in a page served by the server would call it.

use pixart_runtime::server::{routes, State};
use serde_json::Value as J;
use std::sync::Arc;
use std::time::Duration;
use warp::http::StatusCode;

/// A request as the editor in a page served by this server would send it.
pub async fn call(
    state: &Arc<State>,
    method: &str,
    path: &str,
    body: impl AsRef<[u8]>,
) -> (StatusCode, J, Vec<u8>) {
    let body = body.as_ref();
    let ctype = if path == "/api/uploads" {
        "image/png"
    } else if body.starts_with(b"{") {
        "application/json"
    } else {
        "application/yaml"
    };
    let headers = [("host", "127.0.0.1:8188"), ("content-type", ctype)];
    send(state, method, path, body, &headers).await
}

pub async fn send(
    state: &Arc<State>,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (StatusCode, J, Vec<u8>) {
    let mut req = warp::test::request().method(method).path(path).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.reply(&routes(state.clone())).await;
    let bytes = res.body().to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(J::Null);
    (res.status(), json, bytes)
}

pub async fn wait_done(state: &Arc<State>, id: &str) -> J {
    for _ in 0..1000 {
        let (status, run, _) = call(state, "GET", &format!("/api/runs/{id}"), "").await;
        assert_eq!(status, StatusCode::OK, "{run}");
        if ["finished", "failed", "cancelled"].contains(&run["state"].as_str().unwrap_or("")) {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {id} did not finish");
}
