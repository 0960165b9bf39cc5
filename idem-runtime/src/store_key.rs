//! How a request's idempotency key becomes a store key, for each door: one place, so every door and operation
//! derives the same key for the same request.

use crate::store::contract::StoreKey;
use axum::http::Method;

/// The store key of an HTTP request: its method, path as the client sent it (no query), principal and key.
pub(crate) fn http(method: &Method, path: &str, principal: &[u8], key: &str) -> StoreKey {
    StoreKey::derive(&[b"http", method.as_str().as_bytes(), path.as_bytes(), principal, key.as_bytes()])
}

/// The store key of `Idempotency::once` work: its scope and key.
pub(crate) fn once(scope: &str, key: &str) -> StoreKey {
    StoreKey::derive(&[b"once", scope.as_bytes(), key.as_bytes()])
}
