//! Per-route settings: the arguments of `#[idempotent(...)]`.

use std::time::Duration;

/// How one route (or the plain API call) treats idempotency keys. Const-constructible, so the macro can keep it in
/// a `static`.
///
/// Durations saturate rather than fail: each is at most [`Policy::MAX_DURATION`] (about 31 years, which every store
/// and clock can represent), `ttl` is at least a millisecond and `lease` at least [`Policy::MIN_LEASE`].
///
/// ```
/// # use idem_runtime as idem;
/// use idem::Policy;
/// use std::time::Duration;
/// const ORDERS: Policy = Policy::new().ttl(Duration::from_secs(60)).wait_timeout(Duration::from_secs(3));
/// assert!(ORDERS.get_validate_signature());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    ttl: Duration,
    wait_timeout: Duration,
    lease: Duration,
    validate_signature: bool,
    required: bool,
    store_server_errors: bool,
    body: BodyFingerprint,
}

/// What of a request's body makes two requests with one key "the same request" (see
/// [`Policy::fingerprint_body`]). The method, path, query and the engine's fingerprinted headers always count.
///
/// ```
/// # use idem_runtime as idem;
/// use idem::{BodyFingerprint, Policy};
/// // A client that stamps each attempt with its own `sent_at` and `attempt` still retries the same request.
/// const PAYMENTS: Policy = Policy::new().fingerprint_body(BodyFingerprint::JsonIgnoring(&["/sent_at", "/meta/attempt"]));
/// # let _ = PAYMENTS;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFingerprint {
    /// The body's bytes as sent (the default): any difference, even whitespace, is another request.
    #[default]
    Bytes,
    /// The body as JSON in a canonical form (object members sorted, no whitespace): two encodings of one document
    /// are the same request. A body that is not JSON is taken as bytes.
    Json,
    /// As [`Json`](Self::Json), without the members the JSON pointers (RFC 6901) name, such as `"/sent_at"` or
    /// `"/meta/nonce"`: fields a client changes on every attempt (a timestamp, a nonce) do not make a retry another
    /// request. Pointers that name nothing are skipped.
    JsonIgnoring(&'static [&'static str]),
    /// Not at all: a key reused with any other body is the same request (only method, path, query and headers
    /// count).
    Ignored,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

/// `duration`, limited to `min..=Policy::MAX_DURATION`.
const fn clamp(duration: Duration, min: Duration) -> Duration {
    if duration.as_nanos() > Policy::MAX_DURATION.as_nanos() {
        Policy::MAX_DURATION
    } else if duration.as_nanos() < min.as_nanos() {
        min
    } else {
        duration
    }
}

impl Policy {
    /// The longest `ttl`, `lease` or `wait_timeout` kept: 10⁹ seconds (about 31 years). Longer ones are cut to it.
    pub const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);

    /// The shortest lease kept: 30 ms, so renewing every third of it stays a timer, not a busy loop.
    pub const MIN_LEASE: Duration = Duration::from_millis(30);

    /// The macro's defaults: `ttl` 24 h, `wait_timeout` 0, `lease` 30 s, signature validated, key required,
    /// 5xx not stored.
    pub const fn new() -> Self {
        Self {
            ttl: Duration::from_secs(86_400),
            wait_timeout: Duration::ZERO,
            lease: Duration::from_secs(30),
            validate_signature: true,
            required: true,
            store_server_errors: false,
            body: BodyFingerprint::Bytes,
        }
    }

    /// How long a completed response is kept and replayed.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = clamp(ttl, Duration::from_millis(1));
        self
    }

    /// How long a duplicate waits for an in-flight original before answering `409 in-progress` (zero: at once).
    pub const fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = clamp(wait_timeout, Duration::ZERO);
        self
    }

    /// How long an in-flight claim lives without renewal. The engine renews it every third of this while the
    /// handler runs (a failed renewal is retried every twentieth of it until one lands), so a crashed process blocks
    /// its keys for at most one lease.
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = clamp(lease, Self::MIN_LEASE);
        self
    }

    /// Whether a reused key with a different request is refused with `422 key-reused`.
    pub const fn validate_signature(mut self, validate: bool) -> Self {
        self.validate_signature = validate;
        self
    }

    /// Whether a request without a key is refused with `400 missing-key` (else it runs unprotected).
    pub const fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Whether 5xx answers (and panics) are stored too, making the route at-most-once rather than retryable.
    pub const fn store_server_errors(mut self, store: bool) -> Self {
        self.store_server_errors = store;
        self
    }

    /// What of the body counts in the request's fingerprint (default [`BodyFingerprint::Bytes`]). The signature check
    /// (`validate_signature`) and the `X-Idempotency-Signature` header use this fingerprint.
    pub const fn fingerprint_body(mut self, body: BodyFingerprint) -> Self {
        self.body = body;
        self
    }

    /// See [`Policy::fingerprint_body`].
    pub const fn get_fingerprint_body(&self) -> BodyFingerprint {
        self.body
    }

    /// See [`Policy::ttl`].
    pub const fn get_ttl(&self) -> Duration {
        self.ttl
    }

    /// See [`Policy::wait_timeout`].
    pub const fn get_wait_timeout(&self) -> Duration {
        self.wait_timeout
    }

    /// See [`Policy::lease`].
    pub const fn get_lease(&self) -> Duration {
        self.lease
    }

    /// See [`Policy::validate_signature`].
    pub const fn get_validate_signature(&self) -> bool {
        self.validate_signature
    }

    /// See [`Policy::required`].
    pub const fn get_required(&self) -> bool {
        self.required
    }

    /// See [`Policy::store_server_errors`].
    pub const fn get_store_server_errors(&self) -> bool {
        self.store_server_errors
    }
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreFailure {
    /// Answer `503 store-unavailable` with `Retry-After`; the handler does not run (the default).
    #[default]
    FailClosed,
    /// Run the handler unprotected and log an error: availability over exactly-once.
    FailOpen,
}
