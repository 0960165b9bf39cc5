//! A store written outside idem, checked with the test kit as its author would: the example's `HashMapStore`
//! (`examples/custom_store.rs`) passes every conformance case. And the kit has teeth: stores that break the contract
//! in one way each fail the case that covers it.

#[path = "../examples/custom_store.rs"]
#[allow(dead_code)]
mod custom_store;

use custom_store::HashMapStore;
use idem::store::{Claimed, Fingerprint, OwnerToken, Record, Store, StoreError, StoreKey, Write};
use idem::test_kit::contract;
use std::time::Duration;

idem::test_kit::conformance_tests!(hash_map_store, || async { HashMapStore::default() });

/// The example's store with one method broken, the others as written.
#[derive(Default)]
struct Broken {
    inner: HashMapStore,
    fault: Fault,
}

#[derive(Default, Clone, Copy)]
enum Fault {
    #[default]
    None,
    /// `wait` sleeps out its whole timeout: nothing wakes it.
    DeafWaiter,
    /// `wait` returns at once, even while the key is in flight.
    ImpatientWaiter,
    /// Claims last a hundred times the lease asked for.
    LongLeases,
}

impl Broken {
    fn with(fault: Fault) -> Self {
        Self { inner: HashMapStore::default(), fault }
    }
}

#[idem::store::async_trait]
impl Store for Broken {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let lease = if matches!(self.fault, Fault::LongLeases) { lease * 100 } else { lease };
        self.inner.claim(key, fingerprint, owner, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.inner.complete(key, owner, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.inner.release(key, owner).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        self.inner.renew(key, owner, fingerprint, lease).await
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        match self.fault {
            Fault::DeafWaiter => {
                tokio::time::sleep(timeout).await;
                Ok(())
            }
            Fault::ImpatientWaiter => Ok(()),
            Fault::None | Fault::LongLeases => self.inner.wait(key, timeout).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "still waiting")]
async fn a_wait_that_no_release_wakes_fails_the_kit() {
    contract::release_frees_the_key_and_wakes_waiters(Broken::with(Fault::DeafWaiter)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "a 300 ms wait returned after")]
async fn a_wait_that_returns_while_the_key_is_in_flight_fails_the_kit() {
    contract::wait_ends_at_its_timeout_while_the_claim_is_held(Broken::with(Fault::ImpatientWaiter)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "a claim on a free key must be granted")]
async fn a_lease_that_outlives_its_time_fails_the_kit() {
    contract::a_lapsed_lease_frees_the_key_and_fences_its_old_owner(Broken::with(Fault::LongLeases)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_store_passes_the_same_cases() {
    contract::release_frees_the_key_and_wakes_waiters(Broken::with(Fault::None)).await;
    contract::wait_ends_at_its_timeout_while_the_claim_is_held(Broken::with(Fault::None)).await;
    contract::a_lapsed_lease_frees_the_key_and_fences_its_old_owner(Broken::with(Fault::None)).await;
}
