//! Claim, wait, replay: the protocol every front door runs, free of HTTP.

use crate::metrics::{Event, Metrics, NoMetrics};
use crate::store::{Claimed, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Policy, Record, Stored};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

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
/// This is the bare protocol, for building another front door; it reports to no [`Metrics`]. The doors built in
/// ([`Idempotency::serve`](crate::Idempotency::serve), the [`IdempotencyLayer`](crate::IdempotencyLayer) and
/// [`Idempotency::once`](crate::Idempotency::once)) run the same protocol and report to the engine's metrics.
pub async fn begin(
    store: &Arc<dyn Store>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Result<Outcome, StoreError> {
    static NO_METRICS: std::sync::LazyLock<Arc<dyn Metrics>> = std::sync::LazyLock::new(|| Arc::new(NoMetrics));
    begin_observed(store, &NO_METRICS, key, fingerprint, policy).await.result
}

/// What [`begin_observed`] decided, and how long it waited for an in-flight original (`None`: it did not wait).
pub(crate) struct Begun {
    pub(crate) result: Result<Outcome, StoreError>,
    pub(crate) waited: Option<Duration>,
}

/// [`begin`], counting its decision (and the wait) in `metrics` and logging conflicts and mismatches.
pub(crate) async fn begin_observed(
    store: &Arc<dyn Store>,
    metrics: &Arc<dyn Metrics>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Begun {
    let started = Instant::now();
    let mut waited = false;
    let result = claim_or_wait(store, metrics, key, fingerprint, policy, &mut waited).await;
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
    store: &Arc<dyn Store>,
    metrics: &Arc<dyn Metrics>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
    waited: &mut bool,
) -> Result<Outcome, StoreError> {
    let deadline = Instant::now() + policy.wait_timeout_duration();
    // One token for every attempt: a claim resent after a lost reply is recognised as this caller's own.
    let owner = OwnerToken::generate();
    loop {
        let claimed = match store.claim(&key, &fingerprint, &owner, policy.lease_duration()).await {
            Ok(claimed) => claimed,
            Err(error) => {
                // The claim may have taken effect with only its reply lost: give it up rather than leave the key
                // in flight, answering 409, for a whole lease with nobody running the request.
                release_lost_claim(store.clone(), key, owner, policy.lease_duration());
                return Err(error);
            }
        };
        let entry = match claimed {
            Claimed::Owned => {
                let claim = Claim::new(store, metrics, key, owner, fingerprint, policy.lease_duration());
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

/// Ownership of an in-flight key: the right to run the work once and record its result.
///
/// Consumed by [`Claim::complete`] or [`Claim::release`]. A claim dropped without either (its future was
/// cancelled) releases itself in the background, so the key is free for a retry at once rather than after the lease.
pub struct Claim {
    store: Arc<dyn Store>,
    metrics: Arc<dyn Metrics>,
    key: StoreKey,
    owner: Option<OwnerToken>,
    fingerprint: Fingerprint,
    lease: Duration,
    /// The task renewing the lease, once [`Claim::keep_alive`] started it.
    keeper: std::sync::Mutex<Option<Keeper>>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("key", &self.key).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Claim {
    fn new(
        store: &Arc<dyn Store>,
        metrics: &Arc<dyn Metrics>,
        key: StoreKey,
        owner: OwnerToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Self {
        Self {
            store: store.clone(),
            metrics: metrics.clone(),
            key,
            owner: Some(owner),
            fingerprint,
            lease,
            keeper: std::sync::Mutex::new(None),
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

    /// Runs `work` while the lease is renewed every third of its length beside it (a renewal that fails is retried
    /// every twentieth of the lease until one lands), so work that outlives its lease is never run a second time by
    /// a duplicate. Renewing goes on (on a task of its own, so a slow store never holds the work up) until the claim
    /// is completed, released or dropped.
    ///
    /// Only a store out of reach for the rest of a lease can cost the claim: a duplicate that claims the key once
    /// the lease has run out (and before a renewal re-claims it) runs the work again. The work here still runs to
    /// its end; its completion is then fenced, so the duplicate's record stands.
    pub async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        self.start_keeping();
        work.await
    }

    /// Starts the task that renews the lease, unless it runs already.
    pub(crate) fn start_keeping(&self) {
        let mut keeper = self.keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keeper.is_none()
            && let Some(owner) = &self.owner
        {
            let renewal = Renewal {
                store: self.store.clone(),
                metrics: self.metrics.clone(),
                key: self.key.clone(),
                owner: owner.clone(),
                fingerprint: self.fingerprint,
                failures: 0,
            };
            *keeper = Some(Keeper::spawn(renewal, self.lease));
        }
    }

    /// Renews the lease for `lease` from now on, at once: an adopting front door brings its own lease. With a keeper
    /// running, the keeper makes this renewal after any of its own in flight, so an older renewal can never land
    /// after it and shorten the new lease; from then on it renews every third of `lease`.
    pub(crate) async fn renew_for(&mut self, lease: Duration) -> Result<Write, StoreError> {
        self.lease = lease;
        let keeper = self.keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match (keeper, &self.owner) {
            (Some(keeper), _) => keeper.renew_for(lease).await,
            (None, Some(owner)) => {
                let write = self.store.renew(&self.key, owner, &self.fingerprint, lease).await;
                report_write(&*self.metrics, &self.key, "renew", &write);
                write
            }
            (None, None) => Ok(Write::Fenced),
        }
    }

    /// The claim's fence: its owner token, and a way to check (renewing at once) that the claim is still held.
    /// Starts the renewal task if it does not run yet.
    pub fn fence(&self) -> Fence {
        self.start_keeping();
        let keeper = self.keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let owner = self.owner.clone().expect("a live claim has an owner");
        Fence { owner, keeper }
    }

    /// Stops renewing, once any renewal in flight has landed: a renewal arriving after the release could otherwise
    /// claim the freed key again.
    async fn stop_keeping(&self) {
        let keeper = self.keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(keeper) = keeper {
            keeper.stop().await;
        }
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
        let write = self.store.complete(&self.key, &owner, &record, ttl).await;
        report_write(&*self.metrics, &self.key, "complete", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            let pending = Pending::Complete { record, ttl };
            PendingWrite { store: self.store.clone(), key: self.key.clone(), owner, write: pending }.spawn(ttl);
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
        let write = self.store.release(&self.key, &owner).await;
        report_write(&*self.metrics, &self.key, "release", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            let pending =
                PendingWrite { store: self.store.clone(), key: self.key.clone(), owner, write: Pending::Release };
            pending.spawn(self.lease);
        }
        write
    }
}

/// The first pause before a failed write is sent again, doubled per failure up to [`WRITE_RETRY_LAST`].
const WRITE_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two attempts of a failed write: a store back from an outage gets it within about this
/// long.
const WRITE_RETRY_LAST: Duration = Duration::from_secs(1);

/// An owner-checked write the store could not take, sent again in the background.
struct PendingWrite {
    store: Arc<dyn Store>,
    key: StoreKey,
    owner: OwnerToken,
    write: Pending,
}

enum Pending {
    /// The work ran and its answer went out: its record must still land, or after the lease a retry runs it again.
    Complete { record: Record, ttl: Duration },
    /// The work failed: the key must be freed, or duplicates are refused until the lease runs out.
    Release,
}

impl PendingWrite {
    fn operation(&self) -> &'static str {
        match self.write {
            Pending::Complete { .. } => "complete",
            Pending::Release => "release",
        }
    }

    async fn send(&self) -> Result<Write, StoreError> {
        match &self.write {
            Pending::Complete { record, ttl } => self.store.complete(&self.key, &self.owner, record, *ttl).await,
            Pending::Release => self.store.release(&self.key, &self.owner).await,
        }
    }

    /// Sends the write again, backing off, until the store takes it (or fences it: someone else claimed the key once
    /// the lease ran out) or `useful_for` has passed (the record would have expired, or the claim lapsed by itself).
    fn spawn(self, useful_for: Duration) {
        tracing::warn!(
            key = %self.key,
            operation = self.operation(),
            "write failed: retrying in the background until the store is back"
        );
        self.spawn_quietly(useful_for);
    }

    /// [`PendingWrite::spawn`] without the warning: for a release of a claim that most likely never landed.
    fn spawn_quietly(self, useful_for: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let operation = self.operation();
        runtime.spawn(
            async move {
                let give_up = Instant::now() + useful_for;
                let mut pause = WRITE_RETRY_FIRST;
                loop {
                    tokio::time::sleep(pause).await;
                    match self.send().await {
                        Ok(Write::Applied) => {
                            tracing::info!(key = %self.key, operation, "write retried: it landed");
                            return;
                        }
                        Ok(Write::Fenced) => {
                            tracing::warn!(
                                key = %self.key,
                                operation,
                                "write retried too late: the key was claimed again after the lease ran out"
                            );
                            return;
                        }
                        Err(StoreError::Unavailable(_)) if Instant::now() < give_up => {}
                        Err(error) => {
                            tracing::error!(key = %self.key, operation, %error, "write retry given up");
                            return;
                        }
                    }
                    pause = (pause * 2).min(WRITE_RETRY_LAST);
                }
            }
            .in_current_span(),
        );
    }
}

/// What renewing one claim's lease takes.
struct Renewal {
    store: Arc<dyn Store>,
    metrics: Arc<dyn Metrics>,
    key: StoreKey,
    owner: OwnerToken,
    fingerprint: Fingerprint,
    /// Renewals that failed in a row.
    failures: u32,
}

impl Renewal {
    /// One renewal, given up after one renewal period: a store that hangs must not hold up the next renewal, nor
    /// the completion that waits for this one to land.
    ///
    /// Of failures in a row (retried every [`renewal_retry_period`] while the store is out of reach) only the first
    /// is counted and logged as an error, so an outage does not flood the log with one error per retry per claim.
    async fn renew(&mut self, lease: Duration) -> Result<Write, StoreError> {
        let renewal = self.store.renew(&self.key, &self.owner, &self.fingerprint, lease);
        let write = match tokio::time::timeout(renewal_period(lease), renewal).await {
            Ok(write) => write,
            Err(_) => Err(StoreError::Unavailable("the lease renewal timed out".into())),
        };
        match &write {
            Err(error) if self.failures > 0 => {
                tracing::debug!(key = %self.key, %error, failures = self.failures, "lease renewal failed again");
            }
            Ok(Write::Applied) if self.failures > 0 => {
                tracing::info!(key = %self.key, failures = self.failures, "lease renewed again after failed attempts");
            }
            _ => report_write(&*self.metrics, &self.key, "renew", &write),
        }
        self.failures = if write.is_err() { self.failures + 1 } else { 0 };
        write
    }
}

/// How often a lease of `lease` is renewed: three times per lease.
fn renewal_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(10))
}

/// How soon a renewal that failed (the store could not be reached) is tried again: a twentieth of the lease, until
/// one lands. Waiting a whole renewal period instead put the attempt after two failures exactly where the lease
/// runs out, racing the duplicates that the store wakes at that moment: an outage of a little over a third of the
/// lease could hand the key to a duplicate while the owner was still running. Retried, the lease is extended as soon
/// as the store answers again, so an outage that ends (as seen by this process) a twentieth of the lease before the
/// lease granted by the last renewal runs out costs nothing. Attempts are cheap while the store is known to be down
/// (the Redis store fails them without touching the network).
fn renewal_retry_period(lease: Duration) -> Duration {
    (lease / 20).max(Duration::from_millis(10))
}

/// The handle of a claim's renewal task. The task makes one renewal at a time, so renewals land in the order it
/// makes them.
#[derive(Clone)]
struct Keeper {
    commands: tokio::sync::mpsc::UnboundedSender<KeeperCommand>,
}

enum KeeperCommand {
    /// Renew now for this lease, then every third of it; answer with the renewal.
    RenewFor(Duration, tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// Renew now for the current lease; answer with the renewal.
    RenewNow(tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// Stop; answer once no renewal is in flight.
    Stop(tokio::sync::oneshot::Sender<()>),
}

impl Keeper {
    fn spawn(renewal: Renewal, lease: Duration) -> Self {
        let (commands, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(Self::run(renewal, lease, received).in_current_span());
        Self { commands }
    }

    async fn run(
        mut renewal: Renewal,
        mut lease: Duration,
        mut commands: tokio::sync::mpsc::UnboundedReceiver<KeeperCommand>,
    ) {
        let mut next = Instant::now() + renewal_period(lease);
        // Once a renewal is fenced the claim is gone for good (another caller owns the key now): renewing stops.
        // The work still runs to its end; its result will not be stored.
        let mut lost = false;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(KeeperCommand::RenewFor(new_lease, answer)) => {
                        lease = new_lease;
                        next = Instant::now() + renewal_period(lease);
                        let write = renewal.renew(lease).await;
                        lost = matches!(write, Ok(Write::Fenced));
                        if write.is_err() {
                            next = Instant::now() + renewal_retry_period(lease);
                        }
                        let _ = answer.send(write);
                    }
                    Some(KeeperCommand::RenewNow(answer)) => {
                        // A lost claim stays lost: renewing it now could take a key that someone else freed.
                        let write = if lost { Ok(Write::Fenced) } else { renewal.renew(lease).await };
                        next = Instant::now() + renewal_period(lease);
                        lost = matches!(write, Ok(Write::Fenced));
                        if write.is_err() {
                            next = Instant::now() + renewal_retry_period(lease);
                        }
                        let _ = answer.send(write);
                    }
                    Some(KeeperCommand::Stop(done)) => {
                        let _ = done.send(());
                        return;
                    }
                    // The claim is gone (dropped: it releases itself).
                    None => return,
                },
                () = tokio::time::sleep_until(next), if !lost => {
                    next = Instant::now() + renewal_period(lease);
                    match renewal.renew(lease).await {
                        Ok(Write::Applied) => {}
                        Ok(Write::Fenced) => lost = true,
                        Err(_) => next = Instant::now() + renewal_retry_period(lease),
                    }
                }
            }
        }
    }

    async fn renew_for(&self, lease: Duration) -> Result<Write, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        if self.commands.send(KeeperCommand::RenewFor(lease, answer)).is_err() {
            return Ok(Write::Fenced);
        }
        answered.await.unwrap_or(Ok(Write::Fenced))
    }

    async fn renew_now(&self) -> Result<Write, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        if self.commands.send(KeeperCommand::RenewNow(answer)).is_err() {
            return Ok(Write::Fenced);
        }
        answered.await.unwrap_or(Ok(Write::Fenced))
    }

    async fn stop(self) {
        let (done, stopped) = tokio::sync::oneshot::channel();
        if self.commands.send(KeeperCommand::Stop(done)).is_ok() {
            let _ = stopped.await;
        }
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
    keeper: Option<Keeper>,
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
        let Some(keeper) = &self.keeper else { return Ok(false) };
        keeper.renew_now().await.map(|write| write == Write::Applied)
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

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else { return };
        let keeper = self.keeper.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let (store, metrics, key) = (self.store.clone(), self.metrics.clone(), self.key.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Some(keeper) = keeper {
                keeper.stop().await;
            }
            let write = store.release(&key, &owner).await;
            report_write(&*metrics, &key, "release", &write);
        });
    }
}

/// Releases a claim whose call failed, in case it took effect with only its reply lost. A release deletes nothing
/// but `owner`'s own claim, so it is harmless when the claim never landed (the usual case: that is not reported).
///
/// While the store is out of reach the release is retried until it lands or `lease` has passed: a claim that sat in
/// a frozen server's socket takes effect when the server resumes, and would otherwise hold its key for a whole lease
/// with nobody running the request.
fn release_lost_claim(store: Arc<dyn Store>, key: StoreKey, owner: OwnerToken, lease: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        match store.release(&key, &owner).await {
            Ok(Write::Applied) => tracing::info!(key = %key, "released a claim whose reply was lost"),
            Ok(Write::Fenced) => {}
            Err(StoreError::Unavailable(_)) => {
                PendingWrite { store, key, owner, write: Pending::Release }.spawn_quietly(lease);
            }
            Err(error) => tracing::debug!(key = %key, %error, "could not release a claim whose call failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A [`MemoryStore`] whose renewals fail while `unreachable` is set, as a remote store's do while it cannot be
    /// reached; it notes when each renewal landed.
    #[derive(Default)]
    struct Unreachable {
        store: MemoryStore,
        unreachable: AtomicBool,
        renewed: Mutex<Vec<Instant>>,
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
            self.store.complete(key, owner, record, ttl).await
        }
        async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
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
            let write = self.store.renew(key, owner, fingerprint, lease).await;
            if matches!(write, Ok(Write::Applied)) {
                self.renewed.lock().unwrap().push(Instant::now());
            }
            write
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
        let begun = begin_observed(&shared, &metrics, key.clone(), fingerprint, &policy).await;
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
            renewed.iter().any(|at| *at >= back && *at <= back + renewal_retry_period(lease)),
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
}
