// `crate = "..."` when `idem` is reached through a re-export rather than as `::idem`.

mod deps {
    pub use ::idem as idempotency;
}

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Json, Router};
use deps::idempotency::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

#[idempotent(crate = "crate::deps::idempotency", ttl = 60)]
async fn create_order(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> String {
    order.item
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/orders", post(create_order)).with_state(state);
}
