//! What a request meets when the Redis entry under its key is not a record idem could have written: garbage
//! bytes, JSON of another shape, missing fields, a bad fingerprint or status, invalid headers, a record from a newer
//! idem, a hash or a list at the record's name. Each is answered `500 corrupt-record` with exactly one error log
//! line; nothing panics, nothing is replayed, the handler does not run.
//!
//! Each case completes a real request first, then overwrites its record (found with `KEYS` under the case's own
//! prefix) on a real `redis-server`, and retries.

mod redis_server;

mod log_capture;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::post;
use idem::{Idempotency, RedisStore, idempotent};
use log_capture::Log;
use redis_server::RedisServer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    runs: Arc<AtomicUsize>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

#[idempotent]
async fn charge(State(app): State<App>, body: String) -> (StatusCode, [(&'static str, String); 1], String) {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, [("x-run", run.to_string())], format!("charged {body}"))
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn assert_corrupt_record(&self, case: &str) {
        assert_eq!(self.status, StatusCode::INTERNAL_SERVER_ERROR, "{case}: {self:?}");
        assert_eq!(self.headers["content-type"], "application/problem+json", "{case}");
        let problem: Value = serde_json::from_slice(&self.body).expect("a JSON problem");
        assert_eq!(
            problem["type"], "https://docs.rs/axum-idem/latest/idem/problems/index.html#corrupt-record",
            "{case}: {problem}"
        );
        assert_eq!(problem["status"], 500, "{case}");
        for replay_marker in ["idempotent-replayed", "x-run"] {
            assert!(!self.headers.contains_key(replay_marker), "{case}: {replay_marker} on {self:?}");
        }
        assert_ne!(self.headers.get("x-idempotency-status").map(|v| v.as_bytes()), Some(&b"hit"[..]), "{case}");
    }
}

/// One case: an app over its own key prefix on `server`, with one completed request to corrupt.
struct Case {
    router: Router,
    runs: Arc<AtomicUsize>,
    redis: redis::aio::MultiplexedConnection,
    record: String,
}

impl Case {
    async fn start(server: &RedisServer, name: &str) -> Self {
        let prefix = format!("corrupt-{name}:");
        let store = RedisStore::builder().prefix(prefix.clone()).open(server.url()).await.expect("connect");
        let runs = Arc::new(AtomicUsize::new(0));
        let app = App { idempotency: Idempotency::new(store), runs: runs.clone() };
        let router = Router::new().route("/charges", post(charge)).with_state(app);
        let client = redis::Client::open(server.url()).unwrap();
        let redis = client.get_multiplexed_async_connection().await.expect("connect");
        let mut case = Self { router, runs, redis, record: String::new() };
        let first = case.send("order-1", "10 EUR").await;
        assert_eq!((first.status, &first.body[..]), (StatusCode::CREATED, &b"charged 10 EUR"[..]), "{name}");
        let keys = server.cli(&["KEYS", &format!("{prefix}*")]);
        let keys: Vec<&str> = keys.lines().collect();
        assert_eq!(keys.len(), 1, "{name}: one record under the prefix, found {keys:?}");
        case.record = keys[0].to_owned();
        case
    }

    async fn send(&self, key: &str, body: &str) -> Reply {
        let request = Request::post("/charges").header("idempotency-key", key).body(Body::from(body.to_owned()));
        let response = self.router.clone().oneshot(request.unwrap()).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        Reply { status: parts.status, headers: parts.headers, body }
    }

    async fn redis<T: redis::FromRedisValue>(&mut self, command: &mut redis::Cmd) -> T {
        command.query_async(&mut self.redis).await.expect("a redis command")
    }

    /// The record as the store wrote it.
    async fn stored(&mut self) -> Value {
        let raw: Vec<u8> = self.redis(redis::cmd("GET").arg(&self.record)).await;
        serde_json::from_slice(&raw).expect("a JSON record")
    }

    async fn overwrite(&mut self, corruption: &Corruption) {
        let key = self.record.clone();
        let set = |value: Vec<u8>| {
            let mut command = redis::cmd("SET");
            command.arg(&key).arg(value);
            command
        };
        match corruption {
            Corruption::Bytes(bytes) => self.redis::<()>(&mut set(bytes.to_vec())).await,
            Corruption::Json(json) => self.redis::<()>(&mut set(json.to_string().into_bytes())).await,
            Corruption::Edit(edit) => {
                let mut record = self.stored().await;
                edit(&mut record);
                self.redis::<()>(&mut set(record.to_string().into_bytes())).await;
            }
            Corruption::Command(args) => {
                self.redis::<()>(redis::cmd("DEL").arg(&key)).await;
                let mut command = redis::cmd(args[0]);
                command.arg(&key).arg(&args[1..]);
                self.redis::<()>(&mut command).await;
            }
        }
    }
}

enum Corruption {
    /// The record replaced by these bytes.
    Bytes(&'static [u8]),
    /// The record replaced by this JSON.
    Json(Value),
    /// The stored record, changed.
    Edit(fn(&mut Value)),
    /// The record deleted, then this command run on its name (a value of another Redis type).
    Command(&'static [&'static str]),
}

fn corruptions() -> Vec<(&'static str, Corruption)> {
    use Corruption::{Bytes, Edit, Json};
    vec![
        ("garbage bytes", Bytes(b"\x00\xff\xfe{garbage")),
        ("an empty string", Bytes(b"")),
        ("truncated JSON", Bytes(br#"{"state":"completed","fingerprint":"#)),
        ("a JSON array", Json(json!([1, 2, 3]))),
        ("a JSON number", Json(json!(42))),
        ("an object of another program", Json(json!({ "user": "alice", "balance": 10 }))),
        ("a record without a state", Edit(|record| drop(record.as_object_mut().unwrap().remove("state")))),
        ("a record without a status", Edit(|record| drop(record.as_object_mut().unwrap().remove("status")))),
        ("a record without a fingerprint", Edit(|record| drop(record.as_object_mut().unwrap().remove("fingerprint")))),
        ("an in-flight record without an owner", Json(json!({ "state": "in_flight", "fingerprint": "0".repeat(64) }))),
        (
            "an in-flight record with a short fingerprint",
            Json(json!({ "state": "in_flight", "owner": "o", "fingerprint": "abc" })),
        ),
        ("a non-hex fingerprint", Edit(|record| record["fingerprint"] = json!("z".repeat(64)))),
        ("a short fingerprint", Edit(|record| record["fingerprint"] = json!("0123abcd"))),
        ("status 0", Edit(|record| record["status"] = json!(0))),
        ("status 1000", Edit(|record| record["status"] = json!(1000))),
        ("status 65536", Edit(|record| record["status"] = json!(65536))),
        ("status -1", Edit(|record| record["status"] = json!(-1))),
        ("status as text", Edit(|record| record["status"] = json!("201"))),
        ("a header name with a space", Edit(|record| record["headers"] = json!([{ "name": "x run", "value": "1" }]))),
        // The replay would break on the wire: the server drops the connection, every time.
        (
            "a stored content-length",
            Edit(|record| record["headers"] = json!([{ "name": "content-length", "value": "3" }])),
        ),
        (
            "a stored transfer-encoding",
            Edit(|record| record["headers"] = json!([{ "name": "transfer-encoding", "value": "chunked" }])),
        ),
        ("an empty header name", Edit(|record| record["headers"] = json!([{ "name": "", "value": "1" }]))),
        (
            "a header value with CRLF",
            Edit(|record| record["headers"] = json!([{ "name": "x-run", "value": "1\r\nset-cookie: a=b" }])),
        ),
        (
            "a header value with NUL",
            Edit(|record| record["headers"] = json!([{ "name": "x-run", "value_base64": "AA==" }])),
        ),
        (
            "a header value that is not base64",
            Edit(|record| record["headers"] = json!([{ "name": "x-run", "value_base64": "%%" }])),
        ),
        ("a body both as text and base64", Edit(|record| record["body_base64"] = json!("AAE="))),
        ("a record from a newer idem (v 2)", Edit(|record| record["v"] = json!(2))),
        ("a record of format v 0", Edit(|record| record["v"] = json!(0))),
        ("an unknown state", Edit(|record| record["state"] = json!("archived"))),
    ]
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| line.contains(" ERROR ")).collect()
}

async fn assert_refused(server: &RedisServer, log: &Log, name: &str, corruption: Corruption) {
    let mut case = Case::start(server, name).await;
    case.overwrite(&corruption).await;
    log.take();
    let retry = case.send("order-1", "10 EUR").await;
    retry.assert_corrupt_record(name);
    let log = log.take();
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "{name}: one error line, got:\n{log}");
    assert!(errors[0].contains("corrupt record"), "{name}: {}", errors[0]);
    // A different request under the same key meets the same entry: still refused, never run.
    case.send("order-1", "99 EUR").await.assert_corrupt_record(name);
    assert_eq!(case.runs.load(Ordering::SeqCst), 1, "{name}: the handler ran only for the original request");
}

#[tokio::test]
async fn every_corrupt_record_is_refused_with_one_error_line_and_nothing_runs() {
    let server = RedisServer::start();
    let (log, _guard) = log_capture::capture();
    for (name, corruption) in corruptions() {
        assert_refused(&server, &log, name, corruption).await;
    }
}

#[tokio::test]
async fn a_hash_or_a_list_at_the_record_name_is_a_corrupt_record() {
    let server = RedisServer::start();
    let (log, _guard) = log_capture::capture();
    let values: [(&str, &[&str]); 3] = [
        ("a hash", &["HSET", "state", "completed", "status", "201"]),
        ("a list", &["RPUSH", "charged 10 EUR"]),
        ("a set", &["SADD", "charged 10 EUR"]),
    ];
    for (name, command) in values {
        assert_refused(&server, &log, name, Corruption::Command(command)).await;
    }
}

/// The decoder is strict only about what idem never writes: a status `http` can carry, even an odd one, and a
/// record from before records carried their format version, are replayed as stored.
#[tokio::test]
async fn records_idem_could_have_written_are_still_replayed() {
    let server = RedisServer::start();
    let mut case = Case::start(&server, "odd-status").await;
    let mut record = case.stored().await;
    record["status"] = json!(999);
    case.overwrite(&Corruption::Json(record)).await;
    let retry = case.send("order-1", "10 EUR").await;
    assert_eq!((retry.status.as_u16(), &retry.body[..]), (999, &b"charged 10 EUR"[..]));
    assert_eq!(retry.headers["idempotent-replayed"], "true");

    let mut case = Case::start(&server, "unversioned").await;
    let mut record = case.stored().await;
    assert_eq!(record["v"], 1, "records carry their format version: {record}");
    record.as_object_mut().unwrap().remove("v");
    case.overwrite(&Corruption::Json(record)).await;
    let retry = case.send("order-1", "10 EUR").await;
    assert_eq!((retry.status, &retry.body[..]), (StatusCode::CREATED, &b"charged 10 EUR"[..]));
    assert_eq!(retry.headers["x-run"], "1");
    assert_eq!(case.runs.load(Ordering::SeqCst), 1);
}
