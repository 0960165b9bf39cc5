//! What a door gets back from the route it runs.

use axum::response::{IntoResponse, Response};

/// What running a route produced.
#[derive(Debug)]
pub enum Execution {
    /// The handler body ran and answered: its answer is final and stored (unless it is a 5xx).
    Ran(Response),
    /// An extractor refused the request before the handler body ran: sent, never stored, the key released.
    Rejected(Response),
}

impl IntoResponse for Execution {
    fn into_response(self) -> Response {
        match self {
            Execution::Ran(response) | Execution::Rejected(response) => response,
        }
    }
}
