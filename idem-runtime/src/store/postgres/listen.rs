//! Waking waiting duplicates: one `LISTEN` connection per store, its notifications fanned out in-process.
//!
//! Every completion, release and purge runs `pg_notify(<channel>, <key digest>)` in the statement that makes it,
//! so PostgreSQL delivers it when that statement commits. The store has one channel (named after its table, never
//! after client bytes) and one background task holding one connection that listens on it; waiters never touch the
//! network here. They register their key in [`Registry`] (a map under a std mutex, held for a few map operations)
//! and wait on the key's [`Notify`]; the task wakes a key's waiters when its digest arrives.
//!
//! No lost wake-ups: a waiter arms its [`Notify`] first, then checks that the connection is listening, and only
//! then re-reads its row. A completion committed after that re-read is announced on a connection that was already
//! listening, so it reaches the armed waiter.
//!
//! The network can only delay the task, never a waiter past its own deadline. Connecting, `LISTEN` and an idle
//! heartbeat (`SELECT 1` on the listening connection) each have a timeout; a connection that misses one, errs or
//! closes (`pg_terminate_backend`, a restart) is dropped and replaced with a bounded backoff, and every waiter is
//! woken to re-check its key, since a completion announced while it was down was missed.

use crate::store::wakeup::{self, Announcements, next_retry};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// What the listening connection's `application_name` ends with.
pub(super) const LISTENER_NAME: &str = "(idem listener)";

/// How the task guards its connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListenSettings {
    /// Longest wait for a connection, the `LISTEN` or a heartbeat's answer.
    pub(super) timeout: Duration,
    /// How long the connection may stay silent before a heartbeat checks it.
    pub(super) heartbeat: Duration,
}

struct KeyWaiters {
    /// Woken when a notification names the key, when the connection starts listening, and when it drops.
    notify: Arc<Notify>,
    count: usize,
}

#[derive(Default)]
struct RegistryState {
    /// Whether the current connection's `LISTEN` is confirmed: every notification from now on arrives.
    listening: bool,
    keys: HashMap<String, KeyWaiters>,
}

/// The keys with waiters, shared by the waiters and the task.
#[derive(Default)]
pub(super) struct Registry {
    state: Mutex<RegistryState>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(&self, key: &str) -> Arc<Notify> {
        let mut state = self.lock();
        let entry = state.keys.entry(key.to_owned()).or_insert_with(|| KeyWaiters { notify: Arc::default(), count: 0 });
        entry.count += 1;
        entry.notify.clone()
    }

    fn remove(&self, key: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.keys.get_mut(key) {
            entry.count -= 1;
            if entry.count == 0 {
                state.keys.remove(key);
            }
        }
    }

    fn is_listening(&self) -> bool {
        self.lock().listening
    }

    /// Sets whether the connection listens, and wakes every waiter: to start trusting notifications, or to
    /// re-check its key because some may have been missed.
    fn set_listening(&self, listening: bool) {
        let mut state = self.lock();
        state.listening = listening;
        for entry in state.keys.values() {
            entry.notify.notify_waiters();
        }
    }

    fn wake(&self, key: &str) {
        if let Some(entry) = self.lock().keys.get(key) {
            entry.notify.notify_waiters();
        }
    }
}

/// With one connection listening to every key, a key is announced once that connection listens.
impl Announcements for Registry {
    fn is_announced(&self, _: &str) -> bool {
        self.is_listening()
    }

    fn leave(&self, key: &str) {
        self.remove(key);
    }
}

/// A registered waiter; dropping it leaves the registry.
pub(super) type Registration = wakeup::Registration<Registry>;

/// The store's side of notifications: the registry, and the task it starts on first use (and again if the runtime
/// that ran it shut down).
pub(super) struct Listener {
    registry: Arc<Registry>,
    options: PgConnectOptions,
    channel: String,
    settings: ListenSettings,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Listener {
    /// A listener on `channel`, connecting with `options` under the application name `<name> (idem listener)`, so
    /// the connection is recognisable in `pg_stat_activity`.
    pub(super) fn new(options: PgConnectOptions, channel: String, settings: ListenSettings) -> Self {
        let name = match options.get_application_name() {
            Some(name) => format!("{name} {LISTENER_NAME}"),
            None => LISTENER_NAME.to_owned(),
        };
        let options = options.application_name(&name);
        Self { registry: Arc::default(), options, channel, settings, task: Mutex::new(None) }
    }

    /// Registers a waiter on `key` (a digest). Must run inside a Tokio runtime: the task is spawned on first use.
    pub(super) fn register(&self, key: &str) -> Registration {
        self.ensure_task();
        let notify = self.registry.join(key);
        Registration::new(self.registry.clone(), key, notify)
    }

    /// Whether the listening connection is up and its `LISTEN` confirmed.
    pub(super) fn is_listening(&self) -> bool {
        self.registry.is_listening()
    }

    /// Starts the task if it is not running.
    pub(super) fn ensure_task(&self) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let (registry, options, channel, settings) =
            (self.registry.clone(), self.options.clone(), self.channel.clone(), self.settings);
        *task = Some(tokio::spawn(async move { run(&registry, &options, &channel, settings).await }));
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// Connects, listens, serves the connection until it fails, and starts again, for as long as the store lives.
async fn run(registry: &Registry, options: &PgConnectOptions, channel: &str, settings: ListenSettings) {
    // A task that replaces one whose runtime shut down starts with nothing listening.
    registry.set_listening(false);
    let mut retry = None;
    loop {
        if let Some(pause) = retry {
            sleep(pause).await;
        }
        let started = Instant::now();
        let ended = match timeout(settings.timeout, connect(options, channel)).await {
            Ok(Ok(listener)) => serve(listener, registry, settings).await,
            Ok(Err(error)) => format!("connecting failed: {error}"),
            Err(_) => format!("connecting timed out after {:?}", settings.timeout),
        };
        registry.set_listening(false);
        if retry.is_none() {
            tracing::warn!(reason = %ended, "the connection that wakes waiting duplicates is down; replacing it");
        } else {
            tracing::debug!(reason = %ended, "the PostgreSQL listening connection is still down");
        }
        retry = next_retry(retry, started.elapsed());
    }
}

async fn connect(options: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    // A pool of one, of its own, so listening never holds one of the application's connections, and a replaced
    // connection is a new one rather than a pooled one that may be as dead as the last.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    // A lost connection is reported at once, so waiters re-check their keys before anything else is tried.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}

/// Delivers notifications until the connection fails: returns why.
async fn serve(mut listener: PgListener, registry: &Registry, settings: ListenSettings) -> String {
    registry.set_listening(true);
    loop {
        // `try_recv` is cancel-safe (it leaves a partly read message in the buffer), so the heartbeat may cut it.
        match timeout(settings.heartbeat, listener.try_recv()).await {
            Ok(Ok(Some(notification))) => registry.wake(notification.payload()),
            Ok(Ok(None)) => return "the connection closed".to_owned(),
            Ok(Err(error)) => return error.to_string(),
            Err(_) => match timeout(settings.timeout, sqlx::query("SELECT 1").execute(&mut listener)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return format!("heartbeat failed: {error}"),
                Err(_) => return format!("heartbeat unanswered after {:?}", settings.timeout),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_deadline_while_nothing_listens() {
        let registry = Arc::new(Registry::default());
        let notify = registry.join("k");
        let mut registration = Registration::new(registry.clone(), "k", notify);
        let started = Instant::now();
        assert!(!registration.ready(started + Duration::from_secs(3)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        drop(registration);
        assert!(registry.lock().keys.is_empty(), "nothing left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_listening_waiter_is_woken_by_its_key_and_by_a_lost_connection_not_by_another_key() {
        for (wake, woken) in [("k", true), ("other", false), ("lost", true)] {
            let registry = Arc::new(Registry::default());
            let notify = registry.join("k");
            let mut registration = Registration::new(registry.clone(), "k", notify);
            let confirm = tokio::spawn({
                let registry = registry.clone();
                async move {
                    sleep(Duration::from_secs(1)).await;
                    registry.set_listening(true);
                }
            });
            let started = Instant::now();
            assert!(registration.ready(started + Duration::from_secs(60)).await);
            assert_eq!(started.elapsed(), Duration::from_secs(1));
            confirm.await.unwrap();
            // Announced before the waiter even starts waiting: still not missed.
            match wake {
                "lost" => registry.set_listening(false),
                key => registry.wake(key),
            }
            registration.notified(started + Duration::from_secs(60)).await;
            let expected = if woken { Duration::from_secs(1) } else { Duration::from_secs(60) };
            assert_eq!(started.elapsed(), expected, "{wake}");
        }
    }
}
