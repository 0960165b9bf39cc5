//! Lease renewal for every live claim of an engine, on one task of its own: the engine's lease keeper.
//!
//! Why a task apart from the work: a handler that blocks its thread (`block_in_place`, a long password hash, a big
//! parse) stops everything driven on its own task. A keeper polled beside the handler renewed nothing while it was
//! blocked, the lease lapsed, and a duplicate ran the handler a second time. Why one task and not one per claim: a
//! spawn per first request cost 2.4 µs. Here registering a claim is a push onto a timer queue under a lock; the
//! keeper's task sleeps until the earliest renewal is due, runs the due renewals concurrently (one at a time per
//! claim, so they land in the order they were made) and exits when no claim is left, to be spawned again by the next
//! registration.
//!
//! The keeper holds live claims only: a claim that ends (completed, released, dropped) leaves its slot at once, and
//! its timer entry (a few bytes, no reference to the claim) is dropped when it comes due, which spares the
//! completion a search of the queue.

use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;
use crate::protocol::report::report_write;
use crate::record::OwnerToken;
use crate::store::contract::{Store, StoreKey, Write};
use crate::store::error::StoreError;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

/// How often a lease of `lease` is renewed: three times per lease.
pub(super) fn renewal_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(10))
}

/// How soon a renewal that failed (the store could not be reached) is tried again: a twentieth of the lease, until
/// one lands. Waiting a whole renewal period instead put the attempt after two failures exactly where the lease
/// runs out, racing the duplicates that the store wakes at that moment: an outage of a little over a third of the
/// lease could hand the key to a duplicate while the owner was still running. Retried, the lease is extended as soon
/// as the store answers again, so an outage that ends (as seen by this process) a twentieth of the lease before the
/// lease granted by the last renewal runs out costs nothing. Attempts are cheap while the store is known to be down
/// (the remote stores fail them without touching the network).
pub(super) fn renewal_retry_period(lease: Duration) -> Duration {
    (lease / 20).max(Duration::from_millis(10))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lease keeper of one engine: the timer queue of its live claims and the task that renews them.
#[derive(Default)]
pub(crate) struct Renewals {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// When each kept lease is next due, earliest first (entries of stopped or rescheduled leases included: they
    /// are dropped when they come up).
    due: BinaryHeap<Due>,
    /// The leases kept, by slot; a slot is reused once its lease stopped.
    live: Vec<Slot>,
    /// Slots free for reuse.
    free: Vec<usize>,
    /// Leases with a command waiting (renew now), for the task to take at once.
    asked: Vec<Arc<Lease>>,
    /// Whether the task runs; if not, the next registration spawns it.
    driven: bool,
    /// Wakes the task when something comes before what it sleeps for.
    waker: Option<Waker>,
    /// Orders entries due at the same instant by registration.
    sequence: u64,
}

struct Due {
    at: Instant,
    sequence: u64,
    slot: SlotId,
}

/// Where a lease sits in [`Queue::live`]: its index, and the registration that took it (an entry naming an older
/// registration of the same index is stale).
#[derive(Clone, Copy, PartialEq, Eq)]
struct SlotId {
    index: usize,
    registration: u64,
}

#[derive(Default)]
struct Slot {
    registration: u64,
    lease: Option<Arc<Lease>>,
}

impl Queue {
    fn lease(&self, slot: SlotId) -> Option<&Arc<Lease>> {
        let held = self.live.get(slot.index)?;
        if held.registration != slot.registration {
            return None;
        }
        held.lease.as_ref()
    }

    fn free(&mut self, slot: SlotId) {
        if let Some(held) = self.live.get_mut(slot.index)
            && held.registration == slot.registration
            && held.lease.take().is_some()
        {
            self.free.push(slot.index);
        }
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    // Reversed: `BinaryHeap` is a max-heap and the earliest entry must come first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.sequence).cmp(&(self.at, self.sequence))
    }
}

/// What renewing one claim's lease writes to.
pub(crate) struct Target {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Arc<dyn Metrics>,
    pub(crate) key: StoreKey,
    pub(crate) owner: OwnerToken,
    pub(crate) fingerprint: Fingerprint,
}

/// One claim's lease as the keeper keeps it; the claim's handle and each of its fences hold it.
pub(crate) struct Lease {
    keeper: Weak<Renewals>,
    slot: SlotId,
    target: Target,
    state: Mutex<LeaseState>,
}

struct LeaseState {
    lease: Duration,
    /// When the next renewal is due; a queue entry for another instant is stale.
    next: Instant,
    /// A renewal is in flight: a stop waits for it to land, and no other starts.
    renewing: bool,
    /// No more renewals: the claim ended.
    stopped: bool,
    /// A renewal was fenced: someone else owns the key now, and renewing could take a key they freed.
    lost: bool,
    /// Renewals that failed in a row.
    failures: u32,
    /// Renewals asked for, in order.
    commands: VecDeque<Command>,
    /// Stops waiting for the renewal in flight to land.
    on_stop: Vec<oneshot::Sender<()>>,
}

type Answer = oneshot::Sender<Result<Write, StoreError>>;

enum Command {
    /// Renew now for this lease, then every third of it.
    RenewFor(Duration, Answer),
    /// Renew now for the current lease.
    RenewNow(Answer),
}

impl Command {
    fn answer(self, write: Result<Write, StoreError>) {
        let (Command::RenewFor(_, answer) | Command::RenewNow(answer)) = self;
        let _ = answer.send(write);
    }
}

impl Renewals {
    /// Starts keeping the lease of `target`, first renewed a third of `lease` from now.
    pub(crate) fn keep(self: &Arc<Self>, target: Target, lease: Duration) -> Arc<Lease> {
        let next = Instant::now() + renewal_period(lease);
        let state = LeaseState {
            lease,
            next,
            renewing: false,
            stopped: false,
            lost: false,
            failures: 0,
            commands: VecDeque::new(),
            on_stop: Vec::new(),
        };
        let mut queue = lock(&self.queue);
        queue.sequence += 1;
        let registration = queue.sequence;
        let index = queue.free.pop().unwrap_or_else(|| {
            queue.live.push(Slot::default());
            queue.live.len() - 1
        });
        let slot = SlotId { index, registration };
        let kept = Arc::new(Lease { keeper: Arc::downgrade(self), slot, target, state: Mutex::new(state) });
        queue.live[index] = Slot { registration, lease: Some(kept.clone()) };
        self.push_due(queue, next, slot);
        kept
    }

    fn schedule(self: &Arc<Self>, at: Instant, slot: SlotId) {
        self.push_due(lock(&self.queue), at, slot);
    }

    fn push_due(self: &Arc<Self>, mut queue: MutexGuard<'_, Queue>, at: Instant, slot: SlotId) {
        let earliest = queue.due.peek().is_none_or(|first| at < first.at);
        queue.sequence += 1;
        let sequence = queue.sequence;
        queue.due.push(Due { at, sequence, slot });
        self.wake_or_spawn(queue, earliest);
    }

    /// Wakes the task, so that it sees its engine is gone (it then ends instead of sleeping until entries of claims
    /// that ended come due).
    pub(crate) fn wake(&self) {
        let waker = lock(&self.queue).waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Forgets a lease that stopped.
    fn leave(&self, slot: SlotId) {
        lock(&self.queue).free(slot);
    }

    fn ask(self: &Arc<Self>, lease: Arc<Lease>) {
        let mut queue = lock(&self.queue);
        queue.asked.push(lease);
        self.wake_or_spawn(queue, true);
    }

    /// Spawns the task if it is not running; else wakes it when `wake` (it sleeps for something later).
    fn wake_or_spawn(self: &Arc<Self>, mut queue: MutexGuard<'_, Queue>, wake: bool) {
        if queue.driven {
            let waker = if wake { queue.waker.take() } else { None };
            drop(queue);
            if let Some(waker) = waker {
                waker.wake();
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime nothing could renew; the work cannot be running on one either.
            return;
        };
        queue.driven = true;
        drop(queue);
        let driver = Driver { keeper: self.clone(), timer: None, renewing: FuturesUnordered::new() };
        // The keeper outlives any one request: it must not report inside the span of the request that spawned it.
        runtime.spawn(driver.instrument(tracing::Span::none()));
    }
}

/// The keeper's task: sleeps until the earliest renewal is due or a renewal is asked for, runs them, and ends when
/// no lease is left to keep.
struct Driver {
    keeper: Arc<Renewals>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    renewing: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            while let Poll::Ready(Some(())) = this.renewing.poll_next_unpin(cx) {}
            let mut ready: Vec<(Option<Instant>, Arc<Lease>)> = Vec::new();
            let next = {
                let mut queue = lock(&this.keeper.queue);
                let now = Instant::now();
                ready.extend(queue.asked.drain(..).map(|lease| (None, lease)));
                while queue.due.peek().is_some_and(|first| first.at <= now) {
                    let due = queue.due.pop().expect("peeked");
                    if let Some(lease) = queue.lease(due.slot) {
                        ready.push((Some(due.at), lease.clone()));
                    }
                }
                let next = queue.due.peek().map(|first| first.at);
                // Its engine and every claim of it are gone (only this task holds the keeper): what is left to renew
                // can never be completed or released by anyone.
                let orphaned = Arc::strong_count(&this.keeper) == 1;
                if orphaned {
                    queue.due.clear();
                    queue.live.clear();
                    queue.free.clear();
                }
                if orphaned || (ready.is_empty() && next.is_none() && this.renewing.is_empty()) {
                    queue.driven = false;
                    queue.waker = None;
                    return Poll::Ready(());
                }
                if !queue.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                    queue.waker = Some(cx.waker().clone());
                }
                next
            };
            let started = ready.len();
            for (due, lease) in ready {
                if let Some(renewal) = lease.start(due) {
                    this.renewing.push(renewal);
                }
            }
            if started > 0 {
                // Polls the renewals just started (and takes whatever they rescheduled).
                continue;
            }
            let Some(next) = next else { return Poll::Pending };
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Dropped with its runtime: the next registration (on a runtime still running) spawns the task again.
        lock(&self.keeper.queue).driven = false;
    }
}

/// Ends a renewal in flight that its driver dropped (its runtime shut down): stops wait for it no more.
struct InFlight(Option<Arc<Lease>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            let mut state = lock(&lease.state);
            state.renewing = false;
            state.on_stop.clear();
        }
    }
}

impl Lease {
    /// The next renewal to make, if one is due (`due`: the instant of the queue entry that came up; `None`: asked
    /// for), as a future for the keeper's task to run.
    fn start(self: &Arc<Self>, due: Option<Instant>) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        let mut state = lock(&self.state);
        if state.stopped || state.renewing {
            return None;
        }
        let command = loop {
            match state.commands.pop_front() {
                // A lost claim stays lost: renewing it could take a key that its new owner freed.
                Some(command) if state.lost => command.answer(Ok(Write::Fenced)),
                Some(command) => break Some(command),
                None => break None,
            }
        };
        if command.is_none() && (state.lost || due != Some(state.next)) {
            return None;
        }
        if let Some(Command::RenewFor(lease, _)) = &command {
            state.lease = *lease;
        }
        state.renewing = true;
        let (lease, failures) = (state.lease, state.failures);
        drop(state);
        let kept = self.clone();
        Some(Box::pin(async move {
            let mut in_flight = InFlight(Some(kept));
            let kept = in_flight.0.as_ref().expect("set above").clone();
            let write = kept.target.renew(lease, failures).await;
            in_flight.0 = None;
            kept.finish(lease, write, command);
        }))
    }

    /// Takes the answer of a renewal: answers its command, schedules the next one, lets waiting stops go on.
    fn finish(self: &Arc<Self>, lease: Duration, write: Result<Write, StoreError>, command: Option<Command>) {
        let mut state = lock(&self.state);
        state.renewing = false;
        state.failures = if write.is_err() { state.failures + 1 } else { 0 };
        state.lost |= matches!(write, Ok(Write::Fenced));
        let pause = if write.is_err() { renewal_retry_period(lease) } else { renewal_period(lease) };
        state.next = Instant::now() + pause;
        if let Some(command) = command {
            command.answer(write);
        }
        let Some(keeper) = self.keeper.upgrade() else { return };
        if state.stopped {
            let stops = std::mem::take(&mut state.on_stop);
            drop(state);
            keeper.leave(self.slot);
            for stop in stops {
                let _ = stop.send(());
            }
            return;
        }
        let asked = !state.commands.is_empty();
        let next = (!state.lost).then_some(state.next);
        drop(state);
        if asked {
            keeper.ask(self.clone());
        } else if let Some(next) = next {
            keeper.schedule(next, self.slot);
        }
    }

    /// Renews at once (after any renewal in flight lands) for the current lease, or for `lease` from now on.
    pub(crate) async fn renew(self: &Arc<Self>, lease: Option<Duration>) -> Result<Write, StoreError> {
        let (answer, answered) = oneshot::channel();
        let renewing = {
            let mut state = lock(&self.state);
            if state.stopped || state.lost {
                return Ok(Write::Fenced);
            }
            state.commands.push_back(match lease {
                Some(lease) => Command::RenewFor(lease, answer),
                None => Command::RenewNow(answer),
            });
            state.renewing
        };
        // With a renewal in flight, the command is taken when it lands.
        if !renewing {
            match self.keeper.upgrade() {
                Some(keeper) => keeper.ask(self.clone()),
                None => return Ok(Write::Fenced),
            }
        }
        answered.await.unwrap_or(Ok(Write::Fenced))
    }

    /// Stops renewing, once a renewal in flight (if any) has landed: a renewal landing after the claim's release
    /// could otherwise claim the freed key again. With none in flight (the usual case: the work took less than a
    /// third of the lease) it stops at once, without waiting for anything.
    pub(crate) async fn stop(&self) {
        let landed = {
            let mut state = lock(&self.state);
            state.stopped = true;
            // Dropped unanswered, they answer fenced: the claim is over.
            state.commands.clear();
            if !state.renewing {
                drop(state);
                if let Some(keeper) = self.keeper.upgrade() {
                    keeper.leave(self.slot);
                }
                return;
            }
            let (landed, wait) = oneshot::channel();
            state.on_stop.push(landed);
            wait
        };
        let _ = landed.await;
    }
}

impl Target {
    /// One renewal, given up after one renewal period: a store that hangs must not hold up the next renewal, nor
    /// the completion that waits for this one to land.
    ///
    /// Of failures in a row (retried every [`renewal_retry_period`] while the store is out of reach) only the first
    /// is counted and logged as an error, so an outage does not flood the log with one error per retry per claim.
    async fn renew(&self, lease: Duration, failures: u32) -> Result<Write, StoreError> {
        let renewal = self.store.renew(&self.key, &self.owner, &self.fingerprint, lease);
        let write = match tokio::time::timeout(renewal_period(lease), renewal).await {
            Ok(write) => write,
            Err(_) => Err(StoreError::Unavailable("the lease renewal timed out".into())),
        };
        match &write {
            Err(error) if failures > 0 => {
                tracing::debug!(key = %self.key, %error, failures, "lease renewal failed again");
            }
            Ok(Write::Applied) if failures > 0 => {
                tracing::info!(key = %self.key, failures, "lease renewed again after failed attempts");
            }
            _ => report_write(&*self.metrics, &self.key, "renew", &write),
        }
        write
    }
}
