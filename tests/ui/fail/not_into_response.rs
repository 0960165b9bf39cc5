use axum::Router;
use axum::routing::post;
use idem::{Idempotency, idempotent};

struct Order {
    id: u64,
}

#[idempotent]
async fn handler(body: String) -> Result<Order, &'static str> {
    Ok(Order { id: body.len() as u64 })
}

fn main() {
    let _app: Router = Router::new().route("/orders", post(handler)).layer(axum::Extension(Idempotency::in_memory()));
}
