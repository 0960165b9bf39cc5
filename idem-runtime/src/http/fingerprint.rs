//! What makes two HTTP requests the same request: their fingerprint.

use crate::canonical_json::canonical;
use crate::fingerprint::Fingerprint;
use crate::http::target::target;
use crate::policy::BodyFingerprint;
use axum::http::HeaderName;
use axum::http::request::Parts;
use std::borrow::Cow;

/// SHA-256 over length-prefixed method, path, query, the configured headers (each value of each) and the body.
///
/// The path and query are the request's as the client sent them (axum's `OriginalUri`), not as a nested
/// router strips them, so a router-wide layer and a handler in a nested router see the same request.
pub(crate) fn of_request(headers: &[HeaderName], parts: &Parts, body: &[u8], shape: BodyFingerprint) -> Fingerprint {
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
    builder.field(&shaped(body, shape)).finish()
}

/// What of `body` goes into the fingerprint under `shape`. Each shape hashes to its own domain (the tag before the
/// bytes), so a route that changes its shape never mistakes an old request for a new one or the other way round.
fn shaped(body: &[u8], shape: BodyFingerprint) -> Cow<'_, [u8]> {
    let json = |ignored: &[&str]| {
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        for pointer in ignored {
            remove(&mut value, pointer);
        }
        let mut tagged = b"json:".to_vec();
        tagged.extend(canonical(&value));
        Some(Cow::Owned(tagged))
    };
    match shape {
        BodyFingerprint::Bytes => Cow::Borrowed(body),
        BodyFingerprint::Json => json(&[]).unwrap_or(Cow::Borrowed(body)),
        BodyFingerprint::JsonIgnoring(ignored) => json(ignored).unwrap_or(Cow::Borrowed(body)),
        BodyFingerprint::Ignored => Cow::Borrowed(b"ignored:"),
    }
}

/// Removes the member or element `pointer` names, if there is one.
fn remove(value: &mut serde_json::Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else { return };
    let last = last.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent) {
        Some(serde_json::Value::Object(members)) => {
            members.remove(&last);
        }
        Some(serde_json::Value::Array(items)) => {
            if let Ok(index) = last.parse::<usize>()
                && index < items.len()
            {
                items.remove(index);
            }
        }
        _ => {}
    }
}
