//! The doors' side of [`Tx`](crate::tx::transaction::Tx): offer a transaction slot to the handler, then commit it with the record
//! or roll it back. Without the `postgres` feature (or on another store) every step is a no-op.

use crate::engine::Engine;
use crate::protocol::claim::Claim;
use crate::record::Stored;
#[cfg(feature = "postgres")]
use crate::tx::transaction::TxSlot;
use crate::tx::unkept::Unkept;
use axum::extract::Request;
use std::time::Duration;

/// The transaction slot of one request, when the engine's store is a [`PostgresStore`](crate::store::postgres::PostgresStore).
#[derive(Default)]
pub(crate) struct HandlerTransaction {
    #[cfg(feature = "postgres")]
    slot: Option<std::sync::Arc<TxSlot>>,
}

impl HandlerTransaction {
    /// Puts a slot in `request`'s extensions, where [`Tx`](crate::tx::transaction::Tx) finds it.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) fn offer(shared: &Engine, request: &mut Request) -> Self {
        #[cfg(feature = "postgres")]
        if let Some(store) = &shared.transactions {
            let slot = TxSlot::new(store.clone());
            request.extensions_mut().insert(slot.clone());
            return Self { slot: Some(slot) };
        }
        Self::default()
    }

    /// Rolls back what the handler wrote, if it opened a transaction: before its key is released.
    pub(crate) async fn roll_back(&self) {
        #[cfg(feature = "postgres")]
        if let Some(slot) = &self.slot {
            // Each PostgreSQL step is boxed: sqlx 0.9's futures are tens of KiB, and inline they would sit in the
            // state of every handler task, on every store (37 KiB instead of 3; Redis first requests cost 10-15 %
            // more CPU in copies and page faults).
            Box::pin(slot.roll_back()).await;
        }
    }

    /// Completes `claim` inside the handler's transaction and commits (see [`TxSlot::complete`]); gives the claim
    /// back when the handler opened none.
    ///
    /// [`TxSlot::complete`]: crate::tx::transaction::TxSlot::complete
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) async fn complete(
        &self,
        claim: Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Result<(), Unkept>, (Claim, Stored)> {
        #[cfg(feature = "postgres")]
        if let Some(slot) = &self.slot {
            return Box::pin(slot.complete(claim, stored, ttl)).await;
        }
        Err((claim, stored))
    }

    /// Finishes a request run without a claim: commits when `keep`, else rolls back.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) async fn finish_unclaimed(&self, keep: bool) -> Result<(), Unkept> {
        #[cfg(feature = "postgres")]
        if let Some(slot) = &self.slot {
            return Box::pin(slot.finish_unclaimed(keep)).await;
        }
        Ok(())
    }
}
