//! Exactly-once processing of a duplicated event stream with the plain async API:
//! `cargo run --example webhook_consumer`.
//!
//! Webhook providers and queues deliver at least once: the same event arrives twice, sometimes at the same time, and
//! a delivery whose processing failed is redelivered. This consumer processes each event exactly once by running
//! the work through `Idempotency::once`, keyed by the event id:
//! - a repeat of a processed event gets the stored result back without processing it again;
//! - a repeat that arrives while the original is being processed waits for it (`wait_timeout`);
//! - a failed attempt is not stored, so the redelivery processes the event;
//! - an event id reused with a different payload is refused (`Mismatch`) rather than answered with another
//!   event's result.
//!
//! It runs on `MemoryStore` and exits by itself; with a `RedisStore` several consumer processes share the
//! guarantee.

use futures_util::StreamExt;
use idem::metrics::Counters;
use idem::{Idempotency, MemoryStore, Policy, once::OnceError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Event {
    id: String,
    account: String,
    cents: i64,
}

/// What processing an event produced: stored, and returned to every duplicate.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Applied {
    ledger_entry: u64,
    balance: i64,
}

/// The side effects, counted so the end of `main` can check that each event was applied exactly once.
#[derive(Default)]
struct Ledger {
    entries: AtomicU64,
    balance: Mutex<i64>,
    /// Events whose first attempt fails, to show that a failure is not stored and a redelivery processes them.
    flaky: Mutex<HashSet<String>>,
}

#[derive(Debug)]
struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ledger database unavailable")
    }
}

impl std::error::Error for Unavailable {}

impl Ledger {
    /// The work to run at most once per event.
    async fn apply(&self, event: &Event) -> Result<Applied, Unavailable> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if self.flaky.lock().unwrap().remove(&event.id) {
            return Err(Unavailable);
        }
        let ledger_entry = self.entries.fetch_add(1, Ordering::SeqCst) + 1;
        let mut balance = self.balance.lock().unwrap();
        *balance += event.cents;
        Ok(Applied { ledger_entry, balance: *balance })
    }
}

/// A day of deliveries: 40 events, each delivered two or three times, some back to back (so duplicates overlap
/// with their original), one redelivered after a failure, and one id reused for a different payload.
fn deliveries() -> (Vec<Event>, usize) {
    let events: Vec<Event> = (1..=40)
        .map(|n| Event { id: format!("evt_{n:03}"), account: format!("acct-{}", n % 4), cents: 100 * n })
        .collect();
    let mut deliveries = Vec::new();
    for (index, event) in events.iter().enumerate() {
        deliveries.push(event.clone());
        deliveries.push(event.clone());
        if index % 3 == 0 {
            deliveries.push(event.clone());
        }
    }
    // Redeliveries arriving much later, after the originals were processed.
    deliveries.extend(events.iter().step_by(7).cloned());
    // A buggy producer reuses an id for a different payload.
    deliveries.push(Event { id: "evt_005".into(), account: "acct-9".into(), cents: 1 });
    (deliveries, events.len())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counters = Arc::new(Counters::new());
    let idempotency = Idempotency::builder(MemoryStore::new()).metrics(counters.clone()).build();
    // A duplicate that arrives while its original is processed waits for the original's result.
    let policy = Policy::new().ttl(Duration::from_secs(7 * 86_400)).wait_timeout(Duration::from_secs(5));
    let ledger = Arc::new(Ledger::default());
    ledger.flaky.lock().unwrap().insert("evt_010".into());

    let (deliveries, unique_events) = deliveries();
    let delivered = deliveries.len();
    let failed = Arc::new(Mutex::new(Vec::new()));
    let refused = AtomicU64::new(0);

    // Eight deliveries in flight at once, as a consumer with eight workers would have.
    futures_util::stream::iter(deliveries)
        .for_each_concurrent(8, |event| {
            let (idempotency, ledger, failed, refused) = (&idempotency, &ledger, &failed, &refused);
            async move {
                let outcome =
                    idempotency.once("ledger-webhooks", &event.id).policy(policy).run(&event, || ledger.apply(&event));
                match outcome.await {
                    Ok(applied) => println!("{}: ledger entry {}", event.id, applied.ledger_entry),
                    Err(OnceError::Work(error)) => {
                        println!("{}: failed ({error}); the queue will redeliver it", event.id);
                        failed.lock().unwrap().push(event);
                    }
                    Err(OnceError::Mismatch) => {
                        println!("{}: id reused for a different payload; refused", event.id);
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(error) => println!("{}: not processed now ({error})", event.id),
                }
            }
        })
        .await;

    // The queue redelivers what failed; this time it goes through.
    let redeliveries = std::mem::take(&mut *failed.lock().unwrap());
    for event in redeliveries {
        let applied =
            idempotency.once("ledger-webhooks", &event.id).policy(policy).run(&event, || ledger.apply(&event)).await?;
        println!("{}: redelivered, ledger entry {}", event.id, applied.ledger_entry);
    }

    let entries = ledger.entries.load(Ordering::SeqCst);
    let counts = counters.snapshot();
    println!();
    println!("deliveries: {delivered}, unique events: {unique_events}, ledger entries: {entries}");
    println!(
        "idempotency: {} new, {} duplicates answered from the store, {} waited for their original, {} refused",
        counts.new, counts.hit, counts.wait.count, counts.mismatch
    );
    assert_eq!(entries, unique_events as u64, "every event applied exactly once");
    let expected_balance: i64 = (1..=40).map(|n| 100 * n).sum();
    assert_eq!(*ledger.balance.lock().unwrap(), expected_balance);
    assert_eq!(refused.load(Ordering::SeqCst), 1);
    // Every event ran once, plus the one failed attempt that was released and run again.
    assert_eq!(counts.new, unique_events as u64 + 1);
    Ok(())
}
