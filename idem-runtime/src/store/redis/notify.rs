//! Waking waiters: one pub/sub subscription per channel with waiters, shared by all of them, dispatched in-process.
//!
//! A waiter registers (and the first one for a channel subscribes) before it re-reads the key, so a completion that
//! lands in between still wakes it: no lost wake-ups, no polling.

use super::connection::{SentinelLink, unavailable};
use crate::StoreError;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{Client, PushInfo, PushKind, Value};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// Channels with waiters, each with its count and its [`Notify`].
#[derive(Default)]
pub(super) struct Waiters {
    channels: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
        self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes every waiter of `channel`.
    pub(super) fn wake(&self, channel: &[u8]) {
        let channels = self.lock();
        if let Some((notify, _)) = std::str::from_utf8(channel).ok().and_then(|channel| channels.get(channel)) {
            notify.notify_waiters();
        }
    }

    /// Wakes everyone (the subscription connection dropped: they must re-check rather than wait for nothing).
    fn wake_all(&self) {
        for (notify, _) in self.lock().values() {
            notify.notify_waiters();
        }
    }

    /// Dispatches a RESP3 push (Cluster: `smessage`; a disconnection wakes everyone).
    pub(super) fn dispatch(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    self.wake(channel);
                }
            }
            PushKind::Disconnection => self.wake_all(),
            _ => {}
        }
    }
}

/// Where the subscriptions live.
pub(super) enum Link {
    /// One pub/sub connection to the node (or the primary Sentinel names), made on first use and after it drops.
    Node { source: ClientSource, sink: Option<PubSubSink>, alive: Arc<AtomicBool> },
    /// A Cluster connection speaking RESP3 whose pushes go to [`Waiters::dispatch`]; `SSUBSCRIBE` is routed to the
    /// node that owns the channel's slot.
    Cluster(ClusterConnection),
}

pub(super) enum ClientSource {
    Fixed(Client),
    Sentinel(Arc<SentinelLink>),
}

pub(super) struct Notifier {
    waiters: Arc<Waiters>,
    /// Held across (un)subscribe round trips so a channel's count and its subscription change together.
    link: tokio::sync::Mutex<Link>,
}

/// A registered waiter: await [`Subscription::notified`]; dropping it unsubscribes when it was the last one.
pub(super) struct Subscription {
    notifier: Arc<Notifier>,
    channel: Option<String>,
    notified: Pin<Box<OwnedNotified>>,
}

impl Subscription {
    pub(super) async fn notified(&mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else { return };
        let notifier = self.notifier.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { notifier.leave(&channel).await });
        }
    }
}

impl Notifier {
    pub(super) fn new(link: Link, waiters: Arc<Waiters>) -> Arc<Self> {
        Arc::new(Self { waiters, link: tokio::sync::Mutex::new(link) })
    }

    pub(super) async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<Subscription, StoreError> {
        let mut link = self.link.lock().await;
        let (notify, first) = {
            let mut channels = self.waiters.lock();
            let (notify, count) = channels.entry(channel.to_owned()).or_insert_with(|| (Arc::new(Notify::new()), 0));
            *count += 1;
            (notify.clone(), *count == 1)
        };
        let mut notified = Box::pin(notify.notified_owned());
        notified.as_mut().enable();
        let subscription = Subscription { notifier: self.clone(), channel: Some(channel.to_owned()), notified };
        if let Err(error) = self.join(&mut link, channel, first).await {
            drop(link);
            drop(subscription);
            return Err(error);
        }
        Ok(subscription)
    }

    async fn join(&self, link: &mut Link, channel: &str, first: bool) -> Result<(), StoreError> {
        match link {
            Link::Node { source, sink, alive } => {
                if !alive.load(Ordering::Acquire) || sink.is_none() {
                    *sink = Some(self.connect(source, alive).await?);
                    // A fresh connection carries no subscriptions: restore every channel with waiters.
                    let channels: Vec<String> = self.waiters.lock().keys().cloned().collect();
                    if let Some(sink) = sink {
                        sink.subscribe(channels).await.map_err(unavailable)?;
                    }
                    return Ok(());
                }
                match sink {
                    Some(sink) if first => sink.subscribe(channel).await.map_err(unavailable),
                    _ => Ok(()),
                }
            }
            Link::Cluster(cluster) if first => cluster.ssubscribe(channel).await.map_err(unavailable),
            Link::Cluster(_) => Ok(()),
        }
    }

    async fn connect(&self, source: &ClientSource, alive: &mut Arc<AtomicBool>) -> Result<PubSubSink, StoreError> {
        let client = match source {
            ClientSource::Fixed(client) => client.clone(),
            ClientSource::Sentinel(link) => link.client().await.map_err(unavailable)?,
        };
        let (sink, mut stream) = client.get_async_pubsub().await.map_err(unavailable)?.split();
        let now_alive = Arc::new(AtomicBool::new(true));
        *alive = now_alive.clone();
        let waiters = self.waiters.clone();
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                waiters.wake(message.get_channel_name().as_bytes());
            }
            now_alive.store(false, Ordering::Release);
            waiters.wake_all();
        });
        Ok(sink)
    }

    async fn leave(&self, channel: &str) {
        let mut link = self.link.lock().await;
        let last = {
            let mut channels = self.waiters.lock();
            match channels.get_mut(channel) {
                Some((_, count)) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    channels.remove(channel);
                    true
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        let result = match &mut *link {
            Link::Node { sink: Some(sink), alive, .. } if alive.load(Ordering::Acquire) => {
                sink.unsubscribe(channel).await
            }
            Link::Node { .. } => Ok(()),
            Link::Cluster(cluster) => cluster.sunsubscribe(channel).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, channel, "unsubscribe failed; the connection will be replaced when next needed");
        }
    }
}
