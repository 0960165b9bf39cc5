//! Waiting for replicas (`WAIT`) on connections of their own.
//!
//! `WAIT n t` answers once `n` replicas acknowledged every write made *on its connection*, and Redis blocks that
//! whole client connection meanwhile. Sent on the shared multiplexed connection it would hold up every other
//! request of the process (replays, renewals) for up to `t`, and count writes that are not ours. So a write that
//! must reach replicas goes, followed by its `WAIT`, on a connection checked out exclusively until both answered.

#[cfg(feature = "deadpool")]
use crate::store::redis::connection::pool_error;
use crate::store::redis::connection::{Backend, Commands, Failure, Timeouts, is_connection_error, start_probe};
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Pipeline, RedisError, RedisResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// At most this many connections wait for replicas at once; more writes queue for one (within their deadline).
const MAX_CONNECTIONS: usize = 32;

/// How many replicas must acknowledge, within what time, and the connections that ask them.
pub(super) struct ReplicaAcks {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
    idle: Mutex<Vec<Dedicated>>,
    slots: Semaphore,
    unreplicated_completions: AtomicU64,
}

/// A connection of our own to the node at `address` (after a Sentinel failover, connections to the old primary are
/// dropped rather than reused).
struct Dedicated {
    address: String,
    connection: MultiplexedConnection,
}

/// A connection nobody else uses until it is handed back.
enum Exclusive {
    Own(Dedicated),
    /// A deadpool-redis connection: exclusive while checked out. Its response timeout is the pool's.
    #[cfg(feature = "deadpool")]
    Pooled(deadpool_redis::Connection),
}

impl Exclusive {
    async fn query<T: FromRedisValue>(&mut self, pipe: &Pipeline) -> RedisResult<T> {
        match self {
            Exclusive::Own(dedicated) => pipe.query_async(&mut dedicated.connection).await,
            #[cfg(feature = "deadpool")]
            Exclusive::Pooled(connection) => pipe.query_async(&mut **connection).await,
        }
    }
}

impl ReplicaAcks {
    pub(super) fn new(replicas: u32, timeout: Duration) -> Self {
        Self {
            replicas,
            timeout,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(MAX_CONNECTIONS),
            unreplicated_completions: AtomicU64::new(0),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Dedicated>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `WAIT` for this policy, to end a pipeline with.
    pub(super) fn wait_command(&self, pipe: &mut Pipeline) {
        pipe.cmd("WAIT").arg(self.replicas).arg(self.timeout.as_millis() as u64);
    }

    /// Runs `pipe` (writes, then [`ReplicaAcks::wait_command`]) on an exclusive connection, within the store's
    /// deadline plus the `WAIT` timeout. Like every call, it fails at once while the store is known to be down,
    /// and retries once on a fresh connection if the one it got had broken while idle (see
    /// `Commands::query_retrying` for why a resent script cannot run anything twice).
    pub(super) async fn query<T: FromRedisValue>(
        &self,
        commands: &Arc<Commands>,
        pipe: &Pipeline,
    ) -> Result<T, Failure> {
        start_probe(commands);
        commands.health.check()?;
        let budget = commands.timeouts.call_budget() + self.timeout;
        commands
            .guarded(budget, async {
                let _slot =
                    self.slots.acquire().await.map_err(|_| RedisError::from(std::io::Error::other("closed")))?;
                let (mut exclusive, reused) = self.checkout(&commands.backend, &commands.timeouts).await?;
                let mut result = exclusive.query(pipe).await;
                if reused && matches!(&result, Err(error) if is_connection_error(error) && !error.is_timeout()) {
                    (exclusive, _) = self.open(&commands.backend, &commands.timeouts).await?;
                    result = exclusive.query(pipe).await;
                }
                match &result {
                    Err(error) if is_connection_error(error) => {}
                    _ => self.checkin(exclusive),
                }
                result
            })
            .await
    }

    /// An idle connection to the current node, or a new one; `true` when reused.
    async fn checkout(&self, backend: &Backend, timeouts: &Timeouts) -> RedisResult<(Exclusive, bool)> {
        #[cfg(feature = "deadpool")]
        if let Backend::Pool(pool) = backend {
            return Ok((Exclusive::Pooled(pool.get().await.map_err(pool_error)?), false));
        }
        let client = client(backend).await?;
        let address = client.get_connection_info().addr().to_string();
        {
            let mut idle = self.idle();
            idle.retain(|dedicated| dedicated.address == address);
            if let Some(dedicated) = idle.pop() {
                return Ok((Exclusive::Own(dedicated), true));
            }
        }
        self.open(backend, timeouts).await
    }

    async fn open(&self, backend: &Backend, timeouts: &Timeouts) -> RedisResult<(Exclusive, bool)> {
        #[cfg(feature = "deadpool")]
        if let Backend::Pool(pool) = backend {
            return Ok((Exclusive::Pooled(pool.get().await.map_err(pool_error)?), false));
        }
        let client = client(backend).await?;
        let address = client.get_connection_info().addr().to_string();
        // Its answers may take the `WAIT` timeout on top of the usual response time.
        let connection =
            client.get_multiplexed_async_connection_with_config(&timeouts.connection_config(self.timeout)).await?;
        Ok((Exclusive::Own(Dedicated { address, connection }), false))
    }

    fn checkin(&self, exclusive: Exclusive) {
        match exclusive {
            Exclusive::Own(dedicated) => self.idle().push(dedicated),
            // A pooled connection goes back to its pool when dropped.
            #[cfg(feature = "deadpool")]
            Exclusive::Pooled(_) => {}
        }
    }

    /// Counts a completion that fewer replicas than required acknowledged.
    pub(super) fn count_unreplicated_completion(&self) {
        self.unreplicated_completions.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ::metrics::counter!("idem_redis_unreplicated_completions_total").increment(1);
    }

    pub(super) fn unreplicated_completions(&self) -> u64 {
        self.unreplicated_completions.load(Ordering::Relaxed)
    }
}

/// The client of the node writes go to.
async fn client(backend: &Backend) -> RedisResult<redis::Client> {
    match backend {
        Backend::Node(link) => Ok(link.client().clone()),
        Backend::Manager(_, client) => Ok(client.clone()),
        Backend::Sentinel(link) => link.client().await,
        #[cfg(feature = "deadpool")]
        Backend::Pool(_) => Err(RedisError::from((redis::ErrorKind::Client, "no dedicated connections on a pool"))),
        Backend::Cluster(_) => {
            Err(RedisError::from((redis::ErrorKind::Client, "no dedicated connections on a Cluster")))
        }
    }
}
