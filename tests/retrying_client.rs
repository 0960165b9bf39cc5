//! The retrying client of `examples/retrying_client.rs` against a real server: what it retries, what it does not,
//! and how many times the handler ran.

#[allow(dead_code)] // the example's own service and `main` are not used here
#[path = "../examples/retrying_client.rs"]
mod retrying_client;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::test_kit::Outage;
use idem::{Idempotency, MemoryStore, idempotent};
use retrying_client::{RetryPolicy, SendError, post_exactly_once, post_with_key};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server saw: handler executions and requests, per path.
#[derive(Clone, Default)]
struct Seen {
    executions: Arc<Mutex<HashMap<&'static str, u64>>>,
    requests: Arc<Mutex<HashMap<String, u64>>>,
    /// The path whose first response the network loses (after the handler ran and its answer was recorded).
    lose_first_response_of: Option<&'static str>,
}

impl Seen {
    /// Counts an execution of `route`'s handler and answers how many there were, this one included.
    fn execute(&self, route: &'static str) -> u64 {
        let mut executions = self.executions.lock().unwrap();
        let count = executions.entry(route).or_default();
        *count += 1;
        *count
    }

    fn executions(&self, route: &str) -> u64 {
        self.executions.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    fn requests(&self, path: &str) -> u64 {
        self.requests.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

#[idempotent(ttl = 60, wait_timeout = 3.0)]
async fn orders(State(seen): State<Seen>, Json(order): Json<Value>) -> impl IntoResponse {
    let order_id = seen.execute("/orders");
    (StatusCode::CREATED, Json(json!({ "order_id": order_id, "item": order["item"] })))
}

/// Slower than the client's attempt timeout; duplicates do not wait (`wait_timeout = 0`): they get `409 in-progress`.
#[idempotent(ttl = 60)]
async fn slow(State(seen): State<Seen>, Json(_): Json<Value>) -> impl IntoResponse {
    let order_id = seen.execute("/slow");
    tokio::time::sleep(Duration::from_millis(800)).await;
    (StatusCode::CREATED, Json(json!({ "order_id": order_id })))
}

/// An answer larger than the engine keeps (`max_record_bytes(1024)` below): sent once, never replayable.
#[idempotent(ttl = 60)]
async fn large(State(seen): State<Seen>, Json(_): Json<Value>) -> impl IntoResponse {
    seen.execute("/large");
    (StatusCode::CREATED, Json(json!({ "report": "x".repeat(4096) })))
}

/// Fails its first execution with a 500 (not stored by default: the key is released), then succeeds.
#[idempotent(ttl = 60)]
async fn flaky(State(seen): State<Seen>, Json(_): Json<Value>) -> Response {
    match seen.execute("/flaky") {
        1 => (StatusCode::INTERNAL_SERVER_ERROR, "the first try fails").into_response(),
        n => (StatusCode::CREATED, Json(json!({ "execution": n }))).into_response(),
    }
}

/// Always 500, on a route that stores 5xx: the retry replays the failure instead of running again.
#[idempotent(ttl = 60, store_server_errors)]
async fn failing_stored(State(seen): State<Seen>, Json(_): Json<Value>) -> Response {
    seen.execute("/failing-stored");
    (StatusCode::INTERNAL_SERVER_ERROR, "failed, and the failure is the answer").into_response()
}

/// Counts every request that reaches the server, and loses the chosen path's first response.
async fn network(State(seen): State<Seen>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let first = {
        let mut requests = seen.requests.lock().unwrap();
        let count = requests.entry(path.clone()).or_default();
        *count += 1;
        *count == 1
    };
    let response = next.run(request).await;
    if first && seen.lose_first_response_of == Some(path.as_str()) {
        // The handler ran and its answer is recorded; the client never hears of it.
        std::future::pending::<()>().await;
    }
    response
}

/// Serves the routes above on a free port; answers the base URL.
async fn serve(idempotency: Idempotency, seen: Seen) -> String {
    let app = Router::new()
        .route("/orders", post(orders))
        .route("/slow", post(slow))
        .route("/large", post(large))
        .route("/flaky", post(flaky))
        .route("/failing-stored", post(failing_stored))
        .layer(axum::Extension(idempotency))
        .layer(middleware::from_fn_with_state(seen.clone(), network))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn engine() -> Idempotency {
    Idempotency::builder(MemoryStore::new()).max_record_bytes(1024).build()
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        attempt_timeout: Duration::from_millis(300),
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_secs(5),
        retry_server_errors: true,
    }
}

#[tokio::test]
async fn a_lost_response_is_retried_with_the_same_key_and_the_handler_runs_once() {
    let seen = Seen { lose_first_response_of: Some("/orders"), ..Seen::default() };
    let base = serve(engine(), seen.clone()).await;
    let client = reqwest::Client::new();

    let answer = post_exactly_once(&client, &format!("{base}/orders"), &json!({ "item": "book" }), &quick())
        .await
        .expect("an answer");

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.replayed, "the second attempt gets the first one's recorded answer");
    assert_eq!(answer.body["order_id"], 1);
    assert_eq!(answer.attempts, 2);
    assert_eq!(seen.requests("/orders"), 2);
    assert_eq!(seen.executions("/orders"), 1, "one order, though the server was asked twice");
}

#[tokio::test]
async fn in_progress_is_retried_after_its_retry_after_and_replays_the_original() {
    let seen = Seen::default();
    let base = serve(engine(), seen.clone()).await;
    let client = reqwest::Client::new();
    let started = Instant::now();

    // Attempt 1 times out (the handler takes 800 ms), attempt 2 finds it running (409 in-progress, Retry-After: 1),
    // attempt 3, a second later, gets its answer.
    let answer = post_exactly_once(&client, &format!("{base}/slow"), &json!({}), &quick()).await.expect("an answer");

    assert_eq!((answer.status, answer.replayed, answer.attempts), (StatusCode::CREATED, true, 3));
    assert!(started.elapsed() >= Duration::from_secs(1), "waited out Retry-After: {:?}", started.elapsed());
    assert_eq!(seen.requests("/slow"), 3);
    assert_eq!(seen.executions("/slow"), 1);
}

#[tokio::test]
async fn key_reused_is_refused_without_a_retry() {
    let seen = Seen::default();
    let base = serve(engine(), seen.clone()).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/orders");
    let first = post_exactly_once(&client, &url, &json!({ "item": "book" }), &quick()).await.expect("an answer");
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));

    let reused = post_with_key(&client, &url, &first.key, &json!({ "item": "lamp" }), &quick()).await;

    let Err(SendError::Refused { problem, status, .. }) = reused else { panic!("expected a refusal: {reused:?}") };
    assert_eq!((problem.as_str(), status), ("key-reused", StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(seen.requests("/orders"), 2, "one request per call: the refusal is not retried");
    assert_eq!(seen.executions("/orders"), 1);
}

#[tokio::test]
async fn not_replayable_is_refused_without_a_retry_or_a_second_run() {
    let seen = Seen::default();
    let base = serve(engine(), seen.clone()).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/large");
    let first = post_exactly_once(&client, &url, &json!({}), &quick()).await.expect("an answer");
    assert_eq!((first.status, first.attempts), (StatusCode::CREATED, 1));

    // A client that lost that answer can only learn that the operation completed.
    let again = post_with_key(&client, &url, &first.key, &json!({}), &quick()).await;

    let Err(SendError::Refused { problem, status, .. }) = again else { panic!("expected a refusal: {again:?}") };
    assert_eq!((problem.as_str(), status), ("not-replayable", StatusCode::CONFLICT));
    assert_eq!(seen.requests("/large"), 2);
    assert_eq!(seen.executions("/large"), 1);
}

#[tokio::test]
async fn a_handler_5xx_is_retried_and_runs_again_unless_the_route_stores_it() {
    let seen = Seen::default();
    let base = serve(engine(), seen.clone()).await;
    let client = reqwest::Client::new();

    // Released by default: the retry runs the handler again.
    let flaky = post_exactly_once(&client, &format!("{base}/flaky"), &json!({}), &quick()).await.expect("an answer");
    assert_eq!((flaky.status, flaky.replayed, flaky.attempts), (StatusCode::CREATED, false, 2));
    assert_eq!(seen.executions("/flaky"), 2);

    // Stored (`store_server_errors`): the retry gets the 500 replayed, which is final.
    let stored =
        post_exactly_once(&client, &format!("{base}/failing-stored"), &json!({}), &quick()).await.expect("an answer");
    assert_eq!((stored.status, stored.replayed, stored.attempts), (StatusCode::INTERNAL_SERVER_ERROR, true, 2));
    assert_eq!(seen.executions("/failing-stored"), 1);

    // A client that does not retry 5xx at all stops at the first.
    let once = RetryPolicy { retry_server_errors: false, ..quick() };
    let failed = post_exactly_once(&client, &format!("{base}/failing-stored"), &json!({}), &once).await.unwrap();
    assert_eq!((failed.status, failed.replayed, failed.attempts), (StatusCode::INTERNAL_SERVER_ERROR, false, 1));
    assert_eq!(seen.executions("/failing-stored"), 2);
}

#[tokio::test]
async fn store_unavailable_is_retried_after_retry_after_until_the_attempts_run_out() {
    let seen = Seen::default();
    let idempotency = Idempotency::builder(Outage).retry_after(Duration::from_secs(1), Duration::from_secs(1)).build();
    let base = serve(idempotency, seen.clone()).await;
    let client = reqwest::Client::new();
    let started = Instant::now();

    let policy = RetryPolicy { max_attempts: 2, ..quick() };
    let outcome = post_exactly_once(&client, &format!("{base}/orders"), &json!({ "item": "book" }), &policy).await;

    let Err(SendError::GaveUp { attempts, last, .. }) = outcome else { panic!("expected to give up: {outcome:?}") };
    assert_eq!(attempts, 2);
    assert!(last.contains("store-unavailable"), "{last}");
    assert!(started.elapsed() >= Duration::from_secs(1), "waited out Retry-After: {:?}", started.elapsed());
    assert_eq!(seen.requests("/orders"), 2);
    assert_eq!(seen.executions("/orders"), 0);

    // The default Retry-After of store-unavailable (5 s) is longer than this policy waits: it stops at once and
    // leaves the key to the caller.
    let idempotency = Idempotency::new(Outage);
    let base = serve(idempotency, Seen::default()).await;
    let impatient = RetryPolicy { max_delay: Duration::from_secs(2), ..quick() };
    let outcome = post_exactly_once(&client, &format!("{base}/orders"), &json!({ "item": "book" }), &impatient).await;
    assert!(matches!(outcome, Err(SendError::GaveUp { attempts: 1, .. })), "{outcome:?}");
}
