//! The one decision every door makes from what claim-or-wait found: run the work, replay, refuse, or run unprotected.
//! Each door only says how it answers a [`Decision`] (an HTTP problem, a `OnceError`), never what to do.

use crate::policy::StoreFailure;
use crate::protocol::begin::{Begun, Outcome};
use crate::protocol::claim::Claim;
use crate::record::Record;
use crate::store::error::StoreError;

/// What a door does with a request, from [`decide`].
pub(crate) enum Decision {
    /// The key is this request's: run the work under the claim.
    Execute(Claim),
    /// The work already ran: answer with its record.
    Replay(Record),
    /// Answer without running anything.
    Refuse(Refusal),
    /// The store failed under [`StoreFailure::FailOpen`]: run the work without a claim.
    RunUnprotected,
}

/// Why a request is answered without running.
pub(crate) enum Refusal {
    /// The original is still running after the wait.
    InFlight,
    /// The key was used for another request.
    Mismatch,
    /// The store holds a record nobody can read: not an outage, so even fail-open refuses (running the work would
    /// ignore what the store holds).
    Corrupt(StoreError),
    /// The store could not answer (fail closed).
    StoreUnavailable(StoreError),
}

/// Decides, records the outcome in the current span (`outcome`, `wait_ms`) and logs store failures.
pub(crate) fn decide(begun: Begun, on_store_failure: StoreFailure) -> Decision {
    let span = tracing::Span::current();
    if let Some(waited) = begun.waited {
        span.record("wait_ms", u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
    }
    let (outcome, decision) = match begun.result {
        Ok(Outcome::Execute(claim)) => ("new", Decision::Execute(claim)),
        Ok(Outcome::Replay(record)) => ("hit", Decision::Replay(record)),
        Ok(Outcome::InFlight) => ("conflict", Decision::Refuse(Refusal::InFlight)),
        Ok(Outcome::Mismatch) => ("mismatch", Decision::Refuse(Refusal::Mismatch)),
        Err(error @ StoreError::Corrupt(_)) => {
            tracing::error!(%error, "idempotency record unreadable: refused, nothing ran");
            ("corrupt-record", Decision::Refuse(Refusal::Corrupt(error)))
        }
        Err(error) => match on_store_failure {
            StoreFailure::FailClosed => {
                tracing::error!(%error, "idempotency store failed: refused, nothing ran (fail closed)");
                ("store-error", Decision::Refuse(Refusal::StoreUnavailable(error)))
            }
            StoreFailure::FailOpen => {
                tracing::error!(%error, "idempotency store failed: running unprotected (fail open)");
                ("store-error-fail-open", Decision::RunUnprotected)
            }
        },
    };
    span.record("outcome", outcome);
    decision
}
