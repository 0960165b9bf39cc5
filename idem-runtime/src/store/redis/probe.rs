//! The Redis store's background probe: it keeps the store's [`Health`](crate::store::health::Health) true.

use super::connection::Commands;
use crate::StoreError;
use std::sync::{Arc, Weak};

/// Starts the probe of `commands` once, on the current Tokio runtime (none yet: a later call starts it). It holds
/// the commands weakly, so it ends with the store.
pub(super) fn start(commands: &Arc<Commands>) {
    if !commands.tracks_health() || !commands.health.claim_probe() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(probe(Arc::downgrade(commands)))),
        Err(_) => commands.health.probe_ended(),
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
