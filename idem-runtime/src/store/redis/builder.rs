//! Configuring and connecting a [`RedisStore`]: timeouts, key prefix, TLS, replicas, and each way of reaching
//! Redis (a URL, a client, a connection manager, a pool, a Cluster, Sentinel).

use crate::store::error::{Cause, StoreError};
use crate::store::health::Health;
use crate::store::redis::RedisStore;
use crate::store::redis::completed_keys::CompletedKeys;
use crate::store::redis::connection::{
    Backend, Commands, NodeLink, SentinelLink, Timeouts, invalid_config, start_probe, unavailable,
};
use crate::store::redis::notify::{ClientSource, Link, LinkSettings, Notifier, Waiters};
use crate::store::redis::replicas::ReplicaAcks;
use crate::store::redis::tls::{TlsSettings, connection_info, install_crypto_provider};
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::SentinelClient;
use redis::{Client, IntoConnectionInfo, ProtocolVersion};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Builds a [`RedisStore`]: its timeouts, key prefix, TLS, replica acknowledgements and pub/sub tuning.
/// [`RedisStore::open`], [`RedisStore::cluster`] and [`RedisStore::sentinel`] are this builder with its defaults.
///
/// | setting | default | what it does |
/// |---|---|---|
/// | [`connect_timeout`](Self::connect_timeout) | 500 ms | bounds opening a connection: DNS, TCP, handshake |
/// | [`response_timeout`](Self::response_timeout) | 500 ms | bounds one command's answer (a frozen server, a lost packet) |
/// | [`probe_interval`](Self::probe_interval) | 250 ms | time between two background checks (`PING`, or a reconnection while down) |
/// | [`prefix`](Self::prefix) | `idem:` | namespaces every key |
/// | [`wait_for_replicas`](Self::wait_for_replicas) | off | claims and completions wait for replicas (`WAIT`) |
/// | [`pubsub_timeout`](Self::pubsub_timeout) | 1 s | bounds the pub/sub link's connection, (un)subscriptions and heartbeats |
/// | [`pubsub_heartbeat`](Self::pubsub_heartbeat) | 1 s | silence after which the pub/sub link is checked |
///
/// A store call answers within `connect_timeout + response_timeout` (plus the `WAIT` timeout for the writes that
/// wait for replicas). While Redis is down, calls fail at once; the store serves again within about one probe
/// interval of Redis answering.
///
/// Every connecting method (`open`, `client`, `connection_manager`, `pool`, `cluster`, `cluster_builder`,
/// `sentinel`, `sentinel_client`) is `async` and returns once Redis answered, or fails with
/// [`StoreError::Unavailable`] when it does not, and with [`StoreError::InvalidConfig`] for a configuration that
/// can never work (a URL that does not parse, a `rediss://` URL without the `tls` feature, a bad prefix), before
/// any connection is tried.
///
/// ```no_run
/// # use idem_runtime as idem;
/// # async fn run() -> Result<(), idem::store::StoreError> {
/// use idem::RedisStore;
/// use std::time::Duration;
/// let store = RedisStore::builder()
///     .connect_timeout(Duration::from_millis(300))
///     .response_timeout(Duration::from_millis(200))
///     .probe_interval(Duration::from_millis(100))
///     .prefix("payments:")
///     .open("redis://127.0.0.1:6379")
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
///
/// With a connection you configured yourself ([`connection_manager`](Self::connection_manager),
/// `pool` (feature `deadpool`), [`cluster_builder`](Self::cluster_builder), [`sentinel_client`](Self::sentinel_client)),
/// the store still bounds each call and fails fast while Redis is down, but that connection's own settings decide
/// how it reconnects: a [`ConnectionManager`] with redis-rs' default backoff may take several seconds to reconnect
/// after Redis returns.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until a connecting method (`open`, `cluster`, …) is called and awaited"]
pub struct RedisStoreBuilder {
    timeouts: Timeouts,
    tls: TlsSettings,
    prefix: String,
    pubsub: LinkSettings,
    replicas: Option<(u32, Duration)>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            tls: TlsSettings::default(),
            prefix: "idem:".to_owned(),
            pubsub: LinkSettings::default(),
            replicas: None,
        }
    }
}

impl RedisStoreBuilder {
    /// Bounds opening a connection (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// Bounds waiting for one command's answer (default 500 ms).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.response = timeout;
        self
    }

    /// How often the background task checks on Redis (default 250 ms): a `PING` while it is up, so a connection that
    /// broke while idle is replaced before a request needs it, and a reconnection attempt while it is down.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.timeouts.probe_interval = interval;
        self
    }

    /// Namespaces every key (default `idem:`): records live under `{prefix}{<digest>}`.
    ///
    /// A prefix holding `{` or `}` makes the connecting method fail with [`StoreError::InvalidConfig`] (its source
    /// is an [`InvalidPrefix`]): the record's hash tag must be the first braces in its key, or a Cluster would put a
    /// record and its channel in different slots.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Makes each new claim and each completion wait until `replicas` replicas acknowledged it (Redis `WAIT`), at
    /// most `timeout`, so a failover to a replica loses neither: without it, a claim or a record the primary
    /// acknowledged but had not yet replicated is gone after a failover, and a retry runs a second time.
    ///
    /// - **A claim that fewer than `replicas` replicas acknowledged fails closed**: the store releases it and
    ///   answers [`StoreError::Unavailable`] (the engine answers `503 store-unavailable`, the handler does not run),
    ///   as for any write the store could not make durable. With no replica in reach every first request fails so.
    /// - **A completion that fewer than `replicas` acknowledged is still
    ///   [`Write::Applied`](crate::store::contract::Write::Applied)**: the handler has already run and its response
    ///   goes to the client; it is on the primary, and replays are served from there.
    ///   The store logs a warning and counts it ([`RedisStore::unreplicated_completions`]; with the `metrics`
    ///   feature also `idem_redis_unreplicated_completions_total`): if that primary fails over before the replica
    ///   catches up, a retry may run again.
    ///
    /// `WAIT` counts the writes of the connection it is sent on and blocks that connection until it answers, so
    /// these writes go, each followed by its `WAIT`, on connections of their own checked out exclusively (at most
    /// 32 at once; a deadpool-redis pool's own connections with `pool`); the shared connection, and
    /// with it replays, renewals and releases, never waits. A claim is made on the shared connection like any
    /// other; only when it took the key does the store renew it on an exclusive connection followed by `WAIT` (the
    /// replication stream is ordered: a replica that has the renewal has the claim). This costs a first request
    /// one more round trip plus the replication latency for the claim, and the replication latency for the
    /// completion; a replay costs nothing more. Those calls may take `timeout` longer than the store's usual
    /// deadline. With `pool`, keep `timeout` under the pool's response timeout (redis-rs: 500 ms by
    /// default). Ignored on a Cluster.
    ///
    /// ```no_run
    /// # use idem_runtime as idem;
    /// # async fn run() -> Result<(), idem::store::StoreError> {
    /// use idem::RedisStore;
    /// use std::time::Duration;
    /// let store = RedisStore::builder()
    ///     .wait_for_replicas(1, Duration::from_millis(200))
    ///     .sentinel(["redis://10.0.0.9:26379", "redis://10.0.0.10:26379"], "mymaster")
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    /// How long the pub/sub connection that wakes waiting duplicates may take to connect, to confirm a `SUBSCRIBE`
    /// or `UNSUBSCRIBE`, or to answer a heartbeat `PING`, before it is considered dead and replaced (default 1 s).
    /// Waits never take longer than their own timeout whatever this is: a slow link only makes a waiter wait for
    /// its timeout instead of being woken early.
    pub fn pubsub_timeout(mut self, timeout: Duration) -> Self {
        self.pubsub.timeout = timeout;
        self
    }

    /// How long the pub/sub connection may stay silent before a `PING` checks that it is still alive (default 1 s),
    /// so a connection that died silently (a lost NAT entry, a dropped firewall session) is replaced before a
    /// waiter needs it.
    pub fn pubsub_heartbeat(mut self, interval: Duration) -> Self {
        self.pubsub.heartbeat = interval;
        self
    }

    /// Trusts the CA certificates in `pem` (one or more, PEM-encoded) for `rediss://` connections, instead of the
    /// default roots (the system's with the `tls` feature, Mozilla's with `tls-webpki-roots`): for a server whose
    /// certificate a private or self-signed CA issued. The URLs given to [`open`](Self::open),
    /// [`cluster`](Self::cluster) and [`sentinel`](Self::sentinel) must then be `rediss://`.
    ///
    /// ```no_run
    /// # use idem_runtime as idem;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::RedisStore;
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let store = RedisStore::builder().tls_root_certificates(ca).open("rediss://redis.internal:6380").await?;
    /// # let _ = store; Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.set_root_certificates(pem.into());
        self
    }

    /// Presents a client certificate (PEM chain and its PEM private key) on `rediss://` connections, for servers
    /// that authenticate clients by certificate (Redis' `tls-auth-clients yes`).
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(mut self, certificate_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.set_client_certificate(certificate_pem.into(), key_pem.into());
        self
    }

    /// Connects to a single node (or a proxy) by URL, e.g. `redis://127.0.0.1:6379/0`, or `rediss://…` for TLS
    /// (feature `tls`).
    pub async fn open(self, url: impl IntoConnectionInfo) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        let client = self.tls.node_client(connection_info(url)?)?;
        self.client(client).await
    }

    /// Uses a client for one multiplexed command connection (replaced when it breaks) and one pub/sub connection.
    pub async fn client(self, client: Client) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        install_crypto_provider();
        let link = NodeLink::new(client.clone(), &self.timeouts);
        link.connect().await.map_err(unavailable)?;
        Ok(self.node(Backend::Node(Box::new(link)), ClientSource::Fixed(client)))
    }

    /// Uses your [`ConnectionManager`] for commands (its own settings decide how it reconnects); `client` (the same
    /// server) opens the pub/sub connection that wakes waiting duplicates and the connections that wait for
    /// replicas.
    pub async fn connection_manager(
        self,
        manager: ConnectionManager,
        client: Client,
    ) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        install_crypto_provider();
        self.node(Backend::Manager(manager, client.clone()), ClientSource::Fixed(client)).answering().await
    }

    /// Uses a deadpool-redis pool for commands; `client` (the same server) opens the pub/sub connection.
    #[cfg(feature = "deadpool")]
    #[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
    pub async fn pool(self, pool: deadpool_redis::Pool, client: Client) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        install_crypto_provider();
        self.node(Backend::Pool(pool), ClientSource::Fixed(client)).answering().await
    }

    /// Connects to a Redis Cluster through any of its nodes, with this builder's connect and response timeouts;
    /// over TLS (feature `tls`) when the nodes' URLs are `rediss://`.
    pub async fn cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        let timeouts = self.timeouts;
        let nodes = nodes.into_iter().map(connection_info).collect::<Result<Vec<_>, _>>()?;
        // The response timeout also bounds the Cluster connection's own retries (redirections, reconnections).
        let builder =
            self.tls.cluster_builder(nodes).connection_timeout(timeouts.connect).response_timeout(timeouts.response);
        self.cluster_builder(builder).await
    }

    /// Connects to a Redis Cluster configured by `builder` (credentials, its own timeouts and retries, and with the
    /// `tls` feature its TLS settings). The store switches it to RESP3 and installs its own push handler, which
    /// sharded pub/sub needs.
    ///
    /// A `builder` set to read from replicas (`read_routing_strategy`) is fine: the store sends its reads (a replay
    /// of a key it knows completed, a waiter's check,
    /// [`Store::inspect`](crate::store::contract::Store::inspect)) to the primary that owns the key all the same, as
    /// every write goes. A replica lags its primary: a replay read there could return a record the
    /// primary has purged since, or miss one it has just written. Only the subscriptions that wake waiters may sit
    /// on a replica (a shard's sharded pub/sub messages reach its replicas too).
    pub async fn cluster_builder(self, builder: ClusterClientBuilder) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        install_crypto_provider();
        let waiters = Arc::new(Waiters::default());
        let dispatch = waiters.clone();
        let client = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(move |push| {
                dispatch.dispatch(push);
                Ok::<(), std::convert::Infallible>(())
            })
            .build()
            .map_err(invalid_config)?;
        let connection = client.get_async_connection().await.map_err(unavailable)?;
        let link = Link::Cluster(connection.clone());
        Ok(self.store(Backend::Cluster(connection), link, waiters, "SPUBLISH"))
    }

    /// Finds the primary of `service` through Sentinel (`sentinels` are the Sentinels' URLs), and finds it again
    /// after a failover. With the `tls` feature, when the Sentinels' URLs are `rediss://` or certificates are set
    /// on this builder, the primary is reached over TLS too, trusting the same roots.
    pub async fn sentinel<T: IntoConnectionInfo>(
        self,
        sentinels: impl IntoIterator<Item = T>,
        service: &str,
    ) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        let sentinels = sentinels.into_iter().map(connection_info).collect::<Result<Vec<_>, _>>()?;
        let client = self.tls.sentinel_client(sentinels, service)?;
        self.sentinel_client(client).await
    }

    /// Uses a configured [`SentinelClient`] (it must name the primary:
    /// [`SentinelServerType::Master`](redis::sentinel::SentinelServerType::Master)).
    pub async fn sentinel_client(self, client: SentinelClient) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        install_crypto_provider();
        let link = Arc::new(SentinelLink::new(client, &self.timeouts));
        self.node(Backend::Sentinel(link.clone()), ClientSource::Sentinel(link)).answering().await
    }

    fn check_prefix(&self) -> Result<(), StoreError> {
        if self.prefix.contains(['{', '}']) {
            let refused = InvalidPrefix(self.prefix.clone());
            return Err(StoreError::InvalidConfig(Cause::with_source(format!("redis: {refused}"), refused)));
        }
        Ok(())
    }

    fn node(self, backend: Backend, source: ClientSource) -> RedisStore {
        self.store(backend, Link::Node(source), Arc::default(), "PUBLISH")
    }

    fn store(self, backend: Backend, link: Link, waiters: Arc<Waiters>, publish: &'static str) -> RedisStore {
        let commands = Arc::new(Commands { backend, health: Health::new("redis"), timeouts: self.timeouts });
        // Now if a runtime is running, else on the first call.
        start_probe(&commands);
        RedisStore {
            commands,
            notifier: Notifier::new(link, waiters, self.pubsub),
            prefix: self.prefix,
            publish,
            replicas: self.replicas.map(|(replicas, timeout)| ReplicaAcks::new(replicas, timeout)),
            claim_by_script: AtomicBool::new(false),
            completed: CompletedKeys::default(),
            #[cfg(test)]
            act_as_redis_6: AtomicBool::new(false),
        }
    }
}

impl RedisStore {
    /// A builder: timeouts, key prefix, TLS, replicas, and the connections you configured yourself.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to a single node (or a proxy) by URL, e.g. `redis://127.0.0.1:6379/0`, with the default settings.
    pub async fn open(url: impl IntoConnectionInfo) -> Result<Self, StoreError> {
        Self::builder().open(url).await
    }

    /// Connects to a Redis Cluster through any of its nodes, with the default settings.
    pub async fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> Result<Self, StoreError> {
        Self::builder().cluster(nodes).await
    }

    /// Finds the primary of `service` through Sentinel (`sentinels` are the Sentinels' URLs), and finds it again
    /// after a failover, with the default settings.
    pub async fn sentinel<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        service: &str,
    ) -> Result<Self, StoreError> {
        Self::builder().sentinel(sentinels, service).await
    }

    /// This store once it answered a `PING`: the constructors that take a connection the caller made check it the
    /// way the others check their own.
    async fn answering(self) -> Result<Self, StoreError> {
        self.commands.ping().await?;
        Ok(self)
    }
}

/// A key prefix [`RedisStoreBuilder::prefix`] that the connecting methods refuse: it holds `{` or `}` (the source of
/// their [`StoreError::InvalidConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a Redis key prefix cannot hold `{{` or `}}` (the record's hash tag must come first): {0:?}")]
pub struct InvalidPrefix(pub String);
