//! A route's policy taken from the app at run time (`#[idempotent(policy = "..")]` + `route_policy`), and the
//! annotated function kept callable as written (`<name>_unprotected`) for unit tests of its own logic.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idem::{Idempotency, MemoryStore, Policy, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

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

/// Its ttl, wait and signature check come from the engine, configured at start-up.
#[idempotent(policy = "payments")]
async fn pay(State(app): State<App>, Json(payment): Json<Value>) -> (StatusCode, Json<Value>) {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "run": run, "cents": payment["cents"] })))
}

fn app(idempotency: Idempotency) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let router = Router::new().route("/payments", post(pay)).with_state(App { idempotency, runs: runs.clone() });
    (router, runs)
}

async fn send(router: &Router, key: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut request = Request::post("/payments").header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = router.clone().oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_route_takes_the_policy_registered_under_its_name() {
    // Keys optional and signatures not checked: settings no literal in the attribute gave.
    let payments = Policy::new().required(false).validate_signature(false).ttl(Duration::from_secs(60));
    let (router, runs) = app(Idempotency::builder(MemoryStore::new()).route_policy("payments", payments).build());
    let (status, body) = send(&router, Some("p-1"), json!({ "cents": 100 })).await;
    assert_eq!((status, body["run"].clone()), (StatusCode::CREATED, json!(1)));
    // Another body under the same key: replayed, not refused, because this policy does not validate signatures.
    let (status, body) = send(&router, Some("p-1"), json!({ "cents": 999 })).await;
    assert_eq!((status, body["run"].clone(), body["cents"].clone()), (StatusCode::CREATED, json!(1), json!(100)));
    // No key: runs unprotected, as `required(false)` says (the attribute's default would be 400 missing-key).
    let (status, _) = send(&router, None, json!({ "cents": 5 })).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_same_route_follows_another_engines_policy() {
    // The default policy: a key is required and a reused key with another body is refused.
    let (router, runs) = app(Idempotency::builder(MemoryStore::new()).route_policy("payments", Policy::new()).build());
    let (status, body) = send(&router, None, json!({ "cents": 5 })).await;
    assert_eq!((status, body["type"].as_str().unwrap().ends_with("missing-key")), (StatusCode::BAD_REQUEST, true));
    assert_eq!(send(&router, Some("p-2"), json!({ "cents": 1 })).await.0, StatusCode::CREATED);
    let (status, body) = send(&router, Some("p-2"), json!({ "cents": 2 })).await;
    assert_eq!(
        (status, body["type"].as_str().unwrap().ends_with("key-reused")),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_policy_name_the_engine_does_not_know_is_500_not_configured_and_nothing_runs() {
    let (router, runs) = app(Idempotency::builder(MemoryStore::new()).route_policy("refunds", Policy::new()).build());
    let (status, body) = send(&router, Some("p-3"), json!({ "cents": 1 })).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body["type"].as_str().unwrap().ends_with("not-configured"), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("route_policy"), "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_annotated_function_is_callable_as_written_in_a_unit_test() {
    let runs = Arc::new(AtomicUsize::new(0));
    let state = App { idempotency: Idempotency::in_memory(), runs: runs.clone() };
    // No request, no key, no engine involved: the handler's own logic.
    let (status, Json(body)) = pay_unprotected(State(state.clone()), Json(json!({ "cents": 42 }))).await;
    assert_eq!((status, body), (StatusCode::CREATED, json!({ "run": 1, "cents": 42 })));
    let (_, Json(body)) = pay_unprotected(State(state), Json(json!({ "cents": 42 }))).await;
    assert_eq!(body["run"], 2, "called directly, it runs every time");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
