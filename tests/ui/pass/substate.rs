// The handler takes a sub-state (`Db: FromRef<AppState>`) that does not hold the engine; the engine is installed
// as a request extension instead.

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idem::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone)]
struct Db;

#[derive(Clone)]
struct AppState {
    db: Db,
}

impl FromRef<AppState> for Db {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

#[idempotent]
async fn create_order(State(_db): State<Db>, Json(order): Json<NewOrder>) -> String {
    order.item
}

fn main() {
    let _app: Router = Router::new()
        .route("/orders", post(create_order))
        .layer(Extension(Idempotency::in_memory()))
        .with_state(AppState { db: Db });
}
