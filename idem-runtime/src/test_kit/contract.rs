//! The [`Store`] contract, called directly: what the engine relies on and the behaviour table cannot show, because
//! its handlers never outlive a lease. Leases here last a few hundred milliseconds and the cases sleep past them,
//! with wide margins: a case never depends on how fast a busy machine runs, only on time having passed.

use super::client::fresh_key;
use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record, Stored, StoredResponse};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Long enough that no case outlives it by accident.
const HELD: Duration = Duration::from_secs(60);
/// Short enough to outlive: the cases sleep [`PAST_THE_LEASE`] after claiming with it.
const SHORT_LEASE: Duration = Duration::from_millis(300);
const PAST_THE_LEASE: Duration = Duration::from_millis(900);
/// How soon a waiter must answer once what it waits for happened: far below its own timeout ([`HELD`]), so an
/// answer by timeout is told apart from an answer by notification, and far above any scheduling delay.
const WOKEN_WITHIN: Duration = Duration::from_secs(5);

fn key(label: &str) -> StoreKey {
    StoreKey::derive(&[b"idem-test-kit", fresh_key(label).as_bytes()])
}

fn fingerprint(text: &str) -> Fingerprint {
    Fingerprint::builder().field(text.as_bytes()).finish()
}

/// A record with what a store must keep exactly: repeated header names in order, a non-UTF-8 value, every byte.
fn record(label: &str) -> Record {
    Record {
        fingerprint: fingerprint("request"),
        stored: Stored::Response(StoredResponse {
            status: 201,
            headers: vec![
                ("content-type".to_owned(), Bytes::from_static(b"application/json")),
                ("x-multi".to_owned(), Bytes::from_static(b"first")),
                ("x-multi".to_owned(), Bytes::from_static(b"second")),
                ("x-raw".to_owned(), Bytes::from_static(&[b'r', 0xff, 0x80, b'w'])),
            ],
            body: Bytes::from(format!("{label}:").into_bytes().into_iter().chain(0..=255u8).collect::<Vec<u8>>()),
        }),
    }
}

/// Claims `key` with a new owner, which it returns; panics unless the claim was granted.
async fn owned(store: &impl Store, key: &StoreKey, lease: Duration) -> OwnerToken {
    let owner = OwnerToken::generate();
    match store.claim(key, &fingerprint("request"), &owner, lease).await {
        Ok(Claimed::Owned) => owner,
        other => panic!("a claim on a free key must be granted (Owned), got {other:?}"),
    }
}

/// What a newcomer's claim on `key` answers.
async fn seen_by_another(store: &impl Store, key: &StoreKey) -> Claimed {
    store.claim(key, &fingerprint("request"), &OwnerToken::generate(), HELD).await.expect("claim")
}

fn in_flight() -> Claimed {
    Claimed::Existing(Entry::InFlight { fingerprint: fingerprint("request") })
}

/// Spawns `store.wait(key, HELD)`; the handle answers how long it waited.
fn spawn_waiter<S: Store>(store: &Arc<S>, key: &StoreKey) -> tokio::task::JoinHandle<Duration> {
    let (store, key) = (store.clone(), key.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        store.wait(&key, HELD).await.expect("wait");
        started.elapsed()
    })
}

/// Awaits a waiter that something should have woken; panics if it is still waiting after [`WOKEN_WITHIN`].
async fn woken(waiter: tokio::task::JoinHandle<Duration>, by: &str) {
    let waited = tokio::time::timeout(WOKEN_WITHIN, waiter)
        .await
        .unwrap_or_else(|_| panic!("a waiter was still waiting {WOKEN_WITHIN:?} after {by}"))
        .expect("the waiter task");
    assert!(waited < WOKEN_WITHIN, "the waiter answered {waited:?} after it started, not woken by {by}");
}

/// A claim on a free key is granted; anyone else then sees it in flight, with its fingerprint; its owner sending
/// the same claim again (a reply lost on the way) is granted again.
pub async fn a_claim_is_exclusive_and_its_owner_may_send_it_again(store: impl Store) {
    let key = key("exclusive");
    let owner = owned(&store, &key, HELD).await;
    assert_eq!(seen_by_another(&store, &key).await, in_flight(), "a second owner is turned away");
    let resent = store.claim(&key, &fingerprint("request"), &owner, HELD).await.expect("claim");
    assert_eq!(resent, Claimed::Owned, "a claim resent by its owner is the same claim");
    assert_eq!(seen_by_another(&store, &key).await, in_flight(), "still exclusive after the resend");
}

/// `complete` replaces the claim with the record, which every later claim gets back exactly as stored; the key
/// then takes no other write.
pub async fn a_completed_record_is_returned_to_every_later_claim_as_it_was_stored(store: impl Store) {
    let key = key("completed");
    let owner = owned(&store, &key, HELD).await;
    assert_eq!(store.complete(&key, &owner, &record("kept"), HELD).await.expect("complete"), Write::Applied);
    for _ in 0..2 {
        assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("kept"))));
    }
    let again = store.complete(&key, &owner, &record("second"), HELD).await.expect("complete");
    assert_eq!(again, Write::Fenced, "a completed record is never overwritten, even by its owner");
    assert_eq!(store.release(&key, &owner).await.expect("release"), Write::Fenced, "nor released");
    assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("kept"))));
}

/// `complete`, `renew` and `release` by anyone but the owner do nothing; the owner's claim stands.
pub async fn writes_by_another_owner_are_fenced_and_change_nothing(store: impl Store) {
    let key = key("fenced");
    let owner = owned(&store, &key, HELD).await;
    let stranger = OwnerToken::generate();
    assert_eq!(store.complete(&key, &stranger, &record("stranger"), HELD).await.expect("complete"), Write::Fenced);
    assert_eq!(store.renew(&key, &stranger, &fingerprint("other"), HELD).await.expect("renew"), Write::Fenced);
    assert_eq!(store.release(&key, &stranger).await.expect("release"), Write::Fenced);
    assert_eq!(seen_by_another(&store, &key).await, in_flight(), "the owner's claim is untouched");
    assert_eq!(store.complete(&key, &owner, &record("owner"), HELD).await.expect("complete"), Write::Applied);
    assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("owner"))));
}

/// `release` deletes the claim, so a retry can run, and wakes those waiting on it.
pub async fn release_frees_the_key_and_wakes_waiters(store: impl Store) {
    let store = Arc::new(store);
    let key = key("release");
    let owner = owned(&store, &key, HELD).await;
    let waiter = spawn_waiter(&store, &key);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "a waiter waits while the claim is in flight");
    assert_eq!(store.release(&key, &owner).await.expect("release"), Write::Applied);
    woken(waiter, "the release").await;
    owned(&store, &key, HELD).await;
}

/// Once a lease runs out, the key is free: a newcomer's claim is granted, and the old owner's writes are fenced.
pub async fn a_lapsed_lease_frees_the_key_and_fences_its_old_owner(store: impl Store) {
    let key = key("lapsed");
    let stale = owned(&store, &key, SHORT_LEASE).await;
    tokio::time::sleep(PAST_THE_LEASE).await;
    let fresh = owned(&store, &key, HELD).await;
    assert_eq!(store.complete(&key, &stale, &record("stale"), HELD).await.expect("complete"), Write::Fenced);
    assert_eq!(store.renew(&key, &stale, &fingerprint("request"), HELD).await.expect("renew"), Write::Fenced);
    assert_eq!(store.release(&key, &stale).await.expect("release"), Write::Fenced);
    assert_eq!(store.complete(&key, &fresh, &record("fresh"), HELD).await.expect("complete"), Write::Applied);
    assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("fresh"))));
}

/// A completion that arrives after its lease ran out, with nobody having claimed the key since, is kept: nobody
/// else ran the request.
pub async fn complete_after_a_lapsed_lease_nobody_took_is_applied(store: impl Store) {
    let key = key("late-complete");
    let owner = owned(&store, &key, SHORT_LEASE).await;
    tokio::time::sleep(PAST_THE_LEASE).await;
    assert_eq!(store.complete(&key, &owner, &record("late"), HELD).await.expect("complete"), Write::Applied);
    assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("late"))));
}

/// `renew` moves the lease's end; on a key whose lease ran out and that nobody took since, it claims the key
/// again for its owner.
pub async fn renew_extends_the_lease_and_claims_a_lapsed_key_again(store: impl Store) {
    let key = key("renew");
    let owner = owned(&store, &key, SHORT_LEASE).await;
    assert_eq!(store.renew(&key, &owner, &fingerprint("request"), HELD).await.expect("renew"), Write::Applied);
    tokio::time::sleep(PAST_THE_LEASE).await;
    assert_eq!(seen_by_another(&store, &key).await, in_flight(), "the renewed lease still holds");

    let key = self::key("renew-lapsed");
    let owner = owned(&store, &key, SHORT_LEASE).await;
    tokio::time::sleep(PAST_THE_LEASE).await;
    assert_eq!(store.renew(&key, &owner, &fingerprint("request"), HELD).await.expect("renew"), Write::Applied);
    assert_eq!(seen_by_another(&store, &key).await, in_flight(), "claimed again for its owner");
    assert_eq!(store.complete(&key, &owner, &record("renewed"), HELD).await.expect("complete"), Write::Applied);
}

/// A wait on a key that is absent or completed returns at once, whatever its timeout.
pub async fn wait_returns_at_once_when_nothing_is_in_flight(store: impl Store) {
    let store = Arc::new(store);
    let absent = key("wait-absent");
    woken(spawn_waiter(&store, &absent), "nothing (the key is absent)").await;
    let completed = key("wait-completed");
    let owner = owned(&store, &completed, HELD).await;
    assert_eq!(store.complete(&completed, &owner, &record("done"), HELD).await.expect("complete"), Write::Applied);
    woken(spawn_waiter(&store, &completed), "nothing (the key is completed)").await;
}

/// A wait on a claim held longer than the wait's timeout returns at its timeout, not before and not much after.
pub async fn wait_ends_at_its_timeout_while_the_claim_is_held(store: impl Store) {
    let key = key("wait-timeout");
    owned(&store, &key, HELD).await;
    let started = Instant::now();
    tokio::time::timeout(WOKEN_WITHIN, store.wait(&key, Duration::from_millis(300)))
        .await
        .unwrap_or_else(|_| panic!("a 300 ms wait was still waiting after {WOKEN_WITHIN:?}"))
        .expect("wait");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "a 300 ms wait returned after {waited:?}");
}

/// A claim whose lease runs out with nobody completing it ends the waits on it (so a duplicate can take over).
pub async fn wait_ends_when_the_lease_runs_out(store: impl Store) {
    let store = Arc::new(store);
    let key = key("wait-lease");
    owned(&store, &key, SHORT_LEASE).await;
    woken(spawn_waiter(&store, &key), "the lease running out").await;
    owned(&store, &key, HELD).await;
}

/// A completed record is kept for its `ttl`, then the key is free again.
pub async fn records_expire_after_their_ttl(store: impl Store) {
    let key = key("ttl");
    let owner = owned(&store, &key, HELD).await;
    let ttl = Duration::from_millis(500);
    assert_eq!(store.complete(&key, &owner, &record("brief"), ttl).await.expect("complete"), Write::Applied);
    assert_eq!(seen_by_another(&store, &key).await, Claimed::Existing(Entry::Completed(record("brief"))));
    tokio::time::sleep(ttl + PAST_THE_LEASE).await;
    owned(&store, &key, HELD).await;
}
