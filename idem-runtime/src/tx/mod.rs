//! Transactional mode: a handler's writes and its idempotency record commit in one PostgreSQL transaction.
//!
//! - [`transaction`]: [`Tx`](transaction::Tx), the transaction lent to a handler, and the slot it lives in;
//! - [`extract`]: taking `Tx` in a handler;
//! - [`hook`]: what a door calls around a handler (offer, complete and commit, roll back); a no-op on other stores;
//! - [`unkept`]: why a handler's writes were not kept.
//!
//! PostgreSQL's own transaction steps are the store's, beside it in `store/postgres/tx.rs`.

#[cfg(feature = "postgres")]
pub(crate) mod extract;
pub(crate) mod hook;
#[cfg(feature = "postgres")]
pub(crate) mod transaction;
pub(crate) mod unkept;
