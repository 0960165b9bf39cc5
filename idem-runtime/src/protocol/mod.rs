//! Building another front door on the engine: the bare claim / wait / replay protocol every door runs, free of HTTP
//! and of any particular store, and what a route returns to
//! [`Idempotency::handle`](crate::Idempotency::handle).
//!
//! Inside: `begin.rs` (claim a key or wait for its original: the protocol's one entry), `claim.rs` (the claim
//! handle and its fence), `decision.rs` (what a door does with what `begin` found: run, replay, refuse, run
//! unprotected), `keeper.rs` (renewing the leases of running claims, on one task per engine), `write.rs`
//! (owner-checked writes finished in the background), `background.rs` (an engine's keeper and writes, with its
//! store), `report.rs` (how a write that did not land is counted and logged).

pub(crate) mod background;
pub(crate) mod begin;
pub(crate) mod claim;
pub(crate) mod decision;
pub(crate) mod keeper;
pub(crate) mod report;
pub(crate) mod write;

#[cfg(test)]
mod tests;

pub use crate::http::execution::Execution;
pub use crate::http::extract::NotProtected;
pub use begin::{Outcome, begin};
pub use claim::{Claim, Fence};
