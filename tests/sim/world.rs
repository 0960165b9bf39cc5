//! What the simulator knows of a run, and the invariants it checks against it after every step.
//!
//! The world keeps a shadow of the store (who holds each key, until when: it sees every command the store applies),
//! every request and every execution of a handler body, and the trace. Owner tokens, store keys and task ids are
//! random or process-wide; the trace names them by their order of first appearance (`o3`, `k1`, `t12`), so two runs
//! of one seed print the same trace.

use super::plan::{BodyShape, Cmd, Kind, Plan, Route};
use super::rng::Rng;
use bytes::Bytes;
use idem::store::{Claimed, Entry, OwnerToken, StoreError, StoreKey, Stored, Write};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::task::Id as TaskId;
use tokio::time::Instant;

/// How long the engine may take to free a key nobody owns once the store answers again: its background writes
/// retry at least once a second (`WRITE_RETRY_LAST`), and each call may take the store timeout twice (a claim
/// finished detached, then its release).
const ORPHAN_SLACK: Duration = Duration::from_millis(1500);

/// Every invariant the world checks, by the name a failure prints.
pub const INVARIANTS: [&str; 19] = [
    "overlapping_executions",
    "ran_without_its_claim",
    "stale_owner_fenced",
    "replay_is_byte_for_byte",
    "replayed_only_to_its_principal",
    "replayed_only_for_its_request",
    "replayed_only_what_was_stored",
    "fresh_answer_is_its_own",
    "mismatch_only_for_another_request",
    "not_replayable_only_when_unstorable",
    "answered_within_bound",
    "orphaned_claim",
    "claimable_after_quiet",
    "nothing_running_after_drain",
    "tasks_left_behind",
    "refused_requests_leave_no_tasks",
    "refused_requests_leave_no_background_writes",
    "simulator_shadow_agrees_with_store",
    "run_ends",
];

/// An invariant that failed.
#[derive(Debug, Clone)]
pub struct Violation {
    pub name: &'static str,
    pub detail: String,
    /// Virtual time since the run started.
    pub at: Duration,
}

pub struct World {
    pub plan: Plan,
    pub start: Instant,
    rng: Mutex<Rng>,
    state: Mutex<State>,
    /// Woken at the first violation: the run stops there.
    pub violated: tokio::sync::Notify,
    /// New requests have stopped.
    pub draining: AtomicBool,
    /// The run is over: the watcher and the fault driver stop.
    pub done: AtomicBool,
    /// The store is the `MemoryStore` on the paused clock: commands land at known instants, and the shadow can be
    /// checked against the store after each.
    pub exact: bool,
}

/// A request sent by a client (one copy of an attempt).
#[derive(Debug, Clone)]
pub struct Req {
    pub id: usize,
    pub route: Route,
    pub principal: Option<u8>,
    pub key: Option<u16>,
    pub cmd: Cmd,
    pub shape: BodyShape,
    pub sent: Instant,
    pub bound: Duration,
    /// The lease its claim starts with.
    pub lease: Duration,
    /// Where the engine keeps its key (none without a key).
    pub store_key: Option<StoreKey>,
    pub cancelled_at: Option<Instant>,
    pub done: bool,
    pub probe: bool,
}

impl Req {
    /// Whether `other` is the same request as far as the fingerprint goes (method and path are the route's).
    fn same_request(&self, other: &Req) -> bool {
        self.route == other.route && self.cmd == other.cmd && self.shape == other.shape
    }

    fn same_scope(&self, other: &Req) -> bool {
        self.route == other.route && self.principal == other.principal && self.key == other.key
    }
}

/// One run of a handler body.
#[derive(Debug, Clone)]
pub struct Exec {
    pub id: usize,
    pub req: usize,
    pub token: Option<usize>,
    pub key: Option<StoreKey>,
    pub start: Instant,
    pub end: Option<Instant>,
    pub answer: Option<(u16, Bytes)>,
    pub task: Option<TaskId>,
    /// It adopted the layer's claim.
    pub handoff: bool,
}

/// What the shadow knows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    InFlight { token: usize, expires: Instant },
    Completed { token: usize, expires: Instant },
}

impl Held {
    fn expires(&self) -> Instant {
        match self {
            Held::InFlight { expires, .. } | Held::Completed { expires, .. } => *expires,
        }
    }
}

/// A token's last grant of its key: when, for how long, and whether the store dropped it early.
#[derive(Debug, Clone)]
struct Grant {
    key: StoreKey,
    at: Instant,
    lease: Duration,
    early: bool,
    /// The lease the key was claimed with (a handoff renews it with the annotation's).
    claimed_for: Duration,
}

#[derive(Default)]
struct State {
    trace: Vec<(Duration, String)>,
    violation: Option<Violation>,
    tokens: BTreeMap<String, usize>,
    token_objects: Vec<OwnerToken>,
    keys: BTreeMap<StoreKey, usize>,
    tasks: BTreeMap<TaskId, usize>,
    shadow: BTreeMap<StoreKey, Held>,
    grants: BTreeMap<usize, Grant>,
    /// The attempt (task, request) that sent each token's claim.
    claimers: BTreeMap<usize, (TaskId, usize)>,
    /// Attempts whose future is still alive: task → request.
    live: BTreeMap<TaskId, usize>,
    /// The last claim each task sent: its key and token.
    sent_claims: BTreeMap<TaskId, (StoreKey, usize)>,
    /// When each token's claim was first sent.
    claim_sent_at: BTreeMap<usize, Instant>,
    /// The last token whose claim of each key was answered `owned` (to whichever task sent it).
    last_answered_owned: BTreeMap<StoreKey, usize>,
    /// Tokens whose completion landed.
    completed: BTreeSet<usize>,
    blocks: BTreeMap<TaskId, Instant>,
    corrupt: BTreeMap<StoreKey, Instant>,
    /// Keys held in flight by nobody: by which token, since when.
    orphans: BTreeMap<StoreKey, (usize, Instant)>,
    reqs: Vec<Req>,
    execs: Vec<Exec>,
    flooding: bool,
    flood_keys: BTreeSet<StoreKey>,
    /// Commands on flood keys that reached the store after the flood was answered.
    flood_writes: usize,
    pub stats: Stats,
}

/// What a run exercised: witnesses that a seed covers the scenario a regression case is about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub requests: usize,
    pub executions: usize,
    pub replays: usize,
    pub conflicts: usize,
    pub cancelled: usize,
    pub store_calls: usize,
    pub blocks: usize,
    pub excused_overlaps: usize,
    pub early_expiries: usize,
    pub flood_requests: usize,
    /// Executions of annotated handlers that adopted the layer's claim.
    pub handoffs: usize,
    /// Claims sent for a key while an execution holding it was blocked past its lease.
    pub contested_blocks: usize,
    /// Claims sent for a key while an execution that adopted the layer's claim had outlived the layer's lease.
    pub contested_handoffs: usize,
    /// Once calls cancelled while their work ran and the store was down.
    pub work_dropped_while_down: usize,
    /// Claims that landed after a request for their key was cancelled (sent before it was).
    pub claims_after_cancel: usize,
    pub checks: usize,
}

/// A handler's answer as the client read it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub idempotency_status: Option<String>,
    pub exec: Option<usize>,
    pub problem: Option<String>,
    pub body: Bytes,
}

/// What the once door answered.
#[derive(Debug)]
pub enum OnceReply {
    Fresh(Bytes),
    Replayed(Bytes),
    InFlight,
    Mismatch,
    NotReplayable,
    Store(String),
    Work,
    Decode(String),
    Panicked,
}

impl World {
    pub fn new(plan: Plan, rng: Rng, exact: bool) -> Self {
        Self {
            plan,
            start: Instant::now(),
            rng: Mutex::new(rng),
            state: Mutex::new(State::default()),
            violated: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            done: AtomicBool::new(false),
            exact,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn rng(&self) -> MutexGuard<'_, Rng> {
        self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn elapsed(&self) -> Duration {
        Instant::now() - self.start
    }

    pub fn log(&self, text: impl Into<String>) {
        let at = self.elapsed();
        self.lock().note((at, text.into()));
    }

    pub fn violation(&self) -> Option<Violation> {
        self.lock().violation.clone()
    }

    pub fn trace(&self) -> Vec<String> {
        self.lock().trace.iter().map(|(at, text)| format!("{:>9.3}s {text}", at.as_secs_f64())).collect()
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    fn fail(&self, state: &mut State, name: &'static str, detail: String) {
        assert!(INVARIANTS.contains(&name), "`{name}` is missing from INVARIANTS");
        if state.violation.is_some() {
            return;
        }
        let at = Instant::now() - self.start;
        state.note((at, format!("VIOLATION {name}: {detail}")));
        state.violation = Some(Violation { name, detail, at });
        self.violated.notify_one();
    }

    /// Fails the run from outside the model (the driver's end-of-run checks).
    pub fn fail_with(&self, name: &'static str, detail: String) {
        let mut state = self.lock();
        self.fail(&mut state, name, detail);
    }

    pub fn count_check(&self) {
        self.lock().stats.checks += 1;
    }

    // --- names ---------------------------------------------------------------------------------------------------

    pub fn token_name(&self, token: &OwnerToken) -> String {
        format!("o{}", self.lock().token(token))
    }

    pub fn key_name(&self, key: &StoreKey) -> String {
        format!("k{}", self.lock().key(key))
    }

    pub fn task_name(&self, task: Option<TaskId>) -> String {
        match task {
            Some(task) => format!("t{}", self.lock().task(task)),
            None => "t-".to_owned(),
        }
    }

    // --- blocked threads -----------------------------------------------------------------------------------------

    /// The current task blocks its thread until `until`: nothing driven on it can reach the store meanwhile.
    pub fn block(&self, until: Instant) {
        if let Some(task) = tokio::task::try_id() {
            let mut state = self.lock();
            state.stats.blocks += 1;
            state.blocks.insert(task, until);
        }
    }

    pub fn unblock(&self) {
        if let Some(task) = tokio::task::try_id() {
            self.lock().blocks.remove(&task);
        }
    }

    /// Until when the current task's thread is blocked, if it is.
    pub fn blocked_until(&self) -> Option<Instant> {
        let task = tokio::task::try_id()?;
        let now = Instant::now();
        self.lock().blocks.get(&task).copied().filter(|until| *until > now)
    }

    // --- requests ------------------------------------------------------------------------------------------------

    pub fn request(&self, req: Req, task: TaskId) -> usize {
        let mut state = self.lock();
        let id = state.reqs.len();
        let task_name = state.task(task);
        let at = Instant::now() - self.start;
        state.note((
            at,
            format!(
                "req{id} t{task_name} {} p{} key{} {} {:?}{}",
                req.route.path(),
                req.principal.map_or("-".to_owned(), |p| p.to_string()),
                req.key.map_or("-".to_owned(), |k| k.to_string()),
                req.cmd.describe(),
                req.shape,
                if req.probe { " (probe)" } else { "" }
            ),
        ));
        state.reqs.push(Req { id, ..req });
        state.live.insert(task, id);
        state.stats.requests += 1;
        if state.flooding {
            state.stats.flood_requests += 1;
        }
        id
    }

    /// The attempt's future ended (answered, cancelled or panicked).
    pub fn attempt_over(&self, task: TaskId, req: usize) {
        let mut state = self.lock();
        if state.live.get(&task) == Some(&req) {
            state.live.remove(&task);
        }
        state.reqs[req].done = true;
    }

    pub fn cancelled(&self, req: usize) {
        let mut state = self.lock();
        let now = Instant::now();
        state.stats.cancelled += 1;
        state.reqs[req].cancelled_at = Some(now);
        // The once door's work is dropped with its caller: its claim must still be released.
        let work_dropped =
            state.execs.iter().any(|exec| exec.req == req && exec.end == Some(now) && exec.answer.is_none());
        let down = self.plan.window_at(now - self.start, |kind| kind == super::plan::FaultKind::Outage).is_some();
        if work_dropped && down {
            state.stats.work_dropped_while_down += 1;
        }
        let at = Instant::now() - self.start;
        state.note((at, format!("req{req} cancelled by its client")));
    }

    /// Every (route, principal, key) that a request used: what the end-of-run probes ask again.
    pub fn scopes(&self) -> Vec<(Route, Option<u8>, Option<u16>)> {
        let state = self.lock();
        let scopes: BTreeSet<_> =
            state.reqs.iter().filter(|req| req.key.is_some()).map(|req| (req.route, req.principal, req.key)).collect();
        scopes.into_iter().collect()
    }

    pub fn running_executions(&self) -> Vec<usize> {
        self.lock().execs.iter().filter(|exec| exec.end.is_none()).map(|exec| exec.id).collect()
    }

    pub fn set_flooding(&self, flooding: bool) {
        self.lock().flooding = flooding;
    }

    pub fn flood_writes(&self) -> usize {
        self.lock().flood_writes
    }

    // --- the client's view ---------------------------------------------------------------------------------------

    /// Checks an HTTP answer: a replay is the stored answer of an execution of the same request for the same
    /// principal, byte for byte; a `new` answer is this request's own execution; answers come within their bound.
    pub fn answered(&self, req: usize, reply: Reply) {
        let mut state = self.lock();
        let now = Instant::now();
        let this = state.reqs[req].clone();
        state.stats.checks += 1;
        let at = now - self.start;
        state.note((
            at,
            format!(
                "req{req} answered {} {}{}{}",
                reply.status,
                reply.idempotency_status.as_deref().unwrap_or("-"),
                reply.exec.map_or(String::new(), |exec| format!(" exec{exec}")),
                reply.problem.as_deref().map_or(String::new(), |problem| format!(" ({problem})")),
            ),
        ));
        self.check_bound(&mut state, &this, now);
        match reply.idempotency_status.as_deref() {
            Some("hit") => {
                state.stats.replays += 1;
                match reply.exec {
                    Some(exec) => self.check_replay(&mut state, &this, exec, reply.status, &reply.body),
                    // A route that stores server errors stores a panic's problem too.
                    None if reply.problem.as_deref() == Some("handler-panicked") => {
                        let panicked = state.execs.iter().any(|exec| {
                            exec.answer.is_none() && exec.end.is_some() && {
                                let original = &state.reqs[exec.req];
                                original.same_scope(&this) && original.same_request(&this)
                            }
                        });
                        if !panicked {
                            self.fail(
                                &mut state,
                                "replay_is_byte_for_byte",
                                format!("req{req}: replayed a panic, but no execution of this request panicked"),
                            );
                        }
                    }
                    None => self.fail(
                        &mut state,
                        "replay_is_byte_for_byte",
                        format!("req{req}: a replay without the handler's own x-exec header"),
                    ),
                }
            }
            Some("new") => {
                if let Some(exec) = reply.exec {
                    self.check_fresh(&mut state, &this, exec, reply.status, &reply.body);
                }
            }
            _ => {}
        }
        match reply.problem.as_deref() {
            Some("key-reused") => self.check_mismatch(&mut state, &this),
            Some("not-replayable") => self.check_not_replayable(&mut state, &this),
            Some("in-progress") => {
                state.stats.conflicts += 1;
                if this.probe {
                    self.fail(
                        &mut state,
                        "claimable_after_quiet",
                        format!(
                            "req{req}: {} p{:?} key{:?} still answers 409 in-progress after the drain and a quiet \
                             period longer than any lease, with nothing running",
                            this.route.path(),
                            this.principal,
                            this.key
                        ),
                    );
                }
            }
            _ => {}
        }
    }

    pub fn once_answered(&self, req: usize, reply: OnceReply) {
        let mut state = self.lock();
        let now = Instant::now();
        let this = state.reqs[req].clone();
        state.stats.checks += 1;
        let at = now - self.start;
        let shown = match &reply {
            OnceReply::Fresh(body) => format!("fresh exec{}", exec_of(body).map_or("?".to_owned(), |e| e.to_string())),
            OnceReply::Replayed(body) => {
                format!("replayed exec{}", exec_of(body).map_or("?".to_owned(), |e| e.to_string()))
            }
            OnceReply::Store(error) => format!("store error: {error}"),
            other => format!("{other:?}"),
        };
        state.note((at, format!("req{req} once answered {shown}")));
        if !matches!(reply, OnceReply::Panicked) {
            self.check_bound(&mut state, &this, now);
        }
        match reply {
            OnceReply::Fresh(body) => match exec_of(&body) {
                Some(exec) => self.check_fresh(&mut state, &this, exec, 200, &body),
                None => self.fail(&mut state, "fresh_answer_is_its_own", format!("req{req}: {body:?}")),
            },
            OnceReply::Replayed(body) => {
                state.stats.replays += 1;
                match exec_of(&body) {
                    Some(exec) => self.check_replay(&mut state, &this, exec, 200, &body),
                    None => self.fail(&mut state, "replay_is_byte_for_byte", format!("req{req}: {body:?}")),
                }
            }
            OnceReply::InFlight => {
                state.stats.conflicts += 1;
                if this.probe {
                    self.fail(
                        &mut state,
                        "claimable_after_quiet",
                        format!(
                            "req{req}: once {:?}/{:?} still in flight after the quiet period",
                            this.principal, this.key
                        ),
                    );
                }
            }
            OnceReply::Mismatch => self.check_mismatch(&mut state, &this),
            OnceReply::NotReplayable => self.check_not_replayable(&mut state, &this),
            OnceReply::Decode(error) => self.fail(
                &mut state,
                "replay_is_byte_for_byte",
                format!("req{req}: the stored result does not decode: {error}"),
            ),
            OnceReply::Store(_) | OnceReply::Work | OnceReply::Panicked => {}
        }
    }

    fn check_bound(&self, state: &mut State, this: &Req, now: Instant) {
        let took = now - this.sent;
        if took > this.bound {
            self.fail(
                state,
                "answered_within_bound",
                format!("req{} took {:?}, over its bound of {:?}", this.id, took, this.bound),
            );
        }
    }

    fn check_fresh(&self, state: &mut State, this: &Req, exec: usize, status: u16, body: &Bytes) {
        let Some(ran) = state.execs.get(exec).cloned() else {
            return self.fail(state, "fresh_answer_is_its_own", format!("req{}: unknown exec{exec}", this.id));
        };
        if ran.req != this.id {
            return self.fail(
                state,
                "fresh_answer_is_its_own",
                format!("req{} answered `new` with exec{exec}, which ran for req{}", this.id, ran.req),
            );
        }
        if let Some((ran_status, ran_body)) = &ran.answer
            && this.route != Route::Once
            && (*ran_status != status || ran_body != body)
            && this.cmd.kind != Kind::Stream
        {
            self.fail(
                state,
                "fresh_answer_is_its_own",
                format!("req{}: the answer sent differs from what exec{exec} answered", this.id),
            );
        }
    }

    fn check_replay(&self, state: &mut State, this: &Req, exec: usize, status: u16, body: &Bytes) {
        let Some(ran) = state.execs.get(exec).cloned() else {
            return self.fail(state, "replay_is_byte_for_byte", format!("req{}: unknown exec{exec}", this.id));
        };
        let original = state.reqs[ran.req].clone();
        if original.principal != this.principal {
            return self.fail(
                state,
                "replayed_only_to_its_principal",
                format!(
                    "req{} (principal {:?}) got exec{exec}'s answer, which ran for req{} of principal {:?}",
                    this.id, this.principal, original.id, original.principal
                ),
            );
        }
        if !original.same_scope(this) || !original.same_request(this) {
            return self.fail(
                state,
                "replayed_only_for_its_request",
                format!(
                    "req{} ({} key{:?} {}) got exec{exec}'s answer, which ran for req{} ({} key{:?} {})",
                    this.id,
                    this.route.path(),
                    this.key,
                    this.cmd.describe(),
                    original.id,
                    original.route.path(),
                    original.key,
                    original.cmd.describe()
                ),
            );
        }
        match &ran.answer {
            Some((ran_status, ran_body)) if *ran_status == status && ran_body == body => {}
            answer => {
                return self.fail(
                    state,
                    "replay_is_byte_for_byte",
                    format!("req{} replayed {status} {body:?}; exec{exec} answered {answer:?}", this.id),
                );
            }
        }
        if !ran.token.is_some_and(|token| state.completed.contains(&token)) {
            self.fail(
                state,
                "replayed_only_what_was_stored",
                format!("req{} replayed exec{exec}, whose completion never landed", this.id),
            );
        }
    }

    fn check_mismatch(&self, state: &mut State, this: &Req) {
        let differs = state.reqs.iter().any(|other| other.same_scope(this) && !other.same_request(this));
        if !differs {
            self.fail(
                state,
                "mismatch_only_for_another_request",
                format!("req{} refused as key-reused, but no other request used its key", this.id),
            );
        }
    }

    fn check_not_replayable(&self, state: &mut State, this: &Req) {
        let unstorable = self.plan.max_bytes < 1 << 20
            || state
                .reqs
                .iter()
                .any(|other| other.same_scope(this) && matches!(other.cmd.kind, Kind::Big | Kind::Stream));
        if !unstorable {
            self.fail(
                state,
                "not_replayable_only_when_unstorable",
                format!("req{} answered not-replayable, but no answer for its key was too large", this.id),
            );
        }
    }

    // --- executions ----------------------------------------------------------------------------------------------

    /// A handler body starts: for `req`, holding `token` (the once door's work finds its token by its task).
    /// Checks that the execution holds its key, and that no other execution of the key is still running, unless
    /// the store took that one's lease away.
    pub fn exec_start(&self, req: usize, token: Option<&OwnerToken>) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        let task = tokio::task::try_id();
        // The once door's work has no fence: its token is the one its task last claimed its key with, or (a claim
        // sent from a task of the engine's own) the last one whose claim of its key was answered `owned`.
        let token = match token {
            Some(token) => Some(state.token(token)),
            None => {
                let key = state.reqs[req].store_key.clone();
                let own =
                    task.and_then(|task| state.sent_claims.get(&task)).filter(|(sent, _)| Some(sent) == key.as_ref());
                own.map(|(_, token)| *token)
                    .or_else(|| key.and_then(|key| state.last_answered_owned.get(&key).copied()))
            }
        };
        let key = token.and_then(|token| state.grants.get(&token).map(|grant| grant.key.clone()));
        let id = state.execs.len();
        let handoff = state.reqs[req].route.is_handoff()
            && token
                .and_then(|token| state.grants.get(&token))
                .is_some_and(|grant| grant.claimed_for == self.plan.layer.lease)
            && self.plan.layer.lease != super::app::policies::H_LEASE;
        state.execs.push(Exec { id, req, token, key: key.clone(), start: now, end: None, answer: None, task, handoff });
        if handoff {
            state.stats.handoffs += 1;
        }
        state.stats.executions += 1;
        let at = now - self.start;
        let key_name = key.as_ref().map_or("-".to_owned(), |key| format!("k{}", state.key(key)));
        let task_name = task.map_or("-".to_owned(), |task| format!("t{}", state.task(task)));
        state.note((
            at,
            format!(
                "exec{id} starts for req{req} on {task_name}, {key_name} o{}",
                token.map_or("-".to_owned(), |t| t.to_string())
            ),
        ));
        let (Some(token), Some(key)) = (token, key) else { return id };
        state.stats.checks += 1;

        let held = state.held(&key, now);
        let holds = matches!(held, Some(Held::InFlight { token: holder, .. }) if holder == token);
        if !holds && !self.excused(&state, token, now) {
            self.fail(
                &mut state,
                "ran_without_its_claim",
                format!("exec{id} (req{req}) started holding o{token}, but the store holds {held:?} for k{key_name}"),
            );
        }
        let others: Vec<Exec> = state
            .execs
            .iter()
            .filter(|other| {
                other.id != id && other.end.is_none() && other.key.as_ref() == Some(&key) && other.token != Some(token)
            })
            .cloned()
            .collect();
        for other in others {
            let Some(other_token) = other.token else { continue };
            if self.excused(&state, other_token, now) {
                state.stats.excused_overlaps += 1;
                let at = now - self.start;
                state
                    .trace
                    .push((at, format!("  exec{} overlaps exec{id}: excused, the store lost its lease", other.id)));
                continue;
            }
            let grant = state.grants.get(&other_token).cloned();
            self.fail(
                &mut state,
                "overlapping_executions",
                format!(
                    "exec{id} (req{req}, o{token}) started while exec{} (req{}, o{other_token}) of the same key \
                     {key_name} was still running; o{other_token}'s last grant: {}, with the store healthy all along",
                    other.id,
                    other.req,
                    grant.map_or("none".to_owned(), |grant| format!(
                        "at {:?} for {:?}",
                        grant.at - self.start,
                        grant.lease
                    ))
                ),
            );
            return id;
        }
        id
    }

    /// Whether `token` lost its key through no fault of the engine: the store dropped it early, or could not be
    /// reached (or lagged) while its lease was to be renewed.
    fn excused(&self, state: &State, token: usize, now: Instant) -> bool {
        let Some(grant) = state.grants.get(&token) else { return false };
        if grant.early {
            return true;
        }
        let lapse = (grant.at + grant.lease).min(now);
        self.plan.degraded_between(grant.at - self.start, lapse - self.start)
    }

    pub fn exec_end(&self, exec: usize, answer: Option<(u16, Bytes)>) {
        let mut state = self.lock();
        let now = Instant::now();
        if state.execs[exec].end.is_some() {
            return;
        }
        state.execs[exec].end = Some(now);
        let at = now - self.start;
        let shown =
            answer.as_ref().map_or("no answer (panicked or dropped)".to_owned(), |(status, _)| status.to_string());
        state.note((at, format!("exec{exec} ends: {shown}")));
        state.execs[exec].answer = answer;
    }

    // --- the store's view ----------------------------------------------------------------------------------------

    /// A call left the caller (or could not: `sent` false). Returns the names of its key and owner for the trace.
    pub fn call_sent(&self, operation: &str, key: &StoreKey, owner: &OwnerToken, fate: &str, sent: bool) {
        let mut state = self.lock();
        let task = tokio::task::try_id();
        let token = state.token(owner);
        let key_name = state.key(key);
        state.stats.store_calls += 1;
        if operation == "claim" && sent {
            let now = Instant::now();
            let (mut blocks, mut handoffs) = (0, 0);
            for exec in state.execs.iter().filter(|exec| exec.end.is_none() && exec.key.as_ref() == Some(key)) {
                let blocked = exec.task.and_then(|task| state.blocks.get(&task)).is_some_and(|until| *until > now);
                if blocked && now > exec.start + state.reqs[exec.req].lease {
                    blocks += 1;
                }
                if exec.handoff && now > exec.start + self.plan.layer.lease {
                    handoffs += 1;
                }
            }
            state.stats.contested_blocks += blocks;
            state.stats.contested_handoffs += handoffs;
            if let Some(task) = task {
                let req = state.live.get(&task).copied().unwrap_or(usize::MAX);
                state.claimers.insert(token, (task, req));
                state.sent_claims.insert(task, (key.clone(), token));
            }
            state.claim_sent_at.entry(token).or_insert(now);
            if state.flooding {
                state.flood_keys.insert(key.clone());
            }
        }
        if sent && !state.flooding && state.flood_keys.contains(key) {
            state.flood_writes += 1;
        }
        let task_name = task.map_or("-".to_owned(), |task| format!("t{}", state.task(task)));
        let at = Instant::now() - self.start;
        state.note((at, format!("  {task_name} {operation} k{key_name} o{token} {fate}")));
    }

    /// The caller's answer (after latency, a lost reply or a timeout).
    pub fn call_answered(&self, operation: &str, key: &StoreKey, owner: &OwnerToken, answer: &str, owned: bool) {
        let mut state = self.lock();
        let task = tokio::task::try_id();
        let token = state.token(owner);
        let key_name = state.key(key);
        if owned {
            state.last_answered_owned.insert(key.clone(), token);
        }
        let task_name = task.map_or("-".to_owned(), |task| format!("t{}", state.task(task)));
        let at = Instant::now() - self.start;
        state.note((at, format!("  {task_name} {operation} k{key_name} o{token} -> {answer}")));
    }

    /// The store applied a command: the shadow follows, and checks the store's answer against what it held.
    pub fn applied_claim(
        &self,
        key: &StoreKey,
        owner: &OwnerToken,
        lease: Duration,
        result: &Result<Claimed, StoreError>,
    ) {
        let mut state = self.lock();
        let now = Instant::now();
        let token = state.token(owner);
        if let Ok(Claimed::Owned) = result {
            // A request for this key was cancelled after this claim was sent: this is its claim landing (or a
            // duplicate's, as good a witness).
            let sent = state.claim_sent_at.get(&token).copied().unwrap_or(now);
            let cancelled = state.reqs.iter().any(|req| {
                req.store_key.as_ref() == Some(key) && req.cancelled_at.is_some_and(|at| sent <= at && at <= now)
            });
            if cancelled {
                state.stats.claims_after_cancel += 1;
            }
            state.shadow.insert(key.clone(), Held::InFlight { token, expires: now + lease });
            state.grants.insert(token, Grant { key: key.clone(), at: now, lease, early: false, claimed_for: lease });
        }
        self.note_applied(&mut state, "claim", key, token, &claimed(result));
    }

    pub fn applied_write(
        &self,
        operation: &'static str,
        key: &StoreKey,
        owner: &OwnerToken,
        lasts: Duration,
        result: &Result<Write, StoreError>,
    ) {
        let mut state = self.lock();
        let now = Instant::now();
        let token = state.token(owner);
        let held = state.held(key, now);
        if let Ok(Write::Applied) = result {
            let mine = matches!(held, Some(Held::InFlight { token: holder, .. }) if holder == token);
            if !mine && held.is_some() {
                self.fail(
                    &mut state,
                    "stale_owner_fenced",
                    format!("{operation} by o{token} applied while the store held {held:?}"),
                );
            }
            match operation {
                "complete" => {
                    state.shadow.insert(key.clone(), Held::Completed { token, expires: now + lasts });
                    state.completed.insert(token);
                }
                "release" => {
                    state.shadow.remove(key);
                }
                _ => {
                    state.shadow.insert(key.clone(), Held::InFlight { token, expires: now + lasts });
                    let claimed_for = state.grants.get(&token).map_or(lasts, |grant| grant.claimed_for);
                    let grant = Grant { key: key.clone(), at: now, lease: lasts, early: false, claimed_for };
                    state.grants.insert(token, grant);
                }
            }
        }
        self.note_applied(&mut state, operation, key, token, &written(result));
    }

    fn note_applied(&self, state: &mut State, operation: &str, key: &StoreKey, token: usize, result: &str) {
        let key_name = state.key(key);
        let at = Instant::now() - self.start;
        state.note((at, format!("    store applies {operation} k{key_name} o{token}: {result}")));
    }

    /// Checks the shadow against what the store holds after a command (a check of the simulator itself).
    pub fn agrees(&self, key: &StoreKey, entry: &Option<Entry>) {
        let mut state = self.lock();
        let held = state.held(key, Instant::now());
        let agrees = matches!(
            (&held, entry),
            (None, None)
                | (Some(Held::InFlight { .. }), Some(Entry::InFlight { .. }))
                | (Some(Held::Completed { .. }), Some(Entry::Completed(_)))
        );
        if !agrees {
            self.fail(&mut state, "simulator_shadow_agrees_with_store", format!("shadow {held:?}, store {entry:?}"));
        }
    }

    /// The store's clock jumps for one in-flight key: its entry is gone now. Returns the key and its owner.
    pub fn pick_early_expiry(&self) -> Option<(StoreKey, OwnerToken)> {
        let mut state = self.lock();
        let now = Instant::now();
        let in_flight: Vec<(StoreKey, usize)> = state
            .shadow
            .iter()
            .filter_map(|(key, held)| match held {
                Held::InFlight { token, expires } if *expires > now => Some((key.clone(), *token)),
                _ => None,
            })
            .collect();
        if in_flight.is_empty() {
            return None;
        }
        let (key, token) = in_flight[self.rng().below(in_flight.len() as u64) as usize].clone();
        state.shadow.remove(&key);
        if let Some(grant) = state.grants.get_mut(&token) {
            grant.early = true;
        }
        state.stats.early_expiries += 1;
        let key_name = state.key(&key);
        let at = now - self.start;
        state.note((at, format!("FAULT the store's clock jumps: k{key_name} (o{token}) expires early")));
        Some((key, state.token_objects[token].clone()))
    }

    /// A completed record turns unreadable until `until`.
    pub fn corrupt_one(&self, until: Instant) {
        let mut state = self.lock();
        let now = Instant::now();
        let completed: Vec<StoreKey> = state
            .shadow
            .iter()
            .filter(|(_, held)| matches!(held, Held::Completed { expires, .. } if *expires > now))
            .map(|(key, _)| key.clone())
            .collect();
        if completed.is_empty() {
            return;
        }
        let key = completed[self.rng().below(completed.len() as u64) as usize].clone();
        let key_name = state.key(&key);
        let at = now - self.start;
        state.note((at, format!("FAULT k{key_name}'s record is corrupt until {:?}", until - self.start)));
        state.corrupt.insert(key, until);
    }

    pub fn is_corrupt(&self, key: &StoreKey) -> bool {
        let now = Instant::now();
        self.lock().corrupt.get(key).is_some_and(|until| *until > now)
    }

    /// How long a key may stay in flight with nobody owning it once the store answers again.
    pub fn orphan_grace(&self) -> Duration {
        ORPHAN_SLACK + 2 * self.plan.store_timeout
    }

    /// Checks that no key stays in flight with nobody to finish it: held by a token whose attempt is gone and whose
    /// execution (if any) ended, for longer than the engine needs to free it once the store answers.
    pub fn check_orphans(&self) {
        let mut state = self.lock();
        let now = Instant::now();
        state.stats.checks += 1;
        let grace = self.orphan_grace();
        let healthy_since = self.start + self.plan.healthy_since(now - self.start);
        let in_flight: Vec<(StoreKey, usize, Instant)> = state
            .shadow
            .iter()
            .filter_map(|(key, held)| match held {
                Held::InFlight { token, expires } if *expires > now => Some((key.clone(), *token, *expires)),
                _ => None,
            })
            .collect();
        let held: BTreeSet<StoreKey> = in_flight.iter().map(|(key, _, _)| key.clone()).collect();
        state.orphans.retain(|key, _| held.contains(key));
        for (key, token, expires) in in_flight {
            // The attempt that sent the claim; or, for a claim sent from a task of the engine's own (no attempt's),
            // any attempt for the same key.
            let claimer_alive = match state.claimers.get(&token) {
                Some((task, req)) if *req != usize::MAX => state.live.get(task) == Some(req),
                _ => state.live.values().any(|req| state.reqs[*req].store_key.as_ref() == Some(&key)),
            };
            let running = state.execs.iter().any(|exec| exec.end.is_none() && exec.token == Some(token));
            if claimer_alive || running {
                state.orphans.remove(&key);
                continue;
            }
            let since = match state.orphans.get(&key) {
                Some((holder, since)) if *holder == token => *since,
                _ => {
                    state.orphans.insert(key.clone(), (token, now));
                    now
                }
            };
            let counted_from = since.max(healthy_since);
            if now > counted_from + grace {
                let key_name = state.key(&key);
                let left = expires - now;
                self.fail(
                    &mut state,
                    "orphaned_claim",
                    format!(
                        "k{key_name} has been held in flight by o{token} since {:?}, with no request or execution \
                         owning it and the store answering since {:?}; it stays blocked for another {left:?}",
                        since - self.start,
                        healthy_since - self.start
                    ),
                );
                return;
            }
        }
    }

    /// Checks that no request goes unanswered past its bound (a hung request would never be answered at all).
    pub fn check_overdue(&self) {
        let mut state = self.lock();
        let now = Instant::now();
        let live: Vec<usize> = state.live.values().copied().collect();
        for req in live {
            let this = &state.reqs[req];
            if !this.done && now > this.sent + this.bound + Duration::from_secs(1) {
                let detail = format!(
                    "req{req} still unanswered after {:?}, over its bound of {:?}",
                    now - this.sent,
                    this.bound
                );
                self.fail(&mut state, "answered_within_bound", detail);
                return;
            }
        }
    }
}

/// The exec id a handler's body names (`{"exec":N,...}`).
pub fn exec_of(body: &[u8]) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("exec")?.as_u64().map(|exec| exec as usize)
}

impl State {
    /// Records an event, until the first violation: what follows it is the run being torn down (its runtime drops
    /// tasks in an order that depends on process-wide task ids), not part of the schedule.
    fn note(&mut self, event: (Duration, String)) {
        if self.violation.is_none() {
            self.trace.push(event);
        }
    }

    fn token(&mut self, token: &OwnerToken) -> usize {
        if let Some(id) = self.tokens.get(token.as_str()) {
            return *id;
        }
        let id = self.token_objects.len();
        self.tokens.insert(token.as_str().to_owned(), id);
        self.token_objects.push(token.clone());
        id
    }

    fn key(&mut self, key: &StoreKey) -> usize {
        let next = self.keys.len();
        *self.keys.entry(key.clone()).or_insert(next)
    }

    fn task(&mut self, task: TaskId) -> usize {
        let next = self.tasks.len();
        *self.tasks.entry(task).or_insert(next)
    }

    fn held(&self, key: &StoreKey, now: Instant) -> Option<Held> {
        self.shadow.get(key).filter(|held| held.expires() > now).cloned()
    }
}

/// A claim's answer, short, for the trace.
pub fn claimed(result: &Result<Claimed, StoreError>) -> String {
    match result {
        Ok(Claimed::Owned) => "owned".to_owned(),
        Ok(Claimed::Existing(Entry::InFlight { .. })) => "in flight".to_owned(),
        Ok(Claimed::Existing(Entry::Completed(record))) => match &record.stored {
            Stored::Response(response) => format!("completed ({})", response.status),
            Stored::NotReplayable { status } => format!("completed, not replayable ({status})"),
        },
        Err(error) => format!("error: {error}"),
    }
}

/// A write's answer, short, for the trace.
pub fn written(result: &Result<Write, StoreError>) -> String {
    match result {
        Ok(Write::Applied) => "applied".to_owned(),
        Ok(Write::Fenced) => "fenced".to_owned(),
        Err(error) => format!("error: {error}"),
    }
}
