//! A deploy stops an instance (SIGTERM) while a handler whose client already left is halfway through: the instance
//! waits for it (`Idempotency::drain`) and its response is recorded, so the retry on another instance replays it
//! instead of running the order a second time after the lease. Real processes on a real Redis.

mod redis_server;
mod service;

use redis_server::RedisServer;
use service::Service;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_instance_finishes_a_handler_whose_client_left_and_the_retry_replays_it() {
    let redis = RedisServer::start();
    let env = [("REDIS_URL", redis.url())];
    let mut leaving = Service::start(&env).await;
    let staying = Service::start(&env).await;
    let key = "drained-order";
    let body = serde_json::json!({ "item": "lamp", "qty": 1, "delay_ms": 1500 });

    // The client gives up after 300 ms; the handler (short lease: 2 s) keeps running on its own task.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let sent = impatient
        .post(format!("{}/short-lease/orders", leaving.base))
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "the client timed out before the 1.5 s handler answered");
    assert_eq!(leaving.key_executions(key).await, 1, "the handler started");

    // The deploy: SIGTERM. The server stops accepting, and the instance exits only once the handler has finished.
    let terminated = Instant::now();
    let status = leaving.terminate(Duration::from_secs(10)).expect("the instance exits within the grace period");
    let took = terminated.elapsed();
    println!("SIGTERM to exit: {took:?} ({status})");
    assert!(status.success(), "a clean exit: {status}");
    assert!(took >= Duration::from_millis(700), "it waited for the handler (about 1.2 s left): {took:?}");

    // Past the 2 s lease: without the drain the record was never written and this retry would run the order again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let retry = reqwest::Client::new()
        .post(format!("{}/short-lease/orders", staying.base))
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["x-idempotency-status"], "hit", "the drained handler's response was recorded");
    let order: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(order["order_id"], 1);
    assert_eq!(staying.key_executions(key).await, 1, "the order ran once");
}
