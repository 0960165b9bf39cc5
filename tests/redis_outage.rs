//! A Redis that dies, comes back, or hangs: requests fail fast while it is down (no reconnect backoff in the request
//! path), and every store, idle ones included, serves again within a second of its return. All processes are real:
//! `redis-server` is killed with SIGKILL, restarted on the same port, or stopped with SIGSTOP.

mod redis_server;

use idem::RedisStore;
use idem::store::{Claimed, Fingerprint, OwnerToken, Store, StoreError, StoreKey};
use redis_server::RedisServer;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(30);

fn key(name: &str) -> StoreKey {
    StoreKey::derive(&[b"outage", name.as_bytes()])
}

fn fingerprint() -> Fingerprint {
    Fingerprint::builder().field(b"body").finish()
}

async fn claim(store: &RedisStore, name: &str) -> (Result<Claimed, StoreError>, Duration) {
    let started = Instant::now();
    let claimed = store.claim(&key(name), &fingerprint(), &OwnerToken::generate(), LEASE).await;
    (claimed, started.elapsed())
}

fn assert_unavailable(claimed: &Result<Claimed, StoreError>) {
    assert!(matches!(claimed, Err(StoreError::Unavailable(_))), "expected StoreError::Unavailable, got {claimed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_fails_the_first_claim_within_the_timeout_and_the_next_ones_at_once() {
    let mut server = RedisServer::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    assert_eq!(claim(&store, "before").await.0.unwrap(), Claimed::Owned);

    server.kill();
    let mut took = Vec::new();
    for attempt in 0..5 {
        let (claimed, elapsed) = claim(&store, &format!("while-down-{attempt}")).await;
        assert_unavailable(&claimed);
        took.push(elapsed);
    }
    println!("claims against a killed redis-server took {took:?}");
    // The default timeouts bound a call to 1 s (connect 500 ms + response 500 ms); the old code spent ~9 s per
    // call in the connection manager's reconnect backoff.
    assert!(took[0] < Duration::from_millis(1500), "first claim: {took:?}");
    for (attempt, elapsed) in took.iter().enumerate().skip(1) {
        // Known down: answered without touching the network (< 1 ms here; bounded generously for a busy machine).
        assert!(*elapsed < Duration::from_millis(200), "claim {attempt}: {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_idle_through_an_outage_serves_its_first_claim_after_the_restart() {
    let mut server = RedisServer::start();
    let idle = RedisStore::open(server.url()).await.unwrap();
    assert_eq!(claim(&idle, "before").await.0.unwrap(), Claimed::Owned);

    // Nobody uses the store while Redis is down: its connection breaks unnoticed by any request.
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let restarted = Instant::now();

    // The background probe reconnects within its interval (250 ms by default): give it a second, then the very
    // first request must be served (the old code answered it with 503: the broken connection was found on use).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (claimed, elapsed) = claim(&idle, "after-restart").await;
    println!("first claim {:?} after the restart took {elapsed:?}: {claimed:?}", restarted.elapsed());
    assert_eq!(claimed.unwrap(), Claimed::Owned);
    assert!(server.cli(&["--scan"]).contains(key("after-restart").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_used_through_an_outage_serves_within_a_second_of_the_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    assert_eq!(claim(&store, "before").await.0.unwrap(), Claimed::Owned);
    server.kill();
    assert_unavailable(&claim(&store, "down").await.0);
    server.restart();

    // Poll for at most 1 s, then require success.
    let restarted = Instant::now();
    let mut attempt = 0;
    let claimed = loop {
        attempt += 1;
        let (claimed, _) = claim(&store, &format!("after-{attempt}")).await;
        if claimed.is_ok() || restarted.elapsed() > Duration::from_secs(1) {
            break claimed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("served again {:?} after the restart, attempt {attempt}", restarted.elapsed());
    assert_eq!(claimed.unwrap(), Claimed::Owned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_fails_claims_within_the_response_timeout_then_serves_once_thawed() {
    let server = RedisServer::start();
    // A response timeout far from the default (500 ms), so the bound below shows the builder's is the one applied.
    let response_timeout = Duration::from_millis(1500);
    let store = RedisStore::builder().response_timeout(response_timeout).open(server.url()).await.unwrap();
    assert_eq!(claim(&store, "before").await.0.unwrap(), Claimed::Owned);

    server.freeze();
    let (claimed, first) = claim(&store, "frozen-1").await;
    assert_unavailable(&claimed);
    let (claimed, second) = claim(&store, "frozen-2").await;
    assert_unavailable(&claimed);
    println!("claims against a frozen redis-server took {first:?} then {second:?}");
    // The response timeout, plus slack for a busy machine.
    assert!(first >= response_timeout - Duration::from_millis(50), "waited for the answer: {first:?}");
    assert!(first < response_timeout + Duration::from_millis(1000), "{first:?}");
    assert!(second < Duration::from_millis(200), "known down, failed at once: {second:?}");

    server.thaw();
    let thawed = Instant::now();
    let claimed = loop {
        let (claimed, _) = claim(&store, "thawed").await;
        if claimed.is_ok() || thawed.elapsed() > Duration::from_secs(1) {
            break claimed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("served again {:?} after the thaw", thawed.elapsed());
    assert_eq!(claimed.unwrap(), Claimed::Owned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_resolve_fails_within_the_connect_timeout() {
    let started = Instant::now();
    let opened = RedisStore::builder()
        .connect_timeout(Duration::from_millis(300))
        .open("redis://idem-outage-test.invalid:6379/")
        .await;
    let took = started.elapsed();
    assert!(matches!(opened, Err(StoreError::Unavailable(_))), "{opened:?}");
    assert!(took < Duration::from_millis(1300), "{took:?}");
}

/// With the caller's own `ConnectionManager` (as the reference service builds it), requests still fail fast while
/// Redis is down; how soon it reconnects afterwards is the manager's own retry policy (redis-rs' default backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_your_connection_manager_fails_fast_and_recovers() {
    let mut server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let manager = client.get_connection_manager().await.unwrap();
    let store = RedisStore::builder().connection_manager(manager, client).await.unwrap();
    assert_eq!(claim(&store, "before").await.0.unwrap(), Claimed::Owned);

    server.kill();
    let mut took = Vec::new();
    for attempt in 0..5 {
        let (claimed, elapsed) = claim(&store, &format!("while-down-{attempt}")).await;
        assert_unavailable(&claimed);
        took.push(elapsed);
    }
    println!("claims through a ConnectionManager against a killed redis-server took {took:?}");
    assert!(took[0] < Duration::from_millis(1500), "first claim: {took:?}");
    for (attempt, elapsed) in took.iter().enumerate().skip(1) {
        assert!(*elapsed < Duration::from_millis(200), "claim {attempt}: {took:?}");
    }

    server.restart();
    let restarted = Instant::now();
    let claimed = loop {
        let (claimed, _) = claim(&store, "after-restart").await;
        if claimed.is_ok() || restarted.elapsed() > Duration::from_secs(15) {
            break claimed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("served again {:?} after the restart", restarted.elapsed());
    assert_eq!(claimed.unwrap(), Claimed::Owned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_refused_by_an_outage_lands_once_redis_is_back() {
    // Durable, so the claim made before the outage is still there after the restart, as on a production Redis.
    let mut server = RedisServer::start_durable();
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(RedisStore::open(server.url()).await.unwrap());
    let policy = idem::Policy::new();
    let outcome = idem::protocol::begin(&store, key("completed-late"), fingerprint(), &policy).await.unwrap();
    let idem::protocol::Outcome::Execute(claim) = outcome else { panic!("a fresh key is claimed: {outcome:?}") };

    // The work ran and its answer went out; then Redis is gone when its record is to be written.
    server.terminate();
    let stored = idem::store::Stored::Response(idem::store::StoredResponse {
        status: 201,
        headers: vec![("content-type".to_owned(), "application/json".into())],
        body: r#"{"order_id":1}"#.into(),
    });
    let completed = claim.complete(stored.clone(), Duration::from_secs(60)).await;
    assert!(matches!(completed, Err(StoreError::Unavailable(_))), "{completed:?}");

    // Left in flight, the claim would lapse after its 30 s lease and a retry would run the work again. The record
    // lands in the background instead, within about a second of Redis answering.
    server.restart_keeping_data();
    let restarted = Instant::now();
    loop {
        match store.claim(&key("completed-late"), &fingerprint(), &OwnerToken::generate(), LEASE).await {
            Ok(Claimed::Existing(idem::store::Entry::Completed(record))) => {
                assert_eq!(record.stored, stored);
                break;
            }
            Ok(Claimed::Owned) => panic!("the key was free: the claim made before the outage was lost"),
            Ok(Claimed::Existing(idem::store::Entry::InFlight { .. })) | Err(_) => {}
        }
        assert!(restarted.elapsed() < Duration::from_secs(10), "the record never landed: the key is still in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("the retried completion landed {:?} after the restart", restarted.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_refused_by_an_outage_frees_the_key_once_redis_is_back() {
    let mut server = RedisServer::start_durable();
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(RedisStore::open(server.url()).await.unwrap());
    let outcome =
        idem::protocol::begin(&store, key("released-late"), fingerprint(), &idem::Policy::new()).await.unwrap();
    let idem::protocol::Outcome::Execute(claim) = outcome else { panic!("a fresh key is claimed: {outcome:?}") };

    // The work failed (a 5xx): its key must be freed for a retry, but Redis is gone.
    server.terminate();
    let released = claim.release().await;
    assert!(matches!(released, Err(StoreError::Unavailable(_))), "{released:?}");

    // Left in flight, the key would answer 409 for the rest of its 30 s lease with nobody running the work. The
    // release lands in the background instead, and a retry claims the key within about a second of Redis answering.
    server.restart_keeping_data();
    let restarted = Instant::now();
    loop {
        match store.claim(&key("released-late"), &fingerprint(), &OwnerToken::generate(), LEASE).await {
            Ok(Claimed::Owned) => break,
            Ok(Claimed::Existing(idem::store::Entry::Completed(_))) => panic!("nothing was completed"),
            Ok(Claimed::Existing(idem::store::Entry::InFlight { .. })) | Err(_) => {}
        }
        assert!(restarted.elapsed() < Duration::from_secs(10), "the key stayed in flight: the release never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("the retried release landed {:?} after the restart", restarted.elapsed());
}
