//! What the Redis and PostgreSQL stores share to wake waiting duplicates: a waiter's registration with the
//! connection that receives completions, and that connection's reconnection backoff.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, timeout_at};

/// The first pause before connecting again after a failed attempt, doubled per failure up to [`LAST_RETRY`].
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest pause between attempts; a connection that stayed up this long is replaced at once when it drops.
pub(super) const LAST_RETRY: Duration = Duration::from_secs(2);

/// The next pause before reconnecting, given the last one and how long the connection that just ended lived.
pub(super) fn next_retry(last: Option<Duration>, lived: Duration) -> Option<Duration> {
    if lived >= LAST_RETRY {
        return None;
    }
    Some(last.map_or(FIRST_RETRY, |last| (last * 2).min(LAST_RETRY)))
}

/// The registry a waiter registers with: it knows whether completions of a key are being received.
pub(super) trait Announcements: Send + Sync + 'static {
    /// Whether every completion of `key` announced from now on will be received.
    fn is_announced(&self, key: &str) -> bool;
    /// A waiter on `key` is gone.
    fn leave(&self, key: &str);
}

/// One waiter on one key; leaves the registry when dropped.
pub(super) struct Registration<A: Announcements> {
    announcements: Arc<A>,
    key: String,
    /// Woken when the key is announced, when the connection starts receiving, and when it drops.
    notify: Arc<Notify>,
    /// Armed before the key was seen announced, so nothing announced after that is missed.
    armed: Option<Pin<Box<OwnedNotified>>>,
}

impl<A: Announcements> Registration<A> {
    /// A waiter on `key`, already counted in `announcements` (which woke it through `notify`).
    pub(super) fn new(announcements: Arc<A>, key: &str, notify: Arc<Notify>) -> Self {
        Self { announcements, key: key.to_owned(), notify, armed: None }
    }

    /// Waits until completions of the key are received: `false` if that did not happen by `deadline`.
    pub(super) async fn ready(&mut self, deadline: Instant) -> bool {
        loop {
            let mut notified = Box::pin(self.notify.clone().notified_owned());
            notified.as_mut().enable();
            if self.announcements.is_announced(&self.key) {
                self.armed = Some(notified);
                return true;
            }
            if timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// After [`Registration::ready`]: waits until the key is announced, the connection drops (the waiter must
    /// re-check), or `until`.
    pub(super) async fn notified(&mut self, until: Instant) {
        if let Some(notified) = self.armed.take() {
            let _ = timeout_at(until, notified).await;
        }
    }
}

impl<A: Announcements> Drop for Registration<A> {
    fn drop(&mut self) {
        self.announcements.leave(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnections_back_off_unless_the_connection_lived_long() {
        assert_eq!(next_retry(None, Duration::ZERO), Some(FIRST_RETRY));
        assert_eq!(next_retry(Some(FIRST_RETRY), Duration::ZERO), Some(FIRST_RETRY * 2));
        assert_eq!(next_retry(Some(LAST_RETRY), Duration::ZERO), Some(LAST_RETRY));
        assert_eq!(next_retry(Some(LAST_RETRY), LAST_RETRY), None);
    }
}
