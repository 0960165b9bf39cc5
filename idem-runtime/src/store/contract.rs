//! The contract between the engine and a backend: the [`Store`] trait and the values its calls take and answer.

use crate::fingerprint::{Fingerprint, shared_hex};
use crate::record::{Entry, OwnerToken, Record};
use crate::store::error::StoreError;
use std::fmt;
use std::time::Duration;

/// Where a key lives in a store: a digest of the request's scope and its idempotency key, never the raw key.
///
/// Shared text: a clone (the claim, its keeper, a store's index) costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(std::sync::Arc<str>);

impl StoreKey {
    /// Derives a key from length-prefixed parts (a namespace, a scope, the client's key): a SHA-256 hex digest, so
    /// no client bytes reach the store and every key has the same short length.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::store::StoreKey;
    /// let key = StoreKey::derive(&[b"http", b"POST", b"/orders", b"", b"key-1"]);
    /// assert_eq!(key.as_str().len(), 64);
    /// ```
    pub fn derive(parts: &[&[u8]]) -> Self {
        let digest = parts.iter().fold(Fingerprint::builder(), |builder, part| builder.field(part)).finish();
        Self(shared_hex(digest.as_bytes()))
    }

    /// Wraps a digest read back from a store or made by [`StoreKey::derive`].
    pub fn from_digest(digest: String) -> Self {
        Self(digest.into())
    }

    /// The digest text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", self.0)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer to [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The key was free (or already held by the same owner: a resent claim): the caller now owns an in-flight claim
    /// for `lease`.
    Owned,
    /// The key was taken: what the store holds.
    Existing(Entry),
}

/// Whether an owner-checked write took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// The caller still owned the claim; the write happened.
    Applied,
    /// The caller no longer owns the claim (its lease expired and another caller claimed or completed the key):
    /// nothing changed.
    Fenced,
}

/// What [`Store::forget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Forgotten {
    /// A completed record (or an entry the store could not read) was removed: the key can be used again.
    Removed,
    /// Nothing was there.
    Absent,
    /// A request holds the key in flight: left alone, since removing it would let a retry run beside the original.
    InFlight,
}

/// A place to keep claims and records: one small async trait, so the engine never knows which backend it talks to.
///
/// Every method is one atomic step; implementations must give the same semantics as [`MemoryStore`]: `claim` is
/// claim-or-read in one step, and `complete`, `release` and `renew` never touch a key that another owner holds or
/// that holds a completed record.
///
/// [`MemoryStore`]: crate::store::memory::MemoryStore
///
/// The caller makes the owner token ([`OwnerToken::generate`]) before it claims, so a claim whose reply was lost (a
/// timeout, a cancelled request, a client that resends after a broken connection) can be recognised when it is
/// sent again, and released by its maker.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Claims `key` for `owner` for `lease` if it is free (absent, or its lease ran out) or already `owner`'s (a
    /// resent claim: its lease starts again), else returns what is there.
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError>;

    /// Replaces the caller's claim with a completed record kept for `ttl`, and wakes waiters. A key that is free
    /// (the caller's lease ran out and nobody claimed it since) is completed too: nobody else ran the request.
    /// [`Write::Fenced`] when another owner holds the key or a record is already there.
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError>;

    /// Deletes the caller's claim so a retry can run again, and wakes waiters.
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError>;

    /// Extends the caller's claim to `lease` from now. A claim whose lease ran out while the store could not be
    /// reached, and that nobody took over since, is the caller's again. A store may answer [`Write::Fenced`] once the
    /// claim is gone (released, or purged after it lapsed) rather than claim the free key again, which is always safe:
    /// a renewal that lands late (its caller gave up on it) must never take a key that was freed after it was sent.
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError>;

    /// Returns once the in-flight claim on `key` ends (completed, released or expired) or after `timeout`,
    /// whichever comes first. Returns at once if `key` is not in flight. Implementations wake on a notification,
    /// not by polling, must not lose a wake-up that happens while they start waiting, and must return by
    /// `timeout` whatever the network does.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError>;

    /// What the store holds under `key`, read without changing anything: for operators and tests. Optional (the
    /// default answers [`StoreError::Unsupported`]); the built-in stores implement it.
    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let _ = key;
        Err(StoreError::Unsupported("inspect"))
    }

    /// Removes a completed record, or an entry the store cannot read, so the key can be used again (an operator
    /// purging a record, or a corrupt entry); wakes waiters. An in-flight claim is never removed. Optional (the
    /// default answers [`StoreError::Unsupported`]); the built-in stores implement it.
    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        let _ = key;
        Err(StoreError::Unsupported("forget"))
    }

    /// Checks that the store answers, for health checks. The default answers `Ok` (a store with nothing to reach).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        (**self).claim(key, fingerprint, owner, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        (**self).complete(key, owner, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        (**self).release(key, owner).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        (**self).renew(key, owner, fingerprint, lease).await
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        (**self).wait(key, timeout).await
    }
    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        (**self).inspect(key).await
    }
    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        (**self).forget(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }
}
