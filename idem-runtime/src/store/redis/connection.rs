//! Where commands go: one enum over the ways a user can hand us Redis, so the store's logic is written once.

use crate::StoreError;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{Client, FromRedisValue, Pipeline, RedisError, RedisResult};
use std::sync::Arc;

pub(super) enum Commands {
    /// A single node (or a proxy), reconnecting by itself.
    Manager(ConnectionManager),
    /// A deadpool-redis pool: one pooled connection per operation.
    Pool(deadpool_redis::Pool),
    /// A Redis Cluster: commands routed by key slot.
    Cluster(ClusterConnection),
    /// The primary that Sentinel names, found again after a failover.
    Sentinel(Arc<SentinelLink>),
}

/// Why a query failed: the one server answer the store handles itself, or a store failure.
pub(super) enum Failure {
    /// `EVALSHA` named a script this node has not cached yet (a restart, a new Cluster node): send `EVAL` instead.
    NoScript,
    Store(StoreError),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::NoScript => StoreError::Unavailable("redis: NOSCRIPT after EVAL".to_owned()),
            Failure::Store(error) => error,
        }
    }
}

impl Commands {
    /// Sends `pipe` in one round trip.
    pub(super) async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, Failure> {
        let result = match self {
            Commands::Manager(manager) => pipe.query_async(&mut manager.clone()).await,
            Commands::Pool(pool) => {
                let mut connection = pool
                    .get()
                    .await
                    .map_err(|error| Failure::Store(StoreError::Unavailable(format!("redis pool: {error}"))))?;
                pipe.query_async(&mut connection).await
            }
            Commands::Cluster(cluster) => pipe.query_async(&mut cluster.clone()).await,
            Commands::Sentinel(link) => link.query(pipe).await,
        };
        result.map_err(|error| match error.kind() {
            redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => Failure::NoScript,
            _ => Failure::Store(unavailable(error)),
        })
    }
}

pub(super) fn unavailable(error: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

/// The connection to whichever node Sentinel says is the primary, replaced when it fails.
pub(super) struct SentinelLink {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: tokio::sync::Mutex<Option<(Client, MultiplexedConnection)>>,
}

impl SentinelLink {
    pub(super) fn new(sentinel: SentinelClient) -> Self {
        Self { sentinel: tokio::sync::Mutex::new(sentinel), current: tokio::sync::Mutex::new(None) }
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
        let client = self.sentinel.lock().await.async_get_client().await?;
        let connection = client.get_multiplexed_async_connection().await?;
        tracing::info!(primary = ?client.get_connection_info().addr(), "connected to the primary named by Sentinel");
        *current = Some((client.clone(), connection.clone()));
        Ok((client, connection))
    }

    async fn forget(&self) {
        self.current.lock().await.take();
    }

    /// Runs `pipe` on the primary; if the connection broke or the node is no longer the primary, asks Sentinel
    /// again and retries once.
    async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        let (_, mut connection) = self.connection().await?;
        match pipe.query_async(&mut connection).await {
            Err(error) if primary_lost(&error) => {
                tracing::warn!(%error, "lost the Redis primary; asking Sentinel again");
                self.forget().await;
                let (_, mut connection) = self.connection().await?;
                pipe.query_async(&mut connection).await
            }
            result => result,
        }
    }
}

fn primary_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}
