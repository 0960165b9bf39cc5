//! Exactly-once HTTP handlers for axum.
//!
//! See the README for the quick start; the items below are re-exported from `idem-runtime`.

pub use idem_macros::idempotent;
pub use idem_runtime::*;

/// What `#[idempotent]` expands to use. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use axum::extract::{FromRequest, FromRequestParts, Request, State};
    pub use axum::response::{IntoResponse, Response};
    pub use idem_runtime::macro_support::*;
    pub use idem_runtime::{Execution, Policy};
}

/// The README's code blocks, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
