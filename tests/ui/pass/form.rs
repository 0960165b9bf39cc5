// A form body.

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Form, Router};
use idem::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[derive(Deserialize)]
struct Signup {
    email: String,
}

#[idempotent]
async fn signup(State(_state): State<AppState>, Form(signup): Form<Signup>) -> String {
    signup.email
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/signup", post(signup)).with_state(state);
}
