//! Whether Redis answers, known without asking it on every request: calls fail at once while it is down, and a
//! background probe finds it again.
//!
//! Without this, every request during an outage paid the connection's reconnect backoff (9 s and more per request
//! with redis-rs' defaults), and a connection that broke while nobody used it failed the first request after Redis
//! came back.

use super::connection::Commands;
use crate::StoreError;
use redis::RedisError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// The store's view of Redis: up, or down since some time with some error.
#[derive(Default)]
pub(super) struct Health {
    down: AtomicBool,
    outage: Mutex<Option<Outage>>,
    probing: AtomicBool,
}

struct Outage {
    since: Instant,
    error: String,
}

impl Health {
    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// `Err` at once while Redis is known to be down: the request is answered without touching the network.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if !self.is_down() {
            return Ok(());
        }
        let message = match &*self.outage() {
            Some(outage) => format!(
                "redis: unreachable for {} ms (last error: {}); probing in the background",
                outage.since.elapsed().as_millis(),
                outage.error
            ),
            None => "redis: unreachable; probing in the background".to_owned(),
        };
        Err(StoreError::Unavailable(message.into()))
    }

    /// A call found no connection, or no answer in time.
    pub(super) fn mark_down(&self, error: &RedisError) {
        let mut outage = self.outage();
        match &mut *outage {
            Some(outage) => outage.error = error.to_string(),
            None => {
                tracing::warn!(%error, "redis unreachable: failing requests at once until it answers again");
                *outage = Some(Outage { since: Instant::now(), error: error.to_string() });
            }
        }
        self.down.store(true, Ordering::Release);
    }

    fn mark_up(&self) {
        let mut outage = self.outage();
        if let Some(outage) = outage.take() {
            tracing::info!(down_ms = outage.since.elapsed().as_millis() as u64, "redis answers again");
        }
        self.down.store(false, Ordering::Release);
    }

    /// Starts the probe of `commands` once, on the current Tokio runtime (none yet: a later call starts it). It
    /// holds the commands weakly, so it ends with the store.
    pub(super) fn start_probe(&self, commands: &Arc<Commands>) {
        if !commands.tracks_health() || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(probe(Arc::downgrade(commands)))),
            Err(_) => self.probing.store(false, Ordering::Release),
        }
    }
}

/// Every probe interval: a `PING` while Redis is up (a connection that broke while idle is replaced before a
/// request finds it), a reconnection attempt while it is down (the first answer marks it up). The `PING` is bounded
/// by the store's timeouts, so a frozen server cannot stall the probe.
async fn probe(commands: Weak<Commands>) {
    loop {
        let Some(interval) = commands.upgrade().map(|commands| commands.timeouts.probe_interval) else { return };
        tokio::time::sleep(interval).await;
        let Some(commands) = commands.upgrade() else { return };
        match commands.ping().await {
            Ok(()) => commands.health.mark_up(),
            // A connection failure marked it down already; a server error (`LOADING` while a restarted Redis
            // reads its data, `NOAUTH`) leaves the state as it was: requests see that error themselves.
            Err(error) => {
                let error = StoreError::from(error);
                tracing::debug!(%error, "redis probe failed");
            }
        }
    }
}
