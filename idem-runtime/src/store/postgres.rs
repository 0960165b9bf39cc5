//! A [`Store`] on PostgreSQL: one table, one statement per state change, waiters woken by `LISTEN` / `NOTIFY`.

pub(crate) mod builder;
mod listen;
mod row;
mod sql;
pub(crate) mod tx;

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Forgotten, Store, StoreKey, Write};
use crate::store::error::{Cause, StoreError};
use crate::store::health::Health;
use crate::store::postgres::listen::Listener;
use crate::store::postgres::sql::{Statements, schema};
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgExecutor, Row, SqlStr};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many times a claim is sent at most when it raced with another claimant's insert (see [`PostgresStore::claim`]);
/// all of them within one statement timeout.
const CLAIM_ATTEMPTS: usize = 8;

/// A [`Store`] on PostgreSQL, through [`sqlx`].
///
/// **One table** (default `idem_records`, see [`PostgresStore::builder`]) and the renewed leases beside it
/// (`<table>_leases`), created by [`PostgresStore::migrate`]; [`PostgresStore::schema_sql`] shows their SQL for teams
/// that run migrations themselves. A row is a key's in-flight claim (`owner` set) or its completed record (`owner`
/// null, the response in `status`, `headers`, `body`), with `expires_at`: a row whose `expires_at` has passed (for a
/// claim whose owner renewed it: whose renewed lease has passed) is treated as absent by every statement, and a
/// background sweep deletes such rows in bounded batches. Times are the database's (`statement_timestamp()`), never
/// the application's, so the clocks of the processes sharing the table do not matter.
///
/// **Renewals never write the claim's row**: they write its lease in `<table>_leases`, holding the row in share
/// mode meanwhile. So a [`Tx`](crate::Tx) handler whose transaction runs at `REPEATABLE READ` or `SERIALIZABLE`,
/// whose snapshot predates any number of renewals (the keeper's, its own [`Fence::is_held`](crate::protocol::Fence::is_held)),
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
/// # use idem_runtime as idem;
/// # async fn run() -> Result<(), idem::store::StoreError> {
/// use idem::{Idempotency, PostgresStore};
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

impl PostgresStore {
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
        schema(&self.statements.table)
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
        statement: &SqlStr,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, sqlx::Error> {
        let columns = row::completed(record);
        let done = sqlx::query(statement.clone())
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
    sqlx::raw_sql(AssertSqlSafe(locked)).execute(pool).await.map(drop)
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
        let leases = sqlx::query(statements.sweep_leases.clone()).bind(settings.batch).execute(&mut *batch).await?;
        let locked: Vec<String> =
            sqlx::query_scalar(statements.sweep_lock.clone()).bind(settings.batch).fetch_all(&mut *batch).await?;
        if !locked.is_empty() {
            total +=
                sqlx::query(statements.sweep_delete.clone()).bind(&locked).execute(&mut *batch).await?.rows_affected();
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
            let answer = sqlx::query(self.statements.claim.clone())
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
        let released = sqlx::query(self.statements.release.clone())
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
        let renewed = sqlx::query(self.statements.renew.clone())
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
        let read = sqlx::query(self.statements.lease_left.clone()).bind(key.as_str()).fetch_optional(&self.pool);
        let Ok(read) = tokio::time::timeout_at(deadline, self.bounded(read)).await else { return Ok(()) };
        let Some(row) = read? else { return Ok(()) };
        let left: i64 = row.try_get("left_ms").map_err(unavailable)?;
        // A lease that runs out with nobody completing also ends the wait.
        let lease_end = tokio::time::Instant::now() + Duration::from_millis(left.max(0) as u64);
        registration.notified(deadline.min(lease_end)).await;
        Ok(())
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let read = sqlx::query(self.statements.inspect.clone()).bind(key.as_str()).fetch_optional(&self.pool);
        self.bounded(read).await?.as_ref().map(decode).transpose()
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let forget = sqlx::query(self.statements.forget.clone())
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
