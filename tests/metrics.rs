//! Observability: the counters move as the behaviour table says (new, hit, conflict, mismatch, store errors,
//! fenced writes, wait time), through every front door, and each request runs in a `tracing` span that names its
//! key digest, outcome and wait.
//!
//! Each case is a function of the store under test, so it can be run on Redis too; keys are fresh per run.

mod probe;
mod redis_server;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idem::metrics::{Counters, Snapshot, WAIT_BUCKETS};
use idem::store::{Store, Write};
use idem::test_kit::{Fault, Faulty, Operation, Outage};
use idem::{Idempotency, Policy, idempotent, once::OnceError};
use probe::Probe;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

// --- the app under test ---------------------------------------------------------------------------------------

async fn order(probe: &Probe, headers: &HeaderMap) -> Response {
    let run = probe.run(headers).await;
    (StatusCode::CREATED, Json(json!({ "order_id": run }))).into_response()
}

#[idempotent]
async fn orders(State(probe): State<Probe>, headers: HeaderMap, _body: Bytes) -> Response {
    order(&probe, &headers).await
}

#[idempotent(wait_timeout = 3.0)]
async fn orders_patient(State(probe): State<Probe>, headers: HeaderMap, _body: Bytes) -> Response {
    order(&probe, &headers).await
}

#[idempotent(wait_timeout = 0.3)]
async fn orders_impatient(State(probe): State<Probe>, headers: HeaderMap, _body: Bytes) -> Response {
    order(&probe, &headers).await
}

async fn plain(State(probe): State<Probe>, headers: HeaderMap) -> Response {
    order(&probe, &headers).await
}

struct TestApp {
    router: Router,
    probe: Probe,
    counters: Arc<Counters>,
}

impl TestApp {
    /// Annotated routes (the engine installed with `Extension`) and, under `/layered`, the same routes plus a
    /// plain one under the layer.
    fn new(store: impl Store) -> Self {
        let counters = Arc::new(Counters::new());
        let idempotency = Idempotency::builder(store).metrics(counters.clone()).build();
        Self::with(idempotency, counters)
    }

    fn with(idempotency: Idempotency, counters: Arc<Counters>) -> Self {
        let probe = Probe::default();
        let annotated = Router::new()
            .route("/orders", post(orders))
            .route("/orders/patient", post(orders_patient))
            .route("/orders/impatient", post(orders_impatient))
            .route("/traced", post(orders));
        let layered = Router::new()
            .route("/orders", post(orders))
            .route("/plain", post(plain).get(plain))
            .layer(idempotency.layer());
        let router = annotated.layer(Extension(idempotency)).nest("/layered", layered).with_state(probe.clone());
        Self { router, probe, counters }
    }

    async fn send(&self, request: Request<Body>) -> Response {
        self.router.clone().oneshot(request).await.expect("infallible")
    }

    fn spawn(&self, request: Request<Body>) -> tokio::task::JoinHandle<Response> {
        let router = self.router.clone();
        tokio::spawn(async move { router.oneshot(request).await.expect("infallible") })
    }

    fn counts(&self) -> Snapshot {
        self.counters.snapshot()
    }
}

fn fresh_key(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("metrics-{label}-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn post_json(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method(Method::POST).uri(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

fn held(mut request: Request<Body>) -> Request<Body> {
    request.headers_mut().insert("x-hold", "1".parse().unwrap());
    request
}

/// `(new, hit, conflict, mismatch, store_errors, fenced)`.
fn counts(snapshot: Snapshot) -> (u64, u64, u64, u64, u64, u64) {
    (snapshot.new, snapshot.hit, snapshot.conflict, snapshot.mismatch, snapshot.store_errors, snapshot.fenced)
}

// --- the counters, row by row ---------------------------------------------------------------------------------

pub async fn a_first_request_counts_new(store: impl Store) {
    let app = TestApp::new(store);
    let response = app.send(post_json("/orders", Some(&fresh_key("new")), "{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(counts(app.counts()), (1, 0, 0, 0, 0, 0));
    assert_eq!(app.counts().wait.count, 0, "nothing waited");
}

pub async fn a_replay_counts_hit(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("hit");
    for _ in 0..3 {
        assert_eq!(app.send(post_json("/orders", Some(&key), "{}")).await.status(), StatusCode::CREATED);
    }
    assert_eq!(counts(app.counts()), (1, 2, 0, 0, 0, 0));
    assert_eq!(app.probe.runs(), 1);
}

pub async fn a_duplicate_in_flight_counts_conflict_without_a_wait(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("conflict");
    let original = app.spawn(held(post_json("/orders", Some(&key), "{}")));
    app.probe.started().await;
    assert_eq!(app.send(post_json("/orders", Some(&key), "{}")).await.status(), StatusCode::CONFLICT);
    app.probe.open();
    assert_eq!(original.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(counts(app.counts()), (1, 0, 1, 0, 0, 0));
    assert_eq!(app.counts().wait.count, 0, "wait_timeout = 0: the duplicate did not wait");
}

pub async fn a_key_reused_for_another_request_counts_mismatch(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("mismatch");
    app.send(post_json("/orders", Some(&key), r#"{"item":"book"}"#)).await;
    let reused = app.send(post_json("/orders", Some(&key), r#"{"item":"lamp"}"#)).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counts(app.counts()), (1, 0, 0, 1, 0, 0));
}

pub async fn a_store_failure_counts_a_store_error(_store: impl Store) {
    let app = TestApp::new(Outage);
    let response = app.send(post_json("/orders", Some(&fresh_key("outage")), "{}")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counts(app.counts()), (0, 0, 0, 0, 1, 0));
    assert_eq!(app.probe.runs(), 0);
}

pub async fn a_duplicate_that_waits_for_the_original_observes_its_wait_and_counts_hit(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("wait");
    let original = app.spawn(held(post_json("/orders/patient", Some(&key), "{}")));
    app.probe.started().await;
    let duplicate = app.spawn(post_json("/orders/patient", Some(&key), "{}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.probe.open();
    assert_eq!(original.await.unwrap().status(), StatusCode::CREATED);
    let duplicate = duplicate.await.unwrap();
    assert_eq!(duplicate.headers()["x-idempotency-status"], "hit");
    let snapshot = app.counts();
    assert_eq!(counts(snapshot), (1, 1, 0, 0, 0, 0));
    assert_eq!(snapshot.wait.count, 1);
    assert!(snapshot.wait.sum >= Duration::from_millis(100), "waited {:?}", snapshot.wait.sum);
    assert!(snapshot.wait.sum < Duration::from_secs(3), "woken by the completion, not the timeout");
    let bucket = WAIT_BUCKETS.iter().position(|bound| snapshot.wait.sum <= *bound).unwrap_or(WAIT_BUCKETS.len());
    assert_eq!(snapshot.wait.buckets[bucket], 1, "the wait is in the bucket that holds it: {snapshot:?}");
    assert_eq!(snapshot.wait.buckets.iter().sum::<u64>(), 1);
}

pub async fn a_duplicate_that_times_out_counts_conflict_and_observes_its_wait(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("timeout");
    let original = app.spawn(held(post_json("/orders/impatient", Some(&key), "{}")));
    app.probe.started().await;
    let duplicate = app.send(post_json("/orders/impatient", Some(&key), "{}")).await;
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    app.probe.open();
    original.await.unwrap();
    let snapshot = app.counts();
    assert_eq!(counts(snapshot), (1, 0, 1, 0, 0, 0));
    assert_eq!(snapshot.wait.count, 1);
    assert!(snapshot.wait.sum >= Duration::from_millis(300), "waited the whole wait_timeout: {:?}", snapshot.wait);
}

pub async fn requests_without_a_key_and_safe_methods_count_nothing(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("untouched");
    app.send(post_json("/layered/plain", None, "{}")).await;
    let get = Request::builder().uri("/layered/plain").header("idempotency-key", &key).body(Body::empty()).unwrap();
    app.send(get).await;
    assert_eq!(app.send(post_json("/orders", None, "{}")).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(counts(app.counts()), (0, 0, 0, 0, 0, 0));
    assert_eq!(app.probe.runs(), 2);
}

pub async fn the_layer_counts_like_the_annotation(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("layer");
    for _ in 0..2 {
        app.send(post_json("/layered/plain", Some(&key), "{}")).await;
    }
    app.send(post_json("/layered/plain", Some(&key), r#"{"other":1}"#)).await;
    assert_eq!(counts(app.counts()), (1, 1, 0, 1, 0, 0));
}

pub async fn a_route_under_the_layer_and_annotated_counts_one_new_and_then_hits(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("both");
    for _ in 0..3 {
        assert_eq!(app.send(post_json("/layered/orders", Some(&key), "{}")).await.status(), StatusCode::CREATED);
    }
    assert_eq!(counts(app.counts()), (1, 2, 0, 0, 0, 0), "the claim was made once, not once per door");
    assert_eq!(app.probe.runs(), 1);
}

pub async fn the_plain_api_counts_like_http(store: impl Store) {
    let counters = Arc::new(Counters::new());
    let idempotency = Idempotency::builder(store).metrics(counters.clone()).build();
    let key = fresh_key("once");
    let work = |value: u32| move || async move { Ok::<_, std::io::Error>(value) };
    for _ in 0..2 {
        idempotency.once("jobs", &key).run("input", work(1)).await.unwrap();
    }
    let reused = idempotency.once("jobs", &key).run("other input", work(2)).await;
    assert!(matches!(reused, Err(OnceError::Mismatch)));
    assert_eq!(counts(counters.snapshot()), (1, 1, 0, 1, 0, 0));
}

pub async fn a_stale_owners_write_is_fenced_and_counted(store: impl Store) {
    let counters = Arc::new(Counters::new());
    // Every renewal is lost while the owner believes it (a partitioned client): a long claim lapses.
    let store = Faulty::new(store);
    store.inject(Operation::Renew, Fault::Answer(Write::Applied));
    let idempotency = Idempotency::builder(store).metrics(counters.clone()).build();
    let key = fresh_key("fenced");
    let short_lease = Policy::new().lease(Duration::from_millis(200));
    let stale = tokio::spawn({
        let (idempotency, key) = (idempotency.clone(), key.clone());
        async move {
            let slow = || async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok::<_, std::io::Error>(String::from("stale"))
            };
            idempotency.once("jobs", &key).policy(short_lease).run("input", slow).await
        }
    });
    // The stale owner's renewals are lost: its lease lapses and a second caller claims the key and completes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = idempotency.once("jobs", &key).policy(short_lease);
    assert_eq!(fresh.run("input", || async { Ok::<_, std::io::Error>(String::from("fresh")) }).await.unwrap(), "fresh");
    assert_eq!(stale.await.unwrap().unwrap(), "stale", "the stale owner's own caller still gets its result");
    let stored =
        idempotency.once("jobs", &key).run("input", || async { Ok::<_, std::io::Error>(String::from("third")) }).await;
    assert_eq!(stored.unwrap(), "fresh", "the stale owner did not overwrite the newer record");
    assert_eq!(counts(counters.snapshot()), (2, 1, 0, 0, 0, 1));
}

pub async fn a_lost_lease_is_counted_fenced_and_no_longer_renewed(store: impl Store) {
    let counters = Arc::new(Counters::new());
    // Renewals answer what a store says once another caller took the key over.
    let store = Faulty::new(store);
    store.inject(Operation::Renew, Fault::Answer(Write::Fenced));
    let idempotency = Idempotency::builder(store.clone()).metrics(counters.clone()).build();
    let key = fresh_key("lost-lease");
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok::<_, std::io::Error>(String::from("done"))
    };
    let short_lease = Policy::new().lease(Duration::from_millis(150));
    let outcome = idempotency.once("jobs", &key).policy(short_lease).run("input", slow).await;
    assert_eq!(outcome.unwrap(), "done");
    assert_eq!(store.calls(Operation::Renew), 1, "a fenced renewal is not retried every period");
    // The renewal was fenced; the lease then lapsed with nobody else claiming the key, so the completion still
    // recorded the result (nobody else ran the work) and a retry gets it without running again.
    assert_eq!(counts(counters.snapshot()), (1, 0, 0, 0, 0, 1));
    let again = idempotency
        .once("jobs", &key)
        .policy(short_lease)
        .run("input", || async { Ok::<_, std::io::Error>(String::from("ran twice")) });
    assert_eq!(again.await.unwrap(), "done", "the late completion was stored and replays");
}

// --- the request span -----------------------------------------------------------------------------------------

/// One span's fields, names and values, in the order they were recorded.
type Fields = Vec<(String, String)>;

/// Spans named `idempotency` and their fields, as a subscriber sees them.
#[derive(Clone, Default)]
struct SpanFields(Arc<Mutex<Vec<Fields>>>);

struct FieldVisitor<'a>(&'a mut Fields);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanFields
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "idempotency" {
            return;
        }
        let mut spans = self.0.lock().unwrap();
        let mut fields = Vec::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        spans.push(fields);
        let index = spans.len() - 1;
        ctx.span(id).unwrap().extensions_mut().insert(index);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(index) = ctx.span(id).and_then(|span| span.extensions().get::<usize>().copied()) else { return };
        values.record(&mut FieldVisitor(&mut self.0.lock().unwrap()[index]));
    }
}

impl SpanFields {
    /// The fields of every span made for requests to `path`, in the order they were made.
    fn for_path(&self, path: &str) -> Vec<Fields> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|fields| fields.iter().any(|(name, value)| name == "path" && value == path))
            .cloned()
            .collect()
    }
}

fn field(fields: &Fields, name: &str) -> Option<String> {
    fields.iter().rev().find(|(field, _)| field == name).map(|(_, value)| value.clone())
}

/// The capturing subscriber, installed once for the whole test binary before any test makes a span: installing a
/// subscriber while other threads register callsites can leave those callsites cached as "not interested".
fn captured_spans() -> &'static SpanFields {
    use tracing_subscriber::layer::SubscriberExt;
    static SPANS: std::sync::OnceLock<SpanFields> = std::sync::OnceLock::new();
    SPANS.get_or_init(|| {
        let spans = SpanFields::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
            .expect("no other global subscriber in this test binary");
        spans
    })
}

#[tokio::test]
async fn each_request_runs_in_a_span_with_its_key_digest_outcome_and_wait() {
    let spans = captured_spans();
    let app = TestApp::new(idem::MemoryStore::new());
    let key = fresh_key("span");
    app.send(post_json("/traced", Some(&key), "{}")).await;
    app.send(post_json("/traced", Some(&key), "{}")).await;
    let spans = spans.for_path("/traced");
    assert_eq!(spans.len(), 2);
    assert_eq!(field(&spans[0], "door").as_deref(), Some("handler"));
    assert_eq!(field(&spans[0], "method").as_deref(), Some("POST"));
    assert_eq!(field(&spans[0], "outcome").as_deref(), Some("new"));
    assert_eq!(field(&spans[1], "outcome").as_deref(), Some("hit"));
    let digest = field(&spans[0], "key").expect("the key digest is recorded");
    assert_eq!(digest.len(), 64, "a SHA-256 digest, never the client's key");
    assert!(!digest.contains(&key));
    assert_eq!(field(&spans[1], "key"), Some(digest));
    assert_eq!(field(&spans[0], "wait_ms"), None, "it did not wait");
}

// --- the suite ----------------------------------------------------------------------------------------------

/// Every case above as a `#[tokio::test]`, in a module `$name`, each on a store made by `$store` (an async closure):
/// `metrics_cases!(redis, || async { make_redis_store().await });` runs them on another store.
macro_rules! metrics_cases {
    ($name:ident, $store:expr) => {
        mod $name {
            metrics_cases!(@each $store,
            a_first_request_counts_new,
            a_replay_counts_hit,
            a_duplicate_in_flight_counts_conflict_without_a_wait,
            a_key_reused_for_another_request_counts_mismatch,
            a_store_failure_counts_a_store_error,
            a_duplicate_that_waits_for_the_original_observes_its_wait_and_counts_hit,
            a_duplicate_that_times_out_counts_conflict_and_observes_its_wait,
            requests_without_a_key_and_safe_methods_count_nothing,
            the_layer_counts_like_the_annotation,
            a_route_under_the_layer_and_annotated_counts_one_new_and_then_hits,
            the_plain_api_counts_like_http,
            a_stale_owners_write_is_fenced_and_counted,
            a_lost_lease_is_counted_fenced_and_no_longer_renewed,
            );
        }
    };
    (@each $store:expr, $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                super::captured_spans();
                let store = ($store)().await;
                super::$case(store).await;
            }
        )*
    };
}

metrics_cases!(memory, || async { idem::MemoryStore::new() });
metrics_cases!(redis, crate::redis_server::shared_node_store);
