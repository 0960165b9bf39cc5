//! Graceful shutdown: the handler tasks the HTTP doors detach from their connections, and the store writes left to
//! the background (a completion or release retried while the store is out of reach), counted so a shutting-down
//! process can wait for them instead of dropping them halfway through.

use crate::Idempotency;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// The detached handler tasks and background store writes still running.
#[derive(Debug, Default)]
pub(crate) struct Running {
    count: AtomicUsize,
    idle: Notify,
}

/// One running task, counted until dropped (the task ended, however it ended).
pub(crate) struct RunningTask(Arc<Running>);

impl Running {
    pub(crate) fn enter(self: &Arc<Self>) -> RunningTask {
        self.count.fetch_add(1, Ordering::SeqCst);
        RunningTask(self.clone())
    }
}

impl Drop for RunningTask {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Some handler tasks (or background store writes) were still running when [`Idempotency::drain`] gave up waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} idempotent handler task(s) or background store write(s) still running after the grace period")]
pub struct Undrained(pub usize);

impl Idempotency {
    /// Waits up to `grace` for every handler this engine runs on a task of its own to finish, and for the store
    /// writes it retries in the background to land.
    ///
    /// Protected handlers run detached from their connection, so a client that disconnects cannot cancel one
    /// between its side effect and its record. The flip side is that `axum::serve(..).with_graceful_shutdown(..)`
    /// does not wait for a handler whose client already left: once it returns, the runtime would drop such a
    /// handler halfway through, and after its lease a retry would run it again. Call `drain` after `serve` returns
    /// and before the runtime ends, so those handlers finish and record their responses.
    ///
    /// ```text
    /// axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    /// if let Err(undrained) = idempotency.drain(Duration::from_secs(30)).await {
    ///     tracing::warn!(%undrained, "shutting down with handlers still running");
    /// }
    /// ```
    ///
    /// A completion (or release) that failed because the store was out of reach is retried in the background: the
    /// work ran and its answer went out, and without its record a retry after the lease would run it again. `drain`
    /// waits for those retries too (each gives up by itself once the record's ttl, or the claim's lease, has
    /// passed), so a store that comes back within the grace period still gets the record.
    ///
    /// (`examples/orders.rs` does this on SIGTERM, and the README shows it compiled.)
    pub async fn drain(&self, grace: Duration) -> Result<(), Undrained> {
        let running = &self.shared.running;
        let waited = tokio::time::timeout(grace, async {
            loop {
                let idle = running.idle.notified();
                tokio::pin!(idle);
                // Registered before the count is read, so a task ending in between still wakes this wait.
                idle.as_mut().enable();
                if running.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(_) => match running.count.load(Ordering::SeqCst) {
                0 => Ok(()),
                still => Err(Undrained(still)),
            },
        }
    }

    /// How many handlers this engine is running on tasks of their own right now, and store writes it is retrying
    /// in the background (see [`Idempotency::drain`]).
    pub fn running_handlers(&self) -> usize {
        self.shared.running.count.load(Ordering::SeqCst)
    }
}
