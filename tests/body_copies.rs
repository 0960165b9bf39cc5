//! How many times a request carrying a 1 MiB body, and its 1 MiB answer, are copied on the way through the engine:
//! a counting global allocator measures the bytes allocated per request (a copy of a body is an allocation of its
//! size). The engine buffers the request body once (to fingerprint it; the handler gets that buffer) and keeps the
//! response body it buffered for the record without copying it, so a first request and a replay each allocate
//! about one body, not two or three.
//!
//! On Redis the record is also serialised (JSON, once, into a buffer sized up front) and handed to the Redis
//! client, which copies it three times more on the way out (into its command, into a packed pipeline, into the
//! socket's buffer) and, on a replay, grows its read buffer to the record's size (0.5 + 1 + 2 MiB here) and copies
//! the record out of it before the decoder copies the body once. The bounds below pin those counts, so that a copy
//! added on our side shows.
//!
//! The allocator counts every thread, so this binary holds one test, run on a current-thread runtime.

mod redis_server;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::store::Store;
use idem::{Idempotency, MemoryStore, RedisStore, idempotent};
use redis_server::RedisServer;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use tower::ServiceExt;

/// The system allocator, counting the bytes it hands out (a reallocation counts its new size: it may copy).
struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// Answers with the request body itself: whatever the handler adds is not copied either.
#[idempotent(ttl = 60)]
async fn echo(State(_): State<Idempotency>, body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

fn app(store: impl Store) -> Router {
    let idempotency = Idempotency::builder(store).max_record_bytes(4 * MIB).build();
    Router::new().route("/echo", post(echo)).with_state(idempotency)
}

/// A 1 MiB text body arriving in 64 KiB chunks, as a server hands a body over: slices of one buffer, so making
/// the request allocates nothing body-sized.
fn request(body: &Bytes, key: &str) -> Request<Body> {
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..body.len())
        .step_by(64 << 10)
        .map(|start| Ok(body.slice(start..(start + (64 << 10)).min(body.len()))))
        .collect();
    Request::post("/echo")
        .header("idempotency-key", key)
        .header("content-length", body.len())
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// Sends one request and returns the bytes allocated while it was answered, and how it was answered.
async fn allocated_by(app: &Router, body: &Bytes, key: &str) -> (usize, String) {
    let request = request(body, key);
    let before = ALLOCATED.load(Ordering::Relaxed);
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let state = response.headers()["x-idempotency-status"].to_str().unwrap().to_owned();
    // The answer arrives in one piece, so reading it copies nothing either.
    let answered = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let allocated = (ALLOCATED.load(Ordering::Relaxed) - before) as usize;
    assert!(answered == *body, "the echo answers the body byte for byte");
    (allocated, state)
}

#[test]
fn a_body_is_copied_at_most_once_per_request() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body = Bytes::from(b"0123456789abcdef".repeat(MIB / 16));
    runtime.block_on(async {
        let memory = app(MemoryStore::new());
        // Warms lazily made state up (the router, the tracing callsites) so it is not counted.
        allocated_by(&memory, &Bytes::from_static(b"warm-up"), "warm-up").await;

        let (first, state) = allocated_by(&memory, &body, "big").await;
        assert_eq!(state, "new");
        let (replay, state) = allocated_by(&memory, &body, "big").await;
        assert_eq!(state, "hit");
        eprintln!("MemoryStore: first request {first} bytes, replay {replay} bytes, for a {MIB}-byte body");
        // The request body, buffered once; the response body and the record share it.
        assert!(first < MIB + MIB / 8, "first request: {first} bytes allocated for a {MIB}-byte body");
        // The replayed request's body, buffered once to fingerprint it; the replay shares the record's body.
        assert!(replay < MIB + MIB / 8, "replay: {replay} bytes allocated for a {MIB}-byte body");

        let server = RedisServer::start();
        let redis = app(RedisStore::open(server.url()).await.unwrap());
        allocated_by(&redis, &Bytes::from_static(b"warm-up"), "warm-up").await;
        allocated_by(&redis, &Bytes::from_static(b"warm-up"), "warm-up").await;
        let (first, state) = allocated_by(&redis, &body, "big").await;
        assert_eq!(state, "new");
        let (replay, state) = allocated_by(&redis, &body, "big").await;
        assert_eq!(state, "hit");
        eprintln!("RedisStore: first request {first} bytes, replay {replay} bytes, for a {MIB}-byte body");
        // The request body, the JSON record, the Redis client's three copies (5.2 bodies; 10 before the encoder
        // borrowed the body and sized its buffers).
        assert!(first < 6 * MIB, "first request on Redis: {first} bytes");
        // The request body, the Redis client's read buffer (3.5) and its copy of the record, the decoded body (7).
        assert!(replay < 8 * MIB, "replay on Redis: {replay} bytes");
    });
}
