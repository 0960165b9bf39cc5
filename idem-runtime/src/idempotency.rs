//! The engine handle's whole public surface: making one, and every door and operation it offers. The doors and the
//! protocol behind them live in `door/` and `protocol/`; each method here is one call into them.

use crate::builder::IdempotencyBuilder;
use crate::door::layer::IdempotencyLayer;
use crate::door::once::Once;
use crate::door::pipeline;
use crate::drain::Undrained;
use crate::engine::Idempotency;
use crate::fingerprint::Fingerprint;
use crate::http::execution::Execution;
use crate::http::fingerprint::of_request;
use crate::policy::{BodyFingerprint, Policy};
use crate::record::Entry;
use crate::store::contract::{Forgotten, Store, StoreKey};
use crate::store::error::StoreError;
use crate::store::memory::MemoryStore;
use crate::store_key;
use axum::extract::Request;
use axum::http::Method;
use axum::http::request::Parts;
use axum::response::Response;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Idempotency {
    /// An engine over `store` with the default settings.
    pub fn new(store: impl Store) -> Self {
        Self::builder(store).build()
    }

    /// An engine over a fresh [`MemoryStore`]: for tests and single-process apps.
    pub fn in_memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// Configures an engine over `store`.
    pub fn builder(store: impl Store) -> IdempotencyBuilder {
        IdempotencyBuilder::new(store)
    }

    /// The policy registered under `name` with
    /// [`IdempotencyBuilder::route_policy`](crate::IdempotencyBuilder::route_policy), if any.
    pub fn route_policy(&self, name: &str) -> Option<Policy> {
        self.engine.route_policies.get(name).copied()
    }

    /// The store behind this engine.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.engine.store
    }

    /// Answers `request` idempotently under `policy`: reads the key, buffers the body under axum's
    /// `DefaultBodyLimit`, fingerprints it, then runs `run` once (detached from the connection, so a client that
    /// disconnects does not cancel it), replays, waits or refuses as the behaviour table says.
    ///
    /// This is what `#[idempotent]` expands to; call it directly to build another front door. Under an
    /// [`IdempotencyLayer`] that already claimed the key, it adopts that claim instead of claiming again, so the
    /// request is processed once, with `policy`.
    pub async fn handle<F, Fut>(&self, policy: &Policy, request: Request, run: F) -> Response
    where
        F: FnOnce(Request) -> Fut + Send + 'static,
        Fut: Future<Output = Execution> + Send + 'static,
    {
        pipeline::handle(&self.engine, policy, request, run).await
    }

    /// A tower layer that makes every unsafe method of a router idempotent with this engine (see
    /// [`IdempotencyLayer`]).
    pub fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.clone())
    }

    /// Work to run at most once per `key` within `scope`, with [`Policy::new`]'s settings unless
    /// [`Once::policy`] says otherwise.
    ///
    /// `scope` names the kind of work (`"refunds"`, `"stripe-webhooks"`): records are namespaced by it, so one key
    /// used by two kinds of work never mixes them up. `key` is the caller's idempotency key, such as an event id.
    /// Both are hashed before they reach the store.
    pub fn once<'a>(&'a self, scope: &'a str, key: &'a str) -> Once<'a> {
        Once::new(self, scope, key)
    }

    /// SHA-256 over length-prefixed method, path, query, the configured headers (each value of each) and the body.
    ///
    /// The path and query are the request's as the client sent them (axum's `OriginalUri`), not as a nested
    /// router strips them, so a router-wide layer and a handler in a nested router see the same request.
    pub fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Fingerprint {
        of_request(&self.engine.fingerprint_headers, parts, body, BodyFingerprint::Bytes)
    }

    /// The store key of an HTTP request: its method, its path as the client sent it (no query), its principal (the
    /// bytes the engine's principal function returns for it; empty for none) and its idempotency key, unquoted.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use axum::http::Method;
    /// use idem::Idempotency;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let idempotency = Idempotency::in_memory();
    /// let key = idempotency.http_store_key(&Method::POST, "/orders", b"Bearer alice", "order-1");
    /// assert_eq!(idempotency.inspect(&key).await.unwrap(), None);
    /// # }
    /// ```
    pub fn http_store_key(&self, method: &Method, path: &str, principal: &[u8], key: &str) -> StoreKey {
        store_key::http(method, path, principal, key)
    }

    /// The store key of [`Idempotency::once`] work: its scope and key.
    pub fn once_store_key(&self, scope: &str, key: &str) -> StoreKey {
        store_key::once(scope, key)
    }

    /// What the store holds under `key` (see [`Store::inspect`](crate::store::contract::Store::inspect)).
    pub async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        self.engine.store.inspect(key).await
    }

    /// Removes the completed record (or unreadable entry) under `key`, so the key can be used again; an in-flight
    /// claim is left alone (see [`Store::forget`](crate::store::contract::Store::forget)).
    pub async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let forgotten = self.engine.store.forget(key).await;
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
        match tokio::time::timeout(timeout, self.engine.store.ping()).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Unavailable(format!("the store did not answer within {timeout:?}").into())),
        }
    }

    /// Waits up to `grace` for every handler this engine runs on a task of its own to finish, and for the store
    /// writes it retries in the background to land.
    ///
    /// Protected handlers run detached from their connection, so a client that disconnects cannot cancel one
    /// between its side effect and its record. The flip side is that `axum::serve(..).with_graceful_shutdown(..)`
    /// does not wait for a handler whose client already left: once it returns, the runtime would drop such a
    /// handler halfway through, and after its lease a retry would run it again. Call `drain` after `serve` returns
    /// and before the runtime ends, so those handlers finish and record their responses.
    ///
    /// ```text
    /// axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    /// if let Err(undrained) = idempotency.drain(Duration::from_secs(30)).await {
    ///     tracing::warn!(%undrained, "shutting down with handlers still running");
    /// }
    /// ```
    ///
    /// A completion (or release) that failed because the store was out of reach is retried in the background: the
    /// work ran and its answer went out, and without its record a retry after the lease would run it again. `drain`
    /// waits for those retries too (each gives up by itself once the record's ttl, or the claim's lease, has
    /// passed), so a store that comes back within the grace period still gets the record.
    ///
    /// (`examples/orders/src/main.rs` does this on SIGTERM, and the README shows it compiled.)
    pub async fn drain(&self, grace: Duration) -> Result<(), Undrained> {
        self.engine.running.drained(grace).await
    }

    /// How many handlers this engine is running on tasks of their own right now, and store writes it is retrying
    /// in the background (see [`Idempotency::drain`]).
    pub fn running_handlers(&self) -> usize {
        self.engine.running.count()
    }
}
