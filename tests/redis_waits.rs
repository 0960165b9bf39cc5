//! Waiting duplicates on Redis when the network misbehaves: every wait returns by its deadline, one dead pub/sub
//! link does not hold up waiters on other keys, a dead link is noticed and replaced by itself, and a record without
//! a TTL does not make the claim-and-wait loop spin.

mod proxy;
mod redis_server;

use idem::protocol::Outcome;
use idem::store::{Claimed, Fingerprint, OwnerToken, Record, Store, StoreKey, Stored, Write};
use idem::{Policy, RedisStore, store::RedisStoreBuilder};
use proxy::Proxy;
use redis::Client;
use redis_server::{RedisServer, command_calls};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fp(text: &str) -> Fingerprint {
    Fingerprint::builder().field(text.as_bytes()).finish()
}

fn fresh_key(name: &str) -> StoreKey {
    StoreKey::derive(&[name.as_bytes(), format!("{:?}", Instant::now()).as_bytes()])
}

fn record() -> Record {
    Record {
        fingerprint: fp("a"),
        stored: Stored::Response(idem::store::StoredResponse { status: 200, headers: vec![], body: "done".into() }),
    }
}

/// Claims `key` for a fresh owner with a lease far longer than any test, so only a completion or a timeout can end
/// a wait on it.
async fn in_flight(store: &RedisStore, key: &StoreKey) -> OwnerToken {
    let owner = OwnerToken::generate();
    let claimed = store.claim(key, &fp("a"), &owner, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed, Claimed::Owned);
    owner
}

/// A store whose commands go straight to `server` and whose pub/sub connection (the one that wakes waiters) goes
/// through `proxy`.
async fn store_with_pubsub_through(server: &RedisServer, proxy: &Proxy, builder: RedisStoreBuilder) -> RedisStore {
    let manager = Client::open(server.url()).unwrap().get_connection_manager().await.unwrap();
    builder.connection_manager(manager, Client::open(proxy.url()).unwrap()).await.expect("connect")
}

/// Runs `future`, panicking with `what` if it has not finished after `limit` (the old code hung forever here).
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

/// How many connections `server` has subscribed to `channel`.
fn subscribers(server: &RedisServer, channel: &str) -> u64 {
    let answer = server.cli(&["PUBSUB", "NUMSUB", channel]);
    answer.lines().nth(1).map_or(0, |count| count.trim().parse().expect("a subscriber count"))
}

/// A waiter on `store` (10 s timeout) is woken by a completion made through `completer`, long before its timeout.
/// The completion is made only once Redis shows the waiter's subscription, so the waiter must be woken by the
/// notification, not find the record when it re-reads.
async fn woken_by_a_completion(store: &Arc<RedisStore>, completer: &RedisStore, server: &RedisServer) {
    let key = fresh_key("woken");
    let owner = in_flight(completer, &key).await;
    let waiter = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move {
            store.wait(&key, Duration::from_secs(10)).await.unwrap();
            Instant::now()
        }
    });
    let channel = format!("idem:{{{}}}:done", key.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers(server, &channel) == 0 {
        assert!(Instant::now() < deadline, "the waiter never subscribed to {channel}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Leave the waiter time to re-read the key (still in flight) and start waiting for the notification.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter returned before the completion");
    let completed = Instant::now();
    assert_eq!(completer.complete(&key, &owner, &record(), Duration::from_secs(60)).await.unwrap(), Write::Applied);
    let woken = within(Duration::from_secs(10), "the woken waiter", waiter).await.unwrap();
    let after = woken.duration_since(completed);
    assert!(after < Duration::from_secs(2), "woken by the notification, not its 10 s timeout: {after:?} after it");
}

/// Issue 7, item 3: with the pub/sub connection silently dead, a wait used to subscribe (with no timeout) before
/// its own timeout started, holding a process-wide lock, so it hung and every waiter on any other key queued
/// behind it. Now both waits end at their own deadlines, and the link heals by itself once traffic passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_end_by_their_deadlines_while_the_pubsub_link_is_dead_and_the_link_heals() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let store = Arc::new(store_with_pubsub_through(&server, &proxy, RedisStore::builder()).await);
    let completer = RedisStore::open(server.url()).await.unwrap();
    // The link is up and works.
    woken_by_a_completion(&store, &completer, &server).await;

    proxy.blackhole();
    let (k2, k3) = (fresh_key("k2"), fresh_key("k3"));
    in_flight(&completer, &k2).await;
    in_flight(&completer, &k3).await;
    let started = Instant::now();
    let timed = |key: StoreKey, timeout: Duration| {
        let store = store.clone();
        async move {
            store.wait(&key, timeout).await.unwrap();
            started.elapsed()
        }
    };
    let (k2_waited, k3_waited) = within(Duration::from_secs(10), "two waits on a dead pub/sub link", async {
        tokio::join!(timed(k2, Duration::from_secs(1)), timed(k3, Duration::from_millis(500)))
    })
    .await;
    assert!(k2_waited >= Duration::from_millis(990), "k2 is in flight: it waits its whole timeout: {k2_waited:?}");
    assert!(k2_waited < Duration::from_millis(2500), "k2 ends by its 1 s deadline: {k2_waited:?}");
    assert!(k3_waited >= Duration::from_millis(490), "k3 is in flight: it waits its whole timeout: {k3_waited:?}");
    assert!(k3_waited < k2_waited, "k3 (0.5 s) ends by its own deadline, not after k2 (1 s): {k3_waited:?}");
    // Only pub/sub is dead: commands still work.
    in_flight(&store, &fresh_key("claim")).await;

    // Traffic passes again, but the old connection stays dead: the store must notice and replace it by itself.
    proxy.pass();
    woken_by_a_completion(&store, &completer, &server).await;
}

/// A link that dies while nobody waits is noticed by its heartbeat and dropped, rather than found dead by the next
/// waiter's subscription (which would cost that waiter a whole command timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_dead_link_is_noticed_by_its_heartbeat_and_replaced() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    // A quick heartbeat and timeout, so the dead link is noticed within a second (it is never used meanwhile).
    let builder =
        RedisStore::builder().pubsub_heartbeat(Duration::from_millis(200)).pubsub_timeout(Duration::from_millis(500));
    let store = store_with_pubsub_through(&server, &proxy, builder).await;
    let store = Arc::new(store);
    let completer = RedisStore::open(server.url()).await.unwrap();
    woken_by_a_completion(&store, &completer, &server).await;
    assert_eq!(proxy.open_clients(), 1, "one pub/sub connection");
    let pings = command_calls(&server, "ping");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(command_calls(&server, "ping") > pings, "an idle link is checked by PINGs");

    proxy.blackhole();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.open_clients() > 0 {
        assert!(Instant::now() < deadline, "the store kept its dead pub/sub connection for 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.pass();
    woken_by_a_completion(&store, &completer, &server).await;
}

/// Issue 7, item 9: an in-flight record without a TTL (written by hand, or by a tool that lost the PX) used to end
/// every wait at once (PTTL -1 read as "no lease left"), so the claim-and-wait loop spun, one claim after another,
/// until its deadline. Now the wait lasts its timeout and the loop sends a bounded number of commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_record_without_a_ttl_is_waited_on_not_spun_on() {
    let server = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::open(server.url()).await.unwrap());
    let key = fresh_key("no-ttl");
    let record_key = format!("idem:{{{}}}", key.as_str());
    let held = format!(r#"{{"state":"in_flight","owner":"by-hand","fingerprint":"{}"}}"#, fp("a").to_hex());
    assert_eq!(server.cli(&["SET", &record_key, &held]).trim(), "OK");
    assert_eq!(server.cli(&["PTTL", &record_key]).trim(), "-1");

    let started = Instant::now();
    within(Duration::from_secs(10), "a wait on a record without a TTL", store.wait(&key, Duration::from_secs(1)))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(990), "the record is in flight: the wait lasts its timeout: {waited:?}");

    server.cli(&["CONFIG", "RESETSTAT"]);
    let policy = Policy::new().wait_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let outcome = idem::protocol::begin(&store, key, fp("a"), &policy).await.unwrap();
    let waited = started.elapsed();
    assert!(matches!(outcome, Outcome::InFlight), "{outcome:?}");
    assert!(waited >= Duration::from_millis(990), "{waited:?}");
    // A claim before the wait and one after it (a timer that fires a hair early may add one more round), each
    // with the wait's re-read between them: not thousands.
    let (claims, reads) = (command_calls(&server, "set"), command_calls(&server, "pttl"));
    assert!((2..=4).contains(&claims), "claims sent: {claims}");
    assert!((1..=3).contains(&reads), "re-reads by waits: {reads}");
}
