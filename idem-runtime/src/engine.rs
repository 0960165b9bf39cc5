//! Claim, wait, replay: the protocol every front door runs, free of HTTP.

mod keeper;
mod write;

use crate::drain::Running;
use crate::metrics::{Event, Metrics, NoMetrics};
use crate::store::{Claimed, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Policy, Record, Stored};
use keeper::{Lease, Renewals, Target};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use write::{ClaimCall, Owned, Pending, Writes};

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

/// What the protocol runs beside the requests of one engine: its store, the lease keeper of its claims and the
/// writes it finishes in the background. One per [`Idempotency`](crate::Idempotency), shared by its doors.
pub(crate) struct Background {
    pub(crate) store: Arc<dyn Store>,
    renewals: Arc<Renewals>,
    writes: Arc<Writes>,
}

impl Background {
    /// The background of an engine over `store`, whose background writes are counted in `running`.
    pub(crate) fn new(store: Arc<dyn Store>, running: Arc<Running>) -> Arc<Self> {
        Arc::new(Self { store, renewals: Arc::default(), writes: Arc::new(Writes::new(running)) })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.renewals.wake();
    }
}

/// Claims `key` for a request with `fingerprint`, waiting up to the policy's `wait_timeout` for an in-flight
/// original. Waiting is woken by the store's notification; after each wake-up the key is claimed again, so a
/// released claim (the original failed) is taken over rather than waited on forever.
///
/// This is the bare protocol, for building another front door; it reports to no [`Metrics`], and each call keeps
/// its claim's lease on a task of its own. The doors built in
/// ([`Idempotency::serve`](crate::Idempotency::serve), the [`IdempotencyLayer`](crate::IdempotencyLayer) and
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
                wait_timeout = ?policy.wait_timeout_duration(),
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
    let lease = policy.lease_duration();
    let deadline = Instant::now() + policy.wait_timeout_duration();
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
        if policy.validates_signature() && *found != fingerprint {
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

/// Ownership of an in-flight key: the right to run the work once and record its result.
///
/// Consumed by [`Claim::complete`] or [`Claim::release`]. A claim dropped without either (its future was
/// cancelled) releases itself in the background, so the key is free for a retry at once rather than after the lease.
pub struct Claim {
    background: Arc<Background>,
    metrics: Arc<dyn Metrics>,
    key: StoreKey,
    owner: Option<OwnerToken>,
    fingerprint: Fingerprint,
    lease: Duration,
    /// The lease as the engine's keeper keeps it, once something asked for it to be kept.
    kept: OnceLock<Arc<Lease>>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("key", &self.key).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Claim {
    fn new(
        background: &Arc<Background>,
        metrics: &Arc<dyn Metrics>,
        key: StoreKey,
        owner: OwnerToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Self {
        Self {
            background: background.clone(),
            metrics: metrics.clone(),
            key,
            owner: Some(owner),
            fingerprint,
            lease,
            kept: OnceLock::new(),
        }
    }

    /// The key this claim owns.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The fingerprint of the request that made the claim.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Runs `work` while the lease is renewed every third of its length (a renewal that fails is retried every
    /// twentieth of the lease until one lands), so work that outlives its lease is never run a second time by a
    /// duplicate. Renewing goes on until the claim is completed, released or dropped, on the engine's lease keeper:
    /// a task apart from `work`'s, so work that blocks its thread keeps its lease too.
    ///
    /// Only a store out of reach for the rest of a lease can cost the claim: a duplicate that claims the key once
    /// the lease has run out (and before a renewal re-claims it) runs the work again. The work here still runs to
    /// its end; its completion is then fenced, so the duplicate's record stands.
    pub async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        self.start_keeping();
        work.await
    }

    /// Hands the lease to the engine's keeper, unless it keeps it already.
    pub(crate) fn start_keeping(&self) -> &Arc<Lease> {
        self.kept.get_or_init(|| {
            let owner = self.owner.clone().expect("a live claim has an owner");
            let target = Target {
                store: self.background.store.clone(),
                metrics: self.metrics.clone(),
                key: self.key.clone(),
                owner,
                fingerprint: self.fingerprint,
            };
            self.background.renewals.keep(target, self.lease)
        })
    }

    /// Renews the lease for `lease` from now on, at once: an adopting front door brings its own lease. With the
    /// keeper keeping it, the renewal is made after any renewal in flight, so an older renewal can never land after
    /// it and shorten the new lease; from then on it renews every third of `lease`.
    pub(crate) async fn renew_for(&mut self, lease: Duration) -> Result<Write, StoreError> {
        self.lease = lease;
        match (self.kept.get(), &self.owner) {
            (Some(kept), _) => kept.renew(Some(lease)).await,
            (None, Some(owner)) => {
                let write = self.background.store.renew(&self.key, owner, &self.fingerprint, lease).await;
                report_write(&*self.metrics, &self.key, "renew", &write);
                write
            }
            (None, None) => Ok(Write::Fenced),
        }
    }

    /// The claim's fence: its owner token, and a way to check (renewing at once) that the claim is still held.
    /// Starts keeping the lease if nothing keeps it yet.
    pub fn fence(&self) -> Fence {
        let kept = self.start_keeping().clone();
        let owner = self.owner.clone().expect("a live claim has an owner");
        Fence { owner, kept }
    }

    /// Stops renewing, once any renewal in flight has landed: a renewal arriving after the release could otherwise
    /// claim the freed key again.
    async fn stop_keeping(&self) {
        if let Some(kept) = self.kept.get() {
            kept.stop().await;
        }
    }

    /// Who this claim's background writes are for.
    fn owned(&self, owner: OwnerToken) -> Owned {
        Owned { store: self.background.store.clone(), metrics: self.metrics.clone(), key: self.key.clone(), owner }
    }

    /// Records the result for `ttl` and wakes waiting duplicates.
    ///
    /// When the store cannot be reached ([`StoreError::Unavailable`]), the error is returned and the completion is
    /// also retried in the background until it lands or `ttl` has passed: the work has run, and a claim left in
    /// flight would lapse after its lease and let a retry run the work a second time. The store accepts a
    /// completion as long as nobody claimed the key since, even after the lease ran out, so an outage shorter than
    /// the rest of the lease costs nothing; a longer one leaves a window in which a retry that claims first runs
    /// again.
    pub async fn complete(mut self, stored: Stored, ttl: Duration) -> Result<Write, StoreError> {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let record = Record { fingerprint: self.fingerprint, stored };
        let write = self.background.store.complete(&self.key, &owner, &record, ttl).await;
        report_write(&*self.metrics, &self.key, "complete", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            self.background.writes.retry(self.owned(owner), Pending::Complete { record, ttl }, ttl);
        }
        write
    }

    /// Records the result through `write` instead of the store's own completion: a completion inside the work's own
    /// database transaction, committed with the work's writes. `write` gets the key, the owner token and the
    /// record, and answers as [`Store::complete`] does.
    ///
    /// Unlike [`Claim::complete`], a failed write is not retried: the work's effects went with the transaction that
    /// failed (or, if only the commit's reply was lost, committed with the record). Either way the claim is
    /// released (retried in the background while the store is out of reach; a release never touches a completed
    /// record), so a retry replays what committed or runs the work again on a clean database.
    #[cfg(feature = "postgres")]
    pub(crate) async fn complete_with<F, Fut>(mut self, stored: Stored, write: F) -> Result<Write, StoreError>
    where
        F: FnOnce(StoreKey, OwnerToken, Record) -> Fut,
        Fut: Future<Output = Result<Write, StoreError>>,
    {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let record = Record { fingerprint: self.fingerprint, stored };
        let result = write(self.key.clone(), owner.clone(), record).await;
        report_write(&*self.metrics, &self.key, "complete", &result);
        if result.is_err() {
            self.owner = Some(owner);
            let _ = self.release().await;
        }
        result
    }

    /// Gives the key up so a retry runs the work again, and wakes waiting duplicates.
    ///
    /// When the store cannot be reached, the release is also retried in the background until it lands or the lease
    /// has run out (when the key frees itself): otherwise duplicates would be refused `409 in-progress` for the rest
    /// of the lease with nobody running the work.
    pub async fn release(mut self) -> Result<Write, StoreError> {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let write = self.background.store.release(&self.key, &owner).await;
        report_write(&*self.metrics, &self.key, "release", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            self.background.writes.retry(self.owned(owner), Pending::Release, self.lease);
        }
        write
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else { return };
        let owned = self.owned(owner);
        self.background.writes.release_dropped(owned, self.kept.take(), self.lease);
    }
}

/// What a running handler knows of its claim: the owner token that every write to its key presents, and a check
/// that the claim is still held. The extractor behind `#[idempotent]` handlers and the layer
/// (see [`Fence`'s `FromRequestParts`](#impl-FromRequestParts%3CS%3E-for-Fence)).
///
/// idem fences its own writes: a handler whose lease lapsed (it was frozen, or the store was out of reach for a whole
/// lease) and whose key was claimed by a retry can no longer store or delete anything under the key. The handler's
/// *own* writes are its business; the fence gives it two tools for them:
/// - [`Fence::is_held`] just before an irreversible step (charging a card): it renews the lease at once and says
///   whether the claim is still this handler's;
/// - [`Fence::token`], to store beside the handler's own rows (e.g. `UPDATE … WHERE claimed_by = $token`), so a
///   second writer for the same key can tell the two apart.
#[derive(Clone)]
pub struct Fence {
    owner: OwnerToken,
    kept: Arc<Lease>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Fence {
    /// The claim's owner token: random, unique to this execution of the handler.
    pub fn token(&self) -> &OwnerToken {
        &self.owner
    }

    /// Renews the lease now and answers whether the claim is still held: `Ok(false)` once the lease lapsed and the
    /// key was claimed by someone else (or the claim already completed), `Err` when the store could not be reached
    /// (whether the claim is held is then unknown; treat it as not held before an irreversible step).
    pub async fn is_held(&self) -> Result<bool, StoreError> {
        self.kept.renew(None).await.map(|write| write == Write::Applied)
    }
}

/// Counts and logs a failed or fenced owner-checked write: the one place such writes are reported.
fn report_write(metrics: &dyn Metrics, key: &StoreKey, operation: &str, write: &Result<Write, StoreError>) {
    match write {
        Ok(Write::Applied) => {}
        Ok(Write::Fenced) => {
            metrics.record(Event::Fenced);
            tracing::warn!(key = %key, operation, "stale owner fenced: its claim had expired, nothing was written");
        }
        Err(error) => {
            metrics.record(Event::StoreError);
            tracing::error!(key = %key, operation, %error, "idempotency store write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A [`MemoryStore`] whose renewals fail while `unreachable` is set, and whose completions fail while
    /// `completions_unreachable` is, as a remote store's do while it cannot be reached; it notes when each renewal
    /// landed, and makes each renewal take `renewal_takes` (its effect lands then even if the caller stopped
    /// waiting, as a command already sent to a remote store does).
    #[derive(Default)]
    struct Unreachable {
        store: Arc<MemoryStore>,
        unreachable: AtomicBool,
        completions_unreachable: AtomicBool,
        renewal_takes: Mutex<Duration>,
        renewed: Arc<Mutex<Vec<Instant>>>,
        /// Each completion and release, when it landed.
        written: Mutex<Vec<(&'static str, Instant)>>,
    }

    #[async_trait::async_trait]
    impl Store for Unreachable {
        async fn claim(
            &self,
            key: &StoreKey,
            fingerprint: &Fingerprint,
            owner: &OwnerToken,
            lease: Duration,
        ) -> Result<Claimed, StoreError> {
            self.store.claim(key, fingerprint, owner, lease).await
        }
        async fn complete(
            &self,
            key: &StoreKey,
            owner: &OwnerToken,
            record: &Record,
            ttl: Duration,
        ) -> Result<Write, StoreError> {
            if self.completions_unreachable.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("unreachable (a test double)".into()));
            }
            self.written.lock().unwrap().push(("complete", Instant::now()));
            self.store.complete(key, owner, record, ttl).await
        }
        async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
            self.written.lock().unwrap().push(("release", Instant::now()));
            self.store.release(key, owner).await
        }
        async fn renew(
            &self,
            key: &StoreKey,
            owner: &OwnerToken,
            fingerprint: &Fingerprint,
            lease: Duration,
        ) -> Result<Write, StoreError> {
            if self.unreachable.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("unreachable (a test double)".into()));
            }
            let takes = *self.renewal_takes.lock().unwrap();
            let (store, renewed) = (self.store.clone(), self.renewed.clone());
            let (key, owner, fingerprint) = (key.clone(), owner.clone(), *fingerprint);
            let sent = tokio::spawn(async move {
                tokio::time::sleep(takes).await;
                let write = store.renew(&key, &owner, &fingerprint, lease).await;
                if matches!(write, Ok(Write::Applied)) {
                    renewed.lock().unwrap().push(Instant::now());
                }
                write
            });
            sent.await.unwrap()
        }
        async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
            self.store.wait(key, timeout).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_until_it_lands_long_before_the_lease_runs_out() {
        let store = Arc::new(Unreachable::default());
        let shared: Arc<dyn Store> = store.clone();
        // Renewed every second; the lease granted by the renewal at 1 s runs out at 4 s.
        let lease = Duration::from_secs(3);
        let policy = Policy::new().lease(lease).wait_timeout(Duration::ZERO);
        let key = StoreKey::derive(&[b"renewal-retry"]);
        let fingerprint = Fingerprint::builder().field(b"request").finish();
        let counters = Arc::new(crate::Counters::new());
        let metrics: Arc<dyn Metrics> = counters.clone();
        let started = Instant::now();
        let background = Background::new(shared.clone(), Arc::default());
        let begun = begin_observed(&background, &metrics, key.clone(), fingerprint, &policy).await;
        let Ok(Outcome::Execute(claim)) = begun.result else {
            panic!("a fresh key is claimed");
        };
        claim.start_keeping();

        // Out of reach from 1.5 s to 3.2 s: the renewals due at 2 s and 3 s fail. Before retries, the next attempt
        // came at 4 s, the very moment the lease ran out.
        tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
        store.unreachable.store(true, Ordering::SeqCst);
        tokio::time::sleep_until(started + Duration::from_millis(3200)).await;
        store.unreachable.store(false, Ordering::SeqCst);
        tokio::time::sleep_until(started + Duration::from_millis(3900)).await;

        let renewed: Vec<Duration> = store.renewed.lock().unwrap().iter().map(|at| *at - started).collect();
        let back = Duration::from_millis(3200);
        assert!(
            renewed.iter().any(|at| *at >= back && *at <= back + keeper::renewal_retry_period(lease)),
            "renewed within a retry period of the store answering again: {renewed:?}"
        );
        // Many attempts failed while the store was out of reach; one store error is counted for them.
        assert_eq!(counters.snapshot().store_errors, 1);
        // So the key is still held when the lease of the renewal at 1 s would have run out.
        tokio::time::sleep_until(started + Duration::from_millis(4001)).await;
        let duplicate = Fingerprint::builder().field(b"duplicate").finish();
        let claimed = shared.claim(&key, &duplicate, &OwnerToken::generate(), lease).await.unwrap();
        assert_eq!(claimed, Claimed::Existing(Entry::InFlight { fingerprint }));
        claim.release().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_a_completion_retried_in_the_background() {
        let store = Arc::new(Unreachable::default());
        let idempotency = crate::Idempotency::new(store.clone());
        store.completions_unreachable.store(true, Ordering::SeqCst);
        let ran = idempotency.once("drain", "k").run(&1, || async { Ok::<_, ()>(7) }).await;
        assert_eq!(ran.unwrap(), 7, "the work ran; its completion failed and is retried in the background");
        assert_eq!(idempotency.running_handlers(), 1, "the retried completion is counted");

        // The store answers again 2 s into a 30 s grace period: the drain lasts until the record lands.
        let reachable = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reachable.completions_unreachable.store(false, Ordering::SeqCst);
        });
        let started = Instant::now();
        assert_eq!(idempotency.drain(Duration::from_secs(30)).await, Ok(()));
        assert!(started.elapsed() >= Duration::from_secs(2), "drained at {:?}", started.elapsed());
        let key = idempotency.once_store_key("drain", "k");
        let held = store.store.inspect(&key).await.unwrap();
        assert!(matches!(held, Some(Entry::Completed(_))), "the record landed before the drain ended: {held:?}");
        assert_eq!(idempotency.running_handlers(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_reports_a_completion_still_retried_when_its_grace_runs_out() {
        let store = Arc::new(Unreachable::default());
        let idempotency = crate::Idempotency::new(store.clone());
        store.completions_unreachable.store(true, Ordering::SeqCst);
        let ran = idempotency.once("drain", "k").run(&1, || async { Ok::<_, ()>(7) }).await;
        assert_eq!(ran.unwrap(), 7);
        assert_eq!(idempotency.drain(Duration::from_secs(5)).await, Err(crate::Undrained(1)));
    }

    /// A long piece of work under `once`: its lease (3 s) is renewed beside it on the caller's task, so a duplicate
    /// never gets the key while it runs, and the claim completes once the work is done.
    #[tokio::test(start_paused = true)]
    async fn work_driven_beside_its_keeper_keeps_its_key_for_longer_than_a_lease() {
        let store = Arc::new(Unreachable::default());
        let idempotency = crate::Idempotency::new(store.clone());
        let policy = Policy::new().lease(Duration::from_secs(3)).wait_timeout(Duration::ZERO);
        let original = idempotency.once("long", "k").policy(policy).run(&1, || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, ()>("done".to_owned())
        });
        let duplicate = async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            idempotency.once("long", "k").policy(policy).run(&1, || async { Ok::<_, ()>("again".to_owned()) }).await
        };
        let (original, duplicate) = tokio::join!(original, duplicate);
        assert_eq!(original.unwrap(), "done");
        assert!(matches!(duplicate, Err(crate::OnceError::InFlight)), "{duplicate:?}");
        assert!(store.renewed.lock().unwrap().len() >= 3, "renewed every second");
        let again =
            idempotency.once("long", "k").policy(policy).run(&1, || async { Ok::<_, ()>("again".to_owned()) }).await;
        assert_eq!(again.unwrap(), "done", "completed: replayed");
    }

    /// The work ends while a renewal is in flight (it takes 1 s): the completion waits for it to land, so the
    /// renewal cannot land on the record afterwards.
    #[tokio::test(start_paused = true)]
    async fn a_completion_waits_for_the_renewal_in_flight_beside_the_work() {
        let store = Arc::new(Unreachable::default());
        *store.renewal_takes.lock().unwrap() = Duration::from_secs(1);
        let idempotency = crate::Idempotency::new(store.clone());
        let policy = Policy::new().lease(Duration::from_secs(3));
        let started = Instant::now();
        let ran = idempotency
            .once("slow-renewal", "k")
            .policy(policy)
            .run(&1, || async {
                // The renewal is sent at 1 s and lands at 2 s.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok::<_, ()>(1)
            })
            .await;
        assert_eq!(ran.unwrap(), 1);
        let renewed = store.renewed.lock().unwrap().clone();
        let written = store.written.lock().unwrap().clone();
        assert_eq!(renewed.len(), 1, "{renewed:?}");
        assert_eq!(written.len(), 1, "{written:?}");
        assert_eq!(written[0].0, "complete");
        assert!(
            written[0].1 >= renewed[0],
            "completed at {:?}, after the renewal at {:?}",
            written[0].1 - started,
            renewed[0] - started
        );
    }

    /// The caller of `once` gives up (its future is dropped) while a renewal is in flight: the renewal is not cut
    /// off with the caller (it goes on on a task of its own), and the dropped claim's release waits for it, so the
    /// key ends up free rather than claimed again by a renewal landing after the release.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_caller_releases_its_key_after_the_renewal_in_flight_lands() {
        let store = Arc::new(Unreachable::default());
        *store.renewal_takes.lock().unwrap() = Duration::from_secs(1);
        let idempotency = crate::Idempotency::new(store.clone());
        let policy = Policy::new().lease(Duration::from_secs(3));
        let run = idempotency.once("cancelled", "k").policy(policy).run(&1, || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, ()>(1)
        });
        // The renewal is sent at 1 s and lands at 2 s; the caller gives up at 1.5 s.
        let gave_up = tokio::time::timeout(Duration::from_millis(1500), run).await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let renewed = store.renewed.lock().unwrap().clone();
        let written = store.written.lock().unwrap().clone();
        assert_eq!(renewed.len(), 1, "{renewed:?}");
        assert_eq!(written.iter().map(|(write, _)| *write).collect::<Vec<_>>(), ["release"]);
        assert!(written[0].1 >= renewed[0], "released after the renewal landed");
        let key = idempotency.once_store_key("cancelled", "k");
        assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the key is free");
    }

    /// A [`MemoryStore`] whose claims take `claim_takes` to land and land even when their caller stopped waiting
    /// (as a command already sent to a remote store does), whose claims fail while `down` (refused unsent, as a
    /// store known to be down refuses them, or sent and timed out when `sent_failures`), and which counts the
    /// releases and renewals it was sent.
    #[derive(Default)]
    struct Remote {
        store: Arc<MemoryStore>,
        claim_takes: Mutex<Duration>,
        down: AtomicBool,
        sent_failures: AtomicBool,
        releases: std::sync::atomic::AtomicUsize,
        renewals: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for Remote {
        async fn claim(
            &self,
            key: &StoreKey,
            fingerprint: &Fingerprint,
            owner: &OwnerToken,
            lease: Duration,
        ) -> Result<Claimed, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                if self.sent_failures.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("timed out (a test double)".into()));
                }
                return Err(StoreError::Unavailable(crate::Cause::unsent("known down (a test double)")));
            }
            let takes = *self.claim_takes.lock().unwrap();
            let (store, key, fingerprint, owner) = (self.store.clone(), key.clone(), *fingerprint, owner.clone());
            let sent = tokio::spawn(async move {
                tokio::time::sleep(takes).await;
                store.claim(&key, &fingerprint, &owner, lease).await
            });
            sent.await.unwrap()
        }
        async fn complete(
            &self,
            key: &StoreKey,
            owner: &OwnerToken,
            record: &Record,
            ttl: Duration,
        ) -> Result<Write, StoreError> {
            self.store.complete(key, owner, record, ttl).await
        }
        async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.store.release(key, owner).await
        }
        async fn renew(
            &self,
            key: &StoreKey,
            owner: &OwnerToken,
            fingerprint: &Fingerprint,
            lease: Duration,
        ) -> Result<Write, StoreError> {
            self.renewals.fetch_add(1, Ordering::SeqCst);
            self.store.renew(key, owner, fingerprint, lease).await
        }
        async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
            self.store.wait(key, timeout).await
        }
    }

    /// Issue 16, item 5: the caller gives up 100 ms into a claim that takes 1 s to land (a frozen or slow store).
    /// The claim is finished in the background and released, so the retry after it landed runs at once instead of
    /// being refused `in-progress` for a whole lease.
    #[tokio::test(start_paused = true)]
    async fn a_claim_whose_caller_gave_up_is_finished_and_released_in_the_background() {
        let store = Arc::new(Remote::default());
        *store.claim_takes.lock().unwrap() = Duration::from_secs(1);
        let idempotency = crate::Idempotency::new(store.clone());
        let policy = Policy::new().lease(Duration::from_secs(30)).wait_timeout(Duration::ZERO);
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let work = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(1)
        };
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), idempotency.once("o", "k").policy(policy).run(&1, work))
                .await;
        assert!(gave_up.is_err(), "the caller gave up while the claim was in flight");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let key = idempotency.once_store_key("o", "k");
        assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the claim landed, then was released");
        assert_eq!(idempotency.running_handlers(), 0, "nothing left in the background");

        *store.claim_takes.lock().unwrap() = Duration::ZERO;
        let retried = idempotency.once("o", "k").policy(policy).run(&1, work).await;
        assert_eq!(retried.unwrap(), 1, "the retry runs at once");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once: the abandoned claim never ran it");
    }

    /// Issue 16, item 4: while the store is known down, refused claims (never sent) leave nothing behind: no task,
    /// no background release, nothing for `drain` to wait for.
    #[tokio::test(start_paused = true)]
    async fn claims_refused_while_the_store_is_known_down_leave_nothing_behind() {
        let store = Arc::new(Remote::default());
        store.down.store(true, Ordering::SeqCst);
        let idempotency = crate::Idempotency::new(store.clone());
        let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        for request in 0..2000 {
            let refused = idempotency.once("o", &request.to_string()).run(&1, || async { Ok::<_, ()>(1) }).await;
            assert!(matches!(refused, Err(crate::OnceError::Store(_))), "{refused:?}");
        }
        assert_eq!(idempotency.running_handlers(), 0, "no background write per refused request");
        let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        assert_eq!(tasks, tasks_before, "no task per refused request");
        assert_eq!(idempotency.drain(Duration::from_secs(3)).await, Ok(()));
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(store.releases.load(Ordering::SeqCst), 0, "no release sent once the store is back");
    }

    /// Issue 16, item 4: claims that may have landed (they failed after being sent) are released in the background,
    /// by one task for all of them, and the writes held are bounded.
    #[tokio::test(start_paused = true)]
    async fn claims_that_failed_after_being_sent_are_released_by_one_task_with_a_bound() {
        let store = Arc::new(Remote::default());
        store.down.store(true, Ordering::SeqCst);
        store.sent_failures.store(true, Ordering::SeqCst);
        let idempotency = crate::Idempotency::new(store.clone());
        let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let refused = write::MAX_WRITES + 500;
        for request in 0..refused {
            let answer = idempotency.once("o", &request.to_string()).run(&1, || async { Ok::<_, ()>(1) }).await;
            assert!(matches!(answer, Err(crate::OnceError::Store(_))), "{answer:?}");
        }
        assert_eq!(idempotency.running_handlers(), write::MAX_WRITES, "background writes are bounded");
        let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        assert!(tasks <= tasks_before + 1, "one task sends them all: {tasks} alive, {tasks_before} before");
        // The releases are sent at once (the store answers them), and nothing is left.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(idempotency.running_handlers(), 0);
        assert_eq!(store.releases.load(Ordering::SeqCst), write::MAX_WRITES);
    }

    /// Issue 16, item 9: once a renewal was fenced (the key is someone else's), the adopting door's renewal with
    /// its own lease is answered fenced without being sent: sent, it could take the key its new owner freed.
    #[tokio::test(start_paused = true)]
    async fn a_lost_claim_is_never_renewed_again_not_even_for_a_new_lease() {
        let store = Arc::new(Remote::default());
        let shared: Arc<dyn Store> = store.clone();
        let background = Background::new(shared.clone(), Arc::default());
        let metrics: Arc<dyn Metrics> = Arc::new(NoMetrics);
        let lease = Duration::from_secs(3);
        let policy = Policy::new().lease(lease).wait_timeout(Duration::ZERO);
        let key = StoreKey::derive(&[b"lost"]);
        let fingerprint = Fingerprint::builder().field(b"request").finish();
        let begun = begin_observed(&background, &metrics, key.clone(), fingerprint, &policy).await;
        let Ok(Outcome::Execute(mut claim)) = begun.result else { panic!("a fresh key is claimed") };
        let fence = claim.fence();
        // The claim is lost: its key freed and taken by another owner before the first renewal (at 1 s).
        let other = OwnerToken::generate();
        store.store.release(&key, fence.token()).await.unwrap();
        assert_eq!(store.store.claim(&key, &fingerprint, &other, lease).await.unwrap(), Claimed::Owned);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(!fence.is_held().await.unwrap(), "the renewal at 1 s was fenced");
        // The new owner gives the key up; the old claim must not take it back.
        store.store.release(&key, &other).await.unwrap();
        let sent = store.renewals.load(Ordering::SeqCst);
        assert_eq!(claim.renew_for(Duration::from_secs(30)).await.unwrap(), Write::Fenced);
        assert_eq!(store.renewals.load(Ordering::SeqCst), sent, "not sent");
        assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the key stays free");
        drop(claim);
    }

    /// A claim whose answer came after its whole lease (a store slower than the lease) may have lapsed before it
    /// was answered and been taken by another caller since: the work does not run on it, the caller gets a store
    /// error (a retry claims again), and the claim is released.
    #[tokio::test(start_paused = true)]
    async fn a_claim_answered_after_its_lease_ran_out_does_not_run() {
        let store = Arc::new(Remote::default());
        *store.claim_takes.lock().unwrap() = Duration::from_secs(4);
        let idempotency = crate::Idempotency::new(store.clone());
        let policy = Policy::new().lease(Duration::from_secs(3)).wait_timeout(Duration::ZERO);
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let work = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(1)
        };
        let answer = idempotency.once("slow", "k").policy(policy).run(&1, work).await;
        assert!(matches!(answer, Err(crate::OnceError::Store(_))), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0, "the work did not run on a claim that may have lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = idempotency.once_store_key("slow", "k");
        assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the claim was released");
        *store.claim_takes.lock().unwrap() = Duration::ZERO;
        assert_eq!(idempotency.once("slow", "k").policy(policy).run(&1, work).await.unwrap(), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
