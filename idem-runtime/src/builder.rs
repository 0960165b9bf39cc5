//! Configuring an engine: [`IdempotencyBuilder`].

use crate::capacity::{DEFAULT_MAX_RUNNING_HANDLERS, HandlerSlots};
use crate::drain::Running;
use crate::engine::{Engine, Idempotency};
use crate::http::key::KeyFormat;
use crate::http::problem::Answers;
use crate::metrics::{Metrics, NoMetrics};
use crate::policy::{Policy, StoreFailure};
use crate::protocol::background::Background;
use crate::store::contract::Store;
#[cfg(feature = "postgres")]
use crate::store::postgres::PostgresStore;
use crate::store::timed::Timed;
use axum::http::HeaderName;
use axum::http::request::Parts;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Configures an [`Idempotency`]; made by [`Idempotency::builder`].
pub struct IdempotencyBuilder {
    engine: Engine,
}

impl std::fmt::Debug for IdempotencyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyBuilder")
            .field("key_header", &self.engine.key_header)
            .field("fingerprint_headers", &self.engine.fingerprint_headers)
            .field("key_format", &self.engine.key_format)
            .field("max_record_bytes", &self.engine.max_record_bytes)
            .field("on_store_failure", &self.engine.on_store_failure)
            .field("handler_slots", &self.engine.handler_slots)
            .finish_non_exhaustive()
    }
}

impl IdempotencyBuilder {
    /// The default settings over `store` (made by [`Idempotency::builder`]).
    pub(crate) fn new(store: impl Store) -> Self {
        let store = Arc::new(store);
        let running: Arc<Running> = Arc::default();
        let background = Background::new(store.clone(), running.clone());
        Self {
            engine: Engine {
                #[cfg(feature = "postgres")]
                transactions: (&store as &dyn std::any::Any).downcast_ref::<Arc<PostgresStore>>().cloned(),
                store,
                key_header: HeaderName::from_static("idempotency-key"),
                fingerprint_headers: vec![HeaderName::from_static("content-type")],
                principal: Arc::new(|parts| Some(authorization_principal(parts))),
                max_record_bytes: 1 << 20,
                on_store_failure: StoreFailure::FailClosed,
                route_policies: HashMap::new(),
                metrics: Arc::new(NoMetrics),
                metrics_installed: false,
                running,
                background,
                handler_slots: Arc::new(HandlerSlots::new(DEFAULT_MAX_RUNNING_HANDLERS)),
                answers: Answers::default(),
                key_format: KeyFormat::any(),
                unscoped_reported: AtomicBool::new(false),
            },
        }
    }

    /// The header carrying the key (default `Idempotency-Key`).
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use axum::http::HeaderName;
    /// use idem::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .key_header(HeaderName::from_static("x-request-key"))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.engine.key_header = name;
        self
    }

    /// Request headers that are part of the fingerprint, besides method, path, query and body
    /// (default `content-type`).
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.engine.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Who is asking (default: the `Authorization` header's bytes). Records are scoped by the returned bytes (hashed
    /// into the store key), so one client can never receive another's stored response.
    ///
    /// The default suits APIs authenticated by `Authorization` whose credentials do not change between a request and
    /// its retry: a refreshed or rotated token is another principal, so a retry sent with it runs again. An app with
    /// an authentication middleware should scope by the identity it establishes instead, with
    /// [`principal_from_extension`](Self::principal_from_extension). An app that authenticates another way (cookie,
    /// mTLS, gateway header) must name its client here, or all its clients share one scope (idem logs a warning,
    /// once, the first time a request with a key has an empty principal):
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .principal(|parts| parts.headers.get("x-client-cert").map_or(Vec::new(), |cert| cert.as_bytes().to_vec()))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn principal<F>(mut self, principal: F) -> Self
    where
        F: Fn(&Parts) -> Vec<u8> + Send + Sync + 'static,
    {
        self.engine.principal = Arc::new(move |parts| Some(principal(parts)));
        self
    }

    /// Scopes records by the identity the app's authentication put in the request extensions: a user id, an API
    /// key's id, a tenant, whatever type the app's middleware inserts. `principal` turns it into the bytes records
    /// are scoped by (a `String`, a `Vec<u8>`, an integer's `to_be_bytes()`).
    ///
    /// Two requests of one identity share a scope whatever credentials they carried, so a retry sent after a token
    /// refresh is replayed, not run again; two identities never share one, even when they pick the same key.
    ///
    /// A request that reaches idem **without** the extension is refused with `500 no-principal` (nothing runs and
    /// the store is not touched) and an error is logged: it means the app's authentication did not run before idem
    /// or let the request through unidentified, and scoping it to a shared anonymous scope would let two such
    /// clients receive each other's answers. So the middleware must run first: layer it outside the annotated
    /// routes, or outside [`IdempotencyLayer`](crate::layer::IdempotencyLayer) (an extractor in the handler's arguments
    /// runs too late, after the key is claimed). A route that serves anonymous clients on purpose needs
    /// [`principal`](Self::principal) with its own fallback instead.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use axum::extract::Request;
    /// use axum::middleware::{self, Next};
    /// use axum::response::Response;
    /// use axum::{Router, routing::post};
    /// use idem::{Idempotency, MemoryStore};
    ///
    /// /// Who the request is from, as the app's authentication established it.
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// async fn authenticate(mut request: Request, next: Next) -> Response {
    ///     // Verify the token (any of the user's valid tokens: rotation does not change the user).
    ///     request.extensions_mut().insert(UserId(7));
    ///     next.run(request).await
    /// }
    ///
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .principal_from_extension(|user: &UserId| user.0.to_be_bytes())
    ///     .build();
    /// let app: Router = Router::new()
    ///     .route("/payments", post(|| async { "paid" }))
    ///     .layer(idempotency.layer())
    ///     .layer(middleware::from_fn(authenticate)); // outermost: runs before idem
    /// ```
    pub fn principal_from_extension<T, P, F>(mut self, principal: F) -> Self
    where
        T: Send + Sync + 'static,
        P: Into<Vec<u8>>,
        F: Fn(&T) -> P + Send + Sync + 'static,
    {
        self.engine.principal = Arc::new(move |parts| parts.extensions.get::<T>().map(|found| principal(found).into()));
        self
    }

    /// Which keys are accepted (default [`KeyFormat::any`](crate::key::KeyFormat::any)); a key in another
    /// format is answered `400 invalid-key` before the store is touched.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::key::KeyFormat;
    /// use idem::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new()).key_format(KeyFormat::uuid()).build();
    /// # let _ = idempotency;
    /// ```
    pub fn key_format(mut self, format: crate::http::key::KeyFormat) -> Self {
        self.engine.key_format = format;
        self
    }

    /// The largest response body kept for replay (default 1 MiB). A larger or streamed body is sent through and the
    /// key recorded as not-replayable.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.engine.max_record_bytes = bytes;
        self
    }

    /// Registers `policy` under `name`, for the routes annotated `#[idempotent(policy = "name")]`: their settings then
    /// come from the app at run time (configuration, environment) rather than from literals in the attribute. A
    /// request to a route whose name is not registered is answered `500 not-configured`, and nothing runs.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, MemoryStore, Policy};
    /// use std::time::Duration;
    ///
    /// // Read from the app's configuration at start-up.
    /// let payments_ttl = Duration::from_secs(std::env::var("PAYMENTS_TTL").ok().and_then(|s| s.parse().ok()).unwrap_or(86_400));
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .route_policy("payments", Policy::new().ttl(payments_ttl).wait_timeout(Duration::from_secs(3)))
    ///     .build();
    /// assert_eq!(idempotency.route_policy("payments").unwrap().get_wait_timeout(), Duration::from_secs(3));
    /// ```
    pub fn route_policy(mut self, name: &str, policy: Policy) -> Self {
        self.engine.route_policies.insert(name.into(), policy);
        self
    }

    /// What to do when the store is unreachable (default [`StoreFailure::FailClosed`]).
    pub fn on_store_failure(mut self, policy: StoreFailure) -> Self {
        self.engine.on_store_failure = policy;
        self
    }

    /// Where the engine reports what it decides (default: nowhere). Give it a [`Counters`](crate::metrics::Counters) to read
    /// the counts in-process, or your own [`Metrics`] to export them.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, MemoryStore, metrics::Counters};
    /// use std::sync::Arc;
    /// let counters = Arc::new(Counters::new());
    /// let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
    /// # let _ = idempotency;
    /// ```
    pub fn metrics(mut self, metrics: impl Metrics) -> Self {
        self.engine.metrics = Arc::new(metrics);
        self.engine.metrics_installed = true;
        self
    }

    /// The start of every problem `type` URI the engine answers with; the problem's name is appended (default
    /// [`DEFAULT_PROBLEM_TYPE_BASE`](crate::problems::DEFAULT_PROBLEM_TYPE_BASE), the crate's documentation of each
    /// problem). Point it at your API's own documentation:
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, MemoryStore};
    /// // 409 answers then carry "type": "https://api.example.com/problems/in-progress".
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .problem_type_base("https://api.example.com/problems/")
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn problem_type_base(mut self, base: &str) -> Self {
        self.engine.answers.set_type_base(base);
        self
    }

    /// The `Retry-After` sent with `409 in-progress` (default 1 s) and with `503 store-unavailable` (default 5 s),
    /// in whole seconds rounded up, at least 1.
    pub fn retry_after(mut self, in_progress: Duration, store_unavailable: Duration) -> Self {
        self.engine.answers.set_retry_after_in_progress(in_progress);
        self.engine.answers.set_retry_after_store(store_unavailable);
        self
    }

    /// The most handlers the HTTP doors (`#[idempotent]` and [`IdempotencyLayer`](crate::layer::IdempotencyLayer)) run at
    /// once (default 10,000; `None`: no bound; 0 is taken as 1). A request beyond it is answered `503 at-capacity`
    /// with `Retry-After` (see [`retry_after_at_capacity`](Self::retry_after_at_capacity)) before the store is
    /// touched: nothing is claimed, so its retry runs once there is room. Refusals are counted as
    /// [`Event::AtCapacity`](crate::metrics::Event::AtCapacity).
    ///
    /// Why a bound by default: idem runs each handler on a task of its own, so a client that disconnects does not
    /// cancel it halfway through its side effects. That also removes the bound a server has without idem, where a
    /// handler lives only as long as its connection: a flood of requests whose clients leave at once would leave a
    /// running handler (its buffered body, its downstream calls) per request. 10,000 is far above what one process
    /// usually runs at once (handlers of 50 ms at 10,000 at once are 200,000 requests a second), so ordinary
    /// traffic never meets it, and it caps what such a flood can pile up. Set it to what your handlers' downstream
    /// (a connection pool, a payment provider's rate limit) can take.
    ///
    /// What takes a slot: every request the doors process with a key, from its claim (its body read: a client still
    /// sending one holds no slot) until its handler returns (its answer's record is written after), and every
    /// request they run unprotected (no key on a route
    /// that does not require one, or a store failure under [`StoreFailure::FailOpen`]). At the bound, replays and
    /// duplicates are refused too: telling a replay from a new key takes a store call, which claims a new key as it
    /// reads it, and a duplicate that waits may take over a released key and run; refusing them all costs one
    /// atomic operation and keeps a flood off the store. A refused replay is not lost: its record stays, and the
    /// retry after `Retry-After` replays it. A waiting duplicate holds its slot while it waits. Work run with
    /// [`Idempotency::once`] runs on the caller's own task and takes no slot.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::{Idempotency, MemoryStore};
    /// use std::time::Duration;
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .max_running_handlers(500)
    ///     .retry_after_at_capacity(Duration::from_secs(2))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn max_running_handlers(mut self, limit: impl Into<Option<usize>>) -> Self {
        let limit = limit.into().unwrap_or(usize::MAX);
        self.engine.handler_slots = Arc::new(HandlerSlots::new(limit));
        self
    }

    /// The `Retry-After` sent with `503 at-capacity` (default 1 s), in whole seconds rounded up, at least 1.
    pub fn retry_after_at_capacity(mut self, after: Duration) -> Self {
        self.engine.answers.set_retry_after_at_capacity(after);
        self
    }

    /// Whether answers carry `X-Idempotency-Signature`, the request's fingerprint (default `true`). Turn it off when
    /// clients have no use for it.
    pub fn signature_header(mut self, send: bool) -> Self {
        self.engine.answers.signature_header = send;
        self
    }

    /// Builds the engine.
    pub fn build(mut self) -> Idempotency {
        if self.engine.metrics_installed {
            let timed = Timed { inner: self.engine.store, metrics: self.engine.metrics.clone() };
            self.engine.store = Arc::new(timed);
        }
        // Over the store as the engine calls it (timed, when metrics are installed).
        self.engine.background = Background::new(self.engine.store.clone(), self.engine.running.clone());
        Idempotency { engine: Arc::new(self.engine) }
    }
}

/// The default principal: the `Authorization` header's bytes (hashed into the store key, never stored raw).
fn authorization_principal(parts: &Parts) -> Vec<u8> {
    parts.headers.get(axum::http::header::AUTHORIZATION).map(|value| value.as_bytes().to_vec()).unwrap_or_default()
}
