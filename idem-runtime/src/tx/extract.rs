//! Extracting [`Tx`] in a handler, and its rejections as problems.

use crate::http::problem::Problem;
use crate::tx::transaction::{Tx, TxRejection, TxSlot};
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

impl IntoResponse for TxRejection {
    fn into_response(self) -> Response {
        match self {
            TxRejection::NotTransactional => {
                tracing::error!("Tx extracted in a handler that idem does not serve on a PostgresStore");
                Problem::NotConfigured {
                    reason: "This handler takes `Tx`, which needs idem on a PostgreSQL store (`PostgresStore`): its \
                             writes commit with its idempotency record. This route's engine uses another store, or \
                             idem does not protect the handler.",
                }
                .into_response()
            }
            TxRejection::AlreadyTaken => {
                tracing::error!("Tx extracted twice in one request");
                Problem::NotConfigured { reason: "This handler takes `Tx` twice in one request." }.into_response()
            }
            TxRejection::Unavailable(error) => {
                tracing::error!(%error, "could not open the handler's transaction");
                Problem::StoreUnavailable.into_response()
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tx {
    type Rejection = TxRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let slot = parts.extensions.get::<Arc<TxSlot>>().cloned().ok_or(TxRejection::NotTransactional)?;
        slot.lend().await
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Tx {
    type Rejection = TxRejection;

    /// `None` when the engine's store is not a `PostgresStore` (or idem does not serve the handler): for handlers
    /// shared by apps on several stores.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        match parts.extensions.get::<Arc<TxSlot>>().cloned() {
            Some(slot) => slot.lend().await.map(Some),
            None => Ok(None),
        }
    }
}
