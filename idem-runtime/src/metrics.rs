//! Counters a user can read or export: what the engine decided for each request, store failures, fenced writes and
//! how long duplicates waited.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Something the engine counts. Recorded once per request (or plain-API call) for the decision, and once per
/// failed or fenced store write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// A first request: the caller owns the key and runs the work.
    New,
    /// A retry answered from the store (a replayable response or a `not-replayable` refusal): the work did not run.
    Hit,
    /// A duplicate refused with `409 in-progress` (or [`OnceError::InFlight`](crate::once::OnceError::InFlight)) because
    /// the original was still running when its `wait_timeout` ran out.
    Conflict,
    /// A key reused for a different request, refused with `422 key-reused`
    /// (or [`OnceError::Mismatch`](crate::once::OnceError::Mismatch)).
    Mismatch,
    /// A store operation failed (claim, complete, release or lease renewal; renewals that fail in a row, retried
    /// while the store is out of reach, count once).
    StoreError,
    /// An owner-checked write (complete, release, renew) was refused because the claim had expired and the key had
    /// moved on: a stale owner was fenced off.
    Fenced,
    /// A request refused with `503 at-capacity` because the engine already ran as many handlers as
    /// [`max_running_handlers`](crate::IdempotencyBuilder::max_running_handlers) allows; the store was not touched.
    AtCapacity,
}

impl Event {
    /// A stable lower-case name, usable as a metric label: `new`, `hit`, `conflict`, `mismatch`, `store_error`,
    /// `fenced`, `at_capacity`.
    pub const fn name(self) -> &'static str {
        match self {
            Event::New => "new",
            Event::Hit => "hit",
            Event::Conflict => "conflict",
            Event::Mismatch => "mismatch",
            Event::StoreError => "store_error",
            Event::Fenced => "fenced",
            Event::AtCapacity => "at_capacity",
        }
    }
}

/// Where the engine reports what it counts. Install one with
/// [`IdempotencyBuilder::metrics`](crate::IdempotencyBuilder::metrics); the default discards everything.
///
/// Called on the request path: implementations must be cheap and must not block. [`Counters`] is the built-in
/// one; `MetricsFacade` (cargo feature `metrics`) forwards to the [`metrics`](https://docs.rs/metrics) crate.
///
/// ```
/// # use idem_runtime as idem;
/// use idem::metrics::{Event, Metrics};
/// use std::time::Duration;
///
/// /// Logs instead of counting.
/// struct Logged;
///
/// impl Metrics for Logged {
///     fn record(&self, event: Event) {
///         eprintln!("idempotency: {}", event.name());
///     }
///     fn observe_wait(&self, waited: Duration) {
///         eprintln!("idempotency: a duplicate waited {waited:?}");
///     }
/// }
/// ```
pub trait Metrics: Send + Sync + 'static {
    /// Counts one event.
    fn record(&self, event: Event);

    /// Records how long one duplicate waited for an in-flight original (whatever the wait ended in: a replay, a
    /// takeover of a released key, or a conflict). Requests that did not wait are not observed.
    fn observe_wait(&self, waited: Duration);

    /// Counts one event with where it happened: the front door and the route. The engine calls this one; the
    /// default forwards to [`Metrics::record`], for implementations that do not label.
    fn record_at(&self, event: Event, site: &Site<'_>) {
        let _ = site;
        self.record(event);
    }

    /// Records how long one store call took and whether it answered (an error or a timeout did not). Waits for an
    /// in-flight original are not store calls: see [`Metrics::observe_wait`]. The default records nothing.
    fn observe_store(&self, operation: StoreOperation, elapsed: Duration, answered: bool) {
        let _ = (operation, elapsed, answered);
    }
}

/// Where an [`Event`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Site<'a> {
    /// The front door: `handler` (`#[idempotent]`), `layer` or `once`.
    pub door: &'static str,
    /// The route: the matched path template (`/orders/{id}`), `unmatched` outside a router, or the scope of
    /// [`Idempotency::once`](crate::Idempotency::once) work. Bounded by the app's routes and scopes, never a raw
    /// request path.
    pub route: &'a str,
}

/// A [`Store`](crate::store::contract::Store) call, as [`Metrics::observe_store`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOperation {
    /// [`Store::claim`](crate::store::Store::claim): one per first request or replay.
    Claim,
    /// [`Store::complete`](crate::store::Store::complete).
    Complete,
    /// [`Store::release`](crate::store::Store::release).
    Release,
    /// [`Store::renew`](crate::store::Store::renew): lease renewals.
    Renew,
    /// [`Store::inspect`](crate::store::Store::inspect).
    Inspect,
    /// [`Store::forget`](crate::store::Store::forget).
    Forget,
    /// [`Store::ping`](crate::store::Store::ping).
    Ping,
}

impl StoreOperation {
    /// A stable lower-case name, usable as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            StoreOperation::Claim => "claim",
            StoreOperation::Complete => "complete",
            StoreOperation::Release => "release",
            StoreOperation::Renew => "renew",
            StoreOperation::Inspect => "inspect",
            StoreOperation::Forget => "forget",
            StoreOperation::Ping => "ping",
        }
    }
}

impl<M: Metrics + ?Sized> Metrics for std::sync::Arc<M> {
    fn record(&self, event: Event) {
        (**self).record(event);
    }

    fn observe_wait(&self, waited: Duration) {
        (**self).observe_wait(waited);
    }

    fn record_at(&self, event: Event, site: &Site<'_>) {
        (**self).record_at(event, site);
    }

    fn observe_store(&self, operation: StoreOperation, elapsed: Duration, answered: bool) {
        (**self).observe_store(operation, elapsed, answered);
    }
}

/// The engine's metrics seen from one request: every event it records carries the request's [`Site`].
pub(crate) struct Labeled {
    pub(crate) inner: std::sync::Arc<dyn Metrics>,
    pub(crate) door: &'static str,
    pub(crate) route: Box<str>,
}

impl Metrics for Labeled {
    fn record(&self, event: Event) {
        self.inner.record_at(event, &Site { door: self.door, route: &self.route });
    }

    fn observe_wait(&self, waited: Duration) {
        self.inner.observe_wait(waited);
    }

    fn record_at(&self, event: Event, site: &Site<'_>) {
        self.inner.record_at(event, site);
    }

    fn observe_store(&self, operation: StoreOperation, elapsed: Duration, answered: bool) {
        self.inner.observe_store(operation, elapsed, answered);
    }
}

/// The default [`Metrics`]: discards everything.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NoMetrics;

impl Metrics for NoMetrics {
    fn record(&self, _: Event) {}

    fn observe_wait(&self, _: Duration) {}
}

/// Upper bounds of the wait-time histogram's buckets; a last, unbounded bucket follows them.
pub const WAIT_BUCKETS: [Duration; 10] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// In-process [`Metrics`]: lock-free counters and a fixed-bucket wait-time histogram, read with
/// [`Counters::snapshot`].
///
/// Keep an `Arc` to read it, and give the engine a clone:
///
/// ```
/// # use idem_runtime as idem;
/// use idem::{Idempotency, MemoryStore, metrics::Counters};
/// use std::sync::Arc;
///
/// let counters = Arc::new(Counters::new());
/// let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
/// # let _ = idempotency;
/// let snapshot = counters.snapshot();
/// assert_eq!((snapshot.new, snapshot.hit), (0, 0));
/// ```
#[derive(Debug, Default)]
pub struct Counters {
    new: AtomicU64,
    hit: AtomicU64,
    conflict: AtomicU64,
    mismatch: AtomicU64,
    store_errors: AtomicU64,
    fenced: AtomicU64,
    at_capacity: AtomicU64,
    waits: AtomicU64,
    wait_micros: AtomicU64,
    wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
}

impl Counters {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current values. Each counter is read atomically, the set of them is not: a snapshot taken while
    /// requests run may be a few events apart between counters.
    pub fn snapshot(&self) -> Snapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            new: load(&self.new),
            hit: load(&self.hit),
            conflict: load(&self.conflict),
            mismatch: load(&self.mismatch),
            store_errors: load(&self.store_errors),
            fenced: load(&self.fenced),
            at_capacity: load(&self.at_capacity),
            wait: WaitHistogram {
                count: load(&self.waits),
                sum: Duration::from_micros(load(&self.wait_micros)),
                buckets: std::array::from_fn(|index| load(&self.wait_buckets[index])),
            },
        }
    }
}

impl Metrics for Counters {
    fn record(&self, event: Event) {
        let counter = match event {
            Event::New => &self.new,
            Event::Hit => &self.hit,
            Event::Conflict => &self.conflict,
            Event::Mismatch => &self.mismatch,
            Event::StoreError => &self.store_errors,
            Event::Fenced => &self.fenced,
            Event::AtCapacity => &self.at_capacity,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn observe_wait(&self, waited: Duration) {
        let bucket = WAIT_BUCKETS.iter().position(|bound| waited <= *bound).unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.wait_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The values of a [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// First requests: the work ran ([`Event::New`]).
    pub new: u64,
    /// Retries answered from the store ([`Event::Hit`]).
    pub hit: u64,
    /// Duplicates refused while the original ran ([`Event::Conflict`]).
    pub conflict: u64,
    /// Keys reused for a different request ([`Event::Mismatch`]).
    pub mismatch: u64,
    /// Failed store operations ([`Event::StoreError`]).
    pub store_errors: u64,
    /// Stale owners fenced off ([`Event::Fenced`]).
    pub fenced: u64,
    /// Requests refused because the engine ran as many handlers as it may ([`Event::AtCapacity`]).
    pub at_capacity: u64,
    /// How long duplicates waited for an in-flight original.
    pub wait: WaitHistogram,
}

/// A fixed-bucket histogram of wait times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WaitHistogram {
    /// How many waits were observed.
    pub count: u64,
    /// Their total duration (microsecond precision).
    pub sum: Duration,
    /// How many waits fell in each bucket (not cumulative): `buckets[i]` counts waits longer than
    /// `WAIT_BUCKETS[i - 1]` and at most [`WAIT_BUCKETS`]`[i]`; the last counts those longer than every bound.
    pub buckets: [u64; WAIT_BUCKETS.len() + 1],
}

/// Forwards to the [`metrics`](https://docs.rs/metrics) crate's global recorder (Prometheus, StatsD, ... exporters).
///
/// Emits the counter `idem_requests_total` labelled `outcome` = `new` | `hit` | `conflict` | `mismatch` |
/// `at_capacity`, the
/// counters `idem_store_errors_total` and `idem_fenced_writes_total` (each also labelled `door` and `route`, see
/// [`Site`]), the histogram `idem_wait_seconds`, and the histogram `idem_store_seconds` of store calls labelled
/// `operation` (see [`StoreOperation`]) and `outcome` = `answered` | `failed`.
///
/// ```
/// # use idem_runtime as idem;
/// use idem::{Idempotency, MemoryStore, metrics::MetricsFacade};
/// let idempotency = Idempotency::builder(MemoryStore::new()).metrics(MetricsFacade).build();
/// # let _ = idempotency;
/// ```
#[cfg(feature = "metrics")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsFacade;

#[cfg(feature = "metrics")]
impl Metrics for MetricsFacade {
    fn record(&self, event: Event) {
        self.record_at(event, &Site { door: "unknown", route: "unknown" });
    }

    fn record_at(&self, event: Event, site: &Site<'_>) {
        let (door, route) = (site.door, site.route.to_owned());
        match event {
            Event::StoreError => {
                ::metrics::counter!("idem_store_errors_total", "door" => door, "route" => route).increment(1)
            }
            Event::Fenced => {
                ::metrics::counter!("idem_fenced_writes_total", "door" => door, "route" => route).increment(1)
            }
            outcome => {
                ::metrics::counter!("idem_requests_total", "outcome" => outcome.name(), "door" => door, "route" => route)
                    .increment(1)
            }
        }
    }

    fn observe_wait(&self, waited: Duration) {
        ::metrics::histogram!("idem_wait_seconds").record(waited.as_secs_f64());
    }

    fn observe_store(&self, operation: StoreOperation, elapsed: Duration, answered: bool) {
        let outcome = if answered { "answered" } else { "failed" };
        ::metrics::histogram!("idem_store_seconds", "operation" => operation.name(), "outcome" => outcome)
            .record(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
