//! Where commands go: one type over the ways a user can hand us Redis, so the store's logic is written once, with
//! the rules every call follows: a deadline, fail fast while the store is known to be down, one retry on a fresh
//! connection after a broken one; and the background probe that finds the store again while it is down.
//!
//! This file is over 500 lines: the command path and the probe that finds a down store again share its health
//! state and deadlines, and stay together so one reading shows every rule a call follows.

use crate::store::error::{Cause, StoreError};
use crate::store::health::Health;
use redis::Value;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long the store waits for Redis, and how often it checks on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// Opening a connection (DNS, TCP, handshake).
    pub(super) connect: Duration,
    /// One command's answer.
    pub(super) response: Duration,
    /// Between two probes of the store (a `PING` while it is up, a reconnection attempt while it is down).
    pub(super) probe_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(500),
            response: Duration::from_millis(500),
            probe_interval: Duration::from_millis(250),
        }
    }
}

impl Timeouts {
    /// The most one store call may take: a fresh connection and one answer. A call that finds a broken
    /// connection retries within the same budget, so the caller's bound does not double.
    pub(super) fn call_budget(&self) -> Duration {
        self.connect + self.response
    }

    pub(super) fn connection_config(&self, extra_response: Duration) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect))
            .set_response_timeout(Some(self.response + extra_response))
    }
}

/// The ways a user can hand us Redis.
#[cfg_attr(
    feature = "tls",
    allow(
        clippy::large_enum_variant,
        reason = "with `tls` a redis `Client` holds its TLS parameters inline; built once per store"
    )
)]
pub(super) enum Backend {
    /// A single node (or a proxy) through our own connection, replaced when it breaks.
    Node(Box<NodeLink>),
    /// A single node through the caller's [`ConnectionManager`], which reconnects by its own settings; `client`
    /// (the same server) opens the connections that wait for replicas.
    Manager(ConnectionManager, Client),
    /// A deadpool-redis pool: one pooled connection per operation.
    #[cfg(feature = "deadpool")]
    Pool(deadpool_redis::Pool),
    /// A Redis Cluster: commands routed by key slot.
    Cluster(ClusterConnection),
    /// The primary that Sentinel names, found again after a failover.
    Sentinel(Arc<SentinelLink>),
}

impl Backend {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Backend::Node(_) | Backend::Manager(..) => "node",
            #[cfg(feature = "deadpool")]
            Backend::Pool(_) => "pool",
            Backend::Cluster(_) => "cluster",
            Backend::Sentinel(_) => "sentinel",
        }
    }

    /// One attempt at `pipe`, on whatever connection is current; on a Cluster, at the primary that owns
    /// `primary_of` when it is set.
    async fn run<T: FromRedisValue>(&self, pipe: &Pipeline, primary_of: Option<&str>) -> RedisResult<T> {
        match self {
            Backend::Node(link) => link.query(pipe).await,
            Backend::Manager(manager, _) => pipe.query_async(&mut manager.clone()).await,
            #[cfg(feature = "deadpool")]
            Backend::Pool(pool) => {
                // Boxed: deadpool's checkout is a ~7 KB future, which every query (on any backend) would carry.
                let mut connection = Box::pin(pool.get()).await.map_err(pool_error)?;
                pipe.query_async(&mut connection).await
            }
            Backend::Cluster(cluster) => match primary_of {
                Some(key) => {
                    let route = Route::with_key(key, SlotAddr::Master);
                    pipe.query_async(&mut OnPrimary { cluster: cluster.clone(), route }).await
                }
                None => pipe.query_async(&mut cluster.clone()).await,
            },
            Backend::Sentinel(link) => link.query(pipe).await,
        }
    }

    /// Forgets the current connection after it failed, so the next attempt opens a fresh one. A node link forgets
    /// the connection it saw fail by itself; a [`ConnectionManager`], a pool and a Cluster connection replace broken
    /// connections themselves.
    async fn forget_connection(&self) {
        if let Backend::Sentinel(link) = self {
            link.forget().await;
        }
    }

    /// Drops the current connection whatever its state (the probe, starting over while the store is down: the old
    /// connection may be the one a frozen server never answers).
    async fn start_over(&self) {
        match self {
            Backend::Node(link) => link.forget_current(),
            Backend::Sentinel(link) => link.forget().await,
            Backend::Manager(..) | Backend::Cluster(_) => {}
            #[cfg(feature = "deadpool")]
            Backend::Pool(_) => {}
        }
    }
}

#[cfg(feature = "deadpool")]
pub(super) fn pool_error(error: deadpool_redis::PoolError) -> RedisError {
    match error {
        deadpool_redis::PoolError::Backend(error) => error,
        other => RedisError::from(std::io::Error::other(format!("redis pool: {other}"))),
    }
}

/// Why a query failed: the server answers the store handles itself, or a store failure.
pub(super) enum Failure {
    /// `EVALSHA` named a script this node has not cached yet (a restart, a new Cluster node): send `EVAL` instead.
    NoScript,
    /// The server answered `ERR syntax error`: it does not know the command's form (Redis < 7.0 answers so to
    /// `SET` with both `NX` and `GET`), and ran nothing. Any other error reply (an OOM under `maxmemory`, a value
    /// out of range, a proxy's refusal) is a [`Failure::Store`]: it says nothing about the server's version.
    SyntaxRefused(RedisError),
    Store(StoreError),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::NoScript => StoreError::Unavailable("redis: NOSCRIPT after EVAL".into()),
            Failure::SyntaxRefused(error) => unavailable(error),
            Failure::Store(error) => error,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

/// Sends commands with the store's rules; shared with the background probe.
pub(super) struct Commands {
    pub(super) backend: Backend,
    pub(super) health: Health,
    pub(super) timeouts: Timeouts,
}

impl Commands {
    /// Sends `pipe` in one round trip, within [`Timeouts::call_budget`]; fails at once while the store is known to
    /// be down.
    pub(super) async fn query<T: FromRedisValue>(self: &Arc<Self>, pipe: &Pipeline) -> Result<T, Failure> {
        self.query_on(pipe, None).await
    }

    /// [`Commands::query`] for a pipeline that only reads `key`, sent on a Cluster to the primary that owns `key`.
    ///
    /// A Cluster client may be set to read from replicas (redis-rs' `read_routing_strategy`, or the deprecated
    /// `read_from_replicas`), and would send a read-only pipeline to a replica, which lags its primary: a `GET` of
    /// a key known completed could replay a record the primary has purged since (`forget`), or miss one it has
    /// just written; a waiter could read a claim that is gone. Writes go to the primary whatever that setting is,
    /// so only reads need this; every read the store makes goes through here.
    pub(super) async fn read<T: FromRedisValue>(self: &Arc<Self>, pipe: &Pipeline, key: &str) -> Result<T, Failure> {
        self.query_on(pipe, Some(key)).await
    }

    async fn query_on<T: FromRedisValue>(
        self: &Arc<Self>,
        pipe: &Pipeline,
        primary_of: Option<&str>,
    ) -> Result<T, Failure> {
        start_probe(self);
        self.health.check()?;
        self.guarded(self.timeouts.call_budget(), self.query_retrying(pipe, primary_of)).await
    }

    /// Runs `call` within `budget`; a call that runs out of time or fails for want of a connection marks the store
    /// down, so the requests after it fail at once until the probe finds it answering again.
    pub(super) async fn guarded<T>(
        &self,
        budget: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Failure> {
        let result = match tokio::time::timeout(budget, call).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {budget:?}"),
            ))),
        };
        result.map_err(|error| {
            if is_connection_error(&error) && self.tracks_health() {
                self.health.mark_down(&error);
            }
            classify(error)
        })
    }

    /// A Cluster is many nodes that fail one by one: its connection routes around them, and one shard's outage must
    /// not fail the others' keys, so the store-wide health state does not apply to it.
    pub(super) fn tracks_health(&self) -> bool {
        !matches!(self.backend, Backend::Cluster(_))
    }

    /// One attempt, and one more on a fresh connection if the first found its connection broken (the server
    /// restarted, or a proxy closed an idle connection while nobody used it).
    ///
    /// Sending a script twice cannot make anything run twice: a claim carries the caller's owner token, so a claim
    /// that landed before its connection broke is found again as the caller's own in-flight record
    /// ([`Claimed::Owned`]), never as someone else's; `complete`, `release` and `renew` check the owner, so a resent
    /// one never writes over another caller's claim or record, and one that had already landed changes nothing (at
    /// worst it answers [`Write::Fenced`], which the engine only logs). If a claim's reply is lost for good, the call
    /// fails and the engine releases the claim in the background (`release_lost_claim`), so the key is not left in
    /// flight with nobody running the request.
    ///
    /// [`Claimed::Owned`]: crate::store::contract::Claimed::Owned
    /// [`Write::Fenced`]: crate::store::contract::Write::Fenced
    ///
    /// A timeout is not retried: the server may be slow or frozen rather than gone, and a second wait would double
    /// the caller's.
    async fn query_retrying<T: FromRedisValue>(&self, pipe: &Pipeline, primary_of: Option<&str>) -> RedisResult<T> {
        match self.backend.run(pipe, primary_of).await {
            Err(error) if is_connection_error(&error) && !error.is_timeout() => {
                tracing::debug!(%error, "redis connection broke; retrying once on a fresh connection");
                self.backend.forget_connection().await;
                self.backend.run(pipe, primary_of).await
            }
            Err(error) => {
                if is_connection_error(&error) {
                    self.backend.forget_connection().await;
                }
                Err(error)
            }
            result => result,
        }
    }

    /// `PING`s the store, bypassing the fail-fast gate (the probe's own check).
    pub(super) async fn ping(&self) -> Result<(), Failure> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        self.guarded(self.timeouts.call_budget(), async {
            // A probe that finds the store down starts from a fresh connection: the old one may be the frozen one.
            if self.health.is_down() {
                self.backend.start_over().await;
            }
            self.query_retrying::<(String,)>(&pipe, None).await
        })
        .await
        .map(|_| ())
    }
}

/// A Cluster connection that sends everything to the primary of one slot, whatever the client's read routing (see
/// [`Commands::read`]). Redirections (`MOVED`, `ASK`) are followed as for any command.
struct OnPrimary {
    cluster: ClusterConnection,
    route: Route,
}

impl ConnectionLike for OnPrimary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(self.route));
        Box::pin(self.cluster.route_command(cmd.clone(), routing))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let routing = SingleNodeRoutingInfo::SpecificNode(self.route);
        // A Cluster connection copies every pipeline it sends (into its request queue), routed or not.
        Box::pin(self.cluster.route_pipeline(pipeline.clone(), offset, count, routing))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The connection broke, could not be made, or the server did not answer in time: not an answer from Redis.
pub(super) fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || error.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// Turns a Redis error into what the store answers.
pub(super) fn classify(error: RedisError) -> Failure {
    if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
        return Failure::NoScript;
    }
    let codes = error.clone().into_server_errors().unwrap_or_default();
    // A key of another type at a record's name (someone wrote a hash there): the store holds something that is not
    // a record, which no retry fixes.
    if codes.iter().any(|(_, error)| error.code() == "WRONGTYPE") {
        return Failure::Store(StoreError::Corrupt(Cause::with_source(format!("redis: {error}"), error)));
    }
    // Only this exact answer: the caller takes it as proof that the server lacks a command form, for good.
    if codes.iter().any(|(_, error)| error.code() == "ERR" && error.details() == Some("syntax error")) {
        return Failure::SyntaxRefused(error);
    }
    Failure::Store(unavailable(error))
}

pub(super) fn unavailable(error: RedisError) -> StoreError {
    StoreError::Unavailable(Cause::with_source(format!("redis: {error}"), error))
}

/// A setting redis-rs refused before connecting (a URL, a certificate, a Cluster or Sentinel configuration).
pub(super) fn invalid_config(error: RedisError) -> StoreError {
    StoreError::InvalidConfig(Cause::with_source(format!("redis: {error}"), error))
}

/// One multiplexed connection to a node, opened on first use and replaced after it breaks.
pub(super) struct NodeLink {
    client: Client,
    config: AsyncConnectionConfig,
    /// The current connection and its number.
    current: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    /// The number of the newest connection seen failing: a call forgets only the connection it saw fail, not one
    /// that another call has opened since.
    broken: AtomicU64,
    opened: AtomicU64,
}

impl NodeLink {
    pub(super) fn new(client: Client, timeouts: &Timeouts) -> Self {
        Self {
            client,
            config: timeouts.connection_config(Duration::ZERO),
            current: tokio::sync::Mutex::new(None),
            broken: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        }
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    /// The current connection, opening one when there is none or the current one was seen failing. Callers that
    /// arrive while a connection is being opened wait for it rather than open their own.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut current = self.current.lock().await;
        if let Some((number, connection)) = &*current
            && *number > self.broken.load(Ordering::Acquire)
        {
            return Ok((*number, connection.clone()));
        }
        *current = None;
        // Boxed: opening a connection is a large future, and every query would otherwise carry its room.
        let connection = Box::pin(self.client.get_multiplexed_async_connection_with_config(&self.config)).await?;
        let number = self.opened.fetch_add(1, Ordering::AcqRel) + 1;
        *current = Some((number, connection.clone()));
        Ok((number, connection))
    }

    /// Opens the connection now (the constructor's check that the server answers).
    pub(super) async fn connect(&self) -> RedisResult<()> {
        self.connection().await.map(drop)
    }

    /// Forgets whichever connection is current (the probe, starting over after an outage).
    fn forget_current(&self) {
        self.broken.fetch_max(self.opened.load(Ordering::Acquire), Ordering::AcqRel);
    }

    async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        let (number, mut connection) = self.connection().await?;
        let result = pipe.query_async(&mut connection).await;
        if let Err(error) = &result
            && is_connection_error(error)
        {
            self.broken.fetch_max(number, Ordering::AcqRel);
        }
        result
    }
}

/// The connection to whichever node Sentinel says is the primary, replaced when it fails.
pub(super) struct SentinelLink {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: tokio::sync::Mutex<Option<(Client, MultiplexedConnection)>>,
    config: AsyncConnectionConfig,
}

impl SentinelLink {
    pub(super) fn new(sentinel: SentinelClient, timeouts: &Timeouts) -> Self {
        Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
            current: tokio::sync::Mutex::new(None),
            config: timeouts.connection_config(Duration::ZERO),
        }
    }

    /// The primary's client, asking Sentinel when there is no live connection.
    pub(super) async fn client(&self) -> RedisResult<Client> {
        Ok(self.connection().await?.0)
    }

    async fn connection(&self) -> RedisResult<(Client, MultiplexedConnection)> {
        let mut current = self.current.lock().await;
        if let Some(connection) = &*current {
            return Ok(connection.clone());
        }
        // Boxed, as for a node: asking Sentinel and connecting are large futures that queries rarely need.
        let connect = async {
            let client = self.sentinel.lock().await.async_get_client().await?;
            let connection = client.get_multiplexed_async_connection_with_config(&self.config).await?;
            RedisResult::Ok((client, connection))
        };
        let (client, connection) = Box::pin(connect).await?;
        tracing::info!(primary = ?client.get_connection_info().addr(), "connected to the primary named by Sentinel");
        *current = Some((client.clone(), connection.clone()));
        Ok((client, connection))
    }

    pub(super) async fn forget(&self) {
        self.current.lock().await.take();
    }

    /// Runs `pipe` on the primary; if the node is no longer the primary, asks Sentinel again and retries once (a
    /// broken connection is retried by [`Commands`]).
    async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        let (_, mut connection) = self.connection().await?;
        match pipe.query_async(&mut connection).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) => {
                tracing::warn!(%error, "the Redis node is no longer the primary; asking Sentinel again");
                self.forget().await;
                let (_, mut connection) = self.connection().await?;
                pipe.query_async(&mut connection).await
            }
            Err(error) => {
                if is_connection_error(&error) {
                    tracing::debug!(%error, "lost the Redis primary; asking Sentinel again");
                }
                Err(error)
            }
            result => result,
        }
    }
}

// The background probe: it keeps the store's `Health` true.

/// Starts the probe of `commands` once, on the current Tokio runtime (none yet: a later call starts it). It holds
/// the commands weakly, so it ends with the store.
pub(super) fn start_probe(commands: &Arc<Commands>) {
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
