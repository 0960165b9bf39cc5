//! A [`Store`] on PostgreSQL: one table, one statement per state change, waiters woken by `LISTEN` / `NOTIFY`.

mod listen;
mod row;
mod sql;

use super::health::Health;
use super::{Cause, Claimed, Forgotten, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Record};
use listen::{ListenSettings, Listener};
use sql::{Statements, TableName};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgExecutor, Row};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many times a claim is sent at most when it raced with another claimant's insert (see [`PostgresStore::claim`]);
/// all of them within one statement timeout.
const CLAIM_ATTEMPTS: usize = 8;

/// How long a pooled connection may have sat idle before it is pinged when handed out (the store's own pool).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// A [`Store`] on PostgreSQL, through [`sqlx`].
///
/// **One table** (default `idem_records`, see [`PostgresStoreBuilder::table`]) and the renewed leases beside it
/// (`<table>_leases`), created by [`PostgresStore::migrate`]; [`PostgresStore::schema_sql`] shows their SQL for teams
/// that run migrations themselves. A row is a key's in-flight claim (`owner` set) or its completed record (`owner`
/// null, the response in `status`, `headers`, `body`), with `expires_at`: a row whose `expires_at` has passed (for a
/// claim whose owner renewed it: whose renewed lease has passed) is treated as absent by every statement, and a
/// background sweep deletes such rows in bounded batches. Times are the database's (`statement_timestamp()`), never
/// the application's, so the clocks of the processes sharing the table do not matter.
///
/// **Renewals never write the claim's row**: they write its lease in `<table>_leases`, holding the row in share
/// mode meanwhile. So a [`Tx`](crate::Tx) handler whose transaction runs at `REPEATABLE READ` or `SERIALIZABLE`,
/// whose snapshot predates any number of renewals (the keeper's, its own [`Fence::is_held`](crate::Fence::is_held)),
/// still completes its claim's row inside that transaction: no renewal wrote it, and the completion reads nothing a
/// renewal writes. A renewal only extends its owner's existing claim: it never claims a free key, so one that lands
/// late (after the claim's release or completion, after a takeover) changes nothing.
///
/// **Round trips.** Every state change is one statement: a first request costs two (the claim, the completion),
/// a replay one (the claim finds the record and reads it in the same statement), plus one renewal per third of a
/// lease while a long handler runs. The claim is claim-or-read in one statement: it reads the key's live row and,
/// only when there is none (or it is the caller's own, or it expired), upserts the caller's claim, taking over an
/// expired one atomically under the row's lock; a replay writes nothing.
///
/// **Tables made by an earlier version** (before `<table>_leases`): [`PostgresStore::migrate`] adds the leases
/// table and leaves the existing one as it is; its rows stay valid (an in-flight row's `expires_at` is its lease
/// until its owner renews it here). Until the leases table exists, calls fail with [`StoreError::Unavailable`]
/// saying to migrate. Processes of the earlier version must not share the table with this one: they renew and
/// take over claims through `expires_at` alone, so they would take over a claim this version keeps renewed
/// (stop them before starting this version, or give it a new table).
///
/// **Waiting duplicates** are woken by `NOTIFY` (the completion, release or purge sends the key's digest on the
/// store's channel, `<table>_done`, delivered when it commits) through one listening connection per store,
/// opened on the first wait and replaced by itself when it dies; waits never poll and end by their own timeout
/// whatever the database does.
///
/// **Outages.** Each call is bounded by the statement timeout (default 2 s: acquiring a connection and running the
/// statement, every attempt of a claim included) and fails with [`StoreError::Unavailable`] (the engine answers `503 store-unavailable`); while the
/// database refuses connections, a call fails within the connect timeout (default 1 s). The pool reconnects by
/// itself when the database is back, and the listening connection is replaced within a couple of seconds.
///
/// **Poolers.** `LISTEN` needs a session of its own: the listening connection must reach PostgreSQL directly or
/// through a session-pooling PgBouncer. The statements are prepared (sqlx caches them per connection), which
/// PgBouncer's transaction pooling supports from version 1.21.
///
/// ```no_run
/// # async fn run() -> Result<(), idem_runtime::StoreError> {
/// use idem_runtime::{Idempotency, PostgresStore};
/// let store = PostgresStore::connect("postgres://app@127.0.0.1/app").await?;
/// store.migrate().await?;
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency; Ok(()) }
/// ```
pub struct PostgresStore {
    pool: PgPool,
    statements: Arc<Statements>,
    call_timeout: Duration,
    sweep: SweepSettings,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    listener: Listener,
    /// Whether the database answers: while it does not, calls fail at once and a probe looks for it.
    health: Arc<Health>,
    probe_interval: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.statements.table.as_str())
            .field("statement_timeout", &self.call_timeout)
            .field("sweep", &self.sweep)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct SweepSettings {
    interval: Duration,
    batch: i64,
    /// Batches per round at most, so one round over a huge backlog does not hold a connection for long.
    batches_per_round: usize,
}

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
/// # async fn run() -> Result<(), idem_runtime::StoreError> {
/// use idem_runtime::PostgresStore;
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
        self.checked_table().map(sql::schema)
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
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::PostgresStore;
    /// use sqlx::postgres::PgPoolOptions;
    /// let pool = PgPoolOptions::new().max_connections(20).connect("postgres://app@127.0.0.1/app").await?;
    /// let store = PostgresStore::from_pool(pool.clone())?;
    /// store.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        Self::builder().pool(pool)
    }

    /// Creates the tables and the index if they do not exist (idempotent: safe to run at every start, from several
    /// processes at once: they take turns on an advisory lock). The SQL is [`PostgresStore::schema_sql`]. On a table
    /// made by an earlier version it adds the leases table (see the type's doc).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrate = create_table(&self.pool, self.statements.table.as_str(), self.schema_sql());
        // DDL may wait for locks held by traffic on the table: give it longer than one call.
        match tokio::time::timeout(self.call_timeout.max(Duration::from_secs(30)), migrate).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable("postgres: migrating timed out".into())),
        }
    }

    /// The SQL that creates this store's tables and index (what [`PostgresStore::migrate`] runs), for teams that
    /// manage migrations themselves.
    pub fn schema_sql(&self) -> String {
        sql::schema(&self.statements.table)
    }

    /// The table's name, as configured (`idem_records` by default).
    pub fn table(&self) -> &str {
        self.statements.table.as_str()
    }

    /// The pool the store runs its statements on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Deletes expired rows now, in bounded batches, as the background sweep does every sweep interval: how many.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        sweep_round(&self.pool, &self.statements, self.sweep).await.map_err(unavailable)
    }

    /// Whether the connection that wakes waiting duplicates is up and listening (it is opened on the first wait).
    pub fn is_listening(&self) -> bool {
        self.listener.is_listening()
    }

    /// Runs `query` within the call timeout; fails at once while the database is known to be unreachable.
    async fn bounded<T>(&self, query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, StoreError> {
        self.bounded_until(Instant::now() + self.call_timeout, query).await
    }

    /// [`bounded`](Self::bounded) for one step of a call that must end by `deadline`.
    async fn bounded_until<T>(
        &self,
        deadline: Instant,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.answer_by(deadline, query).await?.map_err(|error| self.failed(error))
    }

    /// The database's answer to `query` by `deadline`, its own error left for the caller to sort; `Err` when the
    /// database is known to be unreachable or gave no answer in time.
    async fn answer_by<T>(
        &self,
        deadline: Instant,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<Result<T, sqlx::Error>, StoreError> {
        self.health.check()?;
        tokio::time::timeout_at(deadline, query)
            .await
            .map_err(|_| StoreError::Unavailable(format!("postgres: no answer within {:?}", self.call_timeout).into()))
    }

    /// The store's error for `error`, after starting a probe if it may mean the database cannot be reached.
    fn failed(&self, error: sqlx::Error) -> StoreError {
        if self.is_outage(&error) {
            self.start_probe();
        }
        unavailable(error)
    }

    /// Whether `error` may mean the database cannot be reached, rather than that it answered (an error of the
    /// statement) or is busy: a broken or refused connection, or a pool that timed out with no connection at all
    /// (the database went away and the pool could open none). A full pool timing out, or a statement that runs
    /// past the timeout (waiting for a lock), is load, not an outage. One broken connection is not an outage either:
    /// the probe decides.
    fn is_outage(&self, error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::PoolTimedOut => self.pool.size() == 0,
            _ => false,
        }
    }

    /// Checks at once, on a connection of its own, whether the database answers: if it does not, marks it down
    /// (calls then fail at once) and checks again every probe interval until it does. A suspicion that the first
    /// check clears (a single connection that died, the others fine) changes nothing. Once per suspicion.
    fn start_probe(&self) {
        if !self.health.claim_probe() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.health.probe_ended();
            return;
        };
        let options = (*self.pool.connect_options()).clone();
        let (health, interval, timeout) = (Arc::downgrade(&self.health), self.probe_interval, self.connect_timeout);
        runtime.spawn(async move {
            loop {
                // The store is gone: nobody needs the answer.
                let Some(health) = health.upgrade() else { return };
                match tokio::time::timeout(timeout, answers(&options)).await {
                    Ok(Ok(())) => {
                        // In this order: a call failing between the two would otherwise mark the database down
                        // with no probe left to find it again.
                        health.probe_ended();
                        health.mark_up();
                        return;
                    }
                    Ok(Err(error)) => health.mark_down(&error),
                    Err(_) => health.mark_down(&format!("no connection within {timeout:?}")),
                }
                drop(health);
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// Starts the background sweep if it is not running (on first use, inside the caller's runtime).
    fn ensure_sweeper(&self) {
        let mut sweeper = self.sweeper.lock().unwrap_or_else(PoisonError::into_inner);
        if sweeper.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let (pool, statements, settings) = (self.pool.clone(), self.statements.clone(), self.sweep);
        *sweeper = Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(settings.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match sweep_round(&pool, &statements, settings).await {
                    Ok(0) => {}
                    Ok(rows) => tracing::debug!(rows, table = statements.table.as_str(), "swept expired rows"),
                    Err(error) => tracing::debug!(%error, "sweeping expired rows failed; trying again next round"),
                }
            }
        }));
    }

    /// Completes `key` for `owner` on `executor` with `statement` (`complete` or `complete_in_transaction`): the
    /// owner-checked upsert and its notification in one statement, delivered when the executor's transaction
    /// commits.
    async fn complete_on<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        statement: &str,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, sqlx::Error> {
        let columns = row::completed(record);
        let done = sqlx::query(statement)
            .bind(key.as_str())
            .bind(owner.as_str())
            .bind(columns.fingerprint)
            .bind(columns.status)
            .bind(columns.replayable)
            .bind(columns.headers)
            .bind(columns.body)
            .bind(millis(ttl))
            .bind(&self.statements.channel)
            .fetch_optional(executor)
            .await?;
        Ok(if done.is_some() { Write::Applied } else { Write::Fenced })
    }
}

/// What the transactional doors ([`Tx`](crate::Tx)) ask of the store: a transaction on its pool, and the
/// owner-checked completion inside it.
impl PostgresStore {
    /// Opens a transaction on the store's pool, within the call timeout.
    pub(crate) async fn begin_transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        self.bounded(self.pool.begin()).await
    }

    /// Completes `key` for `owner` inside `transaction` and commits it, so the record becomes visible (and waiting
    /// duplicates are notified) together with the handler's own writes; each step within the call timeout.
    ///
    /// [`Write::Fenced`] (rolled back) when the claim is no longer the owner's. When the handler left its
    /// transaction aborted (one of its statements failed, and it answered anyway, say `409` for a unique
    /// violation), nothing it wrote can commit, and its answer is final: the transaction is rolled back and the
    /// answer recorded by the ordinary owner-checked completion, so a retry replays it. `Err` (rolled back) when the
    /// completion or the commit failed otherwise.
    pub(crate) async fn complete_transaction(
        &self,
        mut transaction: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let statement = &self.statements.complete_in_transaction;
        let write = self.complete_on(&mut *transaction, statement, key, owner, record, ttl);
        match self.answer_by(Instant::now() + self.call_timeout, write).await {
            Ok(Ok(Write::Applied)) => self.commit(transaction).await.map(|()| Write::Applied),
            Ok(Ok(Write::Fenced)) => {
                self.roll_back(transaction).await;
                Ok(Write::Fenced)
            }
            Ok(Err(error)) if is_aborted_transaction(&error) => {
                tracing::debug!(key = %key, "the handler's transaction was aborted: its answer is recorded outside it");
                self.roll_back(transaction).await;
                self.complete(key, owner, record, ttl).await
            }
            Ok(Err(error)) => {
                self.roll_back(transaction).await;
                Err(self.failed(error))
            }
            Err(error) => {
                self.roll_back(transaction).await;
                Err(error)
            }
        }
    }

    /// Commits `transaction` within the call timeout.
    pub(crate) async fn commit(
        &self,
        transaction: sqlx::Transaction<'static, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        self.bounded(transaction.commit()).await
    }

    /// Rolls `transaction` back within the call timeout. A rollback that fails or times out is left to the
    /// database: the transaction ends with its connection at the latest.
    pub(crate) async fn roll_back(&self, transaction: sqlx::Transaction<'static, sqlx::Postgres>) {
        if let Err(error) = self.bounded(transaction.rollback()).await {
            tracing::warn!(%error, "rolling a handler's transaction back failed; it ends with its connection");
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(task) = self.sweeper.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// Whether the database answers a fresh connection (outside the pool, whose connections may all be broken).
async fn answers(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect_with(options).await?;
    connection.ping().await?;
    connection.close().await
}

/// Runs `schema` after taking an advisory lock named after the table, in one implicit transaction (one simple-query
/// message), so processes migrating at once take turns: two concurrent `CREATE TABLE IF NOT EXISTS` can otherwise
/// both try to create it.
async fn create_table(pool: &PgPool, table: &str, schema: String) -> Result<(), sqlx::Error> {
    // The name is a checked identifier (letters, digits, `_`, `.`): safe as a literal.
    let locked = format!("SELECT pg_advisory_xact_lock(hashtext('{table}'));\n{schema}");
    sqlx::raw_sql(&locked).execute(pool).await.map(drop)
}

/// One sweep round: batches of expired leases and rows deleted until a batch comes back short, or the round's
/// bound; how many rows.
///
/// A batch is a transaction: lapsed leases are deleted, then the rows that look expired are locked, then those
/// still expired are deleted, seen from a snapshot taken once they were locked. No renewal can be under way on a
/// locked row (a renewal holds its claim's row while it writes the lease), so a lease renewed just before is seen
/// and its claim kept; a renewal after finds the row gone and changes nothing.
async fn sweep_round(pool: &PgPool, statements: &Statements, settings: SweepSettings) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    for _ in 0..settings.batches_per_round {
        let mut batch = pool.begin().await?;
        // Each statement must see what committed before it ran, whatever the pool's default isolation.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED").execute(&mut *batch).await?;
        let leases = sqlx::query(&statements.sweep_leases).bind(settings.batch).execute(&mut *batch).await?;
        let locked: Vec<String> =
            sqlx::query_scalar(&statements.sweep_lock).bind(settings.batch).fetch_all(&mut *batch).await?;
        if !locked.is_empty() {
            total += sqlx::query(&statements.sweep_delete).bind(&locked).execute(&mut *batch).await?.rows_affected();
        }
        batch.commit().await?;
        let full = |rows: u64| rows >= settings.batch as u64;
        if !full(leases.rows_affected()) && !full(locked.len() as u64) {
            break;
        }
    }
    Ok(total)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Sorts sqlx's errors: what the database could not be asked, or refused, is [`StoreError::Unavailable`]; a row
/// that could not be read as the expected columns is [`StoreError::Corrupt`].
fn unavailable(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(Cause::with_source(format!("postgres: {error}"), error))
        }
        sqlx::Error::Database(ref database) if database.code().as_deref() == Some("42P01") => StoreError::Unavailable(
            Cause::new(format!("postgres: {error} (run PostgresStore::migrate, or the SQL of schema_sql)")),
        ),
        error => StoreError::Unavailable(Cause::with_source(format!("postgres: {error}"), error)),
    }
}

/// Whether `error` is PostgreSQL refusing a statement because the transaction was already aborted by an earlier
/// one (`25P02 in_failed_sql_transaction`).
fn is_aborted_transaction(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.code().as_deref() == Some("25P02"))
}

fn decode(row: &PgRow) -> Result<Entry, StoreError> {
    row::entry(row).map_err(|why| StoreError::Corrupt(why.into()))
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        self.ensure_sweeper();
        let fingerprint = fingerprint.to_hex();
        // The statement answers one row: the caller's claim, or the live row someone else holds. It answers none
        // only when its insert met a row committed after the statement's snapshot was taken (a concurrent
        // claimant's), which the snapshot cannot show; sent again, it sees that row. Every attempt shares the
        // call's one timeout.
        let deadline = Instant::now() + self.call_timeout;
        for _ in 0..CLAIM_ATTEMPTS {
            let answer = sqlx::query(&self.statements.claim)
                .bind(key.as_str())
                .bind(owner.as_str())
                .bind(&fingerprint)
                .bind(millis(lease))
                .fetch_optional(&self.pool);
            let Some(row) = self.bounded_until(deadline, answer).await? else { continue };
            let owned: bool = row.try_get("owned").map_err(unavailable)?;
            return if owned { Ok(Claimed::Owned) } else { decode(&row).map(Claimed::Existing) };
        }
        Err(StoreError::Unavailable(
            format!("postgres: the claim raced {CLAIM_ATTEMPTS} times with other claimants").into(),
        ))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.bounded(self.complete_on(&self.pool, &self.statements.complete, key, owner, record, ttl)).await
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        let released = sqlx::query(&self.statements.release)
            .bind(key.as_str())
            .bind(owner.as_str())
            .bind(&self.statements.channel)
            .fetch_optional(&self.pool);
        Ok(if self.bounded(released).await?.is_some() { Write::Applied } else { Write::Fenced })
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        // The claim's row keeps the fingerprint it was claimed with: a renewal never writes it.
        let _ = fingerprint;
        let renewed = sqlx::query(&self.statements.renew)
            .bind(key.as_str())
            .bind(owner.as_str())
            .bind(millis(lease))
            .fetch_optional(&self.pool);
        Ok(if self.bounded(renewed).await?.is_some() { Write::Applied } else { Write::Fenced })
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        // One deadline bounds it all (the listening connection, the re-read, the notification).
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let mut registration = self.listener.register(key.as_str());
        // Re-read only once listening: a completion from then on is announced to us.
        if !registration.ready(deadline).await {
            return Ok(());
        }
        let read = sqlx::query(&self.statements.lease_left).bind(key.as_str()).fetch_optional(&self.pool);
        let Ok(read) = tokio::time::timeout_at(deadline, self.bounded(read)).await else { return Ok(()) };
        let Some(row) = read? else { return Ok(()) };
        let left: i64 = row.try_get("left_ms").map_err(unavailable)?;
        // A lease that runs out with nobody completing also ends the wait.
        let lease_end = tokio::time::Instant::now() + Duration::from_millis(left.max(0) as u64);
        registration.notified(deadline.min(lease_end)).await;
        Ok(())
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let read = sqlx::query(&self.statements.inspect).bind(key.as_str()).fetch_optional(&self.pool);
        self.bounded(read).await?.as_ref().map(decode).transpose()
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let forget = sqlx::query(&self.statements.forget)
            .bind(key.as_str())
            .bind(&self.statements.channel)
            .fetch_one(&self.pool);
        let row = self.bounded(forget).await?;
        let removed: bool = row.try_get("removed").map_err(unavailable)?;
        let in_flight: bool = row.try_get("in_flight").map_err(unavailable)?;
        Ok(match (removed, in_flight) {
            (true, _) => Forgotten::Removed,
            (false, true) => Forgotten::InFlight,
            (false, false) => Forgotten::Absent,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(sqlx::query("SELECT 1").execute(&self.pool)).await.map(drop)
    }
}
