//! The reference service: `cargo run --example orders`.
//!
//! Binds `BIND` (default `127.0.0.1:3000`). Keeps records in memory, or in Redis when `REDIS_URL` is set (a Redis
//! Cluster when `REDIS_CLUSTER_URLS`, comma-separated, is set); on Redis the execution count is a Redis counter, so
//! several instances share it.
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: k1' -H 'content-type: application/json' \
//!      -d '{"item":"book","qty":1}'
//! ```

use axum::extract::{FromRef, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::{Idempotency, MemoryStore, RedisStore, idempotent};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    idempotency: Idempotency,
    executions: Executions,
}

/// How many times a handler body ran, where every instance of the service can see it.
#[derive(Clone)]
enum Executions {
    Memory(Arc<AtomicU64>),
    Redis(idem::redis::aio::ConnectionManager),
    Cluster(idem::redis::cluster_async::ClusterConnection),
}

const EXECUTIONS_KEY: &str = "orders:executions";

impl Executions {
    async fn increment(&self) -> Result<u64, idem::redis::RedisError> {
        use idem::redis::AsyncCommands;
        match self {
            Executions::Memory(count) => Ok(count.fetch_add(1, Ordering::SeqCst) + 1),
            Executions::Redis(connection) => connection.clone().incr(EXECUTIONS_KEY, 1).await,
            Executions::Cluster(connection) => connection.clone().incr(EXECUTIONS_KEY, 1).await,
        }
    }

    async fn read(&self) -> Result<u64, idem::redis::RedisError> {
        use idem::redis::AsyncCommands;
        let count: Option<u64> = match self {
            Executions::Memory(count) => Some(count.load(Ordering::SeqCst)),
            Executions::Redis(connection) => connection.clone().get(EXECUTIONS_KEY).await?,
            Executions::Cluster(connection) => connection.clone().get(EXECUTIONS_KEY).await?,
        };
        Ok(count.unwrap_or(0))
    }
}

impl FromRef<AppState> for Idempotency {
    fn from_ref(state: &AppState) -> Self {
        state.idempotency.clone()
    }
}

impl AppState {
    /// Counts one execution of a handler body and returns the new count, which is also the created id.
    async fn execute(&self) -> Result<u64, Response> {
        self.executions.increment().await.map_err(|error| {
            tracing::error!(%error, "could not count the execution");
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "counter unavailable" }))).into_response()
        })
    }
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
    qty: i64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    fail: bool,
}

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
    #[serde(default)]
    delay_ms: u64,
}

#[idempotent(ttl = 60, wait_timeout = 3.0, validate_signature)]
async fn create_order(State(state): State<AppState>, Json(order): Json<NewOrder>) -> Response {
    place_order(&state, order).await
}

/// The same work without idempotency: the baseline for benchmarks.
async fn create_order_unprotected(State(state): State<AppState>, Json(order): Json<NewOrder>) -> Response {
    place_order(&state, order).await
}

async fn place_order(state: &AppState, order: NewOrder) -> Response {
    let order_id = match state.execute().await {
        Ok(id) => id,
        Err(response) => return response,
    };
    tokio::time::sleep(Duration::from_millis(order.delay_ms)).await;
    if order.fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "order failed", "order_id": order_id })))
            .into_response();
    }
    let location = format!("/orders/{order_id}");
    let body = json!({ "order_id": order_id, "item": order.item, "qty": order.qty });
    (StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response()
}

#[idempotent(required = false, wait_timeout = 0)]
async fn create_payment(State(state): State<AppState>, Json(payment): Json<NewPayment>) -> Response {
    let payment_id = match state.execute().await {
        Ok(id) => id,
        Err(response) => return response,
    };
    tokio::time::sleep(Duration::from_millis(payment.delay_ms)).await;
    (StatusCode::CREATED, Json(json!({ "payment_id": payment_id, "amount": payment.amount }))).into_response()
}

async fn stats(State(state): State<AppState>) -> Response {
    match state.executions.read().await {
        Ok(executions) => Json(json!({ "executions": executions })).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error.to_string() }))).into_response(),
    }
}

fn app(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/payments", post(create_payment))
        .route("/plain/orders", post(create_order_unprotected))
        .route("/stats", get(stats))
        .with_state(state)
}

/// The store and the execution counter: Redis Cluster, Redis, or memory, from the environment.
async fn backend() -> Result<(Idempotency, Executions, String), Box<dyn std::error::Error>> {
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        let nodes: Vec<String> =
            urls.split(',').map(str::trim).filter(|url| !url.is_empty()).map(String::from).collect();
        let store = RedisStore::cluster(nodes.clone()).await?;
        let counter = idem::redis::cluster::ClusterClient::new(nodes)?.get_async_connection().await?;
        return Ok((Idempotency::new(store), Executions::Cluster(counter), format!("redis cluster {urls}")));
    }
    if let Ok(url) = std::env::var("REDIS_URL") {
        // The store opens its own connections, so it fails fast during an outage and heals by itself; the counter
        // shares nothing with it.
        let store = RedisStore::open(url.as_str()).await?;
        let counter = idem::redis::Client::open(url.as_str())?.get_connection_manager().await?;
        return Ok((Idempotency::new(store), Executions::Redis(counter), format!("redis {url}")));
    }
    Ok((Idempotency::new(MemoryStore::new()), Executions::Memory(Arc::default()), "memory".to_owned()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,idem_runtime=info".into()),
        )
        .init();
    let (idempotency, executions, backend) = backend().await?;
    let state = AppState { idempotency, executions };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("orders service listening on http://{} (store: {backend})", listener.local_addr()?);
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
