//! The one test double: a store that is down. It stands in for an outage, which no real store can be asked to have.
//!
//! The conformance suite uses it as `super::outage::Outage`; the `layer`, `once` and `metrics` tests include this
//! file with `#[path = "conformance/outage.rs"] mod outage;`.

use idem::{Claimed, Fingerprint, OwnerToken, Record, Store, StoreError, StoreKey, Write};
use std::time::Duration;

/// Every call fails as an unreachable backend would.
pub struct Outage;

fn down<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("connection refused (a simulated outage)".to_owned()))
}

#[async_trait::async_trait]
impl Store for Outage {
    async fn claim(&self, _: &StoreKey, _: &Fingerprint, _: &OwnerToken, _: Duration) -> Result<Claimed, StoreError> {
        down()
    }
    async fn complete(&self, _: &StoreKey, _: &OwnerToken, _: &Record, _: Duration) -> Result<Write, StoreError> {
        down()
    }
    async fn release(&self, _: &StoreKey, _: &OwnerToken) -> Result<Write, StoreError> {
        down()
    }
    async fn renew(&self, _: &StoreKey, _: &OwnerToken, _: &Fingerprint, _: Duration) -> Result<Write, StoreError> {
        down()
    }
    async fn wait(&self, _: &StoreKey, _: Duration) -> Result<(), StoreError> {
        down()
    }
}
