//! How a store call fails: [`StoreError`], and the [`Cause`] behind it.

use std::fmt;

/// A store failed; the engine answers `503 store-unavailable` (or runs unprotected when fail-open is chosen).
///
/// Its [`source`](std::error::Error::source) is the backend's own error (a `redis::RedisError`, a `sqlx::Error`),
/// when there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or answered with an error.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The store is at its configured bound and cannot take a new claim.
    #[error("idempotency store is full: {0}")]
    Full(#[source] Cause),
    /// A record read back from the store could not be decoded.
    #[error("idempotency store returned a corrupt record: {0}")]
    Corrupt(#[source] Cause),
    /// The store does not implement this optional operation ([`Store::inspect`], [`Store::forget`]).
    ///
    /// [`Store::inspect`]: crate::store::contract::Store::inspect
    /// [`Store::forget`]: crate::store::contract::Store::forget
    #[error("this idempotency store does not support `{0}`")]
    Unsupported(&'static str),
    /// A store's constructor refused its configuration (a URL that does not parse, a `rediss://` URL in a build
    /// without TLS, a key prefix the store cannot use): retrying cannot help, unlike [`StoreError::Unavailable`].
    #[error("idempotency store misconfigured: {0}")]
    InvalidConfig(#[source] Cause),
}

impl StoreError {
    /// Whether the failed call was refused before it reached the backend, so it cannot have taken effect (see
    /// [`Cause::unsent`]).
    pub fn is_unsent(&self) -> bool {
        match self {
            StoreError::Unavailable(cause) | StoreError::Full(cause) => cause.is_unsent(),
            _ => false,
        }
    }
}

/// What went wrong in a store call: a message for people, and the backend's error that caused it, when there is
/// one (as [`source`](std::error::Error::source)).
///
/// ```
/// # use idem_runtime as idem;
/// use idem::store::{Cause, StoreError};
/// use std::error::Error;
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = StoreError::Unavailable(Cause::with_source("my-store: connection refused", refused));
/// assert_eq!(error.to_string(), "idempotency store unavailable: my-store: connection refused");
/// let io = error.source().and_then(Error::source).and_then(|cause| cause.downcast_ref::<std::io::Error>());
/// assert_eq!(io.map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused));
/// ```
#[derive(Debug)]
pub struct Cause {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    unsent: bool,
}

impl Cause {
    /// A cause with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), source: None, unsent: false }
    }

    /// A cause with a message and the backend's error behind it.
    pub fn with_source(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { message: message.into(), source: Some(Box::new(source)), unsent: false }
    }

    /// A call refused before anything was sent to the backend (it is known to be down, say): the call cannot have
    /// taken effect. The engine then leaves nothing to clean up behind it; a failure that may have reached the
    /// backend (a timeout, a broken connection) is made with [`Cause::new`] instead.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::store::{Cause, StoreError};
    /// let refused = StoreError::Unavailable(Cause::unsent("my-store: known down, probing in the background"));
    /// assert!(refused.is_unsent());
    /// assert!(!StoreError::Unavailable("my-store: timed out".into()).is_unsent());
    /// ```
    pub fn unsent(message: impl Into<String>) -> Self {
        Self { message: message.into(), source: None, unsent: true }
    }

    /// Whether the call was refused before it was sent (see [`Cause::unsent`]).
    pub fn is_unsent(&self) -> bool {
        self.unsent
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}
