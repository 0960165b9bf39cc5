//! What makes two requests with one key "the same request": `Policy::fingerprint_body`, each choice against the
//! default. A reused key with a body that counts as different is `422 key-reused`; one that counts as the same is
//! replayed. Every case counts how many times the handler ran.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::{BodyFingerprint, Idempotency, Policy};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

/// A route under a layer with `shape`, and its run counter.
fn app(shape: BodyFingerprint) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let handler = move || {
        let counter = counter.clone();
        async move { (StatusCode::CREATED, format!("run {}", counter.fetch_add(1, Ordering::SeqCst) + 1)) }
    };
    let layer = Idempotency::in_memory().layer().policy(Policy::new().fingerprint_body(shape));
    (Router::new().route("/orders", post(handler)).layer(layer), runs)
}

async fn send(router: &Router, key: &str, body: &str) -> StatusCode {
    let request = Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    router.clone().oneshot(request).await.unwrap().status()
}

const FIRST: &str = r#"{"item":"book","qty":1,"sent_at":"2026-12-02T10:00:00Z","meta":{"attempt":1}}"#;
/// FIRST, re-encoded: members reordered, spaces added.
const REORDERED: &str = r#"{ "qty": 1, "meta": {"attempt": 1}, "sent_at": "2026-12-02T10:00:00Z", "item": "book" }"#;
/// FIRST as a retry stamps it: new `sent_at` and `meta.attempt`.
const RESTAMPED: &str = r#"{"item":"book","qty":1,"sent_at":"2026-12-02T10:00:07Z","meta":{"attempt":2}}"#;
/// Another order.
const OTHER: &str = r#"{"item":"book","qty":2,"sent_at":"2026-12-02T10:00:07Z","meta":{"attempt":2}}"#;

/// The statuses of FIRST then `second` under one key, and how many runs.
async fn pair(shape: BodyFingerprint, second: &str) -> (StatusCode, StatusCode, usize) {
    let (router, runs) = app(shape);
    let first = send(&router, "k", FIRST).await;
    let again = send(&router, "k", second).await;
    (first, again, runs.load(Ordering::SeqCst))
}

#[tokio::test]
async fn by_default_any_byte_of_difference_is_another_request() {
    assert_eq!(pair(BodyFingerprint::Bytes, FIRST).await, (StatusCode::CREATED, StatusCode::CREATED, 1));
    assert_eq!(
        pair(BodyFingerprint::Bytes, REORDERED).await,
        (StatusCode::CREATED, StatusCode::UNPROCESSABLE_ENTITY, 1)
    );
    assert_eq!(pair(BodyFingerprint::default(), RESTAMPED).await.1, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn json_makes_two_encodings_of_one_document_the_same_request() {
    assert_eq!(pair(BodyFingerprint::Json, REORDERED).await, (StatusCode::CREATED, StatusCode::CREATED, 1));
    assert_eq!(
        pair(BodyFingerprint::Json, RESTAMPED).await,
        (StatusCode::CREATED, StatusCode::UNPROCESSABLE_ENTITY, 1)
    );
}

#[tokio::test]
async fn json_ignoring_leaves_out_the_named_members_and_only_them() {
    let shape = BodyFingerprint::JsonIgnoring(&["/sent_at", "/meta/attempt", "/no/such/member"]);
    assert_eq!(pair(shape, RESTAMPED).await, (StatusCode::CREATED, StatusCode::CREATED, 1));
    assert_eq!(pair(shape, REORDERED).await, (StatusCode::CREATED, StatusCode::CREATED, 1));
    // The quantity still counts: another order under a reused key is refused, and did not run.
    assert_eq!(pair(shape, OTHER).await, (StatusCode::CREATED, StatusCode::UNPROCESSABLE_ENTITY, 1));
    // Only `sent_at` ignored: the attempt counter makes the retry another request.
    let narrower = BodyFingerprint::JsonIgnoring(&["/sent_at"]);
    assert_eq!(pair(narrower, RESTAMPED).await.1, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn ignored_makes_the_body_not_count_at_all() {
    assert_eq!(pair(BodyFingerprint::Ignored, OTHER).await, (StatusCode::CREATED, StatusCode::CREATED, 1));
}

#[tokio::test]
async fn a_body_that_is_not_json_is_taken_as_bytes_under_json() {
    let (router, runs) = app(BodyFingerprint::Json);
    assert_eq!(send(&router, "k", "not json {").await, StatusCode::CREATED);
    assert_eq!(send(&router, "k", "not json {").await, StatusCode::CREATED);
    assert_eq!(send(&router, "k", "not json  {").await, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
