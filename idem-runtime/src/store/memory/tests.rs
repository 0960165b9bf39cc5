//! The in-memory store's own cases: expiry, bounds, owners, waiters.

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record, Stored, StoredResponse};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use crate::store::error::StoreError;
use crate::store::memory::{MemoryStore, STALE_EXPIRIES_SLACK};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

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
    assert!(matches!(store.claim(&key("c"), &fp("a"), &OwnerToken::generate(), lease).await, Err(StoreError::Full(_))));
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
