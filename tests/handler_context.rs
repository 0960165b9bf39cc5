//! What a protected handler can see of its own protection (the key it runs for, the fence of its claim), and the
//! graceful-shutdown drain that lets detached handlers finish. Paused time: leases and long handlers take no real
//! time.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idem::test_kit::{Fault, Faulty, Operation};
use idem::{Idempotency, IdempotencyKey, MemoryStore, drain::Undrained, idempotent, protocol::Fence};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tower::ServiceExt;

/// What one execution's fence said: its owner token, and whether the claim was held (`None`: the store was down).
type FenceCheck = (String, Option<bool>);

#[derive(Clone, Default)]
struct Seen {
    runs: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Option<String>>>>,
    started: Arc<Notify>,
    proceed: Arc<Notify>,
    held: Arc<Mutex<Vec<FenceCheck>>>,
}

fn post_json(path: &str, key: Option<&str>, body: Value) -> Request<Body> {
    let mut builder = Request::builder().method("POST").uri(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Option<String>, Bytes) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let outcome = response.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    (status, outcome, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap())
}

// --- the key ---------------------------------------------------------------------------------------------------

#[idempotent(required = false)]
async fn echo_key(State(seen): State<Seen>, key: Option<IdempotencyKey>) -> impl IntoResponse {
    seen.runs.fetch_add(1, Ordering::SeqCst);
    let key = key.map(|key| key.as_str().to_owned());
    seen.keys.lock().unwrap().push(key.clone());
    (StatusCode::CREATED, Json(json!({ "key": key })))
}

#[idempotent]
async fn needs_key(key: IdempotencyKey) -> String {
    format!("provider key order-{key}")
}

async fn unprotected(key: IdempotencyKey) -> String {
    key.to_string()
}

#[tokio::test]
async fn a_handler_reads_the_key_it_runs_for_in_either_header_form() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/echo", post(echo_key))
        .route("/needs", post(needs_key))
        .route("/plain", post(unprotected))
        .with_state(seen.clone())
        .layer(axum::Extension(Idempotency::in_memory()));

    let (status, _, body) = send(&app, post_json("/echo", Some("order-7"), json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "key": "order-7" }));
    // The structured-field form names the same key, and the handler sees it unquoted.
    let (status, _, body) = send(&app, post_json("/echo", Some("\"order-8\""), json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "key": "order-8" }));
    // No key on a route where keys are optional: the handler runs unprotected and sees none.
    let (status, _, body) = send(&app, post_json("/echo", None, json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "key": null }));
    assert_eq!(*seen.keys.lock().unwrap(), [Some("order-7".into()), Some("order-8".into()), None]);

    let (status, _, body) = send(&app, post_json("/needs", Some("k-1"), json!({}))).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"provider key order-k-1"[..]));
    // A replay answers from the record: the handler did not run to see the key again.
    let (status, outcome, body) = send(&app, post_json("/needs", Some("k-1"), json!({}))).await;
    assert_eq!((status, outcome.as_deref(), &body[..]), (StatusCode::OK, Some("hit"), &b"provider key order-k-1"[..]));

    // Outside idem's protection the extractor is a programming error, answered as a 500 problem.
    let (status, _, body) = send(&app, post_json("/plain", Some("k-2"), json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert!(problem["type"].as_str().unwrap().ends_with("not-configured"), "{problem}");
}

// --- the fence -------------------------------------------------------------------------------------------------

/// With an `x-hold` header (not part of the fingerprint), waits for the test's signal before checking its fence;
/// else checks it at once.
#[idempotent(lease = 3)]
async fn fenced(State(seen): State<Seen>, fence: Fence, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let run = seen.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if headers.contains_key("x-hold") {
        seen.started.notify_one();
        seen.proceed.notified().await;
    }
    // Unknown (`null`) when the store could not be asked.
    let held = fence.is_held().await.ok();
    seen.held.lock().unwrap().push((fence.token().as_str().to_owned(), held));
    (StatusCode::CREATED, Json(json!({ "run": run, "held": held })))
}

#[tokio::test(start_paused = true)]
async fn the_fence_tells_a_handler_whose_lease_lapsed_that_a_retry_took_its_key_over() {
    let store = Faulty::new(MemoryStore::new());
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(fenced))
        .with_state(seen.clone())
        .layer(axum::Extension(Idempotency::new(store.clone())));

    let original = tokio::spawn({
        let app = app.clone();
        async move { send(&app, held(post_json("/orders", Some("k"), json!({})))).await }
    });
    seen.started.notified().await;
    // Inside its lease, renewed every second: a duplicate finds it in flight.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, _, _) = send(&app, post_json("/orders", Some("k"), json!({}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "renewals keep the original's key");
    // Renewals fail for longer than the lease: the claim lapses and a retry takes the key over.
    store.inject(Operation::Renew, Fault::Unavailable);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, outcome, takeover) = send(&app, post_json("/orders", Some("k"), json!({}))).await;
    assert_eq!((status, outcome.as_deref()), (StatusCode::CREATED, Some("new")));
    // Its own fence check could not reach the store: unknown, not "held".
    assert_eq!(serde_json::from_slice::<Value>(&takeover).unwrap(), json!({ "run": 2, "held": null }));
    store.heal(Operation::Renew);
    // The original resumes: its fence says the key is not its own any more, and its completion is fenced.
    seen.proceed.notify_one();
    let (status, _, body) = original.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "run": 1, "held": false }));
    let held = seen.held.lock().unwrap().clone();
    assert_eq!(held.len(), 2);
    assert_ne!(held[0].0, held[1].0, "each execution has its own owner token");
    let (status, outcome, replay) = send(&app, post_json("/orders", Some("k"), json!({}))).await;
    assert_eq!((status, outcome.as_deref()), (StatusCode::CREATED, Some("hit")));
    assert_eq!(replay, takeover, "the takeover's record won; the stale original wrote nothing");
    assert_eq!(seen.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_fence_holds_while_renewals_land() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(fenced))
        .with_state(seen.clone())
        .layer(axum::Extension(Idempotency::in_memory()));
    let original = tokio::spawn({
        let app = app.clone();
        async move { send(&app, held(post_json("/orders", Some("k"), json!({})))).await }
    });
    seen.started.notified().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    seen.proceed.notify_one();
    let (status, _, body) = original.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "run": 1, "held": true }));
}

fn held(mut request: Request<Body>) -> Request<Body> {
    request.headers_mut().insert("x-hold", axum::http::HeaderValue::from_static("1"));
    request
}

// --- drain -----------------------------------------------------------------------------------------------------

#[idempotent(ttl = 600)]
async fn slow(State(seen): State<Seen>) -> impl IntoResponse {
    seen.started.notify_one();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let run = seen.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_handler_whose_client_left_and_its_record_is_kept() {
    let seen = Seen::default();
    let idempotency = Idempotency::in_memory();
    let app =
        Router::new().route("/orders", post(slow)).with_state(seen.clone()).layer(axum::Extension(idempotency.clone()));
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_json("/orders", Some("k"), json!({}))).await }
    });
    seen.started.notified().await;
    // The client disconnects; the server stops accepting (axum's graceful shutdown has nothing left to wait for).
    client.abort();
    assert_eq!(idempotency.running_handlers(), 1);
    // A grace period shorter than the handler: it is reported, not dropped.
    assert_eq!(idempotency.drain(Duration::from_secs(2)).await, Err(Undrained(1)));
    assert_eq!(seen.runs.load(Ordering::SeqCst), 0);
    assert_eq!(idempotency.drain(Duration::from_secs(60)).await, Ok(()));
    assert_eq!(seen.runs.load(Ordering::SeqCst), 1, "the handler ran to its end");
    assert_eq!(idempotency.running_handlers(), 0);
    // Its response was recorded before drain returned: the retry replays it.
    let (status, outcome, body) = send(&app, post_json("/orders", Some("k"), json!({}))).await;
    assert_eq!((status, outcome.as_deref()), (StatusCode::CREATED, Some("hit")));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "run": 1 }));
    // Nothing running: drain returns at once.
    assert_eq!(idempotency.drain(Duration::ZERO).await, Ok(()));
}

#[tokio::test]
async fn under_fail_open_a_handler_still_sees_its_key_but_no_fence() {
    let seen = Seen::default();
    let idempotency =
        Idempotency::builder(idem::test_kit::Outage).on_store_failure(idem::StoreFailure::FailOpen).build();
    let fenced = |fence: Option<Fence>, key: Option<IdempotencyKey>| async move {
        Json(json!({ "key": key.map(|key| key.to_string()), "fenced": fence.is_some() }))
    };
    let app = Router::new()
        .route("/echo", post(echo_key))
        .route("/fence", post(fenced))
        .with_state(seen.clone())
        .layer(idempotency.layer());
    let (status, _, body) = send(&app, post_json("/echo", Some("order-9"), json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "the store is down, the engine fails open");
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "key": "order-9" }));
    let (_, _, body) = send(&app, post_json("/fence", Some("order-10"), json!({}))).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({ "key": "order-10", "fenced": false }));
}
