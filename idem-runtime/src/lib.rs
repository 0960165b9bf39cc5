#![warn(missing_docs, missing_debug_implementations)]
// docs.rs (`--cfg docsrs`, nightly): items behind a feature say which one.
#![cfg_attr(docsrs, feature(doc_cfg))]
//! The engine behind [idem](https://docs.rs/idem): keys, fingerprints, claim / wait / store / replay, and the stores.
//!
//! Users depend on the `idem` crate, which re-exports everything here together with the `#[idempotent]` macro.

mod capacity;
mod drain;
mod engine;
mod fingerprint;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
mod idempotency;
mod layer;
#[doc(hidden)]
pub mod macro_support;
mod metrics;
mod once;
mod operations;
mod policy;
pub mod problems;
mod record;
mod store;
#[cfg(feature = "test-kit")]
pub mod test_kit;
#[cfg(feature = "postgres")]
mod transaction;

pub use drain::Undrained;
pub use engine::{Claim, Fence, Outcome, begin};
pub use fingerprint::{Fingerprint, FingerprintBuilder};
pub use http::{Execution, IdempotencyKey, Problem};
pub use idempotency::{Idempotency, IdempotencyBuilder, PrincipalFn, StoreFailure};
pub use layer::{IdempotencyLayer, IdempotencyService};
#[cfg(feature = "metrics")]
pub use metrics::MetricsFacade;
pub use metrics::{Counters, Event, Metrics, Site, Snapshot, StoreOperation, WAIT_BUCKETS, WaitHistogram};
pub use once::{Completed, Once, OnceError};
pub use policy::Policy;
pub use record::{Entry, OwnerToken, Record, Stored, StoredResponse};
pub use store::{Cause, Claimed, Forgotten, MemoryStore, MemoryStoreBuilder, Store, StoreError, StoreKey, Write};
#[cfg(feature = "redis")]
pub use store::{InvalidPrefix, RedisStore, RedisStoreBuilder};
#[cfg(feature = "postgres")]
pub use store::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "postgres")]
pub use transaction::{Tx, TxRejection};

/// The attribute [`Store`] is declared with, for implementing it: `#[idem::async_trait] impl Store for MyStore`,
/// with no `async-trait` dependency of your own to keep at a matching version.
pub use async_trait::async_trait;
