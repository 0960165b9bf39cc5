//! Which URI a request is about, for every door alike.

use axum::extract::OriginalUri;
use axum::http::Uri;

/// The URI the client asked for: axum's `OriginalUri` when a router set it (a nested router strips its prefix
/// from the request's own URI), else the request's URI (outside any router). Records are scoped by it, so
/// `/v1/orders` and `/v2/orders` never share records, and every door derives the same key for one request.
pub(crate) fn target<'a>(original: Option<&'a OriginalUri>, uri: &'a Uri) -> &'a Uri {
    original.map_or(uri, |original| &original.0)
}
