//! Sentinel: the store finds the primary through a Sentinel, and keeps working after the primary is killed and the
//! replica promoted. All processes are real and local.

mod redis_server;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::{Idempotency, RedisStore};
use redis_server::RedisServer;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[idem::idempotent]
async fn transfer(State(runs): State<Arc<AtomicU64>>, body: String) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("transfer {body} #{run}"))
}

async fn send(app: &Router, key: &str) -> (StatusCode, String, Option<String>) {
    let request = Request::post("/transfers").header("idempotency-key", key).body(Body::from("10 EUR")).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let state = response.headers().get("x-idempotency-status").map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned(), state)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_the_primary_through_a_failover() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_for("the replica to sync", Duration::from_secs(15), || {
        replica.cli(&["INFO", "replication"]).contains("master_link_status:up")
    });
    let sentinel = RedisServer::sentinel("idem-primary", &primary);
    wait_for("the sentinel to see the replica", Duration::from_secs(15), || {
        sentinel.cli(&["SENTINEL", "replicas", "idem-primary"]).contains(&replica.port.to_string())
    });

    // WAIT for the replica on every write, so what completed before the crash survives the failover.
    let store = RedisStore::builder()
        .wait_for_replicas(1, Duration::from_millis(200))
        .sentinel([sentinel.url()], "idem-primary")
        .await
        .expect("connect through the sentinel");
    let runs = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/transfers", post(transfer))
        .layer(axum::Extension(Idempotency::new(store)))
        .with_state(runs.clone());

    let before = send(&app, "before-failover").await;
    assert_eq!((before.0, before.2.as_deref()), (StatusCode::CREATED, Some("new")));
    assert_eq!(send(&app, "before-failover").await.2.as_deref(), Some("hit"));

    primary.kill();
    // Until Sentinel promotes the replica, the store cannot reach a primary: fail closed, nothing runs.
    let (status, body, _) = send(&app, "during-failover").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("store-unavailable"), "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    wait_for("the sentinel to promote the replica", Duration::from_secs(30), || {
        sentinel.cli(&["SENTINEL", "get-master-addr-by-name", "idem-primary"]).contains(&replica.port.to_string())
    });
    wait_for("the replica to accept writes", Duration::from_secs(15), || {
        replica.cli(&["INFO", "replication"]).contains("role:master")
    });

    // Sentinel may need a moment more before it reports the new primary as healthy: until then the store keeps
    // failing closed (503, nothing runs), then it finds the new primary by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let answer = send(&app, "before-failover").await;
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break answer;
        }
        assert!(answer.1.contains("store-unavailable"), "{}", answer.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The record written before the crash was replicated (WAIT): its retry replays from the new primary.
    assert_eq!((after.0, after.1.as_str(), after.2.as_deref()), (StatusCode::CREATED, before.1.as_str(), Some("hit")));
    // The new primary has no replica yet: a first request cannot be made durable, so it fails closed (the claim is
    // released, the handler does not run).
    let (status, body, _) = send(&app, "after-failover").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The old primary comes back as the new primary's replica: new keys run once, acknowledged by it.
    primary.restart();
    primary.cli(&["REPLICAOF", "127.0.0.1", &replica.port.to_string()]);
    wait_for("the old primary to replicate the new one", Duration::from_secs(15), || {
        primary.cli(&["INFO", "replication"]).contains("master_link_status:up")
    });
    // A replica acknowledges its offset once a second (REPLCONF ACK): until its first acknowledgement, claims still
    // cannot be made durable and fail closed, without running the handler.
    let deadline = Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        let answer = send(&app, "after-failover").await;
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break answer;
        }
        assert!(answer.1.contains("store-unavailable"), "{}", answer.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((fresh.0, fresh.2.as_deref()), (StatusCode::CREATED, Some("new")), "{}", fresh.1);
    assert_eq!(send(&app, "after-failover").await.2.as_deref(), Some("hit"));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one run before and one after the failover");
}
