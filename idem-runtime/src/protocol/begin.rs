//! Claim or wait: what a request finds when it presents its key, the one entry of the protocol.

use crate::fingerprint::Fingerprint;
use crate::metrics::{Event, Metrics, NoMetrics};
use crate::policy::Policy;
use crate::protocol::background::Background;
use crate::protocol::claim::Claim;
use crate::protocol::write::{ClaimCall, Owned};
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Store, StoreKey};
use crate::store::error::StoreError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// What to do with a request, decided by [`begin`].
#[derive(Debug)]
pub enum Outcome {
    /// The caller owns the key: run the work, then [`Claim::complete`] or [`Claim::release`].
    Execute(Claim),
    /// The work already completed: answer with this record.
    Replay(Record),
    /// The original is still running and did not finish within `wait_timeout`.
    InFlight,
    /// The key was used for a different request (only when the policy validates signatures).
    Mismatch,
}

/// Claims `key` for a request with `fingerprint`, waiting up to the policy's `wait_timeout` for an in-flight
/// original. Waiting is woken by the store's notification; after each wake-up the key is claimed again, so a
/// released claim (the original failed) is taken over rather than waited on forever.
///
/// This is the bare protocol, for building another front door; it reports to no [`Metrics`], and each call keeps
/// its claim's lease on a task of its own. The doors built in
/// ([`Idempotency::handle`](crate::Idempotency::handle), the [`IdempotencyLayer`](crate::layer::IdempotencyLayer) and
/// [`Idempotency::once`](crate::Idempotency::once)) run the same protocol, report to the engine's metrics and
/// share one lease keeper.
pub async fn begin(
    store: &Arc<dyn Store>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Result<Outcome, StoreError> {
    static NO_METRICS: std::sync::LazyLock<Arc<dyn Metrics>> = std::sync::LazyLock::new(|| Arc::new(NoMetrics));
    let background = Background::new(store.clone(), Arc::default());
    begin_observed(&background, &NO_METRICS, key, fingerprint, policy).await.result
}

/// What [`begin_observed`] decided, and how long it waited for an in-flight original (`None`: it did not wait).
pub(crate) struct Begun {
    pub(crate) result: Result<Outcome, StoreError>,
    pub(crate) waited: Option<Duration>,
}

/// [`begin`], counting its decision (and the wait) in `metrics` and logging conflicts and mismatches.
pub(crate) async fn begin_observed(
    background: &Arc<Background>,
    metrics: &Arc<dyn Metrics>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Begun {
    let started = Instant::now();
    let mut waited = false;
    let result = claim_or_wait(background, metrics, key, fingerprint, policy, &mut waited).await;
    let waited = waited.then(|| started.elapsed());
    if let Some(waited) = waited {
        metrics.observe_wait(waited);
    }
    match &result {
        Ok(Outcome::Execute(_)) => metrics.record(Event::New),
        Ok(Outcome::Replay(_)) => metrics.record(Event::Hit),
        Ok(Outcome::InFlight) => {
            metrics.record(Event::Conflict);
            tracing::info!(
                wait_timeout = ?policy.get_wait_timeout(),
                "idempotency conflict: the original is still in flight"
            );
        }
        Ok(Outcome::Mismatch) => {
            metrics.record(Event::Mismatch);
            tracing::warn!("idempotency key reused for a different request");
        }
        // The front door logs it, with what it did about it (fail closed or open).
        Err(_) => metrics.record(Event::StoreError),
    }
    Begun { result, waited }
}

async fn claim_or_wait(
    background: &Arc<Background>,
    metrics: &Arc<dyn Metrics>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
    waited: &mut bool,
) -> Result<Outcome, StoreError> {
    let store = &background.store;
    let lease = policy.get_lease();
    let deadline = Instant::now() + policy.get_wait_timeout();
    // One token for every attempt: a claim resent after a lost reply is recognised as this caller's own.
    let owner = OwnerToken::generate();
    loop {
        let call = ClaimInFlight {
            call: Some(claim_call(store, &key, fingerprint, &owner, lease)),
            background,
            metrics,
            key: &key,
            owner: &owner,
            lease,
        };
        let sent_at = Instant::now();
        let claimed = match call.await {
            Ok(claimed) if matches!(claimed, Claimed::Owned) && sent_at.elapsed() >= lease => {
                // The store took a whole lease to answer: the claim may have lapsed before its answer came, and
                // the key been claimed by another since. Running now could run the work beside that owner.
                let error = StoreError::Unavailable("the claim's answer came after its lease had run out".into());
                let owned = Owned { store: store.clone(), metrics: metrics.clone(), key, owner };
                background.writes.release_failed_claim(owned, &error, lease);
                return Err(error);
            }
            Ok(claimed) => claimed,
            Err(error) => {
                // The claim may have taken effect with only its reply lost: give it up rather than leave the key
                // in flight, answering 409, for a whole lease with nobody running the request.
                let owned = Owned { store: store.clone(), metrics: metrics.clone(), key, owner };
                background.writes.release_failed_claim(owned, &error, lease);
                return Err(error);
            }
        };
        let entry = match claimed {
            Claimed::Owned => {
                let claim = Claim::new(background, metrics, key, owner, fingerprint, lease);
                return Ok(Outcome::Execute(claim));
            }
            Claimed::Existing(entry) => entry,
        };
        let found = match &entry {
            Entry::InFlight { fingerprint } => fingerprint,
            Entry::Completed(record) => &record.fingerprint,
        };
        if policy.get_validate_signature() && *found != fingerprint {
            return Ok(Outcome::Mismatch);
        }
        if let Entry::Completed(record) = entry {
            return Ok(Outcome::Replay(record));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Outcome::InFlight);
        }
        *waited = true;
        store.wait(&key, deadline - now).await?;
    }
}

/// The store's claim of `key`, as a future owning what it needs, so that it can be finished in the background.
fn claim_call(
    store: &Arc<dyn Store>,
    key: &StoreKey,
    fingerprint: Fingerprint,
    owner: &OwnerToken,
    lease: Duration,
) -> ClaimCall {
    let (store, key, owner) = (store.clone(), key.clone(), owner.clone());
    Box::pin(async move { store.claim(&key, &fingerprint, &owner, lease).await })
}

/// A claim call awaited by its caller. Dropped before it answered (the client went away, a `tower` timeout, a
/// `select!`), the call is finished in the background and the key released if it took it: a claim sent to a slow
/// or frozen store lands after its caller is gone, and would hold the key for a whole lease with nobody running the
/// request.
struct ClaimInFlight<'a> {
    call: Option<ClaimCall>,
    background: &'a Background,
    metrics: &'a Arc<dyn Metrics>,
    key: &'a StoreKey,
    owner: &'a OwnerToken,
    lease: Duration,
}

impl Future for ClaimInFlight<'_> {
    type Output = Result<Claimed, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let call = self.call.as_mut().expect("polled after it answered");
        let answer = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(answer)
    }
}

impl Drop for ClaimInFlight<'_> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            let owned = Owned {
                store: self.background.store.clone(),
                metrics: self.metrics.clone(),
                key: self.key.clone(),
                owner: self.owner.clone(),
            };
            self.background.writes.finish_claim(owned, call, self.lease);
        }
    }
}
