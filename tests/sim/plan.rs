//! What one seed runs: the engine's settings, the clients and their retries, the handlers' behaviour and the
//! store's faults, all drawn from the seed before the run starts (the run then draws each store call's latency and
//! fate from the same source, in the order the calls are made).

use super::rng::Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The front doors the simulator drives, each at one path (the once door has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    /// `#[idempotent]` handlers with three policies (see `app.rs`).
    M1,
    M2,
    M3,
    /// A plain handler under the `IdempotencyLayer`.
    L1,
    /// An annotated handler under the layer: the layer claims, the handler adopts (until first contact).
    H1,
    H2,
    H3,
    /// `Idempotency::once`, called directly.
    Once,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::M1 => "/m1",
            Route::M2 => "/m2",
            Route::M3 => "/m3",
            Route::L1 => "/l1",
            Route::H1 => "/h1",
            Route::H2 => "/h2",
            Route::H3 => "/h3",
            Route::Once => "once",
        }
    }

    pub fn is_handoff(self) -> bool {
        matches!(self, Route::H1 | Route::H2 | Route::H3)
    }
}

/// What a handler does, sent in the request body (so it is part of the fingerprint: a retry with the same body
/// behaves the same way).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    pub kind: Kind,
    /// How long a slow handler sleeps, a blocking one blocks, in milliseconds.
    pub ms: u64,
    /// The status a `Status` handler answers with.
    pub status: u16,
    /// Makes two commands with the same behaviour different requests (a retry with a changed body).
    pub salt: u32,
    /// Whether the handler asks its fence whether the claim is still held before answering.
    pub check: bool,
    /// Padding, for request bodies over the body limit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pad: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Quick,
    /// Awaits a sleep of `ms`, possibly past its lease: the keeper must renew beside it.
    Slow,
    /// Blocks its thread for `ms` (see `World::block`): nothing else driven on its task can run meanwhile.
    Block,
    Panic,
    /// Answers `status` (a 4xx, stored; or a 5xx, released unless the route stores server errors).
    Status,
    /// Answers a body over `max_record_bytes`: sent through, kept as not replayable.
    Big,
    /// Answers a streamed body (unknown length): sent through, kept as not replayable.
    Stream,
}

impl Cmd {
    pub fn describe(&self) -> String {
        let mut text = match self.kind {
            Kind::Quick => "quick".to_owned(),
            Kind::Slow => format!("slow {}ms", self.ms),
            Kind::Block => format!("block {}ms", self.ms),
            Kind::Panic => "panic".to_owned(),
            Kind::Status => format!("status {}", self.status),
            Kind::Big => "big".to_owned(),
            Kind::Stream => "stream".to_owned(),
        };
        if self.check {
            text.push_str(" +is_held");
        }
        text
    }

    /// How long the handler itself takes, for the bound on the answer.
    pub fn own_time(&self) -> Duration {
        match self.kind {
            Kind::Slow | Kind::Block => Duration::from_millis(self.ms),
            Kind::Stream => Duration::from_millis(3 * STREAM_CHUNK_PAUSE_MS),
            _ => Duration::ZERO,
        }
    }
}

pub const STREAM_CHUNK_PAUSE_MS: u64 = 10;

/// How an attempt's request body is shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyShape {
    Json,
    /// Not JSON: the `Json` extractor rejects it (400), the handler body never runs.
    Malformed,
    /// JSON without `content-type`: the `Json` extractor rejects it (415).
    NoContentType,
    /// Over the body limit: 413 before any claim.
    Oversize,
}

/// One request of a client (sent `copies` times at once: concurrent duplicates).
#[derive(Clone, Debug)]
pub struct Attempt {
    pub cmd: Cmd,
    pub shape: BodyShape,
    /// The client gives up (drops the request's future) this long after sending it.
    pub cancel_after: Option<Duration>,
    pub copies: u32,
    /// The pause before the next attempt.
    pub then_wait: Duration,
    /// The once door's lease and wait_timeout for this call.
    pub once_lease: Duration,
    pub once_wait: Duration,
}

/// A client: one key (or none) at one route, sent once and retried.
#[derive(Clone, Debug)]
pub struct Script {
    pub at: Duration,
    pub process: usize,
    pub route: Route,
    pub principal: Option<u8>,
    pub key: Option<u16>,
    pub attempts: Vec<Attempt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Calls fail at once, unsent (connection refused); a call sent just before is lost (connection reset).
    Outage,
    /// The server is frozen: calls queue up, time out at the store timeout, and land when it resumes.
    Hang,
    /// Each call takes up to this long each way.
    Slow(Duration),
}

#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub kind: FaultKind,
    pub from: Duration,
    pub to: Duration,
}

impl Window {
    pub fn contains(&self, at: Duration) -> bool {
        self.from <= at && at < self.to
    }
}

/// The layer's settings for the seed.
#[derive(Clone, Copy, Debug)]
pub struct LayerPolicy {
    pub lease: Duration,
    pub wait: Duration,
    pub ttl: Duration,
    pub store_server_errors: bool,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    /// New requests stop at `drain_at` (the drain follows once the clients are answered).
    pub drain_at: Duration,
    pub processes: usize,
    pub layer: LayerPolicy,
    /// A store call not answered within this long fails as unavailable (its command may still land).
    pub store_timeout: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub windows: Vec<Window>,
    /// Percent of calls whose reply is lost after the write landed, and that are sent twice.
    pub lost_reply_percent: u64,
    pub resend_percent: u64,
    /// When an in-flight entry expires early (the store's clock jumps).
    pub early_expiries: Vec<Duration>,
    /// When a completed record turns unreadable, and for how long.
    pub corruptions: Vec<(Duration, Duration)>,
    /// A flood of requests refused during an outage: when, and how many.
    pub flood: Option<(Duration, usize)>,
    pub principals: u8,
    pub keys: u16,
    pub scripts: Vec<Script>,
}

/// The longest the clients' workload runs before the drain, at most.
const MAX_RUN: u64 = 40_000;

impl Plan {
    pub fn generate(seed: u64, rng: &mut Rng) -> Plan {
        let processes = if rng.percent(70) { 1 } else { 2 };
        let layer = LayerPolicy {
            lease: Duration::from_millis(rng.pick(&[300, 500, 1000, 2000, 5000, 10_000])),
            wait: Duration::from_millis(rng.pick(&[0, 0, 300, 1000])),
            ttl: Duration::from_secs(rng.pick(&[5, 60, 600])),
            store_server_errors: rng.percent(20),
        };
        let store_timeout = Duration::from_millis(rng.pick(&[200, 500, 1000]));
        let (max_entries, max_bytes) = match rng.below(10) {
            0 => (rng.between(3, 12) as usize, 256 << 20),
            1 => (100_000, rng.between(1500, 6000) as usize),
            _ => (100_000, 256 << 20),
        };
        let run = rng.between(8_000, MAX_RUN);
        let drain_at =
            if rng.percent(70) { Duration::from_millis(run) } else { Duration::from_millis(rng.between(run / 2, run)) };
        let mut windows = Vec::new();
        for _ in 0..rng.below(3) {
            let from = rng.between(0, run);
            windows.push(Window {
                kind: FaultKind::Outage,
                from: Duration::from_millis(from),
                to: Duration::from_millis(from + rng.pick(&[50, 300, 1000, 3000, 8000])),
            });
        }
        for _ in 0..rng.below(3) {
            let from = rng.between(0, run);
            windows.push(Window {
                kind: FaultKind::Hang,
                from: Duration::from_millis(from),
                to: Duration::from_millis(from + rng.pick(&[50, 200, 700, 2000, 5000])),
            });
        }
        for _ in 0..rng.below(3) {
            let from = rng.between(0, run);
            windows.push(Window {
                kind: FaultKind::Slow(rng.millis(20, 800)),
                from: Duration::from_millis(from),
                to: Duration::from_millis(from + rng.between(200, 5000)),
            });
        }
        let lost_reply_percent = if rng.percent(50) { 0 } else { rng.between(1, 8) };
        let resend_percent = if rng.percent(50) { 0 } else { rng.between(1, 8) };
        let early_expiries = (0..rng.below(4)).map(|_| rng.millis(0, run)).collect();
        let corruptions =
            (0..u64::from(rng.percent(20))).map(|_| (rng.millis(0, run), rng.millis(100, 5000))).collect();
        let flood = rng.percent(15).then(|| {
            let at = rng.between(0, run);
            // The flood's own outage, long enough to hold every refused request's background work.
            windows.push(Window {
                kind: FaultKind::Outage,
                from: Duration::from_millis(at),
                to: Duration::from_millis(at + rng.between(2000, 6000)),
            });
            (Duration::from_millis(at + 1), rng.between(40, 120) as usize)
        });
        let principals = rng.between(1, 4) as u8;
        let keys = rng.between(1, 6) as u16;
        let mut plan = Plan {
            seed,
            drain_at,
            processes,
            layer,
            store_timeout,
            max_entries,
            max_bytes,
            windows,
            lost_reply_percent,
            resend_percent,
            early_expiries,
            corruptions,
            flood,
            principals,
            keys,
            scripts: Vec::new(),
        };
        let scripts = rng.between(10, 45);
        for _ in 0..scripts {
            let script = plan.script(rng, run);
            plan.scripts.push(script);
        }
        plan.scripts.sort_by_key(|script| script.at);
        plan
    }

    fn script(&self, rng: &mut Rng, run: u64) -> Script {
        let route = match rng.weighted(&[12, 8, 6, 12, 6, 4, 4, 12]) {
            0 => Route::M1,
            1 => Route::M2,
            2 => Route::M3,
            3 => Route::L1,
            4 => Route::H1,
            5 => Route::H2,
            6 => Route::H3,
            _ => Route::Once,
        };
        let principal = if rng.percent(5) { None } else { Some(rng.below(u64::from(self.principals)) as u8) };
        let key = if rng.percent(3) { None } else { Some(rng.below(u64::from(self.keys)) as u16) };
        let lease = self.route_lease(route);
        let mut attempts: Vec<Attempt> = Vec::new();
        for _ in 0..rng.weighted(&[0, 40, 30, 20, 10]) {
            let cmd = match attempts.last() {
                Some(last) if rng.percent(80) => last.cmd.clone(),
                _ => self.cmd(rng, route, lease),
            };
            let shape = match rng.below(100) {
                0..=3 => BodyShape::Malformed,
                4..=5 => BodyShape::NoContentType,
                6 => BodyShape::Oversize,
                _ => BodyShape::Json,
            };
            let cancel_after = match rng.below(100) {
                0..=11 => Some(rng.millis(0, 40)),
                12..=24 => Some(rng.millis(0, 2 * lease.as_millis() as u64)),
                _ => None,
            };
            let copies = match rng.below(100) {
                0..=69 => 1,
                70..=89 => 2,
                _ => rng.between(3, 5) as u32,
            };
            let then_wait = match rng.below(3) {
                0 => rng.millis(0, 100),
                1 => rng.millis(0, 1500),
                _ => rng.millis(0, 3 * lease.as_millis() as u64),
            };
            attempts.push(Attempt {
                cmd,
                shape,
                cancel_after,
                copies,
                then_wait,
                once_lease: Duration::from_millis(rng.pick(&[1000, 3000, 10_000])),
                once_wait: Duration::from_millis(rng.pick(&[0, 0, 1000])),
            });
        }
        Script {
            at: rng.millis(0, run),
            process: rng.below(self.processes as u64) as usize,
            route,
            principal,
            key,
            attempts,
        }
    }

    fn cmd(&self, rng: &mut Rng, route: Route, lease: Duration) -> Cmd {
        let lease_ms = lease.as_millis() as u64;
        let (kind, ms, status) = match rng.weighted(&[30, 16, 12, 4, 8, 8, 5, 5]) {
            0 => (Kind::Quick, 0, 201),
            1 => (Kind::Slow, rng.between(lease_ms / 20, 5 * lease_ms / 2).min(30_000), 201),
            2 => (Kind::Block, rng.between(lease_ms / 3, 3 * lease_ms).min(30_000), 201),
            3 => (Kind::Panic, 0, 500),
            4 => (Kind::Status, 0, rng.pick(&[402, 404, 409])),
            5 => (Kind::Status, 0, rng.pick(&[500, 503])),
            6 => (Kind::Big, 0, 201),
            _ => (Kind::Stream, 0, 201),
        };
        // The once door has no stream to answer with.
        let kind = if route == Route::Once && kind == Kind::Stream { Kind::Quick } else { kind };
        Cmd { kind, ms, status, salt: rng.below(1_000_000) as u32, check: rng.percent(15), pad: String::new() }
    }

    /// The plan, run in real time against a real store: every moment of the run a quarter as far from its start,
    /// handlers, pauses and give-ups at most a few seconds, and no store bounds (a real store has its own). Draws
    /// nothing, so the seed's plan is otherwise the simulator's.
    pub fn for_real_store(mut self) -> Plan {
        let quarter = |at: Duration| at / 4;
        let at_most = |at: Duration, most: u64| at.min(Duration::from_millis(most));
        self.drain_at = quarter(self.drain_at);
        for window in &mut self.windows {
            let length = window.to - window.from;
            window.from = quarter(window.from);
            window.to = window.from + quarter(length);
        }
        for at in &mut self.early_expiries {
            *at = quarter(*at);
        }
        for (at, length) in &mut self.corruptions {
            *at = quarter(*at);
            *length = quarter(*length);
        }
        if let Some((at, _)) = &mut self.flood {
            *at = quarter(*at);
        }
        for script in &mut self.scripts {
            script.at = quarter(script.at);
            for attempt in &mut script.attempts {
                attempt.then_wait = at_most(quarter(attempt.then_wait), 2000);
                attempt.cancel_after = attempt.cancel_after.map(|after| at_most(after, 3000));
                attempt.cmd.ms = attempt.cmd.ms.min(3000);
            }
        }
        self.max_entries = 100_000;
        self.max_bytes = 256 << 20;
        self
    }

    /// The lease a route's claims start with (a handoff route's is the layer's until the handler adopts it).
    pub fn route_lease(&self, route: Route) -> Duration {
        use super::app::policies;
        match route {
            Route::M1 => policies::M1.get_lease(),
            Route::M2 => policies::M2.get_lease(),
            Route::M3 => policies::M3.get_lease(),
            Route::L1 => self.layer.lease,
            Route::H1 | Route::H2 | Route::H3 => policies::H.get_lease().max(self.layer.lease),
            Route::Once => Duration::from_secs(10),
        }
    }

    pub fn route_wait(&self, route: Route, attempt: &Attempt) -> Duration {
        use super::app::policies;
        match route {
            Route::M1 => policies::M1.get_wait_timeout(),
            Route::M2 => policies::M2.get_wait_timeout(),
            Route::M3 => policies::M3.get_wait_timeout(),
            Route::L1 => self.layer.wait,
            Route::H1 | Route::H2 | Route::H3 => policies::H.get_wait_timeout().max(self.layer.wait),
            Route::Once => attempt.once_wait,
        }
    }

    /// Whether the store's calls may fail or lag at `at` (outage, hang, slow period): a lease lost then is the
    /// store's doing, not the engine's.
    pub fn degraded_between(&self, from: Duration, to: Duration) -> bool {
        self.windows.iter().any(|window| window.from <= to && from < Self::felt_until(window))
    }

    /// When a window's effect ends: a call sent in a slow period may take its latency each way after it, and the
    /// replies to commands a hang held land just after it.
    fn felt_until(window: &Window) -> Duration {
        let margin = Duration::from_millis(2 * super::store::BASE_LATENCY_MS + 1);
        match window.kind {
            FaultKind::Slow(most) => window.to + 2 * most + margin,
            FaultKind::Outage | FaultKind::Hang => window.to + margin,
        }
    }

    /// The end of the last degraded period that started before `at` (`at` itself while one lasts).
    pub fn healthy_since(&self, at: Duration) -> Duration {
        let mut since = Duration::ZERO;
        for window in &self.windows {
            if window.from <= at {
                since = since.max(Self::felt_until(window).min(at));
            }
        }
        since
    }

    pub fn window_at(&self, at: Duration, kind: impl Fn(FaultKind) -> bool) -> Option<Window> {
        self.windows.iter().copied().filter(|window| kind(window.kind) && window.contains(at)).max_by_key(|w| w.to)
    }

    /// When every fault window has ended.
    pub fn faults_end(&self) -> Duration {
        let corruptions = self.corruptions.iter().map(|(at, length)| *at + *length);
        self.windows.iter().map(|window| window.to).chain(corruptions).max().unwrap_or_default()
    }

    pub fn describe(&self) -> String {
        format!(
            "seed {} | processes {} | layer lease {:?} wait {:?} ttl {:?}{} | store timeout {:?} | entries {} bytes {} \
             | lost {}% resend {}% | windows {:?} | early expiries {:?} | corruptions {:?} | flood {:?} | {} clients \
             | drain at {:?}",
            self.seed,
            self.processes,
            self.layer.lease,
            self.layer.wait,
            self.layer.ttl,
            if self.layer.store_server_errors { " store_server_errors" } else { "" },
            self.store_timeout,
            self.max_entries,
            self.max_bytes,
            self.lost_reply_percent,
            self.resend_percent,
            self.windows,
            self.early_expiries,
            self.corruptions,
            self.flood,
            self.scripts.len(),
            self.drain_at,
        )
    }
}
