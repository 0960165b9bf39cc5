#![warn(missing_docs)]
//! Exactly-once HTTP handlers for axum: `#[idempotent]`, a router-wide layer and a plain async API, backed by
//! Redis or memory.
//!
//! A client that retries a `POST` (after a timeout, a dropped connection, a double click) must not create two
//! orders. It sends an `Idempotency-Key` header; idem runs the handler once per key, keeps its response, and
//! answers every retry with the stored response, byte for byte, marked `Idempotent-Replayed: true`.
//!
//! # Quick start
//!
//! ## 1. Add the crate
//!
//! ```text
//! cargo add axum-idem
//! cargo add axum
//! cargo add tokio --features full
//! cargo add serde --features derive
//! cargo add --dev tower --features util      # for `oneshot` in tests
//! ```
//!
//! The package is `axum-idem` (the name `idem` on crates.io belongs to another crate); its library is named `idem`,
//! so code says `use idem::...`. It brings the Redis store by default; `cargo add axum-idem --no-default-features`
//! leaves it out when memory is enough (tests, one process).
//!
//! ## 2. Annotate a handler
//!
//! [`#[idempotent]`](idempotent) keeps the handler as written (any extractors, any `IntoResponse` return type) and
//! makes it run once per key:
//!
//! ```
//! use axum::extract::{FromRef, State};
//! use axum::http::StatusCode;
//! use axum::Json;
//! use idem::{Idempotency, idempotent};
//! use serde::{Deserialize, Serialize};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! #[derive(Clone)]
//! struct AppState {
//!     idempotency: Idempotency,
//!     next_id: Arc<AtomicU64>,
//! }
//!
//! // Where annotated handlers find the engine.
//! impl FromRef<AppState> for Idempotency {
//!     fn from_ref(state: &AppState) -> Self {
//!         state.idempotency.clone()
//!     }
//! }
//!
//! #[derive(Deserialize)]
//! struct NewOrder {
//!     item: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Order {
//!     id: u64,
//!     item: String,
//! }
//!
//! /// Retries with the same key get the stored 201; a duplicate sent while this one runs waits up to 3 s for it.
//! #[idempotent(ttl = 3600, wait_timeout = 3.0)]
//! async fn create_order(State(state): State<AppState>, Json(order): Json<NewOrder>) -> (StatusCode, Json<Order>) {
//!     let id = state.next_id.fetch_add(1, Ordering::SeqCst) + 1;
//!     (StatusCode::CREATED, Json(Order { id, item: order.item }))
//! }
//! ```
//!
//! A request without a key is refused with `400 missing-key` (`required = false` lets it through unprotected); a
//! key reused for a different request is refused with `422 key-reused`; a duplicate of a request still running is
//! answered `409 in-progress` once `wait_timeout` runs out. The handler's own 4xx answers are stored like 2xx ones;
//! 5xx answers and panics are not (the retry runs again) unless `store_server_errors` is set. Every answer is an
//! RFC 9457 problem ([`Problem`]) when idem answers itself.
//!
//! ## 3. Install the engine
//!
//! One [`Idempotency`] per app holds the store and the app-wide settings. Put it in the state (as above, with
//! `FromRef`), or install it for a whole router with [`Idempotency::layer`] (which also makes every unannotated
//! `POST`/`PUT`/`PATCH`/`DELETE` idempotent: see [`IdempotencyLayer`](layer::IdempotencyLayer)):
//!
//! ```
//! # use axum::extract::{FromRef, State};
//! # use axum::http::StatusCode;
//! # use axum::Json;
//! # use idem::{Idempotency, idempotent};
//! # use serde::{Deserialize, Serialize};
//! # use std::sync::Arc;
//! # use std::sync::atomic::{AtomicU64, Ordering};
//! # #[derive(Clone)]
//! # struct AppState { idempotency: Idempotency, next_id: Arc<AtomicU64> }
//! # impl FromRef<AppState> for Idempotency {
//! #     fn from_ref(state: &AppState) -> Self { state.idempotency.clone() }
//! # }
//! # #[derive(Deserialize)]
//! # struct NewOrder { item: String }
//! # #[derive(Serialize)]
//! # struct Order { id: u64, item: String }
//! # #[idempotent(ttl = 3600, wait_timeout = 3.0)]
//! # async fn create_order(State(state): State<AppState>, Json(order): Json<NewOrder>) -> (StatusCode, Json<Order>) {
//! #     let id = state.next_id.fetch_add(1, Ordering::SeqCst) + 1;
//! #     (StatusCode::CREATED, Json(Order { id, item: order.item }))
//! # }
//! use axum::Router;
//! use axum::http::{HeaderName, header::CONTENT_TYPE};
//! use axum::routing::post;
//! use idem::MemoryStore;
//!
//! fn app(idempotency: Idempotency) -> Router {
//!     let state = AppState { idempotency, next_id: Arc::default() };
//!     Router::new().route("/orders", post(create_order)).with_state(state)
//! }
//!
//! # async fn serve() -> std::io::Result<()> {
//! // In production, share records between processes with `idem::RedisStore` (feature `redis`).
//! let idempotency = Idempotency::builder(MemoryStore::new())
//!     .fingerprint_headers([CONTENT_TYPE, HeaderName::from_static("x-tenant")])
//!     .build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app(idempotency)).await
//! # }
//! ```
//!
//! Records are scoped per client; by default the client is the raw `Authorization` header, so a retry sent after a
//! token refresh runs again. Behind an authentication middleware, scope by the identity it establishes with
//! [`IdempotencyBuilder::principal_from_extension`]: `.principal_from_extension(|user: &UserId| user.0.to_string())`.
//! Handlers keep running when their clients disconnect; [`IdempotencyBuilder::max_running_handlers`] bounds how many
//! run at once (10,000 by default), refusing the excess with `503 at-capacity`.
//!
//! ## 4. Test the handler
//!
//! [`MemoryStore`] has the same semantics as Redis and needs nothing running, so a handler's idempotency is unit
//! tested by sending requests to the router with `tower::ServiceExt::oneshot`. In a test module, under
//! `#[tokio::test]`:
//!
//! ```
//! # use axum::extract::{FromRef, State};
//! # use axum::http::StatusCode;
//! # use axum::Json;
//! # use idem::{Idempotency, idempotent};
//! # use serde::{Deserialize, Serialize};
//! # use std::sync::Arc;
//! # use std::sync::atomic::{AtomicU64, Ordering};
//! # use axum::Router;
//! # use axum::routing::post;
//! # #[derive(Clone)]
//! # struct AppState { idempotency: Idempotency, next_id: Arc<AtomicU64> }
//! # impl FromRef<AppState> for Idempotency {
//! #     fn from_ref(state: &AppState) -> Self { state.idempotency.clone() }
//! # }
//! # #[derive(Deserialize)]
//! # struct NewOrder { item: String }
//! # #[derive(Serialize)]
//! # struct Order { id: u64, item: String }
//! # #[idempotent(ttl = 3600, wait_timeout = 3.0)]
//! # async fn create_order(State(state): State<AppState>, Json(order): Json<NewOrder>) -> (StatusCode, Json<Order>) {
//! #     let id = state.next_id.fetch_add(1, Ordering::SeqCst) + 1;
//! #     (StatusCode::CREATED, Json(Order { id, item: order.item }))
//! # }
//! # fn app(idempotency: Idempotency) -> Router {
//! #     let state = AppState { idempotency, next_id: Arc::default() };
//! #     Router::new().route("/orders", post(create_order)).with_state(state)
//! # }
//! use axum::body::Body;
//! use axum::http::Request;
//! use idem::MemoryStore;
//! use idem::metrics::Counters;
//! use tower::ServiceExt; // `oneshot`
//!
//! fn order(key: &str, item: &str) -> Request<Body> {
//!     Request::post("/orders")
//!         .header("idempotency-key", key)
//!         .header("content-type", "application/json")
//!         .body(Body::from(format!(r#"{{"item":"{item}"}}"#)))
//!         .unwrap()
//! }
//!
//! async fn a_retry_gets_the_stored_order() {
//!     let counters = Arc::new(Counters::new());
//!     let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
//!     let app = app(idempotency);
//!
//!     let first = app.clone().oneshot(order("key-1", "book")).await.unwrap();
//!     assert_eq!(first.status(), StatusCode::CREATED);
//!     assert_eq!(first.headers()["x-idempotency-status"], "new");
//!     let first_body = axum::body::to_bytes(first.into_body(), usize::MAX).await.unwrap();
//!
//!     let retry = app.clone().oneshot(order("key-1", "book")).await.unwrap();
//!     assert_eq!(retry.status(), StatusCode::CREATED);
//!     assert_eq!(retry.headers()["idempotent-replayed"], "true");
//!     let retry_body = axum::body::to_bytes(retry.into_body(), usize::MAX).await.unwrap();
//!     assert_eq!(retry_body, first_body, "the same order, not a second one");
//!
//!     let reused = app.clone().oneshot(order("key-1", "lamp")).await.unwrap();
//!     assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
//!
//!     let counts = counters.snapshot();
//!     assert_eq!((counts.new, counts.hit, counts.mismatch), (1, 1, 1), "the handler ran once");
//! }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! #     a_retry_gets_the_stored_order().await;
//! # }
//! ```
//!
//! To test time-dependent rows (records expiring after `ttl`, leases), use
//! `#[tokio::test(start_paused = true)]`: `MemoryStore` expires keys on `tokio::time`, so
//! `tokio::time::advance` moves them.
//!
//! # Three front doors, one engine
//!
//! - [`#[idempotent]`](idempotent) on a handler: per-route settings (`ttl`, `wait_timeout`, `lease`,
//!   `validate_signature`, `required`, `store_server_errors`).
//! - [`IdempotencyLayer`](layer::IdempotencyLayer), from [`Idempotency::layer`]: every `POST`/`PUT`/`PATCH`/`DELETE`
//!   of a router (or of one route) that carries a key, with the layer's own [`Policy`]; safe methods pass through. A
//!   route that is also annotated is processed once, with the annotation's settings.
//! - [`Idempotency::once`]: work that is not an HTTP handler (queue and webhook consumers, jobs) runs at most once
//!   per key and its `Serialize`/`DeserializeOwned` result is returned to every repeat, with typed errors
//!   ([`OnceError`](once::OnceError)).
//!
//! All three share the stores ([`MemoryStore`], and `RedisStore` with the `redis` feature, or your own [`Store`](store::Store)),
//! the claim / wait / replay protocol, lease renewal, and the store-failure policy ([`StoreFailure`]: fail closed
//! with `503 store-unavailable` by default).
//!
//! # Observability
//!
//! Each request runs in a `tracing` span named `idempotency` with fields `door`, `method` and `path` (or `scope`
//! for the plain API), `key` (a digest of the scope and key; never the client's key), `outcome` (`new`, `hit`,
//! `conflict`, `mismatch`, `store-error`, `no-key`, `missing-key`, ...) and `wait_ms`. Conflicts, mismatches,
//! store errors and fenced writes by a stale owner are logged as events. Counts (new, hit, conflict, mismatch,
//! store errors, fenced writes, a wait-time histogram) go to the [`Metrics`](metrics::Metrics) given to
//! [`IdempotencyBuilder::metrics`]: [`Counters`](metrics::Counters) to read them in-process, or `MetricsFacade` (feature `metrics`)
//! to export them through the `metrics` crate.
//!
//! # Cargo features
//!
//! - `redis` (default): `RedisStore`, for single nodes, Sentinel and Cluster.
//! - `deadpool`: `RedisStoreBuilder::pool`, the Redis store on a [`deadpool-redis`](https://docs.rs/deadpool-redis)
//!   pool of your own.
//! - `tls`: `rediss://` URLs for `RedisStore` (rustls), trusting the system's root certificates; the builder's
//!   `tls_root_certificates` trusts a private CA instead, `tls_client_certificate` presents a client certificate.
//! - `tls-webpki-roots`: `tls`, trusting Mozilla's root certificates compiled into the binary instead (for
//!   images without a CA bundle).
//! - `postgres`: `PostgresStore`, records in PostgreSQL (sqlx), from a URL or the app's own pool, and `Tx`: handlers
//!   whose database writes commit in one transaction with their records.
//! - `metrics`: `MetricsFacade`, reporting to the [`metrics`](https://docs.rs/metrics) crate's recorder.
//! - `test-kit`: `test_kit`, the conformance suite for your own [`store::Store`], and test doubles (`Outage`, a
//!   fault-injecting `Faulty` wrapper), for your tests (enable it on the dev-dependency).
//!
//! # Your own store
//!
//! Implement [`store::Store`] with [`#[idem::store::async_trait]`](macro@store::async_trait) (the same version idem uses), and check
//! it with the test kit: one line under `tests/` runs every conformance case on it, one `#[test]` per case.
//!
//! ```toml
//! [dev-dependencies]
//! axum-idem = { version = "0.1", features = ["test-kit"] }
//! ```
//!
//! ```
//! // tests/my_store.rs: a closure that makes the store under test (here idem's own, to keep this compiling).
//! idem::test_kit::conformance_tests!(my_store, || async { idem::MemoryStore::new() });
//! # fn main() {}
//! ```
//!
//! `examples/custom_store.rs` in the repository is a complete store written from the contract, checked this way.

pub use idem_macros::idempotent;
// Everything public in the engine, at the same paths: the handle and its builder, the stores, `Policy`, the
// extractors and `Problem` at the root; the rest in named modules (`store`, `layer`, `once`, `protocol`, `metrics`,
// `key`, `headers`, `problems`, `drain`).
pub use idem_runtime::*;

/// What `#[idempotent]` expands to use. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use axum::extract::{FromRequest, FromRequestParts, Request, State};
    pub use axum::response::{IntoResponse, Response};
    pub use idem_runtime::Policy;
    pub use idem_runtime::macro_support::*;
    pub use idem_runtime::protocol::Execution;
}

/// The README's code blocks, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The code blocks of the pages under `docs/`, compiled and run as doc-tests like the README's.
#[cfg(doctest)]
pub mod docs_doctests {
    #[doc = include_str!("../docs/clients.md")]
    pub struct Clients;
    #[doc = include_str!("../docs/design-choices.md")]
    pub struct DesignChoices;
    #[doc = include_str!("../docs/layer.md")]
    pub struct Layer;
    #[doc = include_str!("../docs/performance.md")]
    pub struct Performance;
    #[doc = include_str!("../docs/publishing.md")]
    pub struct Publishing;
    #[doc = include_str!("../docs/stores.md")]
    pub struct Stores;
    #[doc = include_str!("../docs/testing.md")]
    pub struct Testing;
}
