//! What `#[idempotent]` expands to call. Not a public API: its shape follows the macro's.

use crate::engine::Idempotency;
use crate::http::problem::Problem;
use axum::extract::{FromRef, Request};

/// Finds the app's engine: in the state when `Idempotency: FromRef<S>`, else in the request extensions.
pub fn locate(request: &Request, from_state: Option<Idempotency>) -> Option<Idempotency> {
    from_state.or_else(|| request.extensions().get::<Idempotency>().cloned())
}

/// Autoref specialisation on the state type (concrete in generated code): `(&StateProbe(&state)).idempotency()`
/// resolves to [`ViaState`] when `Idempotency: FromRef<S>` and to [`NoState`] otherwise.
#[allow(missing_debug_implementations)]
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
    Problem::NotConfigured {
        reason: "The server has no idempotency engine for this route: add `Idempotency` to the app state (with \
                 `FromRef`) or install it with `.layer(Extension(idempotency))`.",
    }
    .into_response()
}

/// The answer when an annotated route names a policy its engine does not have: nothing runs.
pub fn policy_not_registered(name: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    tracing::error!(policy = name, "#[idempotent(policy = ..)] names a policy the engine does not have");
    Problem::NotConfigured {
        reason: "This route's idempotency policy is not registered with the engine \
                 (`Idempotency::builder(..).route_policy(name, policy)`).",
    }
    .into_response()
}

/// The largest duration `#[idempotent]` accepts, in seconds: the macro's bound on literals, kept equal to it.
const MAX_SECONDS: u64 = 1_000_000_000;

/// The types a `ttl`, `wait_timeout` or `lease` given as a const may have: `u64` seconds, `f64` seconds, or a
/// `Duration`. Selecting the conversion through [`DurationConst::Seconds`] (rather than an inherent method alone)
/// makes another type one error in the user's terms instead of a "no method found" on this module's types.
#[diagnostic::on_unimplemented(
    message = "`ttl`, `wait_timeout` and `lease` take a `u64` or `f64` number of seconds or a `Duration`, not `{Self}`",
    label = "`{Self}` is not a duration"
)]
pub trait DurationConst: Sized {
    /// Always `Seconds<Self>`: it names the type whose inherent `nanos` converts `Self`.
    type Seconds;
}

impl DurationConst for u64 {
    type Seconds = Seconds<u64>;
}

impl DurationConst for f64 {
    type Seconds = Seconds<f64>;
}

impl DurationConst for std::time::Duration {
    type Seconds = Seconds<std::time::Duration>;
}

/// A duration from a const, converted to nanoseconds in const context by [`Seconds::nanos`].
#[allow(missing_debug_implementations)]
pub struct Seconds<T>(T);

/// Wraps a const's value for conversion; the bound reports any other type against the user's expression.
pub const fn seconds<T: DurationConst<Seconds = Seconds<T>>>(value: T) -> T::Seconds {
    Seconds(value)
}

/// Why a const duration cannot be a route's duration. The generated code turns each into a compile error naming
/// the argument.
#[derive(Debug, PartialEq, Eq)]
pub enum OutOfRange {
    /// Below zero.
    Negative,
    /// Above 10⁹ seconds (about 31 years).
    TooLarge,
    /// Positive but under half a nanosecond, so it would silently become zero.
    BelowNanosecond,
    /// A NaN.
    NotANumber,
}

impl Seconds<u64> {
    /// Whole seconds in nanoseconds.
    pub const fn nanos(self) -> Result<u64, OutOfRange> {
        if self.0 > MAX_SECONDS {
            return Err(OutOfRange::TooLarge);
        }
        Ok(self.0 * 1_000_000_000)
    }
}

impl Seconds<f64> {
    /// Seconds in nanoseconds, to the nearest nanosecond.
    pub const fn nanos(self) -> Result<u64, OutOfRange> {
        let secs = self.0;
        if secs.is_nan() {
            return Err(OutOfRange::NotANumber);
        }
        // -0.0 is zero, not negative: a computed zero may carry the sign.
        if secs < 0.0 {
            return Err(OutOfRange::Negative);
        }
        if secs > MAX_SECONDS as f64 {
            return Err(OutOfRange::TooLarge);
        }
        let nanos = (secs * 1e9).round();
        if nanos == 0.0 && secs > 0.0 {
            return Err(OutOfRange::BelowNanosecond);
        }
        Ok(nanos as u64)
    }
}

impl Seconds<std::time::Duration> {
    /// The duration in nanoseconds.
    pub const fn nanos(self) -> Result<u64, OutOfRange> {
        let nanos = self.0.as_nanos();
        if nanos > MAX_SECONDS as u128 * 1_000_000_000 {
            return Err(OutOfRange::TooLarge);
        }
        Ok(nanos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn whole_seconds_up_to_the_bound() {
        assert_eq!(seconds(60_u64).nanos(), Ok(60_000_000_000));
        assert_eq!(seconds(0_u64).nanos(), Ok(0));
        assert_eq!(seconds(MAX_SECONDS).nanos(), Ok(MAX_SECONDS * 1_000_000_000));
        assert_eq!(seconds(MAX_SECONDS + 1).nanos(), Err(OutOfRange::TooLarge));
        assert_eq!(seconds(u64::MAX).nanos(), Err(OutOfRange::TooLarge));
    }

    #[test]
    fn float_seconds_to_the_nearest_nanosecond() {
        assert_eq!(seconds(2.5).nanos(), Ok(2_500_000_000));
        // 0.1 is not exact in binary; it still means 100 ms.
        assert_eq!(seconds(0.1).nanos(), Ok(100_000_000));
        assert_eq!(seconds(6e-10).nanos(), Ok(1));
        assert_eq!(seconds(-0.0).nanos(), Ok(0));
        assert_eq!(seconds(1e9).nanos(), Ok(1_000_000_000_000_000_000));
    }

    #[test]
    fn float_seconds_out_of_range() {
        assert_eq!(seconds(4e-10).nanos(), Err(OutOfRange::BelowNanosecond));
        assert_eq!(seconds(-1e-12).nanos(), Err(OutOfRange::Negative));
        assert_eq!(seconds(f64::NEG_INFINITY).nanos(), Err(OutOfRange::Negative));
        assert_eq!(seconds(1.000_001e9).nanos(), Err(OutOfRange::TooLarge));
        assert_eq!(seconds(f64::INFINITY).nanos(), Err(OutOfRange::TooLarge));
        assert_eq!(seconds(f64::NAN).nanos(), Err(OutOfRange::NotANumber));
    }

    #[test]
    fn durations_keep_their_nanoseconds() {
        assert_eq!(seconds(Duration::from_millis(1_500)).nanos(), Ok(1_500_000_000));
        assert_eq!(seconds(Duration::from_nanos(1)).nanos(), Ok(1));
        assert_eq!(seconds(Duration::from_secs(MAX_SECONDS)).nanos(), Ok(MAX_SECONDS * 1_000_000_000));
        assert_eq!(
            seconds(Duration::from_secs(MAX_SECONDS) + Duration::from_nanos(1)).nanos(),
            Err(OutOfRange::TooLarge)
        );
        assert_eq!(seconds(Duration::MAX).nanos(), Err(OutOfRange::TooLarge));
    }

    /// The conversion runs where the macro puts it: in a const initializer.
    #[test]
    fn converts_in_const_context() {
        const NANOS: Result<u64, OutOfRange> = seconds(0.25).nanos();
        assert_eq!(NANOS, Ok(250_000_000));
    }
}
