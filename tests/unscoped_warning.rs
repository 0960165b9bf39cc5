//! The one-time warning for requests scoped to no principal. Its own test binary: tracing caches, per call site,
//! whether any subscriber wants an event, and a test running beside it without a subscriber can settle that first.

mod log_capture;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent]
async fn order(State(runs): State<Runs>) -> (StatusCode, Json<Value>) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

fn orders(idempotency: Idempotency, runs: &Runs) -> Router {
    Router::new().route("/orders", post(order)).with_state(runs.clone()).layer(axum::Extension(idempotency))
}

async fn send(app: &Router, key: &str, authorization: Option<&str>) -> StatusCode {
    let mut builder = Request::builder().method("POST").uri("/orders").header("idempotency-key", key);
    if let Some(authorization) = authorization {
        builder = builder.header("authorization", authorization);
    }
    app.clone().oneshot(builder.body(Body::empty()).unwrap()).await.unwrap().status()
}

#[tokio::test]
async fn requests_without_a_principal_are_reported_once_per_engine() {
    let (log, _guard) = log_capture::capture();
    let warnings = || log.text().matches("had no principal").count();

    let runs = Runs::default();
    let app = orders(Idempotency::in_memory(), &runs);
    assert_eq!(send(&app, "a", Some("Bearer alice")).await, StatusCode::CREATED);
    assert_eq!(warnings(), 0, "a request scoped by its Authorization header is fine");
    assert_eq!(send(&app, "b", None).await, StatusCode::CREATED);
    assert_eq!(send(&app, "c", None).await, StatusCode::CREATED);
    assert_eq!(warnings(), 1, "reported once, not per request");
    // With a principal of the app's own, nothing is reported.
    let scoped = Idempotency::builder(MemoryStore::new()).principal(|_| b"tenant-1".to_vec()).build();
    let scoped = orders(scoped, &runs);
    assert_eq!(send(&scoped, "d", None).await, StatusCode::CREATED);
    assert_eq!(warnings(), 1);
}
