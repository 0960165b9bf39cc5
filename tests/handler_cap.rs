//! The bound on handlers running at once (`IdempotencyBuilder::max_running_handlers`, issue 16 item 7). Handlers run
//! on tasks of their own and outlive clients that disconnect, so without a bound a flood of requests whose clients
//! leave grows running handlers without limit. Beyond the bound a request is refused with `503 at-capacity` and
//! `Retry-After` before the store is touched, and counted as `Event::AtCapacity`.

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::metrics::{Counters, Event, Metrics, Snapshot, StoreOperation};
use idem::test_kit::client::{Reply, exchange, fresh_key, raw_request, serve};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

/// What the handlers saw: how many ran at once, at most, and each key's runs.
struct Seen {
    running: AtomicUsize,
    most: AtomicUsize,
    runs: Mutex<HashMap<String, usize>>,
    started: Notify,
    /// Held handlers (`x-hold: gate`) wait for a permit here.
    gate: Semaphore,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            runs: Mutex::default(),
            started: Notify::new(),
            gate: Semaphore::new(0),
        }
    }
}

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    seen: Arc<Seen>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// Counts the run, then holds as `x-hold` says: `<n>ms` sleeps, `gate` waits for the test.
async fn order(app: &App, headers: &HeaderMap) -> Response {
    let seen = &app.seen;
    let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most.fetch_max(now, Ordering::SeqCst);
    let key = headers.get("idempotency-key").map_or("", |value| value.to_str().unwrap()).to_owned();
    let run = {
        let mut runs = seen.runs.lock().unwrap();
        let runs_of_key = runs.entry(key).or_default();
        *runs_of_key += 1;
        runs.values().sum::<usize>()
    };
    seen.started.notify_waiters();
    match headers.get("x-hold").map(|value| value.to_str().unwrap()) {
        Some("gate") => seen.gate.acquire().await.unwrap().forget(),
        Some(millis) => {
            let millis = millis.strip_suffix("ms").unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        None => {}
    }
    seen.running.fetch_sub(1, Ordering::SeqCst);
    (StatusCode::CREATED, Json(json!({ "run": run }))).into_response()
}

#[idempotent]
async fn annotated_order(State(app): State<App>, headers: HeaderMap) -> Response {
    order(&app, &headers).await
}

#[idempotent(required = false)]
async fn annotated_optional(State(app): State<App>, headers: HeaderMap) -> Response {
    order(&app, &headers).await
}

async fn plain_order(State(app): State<App>, headers: HeaderMap) -> Response {
    order(&app, &headers).await
}

/// Returns once `count` handlers are running.
async fn until_running(seen: &Seen, count: usize) {
    loop {
        // Registered before the count is read, so a handler starting in between still wakes this wait.
        let started = seen.started.notified();
        if seen.running.load(Ordering::SeqCst) >= count {
            return;
        }
        started.await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Door {
    Annotated,
    Layer,
}

/// `/orders` requires a key; `/optional` runs without one, unprotected.
fn app(door: Door, idempotency: Idempotency) -> (Router, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let state = App { idempotency: idempotency.clone(), seen: seen.clone() };
    let router = match door {
        Door::Annotated => {
            Router::new().route("/orders", post(annotated_order)).route("/optional", post(annotated_optional))
        }
        Door::Layer => Router::new()
            .route("/orders", post(plain_order))
            .route("/optional", post(plain_order))
            .layer(idempotency.layer()),
    };
    (router.with_state(state), seen)
}

/// The engine's counters and the store's claims.
#[derive(Default)]
struct Observed {
    counters: Counters,
    claims: AtomicUsize,
}

impl Metrics for Observed {
    fn record(&self, event: Event) {
        self.counters.record(event);
    }

    fn observe_wait(&self, waited: Duration) {
        self.counters.observe_wait(waited);
    }

    fn observe_store(&self, operation: StoreOperation, _: Duration, _: bool) {
        if operation == StoreOperation::Claim {
            self.claims.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Observed {
    fn snapshot(&self) -> Snapshot {
        self.counters.snapshot()
    }

    fn claims(&self) -> usize {
        self.claims.load(Ordering::SeqCst)
    }
}

#[track_caller]
fn assert_at_capacity(reply: &Reply) {
    reply.assert_problem(503, "at-capacity");
    assert_eq!(reply.header(header::RETRY_AFTER), Some("1"), "the default Retry-After: {reply:?}");
    assert_eq!(reply.header("x-idempotency-status"), None, "nothing ran: {reply:?}");
}

// --- the flood ------------------------------------------------------------------------------------------------

const CAP: usize = 8;
const FLOOD: usize = 200;
/// How long each flooding request's handler sleeps: longer than the flood takes to arrive, so the excess meets a
/// full engine.
const HOLD: Duration = Duration::from_millis(3000);
/// How long a flooding client waits for an answer before it disconnects. A refusal comes at once; an admitted
/// request's handler is still sleeping then, so its client leaves while it runs.
const PATIENCE: Duration = Duration::from_millis(1500);

fn order_request(key: &str, hold: Option<&str>) -> Vec<u8> {
    let mut headers: Vec<(&str, &[u8])> =
        vec![("idempotency-key", key.as_bytes()), ("content-type", b"application/json"), ("connection", b"close")];
    if let Some(hold) = hold {
        headers.push(("x-hold", hold.as_bytes()));
    }
    raw_request("/orders", &headers, b"{\"item\":\"book\"}")
}

/// Sends `request` and reads the answer for at most [`PATIENCE`]; then disconnects. `None`: no answer came.
async fn send_and_leave(address: SocketAddr, request: Vec<u8>) -> Option<Reply> {
    let mut stream = TcpStream::connect(address).await.expect("connect to the test server");
    stream.write_all(&request).await.expect("send the request");
    let mut raw = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await {
        Ok(read) => {
            read.expect("read the answer");
            Some(parse(&raw))
        }
        // Dropping the stream closes the connection with the handler still running.
        Err(_) => None,
    }
}

/// An HTTP/1.1 answer with a `content-length` body (every answer here has one).
fn parse(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = std::str::from_utf8(&raw[..split]).expect("a text head");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|line| line.split(' ').nth(1)).expect("a status line");
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("a header line");
        headers.append(header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.trim().parse().unwrap());
    }
    Reply { status: status.parse().unwrap(), headers, body: raw[split + 4..].to_vec().into() }
}

/// A flood of clients that send a keyed request and leave while its handler sleeps, over a real socket: at most
/// `CAP` handlers ever run at once; the rest are refused with `503 at-capacity` and `Retry-After`, counted, and
/// claimed nothing, so each one's retry after the flood runs (and each admitted one's retry replays). Every key
/// runs exactly once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_disconnecting_clients_never_runs_more_handlers_than_the_cap() {
    let observed = Arc::new(Observed::default());
    let idempotency =
        Idempotency::builder(MemoryStore::new()).max_running_handlers(CAP).metrics(observed.clone()).build();
    let (router, seen) = app(Door::Annotated, idempotency.clone());
    let address = serve(router).await;

    let keys: Vec<String> = (0..FLOOD).map(|_| fresh_key("flood")).collect();
    let hold = format!("{}ms", HOLD.as_millis());
    let clients: Vec<_> =
        keys.iter().map(|key| tokio::spawn(send_and_leave(address, order_request(key, Some(&hold))))).collect();
    let mut answered = 0;
    for client in clients {
        if let Some(reply) = client.await.unwrap() {
            assert_at_capacity(&reply);
            answered += 1;
        }
    }
    // Every admitted handler outlived its client; let them finish and record their answers.
    idempotency.drain(Duration::from_secs(30)).await.expect("the flood's handlers finish");

    let ran_in_flood = seen.runs.lock().unwrap().len();
    let most = seen.most.load(Ordering::SeqCst);
    assert!(most <= CAP, "{most} handlers ran at once, over the cap of {CAP}");
    assert_eq!(most, CAP, "the flood filled the engine");
    let refused = FLOOD - ran_in_flood;
    eprintln!("flood of {FLOOD}: {ran_in_flood} ran (at most {most} at once), {refused} refused");
    assert!(refused >= FLOOD / 2, "only {refused} of {FLOOD} refused: the flood did not meet a full engine");
    assert_eq!(answered, refused, "every refused client got its answer at once; every admitted one left first");
    let after_flood = observed.snapshot();
    assert_eq!((after_flood.new, after_flood.at_capacity), (ran_in_flood as u64, refused as u64), "{after_flood:?}");
    assert_eq!(observed.claims(), ran_in_flood, "a refused request reached the store");

    // The retries, once the flood is over: nothing was claimed for a refused key, so it runs now; an admitted key
    // replays the answer its handler recorded after its client left.
    let ran_before: HashMap<String, usize> = seen.runs.lock().unwrap().clone();
    for key in &keys {
        let retry = exchange(address, &order_request(key, None)).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
        let expected = if ran_before.contains_key(key) { "hit" } else { "new" };
        assert_eq!(retry.header("x-idempotency-status"), Some(expected), "{key}: {retry:?}");
    }
    let runs = seen.runs.lock().unwrap();
    assert_eq!(runs.len(), FLOOD, "every key ran");
    assert!(runs.values().all(|&runs| runs == 1), "a key ran twice: {runs:?}");
    let end = observed.snapshot();
    assert_eq!((end.new, end.hit, end.at_capacity), (FLOOD as u64, ran_in_flood as u64, refused as u64), "{end:?}");
}

// --- what else the bound refuses ------------------------------------------------------------------------------

async fn send(router: &Router, path: &str, key: Option<&str>, hold: bool) -> Reply {
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if hold {
        request = request.header("x-hold", "gate");
    }
    let request = request.body(Body::from("{\"item\":\"lamp\"}")).unwrap();
    Reply::read(router.clone().oneshot(request).await.expect("infallible")).await
}

/// At the bound, on both doors, a replay of a completed key, a duplicate of the running one and a request without a
/// key (run unprotected, on a task of its own too) are refused like a new key, without a store call: telling a
/// replay apart would take one. Once the running handler ends, each is answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_duplicates_and_unkeyed_requests_at_the_cap_are_refused_without_a_store_call() {
    for door in [Door::Annotated, Door::Layer] {
        let observed = Arc::new(Observed::default());
        let idempotency =
            Idempotency::builder(MemoryStore::new()).max_running_handlers(1).metrics(observed.clone()).build();
        let (router, seen) = app(door, idempotency);
        let completed = fresh_key("completed");
        let original = send(&router, "/orders", Some(&completed), false).await;
        original.assert_new(&completed);

        let running = fresh_key("running");
        let held = tokio::spawn({
            let (router, running) = (router.clone(), running.clone());
            async move { send(&router, "/orders", Some(&running), true).await }
        });
        until_running(&seen, 1).await;
        let claims = observed.claims();

        let replay = send(&router, "/orders", Some(&completed), false).await;
        assert_at_capacity(&replay);
        let duplicate = send(&router, "/orders", Some(&running), false).await;
        assert_at_capacity(&duplicate);
        let unkeyed = send(&router, "/optional", None, false).await;
        assert_at_capacity(&unkeyed);
        assert_eq!(observed.claims(), claims, "{door:?}: a refusal reached the store");
        assert_eq!(seen.runs.lock().unwrap().values().sum::<usize>(), 2, "{door:?}: a refused request ran");

        seen.gate.add_permits(1);
        let held = held.await.unwrap();
        held.assert_new(&running);
        send(&router, "/orders", Some(&completed), false).await.assert_replays(&original, &completed);
        send(&router, "/orders", Some(&running), false).await.assert_replays(&held, &running);
        let unkeyed = send(&router, "/optional", None, false).await;
        assert_eq!(unkeyed.status, StatusCode::CREATED, "{door:?}: {unkeyed:?}");
        let snapshot = observed.snapshot();
        assert_eq!((snapshot.new, snapshot.hit, snapshot.at_capacity), (2, 2, 3), "{door:?}: {snapshot:?}");
    }
}

/// A client still sending its body holds no slot: with a bound of one, a request whose body never finishes arriving
/// does not keep another from running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_its_body_holds_no_slot() {
    let idempotency = Idempotency::builder(MemoryStore::new()).max_running_handlers(1).build();
    let (router, seen) = app(Door::Annotated, idempotency);
    let address = serve(router).await;
    let mut slow = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: 127.0.0.1\r\nidempotency-key: {}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n{{\"item\":",
        fresh_key("slow")
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // Long enough for the server to have read the head and started on the body.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let key = fresh_key("quick");
    let quick = exchange(address, &order_request(&key, None)).await;
    assert_eq!(quick.status, StatusCode::CREATED, "{quick:?}");
    quick.assert_new(&key);
    assert_eq!(seen.runs.lock().unwrap().len(), 1);
    drop(slow);
}

/// `None` lifts the bound; `retry_after_at_capacity` sets the refusal's `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_can_be_lifted_and_its_retry_after_set() {
    let (unbounded, seen) =
        app(Door::Annotated, Idempotency::builder(MemoryStore::new()).max_running_handlers(None).build());
    let held: Vec<_> = (0..3)
        .map(|_| {
            let router = unbounded.clone();
            tokio::spawn(async move { send(&router, "/orders", Some(&fresh_key("unbounded")), true).await })
        })
        .collect();
    until_running(&seen, 3).await;
    seen.gate.add_permits(3);
    for held in held {
        assert_eq!(held.await.unwrap().status, StatusCode::CREATED);
    }

    let idempotency = Idempotency::builder(MemoryStore::new())
        .max_running_handlers(1)
        .retry_after_at_capacity(Duration::from_millis(2500))
        .build();
    let (bounded, seen) = app(Door::Annotated, idempotency);
    let held = tokio::spawn({
        let router = bounded.clone();
        async move { send(&router, "/orders", Some(&fresh_key("bounded")), true).await }
    });
    until_running(&seen, 1).await;
    let refused = send(&bounded, "/orders", Some(&fresh_key("bounded")), false).await;
    refused.assert_problem(503, "at-capacity");
    assert_eq!(refused.header(header::RETRY_AFTER), Some("3"), "2.5 s, rounded up");
    seen.gate.add_permits(1);
    assert_eq!(held.await.unwrap().status, StatusCode::CREATED);
}
