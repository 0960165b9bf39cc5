//! The conformance suite on a real single `redis-server` (started by the test, on a free loopback port).

mod conformance;
mod redis_server;

use redis_server::RedisServer;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// One server for this test binary; each test gets its own key prefix. The watchdog stops it when the binary exits.
fn server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

async fn store() -> idem::RedisStore {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("idem-test-{}:", NEXT.fetch_add(1, Ordering::Relaxed));
    idem::RedisStore::open(server().url()).await.expect("connect to the test redis-server").with_prefix(prefix)
}

conformance::suite!(redis_node, store);
