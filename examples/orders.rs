//! The reference service: `cargo run --example orders`.
//!
//! Binds `BIND` (default `127.0.0.1:3000`) and keeps records in memory.
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
use idem::{Idempotency, MemoryStore, idempotent};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    idempotency: Idempotency,
    executions: Arc<AtomicU64>,
}

impl FromRef<AppState> for Idempotency {
    fn from_ref(state: &AppState) -> Self {
        state.idempotency.clone()
    }
}

impl AppState {
    /// Counts one execution of a handler body and returns the new count, which is also the created id.
    async fn execute(&self) -> u64 {
        self.executions.fetch_add(1, Ordering::SeqCst) + 1
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
    let order_id = state.execute().await;
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
async fn create_payment(State(state): State<AppState>, Json(payment): Json<NewPayment>) -> impl IntoResponse {
    let payment_id = state.execute().await;
    tokio::time::sleep(Duration::from_millis(payment.delay_ms)).await;
    (StatusCode::CREATED, Json(json!({ "payment_id": payment_id, "amount": payment.amount })))
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "executions": state.executions.load(Ordering::SeqCst) }))
}

fn app(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/payments", post(create_payment))
        .route("/plain/orders", post(create_order_unprotected))
        .route("/stats", get(stats))
        .with_state(state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,idem_runtime=info".into()),
        )
        .init();
    if std::env::var_os("REDIS_URL").is_some() {
        eprintln!("REDIS_URL is set, but this build of idem has no Redis store yet; unset it to use the memory store.");
        std::process::exit(2);
    }
    let state = AppState { idempotency: Idempotency::new(MemoryStore::new()), executions: Arc::default() };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("orders service listening on http://{} (store: memory)", listener.local_addr()?);
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
