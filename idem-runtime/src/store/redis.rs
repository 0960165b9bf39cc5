//! A [`Store`] on Redis: single node, Cluster or Sentinel; exactly-once across every process that shares it.

mod codec;
mod connection;
mod notify;

use super::{Claimed, Store, StoreError, StoreKey, Write};
use crate::{Fingerprint, OwnerToken, Record};
use connection::{Commands, Failure, SentinelLink, unavailable};
use notify::{ClientSource, Link, Notifier, Waiters};
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, Value};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A Lua script with its SHA-1, so a call sends `EVALSHA` and falls back to `EVAL` once per node that lacks it.
struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    fn new(source: &'static str) -> Self {
        Self { source, sha: redis::Script::new(source).get_hash().to_owned() }
    }
}

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/claim.lua")));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/complete.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/release.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/renew.lua")));

/// A [`Store`] on Redis.
///
/// Every state change is one Lua script, so a replay costs one round trip and a first request two (claim,
/// complete), plus one renewal per third of a lease while a long handler runs. Records live under
/// `{prefix}{<digest>}` (default prefix `idem:`), as JSON readable with `redis-cli GET`, always with a TTL;
/// completions are announced on `{prefix}{<digest>}:done` (sharded pub/sub on a Cluster), which shares the record's
/// hash tag and so its slot.
///
/// ```no_run
/// # async fn run() -> Result<(), idem_runtime::StoreError> {
/// use idem_runtime::{Idempotency, RedisStore};
/// let store = RedisStore::open("redis://127.0.0.1:6379").await?;
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency; Ok(()) }
/// ```
pub struct RedisStore {
    commands: Commands,
    notifier: Arc<Notifier>,
    prefix: String,
    publish: &'static str,
    replicas: Option<(u32, Duration)>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.commands {
            Commands::Manager(_) => "node",
            Commands::Pool(_) => "pool",
            Commands::Cluster(_) => "cluster",
            Commands::Sentinel(_) => "sentinel",
        };
        f.debug_struct("RedisStore").field("kind", &kind).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to a single node (or a proxy) by URL, e.g. `redis://127.0.0.1:6379/0`.
    pub async fn open(url: impl IntoConnectionInfo) -> Result<Self, StoreError> {
        Self::from_client(Client::open(url).map_err(unavailable)?).await
    }

    /// Uses a client: a [`ConnectionManager`] for commands (it reconnects by itself) and one pub/sub connection.
    pub async fn from_client(client: Client) -> Result<Self, StoreError> {
        let manager = client.get_connection_manager().await.map_err(unavailable)?;
        Ok(Self::from_connection_manager(manager, client))
    }

    /// Uses an existing [`ConnectionManager`] for commands; `client` (the same server) opens the pub/sub connection
    /// that wakes waiting duplicates.
    pub fn from_connection_manager(manager: ConnectionManager, client: Client) -> Self {
        Self::node(Commands::Manager(manager), ClientSource::Fixed(client))
    }

    /// Uses a deadpool-redis pool for commands; `client` (the same server) opens the pub/sub connection.
    pub fn from_pool(pool: deadpool_redis::Pool, client: Client) -> Self {
        Self::node(Commands::Pool(pool), ClientSource::Fixed(client))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> Result<Self, StoreError> {
        Self::from_cluster_builder(ClusterClientBuilder::new(nodes)).await
    }

    /// Connects to a Redis Cluster configured by `builder` (credentials, TLS, timeouts). The store switches it to
    /// RESP3 and installs its own push handler, which sharded pub/sub needs.
    pub async fn from_cluster_builder(builder: ClusterClientBuilder) -> Result<Self, StoreError> {
        let waiters = Arc::new(Waiters::default());
        let dispatch = waiters.clone();
        let client = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(move |push| {
                dispatch.dispatch(push);
                Ok::<(), std::convert::Infallible>(())
            })
            .build()
            .map_err(unavailable)?;
        let connection = client.get_async_connection().await.map_err(unavailable)?;
        Ok(Self {
            commands: Commands::Cluster(connection.clone()),
            notifier: Notifier::new(Link::Cluster(connection), waiters),
            prefix: "idem:".to_owned(),
            publish: "SPUBLISH",
            replicas: None,
        })
    }

    /// Finds the primary of `service` through Sentinel (`sentinels` are the Sentinels' URLs), and finds it again
    /// after a failover.
    pub fn sentinel<T: IntoConnectionInfo>(sentinels: Vec<T>, service: &str) -> Result<Self, StoreError> {
        let client = SentinelClient::build(sentinels, service.to_owned(), None, SentinelServerType::Master)
            .map_err(unavailable)?;
        Ok(Self::from_sentinel_client(client))
    }

    /// Uses a configured [`SentinelClient`] (it must name the primary: [`SentinelServerType::Master`]).
    pub fn from_sentinel_client(client: SentinelClient) -> Self {
        let link = Arc::new(SentinelLink::new(client));
        Self::node(Commands::Sentinel(link.clone()), ClientSource::Sentinel(link))
    }

    fn node(commands: Commands, source: ClientSource) -> Self {
        Self {
            commands,
            notifier: Notifier::new(Link::Node(source), Arc::default()),
            prefix: "idem:".to_owned(),
            publish: "PUBLISH",
            replicas: None,
        }
    }

    /// Namespaces every key (default `idem:`).
    ///
    /// # Panics
    /// If `prefix` holds `{` or `}`: the record's hash tag must be the first braces in its key, or a Cluster would
    /// put a record and its channel in different slots.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        assert!(!prefix.contains(['{', '}']), "RedisStore::with_prefix: a prefix cannot hold `{{` or `}}`");
        self.prefix = prefix;
        self
    }

    /// Waits, after each claim and completion, until `replicas` replicas acknowledged it (Redis `WAIT`), at most
    /// `timeout`. This narrows the window in which a failover to a replica that had not yet received a claim or a
    /// record lets a retry run a second time. `WAIT` travels in the same pipeline as the script, so it adds no round
    /// trip, only the replication latency. Keep `timeout` below the connection's response timeout (redis-rs: 500 ms
    /// by default), or a write with no replica in reach fails as a timeout. Ignored on a Cluster.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    fn record_key(&self, key: &StoreKey) -> String {
        format!("{}{{{}}}", self.prefix, key.as_str())
    }

    fn channel(&self, key: &StoreKey) -> String {
        format!("{}{{{}}}:done", self.prefix, key.as_str())
    }

    /// Runs a script in one round trip (`WAIT` joins the same pipeline when configured).
    async fn eval(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Value, StoreError> {
        let wait = self.replicas.filter(|_| !matches!(self.commands, Commands::Cluster(_)));
        let pipeline = |by_hash: bool| {
            let mut pipe = redis::pipe();
            let command =
                if by_hash { pipe.cmd("EVALSHA").arg(&script.sha) } else { pipe.cmd("EVAL").arg(script.source) };
            command.arg(keys.len()).arg(keys).arg(args);
            if let Some((replicas, timeout)) = wait {
                pipe.cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64).ignore();
            }
            pipe
        };
        let result = match self.commands.query::<(Value,)>(&pipeline(true)).await {
            Err(Failure::NoScript) => self.commands.query::<(Value,)>(&pipeline(false)).await,
            result => result,
        };
        Ok(result?.0)
    }

    /// Runs an owner-checked script and reads its 1 / 0 answer.
    async fn owned_write(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Write, StoreError> {
        match self.eval(script, keys, args).await? {
            Value::Int(1) => Ok(Write::Applied),
            Value::Int(0) => Ok(Write::Fenced),
            other => Err(StoreError::Corrupt(format!("unexpected script answer {other:?}"))),
        }
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
        let record = codec::in_flight(owner, fingerprint);
        let key = self.record_key(key);
        match self.eval(&CLAIM, &[&key], &[record.as_bytes(), &millis(lease)]).await? {
            Value::Nil => Ok(Claimed::Owned),
            // Our own claim, sent again after its reply was lost: still ours.
            Value::BulkString(held) if held.starts_with(codec::owner_prefix(owner).as_bytes()) => Ok(Claimed::Owned),
            Value::BulkString(held) => codec::decode(&held).map(Claimed::Existing).map_err(StoreError::Corrupt),
            other => Err(StoreError::Corrupt(format!("unexpected claim answer {other:?}"))),
        }
    }

    async fn complete(
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
        self.owned_write(&COMPLETE, &[&key, &channel], &args).await
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
        if !registration.subscribed(deadline).await {
            return Ok(());
        }
        let key = self.record_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let Ok(read) = tokio::time::timeout_at(deadline, self.commands.query(&pipe)).await else {
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
}

/// Tuning of the pub/sub link that wakes waiting duplicates.
impl RedisStore {
    /// How long the pub/sub connection that wakes waiting duplicates may take to connect, to confirm a `SUBSCRIBE`
    /// or `UNSUBSCRIBE`, or to answer a heartbeat `PING`, before it is considered dead and replaced (default 1 s).
    /// Waits never take longer than their own timeout whatever this is: a slow link only makes a waiter wait for
    /// its timeout instead of being woken early. Set it before the store's first wait.
    pub fn with_pubsub_timeout(self, timeout: Duration) -> Self {
        self.notifier.configure(|settings| settings.timeout = timeout);
        self
    }

    /// How long the pub/sub connection may stay silent before a `PING` checks that it is still alive (default 1 s),
    /// so a connection that died silently (a lost NAT entry, a dropped firewall session) is replaced before a
    /// waiter needs it. Set it before the store's first wait.
    pub fn with_pubsub_heartbeat(self, interval: Duration) -> Self {
        self.notifier.configure(|settings| settings.heartbeat = interval);
        self
    }
}
