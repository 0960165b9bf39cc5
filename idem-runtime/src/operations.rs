//! What an operator does with the records: find a request's store key, look at what is stored, forget a record,
//! check that the store answers.

use crate::store::{Forgotten, StoreError, StoreKey};
use crate::{Entry, Idempotency};
use axum::http::Method;
use std::time::Duration;
use tokio::time::Instant;

impl Idempotency {
    /// The store key of an HTTP request: its method, its path as the client sent it (no query), its principal (the
    /// bytes the engine's principal function returns for it; empty for none) and its idempotency key, unquoted.
    ///
    /// ```
    /// use axum::http::Method;
    /// use idem_runtime::Idempotency;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let idempotency = Idempotency::in_memory();
    /// let key = idempotency.http_store_key(&Method::POST, "/orders", b"Bearer alice", "order-1");
    /// assert_eq!(idempotency.inspect(&key).await.unwrap(), None);
    /// # }
    /// ```
    pub fn http_store_key(&self, method: &Method, path: &str, principal: &[u8], key: &str) -> StoreKey {
        StoreKey::derive(&[b"http", method.as_str().as_bytes(), path.as_bytes(), principal, key.as_bytes()])
    }

    /// The store key of [`Idempotency::once`] work: its scope and key.
    pub fn once_store_key(&self, scope: &str, key: &str) -> StoreKey {
        StoreKey::derive(&[b"once", scope.as_bytes(), key.as_bytes()])
    }

    /// What the store holds under `key` (see [`Store::inspect`](crate::Store::inspect)).
    pub async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        self.shared.store.inspect(key).await
    }

    /// Removes the completed record (or unreadable entry) under `key`, so the key can be used again; an in-flight
    /// claim is left alone (see [`Store::forget`](crate::Store::forget)).
    pub async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let forgotten = self.shared.store.forget(key).await;
        if let Ok(Forgotten::Removed) = forgotten {
            tracing::info!(key = %key, "idempotency record forgotten on request");
        }
        forgotten
    }

    /// Asks the store to answer (a Redis `PING`), within `timeout`: for a readiness probe. Answers the round trip.
    ///
    /// Requests with a key cannot be served while this fails (they get `503 store-unavailable`, or run unprotected
    /// under fail-open).
    pub async fn check_store(&self, timeout: Duration) -> Result<Duration, StoreError> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.shared.store.ping()).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Unavailable(format!("the store did not answer within {timeout:?}"))),
        }
    }
}
