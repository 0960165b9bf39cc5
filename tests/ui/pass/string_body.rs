// A `String` body.

use axum::Router;
use axum::extract::{FromRef, State};
use axum::routing::post;
use idem::{Idempotency, idempotent};

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[idempotent]
async fn note(State(_state): State<AppState>, body: String) -> String {
    body.to_uppercase()
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/notes", post(note)).with_state(state);
}
