//! Transactional exactly-once (`Tx` on a `PostgresStore`), in process against a real PostgreSQL started by the
//! tests: the handler's rows and its record commit together; a 5xx, a panic or a rejection rolls them back; an owner
//! whose claim was taken over is rolled back; handlers at every isolation level commit after lease renewals; a
//! handler that answers its own failed statement gets that answer stored; `once` runs in a transaction too.

mod postgres_server;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::{Idempotency, Policy, PostgresStore, Tx, idempotent, once::OnceError, protocol::Fence};
use postgres_server::{shared_server, store_on};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    /// Handler bodies that ran (committed or not).
    runs: Arc<AtomicU64>,
    /// Lets a handler wait until the test says go (`hold` tests).
    gate: Arc<tokio::sync::Semaphore>,
    /// The database backend serving the last `hold-pid` handler's transaction.
    backend: Arc<std::sync::atomic::AtomicI32>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// The `orders` table of one test (its name is the store's table plus `_orders`).
struct Orders {
    pool: PgPool,
}

impl Orders {
    /// The audit events committed for `email`, in order.
    async fn audited(&self, email: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT event FROM tx_audit WHERE email = $1 ORDER BY id")
            .bind(email)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn users(&self, email: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM tx_users WHERE email = $1")
            .bind(email)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn count(&self, key: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM tx_orders WHERE idempotency_key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

async fn insert(tx: &mut Tx, key: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO tx_orders (idempotency_key) VALUES ($1) RETURNING id")
        .bind(key)
        .fetch_one(&mut **tx)
        .await
        .expect("insert an order")
}

/// Inserts an order in the transaction; the body decides the answer: `ok`, `fail` (500 after the insert), `panic`
/// (a panic after the insert), `hold` or `hold-pid` (notes its transaction's backend after the insert, waits for the
/// gate, then 201), `hold-serializable` (as `hold`, its transaction at SERIALIZABLE).
#[idempotent(ttl = 60, wait_timeout = 0)]
async fn create(State(app): State<App>, mut tx: Tx, key: idem::IdempotencyKey, body: String) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if body == "hold-serializable" {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(&mut *tx).await.unwrap();
    }
    let id = insert(&mut tx, key.as_str()).await;
    match body.as_str() {
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, format!("failed after order {id}")),
        "panic" => panic!("the handler panicked after inserting order {id}"),
        "hold" | "hold-pid" | "hold-serializable" => {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *tx).await.unwrap();
            app.backend.store(pid, Ordering::SeqCst);
            let _permit = app.gate.acquire().await.unwrap();
            (StatusCode::CREATED, format!("order {id}"))
        }
        _ => (StatusCode::CREATED, format!("order {id}")),
    }
}

/// The same handler, storing 5xx answers too: a panic must still roll back.
#[idempotent(ttl = 60, wait_timeout = 0, store_server_errors)]
async fn create_storing_errors(State(app): State<App>, tx: Tx, key: idem::IdempotencyKey, body: String) -> String {
    create_inner(app, tx, key, body).await
}

async fn create_inner(app: App, mut tx: Tx, key: idem::IdempotencyKey, body: String) -> String {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let id = insert(&mut tx, key.as_str()).await;
    assert_ne!(body, "panic", "the handler panicked after inserting order {id}");
    format!("order {id}")
}

/// Takes `Tx` before a JSON body, so a malformed body is rejected with the transaction already open.
#[idempotent(ttl = 60, wait_timeout = 0)]
async fn create_json(
    State(app): State<App>,
    mut tx: Tx,
    key: idem::IdempotencyKey,
    axum::Json(item): axum::Json<String>,
) -> String {
    app.runs.fetch_add(1, Ordering::SeqCst);
    format!("order {} for {item}", insert(&mut tx, key.as_str()).await)
}

/// How long [`create_isolated`] sleeps between its statements: two and a half renewal periods of its 0.6 s lease.
const PAST_RENEWALS: Duration = Duration::from_millis(500);

/// Runs at the isolation level named by its body (`SET TRANSACTION ISOLATION LEVEL …` first): reads (which takes
/// its snapshot), sleeps past several renewals of its 0.6 s lease, checks `is_held` (a renewal at once), inserts its
/// order, sleeps again, checks again. The answer reports the level in force and both checks.
#[idempotent(ttl = 60, wait_timeout = 0, lease = 0.6)]
async fn create_isolated(
    State(app): State<App>,
    fence: Fence,
    mut tx: Tx,
    key: idem::IdempotencyKey,
    level: String,
) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    assert!(["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"].contains(&level.as_str()), "{level}");
    sqlx::query(sqlx::AssertSqlSafe(format!("SET TRANSACTION ISOLATION LEVEL {level}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tx_orders WHERE idempotency_key = $1")
        .bind(key.as_str())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(PAST_RENEWALS).await;
    let held_before = fence.is_held().await.unwrap();
    let id = insert(&mut tx, key.as_str()).await;
    tokio::time::sleep(PAST_RENEWALS).await;
    let held_after = fence.is_held().await.unwrap();
    tokio::time::sleep(PAST_RENEWALS).await;
    let in_force: String = sqlx::query_scalar("SHOW transaction_isolation").fetch_one(&mut *tx).await.unwrap();
    (StatusCode::CREATED, format!("order {id} at {in_force}, {before} before, held {held_before} then {held_after}"))
}

/// Registers an e-mail address, first noting the attempt in `tx_audit`; an address already registered (a unique
/// violation, which aborts the transaction) is answered `409 e-mail taken`.
#[idempotent(ttl = 60, wait_timeout = 0)]
async fn sign_up(State(app): State<App>, mut tx: Tx, email: String) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    audit(&mut tx, &email, "attempt").await;
    match sqlx::query("INSERT INTO tx_users (email) VALUES ($1)").bind(&email).execute(&mut *tx).await {
        Ok(_) => (StatusCode::CREATED, format!("welcome {email}")),
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            (StatusCode::CONFLICT, "e-mail taken".to_owned())
        }
        Err(error) => panic!("registering {email}: {error}"),
    }
}

/// [`sign_up`] with the insert under a savepoint: after a unique violation the transaction goes on, and the handler
/// notes the refusal too, committed with its 409.
#[idempotent(ttl = 60, wait_timeout = 0)]
async fn sign_up_with_savepoint(State(app): State<App>, mut tx: Tx, email: String) -> (StatusCode, String) {
    use sqlx::Acquire;
    app.runs.fetch_add(1, Ordering::SeqCst);
    audit(&mut tx, &email, "attempt").await;
    let mut savepoint = (&mut *tx).begin().await.unwrap();
    match sqlx::query("INSERT INTO tx_users (email) VALUES ($1)").bind(&email).execute(&mut *savepoint).await {
        Ok(_) => {
            savepoint.commit().await.unwrap();
            (StatusCode::CREATED, format!("welcome {email}"))
        }
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            savepoint.rollback().await.unwrap();
            audit(&mut tx, &email, "refused").await;
            (StatusCode::CONFLICT, "e-mail taken".to_owned())
        }
        Err(error) => panic!("registering {email}: {error}"),
    }
}

async fn audit(tx: &mut Tx, email: &str, event: &str) {
    sqlx::query("INSERT INTO tx_audit (email, event) VALUES ($1, $2)")
        .bind(email)
        .bind(event)
        .execute(&mut **tx)
        .await
        .expect("note the event");
}

/// One app on a fresh table of the shared server, its orders table created, with a store pool of `connections`.
async fn app(connections: u32) -> (Router, App, Orders, String) {
    let server = shared_server();
    let store = store_on(server, PostgresStore::builder().max_connections(connections)).await;
    let pool = store.pool().clone();
    sqlx::raw_sql(
        "SELECT pg_advisory_xact_lock(hashtext('tx_orders'));
         CREATE TABLE IF NOT EXISTS tx_orders (id bigserial PRIMARY KEY, idempotency_key text NOT NULL);
         CREATE TABLE IF NOT EXISTS tx_users (email text PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS tx_audit (id bigserial PRIMARY KEY, email text NOT NULL, event text NOT NULL);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let table = store.table().to_owned();
    let state = App {
        idempotency: Idempotency::new(store),
        runs: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        backend: Arc::default(),
    };
    let router = Router::new()
        .route("/orders", post(create))
        .route("/orders-storing-errors", post(create_storing_errors))
        .route("/json-orders", post(create_json))
        .route("/isolated-orders", post(create_isolated))
        .route("/sign-up", post(sign_up))
        .route("/sign-up-with-savepoint", post(sign_up_with_savepoint))
        .with_state(state.clone());
    (router, state, Orders { pool }, table)
}

async fn send(app: &Router, path: &str, key: &str, body: &str) -> (StatusCode, String, Option<String>) {
    let request = Request::post(path)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get("x-idempotency-status").map(|value| value.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap(), replayed)
}

fn unique(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{label}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn the_handlers_rows_and_its_record_commit_together_and_retries_replay_them() {
    let (router, app, orders, _) = app(4).await;
    let key = unique("ok");
    let (status, body, state) = send(&router, "/orders", &key, "ok").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{body}");
    for _ in 0..3 {
        let again = send(&router, "/orders", &key, "ok").await;
        assert_eq!(again, (StatusCode::CREATED, body.clone(), Some("hit".to_owned())));
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test]
async fn a_5xx_rolls_the_handlers_rows_back_and_frees_the_key_for_a_retry() {
    let (router, app, orders, _) = app(4).await;
    let key = unique("fail");
    let (status, body, _) = send(&router, "/orders", &key, "fail").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(orders.count(&key).await, 0, "the failed request's insert was rolled back");
    let (status, body, state) = send(&router, "/orders", &key, "ok").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test]
async fn a_panic_rolls_back_even_on_a_route_that_stores_5xx() {
    let (router, app, orders, _) = app(4).await;
    for path in ["/orders", "/orders-storing-errors"] {
        let key = unique("panic");
        let (status, body, _) = send(&router, path, &key, "panic").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {body}");
        assert!(body.contains("handler-panicked"), "{path}: {body}");
        assert_eq!(orders.count(&key).await, 0, "{path}: the panicking handler's insert was rolled back");
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_rejection_after_the_transaction_opened_rolls_it_back_and_returns_its_connection() {
    // Two connections: a rejected request whose transaction stayed open would hold one for good.
    let (router, app, orders, _) = app(2).await;
    for attempt in 0..6 {
        let (status, body, _) = send(&router, "/json-orders", &unique("bad"), "{not json").await;
        assert!(status.is_client_error(), "attempt {attempt}: {status} {body}");
    }
    let key = unique("good");
    let (status, body, _) = send(&router, "/json-orders", &key, "\"book\"").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_claim_was_taken_over_is_rolled_back_and_only_the_takeover_commits() {
    let (router, app, orders, table) = app(4).await;
    let key = unique("stale");
    let first = start_then_take_over(&router, &app, &orders, &table, &key, "hold").await;
    // The first execution resumes: its completion is fenced, its order rolled back, its client told to retry.
    let (status, stale_body, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{stale_body}");
    assert!(stale_body.contains("in-progress"), "{stale_body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(orders.count(&key).await, 1, "only the takeover's order committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_owner_whose_claim_was_taken_over_after_its_snapshot_is_not_committed() {
    let (router, app, orders, table) = app(4).await;
    let key = unique("stale-serializable");
    let first = start_then_take_over(&router, &app, &orders, &table, &key, "hold-serializable").await;
    // Its completion meets a row written after its snapshot: the transaction fails, nothing of it is kept.
    let (status, stale_body, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{stale_body}");
    assert!(stale_body.contains("transaction-failed"), "{stale_body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(orders.count(&key).await, 1, "only the takeover's order committed");
}

/// Starts an execution of `key` with `body` (one that inserts its order, then waits for the gate), makes its lease
/// run out, has a retry take the key over and commit, checks that the takeover's answer is what retries replay,
/// then opens the gate: the first execution's answer is left to the caller.
async fn start_then_take_over(
    router: &Router,
    app: &App,
    orders: &Orders,
    table: &str,
    key: &str,
    body: &'static str,
) -> tokio::task::JoinHandle<(StatusCode, String, Option<String>)> {
    // The first execution inserts its order, then waits (its lease is 30 s: no renewal comes before 10 s).
    let first = tokio::spawn({
        let (router, key) = (router.clone(), key.to_owned());
        async move { send(&router, "/orders", &key, body).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.backend.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first execution did not insert");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its lease runs out as if its process had been frozen past it: the clock of the claim moved past the lease.
    let expired = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET expires_at = statement_timestamp() - interval '1 second' WHERE owner IS NOT NULL"
    )))
    .execute(&orders.pool)
    .await
    .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    // A retry takes the key over and commits its own order.
    let (status, taken_over, state) = send(router, "/orders", key, "hold-released").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{taken_over}");
    app.gate.add_permits(1);
    let replay = send(router, "/orders", key, "hold-released").await;
    assert_eq!(replay, (StatusCode::CREATED, taken_over, Some("hit".to_owned())));
    first
}

#[tokio::test]
async fn once_in_a_transaction_commits_the_work_with_its_result_and_rolls_back_a_failure() {
    let (_, _, orders, _) = app(4).await;
    let server = shared_server();
    let store = store_on(server, PostgresStore::builder()).await;
    let idempotency = Idempotency::new(store);
    let runs = AtomicU64::new(0);
    let key = unique("once");
    let attempt = |fail: bool| {
        let (key, work_key) = (key.clone(), key.clone());
        let runs = &runs;
        let idempotency = &idempotency;
        async move {
            idempotency
                .once("ledger", &key)
                .policy(Policy::new().wait_timeout(Duration::ZERO))
                .run_in_transaction(&"credit 100", |mut tx| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let id = insert(&mut tx, &work_key).await;
                    if fail { Err(format!("declined after order {id}")) } else { Ok(id) }
                })
                .await
        }
    };
    let failed = attempt(true).await;
    assert!(matches!(failed, Err(OnceError::Work(_))), "{failed:?}");
    assert_eq!(orders.count(&key).await, 0, "the failed work's insert was rolled back");
    let fresh = attempt(false).await.unwrap();
    assert!(!fresh.is_replay());
    let replayed = attempt(false).await.unwrap();
    assert!(replayed.is_replay());
    assert_eq!(replayed.value(), fresh.value());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test]
async fn tx_is_refused_without_a_postgres_store_and_optional_tx_is_none() {
    #[idempotent]
    async fn needs_tx(_tx: Tx) -> &'static str {
        "ran"
    }
    #[idempotent]
    async fn maybe_tx(tx: Option<Tx>) -> &'static str {
        if tx.is_some() { "with a transaction" } else { "without" }
    }
    let router = Router::new()
        .route("/needs", post(needs_tx))
        .route("/maybe", post(maybe_tx))
        .layer(axum::Extension(Idempotency::in_memory()));
    let (status, body, _) = send(&router, "/needs", &unique("memory"), "x").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body.contains("not-configured"), "{body}");
    // It says what is missing: not "no store", but a PostgreSQL one.
    assert!(body.contains("`Tx`, which needs idem on a PostgreSQL store (`PostgresStore`)"), "{body}");
    let (status, body, _) = send(&router, "/maybe", &unique("memory"), "x").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "without"));
}

#[tokio::test]
async fn under_the_layer_a_handler_taking_tx_commits_what_is_stored_and_rolls_back_what_is_not() {
    async fn order(mut tx: Tx, key: idem::IdempotencyKey, body: String) -> (StatusCode, String) {
        let id = insert(&mut tx, key.as_str()).await;
        // 422 is among the statuses the layer never stores (it could be an extractor's): it must not commit.
        let status = if body == "invalid" { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::CREATED };
        (status, format!("order {id}"))
    }
    let (_, _, orders, _) = app(4).await;
    let store = store_on(shared_server(), PostgresStore::builder()).await;
    let idempotency = Idempotency::new(store);
    let router = Router::new().route("/orders", post(order)).layer(idempotency.layer());

    let key = unique("layer");
    let (status, body, _) = send(&router, "/orders", &key, "invalid").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(orders.count(&key).await, 0, "an answer the layer does not store is rolled back");
    let (status, body, state) = send(&router, "/orders", &key, "valid").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{body}");
    let replay = send(&router, "/orders", &key, "valid").await;
    assert_eq!(replay, (StatusCode::CREATED, body, Some("hit".to_owned())));
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_connection_died_is_not_committed_answers_503_and_frees_the_key() {
    let (router, app, orders, _) = app(4).await;
    let key = unique("dead-connection");
    let first = tokio::spawn({
        let (router, key) = (router.clone(), key.clone());
        async move { send(&router, "/orders", &key, "hold-pid").await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.backend.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the handler did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The handler's connection dies under it (a restarted pooler, a killed backend) after its insert.
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(app.backend.load(Ordering::SeqCst))
        .fetch_one(&orders.pool)
        .await
        .unwrap();
    assert!(killed);
    app.gate.add_permits(1);
    let (status, body, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("transaction-failed"), "{body}");
    assert_eq!(orders.count(&key).await, 0, "nothing of the dead transaction was kept");
    // The key was released: the retry runs on a clean database and commits once.
    let (status, body, state) = send(&router, "/orders", &key, "ok").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tx_moved_out_of_its_handler_is_never_committed_and_frees_the_key() {
    #[idempotent(ttl = 60, wait_timeout = 0)]
    async fn leaky(State(app): State<App>, mut tx: Tx, key: idem::IdempotencyKey) -> StatusCode {
        app.runs.fetch_add(1, Ordering::SeqCst);
        // A bug: the transaction outlives the handler, inserting after the answer.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            insert(&mut tx, key.as_str()).await;
        });
        StatusCode::CREATED
    }
    let (_, app, orders, _) = app(4).await;
    let router = Router::new().route("/leaky", post(leaky)).route("/orders", post(create)).with_state(app.clone());
    let key = unique("escaped");
    let (status, body, _) = send(&router, "/leaky", &key, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("transaction-failed"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(orders.count(&key).await, 0, "the escaped transaction's insert was never committed");
    let (status, body, state) = send(&router, "/orders", &key, "ok").await;
    assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "the key was freed: {body}");
    assert_eq!(orders.count(&key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_at_every_isolation_level_commits_after_lease_renewals_and_is_held_checks() {
    let (router, app, orders, _) = app(8).await;
    let levels: [&'static str; 3] = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"];
    let keys: Vec<String> = levels.iter().map(|level| unique(&level.replace(' ', "-"))).collect();
    let runs: Vec<_> = levels
        .iter()
        .zip(&keys)
        .map(|(level, key)| {
            let (router, key) = (router.clone(), key.clone());
            let level: &'static str = level;
            tokio::spawn(async move { send(&router, "/isolated-orders", &key, level).await })
        })
        .collect();
    // Past two leases of 0.6 s: only renewals keep the claims, so a duplicate is still refused.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for (level, key) in levels.iter().zip(&keys) {
        let (status, body, _) = send(&router, "/isolated-orders", key, level).await;
        assert_eq!(status, StatusCode::CONFLICT, "{key}: the renewed claim still holds: {body}");
        assert!(body.contains("in-progress"), "{body}");
    }
    for ((level, key), run) in levels.iter().zip(&keys).zip(runs) {
        let (status, body, state) = run.await.unwrap();
        assert_eq!((status, state.as_deref()), (StatusCode::CREATED, Some("new")), "{level}: {body}");
        assert!(body.contains(&format!("at {}, 0 before, held true then true", level.to_lowercase())), "{body}");
        assert_eq!(orders.count(key).await, 1, "{level}: the order committed with the record");
        let replay = send(&router, "/isolated-orders", key, level).await;
        assert_eq!(replay, (StatusCode::CREATED, body, Some("hit".to_owned())), "{level}");
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 3, "each ran once");
}

#[tokio::test]
async fn a_handler_that_answers_its_own_failed_statement_has_that_answer_stored_and_replayed() {
    let (router, app, orders, _) = app(4).await;
    let email = format!("{}@example.com", unique("taken"));
    let (status, body, _) = send(&router, "/sign-up", &unique("first"), &email).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A second sign-up for the address hits the unique index: the transaction is aborted, the handler answers 409.
    let key = unique("second");
    let (status, body, state) = send(&router, "/sign-up", &key, &email).await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CONFLICT, "e-mail taken", Some("new")));
    for _ in 0..2 {
        let replay = send(&router, "/sign-up", &key, &email).await;
        assert_eq!(replay, (StatusCode::CONFLICT, "e-mail taken".to_owned(), Some("hit".to_owned())));
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 2, "once per key");
    assert_eq!(orders.users(&email).await, 1);
    // Nothing the refused sign-up wrote committed (its audit row went with the aborted transaction).
    assert_eq!(orders.audited(&email).await, ["attempt"]);

    // Under a savepoint, the transaction survives the violation: the handler's later writes commit with its 409.
    let email = format!("{}@example.com", unique("savepoint"));
    let (status, body, _) = send(&router, "/sign-up-with-savepoint", &unique("first"), &email).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = unique("second");
    let (status, body, state) = send(&router, "/sign-up-with-savepoint", &key, &email).await;
    assert_eq!((status, body.as_str(), state.as_deref()), (StatusCode::CONFLICT, "e-mail taken", Some("new")));
    let replay = send(&router, "/sign-up-with-savepoint", &key, &email).await;
    assert_eq!(replay, (StatusCode::CONFLICT, "e-mail taken".to_owned(), Some("hit".to_owned())));
    assert_eq!(app.runs.load(Ordering::SeqCst), 4);
    assert_eq!(orders.audited(&email).await, ["attempt", "attempt", "refused"]);
}

#[tokio::test]
async fn once_in_a_transaction_stores_what_the_work_answered_after_its_own_failed_statement() {
    let (_, _, orders, _) = app(4).await;
    let idempotency = Idempotency::new(store_on(shared_server(), PostgresStore::builder()).await);
    let email = format!("{}@example.com", unique("once-taken"));
    sqlx::query("INSERT INTO tx_users (email) VALUES ($1)").bind(&email).execute(&orders.pool).await.unwrap();
    let runs = AtomicU64::new(0);
    let key = unique("once-sign-up");
    let attempt = || {
        let (idempotency, key, email, runs) = (&idempotency, &key, email.clone(), &runs);
        async move {
            idempotency
                .once("sign-up", key)
                .run_in_transaction(&email.clone(), |mut tx| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let inserted =
                        sqlx::query("INSERT INTO tx_users (email) VALUES ($1)").bind(&email).execute(&mut *tx).await;
                    match inserted {
                        Ok(_) => Ok("registered".to_owned()),
                        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                            Ok("e-mail taken".to_owned())
                        }
                        Err(error) => Err(error),
                    }
                })
                .await
        }
    };
    let fresh = attempt().await.unwrap();
    assert_eq!((fresh.is_replay(), fresh.value().as_str()), (false, "e-mail taken"));
    let replayed = attempt().await.unwrap();
    assert_eq!((replayed.is_replay(), replayed.value().as_str()), (true, "e-mail taken"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(orders.users(&email).await, 1);
}
