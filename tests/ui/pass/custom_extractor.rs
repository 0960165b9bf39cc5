// User-defined extractors: one from the parts (before the body) and one consuming the body (last).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::post;
use idem::{Idempotency, idempotent};

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

struct Tenant(String);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let tenant = parts.headers.get("x-tenant").and_then(|value| value.to_str().ok());
        tenant.map(|tenant| Tenant(tenant.to_owned())).ok_or((StatusCode::BAD_REQUEST, "missing x-tenant"))
    }
}

struct Signed(Bytes);

impl<S: Send + Sync> FromRequest<S> for Signed {
    type Rejection = (StatusCode, &'static str);

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !request.headers().contains_key("x-signature") {
            return Err((StatusCode::UNAUTHORIZED, "missing x-signature"));
        }
        let body = Bytes::from_request(request, state).await.map_err(|_| (StatusCode::BAD_REQUEST, "bad body"))?;
        Ok(Signed(body))
    }
}

#[idempotent]
async fn webhook(State(_state): State<AppState>, Tenant(tenant): Tenant, Signed(body): Signed) -> String {
    format!("{tenant}: {} bytes", body.len())
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/webhooks", post(webhook)).with_state(state);
}
