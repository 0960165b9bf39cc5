//! Layers with their own settings: one per route or per nested router, the tower way.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};
use idem::{Idempotency, MemoryStore, Policy};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

async fn handler(State(runs): State<Runs>) -> (StatusCode, Json<Value>) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

async fn send(app: &Router, method: Method, path: &str, key: Option<&str>) -> (StatusCode, Option<String>, Value) {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    let response = app.clone().oneshot(builder.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let outcome = response.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, outcome, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(start_paused = true)]
async fn each_route_or_router_keeps_its_own_layer_policy() {
    let idempotency = Idempotency::in_memory();
    let runs = Runs::default();
    let strict = Policy::new().required(true).ttl(Duration::from_secs(10));
    let app = Router::new()
        .route("/payments", post(handler).layer(idempotency.layer().policy(strict)))
        .nest("/v1", Router::new().route("/notes", post(handler)).layer(idempotency.layer()))
        .route("/plain", post(handler))
        .with_state(runs.clone());

    // The strict route requires a key; the nested router's layer (engine defaults) lets keyless requests through.
    let (status, _, problem) = send(&app, Method::POST, "/payments", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["type"].as_str().unwrap().ends_with("#missing-key"));
    assert_eq!(send(&app, Method::POST, "/v1/notes", None).await.0, StatusCode::CREATED);
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);

    assert_eq!(send(&app, Method::POST, "/payments", Some("p")).await.1.as_deref(), Some("new"));
    assert_eq!(send(&app, Method::POST, "/v1/notes", Some("n")).await.1.as_deref(), Some("new"));
    assert_eq!(send(&app, Method::POST, "/payments", Some("p")).await.1.as_deref(), Some("hit"));
    assert_eq!(send(&app, Method::POST, "/v1/notes", Some("n")).await.1.as_deref(), Some("hit"));
    assert_eq!(runs.0.load(Ordering::SeqCst), 3);
    // A route with no layer is not protected.
    send(&app, Method::POST, "/plain", Some("x")).await;
    send(&app, Method::POST, "/plain", Some("x")).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 5);

    // The strict route's 10 s ttl ran out; the nested router's (the default, 24 h) did not.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(send(&app, Method::POST, "/payments", Some("p")).await.1.as_deref(), Some("new"));
    assert_eq!(send(&app, Method::POST, "/v1/notes", Some("n")).await.1.as_deref(), Some("hit"));
    assert_eq!(runs.0.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_layer_protects_only_the_methods_it_is_given() {
    let idempotency = Idempotency::builder(MemoryStore::new()).build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/items", put(handler).post(handler))
        .layer(idempotency.layer().methods([Method::PUT]))
        .with_state(runs.clone());
    assert_eq!(send(&app, Method::PUT, "/items", Some("k")).await.1.as_deref(), Some("new"));
    assert_eq!(send(&app, Method::PUT, "/items", Some("k")).await.1.as_deref(), Some("hit"));
    let (status, outcome, _) = send(&app, Method::POST, "/items", Some("k")).await;
    assert_eq!((status, outcome), (StatusCode::CREATED, None), "POST passes through this layer");
    send(&app, Method::POST, "/items", Some("k")).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 3, "PUT ran once, each POST ran");
}

#[tokio::test]
async fn a_layers_own_body_limit_and_unstored_statuses_apply() {
    let idempotency = Idempotency::in_memory();
    let runs = Runs::default();
    let teapot = |State(runs): State<Runs>| async move {
        runs.0.fetch_add(1, Ordering::SeqCst);
        StatusCode::IM_A_TEAPOT
    };
    let app = Router::new()
        .route("/small", post(handler).layer(idempotency.layer().body_limit(8)))
        .route("/teapot", post(teapot).layer(idempotency.layer().unstored_statuses([StatusCode::IM_A_TEAPOT])))
        .with_state(runs.clone());
    let request = Request::post("/small").header("idempotency-key", "b").body(Body::from("0123456789")).unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.0.load(Ordering::SeqCst), 0);
    for _ in 0..2 {
        assert_eq!(send(&app, Method::POST, "/teapot", Some("t")).await.0, StatusCode::IM_A_TEAPOT);
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 2, "an unstored status is sent and the retry runs again");
}
