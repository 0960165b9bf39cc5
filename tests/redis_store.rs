//! What only a real Redis can show: round trips per request (`INFO commandstats`), records readable with
//! `redis-cli`, owner fencing and notifications between separate store instances, on a node and on a Cluster.

mod redis_server;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::store::{
    Claimed, Entry, Fingerprint, InvalidPrefix, OwnerToken, Record, Store, StoreError, StoreKey, Stored, Write,
};
use idem::{Idempotency, RedisStore};
use redis_server::{RedisCluster, RedisServer, all_command_calls};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    runs: Arc<AtomicU64>,
}

impl axum::extract::FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

#[idem::idempotent(lease = 1)]
async fn charge(State(app): State<App>, body: String) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if let Some(millis) = body.strip_prefix("sleep ") {
        tokio::time::sleep(Duration::from_millis(millis.parse().unwrap())).await;
    }
    (StatusCode::CREATED, format!("charged {body}"))
}

fn app(store: RedisStore) -> (Router, Arc<AtomicU64>) {
    let runs = Arc::new(AtomicU64::new(0));
    let state = App { idempotency: Idempotency::new(store), runs: runs.clone() };
    (Router::new().route("/charges", post(charge)).with_state(state), runs)
}

async fn send(app: &Router, key: &str, body: &str) -> (StatusCode, String, Option<String>) {
    let request = Request::post("/charges").header("idempotency-key", key).body(Body::from(body.to_owned())).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let hit = response.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap(), hit)
}

/// Commands the server ran, sorted, minus the ones this test sends itself to read the counts and the store's
/// background `PING` (a few per second per process, not per request). Redis counts the calls a script makes too:
/// every script here starts with one `GET`, so `get == evalsha` also proves the client sent no `GET` of its own,
/// and each script's own `SET` is one of the `set` calls.
fn commands_run(server: &RedisServer) -> Vec<(String, u64)> {
    let mut calls: Vec<_> = all_command_calls(server)
        .into_iter()
        .filter(|(name, _)| name != "info" && name != "config|resetstat" && name != "ping")
        .collect();
    calls.sort();
    calls
}

fn calls(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(name, calls)| ((*name).to_owned(), *calls)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_costs_one_command_and_a_first_request_two() {
    let server = RedisServer::start();
    // A second process on the same Redis, which never saw the key.
    let (elsewhere, elsewhere_runs) = app(RedisStore::open(server.url()).await.unwrap());
    let (app, runs) = app(RedisStore::open(server.url()).await.unwrap());
    // Load the scripts once (a fresh server answers the first EVALSHA with NOSCRIPT).
    assert_eq!(send(&app, "warm-up", "x").await.0, StatusCode::CREATED);

    server.cli(&["CONFIG", "RESETSTAT"]);
    let (status, body, state) = send(&app, "first", "a").await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CREATED, "charged a", Some("new")));
    // Two round trips: the claim (`SET NX GET`, native) and the complete script (GET, SET, PUBLISH).
    assert_eq!(commands_run(&server), calls(&[("evalsha", 1), ("get", 1), ("publish", 1), ("set", 2)]));

    server.cli(&["CONFIG", "RESETSTAT"]);
    let (status, body, state) = send(&app, "first", "a").await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CREATED, "charged a", Some("hit")));
    // One round trip and no script: the process completed this key, so its claim reads the record with a `GET`.
    assert_eq!(commands_run(&server), calls(&[("get", 1)]));

    server.cli(&["CONFIG", "RESETSTAT"]);
    let (status, body, state) = send(&elsewhere, "first", "a").await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CREATED, "charged a", Some("hit")));
    // One round trip: the native claim-or-read, which finds the record and returns it.
    assert_eq!(commands_run(&server), calls(&[("set", 1)]));
    server.cli(&["CONFIG", "RESETSTAT"]);
    assert_eq!(send(&elsewhere, "first", "a").await.2.as_deref(), Some("hit"));
    // It has seen the record now: a `GET` from then on.
    assert_eq!(commands_run(&server), calls(&[("get", 1)]));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "warm-up + first");
    assert_eq!(elsewhere_runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_gone_since_its_key_completed_is_claimed_and_run_again() {
    let server = RedisServer::start();
    let (app, runs) = app(RedisStore::open(server.url()).await.unwrap());
    assert_eq!(send(&app, "gone", "a").await.2.as_deref(), Some("new"));
    // The record goes (its ttl ran out, or someone removed it) while the process remembers the key as completed.
    server.cli(&["FLUSHALL"]);

    server.cli(&["CONFIG", "RESETSTAT"]);
    let (status, body, state) = send(&app, "gone", "a").await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CREATED, "charged a", Some("new")));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "nothing was there to replay: it ran again");
    // The `GET` found nothing; the claim and the completion followed as for any first request.
    assert_eq!(commands_run(&server), calls(&[("evalsha", 1), ("get", 2), ("publish", 1), ("set", 2)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_costs_one_renewal_per_third_of_its_lease() {
    let server = RedisServer::start();
    let (app, runs) = app(RedisStore::open(server.url()).await.unwrap());
    // Loads every script, the renewal one included.
    assert_eq!(send(&app, "warm-up", "sleep 400").await.0, StatusCode::CREATED);
    server.cli(&["CONFIG", "RESETSTAT"]);
    // lease = 1 s, renewed every 333 ms: a 1.2 s handler renews 3 times (a loaded machine's late timers: 2 to 5).
    let (status, _, _) = send(&app, "long", "sleep 1200").await;
    assert_eq!(status, StatusCode::CREATED);
    let run = commands_run(&server);
    let renewals = run.iter().find(|(name, _)| name == "pexpire").map_or(0, |(_, calls)| *calls);
    assert!((2..=5).contains(&renewals), "{run:?}");
    // The claim is native; the completion and each renewal are scripts.
    let scripts = 1 + renewals;
    assert_eq!(
        run,
        calls(&[("evalsha", scripts), ("get", scripts), ("pexpire", renewals), ("publish", 1), ("set", 2)])
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_json_with_a_ttl_under_a_digest_never_the_raw_key() {
    let server = RedisServer::start();
    let (app, _) = app(RedisStore::open(server.url()).await.unwrap());
    let raw_key = "customer-visible-key-42";
    assert_eq!(send(&app, raw_key, "a").await.0, StatusCode::CREATED);

    let keys = server.cli(&["--scan"]);
    assert!(!keys.contains(raw_key), "raw client key reached the store: {keys}");
    let digest = StoreKey::derive(&[b"http", b"POST", b"/charges", b"", raw_key.as_bytes()]);
    let key = format!("idem:{{{}}}", digest.as_str());
    assert_eq!(keys.trim(), key);

    let record: serde_json::Value = serde_json::from_str(&server.cli(&["GET", &key])).expect("a JSON record");
    assert_eq!(record["state"], "completed");
    assert_eq!(record["status"], 201);
    assert_eq!(record["replayable"], true);
    assert_eq!(record["body"], "charged a");
    assert_eq!(record["fingerprint"].as_str().unwrap().len(), 64);
    let ttl: i64 = server.cli(&["TTL", &key]).trim().parse().unwrap();
    assert!((86_000..=86_400).contains(&ttl), "completed records keep the default 24 h ttl, got {ttl}");
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::builder().field(text.as_bytes()).finish()
}

fn record(body: &'static str) -> Record {
    Record {
        fingerprint: fp("a"),
        stored: Stored::Response(idem::store::StoredResponse { status: 200, headers: vec![], body: body.into() }),
    }
}

/// Claims `key` with a fresh owner token, which it returns; panics unless the claim was granted.
async fn owned(store: &RedisStore, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> OwnerToken {
    let owner = OwnerToken::generate();
    match store.claim(key, fingerprint, &owner, lease).await.unwrap() {
        Claimed::Owned => owner,
        other => panic!("expected to own the claim, got {other:?}"),
    }
}

/// Two store instances (as in two processes) on one backend.
async fn fencing_and_notification(first: RedisStore, second: RedisStore) {
    let key = StoreKey::derive(&[b"fencing", format!("{:?}", Instant::now()).as_bytes()]);
    let lease = Duration::from_millis(400);
    let stale = owned(&first, &key, &fp("a"), lease).await;
    assert_eq!(
        second.claim(&key, &fp("a"), &OwnerToken::generate(), lease).await.unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") })
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fresh = owned(&second, &key, &fp("a"), lease).await;
    let ttl = Duration::from_secs(60);
    assert_eq!(first.complete(&key, &stale, &record("stale"), ttl).await.unwrap(), Write::Fenced);
    assert_eq!(first.renew(&key, &stale, &fp("a"), lease).await.unwrap(), Write::Fenced);
    assert_eq!(first.release(&key, &stale).await.unwrap(), Write::Fenced);
    assert_eq!(second.renew(&key, &fresh, &fp("a"), Duration::from_secs(30)).await.unwrap(), Write::Applied);

    // A waiter on the other instance is woken by the completion's notification, long before its timeout.
    let waiter = tokio::spawn({
        let key = key.clone();
        async move {
            let started = Instant::now();
            first.wait(&key, Duration::from_secs(10)).await.unwrap();
            let waited = started.elapsed();
            (waited, first.claim(&key, &fp("a"), &OwnerToken::generate(), lease).await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(second.complete(&key, &fresh, &record("fresh"), ttl).await.unwrap(), Write::Applied);
    let (waited, seen) = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(2), "woken by the notification, not the 10 s timeout: {waited:?}");
    assert!(waited >= Duration::from_millis(250), "not before the completion: {waited:?}");
    assert_eq!(seen, Claimed::Existing(Entry::Completed(record("fresh"))));
}

/// A waiter whose original's lease runs out with nobody completing is released at the lease's end.
async fn waiters_wake_when_the_lease_runs_out(store: RedisStore) {
    let key = StoreKey::derive(&[b"expiry", format!("{:?}", Instant::now()).as_bytes()]);
    owned(&store, &key, &fp("a"), Duration::from_millis(500)).await;
    let started = Instant::now();
    store.wait(&key, Duration::from_secs(10)).await.unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2), "ended with the lease, not the timeout: {waited:?}");
    owned(&store, &key, &fp("a"), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fences_stale_owners_and_wakes_waiters_across_instances() {
    let server = RedisServer::start();
    let first = RedisStore::open(server.url()).await.unwrap();
    let second = RedisStore::open(server.url()).await.unwrap();
    fencing_and_notification(first, second).await;
    waiters_wake_when_the_lease_runs_out(RedisStore::open(server.url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_connection_manager_constructors_share_one_store() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let pool =
        deadpool_redis::Config::from_url(server.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let from_pool = RedisStore::builder().pool(pool, client.clone()).await.unwrap();
    let manager = client.get_connection_manager().await.unwrap();
    let from_manager = RedisStore::builder().connection_manager(manager, client).await.unwrap();
    fencing_and_notification(from_pool, from_manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_fences_stale_owners_and_wakes_waiters_with_sharded_pubsub() {
    let cluster = RedisCluster::start();
    let first = RedisStore::cluster(cluster.urls()).await.unwrap();
    let second = RedisStore::cluster(cluster.urls()).await.unwrap();
    fencing_and_notification(first, second).await;
    waiters_wake_when_the_lease_runs_out(RedisStore::cluster(cluster.urls()).await.unwrap()).await;

    // Several keys spread over the slots of all three masters, each completed with two scripts.
    let (app, runs) = app(RedisStore::cluster(cluster.urls()).await.unwrap());
    for key in 0..12 {
        assert_eq!(send(&app, &format!("warm-{key}"), "x").await.0, StatusCode::CREATED);
    }
    let count = |command| cluster.command_calls(command);
    let before = [count("set"), count("evalsha"), count("get")];
    for key in 0..12 {
        assert_eq!(send(&app, &format!("k-{key}"), "x").await.0, StatusCode::CREATED);
        assert_eq!(send(&app, &format!("k-{key}"), "x").await.2.as_deref(), Some("hit"));
    }
    let [sets, scripts, gets] = [count("set") - before[0], count("evalsha") - before[1], count("get") - before[2]];
    // One native claim per first request and one completion script, whose own GET and SET Redis counts too; a
    // replay of a key the process completed is one GET: 2 round trips per first request + 1 per replay.
    assert_eq!(scripts, 12, "one completion script per first request");
    let (claims, replays) = (sets - scripts, gets - scripts);
    assert_eq!((claims, replays), (12, 12), "one native claim per first request, one GET per replay");
    assert_eq!(claims + scripts + replays, 12 * 3, "round trips: 2 per first request + 1 per replay");
    assert_eq!(runs.load(Ordering::SeqCst), 24);
    let holding: Vec<usize> = cluster.nodes.iter().map(|node| node.cli(&["--scan"]).lines().count()).collect();
    assert!(holding.iter().filter(|&&keys| keys > 0).count() >= 2, "keys spread over the masters: {holding:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_goes_down_fails_closed_and_is_used_again_when_it_is_back() {
    let mut server = RedisServer::start();
    let (app, runs) = app(RedisStore::open(server.url()).await.unwrap());
    assert_eq!(send(&app, "before", "a").await.0, StatusCode::CREATED);

    server.kill();
    let (status, body, state) = send(&app, "while-down", "b").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("https://docs.rs/axum-idem/latest/idem/problems/index.html#store-unavailable"), "{body}");
    assert_eq!(state, None);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "nothing runs while the store is down");

    server.restart();
    // The connection manager reconnects by itself; the first attempts may still see the old connection fail.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body, state) = loop {
        let answer = send(&app, "while-down", "b").await;
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CREATED, "charged b", Some("new")));
    assert_eq!(send(&app, "while-down", "b").await.2.as_deref(), Some("hit"));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

fn record_key(key: &StoreKey) -> String {
    format!("idem:{{{}}}", key.as_str())
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary and a replica that has synced with it.
fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_for("the replica to sync", Duration::from_secs(15), || {
        replica.cli(&["INFO", "replication"]).contains("master_link_status:up")
    });
    (primary, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_claims_fail_closed_and_replays_never_wait() {
    let server = RedisServer::start();
    let plain = RedisStore::open(server.url()).await.unwrap();
    // A WAIT timeout well above a replay's round trip, so "replays never wait" is a wide margin on a busy machine.
    let wait = Duration::from_secs(1);
    let store = Arc::new(RedisStore::builder().wait_for_replicas(1, wait).open(server.url()).await.unwrap());
    let done = StoreKey::derive(&[b"replicas", b"done"]);
    let owner = owned(&plain, &done, &fp("a"), Duration::from_secs(30)).await;
    assert_eq!(plain.complete(&done, &owner, &record("done"), Duration::from_secs(60)).await.unwrap(), Write::Applied);

    let claims = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let key = StoreKey::derive(&[b"replicas", format!("claim-{i}").as_bytes()]);
            let started = Instant::now();
            let claimed = store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
            (key, claimed, started.elapsed())
        })
    });
    let replays = (0..10).map(|_| {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let claimed = store.claim(&done, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
            (claimed, started.elapsed())
        })
    });
    let (claims, replays) =
        tokio::join!(futures_util::future::join_all(claims), futures_util::future::join_all(replays));

    let replay_times: Vec<Duration> = replays.iter().map(|replay| replay.as_ref().unwrap().1).collect();
    println!("replays next to 10 claims waiting for a missing replica took {replay_times:?}");
    for replay in replays {
        let (claimed, took) = replay.unwrap();
        assert_eq!(claimed.unwrap(), Claimed::Existing(Entry::Completed(record("done"))));
        // The old code sent WAIT on the shared connection: replays queued behind it and timed out.
        assert!(took < wait / 2, "a replay never waits for replicas: {took:?}");
    }
    let claim_times: Vec<Duration> = claims.iter().map(|claim| claim.as_ref().unwrap().2).collect();
    println!("claims waiting for a missing replica took {claim_times:?}");
    for claim in claims {
        let (key, claimed, took) = claim.unwrap();
        let error = claimed.expect_err("a claim no replica acknowledged fails closed").to_string();
        assert!(error.contains("0 of 1 replicas"), "{error}");
        assert!(!error.contains("timed out"), "{error}");
        assert!(took >= wait - Duration::from_millis(50), "it waited for the replica: {took:?}");
        // Released, not left in flight: another caller can claim the key at once.
        owned(&plain, &key, &fp("a"), Duration::from_secs(30)).await;
    }
    assert_eq!(server.cli(&["--scan"]).lines().count(), 11, "the completed key and the 10 claims taken since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_first_requests_succeed_and_records_are_on_the_replica_when_complete_returns() {
    let (primary, replica) = primary_and_replica();
    let store =
        Arc::new(RedisStore::builder().wait_for_replicas(1, Duration::from_secs(1)).open(primary.url()).await.unwrap());
    let mut replica_connection =
        redis::Client::open(replica.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let writes = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let key = StoreKey::derive(&[b"replicated", format!("{i}").as_bytes()]);
            let owner = owned(&store, &key, &fp("a"), Duration::from_secs(30)).await;
            assert_eq!(
                store.complete(&key, &owner, &record("r"), Duration::from_secs(60)).await.unwrap(),
                Write::Applied
            );
            key
        })
    });
    for key in futures_util::future::join_all(writes).await {
        let key = key.unwrap();
        let held: Option<String> =
            redis::cmd("GET").arg(record_key(&key)).query_async(&mut replica_connection).await.unwrap();
        let held: serde_json::Value = serde_json::from_str(&held.expect("on the replica")).unwrap();
        assert_eq!(held["state"], "completed");
    }
    assert_eq!(store.unreplicated_completions(), 0);

    // Through the engine: ten concurrent first requests all run once and succeed.
    let (app, runs) =
        app(RedisStore::builder().wait_for_replicas(1, Duration::from_secs(1)).open(primary.url()).await.unwrap());
    let answers = futures_util::future::join_all((0..10).map(|i| {
        let app = app.clone();
        async move { send(&app, &format!("http-{i}"), "x").await }
    }))
    .await;
    for (status, _, state) in answers {
        assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreplicated_completion_is_applied_and_counted() {
    let server = RedisServer::start();
    let plain = RedisStore::open(server.url()).await.unwrap();
    let store =
        RedisStore::builder().wait_for_replicas(1, Duration::from_millis(100)).open(server.url()).await.unwrap();
    let key = StoreKey::derive(&[b"unreplicated"]);
    // Claimed without waiting for replicas, then completed by the store that does.
    let owner = owned(&plain, &key, &fp("a"), Duration::from_secs(30)).await;
    assert_eq!(store.complete(&key, &owner, &record("kept"), Duration::from_secs(60)).await.unwrap(), Write::Applied);
    assert_eq!(store.unreplicated_completions(), 1);
    assert_eq!(
        plain.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap(),
        Claimed::Existing(Entry::Completed(record("kept"))),
        "the record is on the primary and replays from there"
    );
}

/// The price of `wait_for_replicas` against a real replica: prints medians, asserts no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_replicas_cost_is_measured() {
    let (primary, _replica) = primary_and_replica();
    let plain = RedisStore::open(primary.url()).await.unwrap();
    let waiting = RedisStore::builder().wait_for_replicas(1, Duration::from_secs(1)).open(primary.url()).await.unwrap();
    let mut report = Vec::new();
    for (name, store) in [("without WAIT", &plain), ("wait_for_replicas(1)", &waiting), ("without WAIT, again", &plain)]
    {
        let mut first_requests = Vec::new();
        let mut replays = Vec::new();
        for i in 0..300 {
            let key = StoreKey::derive(&[name.as_bytes(), format!("{i}").as_bytes()]);
            let started = Instant::now();
            let owner = owned(store, &key, &fp("a"), Duration::from_secs(30)).await;
            assert_eq!(
                store.complete(&key, &owner, &record("r"), Duration::from_secs(60)).await.unwrap(),
                Write::Applied
            );
            first_requests.push(started.elapsed());
            let started = Instant::now();
            let replay = store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap();
            replays.push(started.elapsed());
            assert!(matches!(replay, Claimed::Existing(Entry::Completed(_))));
        }
        first_requests.sort();
        replays.sort();
        report.push(format!(
            "{name}: claim+complete median {:?} (p90 {:?}), replay median {:?}",
            first_requests[150], first_requests[270], replays[150]
        ));
    }
    assert_eq!(waiting.unreplicated_completions(), 0);
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_at_a_records_name_is_corrupt_not_unavailable() {
    let server = RedisServer::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    let key = StoreKey::derive(&[b"wrongtype"]);
    server.cli(&["HSET", &record_key(&key), "field", "value"]);
    let claimed = store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
    assert!(
        matches!(&claimed, Err(idem::store::StoreError::Corrupt(message)) if message.message().contains("WRONGTYPE")),
        "{claimed:?}"
    );
    // A server error says nothing about reachability: the store is not marked down.
    let other = StoreKey::derive(&[b"fine"]);
    owned(&store, &other, &fp("a"), Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_again_by_its_owner_is_owned_and_its_lease_starts_again() {
    let server = RedisServer::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    let key = StoreKey::derive(&[b"resent"]);
    let owner = OwnerToken::generate();
    assert_eq!(store.claim(&key, &fp("a"), &owner, Duration::from_secs(2)).await.unwrap(), Claimed::Owned);
    assert_eq!(store.claim(&key, &fp("a"), &owner, Duration::from_secs(600)).await.unwrap(), Claimed::Owned);
    let pttl: i64 = server.cli(&["PTTL", &record_key(&key)]).trim().parse().unwrap();
    assert!(pttl > 500_000, "the resent claim's lease (600 s) replaced the first one (2 s): {pttl} ms");
}

/// Every connecting constructor is `async` and connects before it returns, so a store that cannot reach Redis is
/// refused at start-up (`Unavailable`) rather than at the first request; a configuration that can never work is
/// refused (`InvalidConfig`) before any connection is tried. Before, `sentinel`, `sentinel_client`, `pool` and
/// `connection_manager` returned a store whatever Redis did, and a bad prefix was refused by a setter on the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_constructor_connects_now_and_refuses_a_bad_configuration_first() {
    let mut server = RedisServer::start();
    let url = server.url();
    let client = redis::Client::open(url.clone()).unwrap();
    let manager = client.get_connection_manager().await.unwrap();
    let pool = || deadpool_redis::Config::from_url(url.clone()).create_pool(Some(deadpool_redis::Runtime::Tokio1));
    let sentinel_client = || {
        let service = String::from("orders");
        redis::sentinel::SentinelClient::build(
            vec![url.clone()],
            service,
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .unwrap()
    };
    let answering = RedisStore::builder().connection_manager(manager.clone(), client.clone()).await;
    assert!(answering.is_ok(), "{answering:?}");
    server.kill();

    let builder = || RedisStore::builder().connect_timeout(Duration::from_millis(300));
    let unreachable = [
        ("open", builder().open(url.clone()).await.map(drop)),
        ("client", builder().client(client.clone()).await.map(drop)),
        ("connection_manager", builder().connection_manager(manager.clone(), client.clone()).await.map(drop)),
        ("pool", builder().pool(pool().unwrap(), client.clone()).await.map(drop)),
        ("cluster", builder().cluster([url.clone()]).await.map(drop)),
        ("sentinel", builder().sentinel([url.clone()], "orders").await.map(drop)),
        ("sentinel_client", builder().sentinel_client(sentinel_client()).await.map(drop)),
    ];
    for (constructor, result) in unreachable {
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{constructor}: {result:?}");
    }

    // Refused before connecting: `InvalidConfig`, not `Unavailable`, though nothing listens.
    let bad = || builder().prefix("tenant-{a}:");
    let misconfigured = [
        ("open", bad().open(url.clone()).await.map(drop)),
        ("client", bad().client(client.clone()).await.map(drop)),
        ("connection_manager", bad().connection_manager(manager.clone(), client.clone()).await.map(drop)),
        ("pool", bad().pool(pool().unwrap(), client.clone()).await.map(drop)),
        ("cluster", bad().cluster([url.clone()]).await.map(drop)),
        ("sentinel", bad().sentinel([url.clone()], "orders").await.map(drop)),
        ("sentinel_client", bad().sentinel_client(sentinel_client()).await.map(drop)),
        ("a URL that does not parse", builder().open("redis://127.0.0.1:notaport").await.map(drop)),
    ];
    for (constructor, result) in misconfigured {
        let Err(StoreError::InvalidConfig(cause)) = &result else { panic!("{constructor}: {result:?}") };
        if constructor != "a URL that does not parse" {
            let prefix = std::error::Error::source(cause).and_then(|source| source.downcast_ref::<InvalidPrefix>());
            assert_eq!(prefix, Some(&InvalidPrefix(String::from("tenant-{a}:"))), "{constructor}");
        }
    }
}

fn used_memory(server: &RedisServer) -> u64 {
    let memory = server.cli(&["INFO", "memory"]);
    let used = memory.lines().find_map(|line| line.strip_prefix("used_memory:")).expect("used_memory in INFO memory");
    used.trim().parse().expect("a byte count")
}

/// An OOM answer to the native claim (`SET … NX GET` under `maxmemory` with `noeviction`) is a store failure
/// (`503 store-unavailable`, nothing runs), not a sign of a Redis older than 7.0: once memory is freed, claims are
/// native `SET`s again. The old code switched every later claim to the claim script on any error reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_claim_fails_503_and_later_claims_stay_native() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let runs = Arc::new(AtomicU64::new(0));
    let idempotency = Idempotency::new(RedisStore::open(server.url()).await.unwrap());
    let state = App { idempotency: idempotency.clone(), runs: runs.clone() };
    let app = Router::new().route("/charges", post(charge)).with_state(state);
    // Loads the completion script (a fresh server answers the first EVALSHA with NOSCRIPT).
    assert_eq!(send(&app, "warm-up", "x").await.0, StatusCode::CREATED);

    // 8 MB of filler over a limit 4 MB above what the server held: every write that may grow memory is refused.
    let before = used_memory(&server);
    server.cli(&["SETRANGE", "filler", &(8 << 20).to_string(), "x"]);
    server.cli(&["CONFIG", "SET", "maxmemory", &(before + (4 << 20)).to_string()]);
    let refused = server.cli(&["SET", "probe", "x"]);
    assert!(refused.starts_with("OOM"), "the server refuses writes: {refused}");

    let (status, body, state) = send(&app, "oom", "a").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("#store-unavailable"), "{body}");
    assert_eq!(state, None);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler did not run");
    assert_eq!(rejected_calls(&server, "set"), 2, "the probe's SET and the claim's were refused");

    server.cli(&["DEL", "filler"]);
    // Whatever the engine left to do in the background after the refused claim, done before counting.
    idempotency.drain(Duration::from_secs(3)).await.unwrap();
    server.cli(&["CONFIG", "RESETSTAT"]);
    for (key, body) in [("oom", "a"), ("after-oom", "b")] {
        let (status, answer, state) = send(&app, key, body).await;
        assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{answer}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Two first requests, each a native claim (`SET NX GET`) and a completion script (its GET, SET, PUBLISH); no
    // claim script (it would add an `evalsha` and a `get` each).
    assert_eq!(commands_run(&server), calls(&[("evalsha", 2), ("get", 2), ("publish", 2), ("set", 4)]));
}

/// `rejected_calls` of `cmdstat_<command>`: calls refused before running (an OOM, a syntax error); 0 when none.
fn rejected_calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    let line = stats.lines().find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:"))).unwrap_or("");
    line.split(',').find_map(|field| field.strip_prefix("rejected_calls=")).map_or(0, |calls| calls.parse().unwrap())
}
