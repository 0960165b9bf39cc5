// A raw `Bytes` body.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::put;
use idem::{Idempotency, idempotent};

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[idempotent]
async fn upload(State(_state): State<AppState>, body: Bytes) -> StatusCode {
    if body.is_empty() { StatusCode::BAD_REQUEST } else { StatusCode::NO_CONTENT }
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/blobs", put(upload)).with_state(state);
}
