//! `PostgresStore` on a real PostgreSQL (started by the tests, on a free loopback port): the conformance suite,
//! then what only the database can show: the table's rows, owner fencing and takeover between store instances,
//! the sweep, `NOTIFY` wake-ups, the listening connection killed, the database stopped and started again.

mod postgres_server;

use idem::PostgresStore;
use idem::store::{
    Claimed, Entry, Fingerprint, Forgotten, OwnerToken, Record, Store, StoreError, StoreKey, Stored, StoredResponse,
    Write,
};
use postgres_server::{PostgresServer, fresh_table, shared_server, shared_store, store_on};
// The dynamic SQL here only names the tables the tests made themselves (`fresh_table`).
use sqlx::{AssertSqlSafe, PgPool, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};

idem::test_kit::conformance_tests!(postgres, postgres_server::shared_store);

fn fp(text: &str) -> Fingerprint {
    Fingerprint::builder().field(text.as_bytes()).finish()
}

fn record(body: &'static str) -> Record {
    Record {
        fingerprint: fp("a"),
        stored: Stored::Response(StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "text/plain".into()), ("x-raw".into(), (&b"\xff"[..]).into())],
            body: body.into(),
        }),
    }
}

fn fresh_key(label: &str) -> StoreKey {
    StoreKey::derive(&[label.as_bytes(), format!("{:?}", Instant::now()).as_bytes()])
}

async fn owned(store: &PostgresStore, key: &StoreKey, lease: Duration) -> OwnerToken {
    let owner = OwnerToken::generate();
    match store.claim(key, &fp("a"), &owner, lease).await.unwrap() {
        Claimed::Owned => owner,
        other => panic!("expected to own the claim, got {other:?}"),
    }
}

/// A second store instance (as in a second process) on the same table.
async fn twin(store: &PostgresStore, server: &PostgresServer) -> PostgresStore {
    PostgresStore::builder().table(store.table()).connect(&server.url()).await.unwrap()
}

async fn rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM \"{table}\""))).fetch_one(pool).await.unwrap().get(0)
}

/// Polls `done` every 20 ms until it holds, failing after `limit`.
/// A waiter on `key` in the background (30 s at most), answering how long it waited.
fn spawn_waiter(store: &Arc<PostgresStore>, key: &StoreKey) -> tokio::task::JoinHandle<Duration> {
    let (store, key) = (store.clone(), key.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        store.wait(&key, Duration::from_secs(30)).await.unwrap();
        started.elapsed()
    })
}

async fn eventually<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_rows_of_columns_under_a_digest_with_the_databases_expiry() {
    let store = shared_store().await;
    let key = fresh_key("columns");
    let owner = owned(&store, &key, Duration::from_secs(30)).await;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT owner, fingerprint, status, extract(epoch FROM expires_at - now())::float8 AS left FROM \"{}\" \
         WHERE key = $1",
        store.table()
    )))
    .bind(key.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(row.get::<Option<String>, _>("owner").as_deref(), Some(owner.as_str()));
    assert_eq!(row.get::<String, _>("fingerprint"), fp("a").to_hex());
    assert_eq!(row.get::<Option<i16>, _>("status"), None, "in flight: no response yet");
    let left: f64 = row.get("left");
    assert!((20.0..=30.0).contains(&left), "the lease runs 30 s on the database's clock: {left}");

    let ttl = Duration::from_secs(3600);
    assert_eq!(store.complete(&key, &owner, &record("done"), ttl).await.unwrap(), Write::Applied);
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT owner, status, replayable, headers, convert_from(body, 'UTF8') AS body, \
         extract(epoch FROM expires_at - now())::float8 AS left FROM \"{}\" WHERE key = $1",
        store.table()
    )))
    .bind(key.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(row.get::<Option<String>, _>("owner"), None);
    assert_eq!(row.get::<Option<i16>, _>("status"), Some(201));
    assert_eq!(row.get::<Option<bool>, _>("replayable"), Some(true));
    assert_eq!(
        row.get::<serde_json::Value, _>("headers"),
        serde_json::json!([
            { "name": "content-type", "value": "text/plain" },
            { "name": "x-raw", "value_base64": "/w==" },
        ])
    );
    assert_eq!(row.get::<String, _>("body"), "done");
    let left: f64 = row.get("left");
    assert!((3500.0..=3600.0).contains(&left), "the record is kept for its ttl: {left}");
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::Completed(record("done"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_again_by_its_owner_is_owned_and_its_lease_starts_again() {
    let store = shared_store().await;
    let key = fresh_key("resent");
    let owner = OwnerToken::generate();
    assert_eq!(store.claim(&key, &fp("a"), &owner, Duration::from_secs(2)).await.unwrap(), Claimed::Owned);
    assert_eq!(store.claim(&key, &fp("a"), &owner, Duration::from_secs(600)).await.unwrap(), Claimed::Owned);
    let left: f64 = sqlx::query(AssertSqlSafe(format!(
        "SELECT extract(epoch FROM expires_at - now())::float8 FROM \"{}\" WHERE key = $1",
        store.table()
    )))
    .bind(key.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap()
    .get(0);
    assert!(left > 500.0, "the resent claim's lease (600 s) replaced the first one (2 s): {left} s");
    assert_eq!(
        store.claim(&key, &fp("b"), &OwnerToken::generate(), Duration::from_secs(2)).await.unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") }),
        "another owner sees the claim, with the first fingerprint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_claim_is_taken_over_by_exactly_one_of_many_concurrent_claimants() {
    let server = shared_server();
    let store = Arc::new(shared_store().await);
    let other = Arc::new(twin(&store, server).await);
    for round in 0..5 {
        let key = fresh_key(&format!("takeover-{round}"));
        let stale = owned(&store, &key, Duration::from_millis(200)).await;
        if round % 2 == 1 {
            // Its lease renewed once, then lapsed too.
            assert_eq!(store.renew(&key, &stale, &fp("a"), Duration::from_millis(300)).await.unwrap(), Write::Applied);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let claimants: Vec<_> = (0..24)
            .map(|index| {
                let store = if index % 2 == 0 { store.clone() } else { other.clone() };
                let key = key.clone();
                tokio::spawn(async move {
                    let owner = OwnerToken::generate();
                    let claimed = store.claim(&key, &fp("a"), &owner, Duration::from_secs(30)).await.unwrap();
                    (owner, claimed)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for claimant in claimants {
            match claimant.await.unwrap() {
                (owner, Claimed::Owned) => winners.push(owner),
                (_, Claimed::Existing(entry)) => assert_eq!(entry, Entry::InFlight { fingerprint: fp("a") }),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one claimant takes the expired claim over");
        let ttl = Duration::from_secs(60);
        assert_eq!(store.renew(&key, &stale, &fp("a"), ttl).await.unwrap(), Write::Fenced, "round {round}");
        assert_eq!(store.complete(&key, &stale, &record("stale"), ttl).await.unwrap(), Write::Fenced);
        assert_eq!(other.complete(&key, &winners[0], &record("fresh"), ttl).await.unwrap(), Write::Applied);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_is_fenced_and_changes_nothing() {
    let store = shared_store().await;
    let key = fresh_key("fenced");
    let lease = Duration::from_millis(300);
    let stale = owned(&store, &key, lease).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = owned(&store, &key, lease).await;
    let ttl = Duration::from_secs(60);
    assert_eq!(store.complete(&key, &stale, &record("stale"), ttl).await.unwrap(), Write::Fenced);
    assert_eq!(store.renew(&key, &stale, &fp("a"), lease).await.unwrap(), Write::Fenced);
    assert_eq!(store.release(&key, &stale).await.unwrap(), Write::Fenced);
    assert_eq!(store.renew(&key, &fresh, &fp("a"), Duration::from_secs(30)).await.unwrap(), Write::Applied);
    assert_eq!(store.complete(&key, &fresh, &record("fresh"), ttl).await.unwrap(), Write::Applied);
    // A completed record is nobody's claim any more: not even its maker's writes touch it.
    assert_eq!(store.complete(&key, &fresh, &record("again"), ttl).await.unwrap(), Write::Fenced);
    assert_eq!(store.release(&key, &fresh).await.unwrap(), Write::Fenced);
    assert_eq!(store.renew(&key, &fresh, &fp("a"), lease).await.unwrap(), Write::Fenced);
    assert_eq!(
        store.claim(&key, &fp("a"), &fresh, lease).await.unwrap(),
        Claimed::Existing(Entry::Completed(record("fresh")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_key_is_completed_and_renewed_for_the_owner_whose_lease_lapsed() {
    let store = shared_store().await;
    let ttl = Duration::from_secs(60);
    let key = fresh_key("lapsed-complete");
    let owner = owned(&store, &key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.inspect(&key).await.unwrap(), None, "an expired row is absent");
    assert_eq!(store.complete(&key, &owner, &record("late"), ttl).await.unwrap(), Write::Applied);
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::Completed(record("late"))));

    let key = fresh_key("lapsed-renew");
    let owner = owned(&store, &key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.renew(&key, &owner, &fp("a"), Duration::from_secs(30)).await.unwrap(), Write::Applied);
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::InFlight { fingerprint: fp("a") }));
    assert_eq!(
        store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(1)).await.unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") }),
        "claimed again: others see it in flight"
    );
    // A renewal only extends a claim that exists: once released, the key stays free.
    assert_eq!(store.release(&key, &owner).await.unwrap(), Write::Applied);
    assert_eq!(store.renew(&key, &owner, &fp("a"), Duration::from_secs(30)).await.unwrap(), Write::Fenced);
    assert_eq!(store.inspect(&key).await.unwrap(), None);
    // Completing a key nobody ever claimed is the same as completing a free one.
    let key = fresh_key("never-claimed");
    assert_eq!(store.complete(&key, &OwnerToken::generate(), &record("x"), ttl).await.unwrap(), Write::Applied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_removes_a_record_but_never_an_in_flight_claim() {
    let store = shared_store().await;
    let key = fresh_key("forget");
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Absent);
    let owner = owned(&store, &key, Duration::from_secs(30)).await;
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::InFlight);
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::InFlight { fingerprint: fp("a") }));
    store.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Removed);
    assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Absent);
    owned(&store, &key, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_corrupt_and_can_be_forgotten() {
    let store = shared_store().await;
    let table = store.table().to_owned();
    let damages = [
        ("status = 0", "status 0"),
        ("headers = '[{\"name\": \"content-length\", \"value\": \"9\"}]'", "content-length"),
        ("headers = '{\"x\": 1}'", "not a list of headers"),
        ("body = NULL", "without a body"),
        ("fingerprint = 'zz'", "not 64 hex digits"),
        ("replayable = NULL", "without `replayable`"),
    ];
    for (damage, reason) in damages {
        let key = fresh_key("corrupt");
        let owner = owned(&store, &key, Duration::from_secs(30)).await;
        store.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("UPDATE \"{table}\" SET {damage} WHERE key = $1")))
            .bind(key.as_str())
            .execute(store.pool())
            .await
            .unwrap();
        let claimed = store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
        assert!(
            matches!(&claimed, Err(StoreError::Corrupt(why)) if why.message().contains(reason)),
            "{damage}: {claimed:?}"
        );
        assert!(matches!(store.inspect(&key).await, Err(StoreError::Corrupt(_))), "{damage}");
        assert_eq!(store.forget(&key).await.unwrap(), Forgotten::Removed, "{damage}");
        owned(&store, &key, Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_expired_rows_in_batches_and_stops_with_its_store() {
    let server = shared_server();
    // The rows are written by a store whose first sweep is a minute away.
    let writer = shared_store().await;
    let table = writer.table().to_owned();
    let pool = writer.pool().clone();
    owned(&writer, &fresh_key("kept"), Duration::from_secs(60)).await;
    // Two claims past their own lease, renewed: one for a minute (kept), one briefly (its lease lapses too).
    let renewed = fresh_key("renewed");
    let owner = owned(&writer, &renewed, Duration::from_millis(50)).await;
    assert_eq!(writer.renew(&renewed, &owner, &fp("a"), Duration::from_secs(60)).await.unwrap(), Write::Applied);
    let lapsed = fresh_key("renewed-lapsed");
    let owner = owned(&writer, &lapsed, Duration::from_millis(50)).await;
    assert_eq!(writer.renew(&lapsed, &owner, &fp("a"), Duration::from_millis(50)).await.unwrap(), Write::Applied);
    for index in 0..40 {
        let key = fresh_key(&format!("swept-{index}"));
        let owner = owned(&writer, &key, Duration::from_millis(50)).await;
        if index % 2 == 0 {
            writer.complete(&key, &owner, &record("x"), Duration::from_millis(50)).await.unwrap();
        }
    }
    assert_eq!(rows(&pool, &table).await, 43);
    assert_eq!(rows(&pool, &format!("{table}_leases")).await, 2);

    // A second instance sweeps every 100 ms, 7 rows a statement; it starts sweeping with its first claim.
    let sweeper = PostgresStore::builder()
        .table(&table)
        .sweep_interval(Duration::from_millis(100))
        .sweep_batch(7)
        .connect(&server.url())
        .await
        .unwrap();
    let kept = fresh_key("kept-too");
    owned(&sweeper, &kept, Duration::from_secs(60)).await;
    eventually("the sweep deletes the 41 expired rows and the lapsed lease", Duration::from_secs(20), || async {
        rows(&pool, &table).await == 3 && rows(&pool, &format!("{table}_leases")).await == 1
    })
    .await;
    assert_eq!(sweeper.inspect(&kept).await.unwrap(), Some(Entry::InFlight { fingerprint: fp("a") }));
    assert_eq!(sweeper.inspect(&renewed).await.unwrap(), Some(Entry::InFlight { fingerprint: fp("a") }));

    drop(sweeper);
    // A statement already sent when the store dropped may still finish; none is sent after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{table}\" (key, owner, fingerprint, expires_at) \
         SELECT 'expired-' || n, 'o', $1, now() - interval '1 second' FROM generate_series(1, 5) n"
    )))
    .bind(fp("a").to_hex())
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rows(&pool, &table).await, 8, "a dropped store no longer sweeps");
    assert_eq!(writer.sweep().await.unwrap(), 5, "an explicit sweep deletes them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_notify_from_another_instance_long_before_its_timeout() {
    let server = shared_server();
    let store = Arc::new(shared_store().await);
    let other = twin(&store, server).await;
    for ending in ["complete", "release", "forget"] {
        let key = fresh_key(ending);
        let owner = owned(&other, &key, Duration::from_secs(60)).await;
        let waiter = spawn_waiter(&store, &key);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "{ending}: the waiter waits while the claim is held");
        match ending {
            "complete" => assert_eq!(
                other.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap(),
                Write::Applied
            ),
            "release" => assert_eq!(other.release(&key, &owner).await.unwrap(), Write::Applied),
            _ => {
                // Only a record can be forgotten: an operator purges it while a second claim waits on it.
                other.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
                let second = owned(&other, &fresh_key("unrelated"), Duration::from_secs(1)).await;
                drop(second);
                assert_eq!(other.forget(&key).await.unwrap(), Forgotten::Removed);
            }
        }
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(10), "{ending}: woken by NOTIFY, not the 30 s timeout: {waited:?}");
        assert!(waited >= Duration::from_millis(450), "{ending}: not before it: {waited:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_returns_when_the_lease_runs_out_and_at_once_on_a_free_key() {
    let store = shared_store().await;
    let key = fresh_key("lease-end");
    owned(&store, &key, Duration::from_millis(700)).await;
    let started = Instant::now();
    store.wait(&key, Duration::from_secs(30)).await.unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "ended with the lease, not the 30 s timeout: {waited:?}");
    let started = Instant::now();
    store.wait(&fresh_key("free"), Duration::from_secs(30)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "nothing in flight: no wait");
}

/// The backend pid of the store's listening connection, once it is up.
async fn listener_pid(pool: &PgPool) -> Option<i32> {
    sqlx::query("SELECT pid FROM pg_stat_activity WHERE application_name LIKE '%(idem listener)'")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_by_itself_after_its_connection_is_killed() {
    // A server of its own: exactly one listening connection on it.
    let server = PostgresServer::start();
    let store = Arc::new(store_on(&server, PostgresStore::builder()).await);
    let key = fresh_key("killed");
    let owner = owned(&store, &key, Duration::from_secs(60)).await;
    let waiter = spawn_waiter(&store, &key);
    eventually("the store listens", Duration::from_secs(10), || async { store.is_listening() }).await;
    let first = listener_pid(store.pool()).await.expect("a listening connection");
    let killed: bool =
        sqlx::query("SELECT pg_terminate_backend($1)").bind(first).fetch_one(store.pool()).await.unwrap().get(0);
    assert!(killed);
    // The waiter may have missed a notification while the connection was down: it is woken to re-check.
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(10), "woken by the lost connection, not the timeout: {waited:?}");

    eventually("a new listening connection", Duration::from_secs(10), || async {
        store.is_listening() && listener_pid(store.pool()).await.is_some_and(|pid| pid != first)
    })
    .await;
    // And the new connection delivers notifications.
    let waiter = spawn_waiter(&store, &key);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the claim is still held");
    store.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(10), "woken by NOTIFY on the new connection: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_bounds_every_call_and_the_store_heals_when_it_is_back() {
    let mut server = PostgresServer::start();
    let builder = PostgresStore::builder()
        .statement_timeout(Duration::from_millis(1500))
        .connect_timeout(Duration::from_millis(500));
    let store = Arc::new(store_on(&server, builder).await);
    let key = fresh_key("stopped");
    owned(&store, &key, Duration::from_secs(60)).await;
    let waiter = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move {
            let started = Instant::now();
            let _ = store.wait(&key, Duration::from_secs(3)).await;
            started.elapsed()
        }
    });
    eventually("the store listens", Duration::from_secs(10), || async { store.is_listening() }).await;
    server.stop();

    let started = Instant::now();
    let claimed = store.claim(&fresh_key("down"), &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
    assert!(matches!(claimed, Err(StoreError::Unavailable(_))), "{claimed:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "bounded by the statement timeout: {:?}", started.elapsed());
    let started = Instant::now();
    let _ = store.wait(&key, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(6), "a wait ends by its timeout: {:?}", started.elapsed());
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(8), "a wait under way ends by its timeout: {waited:?}");
    assert!(store.ping().await.is_err());

    server.start_again();
    eventually("the store answers again", Duration::from_secs(20), || async { store.ping().await.is_ok() }).await;
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::InFlight { fingerprint: fp("a") }), "data kept");
    let back = fresh_key("back");
    let owner = owned(&store, &back, Duration::from_secs(30)).await;
    eventually("the store listens again", Duration::from_secs(20), || async { store.is_listening() }).await;
    let waiter = spawn_waiter(&store, &back);
    tokio::time::sleep(Duration::from_millis(500)).await;
    store.complete(&back, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(10), "woken by NOTIFY after the restart: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_to_run_from_several_processes_at_once() {
    let server = shared_server();
    let table = fresh_table();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(PostgresStore::builder().table(&table).connect(&server.url()).await.unwrap()));
    }
    let migrations: Vec<_> = stores
        .iter()
        .map(|store| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().unwrap();
    }
    stores[0].migrate().await.unwrap();
    let sql = stores[0].schema_sql();
    assert!(sql.contains(&format!("CREATE TABLE IF NOT EXISTS \"{table}\"")), "{sql}");
    assert!(sql.contains(&format!("CREATE INDEX IF NOT EXISTS \"{table}_expires_at\"")), "{sql}");
    owned(&stores[1], &fresh_key("migrated"), Duration::from_secs(30)).await;

    // A table made before renewed leases had a table of their own: its rows stay valid once migrated.
    let old = fresh_table();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE \"{old}\" (key text PRIMARY KEY, owner text, fingerprint text NOT NULL, status smallint, \
             replayable boolean, headers jsonb, body bytea, expires_at timestamptz NOT NULL);
         CREATE INDEX \"{old}_expires_at\" ON \"{old}\" (expires_at);"
    )))
    .execute(stores[0].pool())
    .await
    .unwrap();
    let upgraded = PostgresStore::builder().table(&old).connect(&server.url()).await.unwrap();
    let (in_flight, completed) = (fresh_key("old-in-flight"), fresh_key("old-completed"));
    let old_owner = OwnerToken::generate();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{old}\" (key, owner, fingerprint, status, replayable, headers, body, expires_at) VALUES \
             ($1, $2, $3, NULL, NULL, NULL, NULL, now() + interval '30 seconds'), \
             ($4, NULL, $3, 201, true, '[]', 'done', now() + interval '1 hour')"
    )))
    .bind(in_flight.as_str())
    .bind(old_owner.as_str())
    .bind(fp("a").to_hex())
    .bind(completed.as_str())
    .execute(stores[0].pool())
    .await
    .unwrap();
    let before = upgraded.renew(&in_flight, &old_owner, &fp("a"), Duration::from_secs(30)).await;
    assert!(matches!(&before, Err(StoreError::Unavailable(why)) if why.message().contains("migrate")), "{before:?}");
    upgraded.migrate().await.unwrap();
    let newcomer = OwnerToken::generate();
    assert_eq!(
        upgraded.claim(&in_flight, &fp("a"), &newcomer, Duration::from_secs(30)).await.unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") })
    );
    assert!(matches!(
        upgraded.claim(&completed, &fp("a"), &newcomer, Duration::from_secs(30)).await.unwrap(),
        Claimed::Existing(Entry::Completed(_))
    ));
    assert_eq!(
        upgraded.renew(&in_flight, &old_owner, &fp("a"), Duration::from_secs(30)).await.unwrap(),
        Write::Applied
    );
    let ttl = Duration::from_secs(60);
    assert_eq!(upgraded.complete(&in_flight, &old_owner, &record("x"), ttl).await.unwrap(), Write::Applied);

    // Without the table, calls say what to do.
    let missing = PostgresStore::builder().table(&fresh_table()).connect(&server.url()).await.unwrap();
    let claimed = missing.claim(&fresh_key("x"), &fp("a"), &OwnerToken::generate(), Duration::from_secs(1)).await;
    assert!(matches!(&claimed, Err(StoreError::Unavailable(why)) if why.message().contains("migrate")), "{claimed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_made_from_the_applications_pool_shares_the_table_with_one_made_from_a_url() {
    let server = shared_server();
    let store = shared_store().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&server.url()).await.unwrap();
    let from_pool = PostgresStore::builder().table(store.table()).pool(pool).unwrap();
    let key = fresh_key("from-pool");
    let owner = owned(&from_pool, &key, Duration::from_secs(30)).await;
    assert_eq!(
        store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") })
    );
    from_pool.complete(&key, &owner, &record("x"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.inspect(&key).await.unwrap(), Some(Entry::Completed(record("x"))));
}

// --- costs ------------------------------------------------------------------------------------------------------

#[derive(Clone)]
struct App {
    idempotency: idem::Idempotency,
    runs: Arc<std::sync::atomic::AtomicU64>,
}

impl axum::extract::FromRef<App> for idem::Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

#[idem::idempotent]
async fn charge(axum::extract::State(app): axum::extract::State<App>, body: String) -> (StatusCode, String) {
    app.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    (StatusCode::CREATED, format!("charged {body}"))
}

async fn send(app: &axum::Router, key: &str, body: &str) -> (StatusCode, String) {
    use tower::ServiceExt;
    let request = axum::http::Request::post("/charges")
        .header("idempotency-key", key)
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The store's statements the server ran since the last reset, by kind, sorted.
async fn statements_run(admin: &PgPool, table: &str) -> Vec<(&'static str, i64)> {
    let rows = sqlx::query("SELECT query, calls FROM pg_stat_statements WHERE query LIKE '%' || $1 || '%'")
        .bind(table)
        .fetch_all(admin)
        .await
        .unwrap();
    let mut run: Vec<(&'static str, i64)> = rows
        .iter()
        .map(|row| {
            let query: String = row.get("query");
            let kind = if query.contains("claimed AS") {
                "claim"
            } else if query.contains("done AS (") {
                "complete"
            } else if query.contains("pg_stat_statements") {
                "this test's own"
            } else {
                "other"
            };
            (kind, row.get("calls"))
        })
        .filter(|(kind, _)| *kind != "this test's own")
        .collect();
    run.sort();
    run
}

use axum::http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_costs_one_statement_and_a_first_request_two() {
    let server = PostgresServer::start_with(&["shared_preload_libraries=pg_stat_statements"]);
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&server.url()).await.unwrap();
    sqlx::query("CREATE EXTENSION pg_stat_statements").execute(&admin).await.unwrap();
    let store = store_on(&server, PostgresStore::builder()).await;
    let table = store.table().to_owned();
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let state = App { idempotency: idem::Idempotency::new(store), runs: runs.clone() };
    let app = axum::Router::new().route("/charges", axum::routing::post(charge)).with_state(state);
    assert_eq!(send(&app, "warm-up", "x").await.0, StatusCode::CREATED);

    sqlx::query("SELECT pg_stat_statements_reset()").execute(&admin).await.unwrap();
    assert_eq!(send(&app, "first", "a").await, (StatusCode::CREATED, "charged a".to_owned()));
    assert_eq!(statements_run(&admin, &table).await, [("claim", 1), ("complete", 1)]);

    sqlx::query("SELECT pg_stat_statements_reset()").execute(&admin).await.unwrap();
    assert_eq!(send(&app, "first", "a").await, (StatusCode::CREATED, "charged a".to_owned()));
    assert_eq!(statements_run(&admin, &table).await, [("claim", 1)], "the claim finds the record and returns it");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2, "warm-up + first");
}

/// The price of a first request and of a replay on a local PostgreSQL: prints medians, asserts no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_and_replay_latency_is_measured() {
    let store = shared_store().await;
    let mut first_requests = Vec::new();
    let mut replays = Vec::new();
    for i in 0..300 {
        let key = StoreKey::derive(&[b"latency", format!("{i}").as_bytes()]);
        let started = Instant::now();
        let owner = owned(&store, &key, Duration::from_secs(30)).await;
        assert_eq!(store.complete(&key, &owner, &record("r"), Duration::from_secs(60)).await.unwrap(), Write::Applied);
        first_requests.push(started.elapsed());
        let started = Instant::now();
        let replay = store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap();
        replays.push(started.elapsed());
        assert!(matches!(replay, Claimed::Existing(Entry::Completed(_))));
    }
    first_requests.sort();
    replays.sort();
    println!(
        "postgres: claim+complete median {:?} (p90 {:?}), replay median {:?} (p90 {:?})",
        first_requests[150], first_requests[270], replays[150], replays[270]
    );
}

#[tokio::test]
async fn a_refused_table_name_or_url_is_invalid_config_before_anything_connects() {
    // Nothing listens on port 1: a builder that tried to connect would answer Unavailable instead.
    let nowhere = "postgres://postgres@127.0.0.1:1/postgres";
    for table in ["bad-name", "x\"; DROP TABLE y; --", "2fast"] {
        let builder = PostgresStore::builder().table(table);
        assert!(matches!(builder.schema_sql(), Err(StoreError::InvalidConfig(_))), "{table:?}");
        let refused = builder.connect(nowhere).await.unwrap_err();
        assert!(matches!(refused, StoreError::InvalidConfig(_)), "{table:?}: {refused}");
        assert!(refused.to_string().contains("not a plain identifier"), "{table:?}: {refused}");
    }
    let unparsable = PostgresStore::builder().connect("postgres://[::1").await.unwrap_err();
    assert!(matches!(unparsable, StoreError::InvalidConfig(_)), "{unparsable}");
    let unreachable = PostgresStore::builder().connect_timeout(Duration::from_millis(200)).connect(nowhere).await;
    assert!(matches!(unreachable, Err(StoreError::Unavailable(_))), "{unreachable:?}");
}

/// Backends of the shared server waiting for a lock while running a statement on `table`.
async fn waiting_on_locks(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_abandoned_by_its_caller_that_lands_after_the_release_leaves_the_key_free() {
    let store = Arc::new(shared_store().await);
    let table = store.table().to_owned();
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&shared_server().url()).await.unwrap();
    let key = fresh_key("late-renewal");
    let owner = owned(&store, &key, Duration::from_secs(30)).await;
    // A slow transaction holds the claim's row: the release, then a renewal, queue behind it on the server.
    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("SELECT 1 FROM \"{table}\" WHERE key = $1 FOR UPDATE")))
        .bind(key.as_str())
        .execute(&mut *blocker)
        .await
        .unwrap();
    let release = tokio::spawn({
        let (store, key, owner) = (store.clone(), key.clone(), owner.clone());
        async move { store.release(&key, &owner).await }
    });
    eventually("the release queues", Duration::from_secs(10), || async { waiting_on_locks(&admin, &table).await == 1 })
        .await;
    // The keeper gives up on a renewal that does not answer; the statement stays queued on the server.
    let fingerprint = fp("a");
    let renewal = store.renew(&key, &owner, &fingerprint, Duration::from_secs(30));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), renewal).await.is_err(),
        "the renewal waits behind the lock"
    );
    assert_eq!(waiting_on_locks(&admin, &table).await, 2, "the abandoned renewal is still queued");
    blocker.commit().await.unwrap();
    assert_eq!(release.await.unwrap().unwrap(), Write::Applied);
    eventually("the abandoned renewal ran", Duration::from_secs(10), || async {
        waiting_on_locks(&admin, &table).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.inspect(&key).await.unwrap(), None, "the late renewal did not claim the released key");
    owned(&store, &key, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_keeps_racing_fails_within_one_statement_timeout() {
    let timeout = Duration::from_millis(1000);
    let store = store_on(shared_server(), PostgresStore::builder().statement_timeout(timeout)).await;
    let table = store.table().to_owned();
    // Each attempt takes 0.4 s and answers no row, as a claim that lost a race with another claimant's insert does.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE FUNCTION \"{table}_race\"() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$;
         CREATE TRIGGER race BEFORE INSERT ON \"{table}\" FOR EACH ROW EXECUTE FUNCTION \"{table}_race\"();"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let started = Instant::now();
    let claimed = store.claim(&fresh_key("racing"), &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert!(matches!(claimed, Err(StoreError::Unavailable(_))), "{claimed:?}");
    assert!(
        took < timeout + Duration::from_millis(300),
        "the whole call is bounded by the statement timeout: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_lands_while_a_takeover_waits_for_the_row_keeps_the_claim() {
    let store = Arc::new(shared_store().await);
    let table = store.table().to_owned();
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&shared_server().url()).await.unwrap();
    let key = fresh_key("renewal-beats-takeover");
    // The claim's own lease ran out; its owner is about to renew it.
    let owner = owned(&store, &key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another session holds the row in share mode: a newcomer's takeover, its snapshot taken, waits for it.
    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("SELECT 1 FROM \"{table}\" WHERE key = $1 FOR SHARE")))
        .bind(key.as_str())
        .execute(&mut *blocker)
        .await
        .unwrap();
    let takeover = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await }
    });
    eventually("the takeover waits for the row", Duration::from_secs(10), || async {
        waiting_on_locks(&admin, &table).await == 1
    })
    .await;
    // The owner's renewal lands meanwhile (share mode does not wait), after the takeover's snapshot.
    assert_eq!(store.renew(&key, &owner, &fp("a"), Duration::from_secs(30)).await.unwrap(), Write::Applied);
    blocker.commit().await.unwrap();
    assert_eq!(
        takeover.await.unwrap().unwrap(),
        Claimed::Existing(Entry::InFlight { fingerprint: fp("a") }),
        "the takeover sees the renewal"
    );
    let ttl = Duration::from_secs(60);
    assert_eq!(store.complete(&key, &owner, &record("kept"), ttl).await.unwrap(), Write::Applied);
}
