//! The operator's surface: finding, inspecting and forgetting records, checking the store, and metrics that say
//! where each event happened and how long each store call took.

mod postgres_server;
mod redis_server;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idem::metrics::{Event, Metrics, Site, StoreOperation};
use idem::store::{
    Entry, Fingerprint, Forgotten, OwnerToken, Record, Store, StoreError, Stored, StoredResponse, Write,
};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent]
async fn order(State(runs): State<Runs>, Path(id): Path<u32>) -> (StatusCode, Json<Value>) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "order": id, "run": run })))
}

async fn send(app: &Router, path: &str, key: &str) -> (StatusCode, Option<String>) {
    let request = Request::post(path).header("idempotency-key", key).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let outcome = response.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    (response.status(), outcome)
}

#[tokio::test]
async fn an_operator_inspects_and_forgets_a_record_and_the_key_runs_again() {
    let idempotency = Idempotency::in_memory();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders/{id}", post(order))
        .with_state(runs.clone())
        .layer(axum::Extension(idempotency.clone()));
    assert_eq!(send(&app, "/orders/7", "k").await, (StatusCode::CREATED, Some("new".into())));

    let key = idempotency.http_store_key(&Method::POST, "/orders/7", b"", "k");
    let Some(Entry::Completed(record)) = idempotency.inspect(&key).await.unwrap() else { panic!("a completed record") };
    let Stored::Response(response) = &record.stored else { panic!("a replayable response") };
    assert_eq!(response.status, 201);
    assert_eq!(serde_json::from_slice::<Value>(&response.body).unwrap(), json!({ "order": 7, "run": 1 }));
    // Another path, principal or key is another record.
    let other = idempotency.http_store_key(&Method::POST, "/orders/8", b"", "k");
    assert_eq!(idempotency.inspect(&other).await.unwrap(), None);
    assert_eq!(idempotency.forget(&other).await.unwrap(), Forgotten::Absent);

    assert_eq!(idempotency.forget(&key).await.unwrap(), Forgotten::Removed);
    assert_eq!(idempotency.inspect(&key).await.unwrap(), None);
    assert_eq!(send(&app, "/orders/7", "k").await, (StatusCode::CREATED, Some("new".into())));
    assert_eq!(runs.0.load(Ordering::SeqCst), 2, "a forgotten key runs again");
}

#[tokio::test]
async fn an_in_flight_claim_is_never_forgotten() {
    let idempotency = Idempotency::in_memory();
    let key = idempotency.once_store_key("jobs", "job-1");
    let started = Arc::new(tokio::sync::Notify::new());
    let finish = Arc::new(tokio::sync::Notify::new());
    let job = tokio::spawn({
        let (idempotency, started, finish) = (idempotency.clone(), started.clone(), finish.clone());
        async move {
            idempotency
                .once("jobs", "job-1")
                .run(&(), || async move {
                    started.notify_one();
                    finish.notified().await;
                    Ok::<_, ()>(1)
                })
                .await
        }
    });
    started.notified().await;
    assert!(matches!(idempotency.inspect(&key).await.unwrap(), Some(Entry::InFlight { .. })));
    assert_eq!(idempotency.forget(&key).await.unwrap(), Forgotten::InFlight);
    let duplicate = idempotency.once("jobs", "job-1").run(&(), || async { Ok::<_, ()>(2) }).await;
    assert!(matches!(duplicate, Err(idem::once::OnceError::InFlight)), "{duplicate:?}");
    finish.notify_one();
    assert_eq!(job.await.unwrap().unwrap(), 1);
    assert!(matches!(idempotency.inspect(&key).await.unwrap(), Some(Entry::Completed(_))));
}

#[tokio::test]
async fn the_store_check_answers_with_the_round_trip() {
    let idempotency = Idempotency::in_memory();
    let round_trip = idempotency.check_store(Duration::from_secs(1)).await.unwrap();
    assert!(round_trip < Duration::from_secs(1));
}

/// Every labelled event and every timed store call.
#[derive(Default)]
struct Recorded {
    events: Mutex<Vec<(Event, String, String)>>,
    store_calls: Mutex<Vec<(StoreOperation, bool)>>,
}

impl Metrics for Recorded {
    fn record(&self, _: Event) {
        panic!("the engine reports events with their site");
    }
    fn observe_wait(&self, _: Duration) {}
    fn record_at(&self, event: Event, site: &Site<'_>) {
        self.events.lock().unwrap().push((event, site.door.to_owned(), site.route.to_owned()));
    }
    fn observe_store(&self, operation: StoreOperation, _: Duration, answered: bool) {
        self.store_calls.lock().unwrap().push((operation, answered));
    }
}

#[tokio::test]
async fn metrics_name_the_door_and_route_of_every_event_and_time_every_store_call() {
    let recorded = Arc::new(Recorded::default());
    let idempotency = Idempotency::builder(MemoryStore::new()).metrics(recorded.clone()).build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders/{id}", post(order))
        .route("/notes", post(|| async { "noted" }).layer(idempotency.layer()))
        .with_state(runs.clone())
        .layer(axum::Extension(idempotency.clone()));
    send(&app, "/orders/1", "a").await;
    send(&app, "/orders/2", "a").await;
    send(&app, "/orders/1", "a").await;
    send(&app, "/notes", "n").await;
    idempotency.once("emails", "e-1").run(&(), || async { Ok::<_, ()>(()) }).await.unwrap();
    idempotency.check_store(Duration::from_secs(1)).await.unwrap();

    let events = recorded.events.lock().unwrap().clone();
    let site = |door: &str, route: &str| (door.to_owned(), route.to_owned());
    assert_eq!(
        events.into_iter().map(|(event, door, route)| (event, (door, route))).collect::<Vec<_>>(),
        [
            (Event::New, site("handler", "/orders/{id}")),
            (Event::New, site("handler", "/orders/{id}")),
            (Event::Hit, site("handler", "/orders/{id}")),
            (Event::New, site("layer", "/notes")),
            (Event::New, site("once", "emails")),
        ],
        "labelled with the route template, never the raw path"
    );
    let calls = recorded.store_calls.lock().unwrap().clone();
    let count = |operation| calls.iter().filter(|(op, answered)| *op == operation && *answered).count();
    assert_eq!(count(StoreOperation::Claim), 5);
    assert_eq!(count(StoreOperation::Complete), 4);
    assert_eq!(count(StoreOperation::Ping), 1);
    assert!(calls.iter().all(|(_, answered)| *answered));
}

/// The optional verbs on a built-in store: `inspect` reads what `claim` and `complete` wrote, `forget` never removes
/// an in-flight claim and frees a completed key (waking its waiters), `ping` answers.
async fn inspect_forget_and_ping_on(store: impl Store) {
    let store = Arc::new(store);
    let idempotency = Idempotency::new(store.clone());
    let key = idempotency.once_store_key("operations", &format!("k-{}", OwnerToken::generate().as_str()));
    let fingerprint = Fingerprint::builder().field(b"request").finish();
    let owner = OwnerToken::generate();
    assert_eq!(store.inspect(&key).await.unwrap(), None);
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Absent);
    assert_eq!(
        store.claim(&key, &fingerprint, &owner, Duration::from_secs(30)).await.unwrap(),
        idem::store::Claimed::Owned
    );
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::InFlight { fingerprint }));
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::InFlight);
    let record = Record {
        fingerprint,
        stored: Stored::Response(StoredResponse { status: 201, headers: vec![], body: "done".into() }),
    };
    assert_eq!(store.complete(&key, &owner, &record, Duration::from_secs(60)).await.unwrap(), Write::Applied);
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::Completed(record)));
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Removed);
    assert_eq!(store.inspect(&key).await.unwrap(), None);
    let again = store.claim(&key, &fingerprint, &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap();
    assert_eq!(again, idem::store::Claimed::Owned, "a forgotten key is free");
    store.ping().await.unwrap();
    assert!(idempotency.check_store(Duration::from_secs(1)).await.is_ok());
}

#[tokio::test]
async fn inspect_forget_and_ping_on_memory() {
    inspect_forget_and_ping_on(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_forget_and_ping_on_redis() {
    inspect_forget_and_ping_on(redis_server::shared_node_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_forget_and_ping_on_postgres() {
    inspect_forget_and_ping_on(postgres_server::shared_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_check_fails_while_redis_is_down_and_recovers() {
    let mut server = redis_server::RedisServer::start();
    let idempotency = Idempotency::new(idem::RedisStore::open(server.url()).await.unwrap());
    idempotency.check_store(Duration::from_secs(1)).await.unwrap();
    server.kill();
    let down = idempotency.check_store(Duration::from_secs(2)).await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while idempotency.check_store(Duration::from_secs(1)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the store check never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_an_unreadable_redis_entry_frees_its_key() {
    let server = redis_server::RedisServer::start();
    let idempotency = Idempotency::new(idem::RedisStore::open(server.url()).await.unwrap());
    let key = idempotency.once_store_key("jobs", "corrupt");
    server.cli(&["HSET", &format!("idem:{{{}}}", key.as_str()), "not", "a record"]);
    assert!(matches!(idempotency.inspect(&key).await, Err(StoreError::Corrupt(_))));
    assert_eq!(idempotency.forget(&key).await.unwrap(), Forgotten::Removed);
    let ran = idempotency.once("jobs", "corrupt").run(&(), || async { Ok::<_, ()>(7) }).await.unwrap();
    assert_eq!(ran, 7, "the key runs once its unreadable entry is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_check_gives_up_at_its_own_timeout_on_a_frozen_redis() {
    let server = redis_server::RedisServer::start();
    let idempotency = Idempotency::new(idem::RedisStore::open(server.url()).await.unwrap());
    idempotency.check_store(Duration::from_secs(1)).await.unwrap();
    server.freeze();
    let started = std::time::Instant::now();
    let frozen = idempotency.check_store(Duration::from_millis(150)).await;
    let took = started.elapsed();
    server.thaw();
    assert!(matches!(frozen, Err(StoreError::Unavailable(_))), "{frozen:?}");
    // Well before the store's own 1 s response timeout: the probe's bound is the caller's.
    assert!(took < Duration::from_millis(700), "{took:?}");
}
