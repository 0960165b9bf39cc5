//! The conformance suite on a real single `redis-server` (started by the test, on a free loopback port).

mod conformance;
mod redis_server;

conformance::suite!(redis_node, redis_server::shared_node_store);
