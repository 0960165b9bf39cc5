//! An in-process store with the same semantics as the Redis store, for tests and single-process apps.

pub(crate) mod builder;
#[cfg(test)]
mod tests;

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record, Stored};
use crate::store::contract::{Claimed, Forgotten, Store, StoreKey, Write};
use crate::store::error::{Cause, StoreError};
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
/// # use idem_runtime as idem;
/// use idem::MemoryStore;
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

impl MemoryStore {
    /// An empty store holding at most `max_entries` keys and `max_bytes` bytes of records (see
    /// [`MemoryStore::builder`]).
    fn bounded(max_entries: usize, max_bytes: usize) -> Self {
        Self { state: Mutex::new(State::default()), max_entries, max_bytes }
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
