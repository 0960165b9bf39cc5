//! What the fault tests (`tests/faults_*.rs`) share: an owner and a second instance of the reference service, a
//! reader that watches one record straight from Redis, duplicates sent in the background, and summaries of what
//! clients received.
#![allow(dead_code)]

use crate::orders_client::{Answer, OrdersClient, SHORT_LEASE_ROUTE, order};
use crate::proxy::Proxy;
use crate::redis_server::RedisServer;
use crate::service::Service;
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Polls until the handler has run `count` times for `key` (read through `reader`, any live instance) and returns
/// when that was seen.
pub async fn wait_for_executions(reader: &Service, key: &str, count: u64) -> Instant {
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
pub fn executions_by_key(redis: &RedisServer) -> HashMap<String, u64> {
    let output = redis.cli(&["HGETALL", "{orders}:executions:by-key"]);
    let lines: Vec<&str> = output.lines().collect();
    lines.chunks(2).map(|pair| (pair[0].to_owned(), pair[1].parse().expect("a count"))).collect()
}

/// Sends fresh keys to `instance` until one is served (`201`, a first execution) and returns how long after
/// `since` that answer came; panics if none is served within `within`.
pub async fn first_served(
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
        assert!(since.elapsed() < within, "{name}: not served within {within:?} of the outage's end: {refused:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// How many answers of each kind (status, `X-Idempotency-Status` or problem), for a report.
pub fn tally<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> std::collections::BTreeMap<String, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for answer in answers {
        let kind = answer.problem().or(answer.idempotency_status()).unwrap_or("-");
        *tally.entry(format!("{} {kind}", answer.status.as_u16())).or_default() += 1;
    }
    tally
}

/// The answers of `answers` that are not what `allowed` accepts, for an assertion message.
pub fn unexpected<'a>(answers: impl IntoIterator<Item = &'a Answer>, allowed: impl Fn(&Answer) -> bool) -> Vec<String> {
    answers.into_iter().filter(|answer| !allowed(answer)).map(Answer::summary).collect()
}

/// Reads one record straight from Redis, with short timeouts so a frozen server only makes a read fail.
pub struct RecordReader {
    connection: redis::aio::MultiplexedConnection,
    record_key: String,
}

/// What the reader saw at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// The record (JSON), `None` when absent; the whole sample is missing when Redis did not answer.
    pub record: Option<String>,
    pub pttl: i64,
}

impl Sample {
    /// The in-flight record's owner token.
    pub fn owner(&self) -> Option<String> {
        let record: serde_json::Value = serde_json::from_str(self.record.as_deref()?).ok()?;
        (record["state"] == "in_flight").then(|| record["owner"].as_str().map(str::to_owned)).flatten()
    }
}

impl RecordReader {
    pub async fn open(redis: &RedisServer, key: &str) -> Self {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(100)));
        let client = redis::Client::open(redis.url()).unwrap();
        let connection = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();
        let digest =
            idem::store::StoreKey::derive(&[b"http", b"POST", SHORT_LEASE_ROUTE.as_bytes(), b"", key.as_bytes()]);
        Self { connection, record_key: format!("idem:{{{digest}}}") }
    }

    pub async fn sample(&mut self) -> Option<Sample> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&self.record_key).cmd("PTTL").arg(&self.record_key);
        let (record, pttl): (Option<String>, i64) = pipe.query_async(&mut self.connection).await.ok()?;
        Some(Sample { at: Instant::now(), record, pttl })
    }

    /// Samples every 10 ms until `stop`.
    pub async fn watch(mut self, stop: Arc<AtomicBool>) -> Vec<Sample> {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            samples.extend(self.sample().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples
    }

    /// Waits until the in-flight record's lease is renewed (its PTTL goes up) and returns when that was seen.
    pub async fn next_renewal(&mut self) -> Instant {
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
pub async fn duplicate_pressure(
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
pub fn lease_history(samples: &[Sample], origin: Instant) -> Vec<String> {
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
pub struct Pair {
    pub owner: Service,
    pub other: Service,
    pub client: OrdersClient,
}

impl Pair {
    pub async fn start(redis: &RedisServer, proxy: Option<&Proxy>) -> Self {
        let owner_url = proxy.map_or_else(|| redis.url(), Proxy::url);
        let owner = Service::start(&[("REDIS_URL", owner_url)]).await;
        let other = Service::start(&[("REDIS_URL", redis.url())]).await;
        Self { owner, other, client: OrdersClient::new() }
    }

    /// Sends the original to the owner in the background and returns once its handler has started.
    pub async fn original(&self, key: &'static str, body: &serde_json::Value) -> tokio::task::JoinHandle<Answer> {
        let original = tokio::spawn({
            let (client, base, body) = (self.client.clone(), self.owner.base.clone(), body.clone());
            async move { client.post(&base, key, &body).await }
        });
        wait_for_executions(&self.other, key, 1).await;
        original
    }

    /// Duplicates sent to the other instance in the background until `stop` (see [`duplicate_pressure`]).
    pub fn pressure(
        &self,
        key: &'static str,
        body: &serde_json::Value,
        stop: &Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Vec<Answer>> {
        let (client, base, body, stop) = (self.client.clone(), self.other.base.clone(), body.clone(), stop.clone());
        tokio::spawn(async move { duplicate_pressure(&client, &base, key, &body, 3, &stop).await })
    }
}
