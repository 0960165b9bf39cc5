//! Which door answers a request, and the span it answers in.

use crate::http::target::target;
use axum::extract::Request;
use tracing::field::Empty;

/// Which front door is answering, for the request span and the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Door {
    Handler,
    Layer,
}

impl Door {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Door::Handler => "handler",
            Door::Layer => "layer",
        }
    }
}

/// The span every request answered by a front door runs in; `key` (the store key's digest, never the client's
/// key), `outcome` and `wait_ms` are filled in as they become known.
pub(crate) fn request_span(door: Door, request: &Request) -> tracing::Span {
    tracing::info_span!(
        "idempotency",
        door = door.name(),
        method = %request.method(),
        path = target(request.extensions().get(), request.uri()).path(),
        key = Empty,
        outcome = Empty,
        wait_ms = Empty,
    )
}
