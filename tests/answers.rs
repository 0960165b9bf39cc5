//! What an app can set about the answers idem makes itself (problem `type` URIs, `Retry-After`, the signature
//! header) and about the keys it accepts and the scope they live in.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idem::key::KeyFormat;
use idem::{Idempotency, IdempotencyBuilder, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent(wait_timeout = 0)]
async fn order(State(runs): State<Runs>) -> (StatusCode, Json<Value>) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(200)).await;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

fn orders(idempotency: Idempotency, runs: &Runs) -> Router {
    Router::new().route("/orders", post(order)).with_state(runs.clone()).layer(axum::Extension(idempotency))
}

fn request(key: &str, authorization: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method("POST").uri("/orders").header("idempotency-key", key);
    if let Some(authorization) = authorization {
        builder = builder.header("authorization", authorization);
    }
    builder.body(Body::empty()).unwrap()
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    Reply { status: parts.status, headers: parts.headers, body: serde_json::from_slice(&body).unwrap_or(Value::Null) }
}

fn configured(store: impl idem::store::Store) -> IdempotencyBuilder {
    Idempotency::builder(store)
        .problem_type_base("https://api.example.com/problems/")
        .retry_after(Duration::from_millis(2500), Duration::from_secs(30))
        .signature_header(false)
}

#[tokio::test]
async fn problems_link_to_the_apps_documentation_with_its_retry_after_and_no_signature() {
    let runs = Runs::default();
    let app = orders(configured(MemoryStore::new()).build(), &runs);
    let original = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("k", None)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conflict = send(&app, request("k", None)).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.body["type"], "https://api.example.com/problems/in-progress");
    assert_eq!(conflict.headers["retry-after"], "3", "2.5 s rounds up to whole seconds");
    assert!(!conflict.headers.contains_key("x-idempotency-signature"));
    let original = original.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(!original.headers.contains_key("x-idempotency-signature"));
    assert_eq!(original.headers["x-idempotency-status"], "new");
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);

    let down = orders(configured(idem::test_kit::Outage).build(), &runs);
    let unavailable = send(&down, request("k", None)).await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unavailable.body["type"], "https://api.example.com/problems/store-unavailable");
    assert_eq!(unavailable.headers["retry-after"], "30");
}

#[tokio::test]
async fn by_default_problems_link_to_their_documentation_and_answers_carry_the_signature() {
    let runs = Runs::default();
    let app = orders(Idempotency::in_memory(), &runs);
    let first = send(&app, request("k", None)).await;
    assert_eq!(first.headers["x-idempotency-signature"].len(), 64);
    let down = app_down(&runs);
    let unavailable = send(&down, request("k", None)).await;
    assert_eq!(unavailable.body["type"], "https://docs.rs/axum-idem/latest/idem/problems/index.html#store-unavailable");
    assert_eq!(unavailable.headers["retry-after"], "5");
}

fn app_down(runs: &Runs) -> Router {
    orders(Idempotency::new(idem::test_kit::Outage), runs)
}

#[tokio::test]
async fn a_key_outside_the_servers_format_is_refused_before_the_store_is_touched() {
    let runs = Runs::default();
    // Over a store that is down: a key refused for its format never reaches it (a 400, not a 503).
    let down = orders(Idempotency::builder(idem::test_kit::Outage).key_format(KeyFormat::uuid()).build(), &runs);
    let refused = send(&down, request("order-1", None)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body["type"].as_str().unwrap().ends_with("#invalid-key"));
    assert!(refused.body["detail"].as_str().unwrap().contains("UUID"), "{}", refused.body);

    let app = orders(Idempotency::builder(MemoryStore::new()).key_format(KeyFormat::uuid()).build(), &runs);
    let uuid = "9B2F1A64-1c3e-4c6a-9a44-3f0e2b7d8c11";
    assert_eq!(send(&app, request(uuid, None)).await.status, StatusCode::CREATED);
    assert_eq!(send(&app, request(&format!("\"{uuid}\""), None)).await.headers["x-idempotency-status"], "hit");
    for bad in [
        "9b2f1a64-1c3e-4c6a-9a44-3f0e2b7d8c1",
        "9b2f1a64x1c3e-4c6a-9a44-3f0e2b7d8c11",
        "zb2f1a64-1c3e-4c6a-9a44-3f0e2b7d8c11",
    ] {
        assert_eq!(send(&app, request(bad, None)).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);
}
