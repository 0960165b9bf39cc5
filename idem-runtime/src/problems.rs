//! The problems idem answers with: what each means and what a client should do. Each problem's `type` URI links
//! to its section here (see [`Problem`](crate::Problem)); every body is RFC 9457 `application/problem+json` with
//! `type`, `title`, `status` and `detail`.
//!
//! # missing-key
//! **400.** The route requires an `Idempotency-Key` header and the request has none. Nothing ran. Send the request
//! again with a key: a fresh unique value (a UUID) per operation, the same value on every retry of it.
//!
//! # invalid-key
//! **400.** The key is empty, longer than 255 characters, has characters outside printable ASCII, does not match
//! the server's key format, or was sent in more than one header. Nothing ran.
//!
//! # key-reused
//! **422.** The key was used before for a different request (another body, path, method or fingerprinted header).
//! Nothing ran. Use a new key for a new operation.
//!
//! # in-progress
//! **409**, with `Retry-After`. A request with this key is still running (or its runner stopped and its lease has
//! not run out yet). Nothing ran. Retry after the delay: the retry gets the original's answer once it completes.
//!
//! # store-unavailable
//! **503**, with `Retry-After`. The server could not reach its idempotency store, so it could not tell whether this
//! request already ran; it did not run it. Retry with the same key.
//!
//! # payload-too-large
//! **413.** The body is larger than the route accepts. Nothing ran and the store was not touched.
//!
//! # unreadable-body
//! **400.** The body could not be read in full (the client stopped sending it). Nothing ran.
//!
//! # not-replayable
//! **409.** The request with this key completed, but its response was too large or streamed to be kept, so it
//! cannot be replayed. It will not run again; the key is spent.
//!
//! # handler-panicked
//! **500.** The handler failed. Nothing was recorded: a retry with the same key runs it again.
//!
//! # not-configured
//! **500.** A server misconfiguration: the route is annotated but the server has no idempotency engine installed,
//! or a handler asked for its key or fence on a route idem does not protect.
//!
//! # corrupt-record
//! **500.** The store holds something under this key that the server cannot read (damaged, of another type, or
//! written by a newer version). Nothing ran and nothing was replayed; use a new key or ask the operator to remove
//! the entry.
//!
//! # transaction-failed
//! **503**, with `Retry-After`. The handler ran inside a database transaction (a `Tx` on a PostgreSQL store) that
//! could not be committed, so none of its effects were kept, unless the database committed and only its reply was
//! lost, in which case its effects and its answer were kept together. Retry with the same key: the retry gets the
//! committed answer, or runs the request again on a clean database.
//!
//! # no-principal
//! **500.** The server scopes idempotency records by the client its authentication identified, and this request
//! reached idem without an identity (its authentication did not run first, or let the request through
//! unidentified). Nothing ran and the store was not touched. Authenticate; if the request was authenticated, the
//! server is misconfigured.
//!
//! # at-capacity
//! **503**, with `Retry-After`. The server is running as many handlers at once as it allows (handlers keep running
//! after their clients disconnect, so it bounds them). Nothing ran and nothing was recorded for the key, whether it
//! was new, completed or in flight. Retry with the same key after the delay: the retry runs it, or replays its
//! answer.

/// The start of every problem `type` URI, unless the app sets its own with
/// [`IdempotencyBuilder::problem_type_base`](crate::IdempotencyBuilder::problem_type_base).
pub use crate::http::problem::DEFAULT_PROBLEM_TYPE_BASE;
