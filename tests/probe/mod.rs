//! The probe the handlers of the `layer` and `metrics` tests share (`mod probe;`).

use axum::http::HeaderMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Counts handler executions and can hold a handler in flight while a case sends duplicates.
#[derive(Clone)]
pub struct Probe {
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl Default for Probe {
    fn default() -> Self {
        Self { runs: Arc::default(), started: Arc::default(), gate: Arc::new(Semaphore::new(0)) }
    }
}

impl Probe {
    /// Counts one execution; holds it until [`Probe::open`] when the request has an `x-hold` header.
    pub async fn run(&self, headers: &HeaderMap) -> usize {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if headers.contains_key("x-hold") {
            self.started.notify_one();
            let _permit = self.gate.acquire().await.expect("the gate is never closed");
        }
        run
    }

    /// How many executions have started.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Waits (at most five seconds) until a held execution has started.
    pub async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(5), self.started.notified()).await.expect("the handler started");
    }

    /// Lets every held execution, and every later one, go on.
    pub fn open(&self) {
        self.gate.add_permits(1_000);
    }
}
