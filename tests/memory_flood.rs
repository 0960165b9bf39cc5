//! A flood of distinct keys against `MemoryStore`: it cannot grow the store past its bounds, the excess is refused
//! with `503 store-unavailable` (DESIGN.md §3, "store unreachable or erroring"; `MemoryStore`'s docs: nothing
//! unexpired is evicted), and the process's memory stays bounded.
//!
//! One test in its own binary, so the peak resident set (`VmHWM` in /proc/self/status) is the flood's own. Most
//! keys go through the `Store` trait directly (an HTTP request costs far more than a claim, and the store cannot
//! tell the two apart); some go through an `#[idempotent]` handler to see the answers a client gets.

use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use idem::store::{
    Claimed, Fingerprint, OwnerToken, Record, Store, StoreError, StoreKey, Stored, StoredResponse, Write,
};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The default bounds of `MemoryStore::new()` (its docs and `MemoryStoreBuilder`): the flood tests what a user gets.
const DEFAULT_MAX_ENTRIES: usize = 100_000;
const DEFAULT_MAX_BYTES: usize = 256 << 20;
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(86_400);
/// Distinct keys sent through the `Store` trait in the entry flood; with the HTTP ones, over a million.
const FLOOD_KEYS: usize = 1_000_000;
/// Keys sent as HTTP requests before the flood (stored, so they must still replay once the store is full) and after
/// it (refused).
const HTTP_KEYS_BEFORE: usize = 500;
const HTTP_KEYS_AFTER: usize = 100;

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .map(|kib| kib.trim().parse().expect("a number of kB"))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A store key of the real size (a SHA-256 hex digest), distinct per `index` and per `phase`, made without hashing
/// so the flood measures the store rather than SHA-256 in a debug build.
fn flood_key(phase: u8, index: usize) -> StoreKey {
    StoreKey::from_digest(format!("{phase:02x}{index:062x}"))
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().field(b"POST /orders {\"item\":\"book\",\"qty\":1}").finish()
}

/// What an order handler's answer looks like once stored: a small JSON body and two headers.
fn order_record(body_bytes: usize) -> Record {
    Record {
        fingerprint: fingerprint(),
        stored: Stored::Response(StoredResponse {
            status: 201,
            headers: vec![
                ("content-type".into(), Bytes::from_static(b"application/json")),
                ("location".into(), Bytes::from_static(b"/orders/12345")),
            ],
            body: Bytes::from(vec![b'x'; body_bytes]),
        }),
    }
}

/// How a flood of claims went.
#[derive(Debug, Default)]
struct Tally {
    owned: usize,
    full: usize,
    completed: usize,
    not_replayable: usize,
}

// --- the HTTP side ----------------------------------------------------------------------------------------------

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    runs: Arc<AtomicUsize>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

#[idempotent]
async fn create_order(State(app): State<App>, Json(order): Json<Value>) -> Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "order_id": run, "order": order }))).into_response()
}

async fn send(router: &Router, key: &str) -> (StatusCode, Option<String>, Value, Option<String>) {
    let request = Request::post("/orders")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"item":"book","qty":1}"#))
        .unwrap();
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let text = |name: &str| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
    let (content_type, retry_after) = (text("content-type"), text("retry-after"));
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, content_type, serde_json::from_slice(&body).expect("a JSON body"), retry_after)
}

// --- the flood --------------------------------------------------------------------------------------------------

/// Claims `count` distinct keys of `phase`; completes each claim it gets with `record` (when given) or releases it.
async fn flood(store: &MemoryStore, phase: u8, count: usize, record: Option<&Record>) -> Tally {
    let mut tally = Tally::default();
    let fingerprint = fingerprint();
    for index in 0..count {
        let key = flood_key(phase, index);
        let owner = OwnerToken::generate();
        match store.claim(&key, &fingerprint, &owner, LEASE).await {
            Ok(Claimed::Owned) => tally.owned += 1,
            Err(StoreError::Full(_)) => {
                tally.full += 1;
                continue;
            }
            other => panic!("claim {index} of phase {phase}: {other:?}"),
        }
        let Some(record) = record else {
            assert_eq!(store.release(&key, &owner).await.unwrap(), Write::Applied);
            continue;
        };
        assert_eq!(store.complete(&key, &owner, record, TTL).await.unwrap(), Write::Applied);
        tally.completed += 1;
        let kept = store.claim(&key, &fingerprint, &OwnerToken::generate(), LEASE).await.unwrap();
        if matches!(
            kept,
            Claimed::Existing(idem::store::Entry::Completed(Record { stored: Stored::NotReplayable { .. }, .. }))
        ) {
            tally.not_replayable += 1;
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_distinct_keys_cannot_grow_the_memory_store_past_its_bounds() {
    let started = Instant::now();
    let baseline_kib = status_kib("VmRSS");

    // 1. The entry bound, on the default store, with a small order record per key: a few hundred keys through HTTP,
    // then a million through the trait.
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/orders", post(create_order))
        .with_state(App { idempotency: Idempotency::new(store.clone()), runs: runs.clone() });
    let mut first_answers = Vec::new();
    for index in 0..HTTP_KEYS_BEFORE {
        let (status, _, body, _) = send(&router, &format!("http-before-{index}")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        first_answers.push(body);
    }
    let records = flood(&store, 1, FLOOD_KEYS, Some(&order_record(96))).await;
    let entries_kib = status_kib("VmRSS");
    assert_eq!(
        records.owned,
        DEFAULT_MAX_ENTRIES - HTTP_KEYS_BEFORE,
        "claims taken up to the entry bound: {records:?}"
    );
    assert_eq!(records.full, FLOOD_KEYS - records.owned, "every claim past the bound refused: {records:?}");
    assert_eq!(records.not_replayable, 0, "small records all fit the byte bound: {records:?}");
    assert_eq!(store.len(), DEFAULT_MAX_ENTRIES);
    assert!(store.bytes() <= DEFAULT_MAX_BYTES);

    // A full store refuses new keys with 503 store-unavailable and never runs them; what it holds still replays.
    for index in 0..HTTP_KEYS_AFTER {
        let (status, content_type, body, retry_after) = send(&router, &format!("http-after-{index}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(body["type"], "https://docs.rs/axum-idem/latest/idem/problems/index.html#store-unavailable");
        assert!(retry_after.is_some_and(|seconds| seconds.parse::<u64>().is_ok()), "Retry-After on the 503");
    }
    for (index, first) in first_answers.iter().enumerate().step_by(50) {
        let (status, _, body, _) = send(&router, &format!("http-before-{index}")).await;
        assert_eq!((status, &body), (StatusCode::CREATED, first), "a record kept through the flood replays");
    }
    assert_eq!(runs.load(Ordering::SeqCst), HTTP_KEYS_BEFORE, "no refused request ran its handler");
    assert_eq!(store.len(), DEFAULT_MAX_ENTRIES, "nothing was evicted to make room");
    let entry_flood_kib = entries_kib.saturating_sub(baseline_kib);
    drop(router);
    drop(store);

    // 2. The byte bound: 8 KiB answers into a store allowed 16 MiB. Claims stop once the bytes are spent, and an
    // answer that no longer fits is kept as not-replayable (its retries are refused, never run again).
    let max_bytes = 16 << 20;
    let store = MemoryStore::builder().max_bytes(max_bytes).build();
    let big = flood(&store, 2, 20_000, Some(&order_record(8 << 10))).await;
    assert!(store.bytes() <= max_bytes, "{} bytes held, bound {max_bytes}", store.bytes());
    assert!(big.full > 0 && big.completed > 1_000, "the byte bound, not the entry bound, stopped the flood: {big:?}");
    assert_eq!(big.owned + big.full, 20_000);
    assert_eq!(store.len(), big.owned, "every claim taken is still held (completed)");
    drop(store);

    // 3. Churn: a million distinct keys claimed and released at once (what requests that fail with a 5xx or an
    // extractor rejection do). The store holds nothing afterwards, and must not keep anything for them either.
    let before_churn_kib = status_kib("VmRSS");
    let store = MemoryStore::new();
    let churn = flood(&store, 3, FLOOD_KEYS, None).await;
    assert_eq!((churn.owned, churn.full), (FLOOD_KEYS, 0), "a released key frees its room: {churn:?}");
    assert_eq!(store.len(), 0);
    assert_eq!(store.bytes(), 0);
    let churn_kib = status_kib("VmRSS").saturating_sub(before_churn_kib);
    drop(store);

    let peak_kib = status_kib("VmHWM");
    let elapsed = started.elapsed();
    println!(
        "memory flood: {} keys in {elapsed:.1?}; entry flood {records:?} (+{:.1} MiB resident); byte flood {big:?}; \
         churn of {FLOOD_KEYS} claim+release (+{:.1} MiB resident); baseline {:.1} MiB, peak resident (VmHWM) \
         {:.1} MiB",
        HTTP_KEYS_BEFORE + FLOOD_KEYS + HTTP_KEYS_AFTER + 20_000 + FLOOD_KEYS,
        mib(entry_flood_kib),
        mib(churn_kib),
        mib(baseline_kib),
        mib(peak_kib),
    );
    // The bound: 100 000 held entries take well under 1 KiB each (a 64-byte key twice, a 32-byte owner token or a
    // ~300-byte record, the map and heap slots), so under 100 MiB; the 16 MiB byte flood and the test binary's own
    // few MiB come on top. Unbounded, the million entries alone would need over 250 MiB (two 64-byte keys and a
    // 32-byte token per entry, before any bookkeeping), so 192 MiB tells the two apart with room for allocator
    // slack on a busy machine.
    assert!(mib(peak_kib) < 192.0, "peak resident set {:.1} MiB", mib(peak_kib));
    assert!(mib(churn_kib) < 32.0, "a million released claims left {:.1} MiB resident behind", mib(churn_kib));
}
