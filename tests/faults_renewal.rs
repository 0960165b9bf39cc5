//! Lease renewals failing while the handler runs: Redis frozen (SIGSTOP) for less or more than a lease, and the
//! owner alone cut off from Redis (a proxy that closes its connections) for less or more than a lease. What the
//! owner's client and the duplicates sent to another instance receive, who holds the key over time (read straight
//! from Redis), and how many times the handler ran.
//!
//! All of them use `POST /short-lease/orders`: a 2 s lease renewed every ~0.67 s while the handler runs (a failed
//! renewal is retried every 0.1 s), and duplicates wait up to 3 s (`wait_timeout = 3`) for the original.

mod fault_harness;
mod orders_client;
mod proxy;
mod redis_server;
mod service;

use fault_harness::{Pair, RecordReader, Sample, lease_history, tally, unexpected};
use orders_client::{LEASE, order};
use redis_server::RedisServer;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    let owners: HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
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
    let owners: HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
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
    let owners: HashSet<String> = samples.iter().filter_map(Sample::owner).collect();
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
    let distinct: HashSet<&String> = owners.iter().collect();
    assert_eq!(distinct.len(), 2, "the owner's claim, then the taker's: {:?}", lease_history(&samples, original.sent));
    let taken_at = owners.iter().position(|owner| owner != &owners[0]).expect("a second owner");
    assert!(owners[taken_at..].iter().all(|owner| owner != &owners[0]), "the owner never got the key back");
    for instance in [&pair.owner, &pair.other] {
        let replay = pair.client.post(&instance.base, key, &body).await;
        assert!(replay.replays(&duplicate), "the taker's record stands: {}", replay.summary());
    }
    assert_eq!(pair.other.key_executions(key).await, 2);
}
