//! PostgreSQL's side of transactional mode: a transaction on the store's pool, the owner-checked completion inside
//! it, its commit and its rollback, and what is done when the handler left it aborted (SQLSTATE `25P02`).

use crate::record::{OwnerToken, Record};
use crate::store::contract::{Store, StoreKey, Write};
use crate::store::error::StoreError;
use crate::store::postgres::PostgresStore;
use std::time::Duration;
use tokio::time::Instant;

/// What the transactional doors ([`Tx`](crate::Tx)) ask of the store: a transaction on its pool, and the
/// owner-checked completion inside it.
impl PostgresStore {
    /// Opens a transaction on the store's pool, within the call timeout.
    pub(crate) async fn begin_transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        self.bounded(self.pool.begin()).await
    }

    /// Completes `key` for `owner` inside `transaction` and commits it, so the record becomes visible (and waiting
    /// duplicates are notified) together with the handler's own writes; each step within the call timeout.
    ///
    /// [`Write::Fenced`] (rolled back) when the claim is no longer the owner's. When the handler left its
    /// transaction aborted (one of its statements failed, and it answered anyway, say `409` for a unique
    /// violation), nothing it wrote can commit, and its answer is final: the transaction is rolled back and the
    /// answer recorded by the ordinary owner-checked completion, so a retry replays it. `Err` (rolled back) when the
    /// completion or the commit failed otherwise.
    pub(crate) async fn complete_transaction(
        &self,
        mut transaction: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let statement = &self.statements.complete_in_transaction;
        let write = self.complete_on(&mut *transaction, statement, key, owner, record, ttl);
        match self.answer_by(Instant::now() + self.call_timeout, write).await {
            Ok(Ok(Write::Applied)) => self.commit(transaction).await.map(|()| Write::Applied),
            Ok(Ok(Write::Fenced)) => {
                self.roll_back(transaction).await;
                Ok(Write::Fenced)
            }
            Ok(Err(error)) if is_aborted_transaction(&error) => {
                tracing::debug!(key = %key, "the handler's transaction was aborted: its answer is recorded outside it");
                self.roll_back(transaction).await;
                self.complete(key, owner, record, ttl).await
            }
            Ok(Err(error)) => {
                self.roll_back(transaction).await;
                Err(self.failed(error))
            }
            Err(error) => {
                self.roll_back(transaction).await;
                Err(error)
            }
        }
    }

    /// Commits `transaction` within the call timeout.
    pub(crate) async fn commit(
        &self,
        transaction: sqlx::Transaction<'static, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        self.bounded(transaction.commit()).await
    }

    /// Rolls `transaction` back within the call timeout. A rollback that fails or times out is left to the
    /// database: the transaction ends with its connection at the latest.
    pub(crate) async fn roll_back(&self, transaction: sqlx::Transaction<'static, sqlx::Postgres>) {
        if let Err(error) = self.bounded(transaction.rollback()).await {
            tracing::warn!(%error, "rolling a handler's transaction back failed; it ends with its connection");
        }
    }
}

/// Whether `error` is PostgreSQL refusing a statement because the transaction was already aborted by an earlier
/// one (`25P02 in_failed_sql_transaction`).
fn is_aborted_transaction(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.code().as_deref() == Some("25P02"))
}
