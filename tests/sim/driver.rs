//! One run: the runtime, the store, the processes, the clients, the faults, the drain, the end-of-run checks.

use super::app;
use super::plan::{Attempt, BodyShape, Cmd, FaultKind, Kind, Plan, Route, Script};
use super::rng::Rng;
use super::store::SimStore;
use super::world::{OnceReply, Reply, Req, Stats, Violation, World};
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use futures_util::FutureExt;
use idem::layer::IdempotencyLayer;
use idem::store::{Store, StoreKey};
use idem::{
    Idempotency, Policy,
    once::{Completed, OnceError},
};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;

/// How long a drain may wait: longer than any handler, lease and background write of a run.
const DRAIN_GRACE: Duration = Duration::from_secs(120);
/// How often the world checks for orphaned claims and overdue answers.
const TICK: Duration = Duration::from_millis(100);
/// Tasks a flood of refused requests may leave alive (a constant, whatever the flood's size).
const FLOOD_TASKS: usize = 8;
/// Commands the store may receive for a flood's keys once the flood was refused (a constant, not one per request).
const FLOOD_WRITES: usize = 16;

/// What a run found.
pub struct Outcome {
    pub seed: u64,
    pub violation: Option<Violation>,
    pub trace: Vec<String>,
    pub stats: Stats,
    pub plan: String,
}

impl Outcome {
    /// The failure report: the seed, the invariant, the plan and the last `lines` events.
    pub fn report(&self, lines: usize) -> String {
        let Some(violation) = &self.violation else { return format!("seed {}: every invariant held", self.seed) };
        let start = self.trace.len().saturating_sub(lines);
        format!(
            "seed {} broke `{}` at {:?}: {}\n  plan: {}\n  stats: {:?}\n  last {} of {} events:\n{}\n  replay: \
             SIM_SEED={} cargo test --test simulation seeds_hold_every_invariant -- --nocapture  (SIM_TRACE=1 prints \
             every event)",
            self.seed,
            violation.name,
            violation.at,
            violation.detail,
            self.plan,
            self.stats,
            self.trace.len() - start,
            self.trace.len(),
            self.trace[start..].iter().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n"),
            self.seed,
        )
    }
}

/// The real store a real-time run keeps its records in (the simulator's own runs use a `MemoryStore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A real `redis-server` (the tests' shared one, a key prefix per run), in real time.
    Redis,
    /// A real PostgreSQL (the tests' shared one, a table per run), in real time.
    Postgres,
}

/// Runs one seed's plan, compressed for real time, against a real store on a current-thread runtime (the real
/// clock). Not deterministic: the store's round trips and the machine's load move the schedule; the invariants are
/// the same.
pub fn run_real(seed: u64, backend: Backend) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let world = runtime.block_on(async move {
        let inner: Arc<dyn Store> = match backend {
            Backend::Redis => Arc::new(crate::redis_server::shared_node_store().await),
            Backend::Postgres => Arc::new(crate::postgres_server::shared_store().await),
        };
        // The store's own background tasks (a subscriber, a listener) start before the run counts tasks.
        let warm = StoreKey::from_digest(format!("warm-up-{seed}"));
        let _ = inner.wait(&warm, Duration::from_millis(1)).await;
        let _ = inner.ping().await;
        let mut rng = Rng::new(seed);
        let plan = Plan::generate(seed, &mut rng).for_real_store();
        let world = Arc::new(World::new(plan, rng, false));
        let (store, serving) = SimStore::over(world.clone(), inner);
        run(world, store, serving).await
    });
    drop(runtime);
    outcome(seed, &world)
}

/// Runs one seed on a fresh current-thread runtime with the paused clock.
pub fn run_seed(seed: u64) -> Outcome {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("a runtime");
    let world = runtime.block_on(async move {
        let mut rng = Rng::new(seed);
        let plan = Plan::generate(seed, &mut rng);
        let world = Arc::new(World::new(plan, rng, true));
        let (store, serving) = SimStore::memory(world.clone());
        run(world, store, serving).await
    });
    drop(runtime);
    outcome(seed, &world)
}

fn outcome(seed: u64, world: &World) -> Outcome {
    Outcome {
        seed,
        violation: world.violation(),
        trace: world.trace(),
        stats: world.stats(),
        plan: world.plan.describe(),
    }
}

/// Serves the store, drives the run until it ends or an invariant breaks.
async fn run(world: Arc<World>, store: SimStore, serving: impl Future<Output = ()> + Send + 'static) -> Arc<World> {
    tokio::spawn(serving);
    // The driver is a task too: the requests it sends itself (the probes) need a task id.
    let driver = tokio::spawn(drive(world.clone(), Arc::new(store)));
    tokio::select! {
        biased;
        () = world.violated.notified() => {}
        _ = driver => {}
    }
    world.done.store(true, Ordering::SeqCst);
    world
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

fn engine(store: Arc<SimStore>) -> Idempotency {
    Idempotency::builder(store).max_record_bytes(app::MAX_RECORD_BYTES).build()
}

/// The layer of one process, with the plan's layer policy.
fn layer(plan: &Plan, idempotency: &Idempotency) -> IdempotencyLayer {
    let policy = Policy::new()
        .required(false)
        .lease(plan.layer.lease)
        .wait_timeout(plan.layer.wait)
        .ttl(plan.layer.ttl)
        .store_server_errors(plan.layer.store_server_errors);
    idempotency.layer().policy(policy).body_limit(app::BODY_LIMIT)
}

/// The clients, then the drain, then the quiet period and the probes, then the final counts.
async fn drive(world: Arc<World>, store: Arc<SimStore>) {
    let plan = &world.plan;
    // The store's server and this driver.
    let baseline = alive_tasks();
    let engines: Vec<Idempotency> = (0..plan.processes).map(|_| engine(store.clone())).collect();
    let routers: Vec<Router> =
        engines.iter().map(|engine| app::router(world.clone(), engine, &layer(plan, engine))).collect();
    tokio::spawn(faults(world.clone(), store.clone()));
    tokio::spawn(watch(world.clone()));
    let mut clients = Vec::new();
    for script in &plan.scripts {
        let process = script.process;
        let client = client(world.clone(), routers[process].clone(), engines[process].clone(), script.clone());
        clients.push(tokio::spawn(client));
    }
    if let Some((at, count)) = plan.flood {
        clients.push(tokio::spawn(flood(world.clone(), routers[0].clone(), engines.clone(), at, count)));
    }
    tokio::time::sleep_until(world.start + plan.drain_at).await;
    world.draining.store(true, Ordering::SeqCst);
    world.log("DRAIN no new requests; waiting for the clients' requests to be answered");
    for client in clients {
        let _ = client.await;
    }
    drain(&world, &engines, "drain").await;

    // Quiet: the faults are over, and longer than any lease has passed (in real time, only as long as the engine
    // needs to free a key nobody owns: the orphan check has watched the leases meanwhile).
    let longest_lease = [plan.layer.lease, app::policies::M3_LEASE, Duration::from_secs(10)].into_iter().max().unwrap();
    let quiet = if world.exact { longest_lease } else { world.orphan_grace() };
    let quiet = (world.start + plan.faults_end()).max(Instant::now()) + quiet + Duration::from_secs(1);
    tokio::time::sleep_until(quiet).await;
    world.log("PROBE every key used, once more");
    for (route, principal, key) in world.scopes() {
        let attempt = probe_attempt();
        send(&world, &routers[0], &engines[0], route, principal, key, &attempt, true).await;
    }
    drain(&world, &engines, "final drain").await;

    world.done.store(true, Ordering::SeqCst);
    // The watcher and the fault driver see `done` within a tick.
    tokio::time::sleep(2 * TICK).await;
    world.count_check();
    let alive = alive_tasks();
    // Two long-lived tasks per engine are allowed (a shared renewal scheduler, a queue of background writes), and a
    // few for a real store's own connections.
    let allowed = baseline + 2 * engines.len() + if world.exact { 0 } else { 4 };
    if alive > allowed {
        world.fail_with(
            "tasks_left_behind",
            format!("{alive} tasks alive at the end, with nothing running; {baseline} at the start"),
        );
    }
    if plan.flood.is_some() {
        world.count_check();
        let writes = world.flood_writes();
        if writes > FLOOD_WRITES {
            world.fail_with(
                "refused_requests_leave_no_background_writes",
                format!(
                    "the store received {writes} commands for keys whose claims were refused unsent, after the fact"
                ),
            );
        }
    }
}

async fn drain(world: &World, engines: &[Idempotency], what: &str) {
    for (process, engine) in engines.iter().enumerate() {
        let started = Instant::now();
        let drained = engine.drain(DRAIN_GRACE).await;
        world.log(format!("{what} of process {process}: {drained:?} after {:?}", started.elapsed()));
        world.count_check();
        if let Err(undrained) = drained {
            world.fail_with("nothing_running_after_drain", format!("process {process}: {undrained}"));
        }
        if engine.running_handlers() != 0 {
            world.fail_with(
                "nothing_running_after_drain",
                format!("process {process}: {} handlers or writes running after a drain", engine.running_handlers()),
            );
        }
    }
    let running = world.running_executions();
    if !running.is_empty() {
        world
            .fail_with("nothing_running_after_drain", format!("executions {running:?} still running after the {what}"));
    }
}

fn probe_attempt() -> Attempt {
    Attempt {
        cmd: Cmd { kind: Kind::Quick, ms: 0, status: 201, salt: 0, check: false, pad: String::new() },
        shape: BodyShape::Json,
        cancel_after: None,
        copies: 1,
        then_wait: Duration::ZERO,
        once_lease: Duration::from_secs(3),
        once_wait: Duration::ZERO,
    }
}

/// A client: its attempts in turn (each sent `copies` times at once), pausing between them.
async fn client(world: Arc<World>, router: Router, engine: Idempotency, script: Script) {
    tokio::time::sleep_until(world.start + script.at).await;
    for attempt in &script.attempts {
        if world.draining.load(Ordering::SeqCst) {
            return;
        }
        let mut copies = Vec::new();
        for _ in 0..attempt.copies {
            let (world, router, engine, attempt) = (world.clone(), router.clone(), engine.clone(), attempt.clone());
            let (route, principal, key) = (script.route, script.principal, script.key);
            copies.push(tokio::spawn(async move {
                send(&world, &router, &engine, route, principal, key, &attempt, false).await;
            }));
        }
        for copy in copies {
            let _ = copy.await;
        }
        tokio::time::sleep(attempt.then_wait).await;
    }
}

/// During an outage, `count` requests with fresh keys, all refused: they must leave no task and no write behind.
async fn flood(world: Arc<World>, router: Router, engines: Vec<Idempotency>, at: Duration, count: usize) {
    tokio::time::sleep_until(world.start + at).await;
    if world.draining.load(Ordering::SeqCst) {
        return;
    }
    let tasks_before = alive_tasks();
    let running_before: usize = engines.iter().map(Idempotency::running_handlers).sum();
    world.log(format!("FLOOD {count} requests with fresh keys while the store is down"));
    world.set_flooding(true);
    let attempt = probe_attempt();
    for index in 0..count {
        let route = [Route::L1, Route::M2, Route::Once][index % 3];
        send(&world, &router, &engines[0], route, Some(0), Some(1000 + index as u16), &attempt, false).await;
    }
    world.set_flooding(false);
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    let grown = alive_tasks().saturating_sub(tasks_before);
    let running_grown = engines.iter().map(Idempotency::running_handlers).sum::<usize>().saturating_sub(running_before);
    world.log(format!("FLOOD answered: {grown} more tasks alive, {running_grown} more background writes counted"));
    world.count_check();
    if grown > FLOOD_TASKS || running_grown > FLOOD_TASKS {
        world.fail_with(
            "refused_requests_leave_no_tasks",
            format!(
                "{count} requests refused during an outage left {grown} more tasks alive and {running_grown} more \
                 background writes for drain to wait on"
            ),
        );
    }
}

/// Resolves to `None` when the client gives up at `cancel_at` (its future is dropped), unless the client's own
/// thread is blocked then (a blocked thread cannot cancel anything: the give-up waits for the block's end).
async fn cancellable<F: Future>(world: &World, cancel_at: Option<Instant>, future: F) -> Option<F::Output> {
    let Some(mut deadline) = cancel_at else { return Some(future.await) };
    let mut future = std::pin::pin!(future);
    loop {
        tokio::select! {
            biased;
            output = &mut future => return Some(output),
            () = tokio::time::sleep_until(deadline) => match world.blocked_until() {
                Some(until) => deadline = until,
                None => return None,
            },
        }
    }
}

/// The bound on one request's answer: the route's wait, the handler's own time, a lease (a renewal in flight is
/// waited for, bounded by a third of it; the handoff's renewal through the keeper), and a handful of store calls
/// each bounded by the store timeout.
fn bound(plan: &Plan, route: Route, attempt: &Attempt) -> Duration {
    let lease = if route == Route::Once { attempt.once_lease } else { plan.route_lease(route) };
    plan.route_wait(route, attempt) + attempt.cmd.own_time() + lease + 8 * plan.store_timeout + Duration::from_secs(2)
}

#[allow(clippy::too_many_arguments)]
async fn send(
    world: &Arc<World>,
    router: &Router,
    engine: &Idempotency,
    route: Route,
    principal: Option<u8>,
    key: Option<u16>,
    attempt: &Attempt,
    probe: bool,
) {
    let task = tokio::task::id();
    let shape = if route == Route::Once { BodyShape::Json } else { attempt.shape };
    let req = Req {
        id: 0,
        route,
        principal,
        key,
        cmd: attempt.cmd.clone(),
        shape,
        sent: Instant::now(),
        bound: bound(&world.plan, route, attempt),
        lease: if route == Route::Once { attempt.once_lease } else { world.plan.route_lease(route) },
        store_key: None,
        cancelled_at: None,
        done: false,
        probe,
    };
    let id = world.request(Req { store_key: store_key(engine, route, principal, key), ..req }, task);
    let cancel_at = attempt.cancel_after.map(|after| Instant::now() + after);
    if route == Route::Once {
        let call = once_call(world, engine, principal, key, attempt, id);
        match cancellable(world, cancel_at, AssertUnwindSafe(call).catch_unwind()).await {
            None => world.cancelled(id),
            Some(Err(_)) => world.once_answered(id, OnceReply::Panicked),
            Some(Ok(reply)) => world.once_answered(id, reply),
        }
    } else {
        let request = http_request(route, principal, key, id, &attempt.cmd, shape);
        let exchange = async {
            let response = router.clone().oneshot(request).await.expect("the router is infallible");
            read_reply(response).await
        };
        match cancellable(world, cancel_at, exchange).await {
            None => world.cancelled(id),
            Some(reply) => world.answered(id, reply),
        }
    }
    world.attempt_over(task, id);
}

/// Where the engine keeps the request's key: the scope (method, path and principal, or the once door's scope) and
/// the key, as `http_request` and `once_call` send them.
fn store_key(engine: &Idempotency, route: Route, principal: Option<u8>, key: Option<u16>) -> Option<StoreKey> {
    if route == Route::Once {
        let (scope, key) = once_names(principal, key);
        return Some(engine.once_store_key(&scope, &key));
    }
    let principal = principal.map_or(String::new(), |principal| format!("Bearer p{principal}"));
    Some(engine.http_store_key(&Method::POST, route.path(), principal.as_bytes(), &format!("key-{}", key?)))
}

/// The once door's scope (its principal) and key.
fn once_names(principal: Option<u8>, key: Option<u16>) -> (String, String) {
    let scope = format!("p{}", principal.map_or("-".to_owned(), |principal| principal.to_string()));
    (scope, format!("key-{}", key.map_or("-".to_owned(), |key| key.to_string())))
}

fn http_request(
    route: Route,
    principal: Option<u8>,
    key: Option<u16>,
    id: usize,
    cmd: &Cmd,
    shape: BodyShape,
) -> Request<Body> {
    let mut builder = Request::builder().method(Method::POST).uri(route.path()).header("x-sim-req", id);
    if shape != BodyShape::NoContentType {
        builder = builder.header("content-type", "application/json");
    }
    if let Some(principal) = principal {
        builder = builder.header("authorization", format!("Bearer p{principal}"));
    }
    if let Some(key) = key {
        builder = builder.header("idempotency-key", format!("key-{key}"));
    }
    let body = match shape {
        BodyShape::Json | BodyShape::NoContentType => serde_json::to_vec(cmd).unwrap(),
        BodyShape::Malformed => b"{\"kind\": not json".to_vec(),
        BodyShape::Oversize => {
            let padded = Cmd { pad: "p".repeat(app::BODY_LIMIT + 512), ..cmd.clone() };
            serde_json::to_vec(&padded).unwrap()
        }
    };
    builder.body(Body::from(body)).unwrap()
}

async fn read_reply(response: axum::response::Response) -> Reply {
    let (parts, body) = response.into_parts();
    let text = |name: &str| parts.headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let idempotency_status = text("x-idempotency-status");
    let exec = text("x-exec").and_then(|exec| exec.parse().ok());
    let is_problem = text("content-type").as_deref() == Some("application/problem+json");
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let problem = is_problem
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|problem| problem["type"].as_str().and_then(|kind| kind.rsplit('#').next()).map(str::to_owned));
    Reply { status: parts.status.as_u16(), idempotency_status, exec, problem, body }
}

async fn once_call(
    world: &Arc<World>,
    engine: &Idempotency,
    principal: Option<u8>,
    key: Option<u16>,
    attempt: &Attempt,
    id: usize,
) -> OnceReply {
    let (scope, key) = once_names(principal, key);
    let policy = Policy::new().lease(attempt.once_lease).wait_timeout(attempt.once_wait).ttl(Duration::from_secs(600));
    let cmd = attempt.cmd.clone();
    let work = || app::once_work(world.clone(), id, cmd.clone());
    match engine.once(&scope, &key).policy(policy).run_or_replay(&attempt.cmd, work).await {
        Ok(Completed::Fresh(value)) => OnceReply::Fresh(serde_json::to_vec(&value).unwrap().into()),
        Ok(Completed::Replayed(value)) => OnceReply::Replayed(serde_json::to_vec(&value).unwrap().into()),
        Err(OnceError::InFlight) => OnceReply::InFlight,
        Err(OnceError::Mismatch) => OnceReply::Mismatch,
        Err(OnceError::NotReplayable) => OnceReply::NotReplayable,
        Err(OnceError::Store(error)) => OnceReply::Store(error.to_string()),
        Err(OnceError::Work(_)) => OnceReply::Work,
        Err(OnceError::Decode(error)) => OnceReply::Decode(error.to_string()),
        Err(other) => OnceReply::Store(other.to_string()),
    }
}

/// The store's clock jumps and records turning corrupt, at the plan's times; the fault windows, in the trace.
async fn faults(world: Arc<World>, store: Arc<SimStore>) {
    enum Event {
        Early,
        Corrupt(Duration),
        Note(String),
    }
    let plan = &world.plan;
    let mut events: Vec<(Duration, Event)> = Vec::new();
    events.extend(plan.early_expiries.iter().map(|at| (*at, Event::Early)));
    events.extend(plan.corruptions.iter().map(|(at, length)| (*at, Event::Corrupt(*length))));
    for window in &plan.windows {
        let what = match window.kind {
            FaultKind::Outage => "outage".to_owned(),
            FaultKind::Hang => "hang".to_owned(),
            FaultKind::Slow(most) => format!("slow period (up to {most:?} each way)"),
        };
        events.push((window.from, Event::Note(format!("FAULT {what} starts"))));
        events.push((window.to, Event::Note(format!("FAULT {what} ends"))));
    }
    events.sort_by_key(|(at, _)| *at);
    for (at, event) in events {
        tokio::time::sleep_until(world.start + at).await;
        if world.done.load(Ordering::SeqCst) {
            return;
        }
        match event {
            Event::Early => {
                if let Some((key, owner)) = world.pick_early_expiry() {
                    store.expire_early(&key, &owner).await;
                }
            }
            Event::Corrupt(length) => world.corrupt_one(Instant::now() + length),
            Event::Note(text) => world.log(text),
        }
    }
}

/// Checks for orphaned claims and overdue answers every tick, until the run is done.
async fn watch(world: Arc<World>) {
    let give_up = world.start + world.plan.drain_at + Duration::from_secs(900);
    loop {
        tokio::time::sleep(TICK).await;
        if world.done.load(Ordering::SeqCst) {
            return;
        }
        world.check_orphans();
        world.check_overdue();
        if Instant::now() > give_up {
            world.fail_with("run_ends", "the run did not end within 15 minutes of its drain".to_owned());
            return;
        }
    }
}
