//! An instance of the reference service (`examples/orders`, a real process) that owns a key dies (SIGKILL) or
//! stops (SIGSTOP) in the middle of its handler, while duplicates go to another instance: the key is taken over
//! once, only after the lease, and the stale owner's late completion never replaces the taker's record.
//!
//! All of them use `POST /short-lease/orders`: a 2 s lease renewed every ~0.67 s while the handler runs, and
//! duplicates wait up to 3 s (`wait_timeout = 3`) for the original.

mod fault_harness;
mod orders_client;
mod proxy;
mod redis_server;
mod service;

use fault_harness::{Pair, unexpected, wait_for_executions};
use futures_util::future::join_all;
use orders_client::{Answer, LEASE, SHORT_LEASE_ROUTE, order};
use redis_server::RedisServer;
use std::time::{Duration, Instant};

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
