//! What idem adds to a request, in process (no network): a plain handler, the same handler annotated on a first
//! request (claim, run, store) and on a replay (one claim-or-read, no handler), on `MemoryStore`.
//!
//! `cargo bench --bench overhead`; compare the medians in one run: the ratios are what matters on a noisy machine.
//! It runs on a current-thread runtime, so it measures the CPU idem adds, not thread hand-offs between workers
//! (which depend on the server's load more than on idem).

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    next: Arc<AtomicU64>,
}

impl axum::extract::FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

async fn place(app: &App, order: Value) -> (StatusCode, Json<Value>) {
    let id = app.next.fetch_add(1, Ordering::Relaxed);
    (StatusCode::CREATED, Json(json!({ "order_id": id, "order": order })))
}

async fn plain(State(app): State<App>, Json(order): Json<Value>) -> (StatusCode, Json<Value>) {
    place(&app, order).await
}

#[idempotent(ttl = 60)]
async fn annotated(State(app): State<App>, Json(order): Json<Value>) -> (StatusCode, Json<Value>) {
    place(&app, order).await
}

fn request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(r#"{"item":"book","qty":1,"note":"a typical small JSON order"}"#)).unwrap()
}

async fn send(router: &Router, request: Request<Body>) {
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
}

fn router(store: MemoryStore) -> Router {
    let app = App { idempotency: Idempotency::new(store), next: Arc::default() };
    Router::new().route("/plain", post(plain)).route("/annotated", post(annotated)).with_state(app)
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let shared = router(MemoryStore::new());
    runtime.block_on(send(&shared, request("/annotated", Some("replayed"))));

    let mut group = c.benchmark_group("request");
    group.bench_function("plain handler", |b| b.to_async(&runtime).iter(|| send(&shared, request("/plain", None))));
    // A fresh store per request (made outside the timing): the cost of one first request, not of a store that
    // grows by millions of records over the run, as no store at steady state does.
    group.bench_function("annotated, first request", |b| {
        b.to_async(&runtime).iter_batched(
            || router(MemoryStore::new()),
            |router| async move { send(&router, request("/annotated", Some("first"))).await },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("annotated, replay", |b| {
        b.to_async(&runtime).iter(|| send(&shared, request("/annotated", Some("replayed"))))
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
