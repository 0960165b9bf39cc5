//! A [`Store`] on Redis: single node, Cluster or Sentinel; exactly-once across every process that shares it.

pub(crate) mod builder;
pub(crate) mod codec;
mod completed_keys;
mod connection;
mod notify;
mod replicas;
mod script;
#[cfg(test)]
mod tests;
mod tls;

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record};
use crate::store::contract::{Claimed, Forgotten, Store, StoreKey, Write};
use crate::store::error::StoreError;
use crate::store::redis::completed_keys::CompletedKeys;
use crate::store::redis::connection::{Commands, Failure};
use crate::store::redis::notify::Notifier;
use crate::store::redis::replicas::ReplicaAcks;
use crate::store::redis::script::{CLAIM, COMPLETE, FORGET, RELEASE, RENEW, Script};
use redis::{Pipeline, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A [`Store`] on Redis.
///
/// Every state change is one command, so a replay costs one round trip and a first request two (claim, complete;
/// three with [`wait_for_replicas`]), plus one renewal per third of a lease while a long handler runs.
/// A claim is the native `SET key claim NX GET PX lease` (Redis ≥ 7.0): it takes a free key, or reads what is
/// there. On a key this store completed, or found completed before, a claim is a plain `GET` of the record instead
/// (one round trip still, and Redis' cheapest read; were the record gone since, the claim follows it: see
/// `completed_keys.rs`). Writes that must check the owner first (complete,
/// release, renew) are Lua scripts, as is the claim on a server older than 7.0: the first claim such a server
/// refuses with `ERR syntax error` switches this store to the script for good (any other error reply, an OOM say,
/// fails that claim alone). Records live under
/// `{prefix}{<digest>}` (default prefix `idem:`), as JSON readable with `redis-cli GET`, always with a TTL;
/// completions are announced on `{prefix}{<digest>}:done` (sharded pub/sub on a Cluster), which shares the record's
/// hash tag and so its slot.
///
/// **Outages.** Every call answers within the connect timeout plus the response timeout (1 s by default, see
/// [`RedisStore::builder`]), whatever the network does. Once a call finds Redis unreachable (refused, reset, no
/// answer in time), the calls after it fail at once with [`StoreError::Unavailable`] (the engine answers
/// `503 store-unavailable` with `Retry-After`) while a background task probes Redis every probe interval; its
/// first answer puts the store back in service, so an idle process serves its first request after an outage
/// normally. A call that finds its connection broken (Redis restarted, a proxy closed it) is sent once more on a
/// fresh connection. On a Cluster the connection routes around failed nodes itself and only the timeouts apply.
///
/// **TLS.** With the `tls` feature, `rediss://` URLs connect over TLS (rustls, with the `ring` crypto provider
/// unless the app installed another first), trusting the system's root certificates; with `tls-webpki-roots`,
/// Mozilla's roots compiled into the binary (for images without a CA bundle). The builder's
/// `tls_root_certificates` trusts a private or self-signed CA instead, and `tls_client_certificate` presents a
/// client certificate. Every connection the store opens (commands, pub/sub, each Cluster node, the primary a
/// Sentinel names) uses the same settings. Without the feature a `rediss://` URL is refused with an error that
/// names it.
///
/// [`wait_for_replicas`]: crate::store::redis::builder::RedisStoreBuilder::wait_for_replicas
///
/// ```no_run
/// # use idem_runtime as idem;
/// # async fn run() -> Result<(), idem::store::StoreError> {
/// use idem::{Idempotency, RedisStore};
/// let store = RedisStore::open("redis://127.0.0.1:6379").await?;
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency; Ok(()) }
/// ```
pub struct RedisStore {
    commands: Arc<Commands>,
    notifier: Arc<Notifier>,
    prefix: String,
    publish: &'static str,
    replicas: Option<ReplicaAcks>,
    /// Set once the server answered `SET … NX GET` with `ERR syntax error` (Redis < 7.0): claims run the claim
    /// script from then on.
    claim_by_script: AtomicBool,
    /// Keys seen holding a completed record: a claim reads them with `GET` first.
    completed: CompletedKeys,
    /// Makes the native claim one that Redis 7 refuses as Redis 6 refuses `SET … NX GET` (`ERR syntax error`).
    #[cfg(test)]
    act_as_redis_6: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("kind", &self.commands.backend.kind())
            .field("prefix", &self.prefix)
            .field("timeouts", &self.commands.timeouts)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// How many completions fewer replicas acknowledged than [`RedisStoreBuilder::wait_for_replicas`] asks for (0
    /// when it is not set).
    ///
    /// [`RedisStoreBuilder::wait_for_replicas`]: crate::store::redis::builder::RedisStoreBuilder::wait_for_replicas
    pub fn unreplicated_completions(&self) -> u64 {
        self.replicas.as_ref().map_or(0, ReplicaAcks::unreplicated_completions)
    }

    fn record_key(&self, key: &StoreKey) -> String {
        self.key_with_suffix(key, "")
    }

    fn channel(&self, key: &StoreKey) -> String {
        self.key_with_suffix(key, ":done")
    }

    /// `{prefix}{<digest>}{suffix}`, in one allocation (one for each key of each call).
    fn key_with_suffix(&self, key: &StoreKey, suffix: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + key.as_str().len() + 2 + suffix.len());
        name.push_str(&self.prefix);
        name.push('{');
        name.push_str(key.as_str());
        name.push('}');
        name.push_str(suffix);
        name
    }

    /// The replica policy, unless on a Cluster (where `WAIT` is not used).
    fn replica_acks(&self) -> Option<&ReplicaAcks> {
        self.replicas.as_ref().filter(|_| self.commands.tracks_health())
    }

    /// Makes a claim just taken durable: renews it on an exclusive connection followed by `WAIT`. Fewer replicas
    /// than required, or no answer: the claim is released and the caller gets [`StoreError::Unavailable`].
    async fn replicate_claim(
        &self,
        acks: &ReplicaAcks,
        key: &str,
        owner: &OwnerToken,
        claim: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let prefix = codec::owner_prefix(owner);
        let args: [&[u8]; 3] = [prefix.as_bytes(), &millis(lease), claim.as_bytes()];
        let failure = match RENEW.eval_replicated(&self.commands, acks, &[key], &args).await {
            Ok((Value::Int(1), acked)) if acked >= acks.replicas => return Ok(()),
            Ok((Value::Int(1), acked)) => StoreError::Unavailable(
                format!(
                    "redis: the claim reached {acked} of {} replicas within {:?}; released it",
                    acks.replicas, acks.timeout
                )
                .into(),
            ),
            // Another owner holds the key already: only possible with a lease shorter than a round trip.
            Ok((Value::Int(0), _)) => StoreError::Unavailable("redis: lost the claim before it was replicated".into()),
            Ok((other, _)) => StoreError::Corrupt(format!("unexpected renewal answer {other:?}").into()),
            Err(error) => error,
        };
        // Released here rather than left to the lease, so the client's retry can claim it at once. The release goes
        // on the shared connection; if it fails, the engine releases the failed claim again in the background.
        let channel = format!("{key}:done");
        let args: [&[u8]; 2] = [prefix.as_bytes(), self.publish.as_bytes()];
        if let Err(error) = self.owned_write(&RELEASE, &[key, &channel], &args).await {
            tracing::debug!(%error, "could not release an unreplicated claim; its lease will end it");
        }
        Err(failure)
    }

    /// Claim-or-read in one round trip: the held record, or `None` when the key was free and is now claimed with
    /// `claim` for `lease`.
    async fn claim_or_read(&self, key: &str, claim: &str, lease: &[u8]) -> Result<ClaimAnswer, StoreError> {
        if !self.claim_by_script.load(Ordering::Relaxed) {
            // Sized up front: this runs on every replay.
            let mut command = redis::Cmd::with_capacity(8, key.len() + claim.len() + lease.len() + 32);
            command.arg("SET").arg(key).arg(claim).arg("NX").arg("GET").arg("PX").arg(lease);
            #[cfg(test)]
            if self.act_as_redis_6.load(Ordering::Relaxed) {
                // PX with KEEPTTL is a syntax error.
                command.arg("KEEPTTL");
            }
            let mut pipe = Pipeline::with_capacity(1);
            pipe.add_command(command);
            match self.commands.query::<(Value,)>(&pipe).await {
                Ok((held,)) => return ClaimAnswer::read(held, false),
                // Redis < 7.0 answers `ERR syntax error` (NX and GET together are 7.0's): nothing ran. Any other
                // error reply (an OOM, say) fails this claim only, and the next one is native again.
                Err(Failure::SyntaxRefused(error)) => {
                    tracing::info!(
                        %error,
                        "this Redis does not take SET … NX GET (Redis < 7.0): claims run a script from now on"
                    );
                    self.claim_by_script.store(true, Ordering::Relaxed);
                }
                Err(failure) => return Err(failure.into()),
            }
        }
        ClaimAnswer::read(CLAIM.eval(&self.commands, &[key], &[claim.as_bytes(), lease]).await?, true)
    }

    /// Runs an owner-checked script and reads its 1 / 0 answer.
    async fn owned_write(&self, script: &Script, keys: &[&str], args: &[&[u8]]) -> Result<Write, StoreError> {
        written(script.eval(&self.commands, keys, args).await?)
    }

    /// The completed record named `key`, read with a plain `GET`; `None` when the key holds anything else (nothing,
    /// or a claim): the caller then claims as usual.
    async fn read_completed(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("GET").arg(key);
        let (held,): (Option<Vec<u8>>,) = self.commands.read(&pipe, key).await?;
        match held {
            Some(held) if !codec::is_in_flight(&held) => {
                codec::decode(&held).map(Some).map_err(|why| StoreError::Corrupt(why.into()))
            }
            _ => Ok(None),
        }
    }

    /// [`Store::claim`] of the record named `key` (the claim-or-read, and what a resent claim needs).
    async fn claim_named(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let record = codec::in_flight(owner, fingerprint);
        let lease_millis = millis(lease);
        let replica_acks = self.replica_acks();
        // A second pass only after our own record vanished or changed hands between two commands (its lease ran
        // out just then): what the key holds now decides.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (held, lease_restarted) = match self.claim_or_read(key, &record, &lease_millis).await? {
                ClaimAnswer::Claimed => break,
                ClaimAnswer::Held { record, lease_restarted } => (record, lease_restarted),
            };
            if !codec::is_owned_by(&held, owner) {
                return codec::decode(&held).map(Claimed::Existing).map_err(|why| StoreError::Corrupt(why.into()));
            }
            // Our own claim, sent again after its reply was lost: still ours, and its lease starts again. `SET NX`
            // left it as it was, so the renewal does that (and re-claims the key should it have just expired);
            // with replicas, the replicated renewal below does it.
            if lease_restarted || replica_acks.is_some() {
                break;
            }
            let prefix = codec::owner_prefix(owner);
            let args: [&[u8]; 3] = [prefix.as_bytes(), &lease_millis, record.as_bytes()];
            match self.owned_write(&RENEW, &[key], &args).await? {
                Write::Applied => break,
                Write::Fenced if attempts < 3 => {}
                Write::Fenced => {
                    return Err(StoreError::Unavailable("redis: the key changed hands during every claim".into()));
                }
            }
        }
        // Only a claim the caller holds waits for replicas: a replay wrote nothing, and never waits.
        // Boxed, as the replicated completion below: waiting for replicas takes large futures (a connection
        // checkout), which every claim and completion would otherwise carry, and copy, whether it waits or not.
        if let Some(acks) = replica_acks {
            Box::pin(self.replicate_claim(acks, key, owner, &record, lease)).await?;
        }
        Ok(Claimed::Owned)
    }

    /// [`Store::complete`], without noting the key as completed.
    async fn complete_named(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let (channel, key) = (self.channel(key), self.record_key(key));
        let owner = codec::owner_prefix(owner);
        let record = codec::completed(record);
        let args: [&[u8]; 4] = [owner.as_bytes(), record.as_bytes(), &millis(ttl), self.publish.as_bytes()];
        let Some(acks) = self.replica_acks() else {
            return self.owned_write(&COMPLETE, &[&key, &channel], &args).await;
        };
        let (answer, acked) =
            Box::pin(COMPLETE.eval_replicated(&self.commands, acks, &[&key, &channel], &args)).await?;
        let write = written(answer)?;
        if write == Write::Applied && acked < acks.replicas {
            // The handler ran and its response stands; only a failover before the replicas catch up could lose it.
            acks.count_unreplicated_completion();
            tracing::warn!(
                key = %key,
                acked,
                required = acks.replicas,
                timeout = ?acks.timeout,
                "completed record acknowledged by fewer replicas than required; a failover now could run a retry again"
            );
        }
        Ok(write)
    }
}

/// What a claim-or-read found.
enum ClaimAnswer {
    /// The key was free: the caller's claim is in.
    Claimed,
    /// The key holds this record; with `lease_restarted`, a record of the caller's that the claim script found
    /// (a resent claim) and whose lease it restarted.
    Held { record: Vec<u8>, lease_restarted: bool },
}

impl ClaimAnswer {
    fn read(answer: Value, by_script: bool) -> Result<Self, StoreError> {
        match answer {
            Value::Nil => Ok(Self::Claimed),
            // The script restarts the lease only of a record equal to the claim, which is what a resent claim
            // finds; any other record of the caller's is recognised by its owner token below, as before.
            Value::BulkString(record) => Ok(Self::Held { record, lease_restarted: by_script }),
            other => Err(StoreError::Corrupt(format!("unexpected claim answer {other:?}").into())),
        }
    }
}

/// Reads an owner-checked script's 1 / 0 answer.
fn written(answer: Value) -> Result<Write, StoreError> {
    match answer {
        Value::Int(1) => Ok(Write::Applied),
        Value::Int(0) => Ok(Write::Fenced),
        other => Err(StoreError::Corrupt(format!("unexpected script answer {other:?}").into())),
    }
}

fn millis(duration: Duration) -> Vec<u8> {
    duration.as_millis().max(1).to_string().into_bytes()
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let name = self.record_key(key);
        if self.completed.contains(key) {
            match self.read_completed(&name).await? {
                Some(entry) => return Ok(Claimed::Existing(entry)),
                None => self.completed.remove(key),
            }
        }
        let claimed = self.claim_named(&name, fingerprint, owner, lease).await?;
        if let Claimed::Existing(Entry::Completed(_)) = &claimed {
            self.completed.insert(key);
        }
        Ok(claimed)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        let write = self.complete_named(key, owner, record, ttl).await;
        if let Ok(Write::Applied) = write {
            self.completed.insert(key);
        }
        write
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        let (channel, key) = (self.channel(key), self.record_key(key));
        let owner = codec::owner_prefix(owner);
        self.owned_write(&RELEASE, &[&key, &channel], &[owner.as_bytes(), self.publish.as_bytes()]).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        let key = self.record_key(key);
        let claim = codec::in_flight(owner, fingerprint);
        let owner = codec::owner_prefix(owner);
        self.owned_write(&RENEW, &[&key], &[owner.as_bytes(), &millis(lease), claim.as_bytes()]).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        // One deadline bounds it all (the subscription, the re-read, the notification), whatever the network does.
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let mut registration = self.notifier.register(&self.channel(key));
        // Re-read only once subscribed: a completion from then on is announced to us.
        if !registration.ready(deadline).await {
            return Ok(());
        }
        let key = self.record_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let Ok(read) = tokio::time::timeout_at(deadline, self.commands.read(&pipe, &key)).await else {
            return Ok(());
        };
        let (held, pttl): (Option<Vec<u8>>, i64) = read?;
        if !held.is_some_and(|held| codec::is_in_flight(&held)) {
            return Ok(());
        }
        // A lease that runs out with nobody completing also ends the wait. A record without a TTL (PTTL -1: written
        // by hand or by another tool) has no lease to run out; reading it as "no time left" made the caller's
        // claim-and-wait loop spin until its deadline.
        let until = match pttl {
            -1 => deadline,
            left if left >= 0 => deadline.min(tokio::time::Instant::now() + Duration::from_millis(left as u64)),
            // -2: the record expired between the GET and the PTTL.
            _ => return Ok(()),
        };
        registration.notified(until).await;
        Ok(())
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        let key = self.record_key(key);
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("GET").arg(&key);
        let (held,): (Option<Vec<u8>>,) = self.commands.read(&pipe, &key).await?;
        held.map(|held| codec::decode(&held).map_err(|why| StoreError::Corrupt(why.into()))).transpose()
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        self.completed.remove(key);
        let (channel, key) = (self.channel(key), self.record_key(key));
        let args: [&[u8]; 2] = [codec::IN_FLIGHT.as_bytes(), self.publish.as_bytes()];
        match FORGET.eval(&self.commands, &[&key, &channel], &args).await? {
            Value::Int(0) => Ok(Forgotten::Absent),
            Value::Int(1) => Ok(Forgotten::Removed),
            Value::Int(2) => Ok(Forgotten::InFlight),
            other => Err(StoreError::Corrupt(format!("unexpected forget answer {other:?}").into())),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut pipe = Pipeline::with_capacity(1);
        pipe.cmd("PING");
        let _: (Value,) = self.commands.query(&pipe).await?;
        Ok(())
    }
}
