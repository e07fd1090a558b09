//! The HTTP/WebSocket API (warp): node catalog, validation, a run queue with
//! per-run cancel, reordering and pause, history, output files by id, uploads, and an event stream.
//! Documented in the README and served as OpenAPI at `/api/openapi.json`.

mod execute;
mod journal;
mod shared;
mod state;
mod worker;

pub use execute::{MAX_FAILURE_CHARS, MAX_RECORDED_FAILURES, MAX_RECORDED_FILES};
pub use shared::{QueueError, SharedQueue};
pub use state::{
    default_run_memory_limit, default_run_model_memory_limit, CancelError, MoveError, OutputRecord,
    QueueView, RunRecord, RunRequest, RunState, ServerConfig, State, SubmitError,
    MAX_RECORDED_PARAMS, MAX_RECORDED_WORKFLOW,
};
pub use worker::{default_worker_name, run_worker, WorkerConfig, MIN_LEASE};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection, Reply};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    with_status(
        json(&serde_json::json!({ "error": message.into() })),
        status,
    )
    .into_response()
}

/// Runs CPU-bound request work (parsing and validating a workflow) off the async
/// threads, so one large body cannot stall every other client.
async fn blocking(work: impl FnOnce() -> Response + Send + 'static) -> Result<Response, Rejection> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "the request failed")))
}

/// The shared queue could not be reached: the client may try again.
fn unavailable(e: impl std::fmt::Display) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// A JSON answer, or 503 when the shared queue could not be reached.
fn json_or_unavailable<T: serde::Serialize>(answer: Result<T, QueueError>) -> Response {
    match answer {
        Ok(v) => json(&v).into_response(),
        Err(e) => unavailable(e),
    }
}

fn with_state(
    state: Arc<State>,
) -> impl Filter<Extract = (Arc<State>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// A workflow body: JSON `{"workflow": "...", "params": {...}, "targets": [...]}`,
/// or the YAML (or JSON) workflow itself.
fn parse_request(body: &Bytes) -> Result<RunRequest, &'static str> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8")?;
    if let Ok(req) = serde_json::from_str::<RunRequest>(text) {
        return Ok(req);
    }
    Ok(RunRequest {
        workflow: text.to_string(),
        params: Default::default(),
        targets: Vec::new(),
    })
}

fn invalid(e: &crate::workflow::WorkflowError) -> Response {
    with_status(
        json(&serde_json::json!({ "ok": false, "diagnostics": e.diagnostics })),
        StatusCode::BAD_REQUEST,
    )
    .into_response()
}

#[derive(Debug)]
struct Forbidden(&'static str);
impl warp::reject::Reject for Forbidden {}

#[derive(Debug)]
struct WrongContentType(&'static str);
impl warp::reject::Reject for WrongContentType {}

#[derive(Debug)]
struct TooLarge;
impl warp::reject::Reject for TooLarge {}

#[derive(Debug)]
struct SlowBody;
impl warp::reject::Reject for SlowBody {}

/// The request body, at most `limit` bytes, with or without a Content-Length
/// (a chunked upload has none): a declared length over the limit is refused
/// before reading, a chunked body as soon as it passes it.
fn bounded_body(
    limit: u64,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |declared: Option<u64>, stream| async move {
            tokio::time::timeout(timeout, read_bounded(declared, stream, limit))
                .await
                .unwrap_or_else(|_| Err(warp::reject::custom(SlowBody)))
        })
}

async fn read_bounded<B: bytes::Buf>(
    declared: Option<u64>,
    stream: impl futures_util::Stream<Item = Result<B, warp::Error>>,
    limit: u64,
) -> Result<Bytes, Rejection> {
    if declared.is_some_and(|n| n > limit) {
        return Err(warp::reject::custom(TooLarge));
    }
    // A few bodies at a time: 512 connections each sending an upload at the
    // limit would otherwise hold 16 GiB.
    static READERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BODIES_AT_ONCE);
    let _turn = READERS
        .acquire()
        .await
        .map_err(|_| warp::reject::reject())?;
    let mut body = Vec::new();
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|_| warp::reject::reject())?;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            if (body.len() + n) as u64 > limit {
                return Err(warp::reject::custom(TooLarge));
            }
            body.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(body))
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Browsers' cross-site requests and DNS rebinding: the Host must be loopback
/// (unless serving remotely) and an Origin, when sent, must be this same host.
fn same_origin(allow_remote: bool) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("host")
        .and(warp::header::optional::<String>("origin"))
        .and_then(
            move |host: Option<String>, origin: Option<String>| async move {
                if let Some(h) = &host {
                    if !allow_remote && !is_loopback_host(h) {
                        return Err(warp::reject::custom(Forbidden(
                            "this server only answers to localhost",
                        )));
                    }
                }
                if let Some(o) = &origin {
                    let authority = o
                        .split_once("://")
                        .map_or(o.as_str(), |(_, a)| a)
                        .trim_end_matches('/');
                    let ok = match &host {
                        Some(h) => authority.eq_ignore_ascii_case(h),
                        None => is_loopback_host(authority),
                    };
                    if !ok {
                        return Err(warp::reject::custom(Forbidden(
                            "cross-origin requests are refused",
                        )));
                    }
                }
                Ok(())
            },
        )
        .untuple_one()
}

/// POSTs must say what they carry, with a type a browser cannot send cross-site
/// without asking first.
fn content_type(
    allowed: &'static [&'static str],
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and_then(move |ct: Option<String>| async move {
            let base = ct
                .as_deref()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if allowed.contains(&base.as_str()) {
                Ok(())
            } else {
                Err(warp::reject::custom(WrongContentType(allowed[0])))
            }
        })
        .untuple_one()
}

const WORKFLOW_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
];
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg"];
const JSON_TYPES: &[&str] = &["application/json"];

/// The body of `POST /api/runs/{id}/move`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    /// Index among the waiting runs (0: next to start); past the end: last.
    position: usize,
}

/// Every route of the API.
///
/// Boxed: the combined filter is a very deep type, and every crate that serves
/// it would otherwise have to prove it `Send` and `Unpin` level by level.
pub fn routes(state: Arc<State>) -> warp::filters::BoxedFilter<(Response,)> {
    let api = warp::path("api").and(same_origin(state.config.allow_remote));
    let body_timeout = state.config.body_timeout;
    let body = bounded_body(4 << 20, body_timeout);

    let nodes = api
        .clone()
        .and(warp::path("nodes"))
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|s: Arc<State>| json(&s.registry.catalog()).into_response());

    let validate = api
        .clone()
        .and(warp::path("validate"))
        .and(warp::path::end())
        .and(warp::post())
        .and(content_type(WORKFLOW_TYPES))
        .and(body.clone())
        .and(with_state(state.clone()))
        .and_then(|body: Bytes, s: Arc<State>| {
            blocking(move || match parse_request(&body) {
                Err(e) => error(StatusCode::BAD_REQUEST, e),
                Ok(req) => match s.validate(&req.workflow, &req.params) {
                    Ok(wf) => json(&serde_json::json!({ "ok": true, "diagnostics": wf.warnings }))
                        .into_response(),
                    Err(e) => {
                        json(&serde_json::json!({ "ok": false, "diagnostics": e.diagnostics }))
                            .into_response()
                    }
                },
            })
        });

    let submit = api
        .clone()
        .and(warp::path("runs"))
        .and(warp::path::end())
        .and(warp::post())
        .and(content_type(WORKFLOW_TYPES))
        .and(body.clone())
        .and(with_state(state.clone()))
        .and_then(|body: Bytes, s: Arc<State>| async move {
            let response = match parse_request(&body) {
                Err(e) => error(StatusCode::BAD_REQUEST, e),
                Ok(req) => match s.submit(req).await {
                    Ok(id) => with_status(
                        json(&serde_json::json!({ "run_id": id })),
                        StatusCode::ACCEPTED,
                    )
                    .into_response(),
                    Err(SubmitError::Invalid(e)) => invalid(&e),
                    Err(SubmitError::QueueFull(why)) => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{why}; try again later"),
                    ),
                    Err(SubmitError::Unavailable(why)) => unavailable(why),
                },
            };
            Ok::<Response, Rejection>(response)
        });

    let queue = api
        .clone()
        .and(warp::path("runs"))
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|s: Arc<State>| async move { json_or_unavailable(s.queue().await) });

    let run = api
        .clone()
        .and(warp::path("runs"))
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|id: String, s: Arc<State>| async move {
            match s.get(&id).await {
                Ok(Some(r)) => json(&r).into_response(),
                Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
                Err(e) => unavailable(e),
            }
        });

    let cancel = api
        .clone()
        .and(warp::path("runs"))
        .and(warp::path::param::<String>())
        .and(warp::path("cancel"))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|id: String, s: Arc<State>| async move {
            match s.cancel(&id).await {
                Ok(state) => {
                    json(&serde_json::json!({ "run_id": id, "state": state })).into_response()
                }
                Err(CancelError::Unknown) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
                Err(CancelError::AlreadyDone(state)) => error(
                    StatusCode::CONFLICT,
                    format!(
                        "run {id} is already {}",
                        serde_json::to_value(state).unwrap_or_default()
                    ),
                ),
                Err(CancelError::Unavailable(why)) => unavailable(why),
            }
        });

    let move_run = api
        .clone()
        .and(warp::path("runs"))
        .and(warp::path::param::<String>())
        .and(warp::path("move"))
        .and(warp::path::end())
        .and(warp::post())
        .and(content_type(JSON_TYPES))
        .and(bounded_body(4 << 10, body_timeout))
        .and(with_state(state.clone()))
        .then(|id: String, body: Bytes, s: Arc<State>| async move {
            let Ok(req) = serde_json::from_slice::<MoveRequest>(&body) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "send {\"position\": N}, N a whole number from 0",
                );
            };
            match s.move_run(&id, req.position).await {
                Ok(queue) => json(&queue).into_response(),
                Err(MoveError::Unknown) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
                Err(MoveError::NotQueued(state)) => error(
                    StatusCode::CONFLICT,
                    format!(
                        "run {id} is {}, not waiting",
                        serde_json::to_value(state).unwrap_or_default()
                    ),
                ),
                Err(MoveError::Unavailable(why)) => unavailable(why),
            }
        });

    let queue_view = api
        .clone()
        .and(warp::path("queue"))
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|s: Arc<State>| async move { json_or_unavailable(s.queue_view().await) });

    let pause = api
        .clone()
        .and(warp::path("queue"))
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|action: String, s: Arc<State>| async move {
            match action.as_str() {
                "pause" => json_or_unavailable(s.set_paused(true).await),
                "resume" => json_or_unavailable(s.set_paused(false).await),
                _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
            }
        });

    let history = api
        .clone()
        .and(warp::path("history"))
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|s: Arc<State>| async move { json_or_unavailable(s.history().await) });

    // Files are fetched by the id the server gave them, never by a client path.
    let file = api
        .clone()
        .and(warp::path("files"))
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state(state.clone()))
        .and_then(|id: String, s: Arc<State>| async move {
            let path = match s.file(&id).await {
                Ok(Some(path)) => path,
                Ok(None) => return Ok(error(StatusCode::NOT_FOUND, "no such file")),
                Err(e) => return Ok(unavailable(e)),
            };
            blocking(move || serve_file(&s, &path)).await
        });

    let upload_limit = state.config.upload_limit;
    let upload = api
        .clone()
        .and(warp::path("uploads"))
        .and(warp::path::end())
        .and(warp::post())
        .and(content_type(IMAGE_TYPES))
        .and(bounded_body(upload_limit, body_timeout))
        .and(with_state(state.clone()))
        .and_then(|body: Bytes, s: Arc<State>| async move {
            let stored = s.clone();
            let written = tokio::task::spawn_blocking(move || store_upload(&stored, &body)).await;
            Ok::<Response, Rejection>(match written {
                Ok(Ok(path)) => registered_upload(&s, &path).await,
                Ok(Err((status, why))) => error(status, why),
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the request failed"),
            })
        });

    let events = api
        .clone()
        .and(warp::path("events"))
        .and(warp::path::end())
        .and(warp::ws())
        .and(with_state(state.clone()))
        .map(move |ws: warp::ws::Ws, s: Arc<State>| {
            // An upgraded connection leaves the connection limit: event streams
            // have their own, and clients have nothing long to send.
            let Ok(slot) = s.event_streams.clone().try_acquire_owned() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{} event streams are open; try again later",
                        s.config.max_event_streams
                    ),
                );
            };
            // Subscribe before the upgrade completes, so no event after it is missed.
            let events = s.subscribe_events();
            ws.max_message_size(MAX_EVENT_MESSAGE)
                .max_frame_size(MAX_EVENT_MESSAGE)
                .on_upgrade(move |socket| async move {
                    stream_events(socket, events).await;
                    drop(slot);
                })
                .into_response()
        });

    let openapi = api
        .clone()
        .and(warp::path("openapi.json"))
        .and(warp::path::end())
        .and(warp::get())
        .map(|| {
            warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response()
        });

    // The editor: its files by exact name from the embedded list (no paths
    // reach the filesystem).
    let editor_files = state.config.editor;
    let editor = warp::get().and(warp::path::full()).and_then(
        move |path: warp::path::FullPath| async move {
            let name = match path.as_str().trim_start_matches('/') {
                "" => "index.html",
                other => other,
            };
            if name.starts_with("api/") || name == "api" {
                return Err(warp::reject::not_found());
            }
            Ok::<Response, Rejection>(editor_file(editor_files, name))
        },
    );

    nodes
        .or(validate)
        .unify()
        .or(submit)
        .unify()
        .or(queue)
        .unify()
        .or(run)
        .unify()
        .or(cancel)
        .unify()
        .or(move_run)
        .unify()
        .or(queue_view)
        .unify()
        .or(pause)
        .unify()
        .or(history)
        .unify()
        .or(file)
        .unify()
        .or(upload)
        .unify()
        .or(events)
        .unify()
        .or(openapi)
        .unify()
        .or(editor)
        .unify()
        .recover(recover)
        .unify()
        .boxed()
}

/// Connections held at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 512;
/// The largest message a client may send on an event stream (it has nothing
/// to say but a close).
pub const MAX_EVENT_MESSAGE: usize = 64 << 10;
/// The largest file `/api/files` hands out.
pub const MAX_SERVED_BYTES: u64 = 256 << 20;
/// Request bodies read at once (each up to its route's limit).
pub const BODIES_AT_ONCE: usize = 16;

/// Serves the API and the editor on `listener` until the process ends, with a
/// limit on the time to send headers and on open connections, so that clients
/// holding half-sent requests cannot use up the server.
pub async fn serve(state: Arc<State>, listener: tokio::net::TcpListener) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let header_timeout = state.config.header_read_timeout;
    let service = warp::service(routes(state));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most often: wait for some to be returned.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            // hyper's header timeout starts with the first byte: a client that
            // sends nothing is let go here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            // HTTP/1 only: the auto-detecting builder waits for a preface with no
            // time limit before the header timeout applies.
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                // One request per connection: an idle kept-alive connection would
                // hold its slot with no timeout.
                .keep_alive(false);
            let served = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
}

async fn recover(r: Rejection) -> Result<Response, Infallible> {
    // Our own rejections first: warp combines those of every route tried.
    Ok(if let Some(Forbidden(why)) = r.find() {
        error(StatusCode::FORBIDDEN, *why)
    } else if let Some(WrongContentType(want)) = r.find() {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("set a Content-Type such as {want}"),
        )
    } else if r.find::<SlowBody>().is_some() {
        error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )
    } else if r.find::<TooLarge>().is_some() || r.find::<warp::reject::PayloadTooLarge>().is_some()
    {
        error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large")
    } else if r.is_not_found() {
        error(StatusCode::NOT_FOUND, "no such endpoint")
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else if r.find::<warp::reject::LengthRequired>().is_some() {
        error(StatusCode::LENGTH_REQUIRED, "a Content-Length is required")
    } else {
        error(StatusCode::BAD_REQUEST, "bad request")
    })
}

const EDITOR_MISSING: &str = "<!doctype html><meta charset=utf-8><title>pixart-flow</title>\
<p>This <code>pixart</code> was built without the browser editor (Node.js and npm were \
not found, or <code>PIXART_SKIP_EDITOR</code> was set). The API is at <a href=api/openapi.json>\
/api</a>; rebuild with Node.js 20 or newer for the editor.</p>";

fn editor_file(files: &[(&str, &[u8])], name: &str) -> Response {
    if let Some((_, bytes)) = files.iter().find(|(n, _)| *n == name) {
        let mut response = warp::reply::with_header(
            bytes.to_vec(),
            "content-type",
            mime_of(std::path::Path::new(name)),
        )
        .into_response();
        response.headers_mut().insert(
            "cache-control",
            warp::http::HeaderValue::from_static("no-cache"),
        );
        return response;
    }
    if name == "index.html" && files.is_empty() {
        return warp::reply::with_header(
            EDITOR_MISSING,
            "content-type",
            "text/html; charset=utf-8",
        )
        .into_response();
    }
    error(StatusCode::NOT_FOUND, "no such file")
}

/// `/api/files/{id}`: what the path leads to *now* (a link planted since the run
/// must not lead the server out of its folder), up to [`MAX_SERVED_BYTES`].
fn serve_file(s: &State, path: &std::path::Path) -> Response {
    let served = crate::confine::Confinement::new(&s.config.base_dir, &s.config.out_dir)
        .map_err(|e| e.to_string())
        .and_then(|c| c.served_file(path));
    let Ok(resolved) = served else {
        return error(StatusCode::GONE, "the file is no longer there");
    };
    if std::fs::metadata(&resolved).is_ok_and(|m| m.len() > MAX_SERVED_BYTES) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the file is larger than the {} MiB the server hands out; read it from the output folder",
                MAX_SERVED_BYTES >> 20
            ),
        );
    }
    match std::fs::read(&resolved) {
        Ok(bytes) => inert_file(bytes, path),
        Err(_) => error(StatusCode::GONE, "the file is no longer there"),
    }
}

/// A file a run wrote, served so that a browser cannot run it in the editor's
/// origin: only images and plain text are shown; everything else (HTML, SVG,
/// scripts) is a download, no type is sniffed, and a sandboxing CSP covers all.
fn inert_file(bytes: Vec<u8>, path: &std::path::Path) -> Response {
    use warp::http::HeaderValue;
    let shown = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "png" => Some("image/png"),
        Some(e) if e == "jpg" || e == "jpeg" => Some("image/jpeg"),
        Some(e) if ["txt", "json", "jsonl", "yaml", "yml"].contains(&e.as_str()) => {
            Some("text/plain; charset=utf-8")
        }
        _ => None,
    };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    let ctype = shown.unwrap_or("application/octet-stream");
    headers.insert("content-type", HeaderValue::from_static(ctype));
    if shown.is_none() {
        headers.insert(
            "content-disposition",
            HeaderValue::from_static("attachment"),
        );
    }
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

fn mime_of(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Stores an uploaded PNG or JPEG (checked by its signature, not by the name the
/// client gives) under `out/.pixart/uploads/`; returns where, or the refusal.
fn store_upload(s: &State, body: &Bytes) -> Result<std::path::PathBuf, (StatusCode, String)> {
    let ext = if body.starts_with(b"\x89PNG\r\n\x1a\n") {
        "png"
    } else if body.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "jpg"
    } else {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only PNG and JPEG images can be uploaded".into(),
        ));
    };
    let name = format!("{}.{ext}", &blake3::hash(body).to_hex()[..24]);
    let dir = s.data_dir().join("uploads");
    let path = dir.join(&name);
    if !path.exists() {
        if let Err(why) = s.disk.charge(body.len() as u64) {
            return Err((
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the upload is not stored: {why}"),
            ));
        }
    }
    crate::fsutil::atomic_write(&path, body).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the upload: {e}"),
        )
    })?;
    Ok(path)
}

/// The id of a stored upload and the path a workflow names it by: relative to
/// the folder inputs are read from when it lies there (the server's own paths
/// stay its own).
async fn registered_upload(s: &State, path: &std::path::Path) -> Response {
    let id = match s.register_file(path).await {
        Ok(Some((id, _))) => id,
        Ok(None) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the upload was not stored",
            )
        }
        Err(e) => return unavailable(e),
    };
    let resolved = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let shown = s
        .config
        .base_dir
        .canonicalize()
        .ok()
        .and_then(|base| resolved.strip_prefix(base).ok().map(|p| p.to_path_buf()))
        .unwrap_or(resolved);
    with_status(
        json(&serde_json::json!({ "id": id, "path": shown.display().to_string() })),
        StatusCode::CREATED,
    )
    .into_response()
}

/// Sends the runs' events and `queue_changed` notices (see
/// [`State::subscribe_events`]) until the client goes away.
async fn stream_events(
    socket: warp::ws::WebSocket,
    mut events: tokio::sync::broadcast::Receiver<Arc<str>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            event = events.recv() => {
                let text = match event {
                    Ok(text) => text,
                    Err(RecvError::Lagged(n)) => state::lagged_event(n),
                    Err(RecvError::Closed) => break,
                };
                if tx.send(warp::ws::Message::text(&*text)).await.is_err() {
                    break;
                }
            }
            incoming = rx.next() => match incoming {
                // A client that goes away does not cancel anything.
                None | Some(Err(_)) => break,
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

const OPENAPI: &str = include_str!("openapi.json");
