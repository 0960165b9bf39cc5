//! The duplicate window only a transactional store closes, shown with real processes: instances of the reference
//! service (`POST /short-lease/orders`, 2 s lease) on a real PostgreSQL, where each execution inserts an `orders` row
//! in the handler's transaction (`Tx`), and the same scenario on Redis, where the execution's effect (a counter) is
//! not undone. Plus an owner frozen past its lease, and the database restarted mid-stream.

mod orders_client;
mod postgres_server;
mod redis_server;
mod service;

use orders_client::{OrdersClient, SHORT_LEASE_ROUTE, order};
use postgres_server::PostgresServer;
use redis_server::RedisServer;
use service::Service;
use sqlx::PgPool;
use std::time::{Duration, Instant};

async fn admin(postgres: &PostgresServer) -> PgPool {
    sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&postgres.url()).await.expect("connect")
}

/// Waits until `count` handlers have inserted their order and not committed yet: their transactions sit idle after
/// an `INSERT INTO orders` (the handler sleeps its `delay_ms` inside the transaction).
async fn wait_for_uncommitted_inserts(admin: &PgPool, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE 'INSERT INTO orders%'",
        )
        .fetch_one(admin)
        .await
        .unwrap();
        if open >= count {
            return;
        }
        assert!(Instant::now() < deadline, "{count} uncommitted order inserts not seen within 10 s (saw {open})");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn committed_orders(admin: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_its_insert_before_commit_then_retried_after_the_lease_the_order_exists_once_on_postgres() {
    let postgres = PostgresServer::start();
    let env = [("DATABASE_URL", postgres.url())];
    let (mut owner, other) = (Service::start(&env).await, Service::start(&env).await);
    let admin = admin(&postgres).await;
    let client = OrdersClient::new();
    let (key, body) = ("window-postgres", order("book", 1500));

    let original = tokio::spawn({
        let (client, base) = (client.clone(), owner.base.clone());
        async move { client.try_post(&base, SHORT_LEASE_ROUTE, key, &body).await }
    });
    wait_for_uncommitted_inserts(&admin, 1).await;
    owner.kill();
    let killed_at = Instant::now();
    assert!(original.await.unwrap().is_err(), "the killed instance answered");
    assert_eq!(committed_orders(&admin, key).await, 0, "the killed handler's insert never committed");

    // The retry waits for the claim's lease to run out, takes the key over and runs on a clean database.
    let retry = client.post(&other.base, key, &order("book", 1500)).await;
    assert!(retry.is_new_order(), "{}", retry.summary());
    println!("postgres: the retry ran {:?} after the kill", retry.answered - killed_at);
    assert_eq!(committed_orders(&admin, key).await, 1, "exactly one order");
    assert_eq!(other.key_executions(key).await, 1);
    let again = client.post(&other.base, key, &order("book", 1500)).await;
    assert!(again.replays(&retry), "{}", again.summary());
}

/// The same scenario on Redis: the handler's effect (here a counter in Redis, in a real service a row in its
/// database) happened before the crash, and nothing undoes it: the retry after the lease runs it a second time.
/// This is the duplicate that only a store committing in the handler's own transaction prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_its_effect_before_completion_then_retried_after_the_lease_redis_runs_it_twice() {
    let redis = RedisServer::start();
    let env = [("REDIS_URL", redis.url())];
    let (mut owner, other) = (Service::start(&env).await, Service::start(&env).await);
    let client = OrdersClient::new();
    let (key, body) = ("window-redis", order("book", 1500));

    let original = tokio::spawn({
        let (client, base) = (client.clone(), owner.base.clone());
        async move { client.try_post(&base, SHORT_LEASE_ROUTE, key, &body).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.key_executions(key).await < 1 {
        assert!(Instant::now() < deadline, "the original did not run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    owner.kill();
    assert!(original.await.unwrap().is_err(), "the killed instance answered");

    let retry = client.post(&other.base, key, &order("book", 1500)).await;
    assert!(retry.is_new_order(), "{}", retry.summary());
    assert_eq!(other.key_executions(key).await, 2, "on Redis the effect of the killed execution stays: two runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_frozen_past_its_lease_is_rolled_back_when_it_resumes_and_only_the_takeover_commits() {
    let postgres = PostgresServer::start();
    let env = [("DATABASE_URL", postgres.url())];
    let (owner, other) = (Service::start(&env).await, Service::start(&env).await);
    let admin = admin(&postgres).await;
    let client = OrdersClient::new();
    let (key, body) = ("frozen-owner", order("book", 3000));

    let original = tokio::spawn({
        let (client, base, body) = (client.clone(), owner.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    wait_for_uncommitted_inserts(&admin, 1).await;
    owner.freeze();
    // Past the 2 s lease, no renewal: the retry takes the key over and inserts its own order.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let takeover = tokio::spawn({
        let (client, base, body) = (client.clone(), other.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    wait_for_uncommitted_inserts(&admin, 2).await;
    owner.thaw();

    let stale = original.await.unwrap();
    let takeover = takeover.await.unwrap();
    assert!(takeover.is_new_order(), "{}", takeover.summary());
    assert!(stale.is_problem(409, "in-progress"), "the resumed owner's answer: {}", stale.summary());
    assert_eq!(committed_orders(&admin, key).await, 1, "the resumed owner's insert was rolled back");
    let committed: i64 = sqlx::query_scalar("SELECT id FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(takeover.order_id(), Some(committed as u64), "the committed order is the takeover's");
    let replay = client.post(&owner.base, key, &body).await;
    assert!(replay.replays(&takeover), "{}", replay.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_answers_503_while_down_and_heals_by_itself() {
    let mut postgres = PostgresServer::start();
    let service = Service::start(&[("DATABASE_URL", postgres.url())]).await;
    let client = OrdersClient::new();
    for n in 0..5 {
        let answer = client.post(&service.base, &format!("before-{n}"), &order("book", 0)).await;
        assert!(answer.is_new_order(), "{}", answer.summary());
    }

    postgres.stop();
    let mut refused = Vec::new();
    for n in 0..10 {
        let answer = client.post(&service.base, &format!("down-{n}"), &order("book", 0)).await;
        assert!(answer.is_problem(503, "store-unavailable"), "while down: {}", answer.summary());
        assert!(
            answer.took() < Duration::from_secs(4),
            "while down, answered within the timeouts: {}",
            answer.summary()
        );
        refused.push(answer.took());
    }
    println!("while down: answered in {refused:?}");
    // The first call finds the connections broken and marks the database down: the rest fail without waiting for
    // a connection (before the probe: each waited the 1 s connect timeout).
    let mut later = refused[1..].to_vec();
    later.sort();
    assert!(later[later.len() / 2] < Duration::from_millis(100), "refusals once known down: {refused:?}");

    postgres.start_again();
    let back = Instant::now();
    let served = loop {
        let answer = client.post(&service.base, "down-0", &order("book", 0)).await;
        if answer.is_new_order() {
            break answer.answered - back;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "not served within 20 s of the restart: {}",
            answer.summary()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("served again {served:?} after the database was back");
    let admin = admin(&postgres).await;
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT idempotency_key FROM orders GROUP BY idempotency_key HAVING count(*) > 1) AS t",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(twice, 0, "no key ran twice");
    assert_eq!(committed_orders(&admin, "down-0").await, 1);
}
