//! What makes two HTTP requests the same request: their fingerprint.

use crate::fingerprint::Fingerprint;
use crate::http::target::target;
use axum::http::HeaderName;
use axum::http::request::Parts;

/// SHA-256 over length-prefixed method, path, query, the configured headers (each value of each) and the body.
///
/// The path and query are the request's as the client sent them (axum's `OriginalUri`), not as a nested
/// router strips them, so a router-wide layer and a handler in a nested router see the same request.
pub(crate) fn of_request(headers: &[HeaderName], parts: &Parts, body: &[u8]) -> Fingerprint {
    let uri = target(parts.extensions.get(), &parts.uri);
    let mut builder = Fingerprint::builder()
        .field(parts.method.as_str().as_bytes())
        .field(uri.path().as_bytes())
        .field(uri.query().unwrap_or_default().as_bytes());
    for name in headers {
        let values = parts.headers.get_all(name);
        builder = builder.field(name.as_str().as_bytes()).field(&(values.iter().count() as u64).to_be_bytes());
        for value in values {
            builder = builder.field(value.as_bytes());
        }
    }
    builder.field(body).finish()
}
