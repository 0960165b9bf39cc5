use axum::Router;
use axum::routing::post;
use idem::{Idempotency, idempotent};

struct Order {
    item: String,
}

#[idempotent]
async fn handler(order: Order) -> String {
    order.item
}

fn main() {
    let _app: Router = Router::new().route("/orders", post(handler)).layer(axum::Extension(Idempotency::in_memory()));
}
