//! Router-wide idempotency with the tower layer: `cargo run --example layer`.
//!
//! Binds `BIND` (default `127.0.0.1:3000`) and keeps records in memory. Every `POST`, `PUT`, `PATCH` and `DELETE`
//! that carries an `Idempotency-Key` is idempotent with the app-wide settings; `GET`s pass through. `POST /payments`
//! is also annotated: it is processed once, with the annotation's settings (a key is required there).
//!
//! ```text
//! curl -i -X POST localhost:3000/transfers -H 'Idempotency-Key: t1' -H 'content-type: application/json' \
//!      -d '{"to":"acct-2","cents":500}'
//! curl -i -X PUT localhost:3000/profile -H 'Idempotency-Key: p1' -H 'content-type: application/json' \
//!      -d '{"name":"Ada"}'
//! curl -i -X POST localhost:3000/payments -H 'content-type: application/json' -d '{"cents":500}'   # 400: key required
//! curl -s localhost:3000/stats
//! ```

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use idem::metrics::Counters;
use idem::{Idempotency, MemoryStore, Policy, idempotent};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    executions: Arc<AtomicU64>,
    counters: Arc<Counters>,
}

impl AppState {
    /// Counts one execution of a handler body and returns the new count, used as the created id.
    fn execute(&self) -> u64 {
        self.executions.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[derive(Deserialize)]
struct NewTransfer {
    to: String,
    cents: u64,
}

#[derive(Deserialize)]
struct Profile {
    name: String,
}

#[derive(Deserialize)]
struct NewPayment {
    cents: u64,
}

/// Idempotent through the layer alone: a retry with the same key gets the stored answer.
async fn create_transfer(State(state): State<AppState>, Json(transfer): Json<NewTransfer>) -> impl IntoResponse {
    let transfer_id = state.execute();
    (StatusCode::CREATED, Json(json!({ "transfer_id": transfer_id, "to": transfer.to, "cents": transfer.cents })))
}

async fn update_profile(State(state): State<AppState>, Json(profile): Json<Profile>) -> impl IntoResponse {
    let version = state.execute();
    Json(json!({ "name": profile.name, "version": version }))
}

async fn delete_session(State(state): State<AppState>, Path(id): Path<String>) -> impl IntoResponse {
    state.execute();
    (StatusCode::OK, Json(json!({ "deleted": id })))
}

/// Under the layer *and* annotated: processed once, with these settings rather than the layer's.
#[idempotent(ttl = 600, wait_timeout = 5.0)]
async fn create_payment(State(state): State<AppState>, Json(payment): Json<NewPayment>) -> impl IntoResponse {
    let payment_id = state.execute();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (StatusCode::CREATED, Json(json!({ "payment_id": payment_id, "cents": payment.cents })))
}

/// A safe method: the layer lets it through untouched.
async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let counts = state.counters.snapshot();
    Json(json!({
        "executions": state.executions.load(Ordering::SeqCst),
        "new": counts.new,
        "hit": counts.hit,
        "conflict": counts.conflict,
        "mismatch": counts.mismatch,
        "store_errors": counts.store_errors,
        "waits": counts.wait.count,
    }))
}

fn app(idempotency: &Idempotency, state: AppState) -> Router {
    Router::new()
        .route("/transfers", post(create_transfer))
        .route("/profile", put(update_profile))
        .route("/sessions/{id}", delete(delete_session))
        .route("/payments", post(create_payment))
        .route("/stats", get(stats))
        // `Router::layer` wraps each route, so the layer sees axum's `MatchedPath` and, once `/payments` has been
        // called, leaves that route to its annotation entirely.
        // The settings for the routes that are not annotated: keys optional, records kept an hour, a duplicate
        // waits up to two seconds for its original, bodies up to 64 KiB.
        .layer(
            idempotency
                .layer()
                .policy(
                    Policy::new().required(false).ttl(Duration::from_secs(3600)).wait_timeout(Duration::from_secs(2)),
                )
                .body_limit(64 * 1024),
        )
        .with_state(state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,idem_runtime=info".into()),
        )
        .init();
    let counters = Arc::new(Counters::new());
    let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
    let state = AppState { executions: Arc::default(), counters };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("layer example listening on http://{} (store: memory)", listener.local_addr()?);
    axum::serve(listener, app(&idempotency, state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
