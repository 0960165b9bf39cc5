//! A conformance suite for [`Store`](crate::store::contract::Store) implementations (feature `test-kit`): every row of idem's
//! behaviour table, run through `#[idempotent]` handlers against your store, plus the store contract called
//! directly (exclusive claims, owner fencing, lapsed leases, waits). idem runs the same suite on `MemoryStore`,
//! a Redis node and a Redis Cluster.
//!
//! Enable the feature for your tests only, and add one line to a file under `tests/`:
//!
//! ```toml
//! [dev-dependencies]
//! axum-idem = { version = "0.1", features = ["test-kit"] }
//! ```
//!
//! ```
//! # use idem_runtime as idem;
//! // tests/conformance.rs
//! idem::test_kit::conformance_tests!(my_store, || async { idem::MemoryStore::new() });
//! ```
//!
//! This expands to a module `my_store` holding one `#[test]` per case, named after it (so a failure says which
//! row broke), each running the case on a fresh store from the closure, on a multi-threaded Tokio runtime of
//! its own: no Tokio dependency or attribute is needed in your crate. Run them with `cargo test`; filter with
//! `cargo test my_store::` or a case's name.
//!
//! What the cases assume of the store under test:
//! - **Real time.** Cases hold leases and records for real (a few hundred milliseconds at most): a store whose
//!   clock can be paused is fine, but the cases do not pause it.
//! - **Fresh keys.** Every case uses keys no other case and no earlier run used, so a persistent store (a shared
//!   database) can serve every case at once, and across runs, without being emptied.
//! - **Its own network.** A few cases serve the test app on a loopback TCP port to drop a connection halfway.
//!
//! Each case is also a public function in [`cases`] (through `#[idempotent]` handlers) or [`contract`] (the trait
//! called directly), taking the store by value, to call from a test of your own.
//!
//! For faults no real backend has on cue, two test doubles: [`Outage`], a store that is down, and [`Faulty`], a
//! wrapper around any store that fails, delays or answers the calls you choose (a lost reply, a renewal that hangs,
//! renewals down while claims work) and counts every call.

pub mod cases;
mod conformance;
pub mod contract;
mod faulty;
mod outage;

/// The test app the cases drive. Used by idem's own tests; not a stable API.
#[doc(hidden)]
pub mod app;
/// Requests, answers and their assertions. Used by idem's own tests; not a stable API.
#[doc(hidden)]
pub mod client;

pub use faulty::{Fault, Faulty, Operation};
pub use outage::Outage;

/// What `#[idempotent]` expands to use, as the facade crate's own `__private` offers it: the handlers of the test
/// app are annotated with `crate = "crate::test_kit"`, since this crate cannot name `idem`.
mod __private {
    pub use crate::http::execution::Execution;
    pub use crate::macro_support::*;
    pub use crate::policy::Policy;
    pub use axum::extract::{FromRequest, FromRequestParts, Request, State};
    pub use axum::response::{IntoResponse, Response};
}

#[doc(hidden)]
pub use conformance::run;

/// Expands to `mod $module { ... }` with one `#[test]` per conformance case, each on a fresh store from `$store`:
/// an expression callable with no arguments that returns a future of the store (`|| async { ... }`), evaluated
/// inside the module (which sees its parent's items through `use super::*`).
///
/// ```
/// # use idem_runtime as idem;
/// use std::sync::Arc;
///
/// // A store shared by every case (the suite's keys never collide), or a new one per case.
/// fn shared() -> Arc<idem::MemoryStore> {
///     static STORE: std::sync::OnceLock<Arc<idem::MemoryStore>> = std::sync::OnceLock::new();
///     STORE.get_or_init(Default::default).clone()
/// }
///
/// idem::test_kit::conformance_tests!(shared_memory, || async { shared() });
/// ```
#[doc(inline)]
pub use crate::__idem_conformance_tests as conformance_tests;
