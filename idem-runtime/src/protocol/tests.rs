use crate::fingerprint::Fingerprint;
use crate::metrics::{Counters, Metrics, NoMetrics};
use crate::policy::Policy;
use crate::protocol::background::Background;
use crate::protocol::begin::{Outcome, begin_observed};
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Store, StoreKey, Write};
use crate::store::error::StoreError;
use crate::store::memory::MemoryStore;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A [`MemoryStore`] whose renewals fail while `unreachable` is set, and whose completions fail while
/// `completions_unreachable` is, as a remote store's do while it cannot be reached; it notes when each renewal
/// landed, and makes each renewal take `renewal_takes` (its effect lands then even if the caller stopped
/// waiting, as a command already sent to a remote store does).
#[derive(Default)]
struct Unreachable {
    store: Arc<MemoryStore>,
    unreachable: AtomicBool,
    completions_unreachable: AtomicBool,
    renewal_takes: Mutex<Duration>,
    renewed: Arc<Mutex<Vec<Instant>>>,
    /// Each completion and release, when it landed.
    written: Mutex<Vec<(&'static str, Instant)>>,
}

#[async_trait::async_trait]
impl Store for Unreachable {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        self.store.claim(key, fingerprint, owner, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        if self.completions_unreachable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("unreachable (a test double)".into()));
        }
        self.written.lock().unwrap().push(("complete", Instant::now()));
        self.store.complete(key, owner, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.written.lock().unwrap().push(("release", Instant::now()));
        self.store.release(key, owner).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("unreachable (a test double)".into()));
        }
        let takes = *self.renewal_takes.lock().unwrap();
        let (store, renewed) = (self.store.clone(), self.renewed.clone());
        let (key, owner, fingerprint) = (key.clone(), owner.clone(), *fingerprint);
        let sent = tokio::spawn(async move {
            tokio::time::sleep(takes).await;
            let write = store.renew(&key, &owner, &fingerprint, lease).await;
            if matches!(write, Ok(Write::Applied)) {
                renewed.lock().unwrap().push(Instant::now());
            }
            write
        });
        sent.await.unwrap()
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.store.wait(key, timeout).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_is_retried_until_it_lands_long_before_the_lease_runs_out() {
    let store = Arc::new(Unreachable::default());
    let shared: Arc<dyn Store> = store.clone();
    // Renewed every second; the lease granted by the renewal at 1 s runs out at 4 s.
    let lease = Duration::from_secs(3);
    let policy = Policy::new().lease(lease).wait_timeout(Duration::ZERO);
    let key = StoreKey::derive(&[b"renewal-retry"]);
    let fingerprint = Fingerprint::builder().field(b"request").finish();
    let counters = Arc::new(Counters::new());
    let metrics: Arc<dyn Metrics> = counters.clone();
    let started = Instant::now();
    let background = Background::new(shared.clone(), Arc::default());
    let begun = begin_observed(&background, &metrics, key.clone(), fingerprint, &policy).await;
    let Ok(Outcome::Execute(claim)) = begun.result else {
        panic!("a fresh key is claimed");
    };
    claim.start_keeping();

    // Out of reach from 1.5 s to 3.2 s: the renewals due at 2 s and 3 s fail. Before retries, the next attempt
    // came at 4 s, the very moment the lease ran out.
    tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
    store.unreachable.store(true, Ordering::SeqCst);
    tokio::time::sleep_until(started + Duration::from_millis(3200)).await;
    store.unreachable.store(false, Ordering::SeqCst);
    tokio::time::sleep_until(started + Duration::from_millis(3900)).await;

    let renewed: Vec<Duration> = store.renewed.lock().unwrap().iter().map(|at| *at - started).collect();
    let back = Duration::from_millis(3200);
    assert!(
        renewed.iter().any(|at| *at >= back && *at <= back + crate::protocol::keeper::renewal_retry_period(lease)),
        "renewed within a retry period of the store answering again: {renewed:?}"
    );
    // Many attempts failed while the store was out of reach; one store error is counted for them.
    assert_eq!(counters.snapshot().store_errors, 1);
    // So the key is still held when the lease of the renewal at 1 s would have run out.
    tokio::time::sleep_until(started + Duration::from_millis(4001)).await;
    let duplicate = Fingerprint::builder().field(b"duplicate").finish();
    let claimed = shared.claim(&key, &duplicate, &OwnerToken::generate(), lease).await.unwrap();
    assert_eq!(claimed, Claimed::Existing(Entry::InFlight { fingerprint }));
    claim.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_completion_retried_in_the_background() {
    let store = Arc::new(Unreachable::default());
    let idempotency = crate::Idempotency::new(store.clone());
    store.completions_unreachable.store(true, Ordering::SeqCst);
    let ran = idempotency.once("drain", "k").run(&1, || async { Ok::<_, ()>(7) }).await;
    assert_eq!(ran.unwrap(), 7, "the work ran; its completion failed and is retried in the background");
    assert_eq!(idempotency.running_handlers(), 1, "the retried completion is counted");

    // The store answers again 2 s into a 30 s grace period: the drain lasts until the record lands.
    let reachable = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        reachable.completions_unreachable.store(false, Ordering::SeqCst);
    });
    let started = Instant::now();
    assert_eq!(idempotency.drain(Duration::from_secs(30)).await, Ok(()));
    assert!(started.elapsed() >= Duration::from_secs(2), "drained at {:?}", started.elapsed());
    let key = idempotency.once_store_key("drain", "k");
    let held = store.store.inspect(&key).await.unwrap();
    assert!(matches!(held, Some(Entry::Completed(_))), "the record landed before the drain ended: {held:?}");
    assert_eq!(idempotency.running_handlers(), 0);
}

#[tokio::test(start_paused = true)]
async fn drain_reports_a_completion_still_retried_when_its_grace_runs_out() {
    let store = Arc::new(Unreachable::default());
    let idempotency = crate::Idempotency::new(store.clone());
    store.completions_unreachable.store(true, Ordering::SeqCst);
    let ran = idempotency.once("drain", "k").run(&1, || async { Ok::<_, ()>(7) }).await;
    assert_eq!(ran.unwrap(), 7);
    assert_eq!(idempotency.drain(Duration::from_secs(5)).await, Err(crate::drain::Undrained(1)));
}

/// A long piece of work under `once`: its lease (3 s) is renewed beside it on the caller's task, so a duplicate
/// never gets the key while it runs, and the claim completes once the work is done.
#[tokio::test(start_paused = true)]
async fn work_driven_beside_its_keeper_keeps_its_key_for_longer_than_a_lease() {
    let store = Arc::new(Unreachable::default());
    let idempotency = crate::Idempotency::new(store.clone());
    let policy = Policy::new().lease(Duration::from_secs(3)).wait_timeout(Duration::ZERO);
    let original = idempotency.once("long", "k").policy(policy).run(&1, || async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, ()>("done".to_owned())
    });
    let duplicate = async {
        tokio::time::sleep(Duration::from_secs(7)).await;
        idempotency.once("long", "k").policy(policy).run(&1, || async { Ok::<_, ()>("again".to_owned()) }).await
    };
    let (original, duplicate) = tokio::join!(original, duplicate);
    assert_eq!(original.unwrap(), "done");
    assert!(matches!(duplicate, Err(crate::door::once::OnceError::InFlight)), "{duplicate:?}");
    assert!(store.renewed.lock().unwrap().len() >= 3, "renewed every second");
    let again =
        idempotency.once("long", "k").policy(policy).run(&1, || async { Ok::<_, ()>("again".to_owned()) }).await;
    assert_eq!(again.unwrap(), "done", "completed: replayed");
}

/// The work ends while a renewal is in flight (it takes 1 s): the completion waits for it to land, so the
/// renewal cannot land on the record afterwards.
#[tokio::test(start_paused = true)]
async fn a_completion_waits_for_the_renewal_in_flight_beside_the_work() {
    let store = Arc::new(Unreachable::default());
    *store.renewal_takes.lock().unwrap() = Duration::from_secs(1);
    let idempotency = crate::Idempotency::new(store.clone());
    let policy = Policy::new().lease(Duration::from_secs(3));
    let started = Instant::now();
    let ran = idempotency
        .once("slow-renewal", "k")
        .policy(policy)
        .run(&1, || async {
            // The renewal is sent at 1 s and lands at 2 s.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok::<_, ()>(1)
        })
        .await;
    assert_eq!(ran.unwrap(), 1);
    let renewed = store.renewed.lock().unwrap().clone();
    let written = store.written.lock().unwrap().clone();
    assert_eq!(renewed.len(), 1, "{renewed:?}");
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0].0, "complete");
    assert!(
        written[0].1 >= renewed[0],
        "completed at {:?}, after the renewal at {:?}",
        written[0].1 - started,
        renewed[0] - started
    );
}

/// The caller of `once` gives up (its future is dropped) while a renewal is in flight: the renewal is not cut
/// off with the caller (it goes on on a task of its own), and the dropped claim's release waits for it, so the
/// key ends up free rather than claimed again by a renewal landing after the release.
#[tokio::test(start_paused = true)]
async fn a_cancelled_caller_releases_its_key_after_the_renewal_in_flight_lands() {
    let store = Arc::new(Unreachable::default());
    *store.renewal_takes.lock().unwrap() = Duration::from_secs(1);
    let idempotency = crate::Idempotency::new(store.clone());
    let policy = Policy::new().lease(Duration::from_secs(3));
    let run = idempotency.once("cancelled", "k").policy(policy).run(&1, || async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, ()>(1)
    });
    // The renewal is sent at 1 s and lands at 2 s; the caller gives up at 1.5 s.
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), run).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewed = store.renewed.lock().unwrap().clone();
    let written = store.written.lock().unwrap().clone();
    assert_eq!(renewed.len(), 1, "{renewed:?}");
    assert_eq!(written.iter().map(|(write, _)| *write).collect::<Vec<_>>(), ["release"]);
    assert!(written[0].1 >= renewed[0], "released after the renewal landed");
    let key = idempotency.once_store_key("cancelled", "k");
    assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the key is free");
}

/// A [`MemoryStore`] whose claims take `claim_takes` to land and land even when their caller stopped waiting
/// (as a command already sent to a remote store does), whose claims fail while `down` (refused unsent, as a
/// store known to be down refuses them, or sent and timed out when `sent_failures`), and which counts the
/// releases and renewals it was sent.
#[derive(Default)]
struct Remote {
    store: Arc<MemoryStore>,
    claim_takes: Mutex<Duration>,
    down: AtomicBool,
    sent_failures: AtomicBool,
    releases: std::sync::atomic::AtomicUsize,
    renewals: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for Remote {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            if self.sent_failures.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("timed out (a test double)".into()));
            }
            return Err(StoreError::Unavailable(crate::store::error::Cause::unsent("known down (a test double)")));
        }
        let takes = *self.claim_takes.lock().unwrap();
        let (store, key, fingerprint, owner) = (self.store.clone(), key.clone(), *fingerprint, owner.clone());
        let sent = tokio::spawn(async move {
            tokio::time::sleep(takes).await;
            store.claim(&key, &fingerprint, &owner, lease).await
        });
        sent.await.unwrap()
    }
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.store.complete(key, owner, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.store.release(key, owner).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.store.renew(key, owner, fingerprint, lease).await
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.store.wait(key, timeout).await
    }
}

/// Issue 16, item 5: the caller gives up 100 ms into a claim that takes 1 s to land (a frozen or slow store).
/// The claim is finished in the background and released, so the retry after it landed runs at once instead of
/// being refused `in-progress` for a whole lease.
#[tokio::test(start_paused = true)]
async fn a_claim_whose_caller_gave_up_is_finished_and_released_in_the_background() {
    let store = Arc::new(Remote::default());
    *store.claim_takes.lock().unwrap() = Duration::from_secs(1);
    let idempotency = crate::Idempotency::new(store.clone());
    let policy = Policy::new().lease(Duration::from_secs(30)).wait_timeout(Duration::ZERO);
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ()>(1)
    };
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), idempotency.once("o", "k").policy(policy).run(&1, work)).await;
    assert!(gave_up.is_err(), "the caller gave up while the claim was in flight");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let key = idempotency.once_store_key("o", "k");
    assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the claim landed, then was released");
    assert_eq!(idempotency.running_handlers(), 0, "nothing left in the background");

    *store.claim_takes.lock().unwrap() = Duration::ZERO;
    let retried = idempotency.once("o", "k").policy(policy).run(&1, work).await;
    assert_eq!(retried.unwrap(), 1, "the retry runs at once");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once: the abandoned claim never ran it");
}

/// Issue 16, item 4: while the store is known down, refused claims (never sent) leave nothing behind: no task,
/// no background release, nothing for `drain` to wait for.
#[tokio::test(start_paused = true)]
async fn claims_refused_while_the_store_is_known_down_leave_nothing_behind() {
    let store = Arc::new(Remote::default());
    store.down.store(true, Ordering::SeqCst);
    let idempotency = crate::Idempotency::new(store.clone());
    let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    for request in 0..2000 {
        let refused = idempotency.once("o", &request.to_string()).run(&1, || async { Ok::<_, ()>(1) }).await;
        assert!(matches!(refused, Err(crate::door::once::OnceError::Store(_))), "{refused:?}");
    }
    assert_eq!(idempotency.running_handlers(), 0, "no background write per refused request");
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    assert_eq!(tasks, tasks_before, "no task per refused request");
    assert_eq!(idempotency.drain(Duration::from_secs(3)).await, Ok(()));
    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 0, "no release sent once the store is back");
}

/// Issue 16, item 4: claims that may have landed (they failed after being sent) are released in the background,
/// by one task for all of them, and the writes held are bounded.
#[tokio::test(start_paused = true)]
async fn claims_that_failed_after_being_sent_are_released_by_one_task_with_a_bound() {
    let store = Arc::new(Remote::default());
    store.down.store(true, Ordering::SeqCst);
    store.sent_failures.store(true, Ordering::SeqCst);
    let idempotency = crate::Idempotency::new(store.clone());
    let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let refused = crate::protocol::write::MAX_WRITES + 500;
    for request in 0..refused {
        let answer = idempotency.once("o", &request.to_string()).run(&1, || async { Ok::<_, ()>(1) }).await;
        assert!(matches!(answer, Err(crate::door::once::OnceError::Store(_))), "{answer:?}");
    }
    assert_eq!(idempotency.running_handlers(), crate::protocol::write::MAX_WRITES, "background writes are bounded");
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    assert!(tasks <= tasks_before + 1, "one task sends them all: {tasks} alive, {tasks_before} before");
    // The releases are sent at once (the store answers them), and nothing is left.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(idempotency.running_handlers(), 0);
    assert_eq!(store.releases.load(Ordering::SeqCst), crate::protocol::write::MAX_WRITES);
}

/// Issue 16, item 9: once a renewal was fenced (the key is someone else's), the adopting door's renewal with
/// its own lease is answered fenced without being sent: sent, it could take the key its new owner freed.
#[tokio::test(start_paused = true)]
async fn a_lost_claim_is_never_renewed_again_not_even_for_a_new_lease() {
    let store = Arc::new(Remote::default());
    let shared: Arc<dyn Store> = store.clone();
    let background = Background::new(shared.clone(), Arc::default());
    let metrics: Arc<dyn Metrics> = Arc::new(NoMetrics);
    let lease = Duration::from_secs(3);
    let policy = Policy::new().lease(lease).wait_timeout(Duration::ZERO);
    let key = StoreKey::derive(&[b"lost"]);
    let fingerprint = Fingerprint::builder().field(b"request").finish();
    let begun = begin_observed(&background, &metrics, key.clone(), fingerprint, &policy).await;
    let Ok(Outcome::Execute(mut claim)) = begun.result else { panic!("a fresh key is claimed") };
    let fence = claim.fence();
    // The claim is lost: its key freed and taken by another owner before the first renewal (at 1 s).
    let other = OwnerToken::generate();
    store.store.release(&key, fence.token()).await.unwrap();
    assert_eq!(store.store.claim(&key, &fingerprint, &other, lease).await.unwrap(), Claimed::Owned);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!fence.is_held().await.unwrap(), "the renewal at 1 s was fenced");
    // The new owner gives the key up; the old claim must not take it back.
    store.store.release(&key, &other).await.unwrap();
    let sent = store.renewals.load(Ordering::SeqCst);
    assert_eq!(claim.renew_for(Duration::from_secs(30)).await.unwrap(), Write::Fenced);
    assert_eq!(store.renewals.load(Ordering::SeqCst), sent, "not sent");
    assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the key stays free");
    drop(claim);
}

/// A claim whose answer came after its whole lease (a store slower than the lease) may have lapsed before it
/// was answered and been taken by another caller since: the work does not run on it, the caller gets a store
/// error (a retry claims again), and the claim is released.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_after_its_lease_ran_out_does_not_run() {
    let store = Arc::new(Remote::default());
    *store.claim_takes.lock().unwrap() = Duration::from_secs(4);
    let idempotency = crate::Idempotency::new(store.clone());
    let policy = Policy::new().lease(Duration::from_secs(3)).wait_timeout(Duration::ZERO);
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ()>(1)
    };
    let answer = idempotency.once("slow", "k").policy(policy).run(&1, work).await;
    assert!(matches!(answer, Err(crate::door::once::OnceError::Store(_))), "{answer:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the work did not run on a claim that may have lapsed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = idempotency.once_store_key("slow", "k");
    assert_eq!(store.store.inspect(&key).await.unwrap(), None, "the claim was released");
    *store.claim_takes.lock().unwrap() = Duration::ZERO;
    assert_eq!(idempotency.once("slow", "k").policy(policy).run(&1, work).await.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
