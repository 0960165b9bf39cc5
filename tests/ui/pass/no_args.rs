// No arguments at all: no state to find the engine in, so it is installed as a request extension. The handler fits
// any router state.

use axum::routing::post;
use axum::{Extension, Router};
use idem::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState;

#[idempotent]
async fn ping() -> &'static str {
    "pong"
}

#[idempotent(required = false)]
async fn nothing() {}

fn main() {
    let _stateless: Router = Router::new().route("/ping", post(ping)).layer(Extension(Idempotency::in_memory()));
    let _stateful: Router = Router::new()
        .route("/ping", post(ping))
        .route("/nothing", post(nothing))
        .layer(Extension(Idempotency::in_memory()))
        .with_state(AppState);
}
