//! The database transaction lent to a handler ([`Tx`]) and the slot it lives in between the door and the handler.
//! Doors finish it through [`hook`](crate::tx::hook); PostgreSQL's own steps (begin, complete inside, commit, roll
//! back) are the store's, in `store/postgres/tx.rs`.

use crate::protocol::claim::Claim;
use crate::record::Stored;
use crate::store::contract::Write;
use crate::store::error::StoreError;
use crate::store::postgres::PostgresStore;
use crate::tx::unkept::Unkept;
use sqlx::{PgConnection, Postgres, Transaction};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The database transaction a protected handler runs in, on a [`PostgresStore`]: its writes commit together with
/// the idempotency record of its answer, or not at all.
///
/// A handler becomes transactional by taking `Tx` (under `#[idempotent]` or the
/// [`IdempotencyLayer`](crate::layer::IdempotencyLayer), with an [`Idempotency`](crate::Idempotency) built on a
/// [`PostgresStore`]); there is no other switch, so a route cannot be half transactional. Write through it with
/// `&mut *tx` (it dereferences to the transaction's [`PgConnection`]):
///
/// ```no_run
/// # use idem_runtime as idem;
/// use axum::{Json, http::StatusCode};
/// use idem::Tx;
///
/// // #[idempotent(ttl = 86_400)]
/// async fn create_order(mut tx: Tx, Json(item): Json<String>) -> (StatusCode, String) {
///     let id: i64 = sqlx::query_scalar("INSERT INTO orders (item) VALUES ($1) RETURNING id")
///         .bind(&item)
///         .fetch_one(&mut *tx)
///         .await
///         .expect("insert");
///     (StatusCode::CREATED, format!("order {id}"))
/// }
/// # let _ = axum::routing::post::<_, _, ()>(create_order);
/// ```
///
/// What happens around it:
/// - the key is claimed first, in a statement of its own that commits at once, so duplicates see the claim and
///   wait (or are refused `409 in-progress`) as on any store;
/// - the transaction is opened when the handler takes `Tx` (its extraction fails with `503 store-unavailable` when
///   the database cannot be reached; nothing ran);
/// - when the answer is to be stored (not a 5xx unless the policy stores them), the record is completed **inside
///   this transaction** with an owner-checked write, then the transaction commits: the handler's rows and the record
///   become visible together;
/// - renewals of the lease (the keeper's, and [`Fence::is_held`](crate::protocol::Fence::is_held)) never write what this
///   completion reads or writes, so it commits at any isolation level, however many renewals came after the
///   transaction's snapshot (a handler may start with `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`);
/// - if the claim was lost meanwhile (the handler ran past its lease, for instance frozen, and a retry took the key
///   over), the owner check fails and the transaction is **rolled back**: the stale handler's writes never land, and
///   its client gets `409 in-progress` (a retry gets the answer of the execution that took over; at
///   `REPEATABLE READ` or `SERIALIZABLE` a takeover after the snapshot fails the transaction instead:
///   `503 transaction-failed`, nothing kept);
/// - if one of the handler's statements failed (a unique violation, say), PostgreSQL aborted the transaction and
///   nothing the handler wrote can commit; an answer the handler gave anyway (`409 e-mail taken`) is final, so the
///   transaction is rolled back and that answer recorded outside it, and retries replay it. A handler that wants to
///   go on writing after a failed statement runs that statement under a savepoint (`(&mut *tx).begin()`, with
///   [`sqlx::Acquire`], opens one): rolling the savepoint back keeps the transaction alive;
/// - on a 5xx, a panic or an extractor rejection the transaction is rolled back first, then the key released, so a
///   retry runs on a clean database;
/// - a process killed mid-handler leaves an uncommitted transaction that PostgreSQL discards, and an in-flight claim
///   that expires after its lease: the retry runs on a clean database. This is the window no store outside the
///   handler's database can close: on Redis, effects committed before a crash are not undone;
/// - if the commit itself fails (the connection broke), the client gets `503 transaction-failed` and the key is
///   released: whether the database committed or not, a retry with the same key is right (it replays the answer
///   that committed, or runs on a clean database).
///
/// A request without a key on a route where keys are optional (or run unprotected under
/// [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen)) still gets its `Tx`: it commits on any answer but a
/// 5xx, and rolls back otherwise.
///
/// The transaction holds a pool connection while the handler runs: size the pool above the number of transactional
/// handlers that run at once, leaving room for claims, renewals and replays. With [`PostgresStore::connect`], the
/// store's `statement_timeout` also bounds the handler's own statements; with [`PostgresStore::from_pool`] the
/// application's pool settings apply.
///
/// `Tx` must not outlive the handler (it is not `Clone`; moving it into a spawned task is a bug): a transaction
/// that is not back when the handler answers is rolled back, the key released, and the answer is
/// `503 transaction-failed`.
pub struct Tx {
    transaction: Option<Transaction<'static, Postgres>>,
    slot: Arc<TxSlot>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Tx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.transaction.as_ref().expect("a lent transaction is present until dropped")
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.transaction.as_mut().expect("a lent transaction is present until dropped")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(transaction) = self.transaction.take() {
            self.slot.give_back(transaction);
        }
    }
}

/// Why [`Tx`] could not be extracted.
#[derive(Debug)]
pub enum TxRejection {
    /// The handler is not served by idem, or the engine's store is not a [`PostgresStore`]: `500 not-configured`.
    NotTransactional,
    /// `Tx` was taken twice in one request: `500 not-configured`.
    AlreadyTaken,
    /// The transaction could not be opened: `503 store-unavailable` (nothing ran; the key is released).
    Unavailable(StoreError),
}

/// Where one request's transaction lives between the door that finishes it and the handler that borrows it.
pub(crate) struct TxSlot {
    store: Arc<PostgresStore>,
    state: Mutex<SlotState>,
}

enum SlotState {
    /// Nobody asked for a transaction yet.
    Unopened,
    /// Open, not lent (the handler dropped its `Tx`).
    Open(Transaction<'static, Postgres>),
    /// In the handler's `Tx`.
    Lent,
}

/// What a door finds in the slot once the handler answered.
pub(crate) enum Taken {
    /// The handler never took `Tx`: there is nothing to commit.
    Unopened,
    /// The handler's transaction, to complete and commit or to roll back.
    Open(Transaction<'static, Postgres>),
    /// The handler's `Tx` outlived it (moved into a task): it cannot be committed.
    Escaped,
}

impl TxSlot {
    pub(crate) fn new(store: Arc<PostgresStore>) -> Arc<Self> {
        Arc::new(Self { store, state: Mutex::new(SlotState::Unopened) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn lend(self: Arc<Self>) -> Result<Tx, TxRejection> {
        let previous = std::mem::replace(&mut *self.state(), SlotState::Lent);
        let transaction = match previous {
            SlotState::Open(transaction) => transaction,
            SlotState::Lent => return Err(TxRejection::AlreadyTaken),
            // Boxed: sqlx's `begin` future is tens of KiB, and it would sit in every handler future that takes `Tx`.
            SlotState::Unopened => match Box::pin(self.store.begin_transaction()).await {
                Ok(transaction) => transaction,
                Err(error) => {
                    *self.state() = SlotState::Unopened;
                    return Err(TxRejection::Unavailable(error));
                }
            },
        };
        Ok(Tx { transaction: Some(transaction), slot: self })
    }

    fn give_back(&self, transaction: Transaction<'static, Postgres>) {
        *self.state() = SlotState::Open(transaction);
    }

    /// Takes what the handler left, closing the slot: a `Tx` dropped later only rolls its transaction back.
    pub(crate) fn take(&self) -> Taken {
        match std::mem::replace(&mut *self.state(), SlotState::Unopened) {
            SlotState::Unopened => Taken::Unopened,
            SlotState::Open(transaction) => Taken::Open(transaction),
            SlotState::Lent => {
                tracing::error!("the handler's Tx outlived it (moved into a task?): its transaction is rolled back");
                Taken::Escaped
            }
        }
    }

    /// Rolls back whatever the handler wrote: before its key is released, so a retry never runs beside it.
    pub(crate) async fn roll_back(&self) {
        if let Taken::Open(transaction) = self.take() {
            self.store.roll_back(transaction).await;
        }
    }

    /// Finishes a request that ran without a claim: commits on `keep`, rolls back otherwise. `Err` when a commit
    /// failed (the answer must not claim success).
    pub(crate) async fn finish_unclaimed(&self, keep: bool) -> Result<(), Unkept> {
        match self.take() {
            Taken::Unopened => Ok(()),
            Taken::Escaped => Err(Unkept::Failed),
            Taken::Open(transaction) if keep => self.store.commit(transaction).await.map_err(|error| {
                tracing::error!(%error, "committing the handler's transaction failed");
                Unkept::Failed
            }),
            Taken::Open(transaction) => {
                self.store.roll_back(transaction).await;
                Ok(())
            }
        }
    }

    /// Completes `claim` with `stored` inside the handler's transaction and commits, when the handler opened one;
    /// `Err(claim, stored)` back when it did not (the door completes as on any store). An answer given over an
    /// aborted transaction is recorded outside it (see [`PostgresStore::complete_transaction`]). `Ok(Err(unkept))`
    /// when the answer cannot stand: the claim was lost (the writes were rolled back) or the commit failed.
    pub(crate) async fn complete(
        &self,
        claim: Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Result<(), Unkept>, (Claim, Stored)> {
        let transaction = match self.take() {
            Taken::Unopened => return Err((claim, stored)),
            Taken::Open(transaction) => transaction,
            Taken::Escaped => {
                let _ = claim.release().await;
                return Ok(Err(Unkept::Failed));
            }
        };
        let store = self.store.clone();
        let write = claim
            .complete_with(stored, move |key, owner, record| async move {
                store.complete_transaction(transaction, &key, &owner, &record, ttl).await
            })
            .await;
        Ok(match write {
            Ok(Write::Applied) => Ok(()),
            Ok(Write::Fenced) => Err(Unkept::ClaimLost),
            Err(_) => Err(Unkept::Failed),
        })
    }
}
