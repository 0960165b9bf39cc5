//! The conformance suite on a real single `redis-server` (started by the test, on a free loopback port).

mod redis_server;

idem::test_kit::conformance_tests!(redis_node, redis_server::shared_node_store);
