//! Writing a store of your own: the [`Store`] trait, what a store keeps, and the builders of the built-in stores
//! (which themselves are at the crate root: `MemoryStore`, `RedisStore`, `PostgresStore`).
//!
//! Implement the trait with [`async_trait`](macro@async_trait) (`#[idem::store::async_trait] impl Store for MyStore`), and check your
//! store with the conformance suite in `test_kit` (feature `test-kit`).

pub(crate) mod contract;
pub(crate) mod error;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod health;
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod timed;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod wakeup;

pub use crate::fingerprint::{Fingerprint, FingerprintBuilder};
pub use crate::record::{Entry, OwnerToken, Record, Stored, StoredResponse};
/// The attribute [`Store`] is declared with, for implementing it: `#[idem::store::async_trait] impl Store for
/// MyStore`, with no `async-trait` dependency of your own to keep at a matching version.
pub use async_trait::async_trait;
pub use contract::{Claimed, Forgotten, Store, StoreKey, Write};
pub use error::{Cause, StoreError};
pub use memory::builder::MemoryStoreBuilder;
#[cfg(feature = "postgres")]
pub use postgres::builder::PostgresStoreBuilder;
#[cfg(feature = "redis")]
pub use redis::builder::{InvalidPrefix, RedisStoreBuilder};
