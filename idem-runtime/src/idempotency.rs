//! The app-wide handle: one store and the settings every route shares.

use crate::metrics::{Metrics, NoMetrics};
use crate::store::Store;
use crate::{MemoryStore, Policy};
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode};
use std::sync::Arc;
use std::time::Duration;

/// A function of the request that names who is asking; records are scoped by it so one client never receives
/// another's stored response.
pub type PrincipalFn = Arc<dyn Fn(&Parts) -> Vec<u8> + Send + Sync>;

/// The engine's principal, whichever way it was set: `None` when the request names no client the engine may scope
/// it by, and is refused with `500 no-principal` (see [`IdempotencyBuilder::principal_from_extension`]).
pub(crate) type ScopeFn = Arc<dyn Fn(&Parts) -> Option<Vec<u8>> + Send + Sync>;

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreFailure {
    /// Answer `503 store-unavailable` with `Retry-After`; the handler does not run (the default).
    #[default]
    FailClosed,
    /// Run the handler unprotected and log an error: availability over exactly-once.
    FailOpen,
}

/// The idempotency engine of an app: a store plus app-wide settings. Cheap to clone (one `Arc`).
///
/// Annotated handlers find it in the app state (when `Idempotency: FromRef<YourState>`) or in the request
/// extensions (`.layer(Extension(idempotency))`).
///
/// ```
/// use axum::http::{HeaderName, header::CONTENT_TYPE};
/// use idem_runtime::{Idempotency, MemoryStore};
/// let idempotency = Idempotency::builder(MemoryStore::new())
///     .fingerprint_headers([CONTENT_TYPE, HeaderName::from_static("x-tenant")])
///     .max_record_bytes(512 * 1024)
///     .build();
/// # let _ = idempotency;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key_header: HeaderName,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) principal: ScopeFn,
    pub(crate) max_record_bytes: usize,
    pub(crate) on_store_failure: StoreFailure,
    pub(crate) layer_policy: Policy,
    pub(crate) layer_body_limit: usize,
    pub(crate) metrics: Arc<dyn Metrics>,
    /// Whether [`IdempotencyBuilder::metrics`] installed metrics: only then are events labelled and store calls
    /// timed, which costs an allocation and a clock read per request.
    pub(crate) metrics_installed: bool,
    /// Statuses the layer sends but never stores, since it cannot tell whether the handler answered them.
    pub(crate) layer_unstored: Vec<StatusCode>,
    /// The handler tasks the HTTP doors detached from their connections, for [`Idempotency::drain`].
    pub(crate) running: Arc<crate::drain::Running>,
    /// The lease keeper of the engine's claims and the store writes it finishes in the background.
    pub(crate) background: Arc<crate::engine::Background>,
    /// The bound on handlers running at once, which the HTTP doors take a slot of before they touch the store.
    pub(crate) handler_slots: Arc<crate::capacity::HandlerSlots>,
    /// How the engine words its own answers.
    pub(crate) answers: crate::http::Answers,
    pub(crate) key_format: crate::http::key::KeyFormat,
    /// The store as a [`PostgresStore`](crate::PostgresStore), when it is one: handlers can then take
    /// [`Tx`](crate::Tx) and commit their writes with their records.
    #[cfg(feature = "postgres")]
    pub(crate) transactions: Option<Arc<crate::PostgresStore>>,
    /// Whether a request without a principal was already reported (once per engine).
    unscoped_reported: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The metrics one request reports to: labelled with its door and route when metrics are installed.
    pub(crate) fn metrics_at(&self, door: &'static str, route: &str) -> Arc<dyn Metrics> {
        if !self.metrics_installed {
            return self.metrics.clone();
        }
        Arc::new(crate::metrics::Labeled { inner: self.metrics.clone(), door, route: route.into() })
    }

    /// Reports, once per engine, that a request was scoped to no principal: every such request shares one scope,
    /// so two clients choosing the same key would share one record. The default principal reads only the
    /// `Authorization` header; apps authenticating by cookie, mTLS or a gateway header must set their own.
    pub(crate) fn warn_unscoped_once(&self) {
        use std::sync::atomic::Ordering;
        // A read first: after the report, every such request only reads the flag (no write to a shared line).
        if !self.unscoped_reported.load(Ordering::Relaxed) && !self.unscoped_reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "idempotency: a request with a key had no principal (the default principal is the Authorization \
                 header, and it was absent), so it shares one record scope with every other such request. If \
                 clients authenticate another way (cookie, mTLS, gateway header), set \
                 `Idempotency::builder(..).principal(..)` to name the client; this is reported once"
            );
        }
    }
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("key_header", &self.shared.key_header)
            .field("fingerprint_headers", &self.shared.fingerprint_headers)
            .field("max_record_bytes", &self.shared.max_record_bytes)
            .field("on_store_failure", &self.shared.on_store_failure)
            .field("layer_policy", &self.shared.layer_policy)
            .field("layer_body_limit", &self.shared.layer_body_limit)
            .finish_non_exhaustive()
    }
}

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
        let store = Arc::new(store);
        let running: Arc<crate::drain::Running> = Arc::default();
        let background = crate::engine::Background::new(store.clone(), running.clone());
        IdempotencyBuilder {
            shared: Shared {
                #[cfg(feature = "postgres")]
                transactions: (&store as &dyn std::any::Any).downcast_ref::<Arc<crate::PostgresStore>>().cloned(),
                store,
                key_header: HeaderName::from_static("idempotency-key"),
                fingerprint_headers: vec![HeaderName::from_static("content-type")],
                principal: Arc::new(|parts| Some(authorization_principal(parts))),
                max_record_bytes: 1 << 20,
                on_store_failure: StoreFailure::FailClosed,
                layer_policy: Policy::new().required(false),
                layer_body_limit: 2 << 20,
                metrics: Arc::new(NoMetrics),
                metrics_installed: false,
                layer_unstored: LAYER_UNSTORED.to_vec(),
                running,
                background,
                handler_slots: Arc::new(crate::capacity::HandlerSlots::new(
                    crate::capacity::DEFAULT_MAX_RUNNING_HANDLERS,
                )),
                answers: crate::http::Answers::default(),
                key_format: crate::http::key::KeyFormat::any(),
                unscoped_reported: std::sync::atomic::AtomicBool::new(false),
            },
        }
    }

    /// The store behind this engine.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }
}

/// What the layer never stores by default: answers that routing, extractors and middleware give without the handler
/// running (a malformed body, an unknown route, a rate limit, missing credentials), which a retry must be able to
/// get past. The same set `axum-idempotent` and Stripe leave unstored.
const LAYER_UNSTORED: [StatusCode; 11] = [
    StatusCode::BAD_REQUEST,
    StatusCode::UNAUTHORIZED,
    StatusCode::FORBIDDEN,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::REQUEST_TIMEOUT,
    StatusCode::CONFLICT,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::UNSUPPORTED_MEDIA_TYPE,
    StatusCode::UNPROCESSABLE_ENTITY,
    StatusCode::TOO_MANY_REQUESTS,
];

/// The default principal: the `Authorization` header's bytes (hashed into the store key, never stored raw).
fn authorization_principal(parts: &Parts) -> Vec<u8> {
    parts.headers.get(axum::http::header::AUTHORIZATION).map(|value| value.as_bytes().to_vec()).unwrap_or_default()
}

/// Configures an [`Idempotency`]; made by [`Idempotency::builder`].
pub struct IdempotencyBuilder {
    shared: Shared,
}

impl std::fmt::Debug for IdempotencyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyBuilder")
            .field("key_header", &self.shared.key_header)
            .field("fingerprint_headers", &self.shared.fingerprint_headers)
            .field("key_format", &self.shared.key_format)
            .field("max_record_bytes", &self.shared.max_record_bytes)
            .field("on_store_failure", &self.shared.on_store_failure)
            .field("handler_slots", &self.shared.handler_slots)
            .finish_non_exhaustive()
    }
}

impl IdempotencyBuilder {
    /// The header carrying the key (default `Idempotency-Key`).
    ///
    /// ```
    /// use axum::http::HeaderName;
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .key_header(HeaderName::from_static("x-request-key"))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.shared.key_header = name;
        self
    }

    /// Request headers that are part of the fingerprint, besides method, path, query and body
    /// (default `content-type`).
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.shared.fingerprint_headers = names.into_iter().collect();
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
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .principal(|parts| parts.headers.get("x-client-cert").map_or(Vec::new(), |cert| cert.as_bytes().to_vec()))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn principal<F>(mut self, principal: F) -> Self
    where
        F: Fn(&Parts) -> Vec<u8> + Send + Sync + 'static,
    {
        self.shared.principal = Arc::new(move |parts| Some(principal(parts)));
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
    /// routes, or outside [`IdempotencyLayer`](crate::IdempotencyLayer) (an extractor in the handler's arguments
    /// runs too late, after the key is claimed). A route that serves anonymous clients on purpose needs
    /// [`principal`](Self::principal) with its own fallback instead.
    ///
    /// ```
    /// use axum::extract::Request;
    /// use axum::middleware::{self, Next};
    /// use axum::response::Response;
    /// use axum::{Router, routing::post};
    /// use idem_runtime::{Idempotency, MemoryStore};
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
        self.shared.principal = Arc::new(move |parts| parts.extensions.get::<T>().map(|found| principal(found).into()));
        self
    }

    /// Which keys are accepted (default [`KeyFormat::any`](crate::http::key::KeyFormat::any)); a key in another
    /// format is answered `400 invalid-key` before the store is touched.
    ///
    /// ```
    /// use idem_runtime::http::key::KeyFormat;
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// let idempotency = Idempotency::builder(MemoryStore::new()).key_format(KeyFormat::uuid()).build();
    /// # let _ = idempotency;
    /// ```
    pub fn key_format(mut self, format: crate::http::key::KeyFormat) -> Self {
        self.shared.key_format = format;
        self
    }

    /// The largest response body kept for replay (default 1 MiB). A larger or streamed body is sent through and the
    /// key recorded as not-replayable.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.shared.max_record_bytes = bytes;
        self
    }

    /// What to do when the store is unreachable (default [`StoreFailure::FailClosed`]).
    pub fn on_store_failure(mut self, policy: StoreFailure) -> Self {
        self.shared.on_store_failure = policy;
        self
    }

    /// The settings the router-wide [`IdempotencyLayer`](crate::IdempotencyLayer) applies to routes that are not
    /// annotated (default: [`Policy::new`] with `required(false)`).
    pub fn layer_policy(mut self, policy: Policy) -> Self {
        self.shared.layer_policy = policy;
        self
    }

    /// Statuses the [`IdempotencyLayer`](crate::IdempotencyLayer) sends through but never stores on routes that are
    /// not annotated, where it cannot tell a handler's answer from a rejection by an extractor, the router or a
    /// middleware further in. A retry then runs again. Default: 400, 401, 403, 404, 405, 408, 409, 413, 415, 422
    /// and 429 (5xx follow the layer policy's `store_server_errors`). Annotated routes tell the two apart and store
    /// every answer their handler gives.
    ///
    /// ```
    /// use axum::http::StatusCode;
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// // A plain handler whose own 409 is a final answer worth replaying:
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .layer_unstored_statuses([StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::TOO_MANY_REQUESTS])
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn layer_unstored_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.shared.layer_unstored = statuses.into_iter().collect();
        self
    }

    /// The largest request body the [`IdempotencyLayer`](crate::IdempotencyLayer) buffers to fingerprint it
    /// (default 2 MiB, axum's default); a larger one is answered `413 payload-too-large`. Annotated handlers keep
    /// using axum's `DefaultBodyLimit` instead.
    pub fn layer_body_limit(mut self, bytes: usize) -> Self {
        self.shared.layer_body_limit = bytes;
        self
    }

    /// Where the engine reports what it decides (default: nowhere). Give it a [`Counters`](crate::Counters) to read
    /// the counts in-process, or your own [`Metrics`] to export them.
    ///
    /// ```
    /// use idem_runtime::{Counters, Idempotency, MemoryStore};
    /// use std::sync::Arc;
    /// let counters = Arc::new(Counters::new());
    /// let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
    /// # let _ = idempotency;
    /// ```
    pub fn metrics(mut self, metrics: impl Metrics) -> Self {
        self.shared.metrics = Arc::new(metrics);
        self.shared.metrics_installed = true;
        self
    }

    /// The start of every problem `type` URI the engine answers with; the problem's name is appended (default
    /// [`DEFAULT_PROBLEM_TYPE_BASE`](crate::http::DEFAULT_PROBLEM_TYPE_BASE), the crate's documentation of each
    /// problem). Point it at your API's own documentation:
    ///
    /// ```
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// // 409 answers then carry "type": "https://api.example.com/problems/in-progress".
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .problem_type_base("https://api.example.com/problems/")
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn problem_type_base(mut self, base: &str) -> Self {
        self.shared.answers.set_type_base(base);
        self
    }

    /// The `Retry-After` sent with `409 in-progress` (default 1 s) and with `503 store-unavailable` (default 5 s),
    /// in whole seconds rounded up, at least 1.
    pub fn retry_after(mut self, in_progress: Duration, store_unavailable: Duration) -> Self {
        self.shared.answers.set_retry_after_in_progress(in_progress);
        self.shared.answers.set_retry_after_store(store_unavailable);
        self
    }

    /// The most handlers the HTTP doors (`#[idempotent]` and [`IdempotencyLayer`](crate::IdempotencyLayer)) run at
    /// once (default 10,000; `None`: no bound; 0 is taken as 1). A request beyond it is answered `503 at-capacity`
    /// with `Retry-After` (see [`retry_after_at_capacity`](Self::retry_after_at_capacity)) before the store is
    /// touched: nothing is claimed, so its retry runs once there is room. Refusals are counted as
    /// [`Event::AtCapacity`](crate::Event::AtCapacity).
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
    /// use idem_runtime::{Idempotency, MemoryStore};
    /// use std::time::Duration;
    /// let idempotency = Idempotency::builder(MemoryStore::new())
    ///     .max_running_handlers(500)
    ///     .retry_after_at_capacity(Duration::from_secs(2))
    ///     .build();
    /// # let _ = idempotency;
    /// ```
    pub fn max_running_handlers(mut self, limit: impl Into<Option<usize>>) -> Self {
        let limit = limit.into().unwrap_or(usize::MAX);
        self.shared.handler_slots = Arc::new(crate::capacity::HandlerSlots::new(limit));
        self
    }

    /// The `Retry-After` sent with `503 at-capacity` (default 1 s), in whole seconds rounded up, at least 1.
    pub fn retry_after_at_capacity(mut self, after: Duration) -> Self {
        self.shared.answers.set_retry_after_at_capacity(after);
        self
    }

    /// Whether answers carry `X-Idempotency-Signature`, the request's fingerprint (default `true`). Turn it off when
    /// clients have no use for it.
    pub fn signature_header(mut self, send: bool) -> Self {
        self.shared.answers.signature_header = send;
        self
    }

    /// Builds the engine.
    pub fn build(mut self) -> Idempotency {
        if self.shared.metrics_installed {
            let timed = crate::store::timed::Timed { inner: self.shared.store, metrics: self.shared.metrics.clone() };
            self.shared.store = Arc::new(timed);
        }
        // Over the store as the engine calls it (timed, when metrics are installed).
        self.shared.background = crate::engine::Background::new(self.shared.store.clone(), self.shared.running.clone());
        Idempotency { shared: Arc::new(self.shared) }
    }
}
