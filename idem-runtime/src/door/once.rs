//! The plain async API: run a piece of work at most once per key, for callers that are not HTTP handlers (queue
//! and webhook consumers, jobs).

use crate::canonical_json::canonical;
use crate::engine::Idempotency;
use crate::fingerprint::Fingerprint;
use crate::policy::Policy;
use crate::protocol::begin::begin_observed;
use crate::protocol::claim::Claim;
use crate::protocol::decision::{Decision, Refusal, decide};
use crate::record::{Stored, StoredResponse};
use crate::store::contract::StoreKey;
use crate::store::error::StoreError;
#[cfg(feature = "postgres")]
use crate::store::postgres::PostgresStore;
use crate::store_key;
#[cfg(feature = "postgres")]
use crate::tx::transaction::{Tx, TxRejection, TxSlot};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use tracing::Instrument;
use tracing::field::Empty;

/// One piece of work to run at most once per `(scope, key)`; made by [`Idempotency::once`], run by
/// [`Once::run`].
///
/// The first call runs the work and stores its `Ok` result as JSON for the policy's `ttl`; later calls with the
/// same scope, key and input get the stored result back without running the work. It is the engine behind
/// `#[idempotent]`, with the same stores, the same waiting (a duplicate waits up to `wait_timeout` for an
/// in-flight original, woken by the store's notification) and the same lease (renewed while the work runs).
///
/// ```
/// # use idem_runtime as idem;
/// use idem::{Idempotency, Policy, once::OnceError};
/// use serde::{Deserialize, Serialize};
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
///
/// #[derive(Serialize)]
/// struct Refund<'a> { order: &'a str, cents: u64 }
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct Receipt { refund_id: u32 }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), OnceError<std::io::Error>> {
/// let idempotency = Idempotency::in_memory();
/// let refunds = AtomicU32::new(0);
/// let refund = Refund { order: "o-17", cents: 1250 };
/// for _delivery in 0..3 {
///     let receipt: Receipt = idempotency
///         .once("refunds", "evt_123")
///         .policy(Policy::new().ttl(Duration::from_secs(7 * 86_400)))
///         .run(&refund, || async {
///             let refund_id = refunds.fetch_add(1, Ordering::SeqCst) + 1;
///             Ok::<_, std::io::Error>(Receipt { refund_id })
///         })
///         .await?;
///     assert_eq!(receipt, Receipt { refund_id: 1 });
/// }
/// assert_eq!(refunds.load(Ordering::SeqCst), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a `Once` does nothing until `.run(..)` is awaited"]
pub struct Once<'a> {
    idempotency: &'a Idempotency,
    scope: &'a str,
    key: &'a str,
    policy: Policy,
}

impl<'a> Once<'a> {
    /// Made by [`Idempotency::once`].
    pub(crate) fn new(idempotency: &'a Idempotency, scope: &'a str, key: &'a str) -> Self {
        Once { idempotency, scope, key, policy: Policy::new() }
    }
}

impl Once<'_> {
    /// The settings: `ttl` (how long the result is kept), `wait_timeout` (how long a duplicate waits for an
    /// in-flight original before [`OnceError::InFlight`]), `lease` and `validate_signature` (whether a key reused
    /// with a different input is [`OnceError::Mismatch`]). `required` and `store_server_errors` do not apply:
    /// an `Err` from the work is never stored (see [`Once::run`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Runs `work` if this key has not run yet (or its earlier run failed), else returns the stored result.
    ///
    /// - `input` is what the work acts on; its JSON is the call's fingerprint, so the same key with another input
    ///   is refused with [`OnceError::Mismatch`] instead of answered with another input's result.
    /// - An `Ok` result is stored as JSON and returned to every later call. An `Err` is not stored: the key is
    ///   released and the next call runs the work again, like a 5xx behind `#[idempotent]`. To make a failure
    ///   final (a declined payment), return it inside `T`, e.g. `Ok(Err(Declined))`.
    /// - If the returned future is dropped before it finishes, the key is released in the background, so a retry
    ///   can run the work at once rather than after the lease.
    /// - A result whose JSON is larger than the engine's `max_record_bytes` (or that cannot be serialized) is
    ///   returned to this caller but kept as not replayable: later calls get [`OnceError::NotReplayable`], never a
    ///   second run.
    ///
    /// When the store fails, this answers [`OnceError::Store`] without running the work, unless the engine was
    /// built with [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen), in which case the work runs unprotected.
    ///
    /// The fingerprint is the input's JSON in a canonical form (object members sorted by name), so inputs that are
    /// equal but serialize their maps in another order (a `HashMap`) are the same input.
    pub async fn run<I, T, E, F, Fut>(self, input: &I, work: F) -> Result<T, OnceError<E>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_or_replay(input, work).await.map(Completed::into_value)
    }

    /// [`Once::run`], telling a fresh run of the work from a replay of its stored result.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, once::Completed};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let idempotency = Idempotency::in_memory();
    /// let first = idempotency.once("emails", "welcome-42").run_or_replay(&42, || async { Ok::<_, ()>(1) }).await;
    /// assert_eq!(first.unwrap(), Completed::Fresh(1));
    /// let again = idempotency.once("emails", "welcome-42").run_or_replay(&42, || async { Ok::<_, ()>(2) }).await;
    /// assert_eq!(again.unwrap(), Completed::Replayed(1));
    /// # }
    /// ```
    pub async fn run_or_replay<I, T, E, F, Fut>(self, input: &I, work: F) -> Result<Completed<T>, OnceError<E>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (store_key, fingerprint, span) = self.prepare(input)?;
        self.run_claimed(store_key, fingerprint, work).instrument(span).await
    }

    /// The call's store key, its fingerprint (the input's canonical JSON) and its span.
    fn prepare<I, E>(&self, input: &I) -> Result<(StoreKey, Fingerprint, tracing::Span), OnceError<E>>
    where
        I: Serialize + ?Sized,
    {
        let input = serde_json::to_value(input).map(|value| canonical(&value)).map_err(OnceError::Encode)?;
        let fingerprint = Fingerprint::builder().field(b"once").field(self.scope.as_bytes()).field(&input).finish();
        let store_key = store_key::once(self.scope, self.key);
        let span = tracing::info_span!(
            "idempotency",
            door = "once",
            scope = self.scope,
            key = store_key.as_str(),
            outcome = Empty,
            wait_ms = Empty,
        );
        Ok((store_key, fingerprint, span))
    }

    /// Claims the key, or answers without running anything (a replay, a conflict, a store failure), as the
    /// protocol's one decision says.
    async fn decide<T, E>(&self, store_key: StoreKey, fingerprint: Fingerprint) -> Step<T, E>
    where
        T: DeserializeOwned,
    {
        let engine = &*self.idempotency.engine;
        let metrics = engine.metrics_at("once", self.scope);
        let begun = begin_observed(&engine.background, &metrics, store_key, fingerprint, &self.policy).await;
        let answer = match decide(begun, engine.on_store_failure) {
            Decision::Execute(claim) => return Step::Run(claim),
            Decision::RunUnprotected => return Step::RunUnprotected,
            Decision::Replay(record) => match record.stored {
                Stored::Response(stored) => {
                    serde_json::from_slice(&stored.body).map(Completed::Replayed).map_err(OnceError::Decode)
                }
                Stored::NotReplayable { .. } => Err(OnceError::NotReplayable),
            },
            Decision::Refuse(Refusal::InFlight) => Err(OnceError::InFlight),
            Decision::Refuse(Refusal::Mismatch) => Err(OnceError::Mismatch),
            Decision::Refuse(Refusal::Corrupt(error) | Refusal::StoreUnavailable(error)) => {
                Err(OnceError::Store(error))
            }
        };
        Step::Answer(answer)
    }

    async fn run_claimed<T, E, F, Fut>(
        self,
        store_key: StoreKey,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Completed<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let claim = match self.decide(store_key, fingerprint).await {
            Step::Run(claim) => claim,
            Step::Answer(answer) => return answer,
            Step::RunUnprotected => return work().await.map(Completed::Fresh).map_err(OnceError::Work),
        };
        // The engine's lease keeper renews the lease (on a task of its own: work that blocks its thread keeps it)
        // until the claim is completed or released.
        claim.start_keeping();
        let ttl = self.policy.get_ttl();
        {
            let value = match work().await {
                Ok(value) => value,
                Err(error) => {
                    let _ = claim.release().await;
                    return Err(OnceError::Work(error));
                }
            };
            let _ = claim.complete(self.stored(&value), ttl).await;
            Ok(Completed::Fresh(value))
        }
    }

    /// The record of a result: its JSON, or not replayable when too large or not serializable.
    fn stored<T: Serialize>(&self, value: &T) -> Stored {
        match serde_json::to_vec(value) {
            Ok(body) if body.len() <= self.idempotency.engine.max_record_bytes => Stored::Response(StoredResponse {
                status: 200,
                headers: vec![("content-type".to_owned(), Bytes::from_static(b"application/json"))],
                body: body.into(),
            }),
            Ok(body) => {
                tracing::warn!(bytes = body.len(), "the result is over max_record_bytes: kept as not replayable");
                Stored::NotReplayable { status: 200 }
            }
            Err(error) => {
                tracing::error!(%error, "the result could not be serialized: kept as not replayable");
                Stored::NotReplayable { status: 200 }
            }
        }
    }
}

/// What [`Once::decide`] found, in `once`'s terms.
enum Step<T, E> {
    /// The key is this call's: run the work.
    Run(Claim),
    /// Answered without running the work.
    Answer(Result<Completed<T>, OnceError<E>>),
    /// The store failed under fail-open: run the work without a claim.
    RunUnprotected,
}

#[cfg(feature = "postgres")]
impl Once<'_> {
    /// [`Once::run_or_replay`] with the work inside a database transaction on the engine's
    /// [`PostgresStore`](crate::PostgresStore): `work` gets the open [`Tx`](crate::Tx), and its `Ok` result is
    /// recorded in that transaction, which then commits, so the work's writes and its record land together or not at
    /// all (see [`Tx`](crate::Tx)).
    ///
    /// An `Err` from the work rolls its transaction back and releases the key. If the claim was lost while the work
    /// ran (past its lease, a retry took the key over) or the commit failed, the writes are not kept and the call
    /// answers [`OnceError::NotCommitted`]. On another store this answers [`OnceError::Store`] without running the
    /// work.
    ///
    /// ```no_run
    /// # use idem_runtime as idem;
    /// # async fn run(idempotency: idem::Idempotency) -> Result<(), Box<dyn std::error::Error>> {
    /// let event_id = "evt_42";
    /// let credited = idempotency
    ///     .once("ledger", event_id)
    ///     .run_in_transaction(&event_id, |mut tx| async move {
    ///         sqlx::query("UPDATE accounts SET balance = balance + 100 WHERE id = 7").execute(&mut *tx).await?;
    ///         Ok::<_, sqlx::Error>(100)
    ///     })
    ///     .await?;
    /// assert_eq!(*credited.value(), 100);
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transaction<I, T, E, F, Fut>(self, input: &I, work: F) -> Result<Completed<T>, OnceError<E>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce(Tx) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(store) = self.idempotency.engine.transactions.clone() else {
            let why = "run_in_transaction needs an Idempotency built on a PostgresStore";
            return Err(OnceError::Store(StoreError::Unavailable(why.into())));
        };
        let (store_key, fingerprint, span) = self.prepare(input)?;
        self.run_transactional(store_key, fingerprint, store, work).instrument(span).await
    }

    async fn run_transactional<T, E, F, Fut>(
        self,
        store_key: StoreKey,
        fingerprint: Fingerprint,
        store: std::sync::Arc<PostgresStore>,
        work: F,
    ) -> Result<Completed<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Tx) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let claim = match self.decide(store_key, fingerprint).await {
            Step::Run(claim) => Some(claim),
            Step::Answer(answer) => return answer,
            Step::RunUnprotected => None,
        };
        let slot = TxSlot::new(store);
        let tx = match slot.clone().lend().await {
            Ok(tx) => tx,
            Err(rejection) => {
                if let Some(claim) = claim {
                    let _ = claim.release().await;
                }
                let error = match rejection {
                    TxRejection::Unavailable(error) => error,
                    other => StoreError::Unavailable(format!("{other:?}").into()),
                };
                return Err(OnceError::Store(error));
            }
        };
        let Some(claim) = claim else {
            let result = work(tx).await;
            let committed = slot.finish_unclaimed(result.is_ok()).await;
            return match (result, committed) {
                (Ok(value), Ok(())) => Ok(Completed::Fresh(value)),
                (Ok(_), Err(_)) => Err(OnceError::NotCommitted),
                (Err(error), _) => Err(OnceError::Work(error)),
            };
        };
        claim.start_keeping();
        let ttl = self.policy.get_ttl();
        {
            let value = match work(tx).await {
                Ok(value) => value,
                Err(error) => {
                    slot.roll_back().await;
                    let _ = claim.release().await;
                    return Err(OnceError::Work(error));
                }
            };
            match slot.complete(claim, self.stored(&value), ttl).await {
                Ok(Ok(())) => Ok(Completed::Fresh(value)),
                Ok(Err(_)) => Err(OnceError::NotCommitted),
                // The work dropped its transaction unopened: impossible once lent, but the store completes it anyway.
                Err((claim, stored)) => {
                    let _ = claim.complete(stored, ttl).await;
                    Ok(Completed::Fresh(value))
                }
            }
        }
    }
}

/// What [`Once::run_or_replay`] returned: the work's result from this call, or the stored result of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Completed<T> {
    /// The work ran in this call (its result is now stored).
    Fresh(T),
    /// The work ran before; this is its stored result, and nothing ran now.
    Replayed(T),
}

impl<T> Completed<T> {
    /// The result, however it was obtained.
    pub fn into_value(self) -> T {
        match self {
            Completed::Fresh(value) | Completed::Replayed(value) => value,
        }
    }

    /// The result, however it was obtained.
    pub fn value(&self) -> &T {
        match self {
            Completed::Fresh(value) | Completed::Replayed(value) => value,
        }
    }

    /// Whether the result is a stored one (the work did not run in this call).
    pub fn is_replay(&self) -> bool {
        matches!(self, Completed::Replayed(_))
    }
}

/// Why [`Once::run`] did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum OnceError<E> {
    /// Another caller is running the work for this key and did not finish within `wait_timeout`.
    #[error(
        "the work for this idempotency key is already running elsewhere; retry later, or raise the policy's \
         `wait_timeout` to wait for it"
    )]
    InFlight,
    /// The key was used before with a different input.
    #[error("this idempotency key was already used with a different input; use a new key for new work")]
    Mismatch,
    /// The work ran before but its result was too large or not serializable, so it was not kept.
    #[error(
        "the work for this idempotency key already ran but its result was not kept (too large for \
         `max_record_bytes`, or not serializable); it will not run again"
    )]
    NotReplayable,
    /// The store failed; the work did not run.
    #[error("the idempotency store failed and the work did not run; retry later: {0}")]
    Store(#[source] StoreError),
    /// The input could not be serialized to JSON.
    #[error("the input could not be serialized to JSON to fingerprint it: {0}")]
    Encode(#[source] serde_json::Error),
    /// The stored result could not be read back as the type asked for (did the result type change?).
    #[error("the stored result does not decode as the requested type (did it change since it was stored?): {0}")]
    Decode(#[source] serde_json::Error),
    /// The work ran in a transaction (`Once::run_in_transaction`, feature `postgres`) that was not committed: its claim was lost while
    /// it ran (past its lease, another caller took the key over) or the commit failed. None of its writes were kept
    /// (unless only the commit's reply was lost: then they were, with the record, and a retry returns it).
    #[error(
        "the work's transaction was not committed (its claim was lost, or the commit failed); retry with the same key"
    )]
    NotCommitted,
    /// The work itself failed. Nothing was stored: the next call runs it again.
    #[error("the work failed and nothing was stored; a retry runs it again")]
    Work(#[source] E),
}
