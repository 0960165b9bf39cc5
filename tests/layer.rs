//! The router-wide `IdempotencyLayer`: the behaviour table on plain routes, safe methods passing through, and a
//! route both under the layer and annotated being processed once, with the annotation's settings.
//!
//! Each case is a function of the store under test, so it can be run on Redis too; keys are fresh per run.

mod probe;
mod redis_server;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::metrics::Counters;
use idem::store::Store;
use idem::test_kit::Outage;
use idem::{Idempotency, Policy, idempotent, layer::IdempotencyLayer};
use probe::Probe;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceExt};

// --- the app under test ---------------------------------------------------------------------------------------

/// A plain handler: no annotation, so only the layer makes it idempotent.
async fn plain(State(probe): State<Probe>, headers: HeaderMap, body: Bytes) -> Response {
    let run = probe.run(&headers).await;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (StatusCode::CREATED, [("x-run", run.to_string())], Json(json!({ "run": run, "body": body }))).into_response()
}

async fn plain_failing(State(probe): State<Probe>, headers: HeaderMap) -> Response {
    let run = probe.run(&headers).await;
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "run": run }))).into_response()
}

/// Annotated with a long wait (the layer's is zero) and, by default, a required key (the layer's is optional).
#[idempotent(wait_timeout = 3.0)]
async fn annotated(State(probe): State<Probe>, headers: HeaderMap, body: Bytes) -> Response {
    let run = probe.run(&headers).await;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (StatusCode::CREATED, [("x-run", run.to_string())], Json(json!({ "run": run, "body": body }))).into_response()
}

/// Annotated with a one-second ttl (the layer's is a day).
#[idempotent(ttl = 1)]
async fn annotated_short_lived(State(probe): State<Probe>, headers: HeaderMap) -> Response {
    let run = probe.run(&headers).await;
    (StatusCode::CREATED, [("x-run", run.to_string())], Json(json!({ "run": run }))).into_response()
}

/// Annotated at-most-once: its 5xx answers are stored.
#[idempotent(store_server_errors)]
async fn annotated_at_most_once(State(probe): State<Probe>, headers: HeaderMap) -> Response {
    let run = probe.run(&headers).await;
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "run": run }))).into_response()
}

/// Annotated without signature validation: a reused key replays whatever the body.
#[idempotent(validate_signature = false)]
async fn annotated_lenient(State(probe): State<Probe>, headers: HeaderMap, body: Bytes) -> Response {
    let run = probe.run(&headers).await;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (StatusCode::CREATED, Json(json!({ "run": run, "body": body }))).into_response()
}

fn routes() -> Router<Probe> {
    Router::new()
        .route("/plain", post(plain).put(plain).patch(plain).delete(plain).get(plain).head(plain).options(plain))
        .route("/plain/failing", post(plain_failing))
        .route("/annotated", post(annotated))
        .route("/annotated/short-lived", post(annotated_short_lived))
        .route("/annotated/at-most-once", post(annotated_at_most_once))
        .route("/annotated/lenient", post(annotated_lenient))
}

struct TestApp {
    router: Router,
    probe: Probe,
}

impl TestApp {
    /// The routes under `idempotency.layer()` (applied with `Router::layer`, so it sees `MatchedPath`).
    fn new(idempotency: Idempotency) -> Self {
        Self::with_layer(idempotency.layer())
    }

    /// The routes under a layer of the test's own settings.
    fn with_layer(layer: IdempotencyLayer) -> Self {
        let probe = Probe::default();
        let router = routes().layer(layer).with_state(probe.clone());
        Self { router, probe }
    }

    fn with_store(store: impl Store) -> Self {
        Self::new(Idempotency::new(store))
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        Reply::read(self.router.clone().oneshot(request).await.expect("infallible")).await
    }

    fn spawn(&self, request: Request<Body>) -> tokio::task::JoinHandle<Reply> {
        let router = self.router.clone();
        tokio::spawn(async move { Reply::read(router.oneshot(request).await.expect("infallible")).await })
    }
}

// --- requests and replies -------------------------------------------------------------------------------------

fn fresh_key(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("layer-{label}-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn request(method: Method, path: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

fn post_json(path: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    request(Method::POST, path, key, body)
}

fn held(mut request: Request<Body>) -> Request<Body> {
    request.headers_mut().insert("x-hold", "1".parse().unwrap());
    request
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    async fn read(response: Response) -> Self {
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        Self { status: parts.status, headers: parts.headers, body }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The values of header `name`, all of them.
    fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers.get_all(name).iter().map(|value| value.as_bytes()).collect()
    }

    /// A first execution: one echo of the key, one `new`, one signature, no replay marker.
    fn assert_new(&self, key: &str) {
        assert_eq!(self.all("idempotency-key"), [key.as_bytes()], "the key is echoed once");
        assert_eq!(self.all("x-idempotency-status"), [b"new"], "one status header");
        assert_eq!(self.all("x-idempotency-signature").len(), 1, "one signature header");
        assert_eq!(self.all("x-idempotency-signature")[0].len(), 64);
        assert!(self.all("idempotent-replayed").is_empty());
    }

    /// A replay of `original`: its status, body and own headers, each idempotency header once.
    fn assert_replays(&self, original: &Reply, key: &str) {
        assert_eq!(self.status, original.status);
        assert_eq!(self.body, original.body, "replayed byte for byte");
        assert_eq!(self.all("idempotency-key"), [key.as_bytes()]);
        assert_eq!(self.all("x-idempotency-status"), [b"hit"]);
        assert_eq!(self.all("idempotent-replayed"), [b"true"]);
        assert_eq!(self.all("x-idempotency-signature"), original.all("x-idempotency-signature"));
        for name in ["content-type", "x-run"] {
            assert_eq!(self.all(name), original.all(name), "header {name} replayed");
        }
    }

    /// Not touched by the engine: no idempotency header at all.
    fn assert_untouched(&self) {
        for name in ["idempotency-key", "x-idempotency-status", "x-idempotency-signature", "idempotent-replayed"] {
            assert!(self.all(name).is_empty(), "unexpected {name} header");
        }
    }

    fn assert_problem(&self, status: u16, name: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/problem+json");
        assert_eq!(self.json()["type"], format!("https://docs.rs/axum-idem/latest/idem/problems/index.html#{name}"));
    }
}

// --- the layer on plain routes --------------------------------------------------------------------------------

pub async fn layer_runs_a_first_request_once_and_marks_it_new(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("first");
    let reply = app.send(post_json("/plain", Some(&key), &json!({ "item": "book" }))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json(), json!({ "run": 1, "body": { "item": "book" } }));
    assert_eq!(reply.all("x-run"), [b"1"]);
    reply.assert_new(&key);
    assert_eq!(app.probe.runs(), 1);
}

pub async fn layer_replays_a_retry_byte_for_byte(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("replay");
    let first = app.send(post_json("/plain", Some(&key), &json!({ "item": "book" }))).await;
    first.assert_new(&key);
    for _ in 0..2 {
        let retry = app.send(post_json("/plain", Some(&key), &json!({ "item": "book" }))).await;
        retry.assert_replays(&first, &key);
    }
    assert_eq!(app.probe.runs(), 1, "retries never run the handler");
}

pub async fn layer_makes_put_patch_and_delete_idempotent_too(store: impl Store) {
    let app = TestApp::with_store(store);
    for (index, method) in [Method::PUT, Method::PATCH, Method::DELETE].into_iter().enumerate() {
        let key = fresh_key(method.as_str());
        let first = app.send(request(method.clone(), "/plain", Some(&key), &json!({}))).await;
        first.assert_new(&key);
        let retry = app.send(request(method.clone(), "/plain", Some(&key), &json!({}))).await;
        retry.assert_replays(&first, &key);
        assert_eq!(app.probe.runs(), index + 1, "{method} ran once");
    }
}

pub async fn layer_passes_safe_methods_through_untouched(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("safe");
    let mut runs = 0;
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        for _ in 0..2 {
            let reply = app.send(request(method.clone(), "/plain", Some(&key), &json!({}))).await;
            runs += 1;
            assert_eq!(reply.status, StatusCode::CREATED, "{method}");
            reply.assert_untouched();
            assert_eq!(app.probe.runs(), runs, "{method} runs on every request");
        }
    }
}

pub async fn layer_without_a_key_runs_unprotected_by_default(store: impl Store) {
    let app = TestApp::with_store(store);
    for run in 1..=2 {
        let reply = app.send(post_json("/plain", None, &json!({ "item": "book" }))).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.json()["run"], run);
        reply.assert_untouched();
    }
    assert_eq!(app.probe.runs(), 2);
}

pub async fn layer_requires_a_key_when_its_policy_says_so(store: impl Store) {
    let app = TestApp::with_layer(Idempotency::new(store).layer().policy(Policy::new().required(true)));
    let reply = app.send(post_json("/plain", None, &json!({}))).await;
    reply.assert_problem(400, "missing-key");
    assert_eq!(app.probe.runs(), 0);
}

pub async fn layer_refuses_a_malformed_key(store: impl Store) {
    let app = TestApp::with_store(store);
    let reply = app.send(post_json("/plain", Some("caf\u{e9}"), &json!({}))).await;
    reply.assert_problem(400, "invalid-key");
    assert_eq!(app.probe.runs(), 0);
}

pub async fn layer_refuses_a_key_reused_for_another_request(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("reused");
    app.send(post_json("/plain", Some(&key), &json!({ "item": "book" }))).await.assert_new(&key);
    let reused = app.send(post_json("/plain", Some(&key), &json!({ "item": "lamp" }))).await;
    reused.assert_problem(422, "key-reused");
    assert_eq!(app.probe.runs(), 1);
}

pub async fn layer_answers_409_to_a_duplicate_while_the_original_runs(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("in-flight");
    let original = app.spawn(held(post_json("/plain", Some(&key), &json!({}))));
    app.probe.started().await;
    let duplicate = app.send(post_json("/plain", Some(&key), &json!({}))).await;
    duplicate.assert_problem(409, "in-progress");
    assert_eq!(duplicate.headers["retry-after"], "1");
    app.probe.open();
    original.await.unwrap().assert_new(&key);
    assert_eq!(app.probe.runs(), 1);
}

pub async fn layer_does_not_store_a_5xx_and_a_retry_runs_again(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("5xx");
    for run in 1..=2 {
        let reply = app.send(post_json("/plain/failing", Some(&key), &json!({}))).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reply.json(), json!({ "run": run }));
        assert_eq!(app.probe.runs(), run);
    }
}

pub async fn layer_refuses_a_body_over_its_limit_with_413(store: impl Store) {
    let app = TestApp::with_layer(Idempotency::new(store).layer().body_limit(64));
    let key = fresh_key("too-large");
    let reply = app.send(post_json("/plain", Some(&key), &json!({ "padding": "x".repeat(100) }))).await;
    reply.assert_problem(413, "payload-too-large");
    assert_eq!(app.probe.runs(), 0);
    let small = app.send(post_json("/plain", Some(&key), &json!({}))).await;
    small.assert_new(&key);
}

pub async fn layer_fails_closed_when_the_store_is_unreachable(_store: impl Store) {
    let app = TestApp::with_store(Outage);
    let key = fresh_key("outage");
    let reply = app.send(post_json("/plain", Some(&key), &json!({}))).await;
    reply.assert_problem(503, "store-unavailable");
    assert_eq!(reply.headers["retry-after"], "5");
    assert_eq!(app.probe.runs(), 0, "fail closed: the handler does not run");
}

pub async fn layer_fails_open_when_asked(_store: impl Store) {
    let idempotency = Idempotency::builder(Outage).on_store_failure(idem::StoreFailure::FailOpen).build();
    let app = TestApp::new(idempotency);
    let key = fresh_key("fail-open");
    let reply = app.send(post_json("/plain", Some(&key), &json!({}))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    reply.assert_untouched();
    assert_eq!(app.probe.runs(), 1);
}

pub async fn layer_returns_an_inner_service_error_and_releases_the_key(store: impl Store) {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = {
        let calls = calls.clone();
        tower::service_fn(move |_request: axum::extract::Request| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move { if call == 1 { Err(std::io::Error::other("backend down")) } else { Ok(StatusCode::ACCEPTED) } }
        })
    };
    let service = IdempotencyLayer::new(Idempotency::new(store)).layer(service);
    let key = fresh_key("service-error");
    let error = service.clone().oneshot(post_json("/jobs", Some(&key), &json!({}))).await.unwrap_err();
    assert_eq!(error.to_string(), "backend down");
    let response = service.oneshot(post_json("/jobs", Some(&key), &json!({}))).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED, "the key was released: the retry ran");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// --- a route both under the layer and annotated ---------------------------------------------------------------

pub async fn annotated_route_under_the_layer_runs_once_with_one_set_of_headers(store: impl Store) {
    let app = TestApp::with_store(store);
    let key = fresh_key("both");
    let first = app.send(post_json("/annotated", Some(&key), &json!({ "item": "book" }))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json(), json!({ "run": 1, "body": { "item": "book" } }));
    first.assert_new(&key);
    let retry = app.send(post_json("/annotated", Some(&key), &json!({ "item": "book" }))).await;
    retry.assert_replays(&first, &key);
    assert_eq!(app.probe.runs(), 1, "processed once");
}

pub async fn annotated_route_under_the_layer_keeps_the_annotations_ttl(store: impl Store) {
    // The layer would keep records for a day; the annotation says one second.
    let app = TestApp::with_store(store);
    let key = fresh_key("ttl");
    let first = app.send(post_json("/annotated/short-lived", Some(&key), &json!({}))).await;
    first.assert_new(&key);
    app.send(post_json("/annotated/short-lived", Some(&key), &json!({}))).await.assert_replays(&first, &key);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let after = app.send(post_json("/annotated/short-lived", Some(&key), &json!({}))).await;
    after.assert_new(&key);
    assert_eq!(after.json()["run"], 2, "the record expired after the annotation's ttl");
    assert_eq!(app.probe.runs(), 2);
}

pub async fn annotated_route_under_the_layer_keeps_the_annotations_store_server_errors(store: impl Store) {
    // The layer does not store 5xx answers; the annotation does.
    let app = TestApp::with_store(store);
    let key = fresh_key("at-most-once");
    let first = app.send(post_json("/annotated/at-most-once", Some(&key), &json!({}))).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    first.assert_new(&key);
    let retry = app.send(post_json("/annotated/at-most-once", Some(&key), &json!({}))).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.all("x-idempotency-status"), [b"hit"]);
    assert_eq!(app.probe.runs(), 1, "the 5xx was stored: at most once");
}

pub async fn after_first_contact_the_annotations_wait_timeout_applies(store: impl Store) {
    // The layer answers a duplicate 409 at once; the annotation waits up to three seconds.
    let app = TestApp::with_store(store);
    app.send(post_json("/annotated", Some(&fresh_key("contact")), &json!({}))).await;
    let key = fresh_key("wait");
    let original = app.spawn(held(post_json("/annotated", Some(&key), &json!({}))));
    app.probe.started().await;
    let duplicate = app.spawn(post_json("/annotated", Some(&key), &json!({})));
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.probe.open();
    let (original, duplicate) = (original.await.unwrap(), duplicate.await.unwrap());
    original.assert_new(&key);
    duplicate.assert_replays(&original, &key);
    assert_eq!(app.probe.runs(), 2, "the first contact and the original; the duplicate waited");
}

pub async fn after_first_contact_the_annotations_required_applies(store: impl Store) {
    // The layer lets a request without a key through; the annotation requires one.
    let app = TestApp::with_store(store);
    let key = fresh_key("contact");
    app.send(post_json("/annotated", Some(&key), &json!({}))).await.assert_new(&key);
    let reply = app.send(post_json("/annotated", None, &json!({}))).await;
    reply.assert_problem(400, "missing-key");
    assert_eq!(app.probe.runs(), 1);
}

pub async fn after_first_contact_the_annotations_validate_signature_applies(store: impl Store) {
    // The layer refuses a reused key with another body (422); this annotation does not validate signatures.
    let app = TestApp::with_store(store);
    let key = fresh_key("lenient");
    let first = app.send(post_json("/annotated/lenient", Some(&key), &json!({ "item": "book" }))).await;
    first.assert_new(&key);
    let reused = app.send(post_json("/annotated/lenient", Some(&key), &json!({ "item": "lamp" }))).await;
    assert_eq!(reused.status, StatusCode::CREATED);
    assert_eq!(reused.body, first.body, "the original's answer, not a 422");
    assert_eq!(reused.all("x-idempotency-status"), [b"hit"]);
    assert_eq!(app.probe.runs(), 1);
}

pub async fn before_first_contact_the_layers_body_limit_applies_and_after_it_axums(store: impl Store) {
    let app = TestApp::with_layer(Idempotency::new(store).layer().body_limit(64));
    let large = json!({ "padding": "x".repeat(100) });
    let refused = app.send(post_json("/annotated", Some(&fresh_key("large")), &large)).await;
    refused.assert_problem(413, "payload-too-large");
    assert_eq!(app.probe.runs(), 0, "the layer refused it before the handler was reached");
    let key = fresh_key("contact");
    app.send(post_json("/annotated", Some(&key), &json!({}))).await.assert_new(&key);
    let key = fresh_key("large-after");
    let accepted = app.send(post_json("/annotated", Some(&key), &large)).await;
    accepted.assert_new(&key);
    assert_eq!(app.probe.runs(), 2, "after first contact the route is the annotation's: axum's 2 MiB limit");
}

pub async fn layer_wrapping_a_whole_router_hands_its_claim_to_the_annotation(store: impl Store) {
    // From outside the router there is no `MatchedPath`, so no registry: every request goes through the handoff.
    let probe = Probe::default();
    let router = routes().with_state(probe.clone());
    let service = Idempotency::new(store).layer().layer(router);
    let key = fresh_key("outside");
    let send = |request| {
        let service = service.clone();
        async move { Reply::read(service.oneshot(request).await.unwrap()).await }
    };
    let first = send(post_json("/annotated/at-most-once", Some(&key), &json!({}))).await;
    first.assert_new(&key);
    for _ in 0..2 {
        let retry = send(post_json("/annotated/at-most-once", Some(&key), &json!({}))).await;
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.all("x-idempotency-status"), [b"hit"]);
        assert_eq!(retry.all("idempotency-key"), [key.as_bytes()]);
    }
    assert_eq!(probe.runs(), 1);
}

pub async fn nested_layers_process_a_request_once(store: impl Store) {
    // The layer on a nested router and again on the router around it: the outer one claims, the inner one defers.
    let counters = Arc::new(Counters::new());
    let idempotency = Idempotency::builder(store).metrics(counters.clone()).build();
    let probe = Probe::default();
    let router = Router::new()
        .nest("/api", routes().layer(idempotency.layer()))
        .layer(idempotency.layer())
        .with_state(probe.clone());
    let key = fresh_key("nested");
    let send = |request| {
        let router = router.clone();
        async move { Reply::read(router.oneshot(request).await.unwrap()).await }
    };
    let first = send(post_json("/api/plain", Some(&key), &json!({}))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    first.assert_new(&key);
    send(post_json("/api/plain", Some(&key), &json!({}))).await.assert_replays(&first, &key);
    assert_eq!(probe.runs(), 1);
    let counts = counters.snapshot();
    assert_eq!((counts.new, counts.hit), (1, 1), "one claim and one record, not one per layer");
}

pub async fn annotated_route_in_a_nested_router_keeps_one_record_across_first_contact(store: impl Store) {
    // The nested router strips `/api` from the URI its handlers see; the layer outside sees the full path. Both
    // doors must derive the same key, or the retry after first contact would run the handler again.
    let idempotency = Idempotency::new(store);
    let probe = Probe::default();
    let router = Router::new().nest("/api", routes()).layer(idempotency.layer()).with_state(probe.clone());
    let key = fresh_key("nested-annotated");
    let send = |request| {
        let router = router.clone();
        async move { Reply::read(router.oneshot(request).await.unwrap()).await }
    };
    let first = send(post_json("/api/annotated", Some(&key), &json!({}))).await;
    first.assert_new(&key);
    let retry = send(post_json("/api/annotated", Some(&key), &json!({}))).await;
    retry.assert_replays(&first, &key);
    assert_eq!(probe.runs(), 1);
}

// --- two apps on one store (two processes) ----------------------------------------------------------------------

#[tokio::test]
async fn each_app_on_a_shared_store_has_its_own_first_contact_and_the_layers_policy_until_then() {
    // Two apps on one store stand for two processes: each router has its own layer registries.
    let store = Arc::new(idem::MemoryStore::new());
    let first = TestApp::with_store(store.clone());
    let key = fresh_key("shared");
    let original = first.send(post_json("/annotated/lenient", Some(&key), &json!({ "item": "book" }))).await;
    original.assert_new(&key);
    let lamp = || post_json("/annotated/lenient", Some(&key), &json!({ "item": "lamp" }));
    // The first app has had its first contact: the annotation's policy (no signature check) replays.
    let reused = first.send(lamp()).await;
    assert_eq!((reused.status, &reused.body), (StatusCode::CREATED, &original.body));
    assert_eq!(reused.all("x-idempotency-status"), [b"hit"]);

    // A fresh app has not: its layer claims the route's requests with the layer's policy, which checks signatures.
    // Its store cannot tell it the route is annotated *here* (see the layer docs), so this is the documented rule.
    let second = TestApp::with_store(store.clone());
    second.send(lamp()).await.assert_problem(422, "key-reused");
    let contact = fresh_key("contact");
    second.send(post_json("/annotated/lenient", Some(&contact), &json!({}))).await.assert_new(&contact);
    let after = second.send(lamp()).await;
    assert_eq!((after.status, &after.body), (StatusCode::CREATED, &original.body), "after its own first contact");
    assert_eq!(after.all("x-idempotency-status"), [b"hit"]);
    assert_eq!((first.probe.runs(), second.probe.runs()), (1, 1), "the original and the second app's contact");
}

#[tokio::test]
async fn a_record_an_annotated_handler_wrote_never_lets_a_retry_through_to_a_plain_handler() {
    // One version of an app annotates the route; the next serves it with a plain handler under the layer (a rolling
    // deploy, or two apps on one store). A record the annotated handler wrote must not make the layer pass a retry
    // through: the plain handler would run it again.
    let store = Arc::new(idem::MemoryStore::new());
    let annotated = TestApp::with_store(store.clone());
    let key = fresh_key("redeployed");
    let body = json!({ "item": "book" });
    let original = annotated.send(post_json("/annotated/lenient", Some(&key), &body)).await;
    original.assert_new(&key);

    let probe = Probe::default();
    let plain_app = Router::new()
        .route("/annotated/lenient", post(plain))
        .layer(Idempotency::new(store.clone()).layer())
        .with_state(probe.clone());
    let send = |request| {
        let router = plain_app.clone();
        async move { Reply::read(router.oneshot(request).await.unwrap()).await }
    };
    for _ in 0..2 {
        let retry = send(post_json("/annotated/lenient", Some(&key), &body)).await;
        assert_eq!((retry.status, &retry.body), (StatusCode::CREATED, &original.body));
        assert_eq!(retry.all("x-idempotency-status"), [b"hit"]);
    }
    // The layer's own policy, not the record's maker's: it checks signatures.
    send(post_json("/annotated/lenient", Some(&key), &json!({ "item": "lamp" })))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!((annotated.probe.runs(), probe.runs()), (1, 0), "the plain handler never ran");
}

// --- the suite ----------------------------------------------------------------------------------------------

/// Every case above as a `#[tokio::test]`, in a module `$name`, each on a store made by `$store` (an async closure):
/// `layer_cases!(redis, || async { make_redis_store().await });` runs them on another store.
macro_rules! layer_cases {
    ($name:ident, $store:expr) => {
        mod $name {
            layer_cases!(@each $store,
            layer_runs_a_first_request_once_and_marks_it_new,
            layer_replays_a_retry_byte_for_byte,
            layer_makes_put_patch_and_delete_idempotent_too,
            layer_passes_safe_methods_through_untouched,
            layer_without_a_key_runs_unprotected_by_default,
            layer_requires_a_key_when_its_policy_says_so,
            layer_refuses_a_malformed_key,
            layer_refuses_a_key_reused_for_another_request,
            layer_answers_409_to_a_duplicate_while_the_original_runs,
            layer_does_not_store_a_5xx_and_a_retry_runs_again,
            layer_refuses_a_body_over_its_limit_with_413,
            layer_fails_closed_when_the_store_is_unreachable,
            layer_fails_open_when_asked,
            layer_returns_an_inner_service_error_and_releases_the_key,
            annotated_route_under_the_layer_runs_once_with_one_set_of_headers,
            annotated_route_under_the_layer_keeps_the_annotations_ttl,
            annotated_route_under_the_layer_keeps_the_annotations_store_server_errors,
            after_first_contact_the_annotations_wait_timeout_applies,
            after_first_contact_the_annotations_required_applies,
            after_first_contact_the_annotations_validate_signature_applies,
            before_first_contact_the_layers_body_limit_applies_and_after_it_axums,
            layer_wrapping_a_whole_router_hands_its_claim_to_the_annotation,
            nested_layers_process_a_request_once,
            annotated_route_in_a_nested_router_keeps_one_record_across_first_contact,
            );
        }
    };
    (@each $store:expr, $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store = ($store)().await;
                super::$case(store).await;
            }
        )*
    };
}

layer_cases!(memory, || async { idem::MemoryStore::new() });
layer_cases!(redis, crate::redis_server::shared_node_store);
