//! A handler that blocks its thread keeps its lease, whatever the door (issue 16, item 1).
//!
//! On a multi-thread runtime a handler calls `block_in_place(|| std::thread::sleep(1.5 s))` under a 300 ms lease; a
//! duplicate sent at 900 ms (three leases later) must be refused `409 in-progress`, and the handler must run once.
//! When the lease keeper was driven beside the handler on the handler's own task, nothing renewed while the thread
//! was blocked: the lease lapsed at 300 ms and the duplicate ran the handler a second time (3 runs of 3). Real time,
//! since a blocked thread is the point: each door takes about 1.5 s, and they run side by side.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, Policy, idempotent, layer::IdempotencyLayer, once::OnceError};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

const LEASE: Duration = Duration::from_millis(300);
const BLOCKED_FOR: Duration = Duration::from_millis(1500);
const DUPLICATE_AT: Duration = Duration::from_millis(900);

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    runs: Arc<AtomicUsize>,
}

impl axum::extract::FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// Long synchronous work (a password hash, a big parse): the thread is blocked, the task is never polled.
fn block_thread() {
    tokio::task::block_in_place(|| std::thread::sleep(BLOCKED_FOR));
}

#[idempotent(lease = 0.3, ttl = 60)]
async fn annotated(State(app): State<App>) -> impl IntoResponse {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    block_thread();
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

async fn plain(State(app): State<App>) -> impl IntoResponse {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    block_thread();
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

fn request(key: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap()
}

/// Sends the original, then a duplicate at [`DUPLICATE_AT`]; answers both statuses and the duplicate's
/// `x-idempotency-status`.
async fn original_and_duplicate(router: Router) -> (StatusCode, StatusCode, Option<String>) {
    let original = tokio::spawn(router.clone().oneshot(request("blocked")));
    tokio::time::sleep(DUPLICATE_AT).await;
    let duplicate: Response = router.oneshot(request("blocked")).await.unwrap();
    let duplicate_status = duplicate.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    let original = original.await.unwrap().unwrap();
    (original.status(), duplicate.status(), duplicate_status)
}

fn app() -> App {
    App { idempotency: Idempotency::in_memory(), runs: Arc::default() }
}

async fn annotated_door() -> (&'static str, App, (StatusCode, StatusCode, Option<String>)) {
    let app = app();
    let router = Router::new().route("/orders", post(annotated)).with_state(app.clone());
    ("annotated", app.clone(), original_and_duplicate(router).await)
}

async fn layer_door() -> (&'static str, App, (StatusCode, StatusCode, Option<String>)) {
    let app = app();
    let layer = IdempotencyLayer::new(app.idempotency.clone()).policy(Policy::new().lease(LEASE));
    let router = Router::new().route("/orders", post(plain)).layer(layer).with_state(app.clone());
    ("layer", app.clone(), original_and_duplicate(router).await)
}

/// The layer claims with its own lease and hands the claim to the annotated handler (the handoff).
async fn layer_and_annotated_door() -> (&'static str, App, (StatusCode, StatusCode, Option<String>)) {
    let app = app();
    let layer = IdempotencyLayer::new(app.idempotency.clone()).policy(Policy::new().lease(LEASE));
    let router = Router::new().route("/orders", post(annotated)).layer(layer).with_state(app.clone());
    ("layer + annotated", app.clone(), original_and_duplicate(router).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_handler_keeps_its_lease_under_every_http_door() {
    let (annotated, layer, both) = tokio::join!(annotated_door(), layer_door(), layer_and_annotated_door());
    for (door, app, (original, duplicate, duplicate_status)) in [annotated, layer, both] {
        assert_eq!(original, StatusCode::CREATED, "{door}: the original answers");
        assert_eq!(
            duplicate,
            StatusCode::CONFLICT,
            "{door}: the duplicate at 900 ms is refused in-progress (x-idempotency-status: {duplicate_status:?})"
        );
        assert_eq!(app.runs.load(Ordering::SeqCst), 1, "{door}: the handler ran once");
        assert_eq!(app.idempotency.drain(Duration::from_secs(5)).await, Ok(()), "{door}: drained");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocking_work_under_once_keeps_its_lease() {
    let idempotency = Idempotency::in_memory();
    let runs = Arc::new(AtomicUsize::new(0));
    let policy = Policy::new().lease(LEASE).wait_timeout(Duration::ZERO);
    let original = {
        let (idempotency, runs) = (idempotency.clone(), runs.clone());
        tokio::spawn(async move {
            idempotency
                .once("jobs", "blocked")
                .policy(policy)
                .run(&"job", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    block_thread();
                    Ok::<_, ()>("done".to_owned())
                })
                .await
        })
    };
    tokio::time::sleep(DUPLICATE_AT).await;
    let duplicate = idempotency
        .once("jobs", "blocked")
        .policy(policy)
        .run(&"job", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>("again".to_owned())
        })
        .await;
    assert!(matches!(duplicate, Err(OnceError::InFlight)), "the duplicate at 900 ms is refused: {duplicate:?}");
    assert_eq!(original.await.unwrap().unwrap(), "done");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
}
