//! The store's internals against a real `redis-server`: the claim on a server that refuses `SET … NX GET` (Redis <
//! 7.0; here a Redis 7 made to refuse it the way Redis 6 does, `ERR syntax error`), which switches the store to the
//! claim script once and keeps the claim's semantics; and the size of the futures every store call allocates.

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record, Stored, StoredResponse};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use crate::store::error::StoreError;
use crate::store::redis::RedisStore;
use redis::Client;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A `redis-server` on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Server {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("idem-runtime-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `calls` and `failed_calls` of one command in `INFO commandstats`.
    async fn calls(&self, command: &str) -> (u64, u64) {
        let mut connection = Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.unwrap();
        let line = stats.lines().find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")));
        let field = |name: &str| {
            line.and_then(|line| line.split(',').find_map(|field| field.strip_prefix(&format!("{name}="))))
                .map_or(0, |value| value.parse().unwrap())
        };
        (field("calls"), field("failed_calls"))
    }

    async fn pttl(&self, key: &str) -> i64 {
        let mut connection = Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        redis::cmd("PTTL").arg(key).query_async(&mut connection).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fingerprint(text: &str) -> Fingerprint {
    Fingerprint::builder().field(text.as_bytes()).finish()
}

fn record(fingerprint: Fingerprint) -> Record {
    let response = StoredResponse { status: 201, headers: vec![], body: bytes::Bytes::from_static(b"done") };
    Record { fingerprint, stored: Stored::Response(response) }
}

#[tokio::test]
async fn a_server_that_refuses_set_nx_get_gets_the_claim_script_once_and_for_all() {
    let server = Server::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    store.act_as_redis_6.store(true, Ordering::Relaxed);
    let (key, first, second) = (StoreKey::derive(&[b"old-server"]), OwnerToken::generate(), OwnerToken::generate());
    let lease = Duration::from_secs(2);

    assert_eq!(store.claim(&key, &fingerprint("a"), &first, lease).await.unwrap(), Claimed::Owned);
    assert!(store.claim_by_script.load(Ordering::Relaxed), "the refusal switched claims to the script");
    assert_eq!(server.calls("set").await.1, 1, "the server refused the native claim once");

    // A resent claim is still its sender's, and its lease starts again.
    let resent = store.claim(&key, &fingerprint("a"), &first, Duration::from_secs(600)).await.unwrap();
    assert_eq!(resent, Claimed::Owned);
    assert!(server.pttl(&store.record_key(&key)).await > 500_000, "the resent claim's 600 s lease is in place");
    // Another owner reads the claim in flight, then the completed record.
    let in_flight = store.claim(&key, &fingerprint("a"), &second, lease).await.unwrap();
    assert_eq!(in_flight, Claimed::Existing(Entry::InFlight { fingerprint: fingerprint("a") }));
    let done = record(fingerprint("a"));
    assert_eq!(store.complete(&key, &first, &done, Duration::from_secs(60)).await.unwrap(), Write::Applied);
    let replay = store.claim(&key, &fingerprint("a"), &second, lease).await.unwrap();
    assert_eq!(replay, Claimed::Existing(Entry::Completed(done)));

    // Only the first claim tried the native command: 3 claims by script, plus the completion; the replay after the
    // completion read the record with a plain GET, which every Redis takes.
    let (sets, refused) = server.calls("set").await;
    assert_eq!(refused, 1, "no native claim was sent after the refusal");
    let scripts = server.calls("evalsha").await.0 + server.calls("eval").await.0;
    assert_eq!(scripts, 4 + 2, "4 scripts; the claim's and the completion's first met NOSCRIPT and went again as EVAL");
    // The refused SET, the first claim's SET (in the script) and the completion's.
    assert_eq!(sets, 3);
}

#[tokio::test]
async fn an_error_about_the_data_does_not_switch_claims_to_the_script() {
    let server = Server::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    let key = StoreKey::derive(&[b"a-hash"]);
    let mut connection = Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () =
        redis::cmd("HSET").arg(store.record_key(&key)).arg("f").arg("v").query_async(&mut connection).await.unwrap();

    let claim = store.claim(&key, &fingerprint("a"), &OwnerToken::generate(), Duration::from_secs(2)).await;
    assert!(matches!(claim, Err(StoreError::Corrupt(_))), "{claim:?}");
    assert!(!store.claim_by_script.load(Ordering::Relaxed), "WRONGTYPE is about the key, not the server's version");
    let other = StoreKey::derive(&[b"a-string"]);
    let owner = OwnerToken::generate();
    assert_eq!(store.claim(&other, &fingerprint("a"), &owner, Duration::from_secs(2)).await.unwrap(), Claimed::Owned);
    assert_eq!(server.calls("evalsha").await.0 + server.calls("eval").await.0, 0, "claims stay native");
}

/// Only `ERR syntax error` proves a server older than 7.0. Other error replies to the native claim fail that claim
/// alone: here `ERR invalid expire time` (a lease past what Redis can add to its clock) and an OOM under `maxmemory`
/// with `noeviction`. The old code switched to the claim script on any `ERR` reply, for good.
#[tokio::test]
async fn only_a_syntax_error_switches_claims_to_the_script() {
    let server = Server::start();
    let store = RedisStore::open(server.url()).await.unwrap();
    let owner = OwnerToken::generate();
    let too_long = Duration::from_millis(i64::MAX as u64);

    let claim = store.claim(&StoreKey::derive(&[b"too-long"]), &fingerprint("a"), &owner, too_long).await;
    assert!(matches!(claim, Err(StoreError::Unavailable(_))), "{claim:?}");
    assert!(!store.claim_by_script.load(Ordering::Relaxed), "an ERR other than a syntax error keeps claims native");
    assert_eq!(server.calls("set").await.1, 1, "one SET failed: the native claim's, with no script claim after it");

    let mut connection = Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let config = |name: &'static str, value: &'static str| {
        let mut command = redis::cmd("CONFIG");
        command.arg("SET").arg(name).arg(value);
        command
    };
    let _: () = config("maxmemory-policy", "noeviction").query_async(&mut connection).await.unwrap();
    let _: () = config("maxmemory", "1").query_async(&mut connection).await.unwrap();
    let claim = store.claim(&StoreKey::derive(&[b"oom"]), &fingerprint("a"), &owner, Duration::from_secs(2)).await;
    let refused = claim.expect_err("a server out of memory refuses the claim").to_string();
    assert!(refused.contains("OOM"), "{refused}");
    assert!(!store.claim_by_script.load(Ordering::Relaxed), "an OOM keeps claims native");

    let _: () = config("maxmemory", "0").query_async(&mut connection).await.unwrap();
    let key = StoreKey::derive(&[b"after"]);
    assert_eq!(store.claim(&key, &fingerprint("a"), &owner, Duration::from_secs(2)).await.unwrap(), Claimed::Owned);
    assert_eq!(server.calls("evalsha").await.0 + server.calls("eval").await.0, 0, "no claim ran the script");
}

/// Every store call is boxed (an async trait): the whole future is allocated and copied on every call, so opening a
/// connection, a pool checkout or a replica wait, which a call rarely needs, must not sit inline in it. Before they
/// were boxed a claim's future took 15.6 KB (a deadpool checkout alone, 7 KB, twice over), copied on every replay.
#[tokio::test]
async fn store_calls_carry_small_futures() {
    let server = Server::start();
    let store = RedisStore::builder().wait_for_replicas(1, Duration::from_millis(10)).open(server.url()).await.unwrap();
    let (key, owner, fp, lease) =
        (StoreKey::derive(&[b"x"]), OwnerToken::generate(), fingerprint("a"), Duration::from_secs(1));
    let done = record(fp);
    let sizes = [
        ("claim", std::mem::size_of_val(&*store.claim(&key, &fp, &owner, lease))),
        ("complete", std::mem::size_of_val(&*store.complete(&key, &owner, &done, lease))),
        ("release", std::mem::size_of_val(&*store.release(&key, &owner))),
        ("renew", std::mem::size_of_val(&*store.renew(&key, &owner, &fp, lease))),
    ];
    for (call, size) in sizes {
        assert!(size < 4096, "{call}: a {size}-byte future");
    }
}
