#![warn(missing_docs, missing_debug_implementations)]
// docs.rs (`--cfg docsrs`, nightly): items behind a feature say which one.
#![cfg_attr(docsrs, feature(doc_cfg))]
//! The engine behind [idem](https://docs.rs/axum-idem): keys, fingerprints, claim / wait / store / replay, and the
//! stores.
//!
//! Users depend on the `axum-idem` crate (its library is `idem`), which re-exports everything public here, at the
//! same paths, together with the `#[idempotent]` macro: `idem::Policy` is `idem_runtime::Policy`.
//!
//! How the crate is laid out (each module's own docs say more):
//! - `protocol/`: claim or wait, the claim handle and its fence, the lease keeper, background writes, and the one
//!   decision every door makes; free of HTTP and of any particular store;
//! - `door/`: the front doors calling the protocol: the HTTP pipeline, the layer, the layer/annotation handoff,
//!   `once`;
//! - `http/`: the HTTP vocabulary the doors share (key, fingerprint, problems, headers, replay, extractors);
//! - `tx/`: transactional mode on PostgreSQL;
//! - `store/`: the `Store` contract, its errors, and the memory, Redis and PostgreSQL stores;
//! - `engine.rs` (the state a handle shares with its doors), `idempotency.rs` (the handle's whole public surface),
//!   `builder.rs`, `policy.rs`, `record.rs`, `fingerprint.rs`, `metrics.rs`, `drain.rs`, `capacity.rs`.

mod builder;
mod canonical_json;
mod capacity;
mod door;
pub mod drain;
mod engine;
mod fingerprint;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod idempotency;
#[doc(hidden)]
pub mod macro_support;
pub mod metrics;
mod policy;
pub mod problems;
pub mod protocol;
mod record;
pub mod store;
mod store_key;
#[cfg(feature = "test-kit")]
pub mod test_kit;
mod tx;

pub use builder::IdempotencyBuilder;
pub use engine::Idempotency;
pub use http::extract::IdempotencyKey;
pub use http::problem::Problem;
pub use policy::{BodyFingerprint, Policy, StoreFailure};
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
#[cfg(feature = "postgres")]
pub use tx::transaction::{Tx, TxRejection};

/// A tower layer over the engine: idempotency for every unsafe method of a router, or of one route.
pub mod layer {
    pub use crate::door::layer::{IdempotencyLayer, IdempotencyService};
}

/// Running work at most once per key, for callers that are not HTTP handlers: [`Idempotency::once`](crate::Idempotency::once).
pub mod once {
    pub use crate::door::once::{Completed, Once, OnceError};
}

/// Reading the `Idempotency-Key` header: the rules a key must follow and the formats a server can require.
pub mod key {
    pub use crate::http::key::{Key, KeyError, KeyFormat, MAX_KEY_LEN, parse};
}

/// The headers idem adds to its answers.
pub mod headers {
    pub use crate::http::headers::{REPLAYED_HEADER, SIGNATURE_HEADER, STATUS_HEADER};
}
