use axum::extract::Path;
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};

#[idempotent]
async fn handler(Json(item): Json<String>, Path(id): Path<u64>) -> String {
    format!("{id}: {item}")
}

fn main() {
    let _app: Router =
        Router::new().route("/orders/{id}", post(handler)).layer(axum::Extension(Idempotency::in_memory()));
}
