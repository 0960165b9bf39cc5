//! Claim, wait, replay: the protocol every front door runs, free of HTTP.

use crate::drain::Running;
use crate::metrics::{Event, Metrics, NoMetrics};
use crate::store::{Claimed, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Policy, Record, Stored};
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
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
    begin_observed(store, &NO_METRICS, None, key, fingerprint, policy).await.result
}

/// What [`begin_observed`] decided, and how long it waited for an in-flight original (`None`: it did not wait).
pub(crate) struct Begun {
    pub(crate) result: Result<Outcome, StoreError>,
    pub(crate) waited: Option<Duration>,
}

/// [`begin`], counting its decision (and the wait) in `metrics` and logging conflicts and mismatches. Writes that the
/// claim (or a failed claim) leaves to retry in the background are counted in `running`, so that
/// [`Idempotency::drain`](crate::Idempotency::drain) waits for them too.
pub(crate) async fn begin_observed(
    store: &Arc<dyn Store>,
    metrics: &Arc<dyn Metrics>,
    running: Option<&Arc<Running>>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Begun {
    let started = Instant::now();
    let mut waited = false;
    let result = claim_or_wait(store, metrics, running, key, fingerprint, policy, &mut waited).await;
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
    running: Option<&Arc<Running>>,
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
                let lost = PendingWrite {
                    store: store.clone(),
                    key,
                    owner,
                    write: Pending::Release,
                    running: running.cloned(),
                };
                lost.release_lost_claim(policy.lease_duration());
                return Err(error);
            }
        };
        let entry = match claimed {
            Claimed::Owned => {
                let mut claim = Claim::new(store, metrics, key, owner, fingerprint, policy.lease_duration());
                claim.running = running.cloned();
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
    /// The handle of the future renewing the lease, once something started it.
    keeper: std::sync::Mutex<Option<Keeper>>,
    /// Where the writes left to the background (a failed completion or release retried, the release of a dropped
    /// claim) are counted, for [`Idempotency::drain`](crate::Idempotency::drain).
    running: Option<Arc<Running>>,
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
            running: None,
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
    /// a duplicate. Renewing goes on until the claim is completed, released or dropped: beside `work` (a renewal in
    /// flight never holds the work up), then, if the claim is still held when `work` ends, on a task of its own.
    ///
    /// Only a store out of reach for the rest of a lease can cost the claim: a duplicate that claims the key once
    /// the lease has run out (and before a renewal re-claims it) runs the work again. The work here still runs to
    /// its end; its completion is then fenced, so the duplicate's record stands.
    pub async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        beside(self.keep_inline(), work).await
    }

    /// Starts renewing the lease on a task of its own, unless something renews it already.
    pub(crate) fn start_keeping(&self) {
        if let Some(keeper) = self.keep_inline() {
            spawn_keeper(keeper);
        }
    }

    /// The future that renews the lease, for the caller to drive beside the work (see [`beside`]), unless one
    /// exists already (its driver goes on driving it). Driving it on the work's own task rather than spawning it
    /// spares a task, its scheduling and two wake-ups per claim.
    pub(crate) fn keep_inline(&self) -> Option<KeeperRun> {
        let mut keeper = self.keeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keeper.is_some() {
            return None;
        }
        let owner = self.owner.as_ref()?;
        let renewal = Renewal {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            key: self.key.clone(),
            owner: owner.clone(),
            fingerprint: self.fingerprint,
            failures: 0,
        };
        let (handle, run) = Keeper::new(renewal, self.lease);
        *keeper = Some(handle);
        Some(run)
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
    /// Starts renewing the lease (on a task of its own) if nothing renews it yet.
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
            let write = Pending::Complete { record, ttl };
            self.pending(owner, write).spawn(ttl);
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
            self.pending(owner, Pending::Release).spawn(self.lease);
        }
        write
    }
}

impl Claim {
    /// `write` by `owner` on this claim's key, to be sent in the background.
    fn pending(&self, owner: OwnerToken, write: Pending) -> PendingWrite {
        PendingWrite { store: self.store.clone(), key: self.key.clone(), owner, write, running: self.running.clone() }
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
    /// Counts the write while it is retried, for [`Idempotency::drain`](crate::Idempotency::drain).
    running: Option<Arc<Running>>,
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
        let counted = self.running.as_ref().map(Running::enter);
        runtime.spawn(
            async move {
                let _counted = counted;
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

/// The future that renews a claim's lease (made by [`Keeper::new`]), driven beside the work by [`beside`] or on a
/// task of its own by [`spawn_keeper`]. Boxed, so that a driver can hand it over to a task half-way.
pub(crate) type KeeperRun = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project_lite::pin_project! {
    /// Runs `body` with `keeper` (if any) driven beside it on the same task: `body` first, then the keeper, on every
    /// poll, so a command that `body` gives the keeper (a stop, a renewal) is taken in the same poll without waking
    /// anyone. When `body` ends with the keeper still running (the claim outlives `body`: an annotated handler took
    /// it over and holds it elsewhere, or [`Claim::keep_alive`]'s caller completes it later), or when this future is
    /// dropped first (its caller was cancelled; the claim releases itself), the keeper goes on on a task of its own:
    /// a renewal in flight lands before the claim's completion or release, never after it.
    ///
    /// A struct rather than an `async fn`: `body` (a whole handler's future) is kept in place, where an `async fn`
    /// would hold it twice, as its argument and as the pinned local it is polled from.
    pub(crate) struct Beside<B> {
        keeper: HandOverOnDrop,
        #[pin]
        body: B,
    }
}

/// [`Beside`] `body` with `keeper`.
pub(crate) fn beside<B: Future>(keeper: Option<KeeperRun>, body: B) -> Beside<B> {
    Beside { keeper: HandOverOnDrop(keeper), body }
}

impl<B: Future> Future for Beside<B> {
    type Output = B::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<B::Output> {
        let this = self.project();
        let polled = this.body.poll(cx);
        if let Some(keeper) = &mut this.keeper.0
            && keeper.as_mut().poll(cx).is_ready()
        {
            this.keeper.0 = None;
        }
        polled
    }
}

/// A keeper driven by [`Beside`], handed over to a task of its own if it is still running when its driver ends.
pub(crate) struct HandOverOnDrop(Option<KeeperRun>);

impl Drop for HandOverOnDrop {
    fn drop(&mut self) {
        if let Some(keeper) = self.0.take() {
            spawn_keeper(keeper);
        }
    }
}

/// Drives `keeper` on a task of its own (none outside a runtime: nothing could renew then).
fn spawn_keeper(keeper: KeeperRun) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(keeper.in_current_span());
    }
}

/// A handle of a claim's keeper: the future that renews its lease. The keeper makes one renewal at a time, so
/// renewals land in the order it makes them; the claim's handle and each fence's send it commands.
#[derive(Clone)]
struct Keeper {
    state: Arc<std::sync::Mutex<KeeperState>>,
}

/// What a keeper and its handles share.
#[derive(Default)]
struct KeeperState {
    /// Commands the keeper has not taken yet, in the order they were given.
    commands: std::collections::VecDeque<KeeperCommand>,
    /// A renewal is in flight: a stop waits for it to land.
    renewing: bool,
    /// The keeper makes no more renewals: stopped, or its future was dropped.
    stopped: bool,
    /// Wakes the keeper's driver when a command comes.
    waker: Option<std::task::Waker>,
}

enum KeeperCommand {
    /// Renew now for this lease, then every third of it; answer with the renewal.
    RenewFor(Duration, tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// Renew now for the current lease; answer with the renewal.
    RenewNow(tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// Stop; answer once no renewal is in flight.
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// What a keeper does next.
enum Step {
    /// As [`KeeperCommand::RenewFor`].
    RenewFor(Duration, tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// As [`KeeperCommand::RenewNow`].
    RenewNow(tokio::sync::oneshot::Sender<Result<Write, StoreError>>),
    /// The next renewal is due.
    Due,
    /// Stopped; the stop waits for this answer, if it waited at all.
    Stop(Option<tokio::sync::oneshot::Sender<()>>),
}

/// Marks a keeper stopped when its future ends or is dropped (its task aborted): handles no longer wait for it, and
/// the commands it will never take are dropped, which answers them.
struct StopOnDrop<'a>(&'a std::sync::Mutex<KeeperState>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.stopped = true;
        state.waker = None;
        let unanswered = std::mem::take(&mut state.commands);
        drop(state);
        drop(unanswered);
    }
}

impl Keeper {
    /// A keeper for `renewal`, and the future that is the keeper, to be driven.
    fn new(renewal: Renewal, lease: Duration) -> (Self, KeeperRun) {
        let keeper = Self { state: Arc::default() };
        let run = Box::pin(Self::run(keeper.state.clone(), renewal, lease));
        (keeper, run)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run(state: Arc<std::sync::Mutex<KeeperState>>, mut renewal: Renewal, mut lease: Duration) {
        let _stopped = StopOnDrop(&state);
        let lock = || state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Instant::now() + renewal_period(lease);
        // Made when first waited on: a claim completed before its driver first waits (a quick handler) never
        // registers a timer.
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        // Once a renewal is fenced the claim is gone for good (another caller owns the key now): renewing stops.
        // The work still runs to its end; its result will not be stored.
        let mut lost = false;
        loop {
            let step = std::future::poll_fn(|cx| {
                {
                    let mut state = lock();
                    if state.stopped {
                        return Poll::Ready(Step::Stop(None));
                    }
                    let step = match state.commands.pop_front() {
                        Some(KeeperCommand::Stop(done)) => {
                            state.stopped = true;
                            return Poll::Ready(Step::Stop(Some(done)));
                        }
                        Some(KeeperCommand::RenewFor(lease, answer)) => Some(Step::RenewFor(lease, answer)),
                        Some(KeeperCommand::RenewNow(answer)) => Some(Step::RenewNow(answer)),
                        None => {
                            if !state.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                                state.waker = Some(cx.waker().clone());
                            }
                            None
                        }
                    };
                    if let Some(step) = step {
                        state.renewing = true;
                        return Poll::Ready(step);
                    }
                }
                if lost {
                    return Poll::Pending;
                }
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep_until(next)));
                }
                let due = timer.as_mut().as_pin_mut().expect("the timer was just made").poll(cx);
                if due.is_pending() {
                    return Poll::Pending;
                }
                let mut state = lock();
                if state.stopped {
                    return Poll::Ready(Step::Stop(None));
                }
                state.renewing = true;
                Poll::Ready(Step::Due)
            })
            .await;
            match step {
                Step::Stop(done) => {
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Step::RenewFor(new_lease, answer) => {
                    lease = new_lease;
                    next = Instant::now() + renewal_period(lease);
                    let write = renewal.renew(lease).await;
                    lost = matches!(write, Ok(Write::Fenced));
                    if write.is_err() {
                        next = Instant::now() + renewal_retry_period(lease);
                    }
                    let _ = answer.send(write);
                }
                Step::RenewNow(answer) => {
                    // A lost claim stays lost: renewing it now could take a key that someone else freed.
                    let write = if lost { Ok(Write::Fenced) } else { renewal.renew(lease).await };
                    next = Instant::now() + renewal_period(lease);
                    lost = matches!(write, Ok(Write::Fenced));
                    if write.is_err() {
                        next = Instant::now() + renewal_retry_period(lease);
                    }
                    let _ = answer.send(write);
                }
                Step::Due => {
                    next = Instant::now() + renewal_period(lease);
                    match renewal.renew(lease).await {
                        Ok(Write::Applied) => {}
                        Ok(Write::Fenced) => lost = true,
                        Err(_) => next = Instant::now() + renewal_retry_period(lease),
                    }
                }
            }
            if let Some(timer) = timer.as_mut().as_pin_mut()
                && timer.deadline() != next
            {
                timer.reset(next);
            }
            lock().renewing = false;
        }
    }

    /// Gives the keeper `command` and wakes its driver, unless the driver is the caller's own task (see [`beside`]:
    /// it polls the keeper right after the caller); `None` once the keeper stopped.
    fn send(&self, command: KeeperCommand, cx: &std::task::Context<'_>) -> Option<()> {
        let mut state = self.lock();
        if state.stopped {
            return None;
        }
        state.commands.push_back(command);
        let waker = state.waker.take();
        drop(state);
        wake_unless_own(waker, cx);
        Some(())
    }

    /// Sends a renewal command made with `answer` and waits for its answer; fenced once the keeper stopped.
    async fn ask(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<Result<Write, StoreError>>) -> KeeperCommand,
    ) -> Result<Write, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let mut command = Some(command(answer));
        let sent = std::future::poll_fn(|cx| Poll::Ready(self.send(command.take().expect("sent once"), cx))).await;
        if sent.is_none() {
            return Ok(Write::Fenced);
        }
        answered.await.unwrap_or(Ok(Write::Fenced))
    }

    async fn renew_for(&self, lease: Duration) -> Result<Write, StoreError> {
        self.ask(|answer| KeeperCommand::RenewFor(lease, answer)).await
    }

    async fn renew_now(&self) -> Result<Write, StoreError> {
        self.ask(KeeperCommand::RenewNow).await
    }

    /// Stops the keeper once no renewal is in flight. With none in flight and no command waiting (the usual case:
    /// the work took less than a third of the lease), it stops at once, without a round trip through its driver.
    async fn stop(self) {
        let wait = std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.stopped {
                return Poll::Ready(None);
            }
            if !state.renewing && state.commands.is_empty() {
                state.stopped = true;
                let waker = state.waker.take();
                drop(state);
                wake_unless_own(waker, cx);
                return Poll::Ready(None);
            }
            let (done, stopped) = tokio::sync::oneshot::channel();
            state.commands.push_back(KeeperCommand::Stop(done));
            let waker = state.waker.take();
            drop(state);
            wake_unless_own(waker, cx);
            Poll::Ready(Some(stopped))
        })
        .await;
        if let Some(stopped) = wait {
            let _ = stopped.await;
        }
    }
}

/// Wakes a keeper's driver, unless it is the task of `cx` (the keeper is driven [`beside`] the caller and is polled
/// right after it: a wake-up would only poll the task once more for nothing).
fn wake_unless_own(waker: Option<std::task::Waker>, cx: &std::task::Context<'_>) {
    if let Some(waker) = waker
        && !waker.will_wake(cx.waker())
    {
        waker.wake();
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
        let counted = self.running.as_ref().map(Running::enter);
        runtime.spawn(async move {
            let _counted = counted;
            if let Some(keeper) = keeper {
                keeper.stop().await;
            }
            let write = store.release(&key, &owner).await;
            report_write(&*metrics, &key, "release", &write);
        });
    }
}

impl PendingWrite {
    /// Releases a claim whose call failed, in case it took effect with only its reply lost. A release deletes
    /// nothing but the owner's own claim, so it is harmless when the claim never landed (the usual case: that is not
    /// reported).
    ///
    /// While the store is out of reach the release is retried until it lands or `lease` has passed: a claim that
    /// sat in a frozen server's socket takes effect when the server resumes, and would otherwise hold its key for a
    /// whole lease with nobody running the request.
    fn release_lost_claim(self, lease: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let counted = self.running.as_ref().map(Running::enter);
        runtime.spawn(async move {
            let _counted = counted;
            match self.store.release(&self.key, &self.owner).await {
                Ok(Write::Applied) => tracing::info!(key = %self.key, "released a claim whose reply was lost"),
                Ok(Write::Fenced) => {}
                Err(StoreError::Unavailable(_)) => self.spawn_quietly(lease),
                Err(error) => tracing::debug!(key = %self.key, %error, "could not release a claim whose call failed"),
            }
        });
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
        let begun = begin_observed(&shared, &metrics, None, key.clone(), fingerprint, &policy).await;
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
}
