//! The engine behind [idem](https://docs.rs/idem): keys, fingerprints, claim / wait / store / replay, and the stores.
//!
//! Users depend on the `idem` crate, which re-exports everything here together with the `#[idempotent]` macro.

mod engine;
mod fingerprint;
pub mod http;
mod idempotency;
#[doc(hidden)]
pub mod macro_support;
mod policy;
mod record;
mod store;

pub use engine::{Claim, Outcome, begin};
pub use fingerprint::{Fingerprint, FingerprintBuilder};
pub use http::{Execution, Problem};
pub use idempotency::{Idempotency, IdempotencyBuilder, PrincipalFn, StoreFailure};
pub use policy::Policy;
pub use record::{Entry, OwnerToken, Record, Stored, StoredResponse};
pub use store::{Claimed, MemoryStore, MemoryStoreBuilder, Store, StoreError, StoreKey, Write};
