//! Whether a remote store answers, known without asking it on every request: calls fail at once while it is down,
//! and a background probe (the store's own) finds it again.
//!
//! Without this, every request during an outage paid the connection's timeouts (9 s and more per request with
//! redis-rs' default reconnect backoff; PostgreSQL's connect timeout, 1 s, per request), and a connection that broke
//! while nobody used it failed the first request after the store came back.

use crate::store::error::{Cause, StoreError};
use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A store's view of its server: up, or down since some time with some error.
pub(crate) struct Health {
    /// The server's name in messages: `redis`, `postgres`.
    backend: &'static str,
    down: AtomicBool,
    outage: Mutex<Option<Outage>>,
    probing: AtomicBool,
}

struct Outage {
    since: Instant,
    error: String,
}

impl Health {
    pub(crate) fn new(backend: &'static str) -> Self {
        Self { backend, down: AtomicBool::new(false), outage: Mutex::new(None), probing: AtomicBool::new(false) }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// `Err` at once while the server is known to be down: the request is answered without touching the network.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if !self.is_down() {
            return Ok(());
        }
        let backend = self.backend;
        let message = match &*self.outage() {
            Some(outage) => format!(
                "{backend}: unreachable for {} ms (last error: {}); probing in the background",
                outage.since.elapsed().as_millis(),
                outage.error
            ),
            None => format!("{backend}: unreachable; probing in the background"),
        };
        Err(StoreError::Unavailable(Cause::unsent(message)))
    }

    /// A call found no connection, or no answer in time.
    pub(crate) fn mark_down(&self, error: &dyn Display) {
        let mut outage = self.outage();
        match &mut *outage {
            Some(outage) => outage.error = error.to_string(),
            None => {
                let backend = self.backend;
                tracing::warn!(%error, "{backend} unreachable: failing requests at once until it answers again");
                *outage = Some(Outage { since: Instant::now(), error: error.to_string() });
            }
        }
        self.down.store(true, Ordering::Release);
    }

    pub(crate) fn mark_up(&self) {
        let mut outage = self.outage();
        if let Some(outage) = outage.take() {
            let backend = self.backend;
            tracing::info!(down_ms = outage.since.elapsed().as_millis() as u64, "{backend} answers again");
        }
        self.down.store(false, Ordering::Release);
    }

    /// Whether the caller is the one to start the probe: `true` once, until [`Health::probe_ended`].
    pub(crate) fn claim_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// The probe ended (or could not start): the next caller may start another.
    pub(crate) fn probe_ended(&self) {
        self.probing.store(false, Ordering::Release);
    }
}
