//! How the protocol reports an owner-checked write that did not land.

use crate::metrics::{Event, Metrics};
use crate::store::contract::{StoreKey, Write};
use crate::store::error::StoreError;

pub(crate) fn report_write(metrics: &dyn Metrics, key: &StoreKey, operation: &str, write: &Result<Write, StoreError>) {
    match write {
        Ok(Write::Applied) => {}
        Ok(Write::Fenced) => {
            metrics.record(Event::Fenced);
            tracing::warn!(key = %key, operation, "stale owner fenced: its claim had expired, nothing was written");
        }
        Err(error) => {
            metrics.record(Event::StoreError);
            tracing::error!(key = %key, operation, %error, "idempotency store write failed");
        }
    }
}
