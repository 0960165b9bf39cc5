//! What `#[idempotent]` expands to call. Not a public API: its shape follows the macro's.

use crate::Idempotency;
use axum::extract::{FromRef, Request};

/// Finds the app's engine: in the state when `Idempotency: FromRef<S>`, else in the request extensions.
pub fn locate(request: &Request, from_state: Option<Idempotency>) -> Option<Idempotency> {
    from_state.or_else(|| request.extensions().get::<Idempotency>().cloned())
}

/// Autoref specialisation on the state type (concrete in generated code): `(&StateProbe(&state)).idempotency()`
/// resolves to [`ViaState`] when `Idempotency: FromRef<S>` and to [`NoState`] otherwise.
pub struct StateProbe<'a, S>(pub &'a S);

/// Taken when the state provides the engine.
pub trait ViaState {
    /// The engine from the state.
    fn idempotency(&self) -> Option<Idempotency>;
}

impl<S> ViaState for StateProbe<'_, S>
where
    Idempotency: FromRef<S>,
{
    fn idempotency(&self) -> Option<Idempotency> {
        Some(Idempotency::from_ref(self.0))
    }
}

/// Taken when it does not.
pub trait NoState {
    /// Nothing: look in the extensions.
    fn idempotency(&self) -> Option<Idempotency>;
}

impl<S> NoState for &StateProbe<'_, S> {
    fn idempotency(&self) -> Option<Idempotency> {
        None
    }
}

/// The answer when an annotated handler runs in an app without an engine: never a silent pass-through.
pub fn not_configured(handler: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    tracing::error!(
        handler,
        "#[idempotent] handler called but no `Idempotency` is in the app state or the request extensions"
    );
    crate::Problem::NotConfigured.into_response()
}
