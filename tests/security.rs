//! What one client must never get from, or leave for, another (DESIGN.md §3, "Scope" and "Replayed headers"):
//! records are scoped by principal (the `Authorization` header, or the app's own function) on every door; no raw
//! client bytes reach Redis, neither in keys nor channels nor anywhere else; `Set-Cookie` is neither replayed nor
//! stored; a body over the limit is refused before the store is touched.
//!
//! The flood of distinct keys against `MemoryStore` has a binary of its own (`tests/memory_flood.rs`), so its peak
//! resident set is its own.

mod probe;
mod redis_server;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::store::Store;
use idem::test_kit::Faulty;
use idem::test_kit::client::{Reply, exchange, raw_request, serve};
use idem::{Idempotency, idempotent};
use probe::Probe;
use redis_server::{RedisServer, all_command_calls};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

// --- the app under test ---------------------------------------------------------------------------------------

/// The request body limit of both doors, small so a test can exceed it cheaply.
const BODY_LIMIT: usize = 1024;
/// The cookie the handlers set: it belongs to the first client only.
const COOKIE_SECRET: &str = "sess-SECRET-0d6f";

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    probe: Probe,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// The order answer: which run made it, and the item; never the key or the credentials.
async fn order(app: &App, headers: &HeaderMap, body: &Value) -> Response {
    let run = app.probe.run(headers).await;
    (StatusCode::CREATED, Json(json!({ "run": run, "item": body["item"] }))).into_response()
}

/// An answer with two cookies, a repeated header and a non-UTF-8 value.
async fn with_cookies(app: &App, headers: &HeaderMap) -> Response {
    let run = app.probe.run(headers).await;
    let mut response = (StatusCode::CREATED, Json(json!({ "run": run }))).into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, HeaderValue::from_str(&format!("session={COOKIE_SECRET}; HttpOnly")).unwrap());
    headers.append(header::SET_COOKIE, HeaderValue::from_static("csrf=second-cookie; Secure"));
    headers.append("x-multi", HeaderValue::from_static("first"));
    headers.append("x-multi", HeaderValue::from_static("second"));
    headers.insert("x-raw", HeaderValue::from_bytes(&[b'r', 0xff, 0x80, b'w']).unwrap());
    response
}

async fn failing(app: &App, headers: &HeaderMap) -> Response {
    let run = app.probe.run(headers).await;
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "run": run }))).into_response()
}

#[idempotent]
async fn annotated_order(State(app): State<App>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    order(&app, &headers, &body).await
}

#[idempotent(wait_timeout = 5)]
async fn annotated_order_waiting(State(app): State<App>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    order(&app, &headers, &body).await
}

#[idempotent]
async fn annotated_cookies(State(app): State<App>, headers: HeaderMap) -> Response {
    with_cookies(&app, &headers).await
}

#[idempotent]
async fn annotated_failing(State(app): State<App>, headers: HeaderMap) -> Response {
    failing(&app, &headers).await
}

async fn plain_order(State(app): State<App>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    order(&app, &headers, &body).await
}

async fn plain_cookies(State(app): State<App>, headers: HeaderMap) -> Response {
    with_cookies(&app, &headers).await
}

/// Which front door a router puts in front of the same handlers.
#[derive(Debug, Clone, Copy)]
enum Door {
    /// `#[idempotent]` handlers, body limit by `DefaultBodyLimit`.
    Annotated,
    /// Plain handlers under `IdempotencyLayer`, body limit set on the layer.
    Layer,
}

const DOORS: [Door; 2] = [Door::Annotated, Door::Layer];

/// The app with `idempotency` behind `door`.
fn app(door: Door, idempotency: Idempotency) -> (Router, Probe) {
    let probe = Probe::default();
    let state = App { idempotency: idempotency.clone(), probe: probe.clone() };
    let router = match door {
        Door::Annotated => Router::new()
            .route("/orders", post(annotated_order))
            .route("/orders/waiting", post(annotated_order_waiting))
            .route("/cookies", post(annotated_cookies))
            .route("/failing", post(annotated_failing))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(state),
        Door::Layer => Router::new()
            .route("/orders", post(plain_order))
            .route("/cookies", post(plain_cookies))
            .layer(idempotency.layer().body_limit(BODY_LIMIT))
            .with_state(state),
    };
    (router, probe)
}

fn engine(store: impl Store) -> Idempotency {
    Idempotency::new(store)
}

fn unique(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{label}-{nanos:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `POST path` with a key, extra headers and a JSON body.
fn keyed_post(path: &str, key: &str, headers: &[(&str, &str)], body: &Value) -> Request<Body> {
    let mut request = Request::post(path)
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    request
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    Reply::read(router.clone().oneshot(request).await.expect("infallible")).await
}

fn assert_new(reply: &Reply, run: u64) {
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(reply.header("x-idempotency-status"), Some("new"), "{reply:?}");
    assert_eq!(reply.json()["run"], run, "{reply:?}");
}

fn assert_replays(reply: &Reply, original: &Reply) {
    assert_eq!(reply.status, original.status, "{reply:?}");
    assert_eq!(reply.header("x-idempotency-status"), Some("hit"), "{reply:?}");
    assert_eq!(reply.body, original.body, "the replay is this client's own answer, byte for byte");
}

// --- principals -----------------------------------------------------------------------------------------------

/// One key, one body, three principals (two `Authorization` values and none), on both doors: each runs once and
/// gets its own answer, and one principal's request in flight is invisible to another (no 409, no wait).
async fn each_principal_runs_once_and_gets_its_own_answer(store: impl Store) {
    let idempotency = engine(store);
    for door in DOORS {
        let (router, probe) = app(door, idempotency.clone());
        let key = unique("shared-key");
        let body = json!({ "item": "book" });
        let alice = [("authorization", "Bearer alice")];
        let bob = [("authorization", "Bearer bob")];

        let mut held = keyed_post("/orders", &key, &alice, &body);
        held.headers_mut().insert("x-hold", HeaderValue::from_static("1"));
        let alice_first = tokio::spawn({
            let router = router.clone();
            async move { send(&router, held).await }
        });
        probe.started().await;
        // Alice's claim is in flight; Bob's identical request runs at once rather than waiting on or
        // conflicting with it.
        let bob_first = send(&router, keyed_post("/orders", &key, &bob, &body)).await;
        assert_new(&bob_first, 2);
        let anonymous_first = send(&router, keyed_post("/orders", &key, &[], &body)).await;
        assert_new(&anonymous_first, 3);
        probe.open();
        let alice_first = alice_first.await.unwrap();
        assert_new(&alice_first, 1);

        for _ in 0..2 {
            assert_replays(&send(&router, keyed_post("/orders", &key, &alice, &body)).await, &alice_first);
            assert_replays(&send(&router, keyed_post("/orders", &key, &bob, &body)).await, &bob_first);
            assert_replays(&send(&router, keyed_post("/orders", &key, &[], &body)).await, &anonymous_first);
        }
        assert_eq!(probe.runs(), 3, "{door:?}: one run per principal");
    }
}

/// With the app's own principal function (a tenant header), records are scoped by the tenant and not by
/// `Authorization`, and the principal and key are kept apart: tenant `acme` with key `1-order` is not tenant
/// `acme1` with key `-order`.
async fn a_custom_principal_function_replaces_the_authorization_header(store: impl Store) {
    let idempotency = Idempotency::builder(store)
        .principal(|parts| parts.headers.get("x-tenant").map(|value| value.as_bytes().to_vec()).unwrap_or_default())
        .build();
    for door in DOORS {
        let (router, probe) = app(door, idempotency.clone());
        let run = unique("run");
        let body = json!({ "item": "lamp" });
        let acme = |token| [("x-tenant", "acme"), ("authorization", token)];
        let key = format!("1-order-{run}");

        let first = send(&router, keyed_post("/orders", &key, &acme("Bearer one"), &body)).await;
        assert_new(&first, 1);
        // Another credential of the same tenant: the same principal, so a replay.
        assert_replays(&send(&router, keyed_post("/orders", &key, &acme("Bearer two"), &body)).await, &first);
        let other_tenant = send(&router, keyed_post("/orders", &key, &[("x-tenant", "globex")], &body)).await;
        assert_new(&other_tenant, 2);
        // Tenant and key run together into the same bytes; kept apart, they are another principal's key.
        let shifted_key = format!("-order-{run}");
        assert_eq!(format!("acme{key}"), format!("acme1{shifted_key}"));
        let boundary = send(&router, keyed_post("/orders", &shifted_key, &[("x-tenant", "acme1")], &body)).await;
        assert_new(&boundary, 3);
        assert_eq!(probe.runs(), 3, "{door:?}");
    }
}

// --- Set-Cookie -----------------------------------------------------------------------------------------------

/// Two cookies on both doors (the conformance suite has one, on the annotated door): neither comes back on the
/// replay; the repeated header and the non-UTF-8 value do.
async fn set_cookie_is_never_replayed_on_either_door(store: impl Store) {
    let idempotency = engine(store);
    for door in DOORS {
        let (router, probe) = app(door, idempotency.clone());
        let key = unique("cookies");
        let request = || keyed_post("/cookies", &key, &[], &json!({}));
        let first = send(&router, request()).await;
        assert_new(&first, 1);
        let cookies: Vec<&[u8]> = first.headers.get_all(header::SET_COOKIE).iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(cookies.len(), 2, "{door:?}: the first answer carries both cookies");
        let replay = send(&router, request()).await;
        assert_replays(&replay, &first);
        assert!(!replay.headers.contains_key(header::SET_COOKIE), "{door:?}: a cookie was replayed: {replay:?}");
        let multi: Vec<&[u8]> = replay.headers.get_all("x-multi").iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(multi, [b"first".as_slice(), b"second"], "{door:?}: a repeated header keeps both values");
        assert_eq!(replay.headers["x-raw"].as_bytes(), [b'r', 0xff, 0x80, b'w'], "{door:?}: a non-UTF-8 value");
        assert_eq!(replay.headers["content-type"], "application/json");
        assert_eq!(probe.runs(), 1);
    }
}

// --- the body limit -------------------------------------------------------------------------------------------

/// Sends bodies over the limit to both doors over real sockets, with a `Content-Length` and chunked; calls
/// `store_activity` (a count of what the store was asked) before and after each 413, which must not differ. Then a
/// small body with the same key runs.
async fn oversized_bodies_are_413_before_the_store<T: PartialEq + std::fmt::Debug>(
    idempotency: Idempotency,
    store_activity: impl Fn() -> T,
) {
    let big = json!({ "item": "x".repeat(2 * BODY_LIMIT) }).to_string();
    for door in DOORS {
        let (router, probe) = app(door, idempotency.clone());
        let address = serve(router).await;
        let key = unique("too-large");
        let headers: [(&str, &[u8]); 4] = [
            ("idempotency-key", key.as_bytes()),
            ("authorization", b"Bearer someone"),
            ("content-type", b"application/json"),
            ("connection", b"close"),
        ];
        let before = store_activity();
        let sized = exchange(address, &raw_request("/orders", &headers, big.as_bytes())).await;
        sized.assert_problem(413, "payload-too-large");
        assert_eq!(store_activity(), before, "{door:?}, with a Content-Length: the store was used");

        let mut chunked = b"POST /orders HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n".to_vec();
        for (name, value) in headers {
            chunked.extend_from_slice(format!("{name}: ").as_bytes());
            chunked.extend_from_slice(value);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"\r\n");
        for piece in big.as_bytes().chunks(256) {
            chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            chunked.extend_from_slice(piece);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        exchange(address, &chunked).await.assert_problem(413, "payload-too-large");
        assert_eq!(store_activity(), before, "{door:?}, chunked: the store was used");
        assert_eq!(probe.runs(), 0, "{door:?}: the handler never ran");

        let small = raw_request("/orders", &headers, br#"{"item":"book"}"#);
        let reply = exchange(address, &small).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{door:?}: the key was never claimed: {reply:?}");
        assert_eq!(probe.runs(), 1);
        assert_ne!(store_activity(), before, "{door:?}: the store's activity is seen (the small body's claim)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_body_over_the_limit_is_refused_before_any_store_call() {
    let store = Faulty::new(idem::MemoryStore::new());
    oversized_bodies_are_413_before_the_store(engine(store.clone()), || store.total_calls()).await;
}

/// Calls of each command `server` ran (`INFO commandstats`), leaving out the store's background `PING`s and the
/// `INFO` that reads them.
fn commands_run(server: &RedisServer) -> Vec<(String, u64)> {
    let mut calls = all_command_calls(server);
    calls.retain(|(name, _)| name != "ping" && name != "info");
    calls.sort();
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_body_over_the_limit_is_refused_before_any_command() {
    let server = RedisServer::start();
    let store = idem::RedisStore::open(server.url()).await.unwrap();
    oversized_bodies_are_413_before_the_store(engine(store), || commands_run(&server)).await;
}

// --- no client bytes in Redis ---------------------------------------------------------------------------------

/// Everything a `MONITOR` connection receives, read on a task of its own.
struct Monitor {
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Monitor {
    async fn start(server: &RedisServer) -> Self {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut ok = [0u8; 5];
        stream.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n", "MONITOR accepted");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 64 << 10];
            while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                sink.lock().unwrap().extend_from_slice(&buffer[..read]);
            }
        });
        Self { seen }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until `marker` (a command the test sends last) shows up: everything before it has been seen.
    async fn caught_up_to(&self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.text();
            if text.contains(marker) {
                return text;
            }
            assert!(Instant::now() < deadline, "MONITOR never showed {marker:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `idem:{<64 hex digits>}` plus `suffix`.
fn is_digest_name(name: &str, suffix: &str) -> bool {
    name.strip_prefix("idem:{")
        .and_then(|rest| rest.strip_suffix(suffix))
        .and_then(|rest| rest.strip_suffix('}'))
        .is_some_and(|digest| digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_channels_and_commands_carry_no_client_key_or_credentials() {
    let server = RedisServer::start();
    let monitor = Monitor::start(&server).await;
    let idempotency = engine(idem::RedisStore::open(server.url()).await.unwrap());
    let stamp = unique("m");
    // Markers no store-generated text can contain by chance.
    let key_marker = format!("KEYMARK{stamp}");
    let auth_marker = format!("AUTHMARK{stamp}");
    let key = format!("order-{key_marker}-1");
    let authorization = format!("Bearer {auth_marker}");
    let auth = [("authorization", authorization.as_str())];
    let body = json!({ "item": "book" });

    // Every path a key takes through the store: claim and complete, replay, mismatch, release (a 5xx), a
    // duplicate that waits on the channel, the layer door, the quoted key form, the plain API.
    let (router, probe) = app(Door::Annotated, idempotency.clone());
    let first = send(&router, keyed_post("/orders", &key, &auth, &body)).await;
    assert_new(&first, 1);
    assert_replays(&send(&router, keyed_post("/orders", &key, &auth, &body)).await, &first);
    send(&router, keyed_post("/orders", &key, &auth, &json!({ "item": "lamp" })))
        .await
        .assert_problem(422, "key-reused");
    let quoted = format!("\"order-{key_marker}-1\"");
    assert_replays(&send(&router, keyed_post("/orders", &quoted, &auth, &body)).await, &first);
    let failed = send(&router, keyed_post("/failing", &format!("fail-{key_marker}"), &auth, &json!({}))).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);

    let waited_key = format!("wait-{key_marker}");
    let mut held = keyed_post("/orders/waiting", &waited_key, &auth, &body);
    held.headers_mut().insert("x-hold", HeaderValue::from_static("1"));
    let original = tokio::spawn({
        let router = router.clone();
        async move { send(&router, held).await }
    });
    probe.started().await;
    let duplicate = tokio::spawn({
        let router = router.clone();
        let request = keyed_post("/orders/waiting", &waited_key, &auth, &body);
        async move { send(&router, request).await }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let channels = loop {
        let channels = server.cli(&["PUBSUB", "CHANNELS", "*"]);
        if !channels.trim().is_empty() {
            break channels;
        }
        assert!(Instant::now() < deadline, "the waiting duplicate never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    probe.open();
    let original = original.await.unwrap();
    assert_replays(&duplicate.await.unwrap(), &original);

    let cookies = send(&router, keyed_post("/cookies", &format!("cookie-{key_marker}"), &auth, &json!({}))).await;
    assert_eq!(cookies.headers.get_all(header::SET_COOKIE).iter().count(), 2);

    let (layered, _) = app(Door::Layer, idempotency.clone());
    assert_new(&send(&layered, keyed_post("/orders", &format!("layer-{key_marker}"), &auth, &body)).await, 1);
    let once: u32 =
        idempotency.once("refunds", &format!("event-{key_marker}")).run(&1, || async { Ok::<_, ()>(7) }).await.unwrap();
    assert_eq!(once, 7);

    let end = format!("END-OF-TEST-{stamp}");
    server.cli(&["ECHO", &end]);
    let commands = monitor.caught_up_to(&end).await;

    let channels: Vec<&str> = channels.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    assert_eq!(channels.len(), 1, "{channels:?}");
    assert!(is_digest_name(channels[0], ":done"), "channel {:?} is not a digest", channels[0]);
    let keys = server.cli(&["--scan"]);
    let keys: Vec<&str> = keys.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    assert_eq!(keys.len(), 5, "orders, waited, cookies, layer, once (the failed key was released): {keys:?}");
    for name in &keys {
        assert!(is_digest_name(name, ""), "key {name:?} is not a digest");
        let value = server.cli(&["GET", name]);
        for marker in [key_marker.as_str(), &auth_marker, COOKIE_SECRET] {
            assert!(!value.contains(marker), "the record under {name} holds {marker:?}: {value}");
        }
    }
    assert!(commands.contains("EVALSHA") || commands.contains("EVAL"), "MONITOR saw the store's scripts");
    assert!(commands.contains(channels[0]), "MONITOR saw the channel subscribed or published");
    for marker in [key_marker.as_str(), &auth_marker, &stamp, COOKIE_SECRET] {
        let leaked: Vec<&str> = commands.lines().filter(|line| line.contains(marker) && !line.contains(&end)).collect();
        assert!(leaked.is_empty(), "client bytes {marker:?} reached redis: {leaked:#?}");
    }
}

// --- each case on memory and on a real redis-server -----------------------------------------------------------

macro_rules! on_both_stores {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(idem::MemoryStore::new()).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::redis_server::shared_node_store().await).await;
                }
            )+
        }
    };
}

on_both_stores!(
    each_principal_runs_once_and_gets_its_own_answer,
    a_custom_principal_function_replaces_the_authorization_header,
    set_cookie_is_never_replayed_on_either_door,
);
