// Doc comments, lint attributes, `cfg` and another attribute macro (`tracing::instrument`) on the handler, in a
// module with `pub` visibility; the expansion itself must not warn.
#![deny(warnings, missing_docs)]

//! A crate whose public handlers must be documented.

use axum::Router;
use axum::extract::FromRef;
use axum::routing::post;
use idem::Idempotency;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

/// The handlers.
pub mod handlers {
    use axum::Json;
    use axum::extract::State;
    use idem::idempotent;
    use serde::Deserialize;

    /// A new order.
    #[derive(Deserialize)]
    pub struct NewOrder {
        item: String,
    }

    /// Creates an order, once per `Idempotency-Key`.
    ///
    /// The doc comment stays on the handler the router sees.
    #[idempotent(ttl = 60)]
    #[allow(clippy::unused_async)]
    #[tracing::instrument(skip_all, fields(route = "orders"))]
    #[cfg(all())]
    pub async fn create_order(State(_state): State<super::AppState>, Json(order): Json<NewOrder>) -> String {
        tracing::info!(item = %order.item, "creating");
        order.item
    }

    /// A crate-private handler with an unused argument allowed by its attribute.
    #[idempotent]
    #[allow(unused_variables)]
    pub(crate) async fn touch(State(state): State<super::AppState>, body: String) {}
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new()
        .route("/orders", post(handlers::create_order))
        .route("/touch", post(handlers::touch))
        .with_state(state);
}
