//! A RedisStore on a Cluster client set to read from replicas (redis-rs' `read_routing_strategy`), against a real
//! Cluster of 3 primaries with a replica each. A replica lags its primary, so the store must read its records from
//! the primaries all the same: a replay read from a replica could return a record its primary has purged, or miss
//! one just written. The conformance suite runs on that store too.

mod redis_server;

use idem::RedisStore;
use idem::store::{Claimed, Entry, Fingerprint, Forgotten, OwnerToken, Record, Store, StoreKey, Stored, Write};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_read_routing::RandomReplicaStrategy;
use redis_server::{RedisCluster, command_calls};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start_with_replicas)
}

fn fresh_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("idem-replicas-{}:", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A store whose Cluster client sends read-only commands to a replica (with one replica per primary, always it).
async fn reading_from_replicas(prefix: &str) -> RedisStore {
    let client = ClusterClientBuilder::new(cluster().urls()).read_routing_strategy(RandomReplicaStrategy);
    RedisStore::builder().prefix(prefix).cluster_builder(client).await.expect("connect to the test cluster")
}

async fn store() -> RedisStore {
    reading_from_replicas(&fresh_prefix()).await
}

idem::test_kit::conformance_tests!(redis_cluster_replicas, store);

fn fp() -> Fingerprint {
    Fingerprint::builder().field(b"body").finish()
}

fn record() -> Record {
    let response = idem::store::StoredResponse { status: 201, headers: vec![], body: "done".into() };
    Record { fingerprint: fp(), stored: Stored::Response(response) }
}

fn replicas_get_calls() -> u64 {
    cluster().replicas().map(|replica| command_calls(replica, "get")).sum()
}

/// Stops each replica applying its primary's writes (`CLIENT PAUSE WRITE` holds the replication stream too, while
/// reads are served): a replica that lags, deterministically.
struct LaggingReplicas;

impl LaggingReplicas {
    fn start() -> Self {
        for replica in cluster().replicas() {
            assert_eq!(replica.cli(&["CLIENT", "PAUSE", "20000", "WRITE"]).trim(), "OK");
        }
        Self
    }
}

impl Drop for LaggingReplicas {
    fn drop(&mut self) {
        for replica in cluster().replicas() {
            replica.cli(&["CLIENT", "UNPAUSE"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reads_the_primary_not_a_replica_that_still_holds_a_purged_record() {
    let prefix = fresh_prefix();
    // The process that completed the keys, so its replays are plain `GET`s: the reads a client set to read from
    // replicas would send to one.
    let store = reading_from_replicas(&prefix).await;
    // Another process, which purges the records.
    let purger = RedisStore::builder().prefix(prefix.as_str()).cluster(cluster().urls()).await.unwrap();
    let keys: Vec<StoreKey> = (0..12).map(|i| StoreKey::derive(&[b"replicas", &[i]])).collect();
    for key in &keys {
        let owner = OwnerToken::generate();
        assert_eq!(store.claim(key, &fp(), &owner, Duration::from_secs(30)).await.unwrap(), Claimed::Owned);
        assert_eq!(store.complete(key, &owner, &record(), Duration::from_secs(600)).await.unwrap(), Write::Applied);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster().replicas().map(|replica| replica.cli(&["--scan"]).lines().count()).sum::<usize>() < keys.len() {
        assert!(Instant::now() < deadline, "the records did not reach the replicas within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replica_gets = replicas_get_calls();
    for key in &keys {
        let replay = store.claim(key, &fp(), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(replay, Claimed::Existing(Entry::Completed(record())));
    }

    let lagging = LaggingReplicas::start();
    for key in &keys {
        assert_eq!(purger.forget(key).await.unwrap(), Forgotten::Removed);
    }
    let mut replayed_purged = 0;
    for key in &keys {
        match store.claim(key, &fp(), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap() {
            Claimed::Owned => {}
            Claimed::Existing(Entry::Completed(_)) => replayed_purged += 1,
            other => panic!("{other:?}"),
        }
    }
    drop(lagging);
    assert_eq!(replayed_purged, 0, "replays of a record purged on its primary, read from a replica that still held it");
    assert_eq!(replicas_get_calls() - replica_gets, 0, "GETs the store sent to replicas");
}

/// A waiter reads the claim it waits on from the primary too: a replica that has not seen the completion yet would
/// make it wait for the notification instead of answering at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_and_inspections_read_the_primary() {
    let prefix = fresh_prefix();
    let store = reading_from_replicas(&prefix).await;
    let key = StoreKey::derive(&[b"replicas-wait"]);
    let owner = OwnerToken::generate();
    assert_eq!(store.claim(&key, &fp(), &owner, Duration::from_secs(30)).await.unwrap(), Claimed::Owned);
    let lagging = LaggingReplicas::start();
    assert_eq!(store.complete(&key, &owner, &record(), Duration::from_secs(600)).await.unwrap(), Write::Applied);
    let replica_gets = replicas_get_calls();

    // The replica still holds the claim; the primary holds the record.
    let started = Instant::now();
    store.wait(&key, Duration::from_secs(3)).await.unwrap();
    let waited = started.elapsed();
    let inspected = store.inspect(&key).await.unwrap();
    drop(lagging);
    assert_eq!(inspected, Some(Entry::Completed(record())), "what inspect read");
    assert!(waited < Duration::from_secs(1), "a wait on a completed key answers at once: it took {waited:?}");
    assert_eq!(replicas_get_calls() - replica_gets, 0, "GETs the store sent to replicas");
}
