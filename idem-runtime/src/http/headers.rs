//! The headers idem adds to its answers.

use axum::http::HeaderName;

/// `X-Idempotency-Status`: `new` on a first execution, `hit` on a replay.
pub const STATUS_HEADER: HeaderName = HeaderName::from_static("x-idempotency-status");
/// `X-Idempotency-Signature`: the request's fingerprint, hex.
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-idempotency-signature");
/// `Idempotent-Replayed: true` on a replay.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
