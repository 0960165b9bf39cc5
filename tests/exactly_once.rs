//! Regression tests for the ways a review found to run a handler twice, to block a key with nobody running it, or to
//! stall a handler: each case failed on the code before its fix. They run on `MemoryStore` (under paused time where
//! leases are involved, so a 100 s handler takes no real time) and, through `test_kit::Faulty`, on a store that loses
//! replies or hangs, which no real backend can be asked to do on cue.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::store::Store;
use idem::test_kit::{Fault, Faulty, Operation};
use idem::{Idempotency, MemoryStore, Policy, StoreFailure, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// How many times handler bodies ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn count(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

struct Reply {
    status: StatusCode,
    idempotency_status: Option<String>,
    body: Bytes,
}

impl Reply {
    async fn read(response: Response) -> Self {
        let status = response.status();
        let idempotency_status =
            response.headers().get("x-idempotency-status").map(|value| value.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        Self { status, idempotency_status, body }
    }

    fn problem(&self) -> String {
        let body: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        body["type"].as_str().unwrap_or_default().to_owned()
    }
}

fn post_json(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method("POST").uri(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

fn send<S>(service: &S, request: Request<Body>) -> impl Future<Output = Reply> + Send + 'static
where
    S: tower::Service<Request<Body>, Response = Response, Error = std::convert::Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let service = service.clone();
    async move { Reply::read(service.oneshot(request).await.unwrap()).await }
}

// --- 1. the layer's handoff never leaves the key unowned ----------------------------------------------------------

/// Runs 100 s under a 150 s lease, much longer than the layer's default 30 s lease.
#[idempotent(lease = 150, ttl = 600)]
async fn long_lease(State(runs): State<Runs>) -> impl IntoResponse {
    let run = runs.count();
    tokio::time::sleep(Duration::from_secs(100)).await;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

/// Runs 100 s under a 5 s lease, much shorter than the layer's.
#[idempotent(lease = 5, ttl = 600)]
async fn short_lease(State(runs): State<Runs>) -> impl IntoResponse {
    let run = runs.count();
    tokio::time::sleep(Duration::from_secs(100)).await;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

/// The original runs 100 s; duplicates sent at 45 s and 95 s must find it in flight (409), and the retry after it
/// finished gets its stored answer: one execution.
async fn handoff_keeps_the_key_owned<S>(service: S, runs: &Runs, path: &str)
where
    S: tower::Service<Request<Body>, Response = Response, Error = std::convert::Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let begin = Instant::now();
    let original = tokio::spawn({
        let service = service.clone();
        let request = post_json(path, Some("order-1"), "{}");
        async move { send(&service, request).await }
    });
    for at in [45, 95] {
        tokio::time::sleep_until(begin + Duration::from_secs(at)).await;
        let duplicate = send(&service, post_json(path, Some("order-1"), "{}")).await;
        assert_eq!(duplicate.status, StatusCode::CONFLICT, "duplicate at {at} s: the key must still be owned");
        assert_eq!(duplicate.problem(), "https://docs.rs/axum-idem/latest/idem/problems/index.html#in-progress");
    }
    let original = original.await.unwrap();
    assert_eq!((original.status, original.idempotency_status.as_deref()), (StatusCode::CREATED, Some("new")));
    let retry = send(&service, post_json(path, Some("order-1"), "{}")).await;
    assert_eq!(retry.idempotency_status.as_deref(), Some("hit"));
    assert_eq!(retry.body, original.body);
    assert_eq!(runs.get(), 1, "the handler ran once");
}

#[tokio::test(start_paused = true)]
async fn a_layer_wrapping_the_router_hands_over_a_longer_lease_without_a_gap() {
    let runs = Runs::default();
    let router = Router::new().route("/orders", post(long_lease)).with_state(runs.clone());
    let service = Idempotency::new(MemoryStore::new()).layer().layer(router);
    handoff_keeps_the_key_owned(service, &runs, "/orders").await;
}

#[tokio::test(start_paused = true)]
async fn a_layer_on_the_router_hands_over_a_longer_lease_on_first_contact_without_a_gap() {
    let runs = Runs::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let router = Router::new().route("/orders", post(long_lease)).layer(idempotency.layer()).with_state(runs.clone());
    handoff_keeps_the_key_owned(router, &runs, "/orders").await;
}

#[tokio::test(start_paused = true)]
async fn a_layer_hands_over_a_shorter_lease_and_it_is_renewed() {
    let runs = Runs::default();
    let router = Router::new().route("/orders", post(short_lease)).with_state(runs.clone());
    let service = Idempotency::new(MemoryStore::new()).layer().layer(router);
    handoff_keeps_the_key_owned(service, &runs, "/orders").await;
}

// --- 5. a claim whose reply is lost ---------------------------------------------------------------------------

#[idempotent(ttl = 600)]
async fn order(State(runs): State<Runs>) -> impl IntoResponse {
    (StatusCode::CREATED, Json(json!({ "run": runs.count() })))
}

fn orders(store: impl Store, runs: &Runs) -> Router {
    Router::new().route("/orders", post(order)).with_state(runs.clone()).layer(axum::Extension(Idempotency::new(store)))
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_reply_was_lost_is_released_so_the_retry_runs_at_once() {
    let runs = Runs::default();
    let flaky = Faulty::new(MemoryStore::new());
    flaky.inject_times(Operation::Claim, Fault::LostReply, 1);
    let app = orders(flaky, &runs);
    let first = send(&app, post_json("/orders", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.get(), 0, "nothing ran on a failed claim");
    // Let the background release land; far less than the 30 s lease.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let retry = send(&app, post_json("/orders", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "not 409 for a lease that nobody runs: {:?}", retry.body);
    assert_eq!(retry.idempotency_status.as_deref(), Some("new"));
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_resent_claim_is_recognised_as_the_callers_own() {
    let runs = Runs::default();
    let flaky = Faulty::new(MemoryStore::new());
    flaky.inject(Operation::Claim, Fault::Resent);
    let app = orders(flaky, &runs);
    let first = send(&app, post_json("/orders", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "the resent claim did not conflict with itself: {:?}", first.body);
    assert_eq!(runs.get(), 1);
    let retry = send(&app, post_json("/orders", Some("k"), "{}")).await;
    assert_eq!(retry.idempotency_status.as_deref(), Some("hit"));
    assert_eq!(runs.get(), 1);
}

// --- 6. renewal runs beside the handler -----------------------------------------------------------------------

#[idempotent(lease = 3, ttl = 600)]
async fn ten_seconds(State(runs): State<Runs>) -> impl IntoResponse {
    let run = runs.count();
    tokio::time::sleep(Duration::from_secs(10)).await;
    (StatusCode::CREATED, Json(json!({ "run": run })))
}

#[tokio::test(start_paused = true)]
async fn a_hanging_renewal_does_not_hold_the_handler_up() {
    let runs = Runs::default();
    let flaky = Faulty::new(MemoryStore::new());
    flaky.inject(Operation::Renew, Fault::Hang);
    let app = Router::new()
        .route("/slow", post(ten_seconds))
        .with_state(runs.clone())
        .layer(axum::Extension(Idempotency::new(flaky)));
    let started = Instant::now();
    let reply = send(&app, post_json("/slow", Some("k"), "{}")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::CREATED);
    // 10 s of work, plus at most one renewal period (1 s) for a hanging renewal to be given up.
    assert!(took < Duration::from_secs(12), "the handler was frozen behind a renewal: {took:?}");
    assert_eq!(runs.get(), 1);
}

// --- 7. the layer stores only what a handler answered ------------------------------------------------------------

async fn plain_json(State(runs): State<Runs>, Json(body): Json<Value>) -> impl IntoResponse {
    (StatusCode::CREATED, Json(json!({ "run": runs.count(), "body": body })))
}

async fn declined(State(runs): State<Runs>) -> impl IntoResponse {
    (StatusCode::PAYMENT_REQUIRED, Json(json!({ "run": runs.count(), "declined": true })))
}

/// A rate limiter inside the layer that refuses the first request it sees.
async fn refuse_first(
    State(seen): State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
        return StatusCode::TOO_MANY_REQUESTS.into_response();
    }
    next.run(request).await
}

fn layered(runs: &Runs) -> Router {
    let limiter = axum::middleware::from_fn_with_state(Arc::new(AtomicUsize::new(0)), refuse_first);
    Router::new()
        .route("/plain", post(plain_json))
        .route("/declined", post(declined))
        .route("/limited", post(plain_json).layer(limiter))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()).layer())
}

#[tokio::test]
async fn the_layer_does_not_store_an_extractors_rejection() {
    let runs = Runs::default();
    let app = layered(&runs);
    let malformed = send(&app, post_json("/plain", Some("k"), "{not json")).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let again = send(&app, post_json("/plain", Some("k"), "{not json")).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_ne!(again.idempotency_status.as_deref(), Some("hit"), "a rejection is never replayed");
    let corrected = send(&app, post_json("/plain", Some("k"), r#"{"item":"book"}"#)).await;
    assert_eq!(corrected.status, StatusCode::CREATED, "the key is not dead: {:?}", corrected.body);
    assert_eq!(corrected.idempotency_status.as_deref(), Some("new"));
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_layer_does_not_store_a_middlewares_429_or_a_routing_404() {
    let runs = Runs::default();
    let app = layered(&runs);
    let limited = send(&app, post_json("/limited", Some("k"), "{}")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let retry = send(&app, post_json("/limited", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "the stored 429 would block the key: {:?}", retry.body);
    assert_eq!(runs.get(), 1);

    let outside = Idempotency::new(MemoryStore::new())
        .layer()
        .layer(Router::new().route("/plain", post(plain_json)).with_state(runs.clone()));
    for _ in 0..2 {
        let missing = send(&outside, post_json("/nowhere", Some("k"), "{}")).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_ne!(missing.idempotency_status.as_deref(), Some("hit"));
    }
}

#[tokio::test]
async fn the_layer_still_stores_a_handlers_own_final_4xx() {
    let runs = Runs::default();
    let app = layered(&runs);
    let declined = send(&app, post_json("/declined", Some("k"), "{}")).await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    let retry = send(&app, post_json("/declined", Some("k"), "{}")).await;
    assert_eq!(retry.idempotency_status.as_deref(), Some("hit"));
    assert_eq!(retry.body, declined.body);
    assert_eq!(runs.get(), 1);
}

// --- 8. the layer's registry of annotated routes is scoped to the route ------------------------------------------

#[tokio::test]
async fn an_annotation_in_one_router_leaves_another_routers_same_route_protected() {
    let idempotency = Idempotency::new(MemoryStore::new());
    let (annotated_runs, plain_runs) = (Runs::default(), Runs::default());
    let annotated =
        Router::new().route("/orders", post(order)).with_state(annotated_runs.clone()).layer(idempotency.layer());
    let plain =
        Router::new().route("/orders", post(plain_json)).with_state(plain_runs.clone()).layer(idempotency.layer());
    // First contact with the annotated route of the first router.
    assert_eq!(send(&annotated, post_json("/orders", Some("a"), "{}")).await.status, StatusCode::CREATED);
    // The second router's plain route is still the layer's.
    let first = send(&plain, post_json("/orders", Some("tenant-2"), "{}")).await;
    let retry = send(&plain, post_json("/orders", Some("tenant-2"), "{}")).await;
    assert_eq!(first.idempotency_status.as_deref(), Some("new"));
    assert_eq!(retry.idempotency_status.as_deref(), Some("hit"));
    assert_eq!(plain_runs.get(), 1, "the plain route ran once");
}

// --- 9. unprotected runs are detached and panic-safe; corrupt records are not outages; policies saturate -----------

async fn panics(State(runs): State<Runs>) -> &'static str {
    runs.count();
    panic!("the handler failed");
}

async fn slow_effect(State(runs): State<Runs>) -> &'static str {
    tokio::time::sleep(Duration::from_secs(5)).await;
    runs.count();
    "done"
}

#[tokio::test]
async fn a_panic_without_a_key_or_under_fail_open_is_a_500_problem() {
    let runs = Runs::default();
    let fail_open = Idempotency::builder(idem::test_kit::Outage).on_store_failure(StoreFailure::FailOpen).build();
    for (idempotency, key) in [(Idempotency::new(MemoryStore::new()), None), (fail_open, Some("k"))] {
        let app = Router::new().route("/panics", post(panics)).with_state(runs.clone()).layer(idempotency.layer());
        let reply = send(&app, post_json("/panics", key, "{}")).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reply.problem(), "https://docs.rs/axum-idem/latest/idem/problems/index.html#handler-panicked");
    }
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_runs_to_its_end_when_the_client_disconnects() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/slow", post(slow_effect))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()).layer());
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_json("/slow", None, "{}")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    request.abort();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(runs.get(), 1, "the handler was not cancelled halfway by the disconnect");
}

#[tokio::test]
async fn a_corrupt_record_is_a_problem_even_under_fail_open() {
    let runs = Runs::default();
    let flaky = Faulty::new(MemoryStore::new());
    flaky.inject(Operation::Claim, Fault::Corrupt);
    let idempotency = Idempotency::builder(flaky).on_store_failure(StoreFailure::FailOpen).build();
    let app = Router::new().route("/orders", post(order)).with_state(runs.clone()).layer(axum::Extension(idempotency));
    let reply = send(&app, post_json("/orders", Some("k"), "{}")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.problem(), "https://docs.rs/axum-idem/latest/idem/problems/index.html#corrupt-record");
    assert_eq!(runs.get(), 0, "fail-open does not run a handler over a record it cannot read");
}

#[tokio::test]
async fn extreme_policy_durations_saturate_instead_of_panicking() {
    let idempotency = Idempotency::in_memory();
    let policy = Policy::new().ttl(Duration::MAX).lease(Duration::MAX).wait_timeout(Duration::MAX);
    assert!(policy.get_ttl() < Duration::MAX && policy.get_lease() >= Duration::from_secs(86_400 * 365));
    let tiny = Policy::new().ttl(Duration::ZERO).lease(Duration::ZERO);
    assert!(tiny.get_lease() > Duration::ZERO && tiny.get_ttl() > Duration::ZERO);
    for policy in [policy, tiny] {
        let ran = idempotency.once("jobs", "extreme").policy(policy).run(&1, || async { Ok::<_, std::io::Error>(7) });
        assert_eq!(ran.await.unwrap(), 7);
    }
}
