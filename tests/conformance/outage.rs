//! The one test double: a store that is down. It stands in for an outage, which no real store can be asked to have.
//!
//! `Store` is declared with `#[async_trait]`; the methods are written out in the form that macro generates, so the
//! tests need no extra dependency.

use futures_util::future::BoxFuture;
use idem::{Claimed, Fingerprint, OwnerToken, Record, Store, StoreError, StoreKey, Write};
use std::time::Duration;

/// Every call fails as an unreachable backend would.
pub struct Outage;

fn down<'a, T: 'a>() -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(async { Err(StoreError::Unavailable("connection refused (a simulated outage)".to_owned())) })
}

impl Store for Outage {
    fn claim<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _key: &'life1 StoreKey,
        _fingerprint: &'life2 Fingerprint,
        _lease: Duration,
    ) -> BoxFuture<'async_trait, Result<Claimed, StoreError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        down()
    }

    fn complete<'life0, 'life1, 'life2, 'life3, 'async_trait>(
        &'life0 self,
        _key: &'life1 StoreKey,
        _owner: &'life2 OwnerToken,
        _record: &'life3 Record,
        _ttl: Duration,
    ) -> BoxFuture<'async_trait, Result<Write, StoreError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        'life3: 'async_trait,
        Self: 'async_trait,
    {
        down()
    }

    fn release<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _key: &'life1 StoreKey,
        _owner: &'life2 OwnerToken,
    ) -> BoxFuture<'async_trait, Result<Write, StoreError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        down()
    }

    fn renew<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _key: &'life1 StoreKey,
        _owner: &'life2 OwnerToken,
        _lease: Duration,
    ) -> BoxFuture<'async_trait, Result<Write, StoreError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        down()
    }

    fn wait<'life0, 'life1, 'async_trait>(
        &'life0 self,
        _key: &'life1 StoreKey,
        _timeout: Duration,
    ) -> BoxFuture<'async_trait, Result<(), StoreError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        down()
    }
}
