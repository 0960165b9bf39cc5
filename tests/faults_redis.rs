//! Redis killed (SIGKILL), frozen (SIGSTOP) and restarted on the same port while clients of the reference service
//! (`examples/orders`, real processes) keep sending requests: what every client receives, how fast, and how many
//! times the handler ran for each key (`GET /stats/keys/{key}`, counted in Redis by the service).
//!
//! All of them use `POST /short-lease/orders`: a 2 s lease renewed every ~0.67 s while the handler runs, and
//! duplicates wait up to 3 s (`wait_timeout = 3`) for the original.

mod fault_harness;
mod orders_client;
mod proxy;
mod redis_server;
mod service;

use fault_harness::{executions_by_key, first_served, unexpected, wait_for_executions};
use futures_util::future::join_all;
use orders_client::{Answer, LEASE, OrdersClient, median, order};
use redis_server::RedisServer;
use reqwest::StatusCode;
use service::Service;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    // in the server's socket and took effect at the thaw, its reply long given up. The engine keeps retrying the
    // release of such a claim while the store is out of reach, so it is freed soon after the thaw and its retry
    // runs once, without waiting out the lease.
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
    assert!(ran_after_thaw < LEASE - Duration::from_millis(500), "{ran_after_thaw:?}");
}

// --- 5. The completion write failing -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_refused_by_a_dead_redis_lands_when_it_returns_and_retries_replay_it() {
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
    // The handler ran; its answer is sent although its record could not be written yet.
    assert!(original.is_new_order(), "{}", original.summary());
    let refused = client.post(&service.base, key, &body).await;
    assert!(refused.is_problem(503, "store-unavailable"), "{}", refused.summary());

    // The claim (persisted before it was acknowledged) is still there; the engine retries the completion in the
    // background, so once Redis is back the record lands and a retry replays it instead of running again.
    redis.restart();
    let restarted = Instant::now();
    let retry = loop {
        let retry = client.post(&service.base, key, &body).await;
        if !retry.is_problem(503, "store-unavailable") || restarted.elapsed() > Duration::from_secs(3) {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "the original got {}; after the restart ({:?} after the original was sent) the retry got {}, {:?} after \
         the restart",
        original.summary(),
        restarted - original.sent,
        retry.summary(),
        retry.answered - restarted
    );
    assert!(retry.replays(&original), "{}", retry.summary());
    // Well inside the lease: the retried completion landed, not a lapse of the claim.
    assert!(retry.answered - restarted < LEASE, "{:?}", retry.answered - restarted);
    assert_eq!(service.key_executions(key).await, 1);
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
