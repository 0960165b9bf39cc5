//! A store of your own: `cargo run --example custom_store`.
//!
//! [`HashMapStore`] keeps claims and records in a `HashMap` behind one lock, written from the [`Store`] contract
//! alone; `tests/custom_store.rs` checks it with idem's test kit (feature `test-kit`):
//!
//! ```text
//! idem::test_kit::conformance_tests!(hash_map_store, || async { HashMapStore::default() });
//! ```
//!
//! `main` puts it behind an `#[idempotent]` handler and sends the same request twice: the handler runs once.
//! A real backend (a database, a cache) keeps the same shape: each method one atomic step on the backend, the owner
//! token checked inside that step, expiry left to the backend where it has it, and a notification to wake waiters.

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::store::{Claimed, Entry, Fingerprint, OwnerToken, Record, Store, StoreError, StoreKey, Write};
use idem::{Idempotency, idempotent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
// `tokio::time`, not `std::time`: tests with `#[tokio::test(start_paused = true)]` can then move leases forward.
use tokio::time::Instant;

/// Claims and completed records in memory, with the semantics the engine relies on.
#[derive(Default)]
pub struct HashMapStore {
    entries: Mutex<HashMap<StoreKey, Held>>,
    /// Signalled on every completion and release. One for all keys keeps it simple: a waiter woken for another
    /// key looks, finds its own still in flight, and waits again.
    changed: Notify,
}

struct Held {
    slot: Slot,
    expires_at: Instant,
}

enum Slot {
    InFlight { owner: OwnerToken, fingerprint: Fingerprint },
    Completed(Record),
}

impl HashMapStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<StoreKey, Held>> {
        // Nothing under this lock panics halfway through a change, so a poisoned lock still holds whole data.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What `key` holds now: an entry whose time is up is gone (a lapsed lease frees its key).
fn live<'a>(entries: &'a mut HashMap<StoreKey, Held>, key: &StoreKey, now: Instant) -> Option<&'a mut Held> {
    if entries.get(key).is_some_and(|held| held.expires_at <= now) {
        entries.remove(key);
    }
    entries.get_mut(key)
}

fn owned_by(held: &Held, owner: &OwnerToken) -> bool {
    matches!(&held.slot, Slot::InFlight { owner: holder, .. } if holder == owner)
}

// `idem::store::async_trait` is the attribute `Store` is declared with: no version of your own to keep in step.
#[idem::store::async_trait]
impl Store for HashMapStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let now = Instant::now();
        let mut entries = self.lock();
        // Drops what expired, so keys nobody asks for again do not pile up. O(n) per claim is fine here; a real
        // store indexes expiry times or lets its backend expire keys.
        entries.retain(|_, held| held.expires_at > now);
        let Some(held) = entries.get_mut(key) else {
            let slot = Slot::InFlight { owner: owner.clone(), fingerprint: *fingerprint };
            entries.insert(key.clone(), Held { slot, expires_at: now + lease });
            return Ok(Claimed::Owned);
        };
        Ok(match &held.slot {
            // The same owner sending its claim again (its reply was lost): still its claim, the lease restarts.
            Slot::InFlight { owner: holder, .. } if holder == owner => {
                held.expires_at = now + lease;
                Claimed::Owned
            }
            Slot::InFlight { fingerprint, .. } => Claimed::Existing(Entry::InFlight { fingerprint: *fingerprint }),
            Slot::Completed(record) => Claimed::Existing(Entry::Completed(record.clone())),
        })
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let now = Instant::now();
        let mut entries = self.lock();
        // A key that is free (the lease ran out, nobody claimed it since) is completed too: nobody else ran the
        // request. Another owner's claim, or a record already there, is never overwritten.
        if live(&mut entries, key, now).is_some_and(|held| !owned_by(held, owner)) {
            return Ok(Write::Fenced);
        }
        entries.insert(key.clone(), Held { slot: Slot::Completed(record.clone()), expires_at: now + ttl });
        drop(entries);
        self.changed.notify_waiters();
        Ok(Write::Applied)
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        let mut entries = self.lock();
        if !live(&mut entries, key, Instant::now()).is_some_and(|held| owned_by(held, owner)) {
            return Ok(Write::Fenced);
        }
        entries.remove(key);
        drop(entries);
        self.changed.notify_waiters();
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
        let mut entries = self.lock();
        match live(&mut entries, key, now) {
            Some(held) if owned_by(held, owner) => held.expires_at = now + lease,
            Some(_) => return Ok(Write::Fenced),
            // The lease ran out while the owner could not renew, and nobody took the key: it is the owner's again.
            None => {
                let slot = Slot::InFlight { owner: owner.clone(), fingerprint: *fingerprint };
                entries.insert(key.clone(), Held { slot, expires_at: now + lease });
            }
        }
        Ok(Write::Applied)
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before looking: a completion between the look and the await still wakes this waiter.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lease_ends = match live(&mut self.lock(), key, Instant::now()) {
                Some(Held { slot: Slot::InFlight { .. }, expires_at }) => *expires_at,
                _ => return Ok(()),
            };
            if Instant::now() >= deadline {
                return Ok(());
            }
            // A lease that runs out with nobody completing also ends the wait (the loop looks again, in case it
            // was renewed meanwhile).
            let _ = tokio::time::timeout_at(lease_ends.min(deadline), notified).await;
        }
    }
}

#[derive(Clone)]
struct AppState {
    idempotency: Idempotency,
    orders: Arc<AtomicU64>,
}

impl FromRef<AppState> for Idempotency {
    fn from_ref(state: &AppState) -> Self {
        state.idempotency.clone()
    }
}

#[idempotent]
async fn create_order(State(state): State<AppState>) -> (StatusCode, String) {
    let id = state.orders.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("order {id}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use tower::ServiceExt;

    let state = AppState { idempotency: Idempotency::new(HashMapStore::default()), orders: Arc::default() };
    let app = Router::new().route("/orders", post(create_order)).with_state(state.clone());
    for attempt in ["first", "retry"] {
        let request = Request::post("/orders").header("idempotency-key", "order-1").body(Body::empty())?;
        let response = app.clone().oneshot(request).await?;
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = axum::body::to_bytes(response.into_body(), 1024).await?;
        println!("{attempt}: {status} {:?} (replayed: {replayed})", String::from_utf8_lossy(&body));
    }
    println!("orders created: {}", state.orders.load(Ordering::SeqCst));
    Ok(())
}
