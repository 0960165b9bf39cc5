//! A store seen through the engine's metrics: every call timed and reported with
//! [`Metrics::observe_store`](crate::metrics::Metrics::observe_store).

use crate::fingerprint::Fingerprint;
use crate::metrics::{Metrics, StoreOperation};
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Forgotten, Store, StoreKey, Write};
use crate::store::error::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub(crate) struct Timed {
    pub(crate) inner: Arc<dyn Store>,
    pub(crate) metrics: Arc<dyn Metrics>,
}

impl Timed {
    async fn timed<T>(
        &self,
        operation: StoreOperation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let answer = call.await;
        self.metrics.observe_store(operation, started.elapsed(), answer.is_ok());
        answer
    }
}

#[async_trait::async_trait]
impl Store for Timed {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        self.timed(StoreOperation::Claim, self.inner.claim(key, fingerprint, owner, lease)).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.timed(StoreOperation::Complete, self.inner.complete(key, owner, record, ttl)).await
    }
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.timed(StoreOperation::Release, self.inner.release(key, owner)).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        self.timed(StoreOperation::Renew, self.inner.renew(key, owner, fingerprint, lease)).await
    }
    /// Not timed: it lasts as long as the original it waits for, which says nothing of the store.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        self.timed(StoreOperation::Inspect, self.inner.inspect(key)).await
    }
    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        self.timed(StoreOperation::Forget, self.inner.forget(key)).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOperation::Ping, self.inner.ping()).await
    }
}
