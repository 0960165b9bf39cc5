//! The behaviour table, one case per row, each driving `#[idempotent]` handlers over the store under test.
//!
//! This file is over 500 lines: one public function per row of the behaviour table, in one list a store author reads
//! top to bottom.
//!
//! Every case asserts what the client sees (status, body, headers) and how many times the handler body ran. No case
//! depends on paused time: a real store keeps real TTLs. Keys are fresh per run, so a persistent store can be
//! shared by runs and by cases running in parallel.

use super::app::{BODY_LIMIT, TestApp, stream_chunks};
use super::client::{KEY, REPLAYED, Reply, RequestExt, STATUS, exchange, fresh_key, post, raw_request, serve};
use crate::engine::Idempotency;
use crate::policy::StoreFailure;
use crate::store::contract::Store;
use crate::test_kit::outage::Outage;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn order(item: &str) -> Value {
    json!({ "item": item, "qty": 2 })
}

/// A fresh key made exactly `len` characters long.
fn key_of_length(label: &str, len: usize) -> String {
    let mut key = fresh_key(label);
    assert!(key.len() <= len);
    key.extend(std::iter::repeat_n('k', len - key.len()));
    key
}

// --- keys -----------------------------------------------------------------------------------------------------

/// A request without a key on a `required = false` route runs every time, its answer untouched by the engine.
pub async fn no_key_with_required_false_passes_the_response_through_untouched(store: impl Store) {
    let app = TestApp::new(store);
    for run in 1..=2 {
        let reply = app.send(post("/orders-optional").json(&order("book"))).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.json(), json!({ "run": run, "item": "book", "qty": 2 }));
        let mut headers = reply.handler_headers(&[]);
        headers.sort();
        assert_eq!(
            headers,
            [
                ("content-type".to_owned(), b"application/json".to_vec()),
                ("location".to_owned(), format!("/orders/{run}").into_bytes()),
            ],
            "only the handler's own headers"
        );
        reply.assert_untouched();
        assert_eq!(app.runs(), run, "the handler runs once per request without a key");
    }
}

/// A request without a key on a route that requires one is `400 missing-key`; the handler does not run.
pub async fn no_key_when_required_is_400_missing_key(store: impl Store) {
    let app = TestApp::new(store);
    let reply = app.send(post("/orders").json(&order("book"))).await;
    reply.assert_problem(400, "missing-key");
    assert_eq!(app.runs(), 0);
}

/// Empty, over-long, non-ASCII, control-character, unterminated and repeated keys are `400 invalid-key`;
/// a 255-character key is valid.
pub async fn malformed_keys_are_400_invalid_key(store: impl Store) {
    let app = TestApp::new(store);
    let repeated = HeaderValue::try_from(fresh_key("twice")).unwrap();
    let cases: Vec<(&str, Vec<HeaderValue>)> = vec![
        ("empty", vec![HeaderValue::from_static("")]),
        ("empty sf-string", vec![HeaderValue::from_static("\"\"")]),
        ("256 characters", vec![HeaderValue::try_from(key_of_length("long", 256)).unwrap()]),
        ("256 characters quoted", vec![HeaderValue::try_from(format!("\"{}\"", key_of_length("long", 256))).unwrap()]),
        ("a tab inside", vec![HeaderValue::try_from(format!("{}\tx", fresh_key("tab"))).unwrap()]),
        (
            "non-ASCII UTF-8",
            vec![HeaderValue::from_bytes(format!("{}-caf\u{e9}", fresh_key("utf8")).as_bytes()).unwrap()],
        ),
        ("a Latin-1 byte", vec![HeaderValue::from_bytes(b"latin-\xe9-key").unwrap()]),
        ("an unterminated sf-string", vec![HeaderValue::try_from(format!("\"{}", fresh_key("quote"))).unwrap()]),
        ("two header instances", vec![repeated.clone(), repeated]),
    ];
    for (what, values) in cases {
        let mut request = post("/orders").json(&order("book"));
        for value in values {
            request.headers_mut().append(KEY, value);
        }
        let reply = app.send(request).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "a key with {what}: {reply:?}");
        reply.assert_problem(400, "invalid-key");
        assert_eq!(app.runs(), 0, "a key with {what} must not run the handler");
    }

    let longest = key_of_length("max", 255);
    let reply = app.send(post("/orders").key(&longest).json(&order("book"))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "a 255-character key is valid: {reply:?}");
    reply.assert_new(&longest);
    assert_eq!(app.runs(), 1);

    // A control character cannot even be put in an `http::HeaderValue`; over the wire, the server refuses it
    // before any handler sees it.
    let address = serve(app.router.clone()).await;
    let body = order("book").to_string();
    let headers: [(&str, &[u8]); 3] =
        [("idempotency-key", b"ctl\x01key"), ("content-type", b"application/json"), ("connection", b"close")];
    let reply = exchange(address, &raw_request("/orders", &headers, body.as_bytes())).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "a key with \\x01: {reply:?}");
    assert_eq!(app.runs(), 1, "a key with \\x01 must not run the handler");
}

/// `"k"` (a structured-field string) and `k` name the same key.
pub async fn quoted_and_bare_keys_are_the_same_key(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("sf");
    let quoted = format!("\"{key}\"");
    let first = app.send(post("/orders").key(&quoted).json(&order("book"))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    first.assert_new(&quoted);
    let second = app.send(post("/orders").key(&key).json(&order("book"))).await;
    second.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1, "`\"{key}\"` and `{key}` name one key");
}

// --- first request and replay ---------------------------------------------------------------------------------

/// A first request runs once and is answered with the key echoed, `new` and the request's signature.
pub async fn first_request_runs_once_and_answers_with_echo_new_and_signature(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("first");
    let reply = app.send(post("/orders").key(&key).json(&order("book"))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json(), json!({ "run": 1, "item": "book", "qty": 2 }));
    assert_eq!(reply.header(header::LOCATION), Some("/orders/1"));
    assert_eq!(reply.header(header::CONTENT_TYPE), Some("application/json"));
    reply.assert_new(&key);
    assert_eq!(app.runs(), 1);
}

/// Retries after completion are answered from the store, the handler not run again.
pub async fn retry_after_completion_replays_the_stored_response(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("retry");
    let first = app.send(post("/orders").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    for _ in 0..2 {
        let retry = app.send(post("/orders").key(&key).json(&order("book"))).await;
        retry.assert_replays(&first, &key);
        assert_eq!(retry.json()["run"], 1);
    }
    assert_eq!(app.runs(), 1, "retries are answered from the store");
}

/// Sends one request to `/fidelity/{kind}` and replays it; checks everything the replay must keep or drop.
async fn replay_fidelity(store: impl Store, kind: &str, status: StatusCode) -> (Reply, Reply) {
    let app = TestApp::new(store);
    let key = fresh_key(kind);
    let path = format!("/fidelity/{kind}");
    let first = app.send(post(&path).key(&key).empty()).await;
    assert_eq!(first.status, status);
    first.assert_new(&key);
    assert!(first.headers.contains_key(header::SET_COOKIE), "the first answer carries the handler's Set-Cookie");
    assert!(first.headers.contains_key(header::DATE), "the first answer carries the handler's Date");

    let replay = app.send(post(&path).key(&key).empty()).await;
    replay.assert_replays(&first, &key);
    assert!(!replay.headers.contains_key(header::SET_COOKIE), "Set-Cookie is never replayed: {replay:?}");
    assert!(!replay.headers.contains_key(header::DATE), "Date is never replayed: {replay:?}");
    let multi: Vec<&[u8]> = replay.headers.get_all("x-multi").iter().map(HeaderValue::as_bytes).collect();
    assert_eq!(multi, [b"first".as_slice(), b"second"], "a repeated header keeps both values, in order");
    assert_eq!(
        replay.headers.get("x-raw").map(HeaderValue::as_bytes),
        Some([b'r', 0xff, 0x80, b'w'].as_slice()),
        "a non-UTF-8 header value survives"
    );
    assert_eq!(replay.header("x-run"), Some("1"));
    assert_eq!(app.runs(), 1);
    (first, replay)
}

/// A JSON answer is replayed byte for byte, with its headers in order (less `Set-Cookie` and `Date`).
pub async fn replay_keeps_a_json_response_byte_for_byte(store: impl Store) {
    let (_, replay) = replay_fidelity(store, "json", StatusCode::CREATED).await;
    assert_eq!(replay.header(header::CONTENT_TYPE), Some("application/json"));
    let body = replay.json();
    assert_eq!(body["run"], 1);
    assert_eq!(body["note"], "caf\u{e9} \u{1f980}");
}

/// A text answer is replayed byte for byte, with its headers in order.
pub async fn replay_keeps_a_text_response_byte_for_byte(store: impl Store) {
    let (_, replay) = replay_fidelity(store, "text", StatusCode::OK).await;
    assert_eq!(replay.header(header::CONTENT_TYPE), Some("text/plain; charset=utf-8"));
    assert_eq!(replay.body, "plain text, run 1\r\n".as_bytes());
}

/// An empty `204` is replayed empty, with no content type added.
pub async fn replay_keeps_an_empty_204_response(store: impl Store) {
    let (_, replay) = replay_fidelity(store, "empty", StatusCode::NO_CONTENT).await;
    assert!(replay.body.is_empty());
    assert_eq!(replay.header(header::CONTENT_TYPE), None);
}

/// A binary answer holding every byte value is replayed byte for byte.
pub async fn replay_keeps_a_binary_response_byte_for_byte(store: impl Store) {
    let (_, replay) = replay_fidelity(store, "binary", StatusCode::OK).await;
    assert_eq!(replay.header(header::CONTENT_TYPE), Some("application/octet-stream"));
    assert_eq!(replay.body, (0..=255u8).collect::<Vec<_>>(), "all 256 byte values, in order");
}

// --- signature and scope --------------------------------------------------------------------------------------

/// A key reused with a different body is `422 key-reused`.
pub async fn retry_with_a_different_body_is_422_key_reused(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("reused");
    let first = app.send(post("/orders").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    let other = app.send(post("/orders").key(&key).json(&order("pen"))).await;
    other.assert_problem(422, "key-reused");
    assert_eq!(app.runs(), 1);
    let retry = app.send(post("/orders").key(&key).json(&order("book"))).await;
    retry.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1, "the refused request changed nothing");
}

/// With `validate_signature = false`, a key reused with a different body replays the first answer.
pub async fn retry_with_a_different_body_replays_when_signatures_are_not_validated(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("lenient");
    let first = app.send(post("/orders-lenient").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    let other = app.send(post("/orders-lenient").key(&key).json(&order("pen"))).await;
    other.assert_replays(&first, &key);
    assert_eq!(other.json()["item"], "book", "the stored answer, not one for the new body");
    assert_eq!(app.runs(), 1);
}

/// A key reused with a different query string is `422 key-reused`.
pub async fn retry_with_a_different_query_is_422_key_reused(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("query");
    let first = app.send(post("/orders?source=web").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    let other = app.send(post("/orders?source=app").key(&key).json(&order("book"))).await;
    other.assert_problem(422, "key-reused");
    assert_eq!(app.runs(), 1);
}

/// A key reused with a different content type is `422 key-reused`.
pub async fn retry_with_a_different_content_type_is_422_key_reused(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("content-type");
    let body = order("book").to_string();
    let first = app.send(post("/orders").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    let other = post("/orders")
        .key(&key)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(body))
        .unwrap();
    let other = app.send(other).await;
    other.assert_problem(422, "key-reused");
    assert_eq!(app.runs(), 1);
}

/// One key on two routes names two requests: both run.
pub async fn same_key_on_two_paths_runs_both(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("paths");
    let orders = app.send(post("/orders").key(&key).json(&order("book"))).await;
    let copy = app.send(post("/orders-copy").key(&key).json(&order("book"))).await;
    orders.assert_new(&key);
    copy.assert_new(&key);
    assert_eq!(app.runs(), 2, "a key is scoped by path");
    assert_ne!(orders.json()["run"], copy.json()["run"]);
    app.send(post("/orders").key(&key).json(&order("book"))).await.assert_replays(&orders, &key);
    app.send(post("/orders-copy").key(&key).json(&order("book"))).await.assert_replays(&copy, &key);
    assert_eq!(app.runs(), 2);
}

/// One key from two principals names two requests: both run, and each is replayed its own answer.
pub async fn same_key_for_two_principals_runs_both_and_replays_each_its_own(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("principals");
    let as_client = |token: &str| post("/orders").key(&key).header(header::AUTHORIZATION, token).json(&order("book"));
    let alice = app.send(as_client("Bearer alice")).await;
    let bob = app.send(as_client("Bearer bob")).await;
    alice.assert_new(&key);
    bob.assert_new(&key);
    assert_eq!(app.runs(), 2, "a key is scoped by principal");
    assert_ne!(alice.body, bob.body);
    app.send(as_client("Bearer alice")).await.assert_replays(&alice, &key);
    app.send(as_client("Bearer bob")).await.assert_replays(&bob, &key);
    assert_eq!(app.runs(), 2);
}

// --- what the handler answers ---------------------------------------------------------------------------------

/// A handler's `4xx` answer is stored and replayed.
pub async fn handler_4xx_is_stored_and_replayed(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("402");
    let first = app.send(post("/status/402").key(&key).empty()).await;
    assert_eq!(first.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(first.body, "status 402, run 1".as_bytes());
    first.assert_new(&key);
    let retry = app.send(post("/status/402").key(&key).empty()).await;
    retry.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1, "a 4xx from the handler is its final answer");
}

/// A handler's `5xx` answer is not stored: the retry runs again.
pub async fn handler_5xx_is_not_stored_and_a_retry_runs_again(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("500");
    for run in 1..=2 {
        let reply = app.send(post("/status/500").key(&key).empty()).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reply.body, format!("status 500, run {run}").as_bytes());
        assert_eq!(reply.header(REPLAYED), None, "a 5xx is never replayed");
        assert_eq!(app.runs(), run, "each attempt runs the handler");
    }
}

/// With `store_server_errors`, a `5xx` answer is stored and replayed.
pub async fn handler_5xx_is_stored_with_store_server_errors(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("500-stored");
    let first = app.send(post("/status-stored/500").key(&key).empty()).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    first.assert_new(&key);
    let retry = app.send(post("/status-stored/500").key(&key).empty()).await;
    retry.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1);
}

/// A panicking handler is answered `500 handler-panicked` and its key released: the retry runs.
pub async fn handler_panic_is_a_500_problem_and_a_retry_runs_again(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("panic");
    let panicked = app.send(post("/panic").key(&key).empty()).await;
    panicked.assert_problem(500, "handler-panicked");
    assert_eq!(app.runs(), 1);
    let retry = app.send(post("/panic").key(&key).empty()).await;
    assert_eq!(retry.status, StatusCode::CREATED, "the key was released: the retry runs and succeeds");
    assert_eq!(retry.body, "run 2".as_bytes());
    retry.assert_new(&key);
    assert_eq!(app.runs(), 2);
    app.send(post("/panic").key(&key).empty()).await.assert_replays(&retry, &key);
    assert_eq!(app.runs(), 2);
}

/// With `store_server_errors`, a panic's `500` is the final answer, replayed to retries.
pub async fn handler_panic_is_stored_with_store_server_errors(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("panic-stored");
    let panicked = app.send(post("/panic-stored").key(&key).empty()).await;
    panicked.assert_problem(500, "handler-panicked");
    let retry = app.send(post("/panic-stored").key(&key).empty()).await;
    retry.assert_problem(500, "handler-panicked");
    retry.assert_hit(&key);
    assert_eq!(app.runs(), 1, "at-most-once: the panic is the final answer");
}

/// An extractor's rejection is sent as axum made it and releases the key: a valid retry runs.
pub async fn extractor_rejection_is_sent_and_releases_the_key(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("rejected");
    let rejected = [
        ("a JSON syntax error", Some("application/json"), r#"{"item":"#, StatusCode::BAD_REQUEST),
        ("no content-type", None, r#"{"item":"book","qty":2}"#, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("a wrong field type", Some("application/json"), r#"{"item":5,"qty":2}"#, StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (what, content_type, body, status) in rejected {
        let mut request = post("/orders").key(&key);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let reply = app.send(request.body(Body::from(body)).unwrap()).await;
        assert_eq!(reply.status, status, "axum's rejection of {what}: {reply:?}");
        assert_eq!(reply.header(STATUS), None, "a rejection is not a `new` execution: {reply:?}");
        assert_eq!(reply.header(REPLAYED), None);
        assert_eq!(app.runs(), 0, "the handler body never ran for {what}");
    }
    let valid = app.send(post("/orders").key(&key).json(&order("book"))).await;
    assert_eq!(valid.status, StatusCode::CREATED, "the claim was released: the key still works: {valid:?}");
    valid.assert_new(&key);
    assert_eq!(app.runs(), 1);
}

/// A body over the router's limit is `413 payload-too-large` and releases the key.
pub async fn body_over_the_limit_is_413_payload_too_large(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("too-large");
    let big = json!({ "item": "x".repeat(2 * BODY_LIMIT), "qty": 1 });
    let reply = app.send(post("/orders").key(&key).json(&big)).await;
    reply.assert_problem(413, "payload-too-large");
    assert_eq!(app.runs(), 0);
    let small = app.send(post("/orders").key(&key).json(&order("book"))).await;
    small.assert_new(&key);
    assert_eq!(app.runs(), 1);
}

// --- duplicates in flight -------------------------------------------------------------------------------------

/// A duplicate of a running request, on a route that does not wait, is `409 in-progress` at once.
pub async fn duplicate_in_flight_without_wait_is_409_in_progress(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("in-flight");
    let original = app.spawn(post("/gated").key(&key).empty());
    app.probe.started().await;
    let duplicate = held_duplicate(app.send(post("/gated").key(&key).empty())).await;
    duplicate.assert_problem(409, "in-progress");
    duplicate.assert_retry_after();
    assert_eq!(app.runs(), 1);
    app.probe.open_gate();
    let original = original.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    original.assert_new(&key);
    app.send(post("/gated").key(&key).empty()).await.assert_replays(&original, &key);
    assert_eq!(app.runs(), 1);
}

/// Awaits the answer to a duplicate sent while the original is held: a duplicate that wrongly ran the handler a
/// second time would be held too, so it fails here instead of hanging the test.
async fn held_duplicate(reply: impl Future<Output = Reply>) -> Reply {
    tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("no answer within 5 s while the original was held: the duplicate is running the handler again")
}

/// How soon waiting duplicates answer once the original finishes: far less than their `wait_timeout` (3 s), so a
/// wait that ends by timing out (or by slow polling) rather than by the completion's notification is caught.
const WOKEN_WITHIN: Duration = Duration::from_millis(1_500);

/// A duplicate of a running request waits, is woken by the original's completion and gets its answer.
pub async fn duplicate_in_flight_waits_and_gets_the_original_response(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("wait");
    let original = app.spawn(post("/gated-wait").key(&key).empty());
    app.probe.started().await;
    let duplicate = app.spawn(post("/gated-wait").key(&key).empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!duplicate.is_finished(), "the duplicate waits for the original instead of answering");
    app.probe.open_gate();
    let opened = Instant::now();
    let original = tokio::time::timeout(Duration::from_secs(5), original).await.unwrap().unwrap();
    let duplicate = tokio::time::timeout(Duration::from_secs(5), duplicate).await.unwrap().unwrap();
    let woken = opened.elapsed();
    assert!(woken < WOKEN_WITHIN, "the duplicate answered {woken:?} after the original finished: not woken by it");
    original.assert_new(&key);
    duplicate.assert_replays(&original, &key);
    assert_eq!(app.runs(), 1);
}

/// A duplicate whose `wait_timeout` runs out first is `409 in-progress`, after waiting that long.
pub async fn duplicate_in_flight_whose_wait_times_out_is_409_in_progress(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("wait-timeout");
    let original = app.spawn(post("/gated-short-wait").key(&key).empty());
    app.probe.started().await;
    let started = Instant::now();
    let duplicate = held_duplicate(app.send(post("/gated-short-wait").key(&key).empty())).await;
    let waited = started.elapsed();
    duplicate.assert_problem(409, "in-progress");
    duplicate.assert_retry_after();
    assert!(waited >= Duration::from_millis(250), "answered after {waited:?}; it should wait 300 ms first");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}; wait_timeout is 300 ms");
    app.probe.open_gate();
    original.await.unwrap().assert_new(&key);
    assert_eq!(app.runs(), 1);
}

const BURST: usize = 50;

/// Fifty concurrent requests with one key run the handler once; the others are `409 in-progress` at once.
pub async fn fifty_concurrent_duplicates_without_wait_run_once(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("burst");
    let (sender, mut replies) = mpsc::unbounded_channel();
    for _ in 0..BURST {
        let (sender, reply) = (sender.clone(), app.spawn(post("/gated").key(&key).empty()));
        tokio::spawn(async move { sender.send(reply.await.unwrap()) });
    }
    drop(sender);
    // Every duplicate answers while the original is held; a second execution would be held too and never answer.
    let mut answered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered.len() < BURST - 1 {
        match tokio::time::timeout_at(deadline, replies.recv()).await {
            Ok(Some(reply)) => answered.push(reply),
            _ => break,
        }
    }
    let answered_while_held = answered.len();
    app.probe.open_gate();
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(5), replies.recv()).await {
        answered.push(reply);
    }
    assert_eq!(answered.len(), BURST, "every request is answered");
    assert_eq!(answered_while_held, BURST - 1, "the duplicates are answered at once, while the original runs");
    let new: Vec<_> = answered.iter().filter(|reply| reply.status.is_success()).collect();
    assert_eq!(new.len(), 1, "exactly one request runs: {new:?}");
    new[0].assert_new(&key);
    for reply in answered.iter().filter(|reply| !reply.status.is_success()) {
        reply.assert_problem(409, "in-progress");
        reply.assert_retry_after();
    }
    assert_eq!(app.runs(), 1);
}

/// Fifty concurrent requests with one key run the handler once; the others wait and get its answer.
pub async fn fifty_concurrent_duplicates_with_wait_all_get_the_original_response(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("burst-wait");
    let (sender, mut replies) = mpsc::unbounded_channel();
    for _ in 0..BURST {
        let (sender, reply) = (sender.clone(), app.spawn(post("/gated-wait").key(&key).empty()));
        tokio::spawn(async move { sender.send(reply.await.unwrap()) });
    }
    drop(sender);
    app.probe.started().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(replies.is_empty(), "no duplicate answers while the original runs: they wait");
    app.probe.open_gate();
    let opened = Instant::now();
    let mut answered = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(5), replies.recv()).await {
        answered.push(reply);
    }
    let woken = opened.elapsed();
    assert_eq!(answered.len(), BURST, "every request is answered");
    assert!(woken < WOKEN_WITHIN, "the duplicates answered {woken:?} after the original finished: not woken by it");
    let (new, hits): (Vec<_>, Vec<_>) = answered.iter().partition(|reply| reply.header(STATUS) == Some("new"));
    assert_eq!(new.len(), 1, "exactly one request runs");
    new[0].assert_new(&key);
    assert_eq!(new[0].status, StatusCode::CREATED);
    assert_eq!(hits.len(), BURST - 1);
    for hit in hits {
        hit.assert_replays(new[0], &key);
    }
    assert_eq!(app.runs(), 1);
}

// --- what cannot be stored ------------------------------------------------------------------------------------

/// An answer too large to keep is sent in full; retries are `409 not-replayable`, never a second run.
pub async fn response_too_large_to_store_is_sent_then_not_replayable(store: impl Store) {
    let app = TestApp::with(Idempotency::builder(store).max_record_bytes(16).build());
    let key = fresh_key("too-large-to-store");
    let first = app.send(post("/fidelity/binary").key(&key).empty()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, (0..=255u8).collect::<Vec<_>>(), "the first answer is sent through intact");
    first.assert_new(&key);
    let retry = app.send(post("/fidelity/binary").key(&key).empty()).await;
    retry.assert_problem(409, "not-replayable");
    assert_eq!(app.runs(), 1, "never a second execution");
}

/// A streamed answer is sent in full; retries are `409 not-replayable`, never a second run.
pub async fn streamed_response_is_sent_then_not_replayable(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("stream");
    let first = app.send(post("/stream").key(&key).empty()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, stream_chunks(1).concat(), "the stream is sent through intact");
    first.assert_new(&key);
    let retry = app.send(post("/stream").key(&key).empty()).await;
    retry.assert_problem(409, "not-replayable");
    assert_eq!(app.runs(), 1, "never a second execution");
}

// --- the store and the engine's configuration -----------------------------------------------------------------

/// A store that is down is `503 store-unavailable` and the handler does not run (uses [`Outage`], not
/// the store under test).
pub async fn store_unavailable_is_503_and_the_handler_does_not_run(_store: impl Store) {
    let app = TestApp::new(Outage);
    let key = fresh_key("outage");
    let reply = app.send(post("/orders").key(&key).json(&order("book"))).await;
    reply.assert_problem(503, "store-unavailable");
    reply.assert_retry_after();
    assert_eq!(app.runs(), 0, "fail closed");
}

/// A store that is down, with fail-open, runs the handler unprotected (uses [`Outage`]).
pub async fn store_unavailable_with_fail_open_runs_the_handler(_store: impl Store) {
    let app = TestApp::with(Idempotency::builder(Outage).on_store_failure(StoreFailure::FailOpen).build());
    let key = fresh_key("outage-open");
    let reply = app.send(post("/orders").key(&key).json(&order("book"))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json(), json!({ "run": 1, "item": "book", "qty": 2 }));
    assert_eq!(app.runs(), 1, "fail open runs the request unprotected");
}

/// An annotated handler that finds no engine is `500 not-configured`, never a silent pass-through.
pub async fn no_engine_configured_is_500_not_configured(_store: impl Store) {
    let app = TestApp::without_state_engine(None);
    let key = fresh_key("unconfigured");
    let reply = app.send(post("/orders").key(&key).json(&order("book"))).await;
    reply.assert_problem(500, "not-configured");
    assert_eq!(app.runs(), 0, "never a silent pass-through");
}

/// Handlers find the engine in the router's state through `FromRef`.
pub async fn engine_found_in_the_state_through_from_ref(store: impl Store) {
    let app = TestApp::new(store);
    let key = fresh_key("from-ref");
    let first = app.send(post("/orders").key(&key).json(&order("book"))).await;
    first.assert_new(&key);
    app.send(post("/orders").key(&key).json(&order("book"))).await.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1);
}

/// Handlers find the engine in a request extension when the state has none.
pub async fn engine_found_in_an_extension_layer(store: impl Store) {
    let app = TestApp::without_state_engine(Some(Idempotency::new(store)));
    let key = fresh_key("extension");
    let first = app.send(post("/orders").key(&key).json(&order("book"))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    first.assert_new(&key);
    app.send(post("/orders").key(&key).json(&order("book"))).await.assert_replays(&first, &key);
    assert_eq!(app.runs(), 1);
}

// --- a real connection ----------------------------------------------------------------------------------------

/// A client that disconnects does not cancel the handler; its retry gets the stored answer.
pub async fn client_disconnect_does_not_stop_the_handler_and_the_retry_gets_its_response(store: impl Store) {
    let app = TestApp::new(store);
    let address = serve(app.router.clone()).await;
    let key = fresh_key("disconnect");
    let body = json!({ "sleep_ms": 300 }).to_string();
    let headers: [(&str, &[u8]); 2] = [("idempotency-key", key.as_bytes()), ("content-type", b"application/json")];
    let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
    connection.write_all(&raw_request("/slow-wait", &headers, body.as_bytes())).await.unwrap();
    app.probe.started().await;
    drop(connection);
    assert_eq!(app.probe.finished(), 0, "the client left while the handler ran");
    app.probe.done().await;

    let headers: [(&str, &[u8]); 3] =
        [("idempotency-key", key.as_bytes()), ("content-type", b"application/json"), ("connection", b"close")];
    let retry = exchange(address, &raw_request("/slow-wait", &headers, body.as_bytes())).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    retry.assert_hit(&key);
    assert_eq!(retry.json()["run"], 1);
    assert_eq!(app.runs(), 1, "the handler ran to completion once; the retry got its stored answer");
    assert_eq!(app.probe.finished(), 1);
}
