// Every argument, as `name = value` and, for the booleans, as bare flags.

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

#[idempotent(
    ttl = 60,
    wait_timeout = 2.5,
    lease = 10,
    validate_signature = false,
    required = false,
    store_server_errors,
    state = AppState,
    crate = "::idem"
)]
async fn with_values(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> String {
    order.item
}

#[idempotent(validate_signature, required, store_server_errors = true, ttl = 0.5, wait_timeout = 0, lease = 0.25)]
async fn with_flags(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> String {
    order.item
}

// A short `ttl` alone: the default lease (30 s) shrinks to fit it.
#[idempotent(ttl = 5, store_server_errors = false)]
async fn short_ttl(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> String {
    order.item
}

#[idempotent()]
async fn empty_parens(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> String {
    order.item
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new()
        .route("/values", post(with_values))
        .route("/flags", post(with_flags))
        .route("/short", post(short_ttl))
        .route("/empty", post(empty_parens))
        .with_state(state);
}
