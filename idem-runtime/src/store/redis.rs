//! A [`Store`] on Redis: single node, Cluster or Sentinel; exactly-once across every process that shares it.

pub(crate) mod codec;
mod completed_keys;
mod connection;
mod notify;
mod probe;
mod replicas;
#[cfg(test)]
mod tests;
mod tls;

use super::health::Health;
use super::{Claimed, Forgotten, Store, StoreError, StoreKey, Write};
use crate::{Cause, Entry, Fingerprint, OwnerToken, Record};
use completed_keys::CompletedKeys;
use connection::{Backend, Commands, Failure, NodeLink, SentinelLink, Timeouts, invalid_config, unavailable};
use notify::{ClientSource, Link, LinkSettings, Notifier, Waiters};
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::SentinelClient;
use redis::{Client, IntoConnectionInfo, Pipeline, ProtocolVersion, Value};
use replicas::ReplicaAcks;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tls::TlsSettings;

/// A Lua script with its SHA-1, so a call sends `EVALSHA` and falls back to `EVAL` once per node that lacks it.
struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    fn new(source: &'static str) -> Self {
        Self { source, sha: redis::Script::new(source).get_hash().to_owned() }
    }

    /// This script with `keys` and `args`, by hash or by source.
    fn call(&self, pipe: &mut Pipeline, by_hash: bool, keys: &[&str], args: &[&[u8]]) {
        // Sized up front: a completed record (the response body) is copied in once, not again as the buffer grows.
        let size = keys.iter().map(|key| key.len()).sum::<usize>() + args.iter().map(|arg| arg.len()).sum::<usize>();
        let mut command = redis::Cmd::with_capacity(3 + keys.len() + args.len(), size + self.source.len() + 64);
        if by_hash {
            command.arg("EVALSHA").arg(&self.sha);
        } else {
            command.arg("EVAL").arg(self.source);
        }
        command.arg(keys.len()).arg(keys).arg(args);
        pipe.add_command(command);
    }
}

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/claim.lua")));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/complete.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/release.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/renew.lua")));
static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/forget.lua")));

/// A [`Store`] on Redis.
///
/// Every state change is one command, so a replay costs one round trip and a first request two (claim, complete;
/// three with [`RedisStoreBuilder::wait_for_replicas`]), plus one renewal per third of a lease while a long handler runs.
/// A claim is the native `SET key claim NX GET PX lease` (Redis ≥ 7.0): it takes a free key, or reads what is
/// there. On a key this store completed, or found completed before, a claim is a plain `GET` of the record instead
/// (one round trip still, and Redis' cheapest read; were the record gone since, the claim follows it: see
/// `completed_keys.rs`). Writes that must check the owner first (complete,
/// release, renew) are Lua scripts, as is the claim on a server older than 7.0: the first claim such a server
/// refuses with `ERR syntax error` switches this store to the script for good (any other error reply, an OOM say,
/// fails that claim alone). Records live under
/// `{prefix}{<digest>}` (default prefix `idem:`), as JSON readable with `redis-cli GET`, always with a TTL;
/// completions are announced on `{prefix}{<digest>}:done` (sharded pub/sub on a Cluster), which shares the record's
/// hash tag and so its slot.
///
/// **Outages.** Every call answers within the connect timeout plus the response timeout (1 s by default, see
/// [`RedisStore::builder`]), whatever the network does. Once a call finds Redis unreachable (refused, reset, no
/// answer in time), the calls after it fail at once with [`StoreError::Unavailable`] (the engine answers
/// `503 store-unavailable` with `Retry-After`) while a background task probes Redis every probe interval; its
/// first answer puts the store back in service, so an idle process serves its first request after an outage
/// normally. A call that finds its connection broken (Redis restarted, a proxy closed it) is sent once more on a
/// fresh connection. On a Cluster the connection routes around failed nodes itself and only the timeouts apply.
///
/// **TLS.** With the `tls` feature, `rediss://` URLs connect over TLS (rustls, with the `ring` crypto provider
/// unless the app installed another first), trusting the system's root certificates; with `tls-webpki-roots`,
/// Mozilla's roots compiled into the binary (for images without a CA bundle). The builder's
/// `tls_root_certificates` trusts a private or self-signed CA instead, and `tls_client_certificate` presents a
/// client certificate. Every connection the store opens (commands, pub/sub, each Cluster node, the primary a
/// Sentinel names) uses the same settings. Without the feature a `rediss://` URL is refused with an error that
/// names it.
///
/// ```no_run
/// # async fn run() -> Result<(), idem_runtime::StoreError> {
/// use idem_runtime::{Idempotency, RedisStore};
/// let store = RedisStore::open("redis://127.0.0.1:6379").await?;
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency; Ok(()) }
/// ```
pub struct RedisStore {
    commands: Arc<Commands>,
    notifier: Arc<Notifier>,
    prefix: String,
    publish: &'static str,
    replicas: Option<ReplicaAcks>,
    /// Set once the server answered `SET … NX GET` with `ERR syntax error` (Redis < 7.0): claims run the claim
    /// script from then on.
    claim_by_script: AtomicBool,
    /// Keys seen holding a completed record: a claim reads them with `GET` first.
    completed: CompletedKeys,
    /// Makes the native claim one that Redis 7 refuses as Redis 6 refuses `SET … NX GET` (`ERR syntax error`).
    #[cfg(test)]
    act_as_redis_6: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("kind", &self.commands.backend.kind())
            .field("prefix", &self.prefix)
            .field("timeouts", &self.commands.timeouts)
            .finish_non_exhaustive()
    }
}

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
/// # async fn run() -> Result<(), idem_runtime::StoreError> {
/// use idem_runtime::RedisStore;
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
    /// - **A completion that fewer than `replicas` acknowledged is still [`Write::Applied`]**: the handler has
    ///   already run and its response goes to the client; it is on the primary, and replays are served from there.
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
    /// # async fn run() -> Result<(), idem_runtime::StoreError> {
    /// use idem_runtime::RedisStore;
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
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::RedisStore;
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
        let client = self.tls.node_client(tls::connection_info(url)?)?;
        self.client(client).await
    }

    /// Uses a client for one multiplexed command connection (replaced when it breaks) and one pub/sub connection.
    pub async fn client(self, client: Client) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        tls::install_crypto_provider();
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
        tls::install_crypto_provider();
        self.node(Backend::Manager(manager, client.clone()), ClientSource::Fixed(client)).answering().await
    }

    /// Uses a deadpool-redis pool for commands; `client` (the same server) opens the pub/sub connection.
    #[cfg(feature = "deadpool")]
    #[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
    pub async fn pool(self, pool: deadpool_redis::Pool, client: Client) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        tls::install_crypto_provider();
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
        let nodes = nodes.into_iter().map(tls::connection_info).collect::<Result<Vec<_>, _>>()?;
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
    /// of a key it knows completed, a waiter's check, [`Store::inspect`]) to the primary that owns the key all the
    /// same, as every write goes. A replica lags its primary: a replay read there could return a record the
    /// primary has purged since, or miss one it has just written. Only the subscriptions that wake waiters may sit
    /// on a replica (a shard's sharded pub/sub messages reach its replicas too).
    pub async fn cluster_builder(self, builder: ClusterClientBuilder) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        tls::install_crypto_provider();
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
        let sentinels = sentinels.into_iter().map(tls::connection_info).collect::<Result<Vec<_>, _>>()?;
        let client = self.tls.sentinel_client(sentinels, service)?;
        self.sentinel_client(client).await
    }

    /// Uses a configured [`SentinelClient`] (it must name the primary:
    /// [`SentinelServerType::Master`](redis::sentinel::SentinelServerType::Master)).
    pub async fn sentinel_client(self, client: SentinelClient) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        tls::install_crypto_provider();
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
        probe::start(&commands);
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

    /// How many completions fewer replicas acknowledged than [`RedisStoreBuilder::wait_for_replicas`] asks for (0
    /// when it is not set).
    pub fn unreplicated_completions(&self) -> u64 {
        self.replicas.as_ref().map_or(0, ReplicaAcks::unreplicated_completions)
    }

    fn record_key(&self, key: &StoreKey) -> String {
        self.key_with_suffix(key, "")
    }

    fn channel(&self, key: &StoreKey) -> String {
        self.key_with_suffix(key, ":done")
    }

    /// `{prefix}{<digest>}{suffix}`, in one allocation (one for each key of each call).
    fn key_with_suffix(&self, key: &StoreKey, suffix: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + key.as_str().len() + 2 + suffix.len());
        name.push_str(&self.prefix);
        name.push('{');
        name.push_str(key.as_str());
        name.push('}');
        name.push_str(suffix);
        name
    }

    /// The replica policy, unless on a Cluster (where `WAIT` is not used).
    fn replica_acks(&self) -> Option<&ReplicaAcks> {
        self.replicas.as_ref().filter(|_| self.commands.tracks_health())
    }

    /// Runs a script in one round trip on the shared connection.
    async fn eval(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Value, StoreError> {
        let pipeline = |by_hash: bool| {
            let mut pipe = Pipeline::with_capacity(1);
            script.call(&mut pipe, by_hash, keys, args);
            pipe
        };
        let result = match self.commands.query::<(Value,)>(&pipeline(true)).await {
            Err(Failure::NoScript) => self.commands.query::<(Value,)>(&pipeline(false)).await,
            result => result,
        };
        Ok(result?.0)
    }

    /// Runs a script followed by `WAIT` on an exclusive connection: the script's answer and how many replicas
    /// acknowledged. Sent as `EVAL` (the source, not the hash): after a `NOSCRIPT` the pipeline's `WAIT` would still
    /// run, and with no replica in reach a second attempt would wait the timeout twice.
    async fn eval_replicated(
        &self,
        acks: &ReplicaAcks,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<(Value, u32), StoreError> {
        let mut pipe = redis::pipe();
        script.call(&mut pipe, false, keys, args);
        acks.wait_command(&mut pipe);
        Ok(acks.query::<(Value, u32)>(&self.commands, &pipe).await?)
    }

    /// Makes a claim just taken durable: renews it on an exclusive connection followed by `WAIT`. Fewer replicas
    /// than required, or no answer: the claim is released and the caller gets [`StoreError::Unavailable`].
    async fn replicate_claim(
        &self,
        acks: &ReplicaAcks,
        key: &str,
        owner: &OwnerToken,
        claim: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let prefix = codec::owner_prefix(owner);
        let args: [&[u8]; 3] = [prefix.as_bytes(), &millis(lease), claim.as_bytes()];
        let failure = match self.eval_replicated(acks, &RENEW, &[key], &args).await {
            Ok((Value::Int(1), acked)) if acked >= acks.replicas => return Ok(()),
            Ok((Value::Int(1), acked)) => StoreError::Unavailable(
                format!(
                    "redis: the claim reached {acked} of {} replicas within {:?}; released it",
                    acks.replicas, acks.timeout
                )
                .into(),
            ),
            // Another owner holds the key already: only possible with a lease shorter than a round trip.
            Ok((Value::Int(0), _)) => StoreError::Unavailable("redis: lost the claim before it was replicated".into()),
            Ok((other, _)) => StoreError::Corrupt(format!("unexpected renewal answer {other:?}").into()),
            Err(error) => error,
        };
        // Released here rather than left to the lease, so the client's retry can claim it at once. The release goes
        // on the shared connection; if it fails, the engine releases the failed claim again in the background.
        let channel = format!("{key}:done");
        let args: [&[u8]; 2] = [prefix.as_bytes(), self.publish.as_bytes()];
        if let Err(error) = self.owned_write(&RELEASE, &[key, &channel], &args).await {
            tracing::debug!(%error, "could not release an unreplicated claim; its lease will end it");
        }
        Err(failure)
    }

    /// Claim-or-read in one round trip: the held record, or `None` when the key was free and is now claimed with
    /// `claim` for `lease`.
    async fn claim_or_read(&self, key: &str, claim: &str, lease: &[u8]) -> Result<ClaimAnswer, StoreError> {
        if !self.claim_by_script.load(Ordering::Relaxed) {
            // Sized up front: this runs on every replay.
            let mut command = redis::Cmd::with_capacity(8, key.len() + claim.len() + lease.len() + 32);
            command.arg("SET").arg(key).arg(claim).arg("NX").arg("GET").arg("PX").arg(lease);
            #[cfg(test)]
            if self.act_as_redis_6.load(Ordering::Relaxed) {
                // PX with KEEPTTL is a syntax error.
                command.arg("KEEPTTL");
            }
            let mut pipe = Pipeline::with_capacity(1);
            pipe.add_command(command);
            match self.commands.query::<(Value,)>(&pipe).await {
                Ok((held,)) => return ClaimAnswer::read(held, false),
                // Redis < 7.0 answers `ERR syntax error` (NX and GET together are 7.0's): nothing ran. Any other
                // error reply (an OOM, say) fails this claim only, and the next one is native again.
                Err(Failure::SyntaxRefused(error)) => {
                    tracing::info!(
                        %error,
                        "this Redis does not take SET … NX GET (Redis < 7.0): claims run a script from now on"
                    );
                    self.claim_by_script.store(true, Ordering::Relaxed);
                }
                Err(failure) => return Err(failure.into()),
            }
        }
        ClaimAnswer::read(self.eval(&CLAIM, &[key], &[claim.as_bytes(), lease]).await?, true)
    }

    /// Runs an owner-checked script and reads its 1 / 0 answer.
    async fn owned_write(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Write, StoreError> {
        written(self.eval(script, keys, args).await?)
    }

    /// The completed record named `key`, read with a plain `GET`; `None` when the key holds anything else (nothing,
    /// or a claim): the caller then claims as usual.
    async fn read_completed(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("GET").arg(key);
        let (held,): (Option<Vec<u8>>,) = self.commands.read(&pipe, key).await?;
        match held {
            Some(held) if !codec::is_in_flight(&held) => {
                codec::decode(&held).map(Some).map_err(|why| StoreError::Corrupt(why.into()))
            }
            _ => Ok(None),
        }
    }

    /// [`Store::claim`] of the record named `key` (the claim-or-read, and what a resent claim needs).
    async fn claim_named(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let record = codec::in_flight(owner, fingerprint);
        let lease_millis = millis(lease);
        let replica_acks = self.replica_acks();
        // A second pass only after our own record vanished or changed hands between two commands (its lease ran
        // out just then): what the key holds now decides.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (held, lease_restarted) = match self.claim_or_read(key, &record, &lease_millis).await? {
                ClaimAnswer::Claimed => break,
                ClaimAnswer::Held { record, lease_restarted } => (record, lease_restarted),
            };
            if !codec::is_owned_by(&held, owner) {
                return codec::decode(&held).map(Claimed::Existing).map_err(|why| StoreError::Corrupt(why.into()));
            }
            // Our own claim, sent again after its reply was lost: still ours, and its lease starts again. `SET NX`
            // left it as it was, so the renewal does that (and re-claims the key should it have just expired);
            // with replicas, the replicated renewal below does it.
            if lease_restarted || replica_acks.is_some() {
                break;
            }
            let prefix = codec::owner_prefix(owner);
            let args: [&[u8]; 3] = [prefix.as_bytes(), &lease_millis, record.as_bytes()];
            match self.owned_write(&RENEW, &[key], &args).await? {
                Write::Applied => break,
                Write::Fenced if attempts < 3 => {}
                Write::Fenced => {
                    return Err(StoreError::Unavailable("redis: the key changed hands during every claim".into()));
                }
            }
        }
        // Only a claim the caller holds waits for replicas: a replay wrote nothing, and never waits.
        // Boxed, as the replicated completion below: waiting for replicas takes large futures (a connection
        // checkout), which every claim and completion would otherwise carry, and copy, whether it waits or not.
        if let Some(acks) = replica_acks {
            Box::pin(self.replicate_claim(acks, key, owner, &record, lease)).await?;
        }
        Ok(Claimed::Owned)
    }

    /// [`Store::complete`], without noting the key as completed.
    async fn complete_named(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let (channel, key) = (self.channel(key), self.record_key(key));
        let owner = codec::owner_prefix(owner);
        let record = codec::completed(record);
        let args: [&[u8]; 4] = [owner.as_bytes(), record.as_bytes(), &millis(ttl), self.publish.as_bytes()];
        let Some(acks) = self.replica_acks() else {
            return self.owned_write(&COMPLETE, &[&key, &channel], &args).await;
        };
        let (answer, acked) = Box::pin(self.eval_replicated(acks, &COMPLETE, &[&key, &channel], &args)).await?;
        let write = written(answer)?;
        if write == Write::Applied && acked < acks.replicas {
            // The handler ran and its response stands; only a failover before the replicas catch up could lose it.
            acks.count_unreplicated_completion();
            tracing::warn!(
                key = %key,
                acked,
                required = acks.replicas,
                timeout = ?acks.timeout,
                "completed record acknowledged by fewer replicas than required; a failover now could run a retry again"
            );
        }
        Ok(write)
    }
}

/// What a claim-or-read found.
enum ClaimAnswer {
    /// The key was free: the caller's claim is in.
    Claimed,
    /// The key holds this record; with `lease_restarted`, a record of the caller's that the claim script found
    /// (a resent claim) and whose lease it restarted.
    Held { record: Vec<u8>, lease_restarted: bool },
}

impl ClaimAnswer {
    fn read(answer: Value, by_script: bool) -> Result<Self, StoreError> {
        match answer {
            Value::Nil => Ok(Self::Claimed),
            // The script restarts the lease only of a record equal to the claim, which is what a resent claim
            // finds; any other record of the caller's is recognised by its owner token below, as before.
            Value::BulkString(record) => Ok(Self::Held { record, lease_restarted: by_script }),
            other => Err(StoreError::Corrupt(format!("unexpected claim answer {other:?}").into())),
        }
    }
}

/// Reads an owner-checked script's 1 / 0 answer.
fn written(answer: Value) -> Result<Write, StoreError> {
    match answer {
        Value::Int(1) => Ok(Write::Applied),
        Value::Int(0) => Ok(Write::Fenced),
        other => Err(StoreError::Corrupt(format!("unexpected script answer {other:?}").into())),
    }
}

fn millis(duration: Duration) -> Vec<u8> {
    duration.as_millis().max(1).to_string().into_bytes()
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let name = self.record_key(key);
        if self.completed.contains(key) {
            match self.read_completed(&name).await? {
                Some(entry) => return Ok(Claimed::Existing(entry)),
                None => self.completed.remove(key),
            }
        }
        let claimed = self.claim_named(&name, fingerprint, owner, lease).await?;
        if let Claimed::Existing(Entry::Completed(_)) = &claimed {
            self.completed.insert(key);
        }
        Ok(claimed)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let write = self.complete_named(key, owner, record, ttl).await;
        if let Ok(Write::Applied) = write {
            self.completed.insert(key);
        }
        write
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        let (channel, key) = (self.channel(key), self.record_key(key));
        let owner = codec::owner_prefix(owner);
        self.owned_write(&RELEASE, &[&key, &channel], &[owner.as_bytes(), self.publish.as_bytes()]).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        let key = self.record_key(key);
        let claim = codec::in_flight(owner, fingerprint);
        let owner = codec::owner_prefix(owner);
        self.owned_write(&RENEW, &[&key], &[owner.as_bytes(), &millis(lease), claim.as_bytes()]).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        // One deadline bounds it all (the subscription, the re-read, the notification), whatever the network does.
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let mut registration = self.notifier.register(&self.channel(key));
        // Re-read only once subscribed: a completion from then on is announced to us.
        if !registration.ready(deadline).await {
            return Ok(());
        }
        let key = self.record_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let Ok(read) = tokio::time::timeout_at(deadline, self.commands.read(&pipe, &key)).await else {
            return Ok(());
        };
        let (held, pttl): (Option<Vec<u8>>, i64) = read?;
        if !held.is_some_and(|held| codec::is_in_flight(&held)) {
            return Ok(());
        }
        // A lease that runs out with nobody completing also ends the wait. A record without a TTL (PTTL -1: written
        // by hand or by another tool) has no lease to run out; reading it as "no time left" made the caller's
        // claim-and-wait loop spin until its deadline.
        let until = match pttl {
            -1 => deadline,
            left if left >= 0 => deadline.min(tokio::time::Instant::now() + Duration::from_millis(left as u64)),
            // -2: the record expired between the GET and the PTTL.
            _ => return Ok(()),
        };
        registration.notified(until).await;
        Ok(())
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let key = self.record_key(key);
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("GET").arg(&key);
        let (held,): (Option<Vec<u8>>,) = self.commands.read(&pipe, &key).await?;
        held.map(|held| codec::decode(&held).map_err(|why| StoreError::Corrupt(why.into()))).transpose()
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        self.completed.remove(key);
        let (channel, key) = (self.channel(key), self.record_key(key));
        let args: [&[u8]; 2] = [codec::IN_FLIGHT.as_bytes(), self.publish.as_bytes()];
        match self.eval(&FORGET, &[&key, &channel], &args).await? {
            Value::Int(0) => Ok(Forgotten::Absent),
            Value::Int(1) => Ok(Forgotten::Removed),
            Value::Int(2) => Ok(Forgotten::InFlight),
            other => Err(StoreError::Corrupt(format!("unexpected forget answer {other:?}").into())),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("PING");
        let _: (Value,) = self.commands.query(&pipe).await?;
        Ok(())
    }
}

/// A key prefix [`RedisStoreBuilder::prefix`] that the connecting methods refuse: it holds `{` or `}` (the source of
/// their [`StoreError::InvalidConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a Redis key prefix cannot hold `{{` or `}}` (the record's hash tag must come first): {0:?}")]
pub struct InvalidPrefix(pub String);
