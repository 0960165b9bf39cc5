use axum::Router;
use axum::routing::post;
use idem::{Idempotency, idempotent};

struct Tenant(String);

#[idempotent]
async fn handler(Tenant(tenant): Tenant, body: String) -> String {
    format!("{tenant}: {body}")
}

fn main() {
    let _app: Router = Router::new().route("/orders", post(handler)).layer(axum::Extension(Idempotency::in_memory()));
}
