//! Extractors for protected handlers: the request's idempotency key and its claim's fence.

use crate::http::problem::Problem;
use crate::protocol::claim::Fence;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::Arc;

/// The idempotency key of the request a protected handler is running for, as the client sent it (unquoted when it
/// came in the structured-field form).
///
/// Forward it downstream, for instance as a payment provider's own idempotency key, so a retry that reaches the
/// provider after a takeover is still deduplicated there:
///
/// ```
/// # use idem_runtime as idem;
/// use idem::IdempotencyKey;
///
/// // Annotated with `#[idempotent]`, or served behind the layer.
/// async fn charge(key: IdempotencyKey, amount: String) -> String {
///     format!("charged {amount} under provider key order-{key}")
/// }
/// # let _ = axum::routing::post::<_, _, ()>(charge);
/// ```
///
/// It is there whenever idem served the request with a valid key, including a run without a claim under
/// [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen) (where forwarding the key downstream is the only
/// protection left). In a handler that idem does not protect (no annotation, no layer, or a request without a key on
/// a route where keys are optional), `IdempotencyKey` rejects with `500 not-configured`; take
/// `Option<IdempotencyKey>` there. [`Fence`] is there only when the handler runs under a claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    pub(crate) fn new(key: &str) -> Self {
        Self(key.into())
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rejection of [`IdempotencyKey`] and [`Fence`] in a handler idem does not protect: a programming error,
/// answered `500 not-configured`.
#[derive(Debug, Clone, Copy)]
pub struct NotProtected;

impl IntoResponse for NotProtected {
    fn into_response(self) -> Response {
        tracing::error!("IdempotencyKey or Fence extracted in a handler that idem does not protect");
        Problem::NotConfigured {
            reason: "This handler asks for its idempotency key or fence, but idem does not protect it: annotate it \
                     with `#[idempotent]` or put its route under an `IdempotencyLayer`.",
        }
        .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = NotProtected;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Self>().cloned().ok_or(NotProtected)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Fence {
    type Rejection = NotProtected;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Self>().cloned().ok_or(NotProtected)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Fence {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned())
    }
}
