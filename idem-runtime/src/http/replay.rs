//! Turning a handler's response into a stored one, and a stored one back into a response.

use crate::record::{Stored, StoredResponse};
use axum::body::Body;
use axum::body::HttpBody;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;

/// Headers never replayed: connection-level (hop-by-hop) ones, framing the server recomputes, and the ones that
/// must be fresh or belong to one client only.
const NOT_REPLAYED: [HeaderName; 12] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::DATE,
    header::SET_COOKIE,
];

/// Reads a handler's response into what a store keeps, and gives back the response to send now.
///
/// A body of known length up to `limit` is buffered and kept. A larger one, or one of unknown length (a stream),
/// is sent through untouched and recorded as [`Stored::NotReplayable`]: buffering a stream would hold its first
/// bytes back from the client, and a truncated replay would be worse than none.
pub(crate) async fn capture(response: Response, limit: usize) -> (Response, Stored) {
    let status = response.status().as_u16();
    let fits = response.body().size_hint().exact().is_some_and(|length| length <= limit as u64);
    if !fits {
        return (response, Stored::NotReplayable { status });
    }
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::error!(%error, "the handler's response body failed; recording the key as not replayable");
            let mut failed = Response::new(Body::empty());
            *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return (failed, Stored::NotReplayable { status });
        }
    };
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| !NOT_REPLAYED.contains(name))
        .map(|(name, value)| (name.as_str().to_owned(), bytes::Bytes::copy_from_slice(value.as_bytes())))
        .collect();
    let stored = StoredResponse { status, headers, body: body.clone() };
    (Response::from_parts(parts, Body::from(body)), Stored::Response(stored))
}

/// Rebuilds a stored response. Header names and values were valid when stored; any that a foreign writer corrupted
/// are skipped rather than failing the replay.
pub(crate) fn rebuild(stored: &StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.reserve(stored.headers.len());
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(value.clone()))
        {
            headers.append(name, value);
        }
    }
    response
}
