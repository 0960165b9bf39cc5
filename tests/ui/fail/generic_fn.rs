use axum::extract::State;
use idem::idempotent;

#[idempotent]
async fn handler<S: Clone + Send + Sync + 'static>(State(_state): State<S>) -> &'static str {
    "ok"
}

fn main() {}
