//! Claim, wait, replay: the protocol every front door runs, free of HTTP.

use crate::store::{Claimed, Store, StoreError, StoreKey, Write};
use crate::{Entry, Fingerprint, OwnerToken, Policy, Record, Stored};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What to do with a request, decided by [`begin`].
#[derive(Debug)]
pub enum Outcome {
    /// The caller owns the key: run the work, then [`Claim::complete`] or [`Claim::release`].
    Execute(Claim),
    /// The work already completed: answer with this record.
    Replay(Record),
    /// The original is still running and did not finish within `wait_timeout`.
    InFlight,
    /// The key was used for a different request (only when the policy validates signatures).
    Mismatch,
}

/// Claims `key` for a request with `fingerprint`, waiting up to the policy's `wait_timeout` for an in-flight
/// original. Waiting is woken by the store's notification; after each wake-up the key is claimed again, so a
/// released claim (the original failed) is taken over rather than waited on forever.
pub async fn begin(
    store: &Arc<dyn Store>,
    key: StoreKey,
    fingerprint: Fingerprint,
    policy: &Policy,
) -> Result<Outcome, StoreError> {
    let deadline = Instant::now() + policy.wait_timeout_duration();
    loop {
        let entry = match store.claim(&key, &fingerprint, policy.lease_duration()).await? {
            Claimed::Owned(owner) => {
                return Ok(Outcome::Execute(Claim {
                    store: store.clone(),
                    key,
                    owner: Some(owner),
                    fingerprint,
                    lease: policy.lease_duration(),
                }));
            }
            Claimed::Existing(entry) => entry,
        };
        let found = match &entry {
            Entry::InFlight { fingerprint } => fingerprint,
            Entry::Completed(record) => &record.fingerprint,
        };
        if policy.validates_signature() && *found != fingerprint {
            return Ok(Outcome::Mismatch);
        }
        if let Entry::Completed(record) = entry {
            return Ok(Outcome::Replay(record));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Outcome::InFlight);
        }
        store.wait(&key, deadline - now).await?;
    }
}

/// Ownership of an in-flight key: the right to run the work once and record its result.
///
/// Consumed by [`Claim::complete`] or [`Claim::release`]. A claim dropped without either (its future was
/// cancelled) releases itself in the background, so the key is free for a retry at once rather than after the lease.
pub struct Claim {
    store: Arc<dyn Store>,
    key: StoreKey,
    owner: Option<OwnerToken>,
    fingerprint: Fingerprint,
    lease: Duration,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("key", &self.key).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Claim {
    /// The key this claim owns.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The fingerprint of the request that made the claim.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Runs `work` while renewing the lease every third of its length, so work that outlives its lease is never
    /// run a second time by a duplicate.
    pub async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        let Some(owner) = &self.owner else { return work.await };
        let period = (self.lease / 3).max(Duration::from_millis(10));
        let mut work = std::pin::pin!(work);
        let mut next = Instant::now() + period;
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = tokio::time::sleep_until(next) => {
                    next = Instant::now() + period;
                    match self.store.renew(&self.key, owner, self.lease).await {
                        Ok(Write::Applied) => {}
                        Ok(Write::Fenced) => tracing::warn!(
                            key = %self.key,
                            "lease lost while the work ran: its result will not be stored"
                        ),
                        Err(error) => tracing::warn!(key = %self.key, %error, "lease renewal failed"),
                    }
                }
            }
        }
    }

    /// Records the result for `ttl` and wakes waiting duplicates.
    pub async fn complete(mut self, stored: Stored, ttl: Duration) -> Result<Write, StoreError> {
        let owner = self.owner.take().expect("a live claim has an owner");
        let record = Record { fingerprint: self.fingerprint, stored };
        let write = self.store.complete(&self.key, &owner, &record, ttl).await;
        report_fenced(&self.key, "complete", &write);
        write
    }

    /// Gives the key up so a retry runs the work again, and wakes waiting duplicates.
    pub async fn release(mut self) -> Result<Write, StoreError> {
        let owner = self.owner.take().expect("a live claim has an owner");
        let write = self.store.release(&self.key, &owner).await;
        report_fenced(&self.key, "release", &write);
        write
    }
}

fn report_fenced(key: &StoreKey, operation: &str, write: &Result<Write, StoreError>) {
    match write {
        Ok(Write::Applied) => {}
        Ok(Write::Fenced) => {
            tracing::warn!(key = %key, operation, "stale owner fenced: the claim had expired and was not overwritten")
        }
        Err(error) => tracing::error!(key = %key, operation, %error, "idempotency store write failed"),
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, key) = (self.store.clone(), self.key.clone());
        runtime.spawn(async move {
            let write = store.release(&key, &owner).await;
            report_fenced(&key, "release", &write);
        });
    }
}
