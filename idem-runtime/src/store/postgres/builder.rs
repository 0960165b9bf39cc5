//! Configuring a [`PostgresStore`]: its table, timeouts, pool and sweep.

use crate::store::error::{Cause, StoreError};
use crate::store::health::Health;
use crate::store::postgres::listen::{ListenSettings, Listener};
use crate::store::postgres::sql::{Statements, TableName, schema};
use crate::store::postgres::{PostgresStore, SweepSettings, unavailable};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a pooled connection may have sat idle before it is pinged when handed out (the store's own pool).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Builds a [`PostgresStore`]: its table, timeouts and sweep. [`PostgresStore::connect`] and
/// [`PostgresStore::from_pool`] use the defaults.
///
/// | setting | default | what it does |
/// |---|---|---|
/// | [`table`](Self::table) | `idem_records` | the table (optionally `schema.table`) |
/// | [`statement_timeout`](Self::statement_timeout) | 2 s | bounds each store call: a connection, the statement |
/// | [`connect_timeout`](Self::connect_timeout) | 1 s | opening a connection (the store's own pool, the listener) |
/// | [`max_connections`](Self::max_connections) | 10 | the size of the pool [`connect`](Self::connect) makes |
/// | [`sweep_interval`](Self::sweep_interval) | 60 s | time between two sweeps of expired rows |
/// | [`sweep_batch`](Self::sweep_batch) | 1 000 | rows one sweep batch deletes (10 batches a round at most) |
/// | [`listen_heartbeat`](Self::listen_heartbeat) | 1 s | silence after which the listening connection is checked |
/// | [`probe_interval`](Self::probe_interval) | 250 ms | time between two probes of a database found unreachable |
///
/// ```no_run
/// # use idem_runtime as idem;
/// # async fn run() -> Result<(), idem::store::StoreError> {
/// use idem::PostgresStore;
/// use std::time::Duration;
/// let store = PostgresStore::builder()
///     .table("billing.idempotency")
///     .statement_timeout(Duration::from_millis(500))
///     .sweep_interval(Duration::from_secs(300))
///     .connect("postgres://app@127.0.0.1/app")
///     .await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` or `pool` is called"]
pub struct PostgresStoreBuilder {
    /// The table, or why the name given was refused (reported by `connect` and `pool`).
    table: Result<TableName, String>,
    statement_timeout: Duration,
    connect_timeout: Duration,
    max_connections: u32,
    sweep: SweepSettings,
    listen_heartbeat: Duration,
    probe_interval: Duration,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            table: Ok(TableName::default()),
            statement_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_connections: 10,
            sweep: SweepSettings { interval: Duration::from_secs(60), batch: 1000, batches_per_round: 10 },
            listen_heartbeat: Duration::from_secs(1),
            probe_interval: Duration::from_millis(250),
        }
    }
}

impl PostgresStoreBuilder {
    /// The table holding claims and records (default `idem_records`), optionally schema-qualified
    /// (`schema.table`). Renewed leases live beside it in `<table>_leases`, and its notification channel is named
    /// after it (`<table>_done`).
    ///
    /// Each part must be an unquoted SQL identifier of at most 48 bytes: ASCII letters, digits and `_`, not
    /// starting with a digit; [`connect`](Self::connect) and [`pool`](Self::pool) refuse another name with
    /// [`StoreError::InvalidConfig`]. The name is written into SQL (quoted), so it must come from configuration,
    /// never from a request.
    pub fn table(mut self, table: &str) -> Self {
        self.table = TableName::parse(table).map_err(|reason| format!("postgres: table {table:?}: {reason}"));
        self
    }

    /// Bounds each store call, acquiring a connection included (default 2 s): a call that takes longer fails with
    /// [`StoreError::Unavailable`]. On the pool [`connect`](Self::connect) makes, it is also PostgreSQL's
    /// `statement_timeout`, so the server abandons the statement too.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Bounds opening a connection (default 1 s): the pool's acquire timeout with [`connect`](Self::connect), and
    /// the listening connection's in every case.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most connections the pool made by [`connect`](Self::connect) opens (default 10). The listening
    /// connection is one more, of its own.
    pub fn max_connections(mut self, connections: u32) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Time between two sweeps of expired rows (default 60 s). Expired rows are treated as absent whether swept
    /// or not; the sweep only keeps the table small.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Rows one sweep batch deletes at most (default 1 000); a round runs at most ten batches.
    pub fn sweep_batch(mut self, rows: u32) -> Self {
        self.sweep.batch = i64::from(rows.max(1));
        self
    }

    /// How long the listening connection may stay silent before a `SELECT 1` checks it (default 1 s), so one that
    /// died silently is replaced before a waiter needs it.
    pub fn listen_heartbeat(mut self, interval: Duration) -> Self {
        self.listen_heartbeat = interval;
        self
    }

    /// How often a database found unreachable is probed (default 250 ms). A call that finds no connection to the
    /// database (refused, reset, or none to be had from an empty pool) has a fresh connection try it at once; if
    /// that fails too, the database is marked down: from then on calls fail at once with
    /// [`StoreError::Unavailable`] instead of each waiting for the connect timeout, until a probe gets an answer.
    /// One connection that died while the database is fine, a slow statement or a full pool are not outages.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The SQL [`PostgresStore::migrate`] runs for this builder's table; `Err` when the table's name was refused.
    pub fn schema_sql(&self) -> Result<String, StoreError> {
        self.checked_table().map(schema)
    }

    fn checked_table(&self) -> Result<&TableName, StoreError> {
        self.table.as_ref().map_err(|refused| StoreError::InvalidConfig(Cause::new(refused.clone())))
    }

    /// Connects to `url` (e.g. `postgres://user:password@host:5432/database`) with a pool of its own. Fails with
    /// [`StoreError::Unavailable`] if the database does not answer within the connect timeout, and with
    /// [`StoreError::InvalidConfig`] at once, before connecting, for a URL that does not parse or a refused table
    /// name.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        self.checked_table()?;
        let options = PgConnectOptions::from_str(url).map_err(|error| {
            StoreError::InvalidConfig(Cause::with_source(format!("postgres: the URL does not parse: {error}"), error))
        })?;
        let server_timeout = self.statement_timeout.as_millis().max(1).to_string();
        let options = options.options([("statement_timeout", server_timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.connect_timeout)
            // sqlx pings every connection it hands out by default: one more round trip per call. A connection
            // in use moments ago is alive; one that sat idle (through a database restart, say) is checked.
            .test_before_acquire(false)
            .before_acquire(|connection, metadata| {
                Box::pin(async move {
                    Ok(metadata.idle_for < PING_WHEN_IDLE_FOR || sqlx::Connection::ping(connection).await.is_ok())
                })
            })
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        self.pool(pool)
    }

    /// Uses the application's own pool (its settings decide how it connects; TLS comes with sqlx's TLS features).
    /// The listening connection is opened with the pool's connect options, outside the pool. Fails only with
    /// [`StoreError::InvalidConfig`], for a refused table name.
    pub fn pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        let table = self.checked_table()?.clone();
        let statements = Arc::new(Statements::new(table));
        let settings = ListenSettings { timeout: self.connect_timeout, heartbeat: self.listen_heartbeat };
        let listener = Listener::new((*pool.connect_options()).clone(), statements.channel.clone(), settings);
        Ok(PostgresStore {
            pool,
            statements,
            call_timeout: self.statement_timeout,
            sweep: self.sweep,
            sweeper: Mutex::new(None),
            listener,
            health: Arc::new(Health::new("postgres")),
            probe_interval: self.probe_interval,
            connect_timeout: self.connect_timeout,
        })
    }
}

impl PostgresStore {
    /// A builder: table name, timeouts, sweep.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// Connects to `url` with a pool of its own and the default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Uses the application's own pool, with the default settings: the records live beside the application's data.
    ///
    /// ```no_run
    /// # use idem_runtime as idem;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::PostgresStore;
    /// use sqlx::postgres::PgPoolOptions;
    /// let pool = PgPoolOptions::new().max_connections(20).connect("postgres://app@127.0.0.1/app").await?;
    /// let store = PostgresStore::from_pool(pool.clone())?;
    /// store.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        Self::builder().pool(pool)
    }
}
