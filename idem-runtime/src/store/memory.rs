//! An in-process store with the same semantics as the Redis store, for tests and single-process apps.

use super::{Cause, Claimed, Forgotten, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Record, Stored};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Bytes charged for an in-flight claim (the key, the token, the bookkeeping).
const CLAIM_WEIGHT: usize = 192;

/// Stale expiry times tolerated beyond one per live slot before the expiry heap is rebuilt (see
/// [`State::set_expiry`]): enough that a store holding few keys does not rebuild on every claim.
const STALE_EXPIRIES_SLACK: usize = 1024;

/// An in-memory [`Store`]: atomic claim-or-read under one lock, owner-checked writes, waiters woken in-process by
/// [`Notify`] (no polling), expiry on [`tokio::time`] (so `#[tokio::test(start_paused = true)]` can advance it).
///
/// It is bounded by a number of entries and a number of bytes. When full:
/// - a **new claim** is refused with [`StoreError::Full`], which the engine answers with `503 store-unavailable`
///   (fail closed, like Redis with `maxmemory-policy noeviction`): nothing unexpired is ever evicted, so a retry
///   can never run a request a second time because its record was pushed out;
/// - a **completed response** that does not fit is kept as not-replayable: its retries get `not-replayable`, never a
///   second execution.
///
/// ```
/// use idem_runtime::MemoryStore;
/// let store = MemoryStore::builder().max_entries(10_000).max_bytes(64 << 20).build();
/// # let _ = store;
/// ```
pub struct MemoryStore {
    state: Mutex<State>,
    max_entries: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct State {
    slots: HashMap<StoreKey, Slot>,
    /// Expiry times, possibly stale (a renewed, completed or released slot leaves its old time behind); checked on
    /// pop, and dropped in bulk by [`State::set_expiry`] once they outnumber the live ones.
    expiries: BinaryHeap<Reverse<(Instant, StoreKey)>>,
    bytes: usize,
}

struct Slot {
    entry: SlotEntry,
    expires_at: Instant,
    weight: usize,
    /// Created when the first waiter arrives.
    waiters: Option<Arc<Notify>>,
}

enum SlotEntry {
    InFlight { owner: OwnerToken, fingerprint: Fingerprint },
    Completed(Record),
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self { max_entries: 100_000, max_bytes: 256 << 20 }
    }
}

impl MemoryStoreBuilder {
    /// The most keys held at once, in flight or completed (default 100 000).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The most bytes of records held at once (default 256 MiB).
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore { state: Mutex::new(State::default()), max_entries: self.max_entries, max_bytes: self.max_bytes }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default bounds (100 000 entries, 256 MiB).
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// Configures bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many unexpired keys are held.
    pub fn len(&self) -> usize {
        let mut state = self.lock();
        state.sweep(Instant::now());
        state.slots.len()
    }

    /// Whether no unexpired key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged against the bound by unexpired keys.
    pub fn bytes(&self) -> usize {
        let mut state = self.lock();
        state.sweep(Instant::now());
        state.bytes
    }

    /// Puts a fresh in-flight claim for `owner` under the free `key`, within the bounds.
    fn insert_claim(
        &self,
        state: &mut State,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        expires_at: Instant,
    ) -> Result<(), StoreError> {
        if state.slots.len() >= self.max_entries {
            // Refused in process: nothing to undo (see `Cause::unsent`).
            return Err(StoreError::Full(Cause::unsent(format!("{} entries held (max_entries)", state.slots.len()))));
        }
        if state.bytes + CLAIM_WEIGHT > self.max_bytes {
            return Err(StoreError::Full(Cause::unsent(format!(
                "{} bytes held (max_bytes = {})",
                state.bytes, self.max_bytes
            ))));
        }
        let entry = SlotEntry::InFlight { owner: owner.clone(), fingerprint: *fingerprint };
        state.bytes += CLAIM_WEIGHT;
        state.slots.insert(key.clone(), Slot { entry, expires_at, weight: CLAIM_WEIGHT, waiters: None });
        state.set_expiry(key, expires_at);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code under this lock can panic midway through a change, so a poisoned lock still holds whole data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Drops every slot whose time has come.
    fn sweep(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.expiries.pop() else { break };
            if self.slots.get(&key).is_some_and(|slot| slot.expires_at == at) {
                self.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &StoreKey) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.bytes -= slot.weight;
        if let Some(waiters) = &slot.waiters {
            waiters.notify_waiters();
        }
        Some(slot)
    }

    /// The live slot under `key`, if it is owned by `owner`.
    fn owned(&mut self, key: &StoreKey, owner: &OwnerToken, now: Instant) -> Option<&mut Slot> {
        self.sweep(now);
        self.slots
            .get_mut(key)
            .filter(|slot| matches!(&slot.entry, SlotEntry::InFlight { owner: held, .. } if held == owner))
    }

    fn set_expiry(&mut self, key: &StoreKey, at: Instant) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.expires_at = at;
            self.expiries.push(Reverse((at, key.clone())));
        }
        // A stale time stays until it comes due, a whole lease later: a flood of claims that are released at once
        // (failing or rejected requests, each with a fresh key) would otherwise grow the heap without bound while
        // the store holds nothing. Rebuilding it from the live slots once stale times are the majority keeps it
        // within twice the entry bound, at an amortised cost of one slot per push.
        if self.expiries.len() > 2 * self.slots.len() + STALE_EXPIRIES_SLACK {
            self.expiries = self.slots.iter().map(|(key, slot)| Reverse((slot.expires_at, key.clone()))).collect();
        }
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        if let Some(slot) = state.slots.get(key) {
            return match &slot.entry {
                SlotEntry::InFlight { owner: held, .. } if held == owner => {
                    state.set_expiry(key, now + lease);
                    Ok(Claimed::Owned)
                }
                SlotEntry::InFlight { fingerprint, .. } => {
                    Ok(Claimed::Existing(Entry::InFlight { fingerprint: *fingerprint }))
                }
                SlotEntry::Completed(record) => Ok(Claimed::Existing(Entry::Completed(record.clone()))),
            };
        }
        self.insert_claim(&mut state, key, fingerprint, owner, now + lease)?;
        Ok(Claimed::Owned)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        match state.slots.get(key).map(|slot| &slot.entry) {
            Some(SlotEntry::InFlight { owner: held, .. }) if held == owner => {}
            Some(_) => return Ok(Write::Fenced),
            // The lease ran out and nobody claimed the key since: nobody else ran the request, so record it.
            None => self.insert_claim(&mut state, key, &record.fingerprint, owner, now)?,
        }
        let bytes_held = state.bytes;
        let Some(slot) = state.slots.get_mut(key) else { return Ok(Write::Fenced) };
        let mut weight = record.weight();
        let record = if bytes_held - slot.weight + weight > self.max_bytes {
            tracing::warn!(key = %key, bytes = weight, "memory store full: keeping the record as not-replayable");
            let status = match &record.stored {
                Stored::Response(response) => response.status,
                Stored::NotReplayable { status } => *status,
            };
            let record = Record { fingerprint: record.fingerprint, stored: Stored::NotReplayable { status } };
            weight = record.weight();
            record
        } else {
            record.clone()
        };
        let old_weight = std::mem::replace(&mut slot.weight, weight);
        slot.entry = SlotEntry::Completed(record);
        if let Some(waiters) = slot.waiters.take() {
            waiters.notify_waiters();
        }
        state.bytes = state.bytes - old_weight + weight;
        state.set_expiry(key, now + ttl);
        Ok(Write::Applied)
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        let mut state = self.lock();
        if state.owned(key, owner, Instant::now()).is_none() {
            return Ok(Write::Fenced);
        }
        state.remove(key);
        Ok(Write::Applied)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        match state.slots.get(key).map(|slot| &slot.entry) {
            Some(SlotEntry::InFlight { owner: held, .. }) if held == owner => state.set_expiry(key, now + lease),
            Some(_) => return Ok(Write::Fenced),
            None => self.insert_claim(&mut state, key, fingerprint, owner, now + lease)?,
        }
        Ok(Write::Applied)
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let mut state = self.lock();
        state.sweep(Instant::now());
        Ok(state.slots.get(key).map(|slot| match &slot.entry {
            SlotEntry::InFlight { fingerprint, .. } => Entry::InFlight { fingerprint: *fingerprint },
            SlotEntry::Completed(record) => Entry::Completed(record.clone()),
        }))
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let mut state = self.lock();
        state.sweep(Instant::now());
        match state.slots.get(key).map(|slot| matches!(slot.entry, SlotEntry::InFlight { .. })) {
            None => Ok(Forgotten::Absent),
            Some(true) => Ok(Forgotten::InFlight),
            Some(false) => {
                state.remove(key);
                Ok(Forgotten::Removed)
            }
        }
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (notified, expires_at) = {
            let mut state = self.lock();
            state.sweep(now);
            let Some(slot) = state.slots.get_mut(key) else { return Ok(()) };
            if !matches!(slot.entry, SlotEntry::InFlight { .. }) {
                return Ok(());
            }
            let waiters = slot.waiters.get_or_insert_with(|| Arc::new(Notify::new())).clone();
            // Registered before the lock is dropped: a completion that follows cannot be missed.
            let mut notified = Box::pin(waiters.notified_owned());
            notified.as_mut().enable();
            (notified, slot.expires_at)
        };
        // A lease that runs out with nobody completing also ends the wait.
        let until = expires_at.min(now + timeout);
        let _ = tokio::time::timeout_at(until, notified).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredResponse;
    use bytes::Bytes;

    fn key(name: &str) -> StoreKey {
        StoreKey::from_digest(name.to_owned())
    }

    fn fp(text: &str) -> Fingerprint {
        Fingerprint::builder().field(text.as_bytes()).finish()
    }

    fn record(body: &'static [u8]) -> Record {
        Record {
            fingerprint: fp("a"),
            stored: Stored::Response(StoredResponse {
                status: 201,
                headers: vec![("x".into(), Bytes::from_static(b"1"))],
                body: Bytes::from_static(body),
            }),
        }
    }

    /// Claims with a fresh owner token: the token, and what the store answered.
    async fn claim(store: &MemoryStore, name: &str, fingerprint: &str, lease: Duration) -> (OwnerToken, Claimed) {
        let owner = OwnerToken::generate();
        let claimed = store.claim(&key(name), &fp(fingerprint), &owner, lease).await.unwrap();
        (owner, claimed)
    }

    async fn owned(store: &MemoryStore, name: &str, fingerprint: &str, lease: Duration) -> OwnerToken {
        match claim(store, name, fingerprint, lease).await {
            (owner, Claimed::Owned) => owner,
            (_, other) => panic!("expected to own the claim, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_is_exclusive_until_the_lease_runs_out() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(30);
        owned(&store, "k", "a", lease).await;
        assert_eq!(claim(&store, "k", "b", lease).await.1, Claimed::Existing(Entry::InFlight { fingerprint: fp("a") }));
        tokio::time::advance(Duration::from_secs(31)).await;
        owned(&store, "k", "b", lease).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_owner_is_fenced_and_changes_nothing() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(1);
        let stale = owned(&store, "k", "a", lease).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let fresh = owned(&store, "k", "a", lease).await;
        let ttl = Duration::from_secs(60);
        assert_eq!(store.complete(&key("k"), &stale, &record(b"old"), ttl).await.unwrap(), Write::Fenced);
        assert_eq!(store.release(&key("k"), &stale).await.unwrap(), Write::Fenced);
        assert_eq!(store.renew(&key("k"), &stale, &fp("a"), lease).await.unwrap(), Write::Fenced);
        assert_eq!(store.complete(&key("k"), &fresh, &record(b"new"), ttl).await.unwrap(), Write::Applied);
        assert_eq!(claim(&store, "k", "a", lease).await.1, Claimed::Existing(Entry::Completed(record(b"new"))));
    }

    #[tokio::test(start_paused = true)]
    async fn completed_records_expire_after_their_ttl() {
        let store = MemoryStore::new();
        let owner = owned(&store, "k", "a", Duration::from_secs(5)).await;
        store.complete(&key("k"), &owner, &record(b"x"), Duration::from_secs(60)).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(claim(&store, "k", "a", Duration::from_secs(5)).await.1, Claimed::Existing(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        owned(&store, "k", "a", Duration::from_secs(5)).await;
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_extends_the_lease() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(10);
        let owner = owned(&store, "k", "a", lease).await;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(8)).await;
            assert_eq!(store.renew(&key("k"), &owner, &fp("a"), lease).await.unwrap(), Write::Applied);
        }
        assert!(matches!(claim(&store, "k", "a", lease).await.1, Claimed::Existing(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_on_completion_not_on_timeout() {
        let store = Arc::new(MemoryStore::new());
        let owner = owned(&store, "k", "a", Duration::from_secs(30)).await;
        let started = Instant::now();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait(&key("k"), Duration::from_secs(20)).await.map(|()| started.elapsed()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.complete(&key("k"), &owner, &record(b"x"), Duration::from_secs(60)).await.unwrap();
        let waited = waiter.await.unwrap().unwrap();
        assert_eq!(waited, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_lease_runs_out() {
        let store = MemoryStore::new();
        owned(&store, "k", "a", Duration::from_secs(3)).await;
        let started = Instant::now();
        store.wait(&key("k"), Duration::from_secs(20)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_claims_but_keeps_what_it_holds() {
        let store = MemoryStore::builder().max_entries(2).build();
        let lease = Duration::from_secs(30);
        owned(&store, "a", "a", lease).await;
        owned(&store, "b", "a", lease).await;
        assert!(matches!(
            store.claim(&key("c"), &fp("a"), &OwnerToken::generate(), lease).await,
            Err(StoreError::Full(_))
        ));
        assert!(matches!(claim(&store, "a", "a", lease).await.1, Claimed::Existing(_)));
    }

    #[tokio::test]
    async fn claims_released_at_once_leave_no_expiry_times_behind() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(30);
        let held = owned(&store, "held", "a", lease).await;
        for index in 0..20_000 {
            let owner = owned(&store, &format!("churn-{index}"), "a", lease).await;
            assert_eq!(store.release(&key(&format!("churn-{index}")), &owner).await.unwrap(), Write::Applied);
        }
        let (slots, expiries) = {
            let state = store.lock();
            (state.slots.len(), state.expiries.len())
        };
        assert_eq!(slots, 1);
        assert!(expiries <= 2 + STALE_EXPIRIES_SLACK, "{expiries} expiry times kept");
        assert_eq!(store.release(&key("held"), &held).await.unwrap(), Write::Applied, "the live key is intact");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_expiry_heap_still_expires_every_live_key() {
        let store = MemoryStore::new();
        let short = owned(&store, "short", "a", Duration::from_secs(5)).await;
        store.complete(&key("short"), &short, &record(b"x"), Duration::from_secs(10)).await.unwrap();
        owned(&store, "long", "a", Duration::from_secs(60)).await;
        for index in 0..(3 * STALE_EXPIRIES_SLACK) {
            let owner = owned(&store, &format!("churn-{index}"), "a", Duration::from_secs(30)).await;
            store.release(&key(&format!("churn-{index}")), &owner).await.unwrap();
        }
        assert_eq!(store.len(), 2);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(store.len(), 1, "the completed record expired after its ttl");
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(store.is_empty(), "the claim expired after its lease");
    }

    #[tokio::test]
    async fn a_record_too_large_for_the_bound_is_kept_as_not_replayable() {
        let store = MemoryStore::builder().max_bytes(1024).build();
        let owner = owned(&store, "k", "a", Duration::from_secs(30)).await;
        let big = Record {
            fingerprint: fp("a"),
            stored: Stored::Response(StoredResponse { status: 200, headers: vec![], body: vec![0u8; 4096].into() }),
        };
        assert_eq!(store.complete(&key("k"), &owner, &big, Duration::from_secs(60)).await.unwrap(), Write::Applied);
        assert_eq!(
            claim(&store, "k", "a", Duration::from_secs(30)).await.1,
            Claimed::Existing(Entry::Completed(Record {
                fingerprint: fp("a"),
                stored: Stored::NotReplayable { status: 200 }
            }))
        );
        assert!(store.bytes() <= 1024);
    }
}
