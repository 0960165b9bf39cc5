// The common shape: the router state holds the engine (`Idempotency: FromRef<AppState>`), the handler takes that
// state and a JSON body.

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct AppState {
    idempotency: Idempotency,
}

impl FromRef<AppState> for Idempotency {
    fn from_ref(state: &AppState) -> Self {
        state.idempotency.clone()
    }
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

#[derive(Serialize)]
struct Order {
    id: u64,
    item: String,
}

#[idempotent]
async fn create_order(State(_state): State<AppState>, Json(order): Json<NewOrder>) -> (StatusCode, Json<Order>) {
    (StatusCode::CREATED, Json(Order { id: 1, item: order.item }))
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/orders", post(create_order)).with_state(state);
}
