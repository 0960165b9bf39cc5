//! The store of a run: a real store (the `MemoryStore`, or a real Redis or PostgreSQL) behind a simulated network
//! and server queue.
//!
//! A call leaves its caller (unless the caller's thread is blocked: then it cannot be sent until the block ends),
//! travels for a latency, and joins one FIFO queue at the server, which applies commands in the order they arrive
//! (a multiplexed connection, as idem's Redis store uses); the reply travels back. Faults, from the plan:
//! - an outage refuses calls at once, unsent, and drops commands that arrive during it;
//! - a hang freezes the server: commands wait in the queue, their callers time out at the store timeout, and the
//!   commands land when the server resumes;
//! - a slow period adds up to its latency each way;
//! - a lost reply: the command landed, the caller gets an error; a resent command lands twice;
//! - the store's clock jumps (an in-flight entry expires early), a record turns corrupt, the store fills up (the
//!   `MemoryStore`'s own bounds).
//!
//! Every command the server applies is reported to the world, which keeps a shadow of who holds each key. With the
//! `MemoryStore` a command is applied at the virtual instant the server takes it, and the shadow is checked against
//! the store after each one; with a real store it is applied one round trip later, and the shadow follows its
//! answers (the queue sends one command at a time, so their order is the store's).

use super::plan::FaultKind;
use super::world::{World, claimed, written};
use idem::{
    MemoryStore,
    store::{Cause, Claimed, Entry, Fingerprint, Forgotten, OwnerToken, Record, Store, StoreError, StoreKey, Write},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Base one-way latency of a call, in milliseconds, outside slow periods.
pub const BASE_LATENCY_MS: u64 = 3;

pub struct SimStore {
    inner: Arc<dyn Store>,
    world: Arc<World>,
    server: mpsc::UnboundedSender<Command>,
    /// When the last command sent arrives: later ones arrive after it (FIFO).
    last_arrival: Mutex<Instant>,
}

enum Op {
    Claim { fingerprint: Fingerprint, lease: Duration },
    Complete { record: Record, ttl: Duration },
    Release,
    Renew { fingerprint: Fingerprint, lease: Duration },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Claim { .. } => "claim",
            Op::Complete { .. } => "complete",
            Op::Release => "release",
            Op::Renew { .. } => "renew",
        }
    }
}

struct Command {
    op: Op,
    key: StoreKey,
    owner: OwnerToken,
    arrival: Instant,
    /// 2 when the command was resent: it lands twice and the caller gets the second reply.
    copies: u8,
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    Claimed(Result<Claimed, StoreError>),
    Write(Result<Write, StoreError>),
}

fn unavailable(message: &str) -> StoreError {
    StoreError::Unavailable(Cause::new(message))
}

impl SimStore {
    /// A `MemoryStore` with the plan's bounds behind the simulated network, and its server's future (spawn it: it
    /// ends when the store is dropped).
    pub fn memory(world: Arc<World>) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let plan = &world.plan;
        let inner = MemoryStore::builder().max_entries(plan.max_entries).max_bytes(plan.max_bytes).build();
        Self::over(world, Arc::new(inner))
    }

    /// `inner` behind the simulated network, and its server's future.
    pub fn over(
        world: Arc<World>,
        inner: Arc<dyn Store>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (server, queue) = mpsc::unbounded_channel();
        let serving = serve(inner.clone(), world.clone(), queue);
        let store = Self { inner, world, server, last_arrival: Mutex::new(Instant::now()) };
        (store, serving)
    }

    /// The store's clock jumps: `key`'s in-flight entry (held by `owner`) expires now.
    pub async fn expire_early(&self, key: &StoreKey, owner: &OwnerToken) {
        let _ = self.inner.release(key, owner).await;
    }

    /// A one-way latency drawn for a call made now.
    fn latency(&self, at: Duration) -> Duration {
        let slow = self.world.plan.window_at(at, |kind| matches!(kind, FaultKind::Slow(_)));
        let mut rng = self.world.rng();
        match slow.map(|window| window.kind) {
            Some(FaultKind::Slow(most)) => rng.millis(0, most.as_millis() as u64),
            _ => rng.millis(0, BASE_LATENCY_MS),
        }
    }

    fn outage(&self, at: Duration) -> bool {
        self.world.plan.window_at(at, |kind| kind == FaultKind::Outage).is_some()
    }

    /// Waits until the caller's thread is unblocked: a blocked thread sends nothing.
    async fn unblocked(&self, operation: &str) {
        if let Some(until) = self.world.blocked_until() {
            let task = self.world.task_name(tokio::task::try_id());
            self.world.log(format!(
                "  {task} {operation}: its thread is blocked, not sent until {:?}",
                until - self.world.start
            ));
            tokio::time::sleep_until(until).await;
        }
    }

    async fn call(&self, op: Op, key: &StoreKey, owner: &OwnerToken) -> Reply {
        let operation = op.name();
        let is_claim = matches!(op, Op::Claim { .. });
        self.unblocked(operation).await;
        let world = &self.world;
        let at = world.elapsed();
        if self.outage(at) {
            world.call_sent(operation, key, owner, "refused: the store is down (not sent)", false);
            // Provably unsent: the engine has nothing to undo (`refused_requests_leave_no_background_writes`).
            let error = StoreError::Unavailable(Cause::unsent("connection refused (simulated outage)"));
            return if is_claim { Reply::Claimed(Err(error)) } else { Reply::Write(Err(error)) };
        }
        let there = self.latency(at);
        let back = self.latency(at);
        let (lost, resent) = {
            let mut rng = world.rng();
            let lost = rng.percent(world.plan.lost_reply_percent);
            (lost, rng.percent(world.plan.resend_percent))
        };
        let arrival = {
            let mut last = self.last_arrival.lock().unwrap();
            *last = (*last).max(Instant::now() + there);
            *last
        };
        let fate = format!(
            "sent, lands in {:?}{}{}",
            arrival - Instant::now(),
            if lost { ", reply lost" } else { "" },
            if resent { ", resent" } else { "" }
        );
        world.call_sent(operation, key, owner, &fate, true);
        let (reply, replied) = oneshot::channel();
        let command =
            Command { op, key: key.clone(), owner: owner.clone(), arrival, copies: 1 + u8::from(resent), reply };
        if self.server.send(command).is_err() {
            return if is_claim {
                Reply::Claimed(Err(unavailable("the server is gone")))
            } else {
                Reply::Write(Err(unavailable("the server is gone")))
            };
        }
        let answered = tokio::time::timeout(world.plan.store_timeout, async {
            let reply = replied.await;
            tokio::time::sleep(back).await;
            reply
        })
        .await;
        let reply = match answered {
            Err(_) => Err("timed out (the command may still land)"),
            Ok(Err(_)) => Err("connection reset"),
            Ok(Ok(_)) if lost => Err("reply lost (the command landed)"),
            Ok(Ok(reply)) => Ok(reply),
        };
        match reply {
            Ok(reply) => {
                let (shown, owned) = match &reply {
                    Reply::Claimed(result) => (claimed(result), matches!(result, Ok(Claimed::Owned))),
                    Reply::Write(result) => (written(result), false),
                };
                world.call_answered(operation, key, owner, &shown, owned);
                reply
            }
            Err(why) => {
                world.call_answered(operation, key, owner, why, false);
                let error = unavailable(why);
                if is_claim { Reply::Claimed(Err(error)) } else { Reply::Write(Err(error)) }
            }
        }
    }

    async fn write(&self, op: Op, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        match self.call(op, key, owner).await {
            Reply::Write(result) => result,
            Reply::Claimed(_) => unreachable!("a write is answered with a write"),
        }
    }
}

/// The server: applies commands in arrival order, frozen during hangs, refusing during outages.
async fn serve(inner: Arc<dyn Store>, world: Arc<World>, mut queue: mpsc::UnboundedReceiver<Command>) {
    while let Some(command) = queue.recv().await {
        tokio::time::sleep_until(command.arrival).await;
        // Frozen: the command waits for the server to resume (hangs may follow one another).
        while let Some(hang) = world.plan.window_at(world.elapsed(), |kind| kind == FaultKind::Hang) {
            tokio::time::sleep_until(world.start + hang.to).await;
        }
        if world.plan.window_at(world.elapsed(), |kind| kind == FaultKind::Outage).is_some() {
            world.log(format!(
                "    store drops {} {} {}: it is down",
                command.op.name(),
                world.key_name(&command.key),
                world.token_name(&command.owner)
            ));
            let error = unavailable("connection reset (simulated outage)");
            let reply = match command.op {
                Op::Claim { .. } => Reply::Claimed(Err(error)),
                _ => Reply::Write(Err(error)),
            };
            let _ = command.reply.send(reply);
            continue;
        }
        let mut reply = None;
        for _ in 0..command.copies {
            reply = Some(apply(&*inner, &world, &command).await);
        }
        let _ = command.reply.send(reply.expect("applied at least once"));
    }
}

/// Applies `command` to the store. The `MemoryStore`'s calls never wait (they are ready at the first poll), so the
/// command lands at the instant the server takes it.
async fn apply(inner: &dyn Store, world: &World, command: &Command) -> Reply {
    let Command { key, owner, .. } = command;
    let reply = match &command.op {
        Op::Claim { fingerprint, lease } => {
            let result = if world.is_corrupt(key) {
                Err(StoreError::Corrupt(Cause::new("simulated corrupt record")))
            } else {
                inner.claim(key, fingerprint, owner, *lease).await
            };
            world.applied_claim(key, owner, *lease, &result);
            Reply::Claimed(result)
        }
        Op::Complete { record, ttl } => {
            let result = inner.complete(key, owner, record, *ttl).await;
            world.applied_write("complete", key, owner, *ttl, &result);
            Reply::Write(result)
        }
        Op::Release => {
            let result = inner.release(key, owner).await;
            world.applied_write("release", key, owner, Duration::ZERO, &result);
            Reply::Write(result)
        }
        Op::Renew { fingerprint, lease } => {
            let result = inner.renew(key, owner, fingerprint, *lease).await;
            world.applied_write("renew", key, owner, *lease, &result);
            Reply::Write(result)
        }
    };
    // Exact only where the command lands at a known instant: with a real store an entry may expire in between.
    if world.exact {
        let entry: Option<Entry> = inner.inspect(key).await.ok().flatten();
        world.agrees(key, &entry);
    }
    reply
}

#[idem::store::async_trait]
impl Store for SimStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        match self.call(Op::Claim { fingerprint: *fingerprint, lease }, key, owner).await {
            Reply::Claimed(result) => result,
            Reply::Write(_) => unreachable!("a claim is answered with a claim"),
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Write, StoreError> {
        self.write(Op::Complete { record: record.clone(), ttl }, key, owner).await
    }

    async fn release(&self, key: &StoreKey, owner: &OwnerToken) -> Result<Write, StoreError> {
        self.write(Op::Release, key, owner).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Write, StoreError> {
        self.write(Op::Renew { fingerprint: *fingerprint, lease }, key, owner).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.unblocked("wait").await;
        let at = self.world.elapsed();
        if self.outage(at) {
            return Err(StoreError::Unavailable(Cause::unsent("connection refused (simulated outage)")));
        }
        // A frozen server publishes nothing: the waiter hears of nothing until its timeout.
        if self.world.plan.window_at(at, |kind| kind == FaultKind::Hang).is_some() {
            tokio::time::sleep(timeout).await;
            return Ok(());
        }
        self.inner.wait(key, timeout).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<Option<Entry>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StoreKey) -> Result<Forgotten, StoreError> {
        self.inner.forget(key).await
    }
}
