//! What idem adds to a request, in process (no network): a plain handler, the same handler annotated on a first
//! request (claim, run, store) and on a replay (one claim-or-read, no handler), on `MemoryStore`; and the two
//! costs that grow with a request: the fingerprint over its body, and (on Redis) encoding and decoding its record.
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

/// As `annotated`, with records kept 1 s: a long-lived engine's store then stays about one second of traffic big.
#[idempotent(ttl = 1, lease = 1)]
async fn annotated_short(State(app): State<App>, Json(order): Json<Value>) -> (StatusCode, Json<Value>) {
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
    Router::new()
        .route("/plain", post(plain))
        .route("/annotated", post(annotated))
        .route("/annotated-short", post(annotated_short))
        .with_state(app)
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
    // The steady state of a server: one engine (its lease keeper running) and a new key per request; records expire
    // after 1 s, so the store holds about a second of traffic.
    let long_lived = router(MemoryStore::builder().max_entries(usize::MAX).max_bytes(usize::MAX).build());
    let next_key = std::cell::Cell::new(0u64);
    group.bench_function("annotated, first request, long-lived engine", |b| {
        b.to_async(&runtime).iter(|| {
            next_key.set(next_key.get() + 1);
            send(&long_lived, request("/annotated-short", Some(&format!("k{}", next_key.get()))))
        })
    });
    group.bench_function("annotated, replay", |b| {
        b.to_async(&runtime).iter(|| send(&shared, request("/annotated", Some("replayed"))))
    });
    group.finish();
}

/// A body of `size` bytes of JSON-like text (quotes included, so the record's JSON escapes them).
fn body(size: usize) -> bytes::Bytes {
    let unit = br#"{"item":"book","qty":1,"note":"a typical JSON order"},"#;
    bytes::Bytes::from(unit.iter().copied().cycle().take(size).collect::<Vec<u8>>())
}

const SIZES: [(&str, usize); 3] = [("1 KiB", 1 << 10), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)];

fn fingerprint(c: &mut Criterion) {
    let idempotency = Idempotency::new(MemoryStore::new());
    let (parts, ()) =
        Request::post("/orders").header("content-type", "application/json").body(()).unwrap().into_parts();
    let mut group = c.benchmark_group("fingerprint");
    for (name, size) in SIZES {
        let body = body(size);
        group.throughput(criterion::Throughput::Bytes(size as u64));
        group.bench_function(name, |b| b.iter(|| idempotency.fingerprint(&parts, &body)));
    }
    group.finish();
}

/// A completed record as the Redis store writes it (JSON) and reads it back on a replay.
fn record(c: &mut Criterion) {
    use idem::store::{Fingerprint, Record, Stored, StoredResponse};
    use idem_runtime::fuzzing::{decode_record, encode_record};
    let mut group = c.benchmark_group("record");
    for (name, size) in SIZES {
        let response = StoredResponse {
            status: 201,
            headers: vec![
                ("content-type".to_owned(), bytes::Bytes::from_static(b"application/json")),
                ("location".to_owned(), bytes::Bytes::from_static(b"/orders/42")),
            ],
            body: body(size),
        };
        let record = Record {
            fingerprint: Fingerprint::builder().field(b"request").finish(),
            stored: Stored::Response(response),
        };
        let encoded = encode_record(&record);
        group.throughput(criterion::Throughput::Bytes(size as u64));
        group.bench_function(format!("encode {name}"), |b| b.iter(|| encode_record(&record)));
        group.bench_function(format!("decode {name}"), |b| b.iter(|| decode_record(encoded.as_bytes()).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, overhead, fingerprint, record);
criterion_main!(benches);
