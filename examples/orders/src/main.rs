//! The reference service: `cargo run -p idem-example-orders`.
//!
//! Binds `BIND` (default `127.0.0.1:3000`). Keeps records in memory, or in Redis when `REDIS_URL` is set (a Redis
//! Cluster when `REDIS_CLUSTER_URLS`, comma-separated, is set), or in PostgreSQL when `DATABASE_URL` is set; on Redis
//! the execution count is a Redis counter, on PostgreSQL a row per execution in table `orders`, so several
//! instances share it. Each execution of a request that carried an `Idempotency-Key` is also counted under that key
//! (`GET /stats/keys/{key}`), so fault and soak tests can check that no key ran twice.
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: k1' -H 'content-type: application/json' \
//!      -d '{"item":"book","qty":1}'
//! ```

use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::{Idempotency, MemoryStore, PostgresStore, RedisStore, Tx, idempotent};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    idempotency: Idempotency,
    executions: Executions,
}

/// How many times a handler body ran, where every instance of the service can see it.
#[derive(Clone)]
enum Executions {
    Memory(Arc<MemoryCounts>),
    Redis(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    /// One row per execution in table `orders` (its id is the order id), with the request's key: inserted in the
    /// handler's transaction ([`Tx`]), so only executions whose answer was recorded count.
    Postgres(sqlx::PgPool),
}

/// Why an execution could not be counted or read.
type CountError = Box<dyn std::error::Error + Send + Sync>;

/// The `orders` table, created at start (under an advisory lock, so instances starting at once take turns).
const ORDERS_SCHEMA: &str = "SELECT pg_advisory_xact_lock(hashtext('orders'));
CREATE TABLE IF NOT EXISTS orders (
    id              bigserial   PRIMARY KEY,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_idempotency_key ON orders (idempotency_key);";

// One hash tag, so the total and the per-key counts sit in one Cluster slot and are updated in one transaction.
const EXECUTIONS_KEY: &str = "{orders}:executions";
const EXECUTIONS_BY_KEY: &str = "{orders}:executions:by-key";

impl Executions {
    /// Counts one execution (and one for `key`, when the request carried one) and returns the new total (on
    /// PostgreSQL, the new order's id), inside `tx` when the handler runs in one.
    async fn increment(&self, key: Option<&str>, tx: Option<&mut Tx>) -> Result<u64, CountError> {
        const INSERT: &str = "INSERT INTO orders (idempotency_key) VALUES ($1) RETURNING id";
        // sqlx's futures are tens of KiB: boxed, they do not make every handler future (on every store) that large,
        // and copied whole into the task idem runs it on.
        if let Some(tx) = tx {
            let id: i64 = Box::pin(sqlx::query_scalar(INSERT).bind(key).fetch_one(&mut **tx)).await?;
            return Ok(u64::try_from(id)?);
        }
        match self {
            Executions::Memory(counts) => Ok(counts.increment(key)),
            Executions::Redis(connection) => Ok(Self::increment_on(connection.clone(), key).await?),
            Executions::Cluster(connection) => Ok(Self::increment_on(connection.clone(), key).await?),
            Executions::Postgres(pool) => {
                let id: i64 = Box::pin(sqlx::query_scalar(INSERT).bind(key).fetch_one(pool)).await?;
                Ok(u64::try_from(id)?)
            }
        }
    }

    async fn increment_on(
        mut connection: impl redis::aio::ConnectionLike,
        key: Option<&str>,
    ) -> Result<u64, redis::RedisError> {
        let Some(key) = key else {
            return redis::cmd("INCR").arg(EXECUTIONS_KEY).query_async(&mut connection).await;
        };
        let (total, _): (u64, u64) = redis::pipe()
            .atomic()
            .incr(EXECUTIONS_KEY, 1)
            .hincr(EXECUTIONS_BY_KEY, key, 1)
            .query_async(&mut connection)
            .await?;
        Ok(total)
    }

    async fn read(&self, key: Option<&str>) -> Result<u64, CountError> {
        use redis::AsyncCommands;
        let count: Option<u64> = match (self, key) {
            (Executions::Postgres(pool), key) => {
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM orders WHERE $1::text IS NULL OR idempotency_key = $1")
                        .bind(key)
                        .fetch_one(pool)
                        .await?;
                Some(u64::try_from(count)?)
            }
            (Executions::Memory(counts), key) => Some(counts.read(key)),
            (Executions::Redis(connection), None) => connection.clone().get(EXECUTIONS_KEY).await?,
            (Executions::Redis(connection), Some(key)) => connection.clone().hget(EXECUTIONS_BY_KEY, key).await?,
            (Executions::Cluster(connection), None) => connection.clone().get(EXECUTIONS_KEY).await?,
            (Executions::Cluster(connection), Some(key)) => connection.clone().hget(EXECUTIONS_BY_KEY, key).await?,
        };
        Ok(count.unwrap_or(0))
    }

    /// Pings the counter's connection in the background, so a connection that broke while the service was idle
    /// (Redis restarted) is replaced before a request needs it: the counter is the handlers' own side effect, and a
    /// failed count answers 500.
    fn keep_healthy(&self) {
        let Executions::Redis(connection) = self else { return };
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut connection = connection.clone();
                let ping = redis::cmd("PING");
                // An error makes the connection manager reconnect; the next tick tries again.
                let _ = tokio::time::timeout(Duration::from_secs(1), ping.query_async::<()>(&mut connection)).await;
            }
        });
    }
}

/// The memory backend's counts: the total and one per idempotency key.
#[derive(Default)]
struct MemoryCounts {
    total: AtomicU64,
    by_key: Mutex<HashMap<String, u64>>,
}

impl MemoryCounts {
    fn increment(&self, key: Option<&str>) -> u64 {
        let mut by_key = self.by_key.lock().expect("the counts' lock is never poisoned");
        if let Some(key) = key {
            *by_key.entry(key.to_owned()).or_default() += 1;
        }
        // Under the same lock as the per-key count, so a reader never sees one without the other.
        self.total.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn read(&self, key: Option<&str>) -> u64 {
        match key {
            None => self.total.load(Ordering::SeqCst),
            Some(key) => self.by_key.lock().expect("the counts' lock is never poisoned").get(key).copied().unwrap_or(0),
        }
    }
}

impl FromRef<AppState> for Idempotency {
    fn from_ref(state: &AppState) -> Self {
        state.idempotency.clone()
    }
}

impl AppState {
    /// Counts one execution of a handler body and returns the new count, which is also the created id.
    async fn execute(&self, headers: &HeaderMap, tx: Option<&mut Tx>) -> Result<u64, Response> {
        let key = headers.get("idempotency-key").and_then(|value| value.to_str().ok());
        self.executions.increment(key, tx).await.map_err(|error| {
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

/// On PostgreSQL the handler takes the transaction ([`Tx`]) its order row and its idempotency record commit in.
#[idempotent(ttl = 60, wait_timeout = 3.0, validate_signature)]
async fn create_order(
    State(state): State<AppState>,
    tx: Option<Tx>,
    headers: HeaderMap,
    Json(order): Json<NewOrder>,
) -> Response {
    place_order(&state, tx, &headers, order).await
}

/// `POST /orders` with a 2 s lease (renewed every ~0.7 s while the handler runs), so fault tests can freeze or kill
/// an owner and see the takeover without waiting for the default 30 s lease.
#[idempotent(ttl = 60, wait_timeout = 3.0, validate_signature, lease = 2)]
async fn create_order_short_lease(
    State(state): State<AppState>,
    tx: Option<Tx>,
    headers: HeaderMap,
    Json(order): Json<NewOrder>,
) -> Response {
    place_order(&state, tx, &headers, order).await
}

/// The same work without idempotency: the baseline for benchmarks.
async fn create_order_plain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(order): Json<NewOrder>,
) -> Response {
    place_order(&state, None, &headers, order).await
}

/// Places the order (its row, or its count), then takes `delay_ms`: a process killed during the delay has done its
/// side effect but not answered, the window fault tests aim at.
async fn place_order(state: &AppState, mut tx: Option<Tx>, headers: &HeaderMap, order: NewOrder) -> Response {
    let order_id = match state.execute(headers, tx.as_mut()).await {
        Ok(id) => id,
        Err(response) => return response,
    };
    pause(order.delay_ms).await;
    if order.fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "order failed", "order_id": order_id })))
            .into_response();
    }
    let location = format!("/orders/{order_id}");
    let body = json!({ "order_id": order_id, "item": order.item, "qty": order.qty });
    (StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response()
}

#[idempotent(required = false, wait_timeout = 0)]
async fn create_payment(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(payment): Json<NewPayment>,
) -> Response {
    let payment_id = match state.execute(&headers, None).await {
        Ok(id) => id,
        Err(response) => return response,
    };
    pause(payment.delay_ms).await;
    (StatusCode::CREATED, Json(json!({ "payment_id": payment_id, "amount": payment.amount }))).into_response()
}

/// Sleeps `delay_ms`; zero does not sleep at all (a zero-length sleep still waits for the next timer tick, ~1 ms).
async fn pause(delay_ms: u64) {
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
}

async fn stats(State(state): State<AppState>) -> Response {
    executions(&state, None).await
}

/// How many times handler bodies ran for requests with this `Idempotency-Key` (any route).
async fn key_stats(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    executions(&state, Some(&key)).await
}

async fn executions(state: &AppState, key: Option<&str>) -> Response {
    match state.executions.read(key).await {
        Ok(executions) => Json(json!({ "executions": executions })).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error.to_string() }))).into_response(),
    }
}

fn app(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/short-lease/orders", post(create_order_short_lease))
        .route("/payments", post(create_payment))
        .route("/plain/orders", post(create_order_plain))
        .route("/stats", get(stats))
        .route("/stats/keys/{key}", get(key_stats))
        .with_state(state)
}

/// The store and the execution counter: Redis Cluster, Redis, PostgreSQL or memory, from the environment.
async fn backend() -> Result<(Idempotency, Executions, String), Box<dyn std::error::Error>> {
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        let nodes: Vec<String> =
            urls.split(',').map(str::trim).filter(|url| !url.is_empty()).map(String::from).collect();
        let store = RedisStore::cluster(nodes.clone()).await?;
        let counter = redis::cluster::ClusterClient::new(nodes)?.get_async_connection().await?;
        return Ok((Idempotency::new(store), Executions::Cluster(counter), format!("redis cluster {urls}")));
    }
    if let Ok(url) = std::env::var("REDIS_URL") {
        // The store opens its own connections, so it fails fast during an outage and heals by itself; the counter
        // shares nothing with it.
        let store = RedisStore::open(url.as_str()).await?;
        // Reconnecting every 100 ms at most (redis-rs' default backoff doubles up to seconds): after Redis comes
        // back, the counter must answer as soon as the store does, or the first requests fail with 500.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(100));
        let counter = redis::Client::open(url.as_str())?.get_connection_manager_with_config(config).await?;
        return Ok((Idempotency::new(store), Executions::Redis(counter), format!("redis {url}")));
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        // The records and the orders share the database (and here the pool); the store's table is created first.
        let store = PostgresStore::connect(&url).await?;
        store.migrate().await?;
        sqlx::raw_sql(ORDERS_SCHEMA).execute(store.pool()).await?;
        let orders = Executions::Postgres(store.pool().clone());
        return Ok((Idempotency::new(store), orders, "postgres".to_owned()));
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
    executions.keep_healthy();
    let state = AppState { idempotency: idempotency.clone(), executions };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("orders service listening on http://{} (store: {backend})", listener.local_addr()?);
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown_signal()).await?;
    // Handlers whose clients already left still run detached: let them finish and record their responses.
    if let Err(undrained) = idempotency.drain(Duration::from_secs(30)).await {
        tracing::warn!(%undrained, "shutting down with handlers still running");
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM (what a deploy sends).
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
