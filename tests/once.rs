//! The plain async API, `Idempotency::once(..).run(..)`: work run at most once per key, its result stored and
//! returned to every repeat, with the same waiting and lease semantics as the HTTP doors and typed errors.
//!
//! Each case is a function of the store under test, so it can be run on Redis too; keys are fresh per run.

mod postgres_server;
mod redis_server;
use idem::store::{Store, StoreError};
use idem::test_kit::Outage;
use idem::{
    Idempotency, Policy, StoreFailure,
    once::{Completed, OnceError},
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Charge {
    customer: String,
    cents: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    charge_id: usize,
    cents: u64,
}

#[derive(Debug)]
struct Timeout;

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment provider timed out")
    }
}

impl std::error::Error for Timeout {}

fn charge(cents: u64) -> Charge {
    Charge { customer: "c-1".into(), cents }
}

fn fresh_key(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("once-{label}-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The work under test: counts its runs, and can be held in flight while a case makes duplicate calls.
#[derive(Clone)]
struct Charger {
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl Charger {
    fn new() -> Self {
        Self { runs: Arc::default(), started: Arc::default(), gate: Arc::new(Semaphore::new(0)) }
    }

    async fn charge(&self, cents: u64) -> Result<Receipt, Timeout> {
        let charge_id = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Receipt { charge_id, cents })
    }

    /// As [`Charger::charge`], but held until [`Charger::open`].
    async fn charge_held(&self, cents: u64) -> Result<Receipt, Timeout> {
        let receipt = self.charge(cents).await;
        self.started.notify_one();
        let _permit = self.gate.acquire().await.expect("the gate is never closed");
        receipt
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(5), self.started.notified()).await.expect("the work started");
    }

    fn open(&self) {
        self.gate.add_permits(1_000);
    }
}

/// Starts a call whose work is held in flight until [`Charger::open`], and returns once the work has started.
async fn spawn_held(
    idempotency: &Idempotency,
    charger: &Charger,
    key: &str,
) -> JoinHandle<Result<Receipt, OnceError<Timeout>>> {
    let original = tokio::spawn({
        let (idempotency, charger, key) = (idempotency.clone(), charger.clone(), key.to_owned());
        async move { idempotency.once("charges", &key).run(&charge(500), || charger.charge_held(500)).await }
    });
    charger.started().await;
    original
}

pub async fn once_runs_the_work_once_and_returns_its_stored_result_to_repeats(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("repeat");
    for _ in 0..3 {
        let receipt = idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await;
        assert_eq!(receipt.unwrap(), Receipt { charge_id: 1, cents: 500 });
    }
    assert_eq!(charger.runs(), 1);
}

/// A redelivered event whose payload is a map: each delivery builds its own `HashMap`, whose iteration order (and so
/// its plain JSON) differs from run to run, yet it is the same input.
pub async fn once_takes_equal_maps_for_the_same_input_whatever_their_order(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("map");
    for delivery in 0..20 {
        let mut metadata = std::collections::HashMap::new();
        for n in 0..16 {
            metadata.insert(format!("field-{n}"), n);
        }
        let receipt = idempotency.once("charges", &key).run(&metadata, || charger.charge(500)).await;
        assert_eq!(receipt.unwrap(), Receipt { charge_id: 1, cents: 500 }, "delivery {delivery}");
    }
    assert_eq!(charger.runs(), 1);
}

/// A caller can tell the run that did the work from the ones that got its stored result.
pub async fn once_tells_a_fresh_run_from_a_replay(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("fresh");
    let first = idempotency.once("charges", &key).run_or_replay(&charge(500), || charger.charge(500)).await.unwrap();
    assert_eq!(first, Completed::Fresh(Receipt { charge_id: 1, cents: 500 }));
    assert!(!first.is_replay());
    let again = idempotency.once("charges", &key).run_or_replay(&charge(500), || charger.charge(500)).await.unwrap();
    assert_eq!(again, Completed::Replayed(Receipt { charge_id: 1, cents: 500 }));
    assert!(again.is_replay());
    assert_eq!(again.into_value(), Receipt { charge_id: 1, cents: 500 });
    assert_eq!(charger.runs(), 1);
}

pub async fn once_refuses_a_key_reused_with_another_input(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("reused");
    idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await.unwrap();
    let reused = idempotency.once("charges", &key).run(&charge(900), || charger.charge(900)).await;
    assert!(matches!(reused, Err(OnceError::Mismatch)), "{reused:?}");
    assert_eq!(charger.runs(), 1);
}

pub async fn once_without_signature_validation_returns_the_first_result_for_another_input(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("lenient");
    let lenient = Policy::new().validate_signature(false);
    let first = idempotency.once("charges", &key).policy(lenient);
    first.run(&charge(500), || charger.charge(500)).await.unwrap();
    let again = idempotency.once("charges", &key).policy(lenient);
    let receipt = again.run(&charge(900), || charger.charge(900)).await.unwrap();
    assert_eq!(receipt, Receipt { charge_id: 1, cents: 500 });
    assert_eq!(charger.runs(), 1);
}

pub async fn once_does_not_store_an_error_and_the_next_call_runs_again(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let runs = AtomicUsize::new(0);
    let key = fresh_key("error");
    let failed = idempotency
        .once("charges", &key)
        .run(&charge(500), || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<Receipt, _>(Timeout)
        })
        .await;
    match failed {
        Err(OnceError::Work(Timeout)) => {}
        other => panic!("expected the work's own error, got {other:?}"),
    }
    let receipt = idempotency
        .once("charges", &key)
        .run(&charge(500), || async {
            let charge_id = runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, Timeout>(Receipt { charge_id, cents: 500 })
        })
        .await
        .unwrap();
    assert_eq!(receipt.charge_id, 2, "the failed run was not stored: the retry ran the work");
}

pub async fn once_answers_in_flight_to_a_duplicate_while_the_original_runs(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("in-flight");
    let original = spawn_held(&idempotency, &charger, &key).await;
    let duplicate = idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await;
    assert!(matches!(duplicate, Err(OnceError::InFlight)), "{duplicate:?}");
    charger.open();
    assert_eq!(original.await.unwrap().unwrap().charge_id, 1);
    assert_eq!(charger.runs(), 1);
}

pub async fn once_duplicate_waits_for_the_original_within_wait_timeout(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("wait");
    let original = spawn_held(&idempotency, &charger, &key).await;
    let duplicate = tokio::spawn({
        let (idempotency, charger, key) = (idempotency.clone(), charger.clone(), key.clone());
        async move {
            let patient = idempotency.once("charges", &key).policy(Policy::new().wait_timeout(Duration::from_secs(3)));
            patient.run(&charge(500), || charger.charge(500)).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    charger.open();
    let original = original.await.unwrap().unwrap();
    assert_eq!(duplicate.await.unwrap().unwrap(), original, "the duplicate got the original's result");
    assert_eq!(charger.runs(), 1);
}

pub async fn once_cancelled_work_releases_its_key_for_a_retry(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("cancelled");
    let original = spawn_held(&idempotency, &charger, &key).await;
    original.abort();
    assert!(original.await.unwrap_err().is_cancelled());
    // The release happens in the background; a retry willing to wait is woken by it, long before the lease ends.
    let retry = idempotency.once("charges", &key).policy(Policy::new().wait_timeout(Duration::from_secs(5)));
    let started = tokio::time::Instant::now();
    let receipt = retry.run(&charge(500), || charger.charge(500)).await.unwrap();
    assert_eq!(receipt.charge_id, 2, "the cancelled run stored nothing; the retry ran the work");
    assert!(started.elapsed() < Duration::from_secs(5), "released, not expired");
}

pub async fn once_keeps_scopes_apart(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("scopes");
    let refund = idempotency.once("refunds", &key).run(&charge(500), || charger.charge(500)).await;
    let charged = idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await;
    assert_eq!((refund.unwrap().charge_id, charged.unwrap().charge_id), (1, 2));
}

pub async fn once_renews_the_lease_of_work_that_outlives_it(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let runs = Arc::new(AtomicUsize::new(0));
    let key = fresh_key("lease");
    let short_lease = Policy::new().lease(Duration::from_millis(300));
    let original = tokio::spawn({
        let (idempotency, runs, key) = (idempotency.clone(), runs.clone(), key.clone());
        async move {
            let slow = || async {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1_200)).await;
                Ok::<_, Timeout>(Receipt { charge_id: 1, cents: 500 })
            };
            idempotency.once("charges", &key).policy(short_lease).run(&charge(500), slow).await
        }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(350)).await;
        let duplicate = idempotency
            .once("charges", &key)
            .policy(short_lease)
            .run(&charge(500), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Timeout>(Receipt { charge_id: 2, cents: 500 })
            })
            .await;
        assert!(matches!(duplicate, Err(OnceError::InFlight)), "the lease lapsed: {duplicate:?}");
    }
    assert_eq!(original.await.unwrap().unwrap().charge_id, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

pub async fn once_fails_closed_with_a_store_error_and_does_not_run(_store: impl Store) {
    let idempotency = Idempotency::new(Outage);
    let charger = Charger::new();
    let outcome = idempotency.once("charges", "k").run(&charge(500), || charger.charge(500)).await;
    match outcome {
        Err(error @ OnceError::Store(StoreError::Unavailable(_))) => {
            assert!(error.to_string().contains("did not run; retry later"), "{error}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(charger.runs(), 0);
}

pub async fn once_fails_open_when_asked(_store: impl Store) {
    let idempotency = Idempotency::builder(Outage).on_store_failure(StoreFailure::FailOpen).build();
    let charger = Charger::new();
    let receipt = idempotency.once("charges", "k").run(&charge(500), || charger.charge(500)).await;
    assert_eq!(receipt.unwrap().charge_id, 1);
    assert_eq!(charger.runs(), 1);
}

pub async fn once_result_too_large_to_keep_is_returned_then_refused_not_rerun(store: impl Store) {
    let idempotency = Idempotency::builder(store).max_record_bytes(16).build();
    let charger = Charger::new();
    let key = fresh_key("large");
    let first = idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await;
    assert_eq!(first.unwrap().charge_id, 1, "the caller that ran the work gets its result");
    let again = idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await;
    assert!(matches!(again, Err(OnceError::NotReplayable)), "{again:?}");
    assert_eq!(charger.runs(), 1, "never a second run");
}

pub async fn once_stored_result_of_another_type_is_a_decode_error(store: impl Store) {
    let idempotency = Idempotency::new(store);
    let charger = Charger::new();
    let key = fresh_key("decode");
    idempotency.once("charges", &key).run(&charge(500), || charger.charge(500)).await.unwrap();
    let as_text =
        idempotency.once("charges", &key).run(&charge(500), || async { Ok::<String, Timeout>("x".into()) }).await;
    assert!(matches!(as_text, Err(OnceError::Decode(_))), "{as_text:?}");
    assert_eq!(charger.runs(), 1);
}

#[test]
fn once_errors_say_what_to_do() {
    let in_flight = OnceError::<Timeout>::InFlight.to_string();
    assert!(in_flight.contains("retry later") && in_flight.contains("wait_timeout"), "{in_flight}");
    assert!(OnceError::<Timeout>::Mismatch.to_string().contains("use a new key"));
    let work = OnceError::Work(Timeout);
    assert!(work.to_string().contains("a retry runs it again"));
    let source = std::error::Error::source(&work).map(ToString::to_string);
    assert_eq!(source.as_deref(), Some("payment provider timed out"));
    // The work's error need not be a `std::error::Error` (e.g. `anyhow::Error`, a `String`) to be displayed.
    let as_string: OnceError<String> = OnceError::Work("declined".to_owned());
    assert!(as_string.to_string().starts_with("the work failed"));
}

// --- the suite ----------------------------------------------------------------------------------------------

/// Every case above as a `#[tokio::test]`, in a module `$name`, each on a store made by `$store` (an async closure):
/// `once_cases!(redis, || async { make_redis_store().await });` runs them on another store.
macro_rules! once_cases {
    ($name:ident, $store:expr) => {
        mod $name {
            once_cases!(@each $store,
            once_runs_the_work_once_and_returns_its_stored_result_to_repeats,
            once_refuses_a_key_reused_with_another_input,
            once_without_signature_validation_returns_the_first_result_for_another_input,
            once_does_not_store_an_error_and_the_next_call_runs_again,
            once_answers_in_flight_to_a_duplicate_while_the_original_runs,
            once_duplicate_waits_for_the_original_within_wait_timeout,
            once_cancelled_work_releases_its_key_for_a_retry,
            once_keeps_scopes_apart,
            once_takes_equal_maps_for_the_same_input_whatever_their_order,
            once_tells_a_fresh_run_from_a_replay,
            once_renews_the_lease_of_work_that_outlives_it,
            once_fails_closed_with_a_store_error_and_does_not_run,
            once_fails_open_when_asked,
            once_result_too_large_to_keep_is_returned_then_refused_not_rerun,
            once_stored_result_of_another_type_is_a_decode_error,
            );
        }
    };
    (@each $store:expr, $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store = ($store)().await;
                super::$case(store).await;
            }
        )*
    };
}

once_cases!(memory, || async { idem::MemoryStore::new() });
once_cases!(redis, crate::redis_server::shared_node_store);
once_cases!(postgres, crate::postgres_server::shared_store);
