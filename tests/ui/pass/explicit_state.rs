// Two different sub-states: the router's state cannot be inferred, so it is named with `state = AppState`.

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone)]
struct Db;

#[derive(Clone)]
struct Mailer;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
    db: Db,
    mailer: Mailer,
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

#[idempotent(state = AppState)]
async fn create_order(State(_db): State<Db>, State(_mailer): State<Mailer>, Json(order): Json<NewOrder>) -> String {
    order.item
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory(), db: Db, mailer: Mailer };
    let _app: Router = Router::new().route("/orders", post(create_order)).with_state(state);
}
