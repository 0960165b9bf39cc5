//! A soak: two instances of the reference service on one durable `redis-server` (AOF, `appendfsync always`),
//! several clients sending a mix of first requests, replays, duplicate storms split across both instances and
//! deliberate key reuse for 45 seconds, while Redis is restarted once in the middle. Afterwards the
//! per-key execution counts the handlers kept in Redis are checked against what the clients received.
//!
//! The restart is graceful: `CLIENT PAUSE WRITE`, then SIGTERM. A SIGKILL can lose the reply to the handler's
//! own counter `INCR` after the increment was made durable; the handler then answers 500, its claim is released
//! as for any 5xx, a retry runs and counts again, and the counter disagrees with what ran. A bare SIGTERM can do
//! the same (seen here: Redis 7 shuts down between running a command and writing its reply), so writes are paused
//! first, which sends every executed write's reply. The fault tests cover SIGKILL separately.
//!
//! The handler still answers `500 {"error":"counter unavailable"}` when its `INCR` fails while Redis is away
//! (claimed just before the pause, or just after the restart before its counter connection is back). Nothing was
//! counted; the claim is released (or, with Redis away, lapses after its lease) and a later resend runs the key.
//! Those 500s are the handler's own declared failures, counted apart; any other 500 is a violation, and the
//! execution counts are checked whatever the answers were, so a failure that did count (a lost reply) still shows
//! up as a key that ran twice.
//!
//! A key answered 201 whose record is still in flight at the end is a violation too: its completion was lost in
//! the outage, and a retry after the lease would run it again. (The soak found exactly that before the engine
//! retried refused completions in the background.)
//!
//! Everything is on loopback and bounded: a fixed number of client tasks, each with an operation budget, and a
//! deadline. `SOAK_SECONDS` sets the traffic's length (default 45: about 50 s in all in a debug build).

mod redis_server;
mod service;

use bytes::Bytes;
use redis_server::RedisServer;
use serde_json::{Value, json};
use service::Service;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Client tasks sending traffic at once.
const CLIENTS: usize = 6;
/// Operations per client task at most (a storm is one operation of 10 to 20 requests).
const OPERATIONS_PER_CLIENT: usize = 2_000;
/// How many times a client resends a request answered 409, 503 (or 500) before giving up on the key.
const RESENDS: usize = 8;
const RESEND_PAUSE: Duration = Duration::from_millis(250);
/// The reference handler's answer when its own execution counter cannot be reached: nothing was counted.
const COUNTER_UNAVAILABLE: &[u8] = br#"{"error":"counter unavailable"}"#;

/// What a client meant by a request, which decides the answers it may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The first request with a fresh key (and its resends).
    First,
    /// A key already answered 201, sent again with the same body.
    Replay,
    /// One of 10–20 concurrent requests with one key, split across both instances (and the storm's resends).
    Storm,
    /// A key already answered 201, sent with another body: must be refused 422.
    Mismatch,
}

/// One answer a client received.
#[derive(Debug)]
struct Answer {
    key: String,
    kind: Kind,
    status: u16,
    body: Bytes,
}

/// A key answered 201 and the body it was sent with, for replays and mismatches.
#[derive(Clone)]
struct Completed {
    key: String,
    order: Value,
}

/// Shared by the client tasks.
struct Traffic {
    client: reqwest::Client,
    bases: [String; 2],
    run: String,
    deadline: Instant,
    answers: Mutex<Vec<Answer>>,
    completed: Mutex<Vec<Completed>>,
}

/// A small deterministic generator, one per client task, so each run sends a similar mix.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % below
    }
}

impl Traffic {
    /// Sends one request and records the answer; a transport error (which loopback should never see) is a panic.
    async fn send(&self, instance: usize, key: &str, order: &Value, kind: Kind) -> u16 {
        let response = self
            .client
            .post(format!("{}/orders", self.bases[instance % 2]))
            .header("idempotency-key", key)
            .json(order)
            .send()
            .await
            .unwrap_or_else(|error| panic!("{kind:?} {key}: no answer: {error}"));
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_else(|error| panic!("{kind:?} {key}: body: {error}"));
        self.answers.lock().unwrap().push(Answer { key: key.to_owned(), kind, status, body });
        status
    }

    /// Resends until a 201 (or a final 422), a few times at most, the way a client retries a 409 or a 503.
    async fn until_answered(&self, first_instance: usize, key: &str, order: &Value, kind: Kind) -> bool {
        for attempt in 0..=RESENDS {
            if attempt > 0 {
                tokio::time::sleep(RESEND_PAUSE).await;
            }
            match self.send(first_instance + attempt, key, order, kind).await {
                201 => return true,
                409 | 503 | 500 => continue,
                _ => return false,
            }
        }
        false
    }

    fn remember(&self, key: &str, order: &Value) {
        self.completed.lock().unwrap().push(Completed { key: key.to_owned(), order: order.clone() });
    }

    fn pick_completed(&self, dice: &mut Dice) -> Option<Completed> {
        let completed = self.completed.lock().unwrap();
        (!completed.is_empty()).then(|| completed[dice.roll(completed.len() as u64) as usize].clone())
    }

    async fn client(self: Arc<Self>, id: usize) {
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x1000_0000_01b3));
        for operation in 0..OPERATIONS_PER_CLIENT {
            if Instant::now() >= self.deadline {
                return;
            }
            let key = format!("soak-{}-{id}-{operation}", self.run);
            let instance = dice.roll(2) as usize;
            match dice.roll(100) {
                0..40 => {
                    let delay_ms = if dice.roll(4) == 0 { 5 + dice.roll(45) } else { 0 };
                    let order = json!({ "item": format!("item-{id}"), "qty": operation, "delay_ms": delay_ms });
                    if self.until_answered(instance, &key, &order, Kind::First).await {
                        self.remember(&key, &order);
                    }
                }
                40..65 => {
                    if let Some(Completed { key, order }) = self.pick_completed(&mut dice) {
                        self.send(instance, &key, &order, Kind::Replay).await;
                    }
                }
                65..85 => self.storm(&mut dice, &key, operation).await,
                _ => {
                    if let Some(Completed { key, mut order }) = self.pick_completed(&mut dice) {
                        order["qty"] = json!(order["qty"].as_u64().unwrap() + 1_000);
                        self.send(instance, &key, &order, Kind::Mismatch).await;
                    }
                }
            }
        }
    }

    /// 10 to 20 requests at once for one key, alternating between the instances; the original sleeps a little so
    /// most duplicates find it in flight and wait for it (`wait_timeout = 3.0` on `/orders`).
    async fn storm(self: &Arc<Self>, dice: &mut Dice, key: &str, operation: usize) {
        let size = 10 + dice.roll(11) as usize;
        let delay_ms = [0, 20, 50, 150][dice.roll(4) as usize];
        let order = json!({ "item": "storm", "qty": operation, "delay_ms": delay_ms });
        let requests = (0..size).map(|index| {
            let (traffic, key, order) = (self.clone(), key.to_owned(), order.clone());
            tokio::spawn(async move { traffic.send(index, &key, &order, Kind::Storm).await })
        });
        let statuses = futures_util::future::join_all(requests).await;
        let statuses: Vec<u16> = statuses.into_iter().map(|status| status.expect("a storm request")).collect();
        let answered = statuses.contains(&201) || self.until_answered(0, key, &order, Kind::Storm).await;
        if answered {
            self.remember(key, &order);
        }
    }
}

/// Stops Redis gracefully (writes paused, then SIGTERM) at `at`, keeps it down a moment so clients see the outage, and starts it again with its
/// data.
async fn restart_redis_at(mut redis: RedisServer, at: Duration, down_for: Duration) -> (RedisServer, Duration) {
    tokio::time::sleep(at).await;
    tokio::task::spawn_blocking(move || {
        let stopped = Instant::now();
        redis.drain_and_terminate();
        std::thread::sleep(down_for);
        redis.restart_keeping_data();
        (redis, stopped.elapsed())
    })
    .await
    .expect("the restart task")
}

/// Per-key execution counts and the total, as the handlers recorded them in Redis.
async fn executions(redis: &RedisServer) -> (HashMap<String, u64>, u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let by_key: HashMap<String, u64> =
        redis::cmd("HGETALL").arg("{orders}:executions:by-key").query_async(&mut connection).await.unwrap();
    let total: Option<u64> = redis::cmd("GET").arg("{orders}:executions").query_async(&mut connection).await.unwrap();
    (by_key, total.unwrap_or(0))
}

/// The client keys whose records are still in flight in Redis once every request has been answered: a completion
/// or a release that the outage swallowed, so the claim stays until its lease runs out.
async fn left_in_flight<'a>(redis: &RedisServer, keys: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    // The store key of a request to `POST /orders` without `Authorization`, as the engine derives it.
    let by_record: HashMap<String, &str> = keys
        .map(|key| {
            let digest = idem::store::StoreKey::derive(&[b"http", b"POST", b"/orders", b"", key.as_bytes()]);
            (format!("idem:{{{digest}}}"), key)
        })
        .collect();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let records: Vec<String> = redis::cmd("KEYS").arg("idem:*").query_async(&mut connection).await.unwrap();
    let mut in_flight = Vec::new();
    for name in records {
        let value: Option<String> = redis::cmd("GET").arg(&name).query_async(&mut connection).await.unwrap();
        if value.is_some_and(|value| value.contains(r#""state":"in_flight""#)) {
            in_flight.push(by_record.get(&name).copied().unwrap_or("(a key no client sent)"));
        }
    }
    in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_restarted_durable_redis_run_every_key_at_most_once() {
    let started = Instant::now();
    let traffic_for =
        Duration::from_secs(std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(45));
    let redis = RedisServer::start_durable();
    let env = [("REDIS_URL", redis.url()), ("RUST_LOG", "error".to_owned())];
    let instances = [Service::start(&env).await, Service::start(&env).await];
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let traffic = Arc::new(Traffic {
        client: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap(),
        bases: [instances[0].base.clone(), instances[1].base.clone()],
        run: format!("{nanos:x}"),
        deadline: Instant::now() + traffic_for,
        answers: Mutex::default(),
        completed: Mutex::default(),
    });

    let traffic_started = Instant::now();
    let restart = tokio::spawn(restart_redis_at(redis, traffic_for / 2, Duration::from_millis(300)));
    let clients: Vec<_> = (0..CLIENTS).map(|id| tokio::spawn(traffic.clone().client(id))).collect();
    for client in clients {
        client.await.expect("a client task");
    }
    let traffic_took = traffic_started.elapsed();
    let (redis, outage) = restart.await.expect("the restart");
    let (by_key, total_executions) = executions(&redis).await;

    // --- what the clients received against what ran ---
    let answers = std::mem::take(&mut *traffic.answers.lock().unwrap());
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<(Kind, u16), usize> = BTreeMap::new();
    let mut per_key: BTreeMap<&str, Vec<&Answer>> = BTreeMap::new();
    for answer in &answers {
        *by_status.entry(answer.status).or_default() += 1;
        *by_kind.entry((answer.kind, answer.status)).or_default() += 1;
        per_key.entry(&answer.key).or_default().push(answer);
    }
    let mut violations = Vec::new();
    let mut counter_failures = 0;
    let mut order_ids: HashMap<u64, &str> = HashMap::new();
    for (key, answers) in &per_key {
        let ran = by_key.get(*key).copied().unwrap_or(0);
        // A handler whose counter call failed answered 500, which releases its key: the retry runs again, as the
        // contract says of every 5xx. Its increment may still have landed (Redis applied it, the reply was lost to
        // the restart), so each such 500 may account for one counted run.
        let failed_runs = answers
            .iter()
            .filter(|answer| {
                answer.status == 500 && answer.kind != Kind::Mismatch && answer.body == COUNTER_UNAVAILABLE
            })
            .count() as u64;
        let allowed_runs = 1 + failed_runs;
        if ran > allowed_runs {
            violations.push(format!("{key}: ran {ran} times ({failed_runs} answered 500 counter unavailable)"));
        }
        for answer in answers {
            let allowed: &[u16] = match answer.kind {
                Kind::First | Kind::Storm | Kind::Replay => &[201, 409, 503],
                Kind::Mismatch => &[422, 503],
            };
            if answer.status == 500 && answer.kind != Kind::Mismatch && answer.body == COUNTER_UNAVAILABLE {
                counter_failures += 1;
            } else if !allowed.contains(&answer.status) {
                let body = String::from_utf8_lossy(&answer.body);
                violations.push(format!("{key}: {:?} answered {}: {body}", answer.kind, answer.status));
            }
        }
        let created: Vec<&Bytes> = answers.iter().filter(|a| a.status / 100 == 2).map(|a| &a.body).collect();
        let Some(first) = created.first() else { continue };
        if ran == 0 || ran > allowed_runs {
            violations.push(format!("{key}: answered 201 but ran {ran} times"));
        }
        if let Some(other) = created.iter().find(|body| *body != first) {
            violations.push(format!("{key}: two different 2xx bodies: {first:?} and {other:?}"));
        }
        let body: Value = serde_json::from_slice(first).expect("a JSON order");
        let order_id = body["order_id"].as_u64().unwrap_or_else(|| panic!("{key}: no order_id in {body}"));
        if let Some(earlier) = order_ids.insert(order_id, key) {
            violations.push(format!("order_id {order_id} answered for both {earlier} and {key}"));
        }
    }
    let keys_sent: HashSet<&str> = per_key.keys().copied().collect();
    if let Some(stray) = by_key.keys().find(|key| !keys_sent.contains(key.as_str())) {
        violations.push(format!("an execution counted under {stray}, a key no client sent"));
    }
    let counted: u64 = by_key.values().sum();
    if counted != total_executions {
        violations.push(format!("per-key executions sum to {counted}, the total says {total_executions}"));
    }

    // A claim still in flight now that every answer is in: a release or a completion the outage swallowed. A
    // release that never landed only delays a retry until the lease runs out (the handler failed, nothing was
    // counted); a completion that never landed lets a retry after the lease run the key a second time.
    let in_flight = left_in_flight(&redis, per_key.keys().copied()).await;
    for key in &in_flight {
        let statuses: Vec<(Kind, u16)> = per_key[key].iter().map(|a| (a.kind, a.status)).collect();
        println!("left in flight: {key}, ran {:?}, answered {statuses:?}", by_key.get(*key));
        if statuses.iter().any(|(_, status)| *status == 201) {
            violations.push(format!("{key}: answered 201 but its record is still in flight"));
        }
    }
    let keys_created = per_key.values().filter(|answers| answers.iter().any(|a| a.status == 201)).count();
    println!(
        "soak: {} requests in {traffic_took:.1?} ({} clients, redis down {outage:.1?} at {:.0?}); answers by status \
         {by_status:?}; by kind and status {by_kind:?}; {total_executions} executions; {} keys, {keys_created} \
         answered 201; {counter_failures} handler 500s (counter unavailable); {} claims left in flight; {} violations; \
         wall time {:.1?}",
        answers.len(),
        CLIENTS,
        traffic_for / 2,
        per_key.len(),
        in_flight.len(),
        violations.len(),
        started.elapsed(),
    );
    for violation in violations.iter().take(20) {
        println!("violation: {violation}");
    }
    assert!(violations.is_empty(), "{} violations (listed above)", violations.len());
    assert!(by_status.get(&503).is_some_and(|&count| count > 0), "the restart was seen by clients (503s)");
    assert!(keys_created > 100 && total_executions > 100, "the soak did real work");
    drop(instances);
}
