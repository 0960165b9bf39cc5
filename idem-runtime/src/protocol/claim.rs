//! The claim handle (the right to run the work once and record its result) and its fence.

use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;
use crate::protocol::background::Background;
use crate::protocol::keeper::{Lease, Target};
use crate::protocol::report::report_write;
use crate::protocol::write::{Owned, Pending};
use crate::record::{OwnerToken, Record, Stored};
use crate::store::contract::{StoreKey, Write};
use crate::store::error::StoreError;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Ownership of an in-flight key: the right to run the work once and record its result.
///
/// Consumed by [`Claim::complete`] or [`Claim::release`]. A claim dropped without either (its future was
/// cancelled) releases itself in the background, so the key is free for a retry at once rather than after the lease.
pub struct Claim {
    background: Arc<Background>,
    metrics: Arc<dyn Metrics>,
    key: StoreKey,
    owner: Option<OwnerToken>,
    fingerprint: Fingerprint,
    lease: Duration,
    /// The lease as the engine's keeper keeps it, once something asked for it to be kept.
    kept: OnceLock<Arc<Lease>>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("key", &self.key).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Claim {
    pub(crate) fn new(
        background: &Arc<Background>,
        metrics: &Arc<dyn Metrics>,
        key: StoreKey,
        owner: OwnerToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Self {
        Self {
            background: background.clone(),
            metrics: metrics.clone(),
            key,
            owner: Some(owner),
            fingerprint,
            lease,
            kept: OnceLock::new(),
        }
    }

    /// The key this claim owns.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The fingerprint of the request that made the claim.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Runs `work` while the lease is renewed every third of its length (a renewal that fails is retried every
    /// twentieth of the lease until one lands), so work that outlives its lease is never run a second time by a
    /// duplicate. Renewing goes on until the claim is completed, released or dropped, on the engine's lease keeper:
    /// a task apart from `work`'s, so work that blocks its thread keeps its lease too.
    ///
    /// Only a store out of reach for the rest of a lease can cost the claim: a duplicate that claims the key once
    /// the lease has run out (and before a renewal re-claims it) runs the work again. The work here still runs to
    /// its end; its completion is then fenced, so the duplicate's record stands.
    pub async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        self.start_keeping();
        work.await
    }

    /// Hands the lease to the engine's keeper, unless it keeps it already.
    pub(crate) fn start_keeping(&self) -> &Arc<Lease> {
        self.kept.get_or_init(|| {
            let owner = self.owner.clone().expect("a live claim has an owner");
            let target = Target {
                store: self.background.store.clone(),
                metrics: self.metrics.clone(),
                key: self.key.clone(),
                owner,
                fingerprint: self.fingerprint,
            };
            self.background.renewals.keep(target, self.lease)
        })
    }

    /// Renews the lease for `lease` from now on, at once: an adopting front door brings its own lease. With the
    /// keeper keeping it, the renewal is made after any renewal in flight, so an older renewal can never land after
    /// it and shorten the new lease; from then on it renews every third of `lease`.
    pub(crate) async fn renew_for(&mut self, lease: Duration) -> Result<Write, StoreError> {
        let write = match (self.kept.get(), &self.owner) {
            (Some(kept), _) => kept.renew(Some(lease)).await,
            (None, Some(owner)) => {
                let write = self.background.store.renew(&self.key, owner, &self.fingerprint, lease).await;
                report_write(&*self.metrics, &self.key, "renew", &write);
                write
            }
            (None, None) => Ok(Write::Fenced),
        };
        // The store holds the new lease once the renewal landed. Until then (a failure: it may have landed or not)
        // the key may stay held as long as the longer of the two, and a release retried after this claim is dropped
        // must keep trying that long: giving up after the shorter one left a layer's 10 s claim blocking its key
        // (simulator seed 2000467, `orphaned_claim`).
        self.lease = match write {
            Ok(Write::Applied) => lease,
            _ => self.lease.max(lease),
        };
        write
    }

    /// The claim's fence: its owner token, and a way to check (renewing at once) that the claim is still held.
    /// Starts keeping the lease if nothing keeps it yet.
    pub fn fence(&self) -> Fence {
        let kept = self.start_keeping().clone();
        let owner = self.owner.clone().expect("a live claim has an owner");
        Fence { owner, kept }
    }

    /// Stops renewing, once any renewal in flight has landed: a renewal arriving after the release could otherwise
    /// claim the freed key again.
    async fn stop_keeping(&self) {
        if let Some(kept) = self.kept.get() {
            kept.stop().await;
        }
    }

    /// Who this claim's background writes are for.
    fn owned(&self, owner: OwnerToken) -> Owned {
        Owned { store: self.background.store.clone(), metrics: self.metrics.clone(), key: self.key.clone(), owner }
    }

    /// Records the result for `ttl` and wakes waiting duplicates.
    ///
    /// When the store cannot be reached ([`StoreError::Unavailable`]), the error is returned and the completion is
    /// also retried in the background until it lands or `ttl` has passed: the work has run, and a claim left in
    /// flight would lapse after its lease and let a retry run the work a second time. The store accepts a
    /// completion as long as nobody claimed the key since, even after the lease ran out, so an outage shorter than
    /// the rest of the lease costs nothing; a longer one leaves a window in which a retry that claims first runs
    /// again.
    pub async fn complete(mut self, stored: Stored, ttl: Duration) -> Result<Write, StoreError> {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let record = Record { fingerprint: self.fingerprint, stored };
        let write = self.background.store.complete(&self.key, &owner, &record, ttl).await;
        report_write(&*self.metrics, &self.key, "complete", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            self.background.writes.retry(self.owned(owner), Pending::Complete { record, ttl }, ttl);
        }
        write
    }

    /// Records the result through `write` instead of the store's own completion: a completion inside the work's own
    /// database transaction, committed with the work's writes. `write` gets the key, the owner token and the
    /// record, and answers as [`Store::complete`] does.
    ///
    /// Unlike [`Claim::complete`], a failed write is not retried: the work's effects went with the transaction that
    /// failed (or, if only the commit's reply was lost, committed with the record). Either way the claim is
    /// released (retried in the background while the store is out of reach; a release never touches a completed
    /// record), so a retry replays what committed or runs the work again on a clean database.
    #[cfg(feature = "postgres")]
    pub(crate) async fn complete_with<F, Fut>(mut self, stored: Stored, write: F) -> Result<Write, StoreError>
    where
        F: FnOnce(StoreKey, OwnerToken, Record) -> Fut,
        Fut: Future<Output = Result<Write, StoreError>>,
    {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let record = Record { fingerprint: self.fingerprint, stored };
        let result = write(self.key.clone(), owner.clone(), record).await;
        report_write(&*self.metrics, &self.key, "complete", &result);
        if result.is_err() {
            self.owner = Some(owner);
            let _ = self.release().await;
        }
        result
    }

    /// Gives the key up so a retry runs the work again, and wakes waiting duplicates.
    ///
    /// When the store cannot be reached, the release is also retried in the background until it lands or the lease
    /// has run out (when the key frees itself): otherwise duplicates would be refused `409 in-progress` for the rest
    /// of the lease with nobody running the work.
    pub async fn release(mut self) -> Result<Write, StoreError> {
        self.stop_keeping().await;
        let owner = self.owner.take().expect("a live claim has an owner");
        let write = self.background.store.release(&self.key, &owner).await;
        report_write(&*self.metrics, &self.key, "release", &write);
        if let Err(StoreError::Unavailable(_)) = &write {
            self.background.writes.retry(self.owned(owner), Pending::Release, self.lease);
        }
        write
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else { return };
        let owned = self.owned(owner);
        self.background.writes.release_dropped(owned, self.kept.take(), self.lease);
    }
}

/// What a running handler knows of its claim: the owner token that every write to its key presents, and a check
/// that the claim is still held. The extractor behind `#[idempotent]` handlers and the layer
/// (see [`Fence`'s `FromRequestParts`](#impl-FromRequestParts%3CS%3E-for-Fence)).
///
/// idem fences its own writes: a handler whose lease lapsed (it was frozen, or the store was out of reach for a whole
/// lease) and whose key was claimed by a retry can no longer store or delete anything under the key. The handler's
/// *own* writes are its business; the fence gives it two tools for them:
/// - [`Fence::is_held`] just before an irreversible step (charging a card): it renews the lease at once and says
///   whether the claim is still this handler's;
/// - [`Fence::token`], to store beside the handler's own rows (e.g. `UPDATE … WHERE claimed_by = $token`), so a
///   second writer for the same key can tell the two apart.
#[derive(Clone)]
pub struct Fence {
    owner: OwnerToken,
    kept: Arc<Lease>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Fence {
    /// The claim's owner token: random, unique to this execution of the handler.
    pub fn token(&self) -> &OwnerToken {
        &self.owner
    }

    /// Renews the lease now and answers whether the claim is still held: `Ok(false)` once the lease lapsed and the
    /// key was claimed by someone else (or the claim already completed), `Err` when the store could not be reached
    /// (whether the claim is held is then unknown; treat it as not held before an irreversible step).
    pub async fn is_held(&self) -> Result<bool, StoreError> {
        self.kept.renew(None).await.map(|write| write == Write::Applied)
    }
}
