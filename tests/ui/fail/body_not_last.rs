use axum::Json;
use axum::extract::Path;
use idem::idempotent;

#[idempotent]
async fn handler(Json(item): Json<String>, Path(id): Path<u64>) -> String {
    format!("{id}: {item}")
}

fn main() {}
