//! The engine: the state one [`Idempotency`] handle shares with every door, and the handle itself.
//!
//! `Idempotency` is defined here, beside the state it wraps, so that the doors can take it and the state without
//! importing `idempotency.rs`, which offers the doors as the handle's methods (its whole public surface is there).

use crate::capacity::HandlerSlots;
use crate::drain::Running;
use crate::http::key::KeyFormat;
use crate::http::problem::Answers;
use crate::metrics::{Labeled, Metrics};
use crate::policy::{Policy, StoreFailure};
use crate::protocol::background::Background;
use crate::store::contract::Store;
use axum::http::HeaderName;
use axum::http::request::Parts;
use std::collections::HashMap;
use std::sync::Arc;

/// The engine's principal, whichever way it was set: `None` when the request names no client the engine may scope
/// it by, and is refused with `500 no-principal` (see
/// [`IdempotencyBuilder::principal_from_extension`](crate::builder::IdempotencyBuilder::principal_from_extension)).
pub(crate) type ScopeFn = Arc<dyn Fn(&Parts) -> Option<Vec<u8>> + Send + Sync>;

/// The idempotency engine of an app: a store plus app-wide settings. Cheap to clone (one `Arc`).
///
/// Annotated handlers find it in the app state (when `Idempotency: FromRef<YourState>`) or in the request
/// extensions (`.layer(Extension(idempotency))`).
///
/// ```
/// # use idem_runtime as idem;
/// use axum::http::{HeaderName, header::CONTENT_TYPE};
/// use idem::{Idempotency, MemoryStore};
/// let idempotency = Idempotency::builder(MemoryStore::new())
///     .fingerprint_headers([CONTENT_TYPE, HeaderName::from_static("x-tenant")])
///     .max_record_bytes(512 * 1024)
///     .build();
/// # let _ = idempotency;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) engine: Arc<Engine>,
}

/// The state of one engine, shared by its handle's clones and every door.
pub(crate) struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key_header: HeaderName,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) principal: ScopeFn,
    pub(crate) max_record_bytes: usize,
    pub(crate) on_store_failure: StoreFailure,
    /// The policies routes name with `#[idempotent(policy = "..")]`, set at run time.
    pub(crate) route_policies: HashMap<Box<str>, Policy>,
    pub(crate) metrics: Arc<dyn Metrics>,
    /// Whether [`IdempotencyBuilder::metrics`](crate::builder::IdempotencyBuilder::metrics) installed metrics: only then are events labelled and store calls
    /// timed, which costs an allocation and a clock read per request.
    pub(crate) metrics_installed: bool,
    /// The handler tasks the HTTP doors detached from their connections, for [`Idempotency::drain`](crate::Idempotency::drain).
    pub(crate) running: Arc<Running>,
    /// The lease keeper of the engine's claims and the store writes it finishes in the background.
    pub(crate) background: Arc<Background>,
    /// The bound on handlers running at once, which the HTTP doors take a slot of before they touch the store.
    pub(crate) handler_slots: Arc<HandlerSlots>,
    /// How the engine words its own answers.
    pub(crate) answers: Answers,
    pub(crate) key_format: KeyFormat,
    /// The store as a [`PostgresStore`](crate::store::postgres::PostgresStore), when it is one: handlers can then take
    /// [`Tx`](crate::tx::extract::Tx) and commit their writes with their records.
    #[cfg(feature = "postgres")]
    pub(crate) transactions: Option<Arc<crate::store::postgres::PostgresStore>>,
    /// Whether a request without a principal was already reported (once per engine).
    pub(crate) unscoped_reported: std::sync::atomic::AtomicBool,
}

impl Engine {
    /// The metrics one request reports to: labelled with its door and route when metrics are installed.
    pub(crate) fn metrics_at(&self, door: &'static str, route: &str) -> Arc<dyn Metrics> {
        if !self.metrics_installed {
            return self.metrics.clone();
        }
        Arc::new(Labeled { inner: self.metrics.clone(), door, route: route.into() })
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
            .field("key_header", &self.engine.key_header)
            .field("fingerprint_headers", &self.engine.fingerprint_headers)
            .field("max_record_bytes", &self.engine.max_record_bytes)
            .field("on_store_failure", &self.engine.on_store_failure)
            .finish_non_exhaustive()
    }
}
