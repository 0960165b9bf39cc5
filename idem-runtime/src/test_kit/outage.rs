//! A store that is down: it stands in for an outage, which no real store can be asked to have. For a store that is
//! down for some operations only, or at some moments, see [`Faulty`](super::Faulty).

use crate::fingerprint::Fingerprint;
use crate::record::{OwnerToken, Record};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use crate::store::error::StoreError;
use std::time::Duration;

/// A [`Store`] that is down: every call fails with [`StoreError::Unavailable`], as an unreachable backend would.
/// For testing what an app answers during an outage (`503 store-unavailable` by default, or an unprotected run with
/// [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen)).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outage;

fn down<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("connection refused (a simulated outage)".into()))
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
