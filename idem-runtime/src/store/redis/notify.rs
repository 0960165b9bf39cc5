//! Waking waiters: one pub/sub subscription per channel with waiters, shared by all of them, dispatched in-process.
//!
//! Waiters never touch the network here. They register in [`Waiters`] (a map under a std mutex, held for a few
//! map operations) and nudge the store's one background link task, which owns the subscriptions: it reconciles the
//! channels Redis has subscribed with the channels that have waiters (one `SUBSCRIBE` or `UNSUBSCRIBE` for many
//! channels at once) and marks channels confirmed. A waiter re-reads its key only once its channel is confirmed, so
//! a completion that lands in between still wakes it: no lost wake-ups, no polling. Since only the link task
//! (un)subscribes, a last waiter leaving and a new one arriving can never reorder an `UNSUBSCRIBE` after a
//! `SUBSCRIBE`.
//!
//! The network can only delay the link task, never a waiter past its own deadline. Every connect, pub/sub command
//! and idle heartbeat `PING` has a timeout; a link that misses one, errs or closes is dropped and replaced (with a
//! bounded backoff), every channel with waiters is subscribed again, and every waiter is woken to re-check its key,
//! since a completion announced while the link was down was missed.

#[cfg(test)]
mod tests;

use crate::store::redis::connection::SentinelLink;
use crate::store::wakeup::{self, Announcements, next_retry};
use futures_util::StreamExt;
use redis::aio::PubSub;
use redis::cluster_async::ClusterConnection;
use redis::{Client, PushInfo, PushKind, RedisResult, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// Default for [`LinkSettings::timeout`].
pub(super) const DEFAULT_PUBSUB_TIMEOUT: Duration = Duration::from_secs(1);
/// Default for [`LinkSettings::heartbeat`].
pub(super) const DEFAULT_PUBSUB_HEARTBEAT: Duration = Duration::from_secs(1);

/// How the link task guards its connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct LinkSettings {
    /// Longest wait for a connection, a `SUBSCRIBE` / `UNSUBSCRIBE` confirmation or a heartbeat's reply.
    pub(super) timeout: Duration,
    /// How long the pub/sub connection may stay silent before a `PING` checks it.
    pub(super) heartbeat: Duration,
}

impl Default for LinkSettings {
    fn default() -> Self {
        Self { timeout: DEFAULT_PUBSUB_TIMEOUT, heartbeat: DEFAULT_PUBSUB_HEARTBEAT }
    }
}

/// Where a channel stands on the current link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscribed {
    /// Not subscribed (or a `SUBSCRIBE` is on its way): its waiters must not re-read yet.
    No,
    /// Confirmed by Redis: every completion from now on is announced.
    Yes,
    /// Its last waiter left and an `UNSUBSCRIBE` is on its way: a new waiter must wait for a new `SUBSCRIBE`.
    Leaving,
}

struct Channel {
    /// Woken when the channel is confirmed, when a completion is announced on it, and when the link drops.
    notify: Arc<Notify>,
    waiters: usize,
    subscribed: Subscribed,
}

impl Channel {
    fn new() -> Self {
        Self { notify: Arc::new(Notify::new()), waiters: 0, subscribed: Subscribed::No }
    }
}

/// What the link task has to send to match Redis to the registry.
#[derive(Default)]
struct Plan {
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

/// The registry of channels with waiters, shared by the waiters, the link task and (on a Cluster) the push handler.
#[derive(Default)]
pub(super) struct Waiters {
    channels: Mutex<HashMap<String, Channel>>,
    /// Wakes the link task when there is something to (un)subscribe. `notify_one` keeps a permit, so a nudge sent
    /// while the task is busy is not lost.
    nudge: Notify,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(waiters: &Arc<Self>, channel: &str) -> Registration {
        let notify = waiters.join(channel);
        Registration::new(waiters.clone(), channel, notify)
    }

    fn join(&self, channel: &str) -> Arc<Notify> {
        let mut channels = self.lock();
        let entry = channels.entry(channel.to_owned()).or_insert_with(Channel::new);
        entry.waiters += 1;
        if entry.subscribed != Subscribed::Yes {
            self.nudge.notify_one();
        }
        entry.notify.clone()
    }

    fn remove(&self, channel: &str) {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(channel) else { return };
        entry.waiters -= 1;
        if entry.waiters > 0 {
            return;
        }
        match entry.subscribed {
            Subscribed::No => {
                channels.remove(channel);
            }
            Subscribed::Yes => self.nudge.notify_one(),
            Subscribed::Leaving => {}
        }
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.lock().get(channel).is_some_and(|entry| entry.subscribed == Subscribed::Yes)
    }

    /// Whether a channel with waiters lacks its subscription (so a link is needed now).
    fn needs_subscription(&self) -> bool {
        self.lock().values().any(|entry| entry.waiters > 0 && entry.subscribed == Subscribed::No)
    }

    /// What to (un)subscribe; channels to unsubscribe are marked [`Subscribed::Leaving`] at once.
    fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        for (name, entry) in self.lock().iter_mut() {
            match entry.subscribed {
                Subscribed::No if entry.waiters > 0 => plan.subscribe.push(name.clone()),
                Subscribed::Yes if entry.waiters == 0 => {
                    entry.subscribed = Subscribed::Leaving;
                    plan.unsubscribe.push(name.clone());
                }
                _ => {}
            }
        }
        plan
    }

    /// Redis confirmed `channels`: their waiters may re-read their keys.
    fn subscribed(&self, channels: &[String]) {
        let mut registry = self.lock();
        for name in channels {
            // A channel whose waiters all left meanwhile is kept as subscribed so the next plan unsubscribes it.
            let entry = registry.entry(name.clone()).or_insert_with(Channel::new);
            entry.subscribed = Subscribed::Yes;
            entry.notify.notify_waiters();
        }
    }

    /// `channels` are no longer subscribed (or may not be: a failed `UNSUBSCRIBE` is treated alike, since a stray
    /// subscription only delivers messages nobody listens to).
    fn unsubscribed(&self, channels: &[String]) {
        let mut registry = self.lock();
        for name in channels {
            if let Some(entry) = registry.get_mut(name) {
                entry.subscribed = Subscribed::No;
                if entry.waiters == 0 {
                    registry.remove(name);
                }
            }
        }
    }

    /// The link dropped with every subscription: nothing is confirmed any more, and every waiter re-checks its key.
    fn link_lost(&self) {
        self.lock().retain(|_, entry| {
            entry.subscribed = Subscribed::No;
            entry.notify.notify_waiters();
            entry.waiters > 0
        });
    }

    /// A Cluster node connection dropped (redis-rs resubscribes by itself, later): confirm every channel with
    /// waiters again, and wake every waiter to re-check its key.
    fn confirm_again(&self) {
        for entry in self.lock().values_mut() {
            if entry.waiters > 0 && entry.subscribed == Subscribed::Yes {
                entry.subscribed = Subscribed::No;
            }
            entry.notify.notify_waiters();
        }
        self.nudge.notify_one();
    }

    /// Wakes every waiter of `channel`: a completion or a release was announced.
    pub(super) fn wake(&self, channel: &[u8]) {
        let channels = self.lock();
        if let Some(entry) = std::str::from_utf8(channel).ok().and_then(|channel| channels.get(channel)) {
            entry.notify.notify_waiters();
        }
    }

    /// Dispatches a RESP3 push from a Cluster connection.
    pub(super) fn dispatch(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    self.wake(channel);
                }
            }
            PushKind::Disconnection => self.confirm_again(),
            _ => {}
        }
    }
}

/// Where the subscriptions live. Cloned into each link task.
#[derive(Clone)]
#[cfg_attr(
    feature = "tls",
    allow(
        clippy::large_enum_variant,
        reason = "with `tls` a redis `Client` holds its TLS parameters inline; built once per store"
    )
)]
pub(super) enum Link {
    /// One pub/sub connection to the node (or the primary Sentinel names), made when a channel needs it and
    /// replaced when it dies.
    Node(ClientSource),
    /// A Cluster connection speaking RESP3 whose pushes go to [`Waiters::dispatch`]; `SSUBSCRIBE` is routed to the
    /// node that owns the channel's slot.
    Cluster(ClusterConnection),
}

#[derive(Clone)]
#[cfg_attr(
    feature = "tls",
    allow(
        clippy::large_enum_variant,
        reason = "with `tls` a redis `Client` holds its TLS parameters inline; built once per store"
    )
)]
pub(super) enum ClientSource {
    Fixed(Client),
    Sentinel(Arc<SentinelLink>),
}

/// The store's side of notifications: the registry, and the link task it starts on first use (and again if the
/// runtime that ran it shut down).
pub(super) struct Notifier {
    waiters: Arc<Waiters>,
    link: Link,
    settings: LinkSettings,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Notifier {
    pub(super) fn new(link: Link, waiters: Arc<Waiters>, settings: LinkSettings) -> Arc<Self> {
        Arc::new(Self { waiters, link, settings, task: Mutex::new(None) })
    }

    /// Registers a waiter on `channel`. Must run inside a Tokio runtime (the link task is spawned on first use).
    pub(super) fn register(&self, channel: &str) -> Registration {
        self.ensure_link_task();
        Waiters::register(&self.waiters, channel)
    }

    fn ensure_link_task(&self) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let settings = self.settings;
        let (link, waiters) = (self.link.clone(), self.waiters.clone());
        *task = Some(tokio::spawn(async move {
            match link {
                Link::Node(source) => run_node(source, &waiters, settings).await,
                Link::Cluster(cluster) => run_cluster(cluster, &waiters, settings).await,
            }
        }));
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// A registered waiter; dropping it leaves the registry.
pub(super) type Registration = wakeup::Registration<Waiters>;

/// A channel is announced once Redis confirmed its subscription.
impl Announcements for Waiters {
    fn is_announced(&self, channel: &str) -> bool {
        self.is_subscribed(channel)
    }

    fn leave(&self, channel: &str) {
        self.remove(channel);
    }
}

async fn connect(source: &ClientSource) -> RedisResult<PubSub> {
    let client = match source {
        ClientSource::Fixed(client) => client.clone(),
        ClientSource::Sentinel(link) => link.client().await?,
    };
    client.get_async_pubsub().await
}

/// The link task on a node (or Sentinel's primary): connects when a channel needs it, serves the connection until
/// it dies, and starts again.
async fn run_node(source: ClientSource, waiters: &Waiters, settings: LinkSettings) {
    // A task that replaces one whose runtime shut down starts with no subscriptions.
    waiters.link_lost();
    let mut retry = None;
    loop {
        while !waiters.needs_subscription() {
            waiters.nudge.notified().await;
        }
        if let Some(pause) = retry {
            sleep(pause).await;
        }
        let started = Instant::now();
        let ended = match timeout(settings.timeout, connect(&source)).await {
            Ok(Ok(pubsub)) => serve(pubsub, waiters, settings).await,
            Ok(Err(error)) => format!("connecting failed: {error}"),
            Err(_) => format!("connecting timed out after {:?}", settings.timeout),
        };
        if retry.is_none() {
            tracing::warn!(reason = %ended, "the Redis pub/sub link that wakes waiting duplicates is down; replacing it");
        } else {
            tracing::debug!(reason = %ended, "the Redis pub/sub link is still down");
        }
        waiters.link_lost();
        retry = next_retry(retry, started.elapsed());
    }
}

/// Keeps one pub/sub connection in line with the registry and delivers its messages, until it fails: returns why.
async fn serve(pubsub: PubSub, waiters: &Waiters, settings: LinkSettings) -> String {
    let (mut sink, mut stream) = pubsub.split();
    let mut next_heartbeat = Instant::now() + settings.heartbeat;
    loop {
        loop {
            let plan = waiters.plan();
            if plan.is_empty() {
                break;
            }
            if !plan.subscribe.is_empty() {
                match timeout(settings.timeout, sink.subscribe(&plan.subscribe)).await {
                    Ok(Ok(())) => waiters.subscribed(&plan.subscribe),
                    Ok(Err(error)) => return format!("SUBSCRIBE failed: {error}"),
                    Err(_) => return format!("SUBSCRIBE timed out after {:?}", settings.timeout),
                }
            }
            if !plan.unsubscribe.is_empty() {
                let result = timeout(settings.timeout, sink.unsubscribe(&plan.unsubscribe)).await;
                waiters.unsubscribed(&plan.unsubscribe);
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return format!("UNSUBSCRIBE failed: {error}"),
                    Err(_) => return format!("UNSUBSCRIBE timed out after {:?}", settings.timeout),
                }
            }
            next_heartbeat = Instant::now() + settings.heartbeat;
        }
        tokio::select! {
            () = waiters.nudge.notified() => {}
            message = stream.next() => match message {
                Some(message) => {
                    waiters.wake(message.get_channel_name().as_bytes());
                    next_heartbeat = Instant::now() + settings.heartbeat;
                }
                None => return "the connection closed".to_owned(),
            },
            () = sleep_until(next_heartbeat) => {
                match timeout(settings.timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => next_heartbeat = Instant::now() + settings.heartbeat,
                    Ok(Err(error)) => return format!("heartbeat PING failed: {error}"),
                    Err(_) => return format!("heartbeat PING timed out after {:?}", settings.timeout),
                }
            }
        }
    }
}

/// The link task on a Cluster: sharded subscriptions over the store's Cluster connection, one `SSUBSCRIBE` per
/// channel (channels of different slots cannot share one), sent together. redis-rs reconnects the nodes and
/// reports a lost one as a push ([`Waiters::dispatch`]); here every command has a timeout, and a failed one is
/// retried after a pause without holding up anyone: waiters keep their own deadlines.
async fn run_cluster(cluster: ClusterConnection, waiters: &Waiters, settings: LinkSettings) {
    waiters.confirm_again();
    let mut retry = None;
    loop {
        let plan = waiters.plan();
        if plan.is_empty() {
            waiters.nudge.notified().await;
            continue;
        }
        let subscribing = plan.subscribe.iter().map(|channel| {
            let mut cluster = cluster.clone();
            async move { (channel, timeout(settings.timeout, cluster.ssubscribe(channel)).await) }
        });
        let unsubscribing = plan.unsubscribe.iter().map(|channel| {
            let mut cluster = cluster.clone();
            async move { timeout(settings.timeout, cluster.sunsubscribe(channel)).await }
        });
        let (subscribed, unsubscribed) = futures_util::future::join(
            futures_util::future::join_all(subscribing),
            futures_util::future::join_all(unsubscribing),
        )
        .await;
        waiters.unsubscribed(&plan.unsubscribe);
        let confirmed: Vec<String> = subscribed
            .iter()
            .filter(|(_, result)| matches!(result, Ok(Ok(()))))
            .map(|(channel, _)| (*channel).clone())
            .collect();
        waiters.subscribed(&confirmed);
        let failed = subscribed.len() - confirmed.len()
            + unsubscribed.iter().filter(|result| !matches!(result, Ok(Ok(())))).count();
        if failed == 0 {
            retry = None;
            continue;
        }
        tracing::warn!(failed, "sharded (un)subscribe failed or timed out on the Redis Cluster; retrying");
        retry = next_retry(retry, Duration::ZERO);
        if let Some(pause) = retry {
            sleep(pause).await;
        }
    }
}
