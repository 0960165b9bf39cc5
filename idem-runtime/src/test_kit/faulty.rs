//! A store wrapper that fails, delays or counts the calls you choose: faults no real backend can be asked to have
//! on cue (a reply lost after the write landed, a renewal that never answers, a store down for renewals only).

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Forgotten, Store, StoreKey, Write};
use crate::store::error::StoreError;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A [`Store`] method, to choose which calls a [`Faulty`] store fails, delays or counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// [`Store::claim`].
    Claim,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::renew`] (the keeper's lease renewals, and [`Fence::is_held`](crate::protocol::Fence::is_held)).
    Renew,
    /// [`Store::wait`].
    Wait,
    /// [`Store::inspect`].
    Inspect,
    /// [`Store::forget`].
    Forget,
    /// [`Store::ping`].
    Ping,
}

impl Operation {
    const ALL: [Operation; 8] = [
        Operation::Claim,
        Operation::Complete,
        Operation::Release,
        Operation::Renew,
        Operation::Wait,
        Operation::Inspect,
        Operation::Forget,
        Operation::Ping,
    ];

    /// Whether the method answers a [`Write`], which [`Fault::Answer`] can stand in for.
    fn answers_a_write(self) -> bool {
        matches!(self, Operation::Complete | Operation::Release | Operation::Renew)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Operation::Claim => "claim",
            Operation::Complete => "complete",
            Operation::Release => "release",
            Operation::Renew => "renew",
            Operation::Wait => "wait",
            Operation::Inspect => "inspect",
            Operation::Forget => "forget",
            Operation::Ping => "ping",
        };
        f.write_str(name)
    }
}

/// What a [`Faulty`] store does with a call instead of passing it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Fails with [`StoreError::Unavailable`] without reaching the store behind: an unreachable backend.
    Unavailable,
    /// Fails with [`StoreError::Corrupt`] without reaching the store behind: a backend holding something that is
    /// not a record.
    Corrupt,
    /// Reaches the store behind, then fails with [`StoreError::Unavailable`]: the write landed but its reply was
    /// lost (a response timeout, a connection that broke just then).
    LostReply,
    /// Sends the call to the store behind twice and answers the second reply: a client that resent a call after a
    /// broken connection, whose first copy had landed.
    Resent,
    /// Waits this long (on Tokio's clock, so a paused test clock skips it), then passes the call through.
    Delay(Duration),
    /// Never answers: a backend that accepted the connection and froze. Only the caller's own deadline ends it.
    Hang,
    /// Answers this [`Write`] without reaching the store behind: for `complete`, `release` and `renew` only.
    /// `Answer(Write::Applied)` on renewals loses them all while the owner believes them (a partitioned client);
    /// `Answer(Write::Fenced)` is what a store says once another caller took the key over.
    Answer(Write),
}

/// Which fault an operation has now, and for how many more calls.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    fault: Option<Fault>,
    /// `None`: every call until [`Faulty::heal`]; `Some(n)`: the next `n` calls.
    remaining: Option<usize>,
}

#[derive(Debug, Default)]
struct Faults {
    slots: Mutex<[Slot; Operation::ALL.len()]>,
    calls: [AtomicUsize; Operation::ALL.len()],
}

/// A [`Store`] in front of another that fails, delays or answers the calls of each [`Operation`] as told (a
/// [`Fault`]), passes the rest through, and counts every call. Clones share their faults and counts, so a test
/// keeps one clone to change faults while the app uses another.
///
/// Faults can change at any time: for every call from now on ([`inject`](Self::inject)) until
/// [`heal`](Self::heal), or for the next few ([`inject_times`](Self::inject_times)).
///
/// ```
/// # use idem_runtime as idem;
/// use idem::test_kit::{Fault, Faulty, Operation};
/// use idem::{Idempotency, MemoryStore};
///
/// let store = Faulty::new(MemoryStore::new());
/// // The next claim lands but its reply is lost; renewals fail until healed.
/// store.inject_times(Operation::Claim, Fault::LostReply, 1).inject(Operation::Renew, Fault::Unavailable);
/// let idempotency = Idempotency::new(store.clone());
/// // ... send requests, then:
/// store.heal(Operation::Renew);
/// assert_eq!(store.calls(Operation::Claim), 0);
/// # let _ = idempotency;
/// ```
#[derive(Debug)]
pub struct Faulty<S> {
    inner: Arc<S>,
    faults: Arc<Faults>,
}

impl<S> Clone for Faulty<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), faults: self.faults.clone() }
    }
}

impl<S: Store> Faulty<S> {
    /// `store` with no faults: every call passes through (and is counted).
    pub fn new(store: S) -> Self {
        Self { inner: Arc::new(store), faults: Arc::default() }
    }

    /// The store behind, to look at what the calls that passed through left there.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Applies `fault` to every call of `operation` from now on, until [`heal`](Self::heal).
    ///
    /// # Panics
    /// If `fault` is [`Fault::Answer`] and `operation` does not answer a [`Write`].
    pub fn inject(&self, operation: Operation, fault: Fault) -> &Self {
        self.set(operation, Slot { fault: Some(fault), remaining: None })
    }

    /// Applies `fault` to the next `times` calls of `operation`; the calls after them pass through.
    ///
    /// # Panics
    /// If `fault` is [`Fault::Answer`] and `operation` does not answer a [`Write`].
    pub fn inject_times(&self, operation: Operation, fault: Fault, times: usize) -> &Self {
        self.set(operation, Slot { fault: (times > 0).then_some(fault), remaining: Some(times) })
    }

    /// Lets the calls of `operation` pass through again.
    pub fn heal(&self, operation: Operation) -> &Self {
        self.set(operation, Slot::default())
    }

    /// Lets every call pass through again.
    pub fn heal_all(&self) -> &Self {
        *self.slots() = Default::default();
        self
    }

    /// How many calls of `operation` were made, faulted or not.
    pub fn calls(&self, operation: Operation) -> usize {
        self.faults.calls[operation as usize].load(Ordering::SeqCst)
    }

    /// How many calls were made, of every operation, faulted or not.
    pub fn total_calls(&self) -> usize {
        Operation::ALL.iter().map(|operation| self.calls(*operation)).sum()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, [Slot; Operation::ALL.len()]> {
        self.faults.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, operation: Operation, slot: Slot) -> &Self {
        if let Some(Fault::Answer(_)) = slot.fault {
            assert!(operation.answers_a_write(), "Fault::Answer stands in for a Write; `{operation}` answers none");
        }
        self.slots()[operation as usize] = slot;
        self
    }

    /// Counts a call of `operation` and takes the fault it gets, if any.
    fn fault(&self, operation: Operation) -> Option<Fault> {
        self.faults.calls[operation as usize].fetch_add(1, Ordering::SeqCst);
        let mut slots = self.slots();
        let slot = &mut slots[operation as usize];
        let fault = slot.fault?;
        if let Some(remaining) = &mut slot.remaining {
            *remaining -= 1;
            if *remaining == 0 {
                *slot = Slot::default();
            }
        }
        Some(fault)
    }

    /// Runs a call of `operation` through its fault; `call` reaches the store behind (twice for [`Fault::Resent`]).
    async fn run<T, F>(&self, operation: Operation, call: impl Fn() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        self.apply(operation, self.fault(operation), call).await
    }

    /// [`run`](Self::run) for a method that answers a [`Write`], which [`Fault::Answer`] stands in for.
    async fn run_write<F>(&self, operation: Operation, call: impl Fn() -> F) -> Result<Write, StoreError>
    where
        F: Future<Output = Result<Write, StoreError>>,
    {
        match self.fault(operation) {
            Some(Fault::Answer(write)) => Ok(write),
            fault => self.apply(operation, fault, call).await,
        }
    }

    async fn apply<T, F>(
        &self,
        operation: Operation,
        fault: Option<Fault>,
        call: impl Fn() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        match fault {
            // `set` refuses `Answer` for the methods that do not answer a `Write`; `run_write` answers it.
            None | Some(Fault::Answer(_)) => call().await,
            Some(Fault::Unavailable) => {
                Err(StoreError::Unavailable(format!("{operation}: unavailable (injected by Faulty)").into()))
            }
            Some(Fault::Corrupt) => {
                Err(StoreError::Corrupt(format!("{operation}: not a record (injected by Faulty)").into()))
            }
            Some(Fault::LostReply) => {
                let _ = call().await;
                Err(StoreError::Unavailable(format!("{operation}: reply lost (injected by Faulty)").into()))
            }
            Some(Fault::Resent) => {
                let _ = call().await;
                call().await
            }
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                call().await
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

#[async_trait::async_trait]
impl<S: Store> Store for Faulty<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        self.run(Operation::Claim, || self.inner.claim(key, fingerprint, owner, lease)).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.run_write(Operation::Complete, || self.inner.complete(key, owner, record, ttl)).await
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.run_write(Operation::Release, || self.inner.release(key, owner)).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        self.run_write(Operation::Renew, || self.inner.renew(key, owner, fingerprint, lease)).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.run(Operation::Wait, || self.inner.wait(key, timeout)).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        self.run(Operation::Inspect, || self.inner.inspect(key)).await
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        self.run(Operation::Forget, || self.inner.forget(key)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(Operation::Ping, || self.inner.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn call() -> (StoreKey, Fingerprint, OwnerToken) {
        (StoreKey::derive(&[b"faulty"]), Fingerprint::builder().field(b"request").finish(), OwnerToken::generate())
    }

    #[tokio::test]
    async fn a_fault_for_some_calls_wears_off_and_every_call_is_counted() {
        let store = Faulty::new(MemoryStore::new());
        let (key, fingerprint, owner) = call();
        store.inject_times(Operation::Claim, Fault::LostReply, 2);
        let lease = Duration::from_secs(5);
        for _ in 0..2 {
            let lost = store.claim(&key, &fingerprint, &owner, lease).await;
            assert!(matches!(lost, Err(StoreError::Unavailable(_))), "{lost:?}");
        }
        // The lost replies' claims landed: the owner's own claim is found again.
        assert_eq!(store.claim(&key, &fingerprint, &owner, lease).await.unwrap(), Claimed::Owned);
        assert_eq!(store.calls(Operation::Claim), 3);

        store.inject(Operation::Renew, Fault::Answer(Write::Fenced));
        assert_eq!(store.renew(&key, &owner, &fingerprint, lease).await.unwrap(), Write::Fenced);
        store.heal(Operation::Renew);
        assert_eq!(store.renew(&key, &owner, &fingerprint, lease).await.unwrap(), Write::Applied);
        store.inject(Operation::Release, Fault::Unavailable);
        assert!(store.release(&key, &owner).await.is_err());
        assert!(matches!(store.inner().inspect(&key).await, Ok(Some(Entry::InFlight { .. }))), "nothing reached it");
        assert_eq!(store.total_calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_call_and_a_hang_never_answers() {
        let store = Faulty::new(MemoryStore::new());
        let (key, fingerprint, owner) = call();
        store.inject(Operation::Claim, Fault::Delay(Duration::from_secs(3)));
        let started = tokio::time::Instant::now();
        store.claim(&key, &fingerprint, &owner, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(3));
        store.inject(Operation::Wait, Fault::Hang);
        let hung = tokio::time::timeout(Duration::from_secs(60), store.wait(&key, Duration::from_millis(1))).await;
        assert!(hung.is_err(), "a hanging call never answers");
    }

    #[test]
    #[should_panic(expected = "`claim` answers none")]
    fn an_answer_is_refused_for_a_call_that_answers_no_write() {
        Faulty::new(MemoryStore::new()).inject(Operation::Claim, Fault::Answer(Write::Applied));
    }
}
