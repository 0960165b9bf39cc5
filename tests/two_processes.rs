//! Exactly once across processes: two instances of the reference service on one real Redis, or one real
//! PostgreSQL.

mod postgres_server;
mod redis_server;
mod service;

use postgres_server::PostgresServer;
use redis_server::RedisServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use service::Service;

struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

async fn post(client: &reqwest::Client, base: &str, key: &str, body: &Value) -> Answer {
    let response = client
        .post(format!("{base}/orders"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("the service answers");
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|value| value == "true");
    let body = response.json().await.expect("a JSON body");
    Answer { status, replayed, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_one_key_once_and_five_hundred_keys_five_hundred_times() {
    let redis = RedisServer::start();
    one_key_once_and_five_hundred_keys_five_hundred_times(&[("REDIS_URL", redis.url())]).await;
}

/// On PostgreSQL the executions are rows of the `orders` table, in the database that holds the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_run_one_key_once_and_five_hundred_keys_five_hundred_times() {
    let postgres = PostgresServer::start();
    one_key_once_and_five_hundred_keys_five_hundred_times(&[("DATABASE_URL", postgres.url())]).await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&postgres.url()).await.unwrap();
    let (rows, keys): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT idempotency_key) FROM orders").fetch_one(&pool).await.unwrap();
    assert_eq!((rows, keys), (501, 501), "one row per execution, one execution per key");
}

/// Two instances on the backend `env` names: 200 concurrent duplicates of one key run once, 500 keys each sent to
/// both instances at once run 500 times.
async fn one_key_once_and_five_hundred_keys_five_hundred_times(env: &[(&str, String)]) {
    // One load at a time: two at once on a small machine push the instances' own counters (Redis commands, SQL
    // statements) past their timeouts, and a handler that fails so is run again by a retry, as it should be.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let instances = [Service::start(env).await, Service::start(env).await];
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();

    // 200 concurrent requests with one key, split across both instances; the original takes 300 ms, and
    // duplicates wait up to 3 s (`wait_timeout = 3.0` on /orders).
    let order = json!({ "item": "book", "qty": 1, "delay_ms": 300 });
    let answers = futures_util::future::join_all((0..200).map(|i| {
        let (client, order) = (client.clone(), order.clone());
        let base = instances[i % 2].base.clone();
        async move { post(&client, &base, "one-key", &order).await }
    }))
    .await;
    assert_eq!(instances[0].executions().await, 1, "one execution across both processes");
    let original = answers.iter().find(|answer| answer.status == StatusCode::CREATED && !answer.replayed);
    let original = &original.expect("exactly one original answer").body;
    assert_eq!(original["order_id"], 1);
    let mut replayed = 0;
    let mut conflicts = 0;
    for answer in &answers {
        match answer.status {
            StatusCode::CREATED => {
                assert_eq!(&answer.body, original, "every 201 is the original's body");
                replayed += usize::from(answer.replayed);
            }
            StatusCode::CONFLICT => {
                assert_eq!(
                    answer.body["type"],
                    "https://docs.rs/axum-idem/latest/idem/problems/index.html#in-progress"
                );
                conflicts += 1;
            }
            other => panic!("unexpected answer {other}: {}", answer.body),
        }
    }
    assert_eq!(replayed + conflicts, 199, "everything but the original is a replay or a 409");
    println!("one key x 200: 1 execution, {replayed} replays, {conflicts} conflicts");

    // 500 distinct keys, each sent twice at once: once to each instance.
    let answers = futures_util::future::join_all((0..500).map(|i| {
        let client = client.clone();
        let bases = [instances[0].base.clone(), instances[1].base.clone()];
        async move {
            let key = format!("key-{i}");
            let order = json!({ "item": format!("item-{i}"), "qty": i });
            let (a, b) = tokio::join!(post(&client, &bases[0], &key, &order), post(&client, &bases[1], &key, &order));
            (a, b)
        }
    }))
    .await;
    assert_eq!(instances[1].executions().await, 1 + 500, "exactly one execution per key");
    let mut ids = std::collections::HashSet::new();
    for (a, b) in &answers {
        for answer in [a, b] {
            assert!(
                answer.status == StatusCode::CREATED || answer.status == StatusCode::CONFLICT,
                "unexpected answer {}: {}",
                answer.status,
                answer.body
            );
        }
        if a.status == StatusCode::CREATED && b.status == StatusCode::CREATED {
            assert_eq!(a.body, b.body, "both instances answer with the one execution's result");
        }
        let created = if a.status == StatusCode::CREATED { a } else { b };
        assert_eq!(created.status, StatusCode::CREATED, "at least one of the pair succeeded");
        ids.insert(created.body["order_id"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), 500, "500 distinct executions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_service_runs_on_a_cluster_with_a_shared_counter() {
    let cluster = redis_server::RedisCluster::start();
    let env = [("REDIS_CLUSTER_URLS", cluster.urls().join(","))];
    let instances = [Service::start(&env).await, Service::start(&env).await];
    let client = reqwest::Client::new();
    let order = json!({ "item": "lamp", "qty": 2 });
    let first = post(&client, &instances[0].base, "cluster-key", &order).await;
    let retry = post(&client, &instances[1].base, "cluster-key", &order).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(retry.body, first.body);
    let other = post(&client, &instances[1].base, "cluster-key-2", &order).await;
    assert_eq!(other.body["order_id"], 2, "the execution counter lives in the cluster, shared by both instances");
    assert_eq!(instances[0].executions().await, 2);
}
