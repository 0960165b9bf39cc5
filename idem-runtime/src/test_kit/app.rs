//! The app under test: one annotated handler per policy the behaviour table needs, each counting its executions
//! first thing in its body, so a case can say how many times the handler really ran.

use super::client::Reply;
use crate::engine::Idempotency;
use crate::store::contract::Store;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idem_macros::idempotent;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// The request body limit of the test app (`DefaultBodyLimit`), small so a case can exceed it cheaply.
pub const BODY_LIMIT: usize = 1024;

/// What the handlers report to the test: how often they ran, and hooks to hold them while a case sends duplicates.
#[derive(Debug)]
pub struct Probe {
    runs: AtomicUsize,
    finished: AtomicUsize,
    started: Notify,
    done: Notify,
    gate: watch::Sender<bool>,
}

impl Probe {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            runs: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            started: Notify::new(),
            done: Notify::new(),
            gate: watch::Sender::new(false),
        })
    }

    /// Counts one execution of a handler body; returns which one it is (1 for the first).
    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many times a handler body ran.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// How many slow handlers ran to their end.
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    /// Waits until a handler that signals its start has started (a start before the call counts).
    pub async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(5), self.started.notified())
            .await
            .expect("the handler should have started within 5 s");
    }

    /// Waits until a slow handler has run to its end (an end before the call counts).
    pub async fn done(&self) {
        tokio::time::timeout(Duration::from_secs(5), self.done.notified())
            .await
            .expect("the handler should have run to its end within 5 s (was it cancelled?)");
    }

    /// Lets every gated handler, running or to come, finish.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    async fn pass_gate(&self) {
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }
}

/// The app state: the engine (found by the handlers through `FromRef`) and the probe.
#[derive(Debug, Clone)]
pub struct App {
    pub idempotency: Idempotency,
    pub probe: Arc<Probe>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// The test app with its probe; requests go through it in process, or over TCP with [`serve`](super::client::serve).
#[derive(Debug)]
pub struct TestApp {
    pub router: Router,
    pub probe: Arc<Probe>,
}

impl TestApp {
    /// The app over `store`, with the engine's default settings.
    pub fn new(store: impl Store) -> Self {
        Self::with(Idempotency::new(store))
    }

    /// The app over a configured engine.
    pub fn with(idempotency: Idempotency) -> Self {
        let probe = Probe::new();
        let router = routes().with_state(App { idempotency, probe: probe.clone() });
        Self { router, probe }
    }

    /// The app whose state cannot provide an engine; `extension` installs one as a request extension.
    pub fn without_state_engine(extension: Option<Idempotency>) -> Self {
        let probe = Probe::new();
        let router = Router::new().route("/orders", post(bare_create));
        let router = match extension {
            Some(idempotency) => router.layer(Extension(idempotency)),
            None => router,
        };
        Self { router: router.with_state(Bare { probe: probe.clone() }), probe }
    }

    /// Sends `request` in process and reads the answer in full.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        send(self.router.clone(), request).await
    }

    /// Sends `request` in process on a task of its own (an original to hold, or one of many duplicates).
    pub fn spawn(&self, request: Request<Body>) -> tokio::task::JoinHandle<Reply> {
        tokio::spawn(send(self.router.clone(), request))
    }

    /// How many times a handler body ran.
    pub fn runs(&self) -> usize {
        self.probe.runs()
    }
}

/// Sends `request` to `router` in process and reads the answer in full.
pub async fn send(router: Router, request: Request<Body>) -> Reply {
    let response = router.oneshot(request).await.expect("the router is infallible");
    Reply::read(response).await
}

fn routes() -> Router<App> {
    Router::new()
        .route("/orders", post(create))
        .route("/orders-copy", post(create))
        .route("/orders-lenient", post(create_lenient))
        .route("/orders-optional", post(create_optional))
        .route("/status/{code}", post(status))
        .route("/status-stored/{code}", post(status_stored))
        .route("/panic", post(panics_once))
        .route("/panic-stored", post(panics_always_stored))
        .route("/fidelity/{kind}", post(fidelity))
        .route("/stream", post(stream))
        .route("/gated", post(gated))
        .route("/gated-wait", post(gated_wait))
        .route("/gated-short-wait", post(gated_short_wait))
        .route("/slow", post(slow))
        .route("/slow-wait", post(slow_wait))
        .route("/short-ttl", post(short_ttl))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub item: String,
    pub qty: u32,
}

/// 201 with the execution number, the order and a `Location`: what every order handler answers.
fn created(run: usize, order: &Order) -> Response {
    let location = format!("/orders/{run}");
    let body = json!({ "run": run, "item": order.item, "qty": order.qty });
    (StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response()
}

#[idempotent(crate = "crate::test_kit")]
async fn create(State(app): State<App>, Json(order): Json<Order>) -> Response {
    let run = app.probe.run();
    created(run, &order)
}

#[idempotent(crate = "crate::test_kit", validate_signature = false)]
async fn create_lenient(State(app): State<App>, Json(order): Json<Order>) -> Response {
    let run = app.probe.run();
    created(run, &order)
}

#[idempotent(crate = "crate::test_kit", required = false)]
async fn create_optional(State(app): State<App>, Json(order): Json<Order>) -> Response {
    let run = app.probe.run();
    created(run, &order)
}

/// Answers the status in the path, with a text body naming the execution.
#[idempotent(crate = "crate::test_kit")]
async fn status(State(app): State<App>, Path(code): Path<u16>) -> Response {
    let run = app.probe.run();
    status_answer(code, run)
}

#[idempotent(crate = "crate::test_kit", store_server_errors)]
async fn status_stored(State(app): State<App>, Path(code): Path<u16>) -> Response {
    let run = app.probe.run();
    status_answer(code, run)
}

fn status_answer(code: u16, run: usize) -> Response {
    let status = StatusCode::from_u16(code).expect("a valid status in the path");
    (status, format!("status {code}, run {run}")).into_response()
}

/// Panics on its first execution, answers 201 after.
#[idempotent(crate = "crate::test_kit")]
async fn panics_once(State(app): State<App>) -> Response {
    let run = app.probe.run();
    if run == 1 {
        panic!("the first attempt fails (a deliberate panic in a conformance test)");
    }
    (StatusCode::CREATED, format!("run {run}")).into_response()
}

#[idempotent(crate = "crate::test_kit", store_server_errors)]
async fn panics_always_stored(State(app): State<App>) -> Response {
    let run = app.probe.run();
    panic!("attempt {run} fails (a deliberate panic in a conformance test)");
}

/// Everything a replay must keep: a status per body kind, headers in a non-alphabetical order, a repeated header,
/// a non-UTF-8 value, plus `Set-Cookie` and `Date`, which must not be replayed.
#[idempotent(crate = "crate::test_kit")]
async fn fidelity(State(app): State<App>, Path(kind): Path<String>) -> Response {
    let run = app.probe.run();
    let (status, content_type, body): (StatusCode, Option<&'static str>, Vec<u8>) = match kind.as_str() {
        "json" => (
            StatusCode::CREATED,
            Some("application/json"),
            json!({ "run": run, "note": "caf\u{e9} \u{1f980}", "nested": { "list": [1, 2.5, null, true] } })
                .to_string()
                .into_bytes(),
        ),
        "text" => {
            (StatusCode::OK, Some("text/plain; charset=utf-8"), format!("plain text, run {run}\r\n").into_bytes())
        }
        "empty" => (StatusCode::NO_CONTENT, None, Vec::new()),
        "binary" => (StatusCode::OK, Some("application/octet-stream"), (0..=255u8).collect()),
        other => panic!("unknown fidelity kind {other:?}"),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-run", HeaderValue::from(run));
    headers.append("x-multi", HeaderValue::from_static("first"));
    headers.append("x-multi", HeaderValue::from_static("second"));
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    headers.insert("x-raw", HeaderValue::from_bytes(&[b'r', 0xff, 0x80, b'w']).expect("obs-text is a valid value"));
    headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=for-the-first-client-only; HttpOnly"));
    headers.insert(header::DATE, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The body of a streamed answer: its chunks, in order.
pub fn stream_chunks(run: usize) -> Vec<Bytes> {
    vec![Bytes::from(format!("run {run};")), Bytes::from_static(b"second chunk;"), Bytes::from_static(b"last chunk")]
}

#[idempotent(crate = "crate::test_kit")]
async fn stream(State(app): State<App>) -> Response {
    let run = app.probe.run();
    let chunks = stream_chunks(run).into_iter().map(Ok::<_, std::convert::Infallible>);
    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
}

/// Signals its start, then holds until the test opens the gate.
async fn held(app: &App) -> Response {
    let run = app.probe.run();
    app.probe.started.notify_one();
    app.probe.pass_gate().await;
    (StatusCode::CREATED, Json(json!({ "run": run }))).into_response()
}

#[idempotent(crate = "crate::test_kit")]
async fn gated(State(app): State<App>) -> Response {
    held(&app).await
}

#[idempotent(crate = "crate::test_kit", wait_timeout = 3)]
async fn gated_wait(State(app): State<App>) -> Response {
    held(&app).await
}

#[idempotent(crate = "crate::test_kit", wait_timeout = 0.3)]
async fn gated_short_wait(State(app): State<App>) -> Response {
    held(&app).await
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sleep {
    pub sleep_ms: u64,
}

/// Signals its start, sleeps as asked, then signals its end.
async fn sleepy(app: &App, sleep: &Sleep) -> Response {
    let run = app.probe.run();
    app.probe.started.notify_one();
    tokio::time::sleep(Duration::from_millis(sleep.sleep_ms)).await;
    app.probe.finished.fetch_add(1, Ordering::SeqCst);
    app.probe.done.notify_one();
    (StatusCode::CREATED, Json(json!({ "run": run }))).into_response()
}

/// A lease of one second, so a handler can outlive it (memory-only case, under paused time).
#[idempotent(crate = "crate::test_kit", lease = 1, ttl = 60)]
async fn slow(State(app): State<App>, Json(sleep): Json<Sleep>) -> Response {
    sleepy(&app, &sleep).await
}

#[idempotent(crate = "crate::test_kit", wait_timeout = 2)]
async fn slow_wait(State(app): State<App>, Json(sleep): Json<Sleep>) -> Response {
    sleepy(&app, &sleep).await
}

/// A short retention (memory-only case, under paused time).
#[idempotent(crate = "crate::test_kit", ttl = 10)]
async fn short_ttl(State(app): State<App>) -> Response {
    let run = app.probe.run();
    (StatusCode::CREATED, Json(json!({ "run": run }))).into_response()
}

/// A state with no `FromRef` for `Idempotency`: the engine can only come from a request extension.
#[derive(Debug, Clone)]
pub struct Bare {
    probe: Arc<Probe>,
}

#[idempotent(crate = "crate::test_kit")]
async fn bare_create(State(bare): State<Bare>, Json(order): Json<Order>) -> Response {
    let run = bare.probe.run();
    created(run, &order)
}
