//! Owner-checked writes finished in the background, on one task per engine: a completion or release the store
//! could not take, the release of a claim dropped by its caller, and a claim whose caller stopped waiting for it.
//!
//! Each such write is needed: without the completion a retry after the lease runs the work again; without the
//! release duplicates are refused `409 in-progress` for a whole lease with nobody running the request. But they are
//! bounded: one task drives them all, at most [`MAX_WRITES`] at a time (beyond that a release is dropped, its claim
//! frees itself when its lease ends), and a call that never left this process (the store knew it was down) leaves
//! nothing behind.

use crate::drain::{Running, RunningTask};
use crate::metrics::Metrics;
use crate::protocol::keeper::Lease;
use crate::protocol::report::report_write;
use crate::record::{OwnerToken, Record};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use crate::store::error::StoreError;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// How many background writes an engine holds at most. Past it, new releases are dropped (logged): each claim
/// frees itself when its lease runs out, and a store that is down that long is reported by every request anyway.
pub(crate) const MAX_WRITES: usize = 4096;

/// The first pause before a failed write is sent again, doubled per failure up to [`WRITE_RETRY_LAST`].
const WRITE_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two attempts of a failed write: a store back from an outage gets it within about this
/// long.
const WRITE_RETRY_LAST: Duration = Duration::from_secs(1);

/// A claim call whose caller may stop waiting for it, owning everything it needs.
pub(crate) type ClaimCall = Pin<Box<dyn Future<Output = Result<Claimed, StoreError>> + Send>>;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The background writes of one engine, and the task that sends them.
pub(crate) struct Writes {
    queue: Mutex<Queue>,
    /// Each write is counted here until it ends, for [`Idempotency::drain`](crate::Idempotency::drain).
    running: Arc<Running>,
}

#[derive(Default)]
struct Queue {
    /// Writes the task has not taken yet.
    incoming: Vec<Job>,
    /// Writes not yet ended, taken or not.
    held: usize,
    driven: bool,
    waker: Option<Waker>,
}

/// An owner-checked write.
pub(crate) enum Pending {
    /// The work ran and its answer went out: its record must still land, or after the lease a retry runs it again.
    Complete { record: Record, ttl: Duration },
    /// The work failed or was abandoned: the key must be freed, or duplicates are refused until the lease runs out.
    Release,
}

impl Pending {
    fn operation(&self) -> &'static str {
        match self {
            Pending::Complete { .. } => "complete",
            Pending::Release => "release",
        }
    }
}

/// Who a background write is for.
pub(crate) struct Owned {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Arc<dyn Metrics>,
    pub(crate) key: StoreKey,
    pub(crate) owner: OwnerToken,
}

impl Writes {
    pub(crate) fn new(running: Arc<Running>) -> Self {
        Self { queue: Mutex::default(), running }
    }

    /// Sends `write` again until the store takes it (or fences it: someone else claimed the key once the lease ran
    /// out) or `useful_for` has passed (the record would have expired, or the claim lapsed by itself).
    pub(crate) fn retry(self: &Arc<Self>, owned: Owned, write: Pending, useful_for: Duration) {
        tracing::warn!(
            key = %owned.key,
            operation = write.operation(),
            "write failed: retrying in the background until the store is back"
        );
        let give_up = Instant::now() + useful_for;
        self.push(write.operation(), async move {
            tokio::time::sleep(WRITE_RETRY_FIRST).await;
            resend(&owned, &write, give_up).await;
        });
    }

    /// Releases the claim of a caller that went away (a dropped [`Claim`](super::Claim)), once the renewal in
    /// flight (if any) has landed.
    pub(crate) fn release_dropped(self: &Arc<Self>, owned: Owned, kept: Option<Arc<Lease>>, lease: Duration) {
        let give_up = Instant::now() + lease;
        self.push("release", async move {
            if let Some(kept) = kept {
                kept.stop().await;
            }
            let write = owned.store.release(&owned.key, &owned.owner).await;
            report_write(&*owned.metrics, &owned.key, "release", &write);
            if let Err(StoreError::Unavailable(_)) = write {
                resend(&owned, &Pending::Release, give_up).await;
            }
        });
    }

    /// Finishes a claim call whose caller stopped waiting for it (a client gone, a timeout, a `select!`), then gives
    /// the key up if the claim took it: otherwise a claim that lands later holds the key for a whole lease with
    /// nobody running the request.
    pub(crate) fn finish_claim(self: &Arc<Self>, owned: Owned, call: ClaimCall, lease: Duration) {
        let give_up = Instant::now() + lease;
        self.push("release", async move {
            match call.await {
                Ok(Claimed::Owned) => {}
                // Someone else's claim or record: nothing of ours to undo.
                Ok(Claimed::Existing(_)) => return,
                Err(error) if error.is_unsent() => return,
                Err(StoreError::Unavailable(_)) => {}
                Err(_) => return,
            }
            release_lost(&owned, give_up).await;
        });
    }

    /// Releases a claim whose call failed, in case it took effect with only its reply lost. A call that never left
    /// this process (the store knew it was down) took no effect: nothing is left to do.
    pub(crate) fn release_failed_claim(self: &Arc<Self>, owned: Owned, error: &StoreError, lease: Duration) {
        if error.is_unsent() {
            return;
        }
        let give_up = Instant::now() + lease;
        self.push("release", async move { release_lost(&owned, give_up).await });
    }

    fn push(self: &Arc<Self>, operation: &'static str, job: impl Future<Output = ()> + Send + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut queue = lock(&self.queue);
        if queue.held >= MAX_WRITES {
            drop(queue);
            tracing::error!(
                operation,
                limit = MAX_WRITES,
                "too many idempotency store writes waiting in the background: this one is dropped (a claim left in \
                 flight frees itself when its lease ends; a completion dropped lets a retry after the lease run again)"
            );
            return;
        }
        queue.held += 1;
        // The count ends with the job, whatever ends it.
        let counted: RunningTask = self.running.enter();
        queue.incoming.push(Box::pin(async move {
            let _counted = counted;
            job.await;
        }));
        if queue.driven {
            let waker = queue.waker.take();
            drop(queue);
            if let Some(waker) = waker {
                waker.wake();
            }
            return;
        }
        queue.driven = true;
        drop(queue);
        let driver = Driver { writes: self.clone(), sending: FuturesUnordered::new() };
        runtime.spawn(driver.instrument(tracing::Span::none()));
    }
}

/// How a resent write reports a fenced answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// A write of a claim known to have landed: fenced means it came too late (warned).
    Reported,
    /// The release of a claim that most likely never landed: fenced is the usual answer (not reported).
    Quiet,
}

/// Sends `write` again, backing off, until the store takes or fences it, or `give_up` has passed.
async fn resend(owned: &Owned, write: &Pending, give_up: Instant) {
    resend_as(owned, write, give_up, Lost::Reported).await;
}

async fn resend_as(owned: &Owned, write: &Pending, give_up: Instant, lost: Lost) {
    let operation = write.operation();
    let mut pause = WRITE_RETRY_FIRST;
    loop {
        let sent = match write {
            Pending::Complete { record, ttl } => owned.store.complete(&owned.key, &owned.owner, record, *ttl).await,
            Pending::Release => owned.store.release(&owned.key, &owned.owner).await,
        };
        match sent {
            Ok(Write::Applied) => {
                tracing::info!(key = %owned.key, operation, "write retried: it landed");
                return;
            }
            Ok(Write::Fenced) if lost == Lost::Quiet => return,
            Ok(Write::Fenced) => {
                tracing::warn!(
                    key = %owned.key,
                    operation,
                    "write retried too late: the key was claimed again after the lease ran out"
                );
                return;
            }
            Err(StoreError::Unavailable(_)) if Instant::now() < give_up => {}
            Err(error) => {
                tracing::error!(key = %owned.key, operation, %error, "write retry given up");
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WRITE_RETRY_LAST);
    }
}

/// Releases a claim that may or may not have landed, retried while the store is out of reach (a claim that sat in
/// a frozen server's socket takes effect when the server resumes). A release deletes nothing but the owner's own
/// claim, so it is harmless when the claim never landed: that usual case (fenced) is not reported.
async fn release_lost(owned: &Owned, give_up: Instant) {
    resend_as(owned, &Pending::Release, give_up, Lost::Quiet).await;
}

/// The task sending an engine's background writes; ends when none is left.
struct Driver {
    writes: Arc<Writes>,
    sending: FuturesUnordered<Job>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            let mut ended = 0;
            while let Poll::Ready(Some(())) = this.sending.poll_next_unpin(cx) {
                ended += 1;
            }
            let mut queue = lock(&this.writes.queue);
            queue.held -= ended;
            if queue.incoming.is_empty() {
                if this.sending.is_empty() {
                    queue.driven = false;
                    queue.waker = None;
                    return Poll::Ready(());
                }
                if !queue.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                    queue.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let incoming = std::mem::take(&mut queue.incoming);
            drop(queue);
            this.sending.extend(incoming);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Dropped with its runtime: the writes it held are gone with it.
        let mut queue = lock(&self.writes.queue);
        queue.driven = false;
        queue.held = queue.incoming.len();
    }
}
