//! Graceful shutdown: the handler tasks the HTTP doors detach from their connections, and the store writes left to
//! the background (a completion or release retried while the store is out of reach), counted so a shutting-down
//! process can wait for them instead of dropping them halfway through.

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

/// Some handler tasks (or background store writes) were still running when
/// [`Idempotency::drain`](crate::Idempotency::drain) gave up waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} idempotent handler task(s) or background store write(s) still running after the grace period")]
pub struct Undrained(pub usize);

impl Running {
    /// Waits up to `grace` for every counted task to end (see [`Idempotency::drain`]).
    ///
    /// [`Idempotency::drain`]: crate::engine::Idempotency::drain
    pub(crate) async fn drained(&self, grace: Duration) -> Result<(), Undrained> {
        let running = self;
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

    /// How many tasks are counted now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}
