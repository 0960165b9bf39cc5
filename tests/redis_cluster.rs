//! The conformance suite on a real 3-master Redis Cluster (started by the test on free loopback ports).

mod redis_server;

use redis_server::RedisCluster;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

async fn store() -> idem::RedisStore {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("idem-test-{}:", NEXT.fetch_add(1, Ordering::Relaxed));
    idem::RedisStore::builder().prefix(prefix).cluster(cluster().urls()).await.expect("connect to the test cluster")
}

idem::test_kit::conformance_tests!(redis_cluster, store);
