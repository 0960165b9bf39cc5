//! The HTTP front door: key header, fingerprint, problem answers, replay; shared by the macro and the layer.

pub mod key;
mod problem;
mod replay;

pub use problem::Problem;

use crate::engine::{Claim, Outcome, begin};
use crate::store::StoreKey;
use crate::{Fingerprint, Idempotency, Policy, StoreFailure, Stored};
use axum::RequestExt;
use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;

/// `X-Idempotency-Status`: `new` on a first execution, `hit` on a replay.
pub const STATUS_HEADER: HeaderName = HeaderName::from_static("x-idempotency-status");
/// `X-Idempotency-Signature`: the request's fingerprint, hex.
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-idempotency-signature");
/// `Idempotent-Replayed: true` on a replay.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

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

impl Idempotency {
    /// Answers `request` idempotently under `policy`: reads the key, buffers the body under axum's
    /// `DefaultBodyLimit`, fingerprints it, then runs `run` once (detached from the connection, so a client that
    /// disconnects does not cancel it), replays, waits or refuses as the behaviour table says.
    ///
    /// This is what `#[idempotent]` expands to; call it directly to build another front door.
    pub async fn serve<F, Fut>(&self, policy: &Policy, request: Request, run: F) -> Response
    where
        F: FnOnce(Request) -> Fut + Send + 'static,
        Fut: Future<Output = Execution> + Send + 'static,
    {
        let shared = &*self.shared;
        let key = match key::parse(request.headers().get_all(&shared.key_header)) {
            Ok(Some(key)) => key,
            Ok(None) if policy.is_required() => {
                return Problem::MissingKey { header: shared.key_header.to_string() }.into_response();
            }
            Ok(None) => return run(request).await.into_response(),
            Err(error) => return Problem::InvalidKey { reason: error.to_string() }.into_response(),
        };
        let echo = request.headers().get(&shared.key_header).cloned();
        let (parts, body) = request.with_limited_body().into_parts();
        let body = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(body) => body,
            Err(error) if is_length_limit(&error) => return Problem::PayloadTooLarge.into_response(),
            Err(_) => return Problem::UnreadableBody.into_response(),
        };
        let fingerprint = self.fingerprint(&parts, &body);
        let principal = (shared.principal)(&parts);
        let store_key = StoreKey::derive(&[
            b"http",
            parts.method.as_str().as_bytes(),
            parts.uri.path().as_bytes(),
            &principal,
            key.as_str().as_bytes(),
        ]);
        let request = Request::from_parts(parts, Body::from(body));
        let mut response = match begin(&shared.store, store_key, fingerprint, policy).await {
            Ok(Outcome::Execute(claim)) => match execute(claim, policy, shared.max_record_bytes, request, run).await {
                Execution::Ran(mut response) => {
                    response.headers_mut().insert(STATUS_HEADER, HeaderValue::from_static("new"));
                    response
                }
                Execution::Rejected(rejection) => rejection,
            },
            Ok(Outcome::Replay(record)) => match &record.stored {
                Stored::Response(stored) => {
                    let mut response = replay::rebuild(stored);
                    let headers = response.headers_mut();
                    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                    headers.insert(STATUS_HEADER, HeaderValue::from_static("hit"));
                    response
                }
                Stored::NotReplayable { status } => Problem::NotReplayable { status: *status }.into_response(),
            },
            Ok(Outcome::InFlight) => Problem::InProgress.into_response(),
            Ok(Outcome::Mismatch) => Problem::KeyReused.into_response(),
            Err(error) => match shared.on_store_failure {
                StoreFailure::FailClosed => {
                    tracing::error!(%error, "idempotency store failed: answering 503 (fail closed)");
                    Problem::StoreUnavailable.into_response()
                }
                StoreFailure::FailOpen => {
                    tracing::error!(%error, "idempotency store failed: running the request unprotected (fail open)");
                    return run(request).await.into_response();
                }
            },
        };
        let headers = response.headers_mut();
        if let Some(echo) = echo {
            headers.insert(shared.key_header.clone(), echo);
        }
        if let Ok(signature) = HeaderValue::try_from(fingerprint.to_hex()) {
            headers.insert(SIGNATURE_HEADER, signature);
        }
        response
    }

    /// SHA-256 over length-prefixed method, path, query, the configured headers (each value of each) and the body.
    pub fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Fingerprint {
        let mut builder = Fingerprint::builder()
            .field(parts.method.as_str().as_bytes())
            .field(parts.uri.path().as_bytes())
            .field(parts.uri.query().unwrap_or_default().as_bytes());
        for name in &self.shared.fingerprint_headers {
            let values = parts.headers.get_all(name);
            builder = builder.field(name.as_str().as_bytes()).field(&(values.iter().count() as u64).to_be_bytes());
            for value in values {
                builder = builder.field(value.as_bytes());
            }
        }
        builder.field(body).finish()
    }
}

/// Runs the handler on its own task, so the connection's future being dropped (client gone) cannot cancel it
/// between the side effect and the record; a panic is caught there and becomes a 500 that releases the key.
async fn execute<F, Fut>(claim: Claim, policy: &Policy, limit: usize, request: Request, run: F) -> Execution
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let ttl = policy.ttl_duration();
    let store_server_errors = policy.stores_server_errors();
    let task = tokio::spawn(async move {
        let response = match claim.keep_alive(AssertUnwindSafe(run(request)).catch_unwind()).await {
            Ok(Execution::Ran(response)) => response,
            Ok(Execution::Rejected(rejection)) => {
                let _ = claim.release().await;
                return Execution::Rejected(rejection);
            }
            Err(_) => {
                tracing::error!(key = %claim.key(), "the idempotent handler panicked; its key is released");
                Problem::HandlerPanicked.into_response()
            }
        };
        if response.status().is_server_error() && !store_server_errors {
            let _ = claim.release().await;
            return Execution::Ran(response);
        }
        let (response, stored) = replay::capture(response, limit).await;
        let _ = claim.complete(stored, ttl).await;
        Execution::Ran(response)
    });
    task.await.unwrap_or_else(|error| {
        tracing::error!(%error, "the idempotent handler's task ended abnormally");
        Execution::Ran(Problem::HandlerPanicked.into_response())
    })
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}
