//! Faults with real processes: `redis-server` and instances of the reference service (`examples/orders.rs`) are
//! killed (SIGKILL), frozen (SIGSTOP) and brought back (SIGCONT, or a restart on the same port) while clients keep
//! sending requests. Every test records what each client received and asserts on statuses, bodies, headers and on
//! how many times the handler ran for each key (`GET /stats/keys/{key}`, counted in Redis by the service).
//!
//! All of them use `POST /short-lease/orders`: a 2 s lease renewed every ~0.67 s while the handler runs, and
//! duplicates wait up to 3 s (`wait_timeout = 3`) for the original.

mod orders_client;
mod proxy;
mod redis_server;
mod service;

use futures_util::future::join_all;
use orders_client::{Answer, LEASE, OrdersClient, SHORT_LEASE_ROUTE, median, order};
use redis_server::RedisServer;
use reqwest::StatusCode;
use service::Service;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Polls until the handler has run `count` times for `key` (read through `reader`, any live instance) and returns
/// when that was seen.
async fn wait_for_executions(reader: &Service, key: &str, count: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if reader.key_executions(key).await >= count {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{key} did not reach {count} executions within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every per-key execution count the service keeps in Redis, read in one go (the hash behind
/// `GET /stats/keys/{key}`).
fn executions_by_key(redis: &RedisServer) -> HashMap<String, u64> {
    let output = redis.cli(&["HGETALL", "{orders}:executions:by-key"]);
    let lines: Vec<&str> = output.lines().collect();
    lines.chunks(2).map(|pair| (pair[0].to_owned(), pair[1].parse().expect("a count"))).collect()
}

/// Sends fresh keys to `instance` until one is served (`201`, a first execution) and returns how long after
/// `since` that answer came; panics if none is served within `within`.
async fn first_served(
    client: &OrdersClient,
    instance: &Service,
    name: &str,
    since: Instant,
    within: Duration,
) -> Duration {
    let mut refused = Vec::new();
    for attempt in 0.. {
        let answer = client.post(&instance.base, &format!("{name}-{attempt}"), &order("after", 0)).await;
        if answer.is_new_order() {
            println!("{name}: served after {:?}; refused before: {refused:#?}", answer.answered - since);
            return answer.answered - since;
        }
        refused.push(answer.summary());
        assert!(since.elapsed() < within, "{name}: not served within {within:?} of the restart: {refused:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// How many answers of each kind (status, `X-Idempotency-Status` or problem), for a report.
fn tally<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> std::collections::BTreeMap<String, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for answer in answers {
        let kind = answer.problem().or(answer.idempotency_status()).unwrap_or("-");
        *tally.entry(format!("{} {kind}", answer.status.as_u16())).or_default() += 1;
    }
    tally
}

/// The answers of `answers` that are not what `allowed` accepts, for an assertion message.
fn unexpected<'a>(answers: impl IntoIterator<Item = &'a Answer>, allowed: impl Fn(&Answer) -> bool) -> Vec<String> {
    answers.into_iter().filter(|answer| !allowed(answer)).map(Answer::summary).collect()
}

/// Reads one record straight from Redis, with short timeouts so a frozen server only makes a read fail.
struct RecordReader {
    connection: idem::redis::aio::MultiplexedConnection,
    record_key: String,
}

/// What the reader saw at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// The record (JSON), `None` when absent; the whole sample is missing when Redis did not answer.
    record: Option<String>,
    pttl: i64,
}

impl Sample {
    /// The in-flight record's owner token.
    fn owner(&self) -> Option<String> {
        let record: serde_json::Value = serde_json::from_str(self.record.as_deref()?).ok()?;
        (record["state"] == "in_flight").then(|| record["owner"].as_str().map(str::to_owned)).flatten()
    }
}

impl RecordReader {
    async fn open(redis: &RedisServer, key: &str) -> Self {
        let config = idem::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(100)));
        let client = idem::redis::Client::open(redis.url()).unwrap();
        let connection = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();
        let digest = idem::StoreKey::derive(&[b"http", b"POST", SHORT_LEASE_ROUTE.as_bytes(), b"", key.as_bytes()]);
        Self { connection, record_key: format!("idem:{{{digest}}}") }
    }

    async fn sample(&mut self) -> Option<Sample> {
        let mut pipe = idem::redis::pipe();
        pipe.cmd("GET").arg(&self.record_key).cmd("PTTL").arg(&self.record_key);
        let (record, pttl): (Option<String>, i64) = pipe.query_async(&mut self.connection).await.ok()?;
        Some(Sample { at: Instant::now(), record, pttl })
    }

    /// Samples every 10 ms until `stop`.
    async fn watch(mut self, stop: Arc<AtomicBool>) -> Vec<Sample> {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            samples.extend(self.sample().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples
    }

    /// Waits until the in-flight record's lease is renewed (its PTTL goes up) and returns when that was seen.
    async fn next_renewal(&mut self) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = i64::MAX;
        loop {
            if let Some(sample) = self.sample().await {
                if sample.pttl > last.saturating_add(100) {
                    return sample.at;
                }
                last = sample.pttl;
            }
            assert!(Instant::now() < deadline, "no renewal seen within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sends duplicates of `key` to `base`, one after the other (each waits up to 3 s), `streams` at a time, until
/// `stop`.
async fn duplicate_pressure(
    client: &OrdersClient,
    base: &str,
    key: &str,
    body: &serde_json::Value,
    streams: usize,
    stop: &AtomicBool,
) -> Vec<Answer> {
    let streams = (0..streams).map(|stream| async move {
        tokio::time::sleep(Duration::from_millis(150) * stream as u32).await;
        let mut answers = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            answers.push(client.post(base, key, body).await);
            // Refusals come at once while Redis is down: do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    });
    join_all(streams).await.into_iter().flatten().collect()
}

/// What the samples show of the lease, relative to `origin`: when it was extended (its PTTL went up) and when the
/// record was absent or not in flight.
fn lease_history(samples: &[Sample], origin: Instant) -> Vec<String> {
    let mut history = Vec::new();
    let mut last: Option<(&Sample, &str, Option<String>)> = None;
    for sample in samples {
        let owner = sample.owner();
        let state = match (&owner, &sample.record) {
            (Some(_), _) => "in flight",
            (None, Some(_)) => "completed",
            (None, None) => "absent",
        };
        let event = match &last {
            None => Some(state),
            Some((_, last_state, last_owner)) if *last_state != state || *last_owner != owner => {
                Some(if owner.is_some() && last_owner.is_some() { "another owner" } else { state })
            }
            Some((last, ..)) if owner.is_some() && sample.pttl > last.pttl + 100 => Some("renewed"),
            _ => None,
        };
        if let Some(event) = event {
            history.push(format!("{} ms: {event}", sample.at.saturating_duration_since(origin).as_millis()));
        }
        last = Some((sample, state, owner));
    }
    history
}

/// The owner and a second instance on one Redis, the owner either directly or through `proxy`.
struct Pair {
    owner: Service,
    other: Service,
    client: OrdersClient,
}

impl Pair {
    async fn start(redis: &RedisServer, proxy: Option<&proxy::Proxy>) -> Self {
        let owner_url = proxy.map_or_else(|| redis.url(), proxy::Proxy::url);
        let owner = Service::start(&[("REDIS_URL", owner_url)]).await;
        let other = Service::start(&[("REDIS_URL", redis.url())]).await;
        Self { owner, other, client: OrdersClient::new() }
    }

    /// Sends the original to the owner in the background and returns once its handler has started.
    async fn original(&self, key: &'static str, body: &serde_json::Value) -> tokio::task::JoinHandle<Answer> {
        let original = tokio::spawn({
            let (client, base, body) = (self.client.clone(), self.owner.base.clone(), body.clone());
            async move { client.post(&base, key, &body).await }
        });
        wait_for_executions(&self.other, key, 1).await;
        original
    }

    /// Duplicates sent to the other instance in the background until `stop` (see [`duplicate_pressure`]).
    fn pressure(
        &self,
        key: &'static str,
        body: &serde_json::Value,
        stop: &Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Vec<Answer>> {
        let (client, base, body, stop) = (self.client.clone(), self.other.base.clone(), body.clone(), stop.clone());
        tokio::spawn(async move { duplicate_pressure(&client, &base, key, &body, 3, &stop).await })
    }
}

// --- 1. Redis killed mid-stream ------------------------------------------------------------------------------

/// One request of a stream: a fresh key, or a replay of a key completed before the outage.
struct Exchange {
    key: String,
    fresh: bool,
    answer: Answer,
}

const STREAMS: usize = 3;

/// A client that alternates fresh keys and replays of `completed_key` until `stop`, pausing 10 ms between requests.
async fn stream(
    client: OrdersClient,
    base: String,
    name: String,
    completed_key: String,
    stop: Arc<AtomicBool>,
) -> Vec<Exchange> {
    let mut exchanges = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = format!("{name}-{n}");
        n += 1;
        let answer = client.post(&base, &key, &order("fresh", 0)).await;
        exchanges.push(Exchange { key, fresh: true, answer });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let answer = client.post(&base, &completed_key, &order("done", 0)).await;
        exchanges.push(Exchange { key: completed_key.clone(), fresh: false, answer });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    exchanges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_answers_503_at_once_runs_nothing_and_every_instance_serves_within_a_second_of_its_restart() {
    let mut redis = RedisServer::start_persistent();
    let env = [("REDIS_URL", redis.url())];
    let active = Service::start(&env).await;
    // Serves nothing from before the outage until after it: its connections break unnoticed.
    let idle = Service::start(&env).await;
    let client = OrdersClient::new();

    let mut completed = Vec::new();
    for stream in 0..STREAMS {
        let key = format!("killed-done-{stream}");
        let answer = client.post(&active.base, &key, &order("done", 0)).await;
        assert!(answer.is_new_order(), "{}", answer.summary());
        completed.push((key, answer));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..STREAMS)
        .map(|stream_number| {
            let name = format!("killed-{stream_number}");
            let completed_key = completed[stream_number].0.clone();
            tokio::spawn(stream(client.clone(), active.base.clone(), name, completed_key, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed_at = Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let exchanges: Vec<Exchange> = join_all(streams).await.into_iter().flat_map(Result::unwrap).collect();

    let unavailable = |answer: &Answer| answer.is_problem(503, "store-unavailable");
    let first_refusal = exchanges
        .iter()
        .filter(|exchange| unavailable(&exchange.answer))
        .min_by_key(|exchange| exchange.answer.answered)
        .expect("requests were refused while Redis was down");
    let refused_from = first_refusal.answer.answered;
    let completed_body = |key: &str| &completed.iter().find(|(done, _)| done == key).expect("a completed key").1;

    // Answered before the kill: served. Sent after the first refusal was received: refused, every one.
    let before: Vec<&Exchange> = exchanges.iter().filter(|exchange| exchange.answer.answered < killed_at).collect();
    let down: Vec<&Exchange> = exchanges.iter().filter(|exchange| exchange.answer.sent > refused_from).collect();
    let across: Vec<&Exchange> = exchanges
        .iter()
        .filter(|exchange| exchange.answer.answered >= killed_at && exchange.answer.sent <= refused_from)
        .collect();
    for exchange in &before {
        let served = if exchange.fresh {
            exchange.answer.is_new_order()
        } else {
            exchange.answer.replays(completed_body(&exchange.key))
        };
        assert!(served, "before the kill, {}: {}", exchange.key, exchange.answer.summary());
    }
    let problems = unexpected(down.iter().map(|exchange| &exchange.answer), unavailable);
    assert!(
        problems.is_empty(),
        "while Redis was down, every keyed request answers 503 store-unavailable: {problems:#?}"
    );
    assert!(down.len() >= 20, "the stream kept sending while Redis was down: {} requests", down.len());
    // In flight when Redis died: served, refused, or (a claim taken, then the service's own Redis counter failed)
    // the handler's 500.
    let counter_failed = |answer: &Answer| {
        answer.status == StatusCode::INTERNAL_SERVER_ERROR && answer.body["error"] == "counter unavailable"
    };
    for exchange in &across {
        let answer = &exchange.answer;
        let allowed = unavailable(answer)
            || if exchange.fresh {
                answer.is_new_order() || counter_failed(answer)
            } else {
                answer.replays(completed_body(&exchange.key))
            };
        assert!(allowed, "in flight at the kill, {}: {}", exchange.key, answer.summary());
    }

    // Timings: every request sent after the kill was answered within the store's bound (connect + response
    // timeouts, 1 s by default; here refused connections make it far quicker), and once Redis was known to be down
    // without touching the network.
    let after_kill: Vec<Duration> =
        exchanges.iter().filter(|e| e.answer.sent >= killed_at).map(|e| e.answer.took()).collect();
    let down_took: Vec<Duration> = down.iter().map(|exchange| exchange.answer.took()).collect();
    let first_refusal_after_kill = first_refusal.answer.answered - killed_at;
    println!(
        "Redis killed: {} exchanges before, {} in flight across the kill, {} while down; first 503 {:?} after the \
         kill (that request took {:?}); while down: median {:?}, max {:?}; slowest after the kill {:?}",
        before.len(),
        across.len(),
        down.len(),
        first_refusal_after_kill,
        first_refusal.answer.took(),
        median(&down_took),
        down_took.iter().max().unwrap(),
        after_kill.iter().max().unwrap(),
    );
    assert!(
        first_refusal_after_kill < Duration::from_millis(1500),
        "first 503 {first_refusal_after_kill:?} after the kill"
    );
    assert!(after_kill.iter().all(|took| *took < Duration::from_millis(1500)), "{after_kill:?}");
    assert!(median(&down_took) < Duration::from_millis(50), "median while down: {:?}", median(&down_took));

    // Back on the same port, with every acknowledged write kept (AOF, fsync always).
    redis.restart();
    let restarted = Instant::now();
    let within = Duration::from_secs(1);
    let (active_after, idle_after) = tokio::join!(
        first_served(&client, &active, "killed-after-active", restarted, within),
        first_served(&client, &idle, "killed-after-idle", restarted, within),
    );
    println!("after the restart: the active instance served in {active_after:?}, the idle one in {idle_after:?}");

    // Nothing ran for a refused request: the claim failed, so the handler never started.
    let counts = executions_by_key(&redis);
    let count = |key: &str| counts.get(key).copied().unwrap_or(0);
    let refused_keys: Vec<&str> = exchanges
        .iter()
        .filter(|exchange| exchange.fresh && unavailable(&exchange.answer))
        .map(|exchange| exchange.key.as_str())
        .collect();
    let ran: Vec<(&str, u64)> = refused_keys.iter().map(|key| (*key, count(key))).filter(|(_, n)| *n > 0).collect();
    assert!(ran.is_empty(), "a request answered 503 ran its handler: {ran:?}");
    for exchange in before.iter().filter(|exchange| exchange.fresh) {
        assert_eq!(count(&exchange.key), 1, "{} completed before the kill", exchange.key);
    }

    // Completed records survived: replayed by both instances, and never run again.
    for (key, original) in &completed {
        for instance in [&active, &idle] {
            let replay = client.post(&instance.base, key, &order("done", 0)).await;
            assert!(replay.replays(original), "{key} after the restart: {}", replay.summary());
        }
        assert_eq!(active.key_executions(key).await, 1, "{key}");
    }

    // Retries of everything that was not served run the handler once more (a claim that landed just before the
    // kill, its reply lost, holds its key until its lease runs out: the retry waits for it). A handler that
    // answered 500 because the service's own counter failed at the kill may have counted already (its write landed,
    // its reply was lost): idem releases a 5xx, so its retry runs again, as for any 5xx. A request served across
    // the kill may have lost its completion (the record write failed after the handler ran; see
    // `a_completion_lost_with_redis_leaves_the_key_to_its_lease_and_a_retry_after_it_runs_again`).
    let mut lost_completions = 0;
    let unserved = exchanges.iter().filter(|exchange| exchange.fresh && !exchange.answer.is_new_order());
    let retries = join_all(unserved.map(|exchange| {
        let (client, base) = (client.clone(), active.base.clone());
        async move { (exchange, client.post(&base, &exchange.key, &order("fresh", 0)).await) }
    }))
    .await;
    for (exchange, retry) in &retries {
        assert!(retry.is_new_order(), "retry of {} after the restart: {}", exchange.key, retry.summary());
        let before = count(&exchange.key);
        assert!(before == 0 || counter_failed(&exchange.answer), "{}", exchange.key);
        assert_eq!(active.key_executions(&exchange.key).await, before + 1, "{}", exchange.key);
    }
    for exchange in across.iter().filter(|exchange| exchange.fresh && exchange.answer.is_new_order()) {
        let retry = client.post(&active.base, &exchange.key, &order("fresh", 0)).await;
        let executions = active.key_executions(&exchange.key).await;
        if retry.replays(&exchange.answer) {
            assert_eq!(executions, 1, "{}", exchange.key);
        } else {
            assert!(
                retry.is_new_order() && executions == 2,
                "{}: {} ({executions} runs)",
                exchange.key,
                retry.summary()
            );
            lost_completions += 1;
        }
    }
    println!(
        "{} refused keys retried and run once each; {lost_completions} completions lost at the kill",
        retries.len()
    );
}

// --- 2. Redis frozen past the response timeout -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_answers_503_within_the_response_timeout_then_serves_once_thawed() {
    let redis = RedisServer::start();
    let service = Service::start(&[("REDIS_URL", redis.url())]).await;
    let client = OrdersClient::new();
    let completed = client.post(&service.base, "frozen-done", &order("done", 0)).await;
    assert!(completed.is_new_order(), "{}", completed.summary());

    redis.freeze();
    let frozen_at = Instant::now();
    let mut fresh = Vec::new();
    let mut replays = Vec::new();
    while frozen_at.elapsed() < Duration::from_millis(1500) {
        let key = format!("frozen-{}", fresh.len());
        fresh.push((key.clone(), client.post(&service.base, &key, &order("fresh", 0)).await));
        replays.push(client.post(&service.base, "frozen-done", &order("done", 0)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.thaw();
    let thawed = Instant::now();

    let unavailable = |answer: &Answer| answer.is_problem(503, "store-unavailable");
    let problems = unexpected(fresh.iter().map(|(_, answer)| answer).chain(&replays), unavailable);
    assert!(problems.is_empty(), "while Redis was frozen, every keyed request answers 503: {problems:#?}");
    let first = fresh[0].1.took();
    let later: Vec<Duration> =
        fresh.iter().skip(1).map(|(_, answer)| answer.took()).chain(replays.iter().map(Answer::took)).collect();
    println!(
        "Redis frozen: first 503 after {first:?}, then {} more: median {:?}, max {:?}",
        later.len(),
        median(&later),
        later.iter().max().unwrap()
    );
    // The first waited for the response timeout (500 ms by default; the store's bound is 1 s with the connect
    // timeout); once the store knows Redis is down, the others are refused at once.
    assert!(first >= Duration::from_millis(400) && first < Duration::from_millis(1500), "first 503 took {first:?}");
    assert!(median(&later) < Duration::from_millis(50), "{later:?}");
    assert!(later.iter().all(|took| *took < Duration::from_millis(1500)), "{later:?}");

    let served = first_served(&client, &service, "frozen-after", thawed, Duration::from_secs(1)).await;
    println!("served {served:?} after the thaw");
    let replay = client.post(&service.base, "frozen-done", &order("done", 0)).await;
    assert!(replay.replays(&completed), "{}", replay.summary());

    // Nothing ran while frozen. The first request's claim was sent before the store knew Redis was frozen: it sat
    // in the server's socket and took effect at the thaw, its reply long given up (the store's background release
    // of it failed fast, Redis being known down). That key is held for one lease; its retry waits it out (the
    // route's `wait_timeout` is longer than the lease) and runs once.
    let counts = executions_by_key(&redis);
    assert!(fresh.iter().all(|(key, _)| !counts.contains_key(key)), "a refused request ran: {counts:?}");
    let fresh_order = order("fresh", 0);
    let retries = join_all(fresh.iter().map(|(key, _)| client.post(&service.base, key, &fresh_order))).await;
    for ((key, _), retry) in fresh.iter().zip(&retries) {
        assert!(retry.is_new_order(), "retry of {key}: {}", retry.summary());
        assert_eq!(service.key_executions(key).await, 1, "{key}");
    }
    let ran_after_thaw = retries[0].answered - thawed;
    println!(
        "retry of the first refused key (its claim landed at the thaw) took {:?}, answered {ran_after_thaw:?} after \
         the thaw",
        retries[0].took()
    );
    assert!(ran_after_thaw >= LEASE - Duration::from_millis(100), "{ran_after_thaw:?}");
    assert!(ran_after_thaw < LEASE + Duration::from_secs(1), "{ran_after_thaw:?}");
}

// --- 3. An owner frozen past its lease -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_frozen_past_its_lease_is_taken_over_once_and_its_late_completion_is_fenced() {
    let redis = RedisServer::start();
    let Pair { owner, other, client } = Pair::start(&redis, None).await;
    let key = "frozen-owner";
    let delay = Duration::from_millis(2500);
    let body = order("lamp", delay.as_millis() as u64);

    let original = tokio::spawn({
        let (client, base, body) = (client.clone(), owner.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    wait_for_executions(&other, key, 1).await;
    // Mid-handler, before its first renewal (due ~0.67 s after the claim).
    owner.freeze();
    let frozen_at = Instant::now();

    // Duplicates to the other instance, one every 400 ms; each waits up to 3 s.
    let duplicates = join_all((0..7u32).map(|i| {
        let (client, base, body) = (client.clone(), other.base.clone(), body.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(400) * i).await;
            client.post(&base, key, &body).await
        }
    }))
    .await;
    assert_eq!(other.key_executions(key).await, 2, "the frozen run and exactly one takeover");
    let takeovers: Vec<&Answer> = duplicates.iter().filter(|answer| answer.is_new_order()).collect();
    assert_eq!(takeovers.len(), 1, "{:#?}", duplicates.iter().map(Answer::summary).collect::<Vec<_>>());
    let takeover = takeovers[0];
    let others = unexpected(&duplicates, |answer| {
        answer.is_new_order() || answer.replays(takeover) || answer.is_problem(409, "in-progress")
    });
    assert!(others.is_empty(), "every other duplicate gets the takeover's answer or 409: {others:#?}");

    owner.thaw();
    let original = original.await.unwrap();
    // The takeover claimed the key only once the frozen owner's lease had run out: it answered at least a lease
    // plus its own run after the original was sent.
    let takeover_after = takeover.answered - original.sent;
    println!(
        "owner frozen {:?} after it was sent; takeover answered {takeover_after:?} after the original was sent; \
         duplicates: {:#?}; the frozen owner's client got {}",
        frozen_at - original.sent,
        duplicates.iter().map(Answer::summary).collect::<Vec<_>>(),
        original.summary()
    );
    assert!(takeover_after >= LEASE + delay - Duration::from_millis(100), "{takeover_after:?}");
    let after_freeze = takeover.answered - frozen_at;
    assert!(after_freeze < LEASE + delay + Duration::from_millis(1500), "{after_freeze:?}");
    // The frozen owner's client gets its own run's answer (the handler did run), as a first execution; its record
    // was not written: the takeover's wins.
    assert!(original.is_new_order(), "{}", original.summary());
    assert_ne!(original.order_id(), takeover.order_id());
    for instance in [&owner, &other] {
        let replay = client.post(&instance.base, key, &body).await;
        assert!(replay.replays(takeover), "the takeover's record wins: {}", replay.summary());
    }
    assert_eq!(other.key_executions(key).await, 2);
}

// --- 4. An owner killed mid-handler --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_mid_handler_is_taken_over_by_exactly_one_of_ten_racing_retries_once_its_lease_ends() {
    let redis = RedisServer::start();
    let Pair { mut owner, other, client } = Pair::start(&redis, None).await;
    let key = "killed-owner";
    let delay = Duration::from_millis(700);
    let body = order("chair", delay.as_millis() as u64);

    let sent = Instant::now();
    let original = tokio::spawn({
        let (client, base, body) = (client.clone(), owner.base.clone(), body.clone());
        async move { client.try_post(&base, SHORT_LEASE_ROUTE, key, &body).await }
    });
    // The killed run counts before it sleeps.
    wait_for_executions(&other, key, 1).await;
    owner.kill();
    let killed_at = Instant::now();

    let retries = join_all((0..10).map(|_| client.post(&other.base, key, &body))).await;
    let original = original.await.unwrap();
    assert!(original.is_err(), "the killed owner's client gets no answer: {original:?}");
    assert_eq!(other.key_executions(key).await, 2, "the killed run and exactly one takeover");
    let takeovers: Vec<&Answer> = retries.iter().filter(|answer| answer.is_new_order()).collect();
    assert_eq!(takeovers.len(), 1, "{:#?}", retries.iter().map(Answer::summary).collect::<Vec<_>>());
    let takeover = takeovers[0];
    let others = unexpected(&retries, |answer| {
        answer.is_new_order() || answer.replays(takeover) || answer.is_problem(409, "in-progress")
    });
    assert!(others.is_empty(), "every other retry gets the takeover's answer or 409: {others:#?}");
    let waited_out = retries.iter().filter(|answer| answer.replays(takeover)).count();
    println!(
        "owner killed {:?} after it was sent; takeover answered {:?} after the kill; {waited_out} retries got its \
         answer, {} got 409",
        killed_at - sent,
        takeover.answered - killed_at,
        retries.len() - 1 - waited_out
    );
    // Not before the lease ran out (the claim was made after `sent`, so it lasted until at least `sent + LEASE`),
    // and soon after: waiting duplicates are woken when it runs out.
    assert!(takeover.answered - sent >= LEASE + delay - Duration::from_millis(100), "{:?}", takeover.answered - sent);
    assert!(
        takeover.answered - killed_at < LEASE + delay + Duration::from_millis(1500),
        "{:?}",
        takeover.answered - killed_at
    );
    let replay = client.post(&other.base, key, &body).await;
    assert!(replay.replays(takeover), "{}", replay.summary());
}

// --- 5. The completion write failing -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_lost_with_redis_leaves_the_key_to_its_lease_and_a_retry_after_it_runs_again() {
    let mut redis = RedisServer::start_persistent();
    let service = Service::start(&[("REDIS_URL", redis.url())]).await;
    let client = OrdersClient::new();
    let key = "lost-completion";
    let delay = Duration::from_millis(800);
    let body = order("desk", delay.as_millis() as u64);

    let original = tokio::spawn({
        let (client, base, body) = (client.clone(), service.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    wait_for_executions(&service, key, 1).await;
    redis.kill();
    let original = original.await.unwrap();
    // The handler ran; its answer is sent although its record could not be written (the failure is logged).
    assert!(original.is_new_order(), "{}", original.summary());
    let refused = client.post(&service.base, key, &body).await;
    assert!(refused.is_problem(503, "store-unavailable"), "{}", refused.summary());

    // The claim (persisted before it was acknowledged) is still there, with its lease running: a retry waits for it
    // to run out, then runs the request again.
    redis.restart();
    let restarted = Instant::now();
    let retry = loop {
        let retry = client.post(&service.base, key, &body).await;
        if !retry.is_problem(503, "store-unavailable") || restarted.elapsed() > Duration::from_secs(1) {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "the original got {}; after the restart ({:?} after the original was sent) the retry got {}",
        original.summary(),
        restarted - original.sent,
        retry.summary()
    );
    assert!(retry.is_new_order(), "{}", retry.summary());
    assert_ne!(retry.order_id(), original.order_id());
    // The second run started only once the first claim's lease was over.
    let second_run_ended = retry.answered - original.sent;
    assert!(second_run_ended >= LEASE + delay - Duration::from_millis(100), "{second_run_ended:?}");
    assert_eq!(service.key_executions(key).await, 2);
    let replay = client.post(&service.base, key, &body).await;
    assert!(replay.replays(&retry), "{}", replay.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_while_the_handler_runs_costs_nothing() {
    let mut redis = RedisServer::start_persistent();
    let service = Service::start(&[("REDIS_URL", redis.url())]).await;
    let client = OrdersClient::new();
    let key = "restarted-mid-handler";
    let body = order("shelf", 2000);

    let original = tokio::spawn({
        let (client, base, body) = (client.clone(), service.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    wait_for_executions(&service, key, 1).await;
    redis.kill();
    redis.restart();
    // Refused (503) until the store sees Redis back, if it noticed it gone; then it waits for the original.
    let mut duplicates = Vec::new();
    loop {
        let duplicate = client.post(&service.base, key, &body).await;
        let refused = duplicate.is_problem(503, "store-unavailable");
        duplicates.push(duplicate);
        if !refused || duplicates.len() > 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let original = original.await.unwrap();
    println!(
        "original {}; duplicates sent after the restart: {:#?}",
        original.summary(),
        duplicates.iter().map(Answer::summary).collect::<Vec<_>>()
    );
    assert!(original.is_new_order(), "{}", original.summary());
    let last = duplicates.last().unwrap();
    assert!(last.replays(&original) || last.is_problem(409, "in-progress"), "{}", last.summary());
    let replay = client.post(&service.base, key, &body).await;
    assert!(replay.replays(&original), "{}", replay.summary());
    assert_eq!(service.key_executions(key).await, 1);
}

// --- 6. Renewals failing while Redis is unreachable ------------------------------------------------------------

/// A freeze of Redis shorter than the lease: the owner's renewal due during it times out, but its bytes sit in the
/// frozen server's socket and take effect at the thaw (a renewal of a live claim just extends it); the next one
/// lands normally. Nobody takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_of_half_a_lease_while_the_handler_runs_costs_the_owner_nothing() {
    let redis = RedisServer::start();
    let pair = Pair::start(&redis, None).await;
    let key = "short-freeze";
    let body = order("rug", 3500);
    let mut reader = RecordReader::open(&redis, key).await;
    let original = pair.original(key, &body).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pressure = pair.pressure(key, &body, &stop);

    // Frozen 150 ms after a renewal, for 1.1 s: the renewal due 0.5 s in cannot be answered in time.
    let renewed = reader.next_renewal().await;
    tokio::time::sleep_until((renewed + Duration::from_millis(150)).into()).await;
    let watch = tokio::spawn(RecordReader::open(&redis, key).await.watch(stop.clone()));
    redis.freeze();
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    redis.thaw();
    let original = original.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let duplicates = pressure.await.unwrap();
    let samples = watch.await.unwrap();

    println!(
        "short freeze {:?} after a renewal, for 1.1 s; lease: {:?}; original {}; duplicates: {:?}",
        frozen_at - renewed,
        lease_history(&samples, frozen_at),
        original.summary(),
        tally(&duplicates)
    );
    assert!(original.is_new_order(), "{}", original.summary());
    let others = unexpected(&duplicates, |answer| {
        answer.replays(&original)
            || answer.is_problem(409, "in-progress")
            || answer.is_problem(503, "store-unavailable")
    });
    assert!(others.is_empty(), "no duplicate ran: {others:#?}");
    assert_eq!(pair.other.key_executions(key).await, 1, "nobody took over");
    // The claim stayed the owner's throughout and outlived the lease granted by the last renewal before the freeze.
    let owners: std::collections::HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
    assert_eq!(owners.len(), 1, "{samples:#?}");
    let lapse = renewed + LEASE;
    assert!(
        samples.iter().any(|sample| sample.at > lapse + Duration::from_millis(100) && sample.owner().is_some()),
        "still the owner's after the lease it had at the freeze ran out: {samples:#?}"
    );
    let replay = pair.client.post(&pair.other.base, key, &body).await;
    assert!(replay.replays(&original), "{}", replay.summary());
}

/// A freeze of Redis longer than the lease: the lease runs out while nobody can reach Redis (a duplicate waiting
/// for it wakes then and is refused: 503). At the thaw the owner gets the key back (its renewal sent into the frozen
/// server re-claims the lapsed key as it lands, or its next renewal does), completes, and its answer is the record:
/// with no duplicate arriving in between, the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_longer_than_the_lease_with_no_duplicate_in_between_leaves_the_key_to_its_owner() {
    let redis = RedisServer::start();
    let pair = Pair::start(&redis, None).await;
    let key = "long-freeze";
    let body = order("vase", 4000);
    let mut reader = RecordReader::open(&redis, key).await;
    let original = pair.original(key, &body).await;

    let renewed = reader.next_renewal().await;
    tokio::time::sleep_until((renewed + Duration::from_millis(150)).into()).await;
    // One duplicate, waiting when Redis freezes.
    let waiting = tokio::spawn({
        let (client, base, body) = (pair.client.clone(), pair.other.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(RecordReader::open(&redis, key).await.watch(stop.clone()));
    redis.freeze();
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.thaw();
    let waiting = waiting.await.unwrap();
    let original = original.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let samples = watch.await.unwrap();

    println!(
        "long freeze {:?} after a renewal, for 2.5 s; lease: {:?}; the waiting duplicate got {}; original {}",
        frozen_at - renewed,
        lease_history(&samples, frozen_at),
        waiting.summary(),
        original.summary()
    );
    assert!(waiting.is_problem(503, "store-unavailable"), "{}", waiting.summary());
    assert!(original.is_new_order(), "{}", original.summary());
    let owners: std::collections::HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
    assert_eq!(owners.len(), 1, "only the owner ever held the key: {samples:#?}");
    assert_eq!(pair.other.key_executions(key).await, 1);
    let replay = pair.client.post(&pair.other.base, key, &body).await;
    assert!(replay.replays(&original), "{}", replay.summary());
}

/// The owner alone cut off from Redis (its connections closed, new ones refused) for 1.2 s of a 2 s lease, from
/// 150 ms after a renewal: the next renewal fails, and so does the one after it (Redis still unreachable); the
/// renewal is retried until it lands, before the lease runs out, so the duplicates waiting on the other instance
/// never get the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_redis_for_half_a_lease_keeps_its_claim() {
    let redis = RedisServer::start();
    let proxy = proxy::Proxy::start(redis.port);
    let pair = Pair::start(&redis, Some(&proxy)).await;
    let key = "short-partition";
    let body = order("lamp", 3500);
    let mut reader = RecordReader::open(&redis, key).await;
    let original = pair.original(key, &body).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pressure = pair.pressure(key, &body, &stop);

    let renewed = reader.next_renewal().await;
    tokio::time::sleep_until((renewed + Duration::from_millis(150)).into()).await;
    let watch = tokio::spawn(RecordReader::open(&redis, key).await.watch(stop.clone()));
    proxy.refuse();
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.pass();
    let original = original.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let duplicates = pressure.await.unwrap();
    let samples = watch.await.unwrap();

    println!(
        "owner cut off {:?} after a renewal, for 1.2 s; lease: {:?}; original {}; duplicates: {:?}",
        cut_at - renewed,
        lease_history(&samples, cut_at),
        original.summary(),
        tally(&duplicates)
    );
    assert!(original.is_new_order(), "{}", original.summary());
    let others = unexpected(&duplicates, |answer| answer.replays(&original) || answer.is_problem(409, "in-progress"));
    assert!(others.is_empty(), "no duplicate ran: {others:#?}");
    assert_eq!(pair.other.key_executions(key).await, 1, "nobody took over");
    let owners: std::collections::HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
    assert_eq!(owners.len(), 1, "{samples:#?}");
    let lapse = renewed + LEASE;
    // Renewed while cut off? No: the first renewal seen after the cut came once the owner could reach Redis again.
    let first_renewal = samples
        .windows(2)
        .find(|pair| pair[1].at > cut_at && pair[1].pttl > pair[0].pttl + 100)
        .map(|pair| pair[1].at)
        .expect("a renewal after the cut");
    assert!(
        first_renewal > cut_at + Duration::from_millis(1200),
        "renewed while cut off? {:?}",
        first_renewal - cut_at
    );
    assert!(first_renewal < lapse, "renewed {:?} after the lease ran out", first_renewal - lapse);
    let replay = pair.client.post(&pair.other.base, key, &body).await;
    assert!(replay.replays(&original), "{}", replay.summary());
}

/// The owner alone cut off from Redis for longer than the lease, a duplicate waiting on the other instance: the
/// duplicate takes the key over when the lease runs out and runs the handler a second time. Once the owner reaches
/// Redis again, its renewal and its completion are fenced (the taker's claim, then record, stays); the owner's
/// client still gets its own run's answer, and every retry from then on the taker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_redis_past_its_lease_is_taken_over_and_its_completion_is_fenced() {
    let redis = RedisServer::start();
    let proxy = proxy::Proxy::start(redis.port);
    let pair = Pair::start(&redis, Some(&proxy)).await;
    let key = "long-partition";
    let delay = Duration::from_millis(3200);
    let body = order("sofa", delay.as_millis() as u64);
    let stop = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(RecordReader::open(&redis, key).await.watch(stop.clone()));
    let original = pair.original(key, &body).await;
    // Before the first renewal: the lease runs out 2 s after the claim.
    proxy.refuse();
    let cut_at = Instant::now();
    let duplicate = tokio::spawn({
        let (client, base, body) = (pair.client.clone(), pair.other.base.clone(), body.clone());
        async move { client.post(&base, key, &body).await }
    });
    tokio::time::sleep(Duration::from_millis(2600)).await;
    proxy.pass();
    let original = original.await.unwrap();
    let duplicate = duplicate.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let samples = watch.await.unwrap();

    println!(
        "owner cut off {:?} after the claim, for 2.6 s; lease: {:?}; original {}; duplicate {}",
        cut_at - original.sent,
        lease_history(&samples, original.sent),
        original.summary(),
        duplicate.summary()
    );
    assert!(duplicate.is_new_order(), "the duplicate took over: {}", duplicate.summary());
    assert!(duplicate.answered - original.sent >= LEASE + delay - Duration::from_millis(100));
    // The owner's client gets what its handler answered; that answer was not recorded.
    assert!(original.is_new_order(), "{}", original.summary());
    assert_ne!(original.order_id(), duplicate.order_id());
    let owners: Vec<String> = samples.iter().filter_map(Sample::owner).collect();
    let distinct: std::collections::HashSet<&String> = owners.iter().collect();
    assert_eq!(distinct.len(), 2, "the owner's claim, then the taker's: {:?}", lease_history(&samples, original.sent));
    let taken_at = owners.iter().position(|owner| owner != &owners[0]).expect("a second owner");
    assert!(owners[taken_at..].iter().all(|owner| owner != &owners[0]), "the owner never got the key back");
    for instance in [&pair.owner, &pair.other] {
        let replay = pair.client.post(&instance.base, key, &body).await;
        assert!(replay.replays(&duplicate), "the taker's record stands: {}", replay.summary());
    }
    assert_eq!(pair.other.key_executions(key).await, 2);
}
