#![warn(missing_docs)]
//! The `#[idempotent]` attribute of [idem](https://docs.rs/axum-idem). Use it through the `axum-idem` crate (library `idem`):
//! `use idem::idempotent;`. This crate only parses and generates; all behaviour lives in `idem-runtime`.

mod args;
mod expand;
mod policy;
mod spans;

use proc_macro::TokenStream;

/// Makes an axum handler exactly-once per `Idempotency-Key`.
///
/// ```text
/// #[idempotent(ttl = 60, wait_timeout = 3.0, validate_signature)]
/// async fn create_order(State(db): State<Db>, Json(order): Json<Order>) -> impl IntoResponse { /* ... */ }
/// ```
///
/// Arguments (all optional):
/// - `ttl = 86400`: seconds a completed response is kept and replayed (not zero);
/// - `wait_timeout = 0`: seconds a duplicate waits for the in-flight original (0 answers 409 at once);
/// - `lease = 30`: seconds an in-flight claim lives without renewal (renewed while the handler runs; not zero;
///   by default 30 s, or `ttl` when that is shorter);
/// - `validate_signature` (or `= bool`, default true): refuse a reused key with a different request (422);
/// - `required` (or `= bool`, default true): refuse a request without a key (400);
/// - `store_server_errors` (or `= bool`, default false): also store 5xx answers (at-most-once routes);
/// - `state = AppState`: the router's state type, when it cannot be inferred from a single `State<T>` argument;
/// - `crate = "path::to::idem"`: where the `idem` crate is, when renamed.
///
/// Durations are plain seconds: an integer or float literal without a suffix (`ttl = 0.5`, not `ttl = 500ms`),
/// exact to the nanosecond, at most 10⁹. Or a const (a path, or any const expression) of type `u64` (seconds),
/// `f64` (seconds) or `std::time::Duration`:
///
/// ```text
/// const ORDER_TTL: u64 = 3600;
/// const WAIT: Duration = Duration::from_millis(500);
///
/// #[idempotent(ttl = ORDER_TTL, wait_timeout = WAIT, lease = ORDER_TTL / 60)]
/// ```
///
/// A const is held to the same rules as a literal (`ttl` and `lease` not zero, `lease` and `wait_timeout` not above
/// `ttl`, in range), checked when the compiler evaluates it.
///
/// The handler must be a non-generic `async fn`; misuse is a compile error on the offending token, a const's
/// included.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(attr.into(), item.into()).into()
}
