//! RFC 9457 `application/problem+json` answers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Where the default problem `type` URIs point: the page documenting every problem, one anchor per name.
pub const DEFAULT_PROBLEM_TYPE_BASE: &str = "https://docs.rs/axum-idem/latest/idem/problems/index.html#";

/// Every answer the engine makes itself, as an RFC 9457 problem.
///
/// The `type` of each is a stable URI ending in the name listed on each variant: by default
/// `https://docs.rs/axum-idem/latest/idem/problems/index.html#<name>`, a link to its documentation in
/// [`crate::problems`], as the IETF idempotency-key draft asks; an app can point them at its own documentation with
/// [`IdempotencyBuilder::problem_type_base`](crate::IdempotencyBuilder::problem_type_base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `missing-key` (400): the route requires a key and none was sent.
    MissingKey {
        /// The header name expected.
        header: String,
    },
    /// `invalid-key` (400): the key is malformed or repeated.
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// `key-reused` (422): the key was used before for a different request.
    KeyReused,
    /// `in-progress` (409, with `Retry-After`): the original request is still running.
    InProgress,
    /// `store-unavailable` (503, with `Retry-After`): the store could not be reached; nothing ran.
    StoreUnavailable,
    /// `payload-too-large` (413): the request body is over the route's limit.
    PayloadTooLarge,
    /// `unreadable-body` (400): the request body could not be read (the client stopped sending it).
    UnreadableBody,
    /// `not-replayable` (409): the original completed but its response was too large or streamed to keep.
    NotReplayable {
        /// The status the original answer had.
        status: u16,
    },
    /// `handler-panicked` (500): the handler panicked; nothing was stored, a retry runs again.
    HandlerPanicked,
    /// `not-configured` (500): a server misconfiguration: an annotated handler found no `Idempotency` in the app
    /// state or extensions, a handler asked for its key or fence where idem does not protect it, or took `Tx` on an
    /// engine whose store is not PostgreSQL.
    NotConfigured {
        /// What is misconfigured, sent as the problem's `detail`.
        reason: &'static str,
    },
    /// `corrupt-record` (500): the store holds something under this key that is not a record idem can read
    /// (damaged, of another type, or written by a newer version). Nothing ran and nothing is replayed; the key stays
    /// unusable until the entry expires or an operator removes it.
    CorruptRecord,
    /// `transaction-failed` (503, with `Retry-After`): the handler ran in a database transaction (`Tx`) that could
    /// not be committed, so its effects were not kept (or, if only the commit's reply was lost, they were
    /// kept together with the answer). The key is released: a retry replays what committed or runs again.
    TransactionFailed,
    /// `no-principal` (500): the engine scopes records by an identity the app's authentication puts in the request
    /// extensions ([`principal_from_extension`](crate::IdempotencyBuilder::principal_from_extension)), and this
    /// request reached it without one. Nothing ran and the store was not touched.
    NoPrincipal,
    /// `at-capacity` (503, with `Retry-After`): the engine already runs as many handlers as
    /// [`max_running_handlers`](crate::IdempotencyBuilder::max_running_handlers) allows. Nothing ran and the store
    /// was not touched.
    AtCapacity,
}

/// How the engine words the answers it makes itself; set on the [`IdempotencyBuilder`](crate::IdempotencyBuilder).
#[derive(Debug, Clone)]
pub(crate) struct Answers {
    type_base: Arc<str>,
    retry_after_in_progress: HeaderValue,
    retry_after_store: HeaderValue,
    retry_after_at_capacity: HeaderValue,
    pub(crate) signature_header: bool,
}

impl Default for Answers {
    fn default() -> Self {
        Self {
            type_base: DEFAULT_PROBLEM_TYPE_BASE.into(),
            retry_after_in_progress: HeaderValue::from_static("1"),
            retry_after_store: HeaderValue::from_static("5"),
            retry_after_at_capacity: HeaderValue::from_static("1"),
            signature_header: true,
        }
    }
}

impl Answers {
    pub(crate) fn set_type_base(&mut self, base: &str) {
        self.type_base = base.into();
    }

    pub(crate) fn set_retry_after_in_progress(&mut self, after: Duration) {
        self.retry_after_in_progress = retry_after(after);
    }

    pub(crate) fn set_retry_after_store(&mut self, after: Duration) {
        self.retry_after_store = retry_after(after);
    }

    pub(crate) fn set_retry_after_at_capacity(&mut self, after: Duration) {
        self.retry_after_at_capacity = retry_after(after);
    }

    /// `problem` as a response, with this app's `type` URIs and `Retry-After` values.
    pub(crate) fn render(&self, problem: Problem) -> Response {
        let body = serde_json::json!({
            "type": format!("{}{}", self.type_base, problem.name()),
            "title": problem.title(),
            "status": problem.status().as_u16(),
            "detail": problem.detail(),
        });
        let mut response = (problem.status(), body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match problem {
            Problem::InProgress => {
                headers.insert(header::RETRY_AFTER, self.retry_after_in_progress.clone());
            }
            Problem::StoreUnavailable | Problem::TransactionFailed => {
                headers.insert(header::RETRY_AFTER, self.retry_after_store.clone());
            }
            Problem::AtCapacity => {
                headers.insert(header::RETRY_AFTER, self.retry_after_at_capacity.clone());
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` in whole seconds, rounded up: a client told 0 would retry at once into the same answer.
fn retry_after(after: Duration) -> HeaderValue {
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

impl Problem {
    /// The stable name the `type` URI ends in.
    pub fn name(&self) -> &'static str {
        match self {
            Problem::MissingKey { .. } => "missing-key",
            Problem::InvalidKey { .. } => "invalid-key",
            Problem::KeyReused => "key-reused",
            Problem::InProgress => "in-progress",
            Problem::StoreUnavailable => "store-unavailable",
            Problem::PayloadTooLarge => "payload-too-large",
            Problem::UnreadableBody => "unreadable-body",
            Problem::NotReplayable { .. } => "not-replayable",
            Problem::HandlerPanicked => "handler-panicked",
            Problem::NotConfigured { .. } => "not-configured",
            Problem::CorruptRecord => "corrupt-record",
            Problem::TransactionFailed => "transaction-failed",
            Problem::NoPrincipal => "no-principal",
            Problem::AtCapacity => "at-capacity",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::MissingKey { .. } | Problem::InvalidKey { .. } | Problem::UnreadableBody => {
                StatusCode::BAD_REQUEST
            }
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::InProgress | Problem::NotReplayable { .. } => StatusCode::CONFLICT,
            Problem::StoreUnavailable | Problem::TransactionFailed | Problem::AtCapacity => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Problem::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::HandlerPanicked
            | Problem::NotConfigured { .. }
            | Problem::CorruptRecord
            | Problem::NoPrincipal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn title(&self) -> &'static str {
        match self {
            Problem::MissingKey { .. } => "Idempotency key required",
            Problem::InvalidKey { .. } => "Invalid idempotency key",
            Problem::KeyReused => "Idempotency key reused",
            Problem::InProgress => "Request in progress",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::PayloadTooLarge => "Payload too large",
            Problem::UnreadableBody => "Unreadable request body",
            Problem::NotReplayable { .. } => "Response not replayable",
            Problem::HandlerPanicked => "Handler failed",
            Problem::NotConfigured { .. } => "Idempotency not configured",
            Problem::CorruptRecord => "Idempotency record unreadable",
            Problem::TransactionFailed => "Transaction not committed",
            Problem::NoPrincipal => "Client not identified",
            Problem::AtCapacity => "Server at capacity",
        }
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            Problem::MissingKey { header } => format!("This endpoint requires an `{header}` header."),
            Problem::InvalidKey { reason } => {
                format!("{reason}. A key is 1-255 printable ASCII characters, sent in one header.")
            }
            Problem::KeyReused => {
                "This idempotency key was already used for a different request; use a new key.".to_owned()
            }
            Problem::InProgress => {
                "A request with this idempotency key is still being processed; retry later.".to_owned()
            }
            Problem::StoreUnavailable => {
                "The idempotency store could not be reached; the request was not processed. Retry later.".to_owned()
            }
            Problem::PayloadTooLarge => "The request body is larger than this endpoint accepts.".to_owned(),
            Problem::UnreadableBody => "The request body could not be read in full.".to_owned(),
            Problem::NotReplayable { status } => format!(
                "The request with this key completed (status {status}) but its response was too large or streamed \
                 to be stored; it will not be run again."
            ),
            Problem::HandlerPanicked => "The request failed; nothing was recorded, so it can be retried.".to_owned(),
            Problem::NotConfigured { reason } => (*reason).to_owned(),
            Problem::CorruptRecord => "The idempotency store holds an unreadable entry for this key; the request was \
                 not processed and nothing was replayed. Use a new key, or ask the operator to remove the entry."
                .to_owned(),
            Problem::TransactionFailed => "The request's database transaction could not be committed, so none of its \
                 effects were kept (unless the database committed it and only its reply was lost). Retry with the same \
                 key: the retry returns the committed answer, or runs the request again."
                .to_owned(),
            Problem::NoPrincipal => "The server could not tell which client sent this request, so it did not process \
                 it. Authenticate and retry; if you did, the server's authentication is misconfigured."
                .to_owned(),
            Problem::AtCapacity => "The server is running as many requests as it allows at once; this one was not \
                 processed. Retry with the same key after the delay."
                .to_owned(),
        }
    }
}

impl IntoResponse for Problem {
    /// With the default `type` URIs and `Retry-After` values; the engine renders with the app's own settings.
    fn into_response(self) -> Response {
        static DEFAULT: LazyLock<Answers> = LazyLock::new(Answers::default);
        DEFAULT.render(self)
    }
}
