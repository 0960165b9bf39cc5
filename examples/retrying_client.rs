//! A client of an idem service that retries safely: `cargo run --example retrying_client`.
//!
//! [`post_exactly_once`] sends a `POST` with a fresh `Idempotency-Key` and retries it, with the same key, until it
//! gets an answer that is final: on a lost or timed-out response, and on the answers idem documents as retryable
//! (`in-progress`, `store-unavailable`, `at-capacity`, `transaction-failed`, ...), waiting what `Retry-After` says.
//! It never retries an answer that no retry can change (`key-reused`, `not-replayable`, ...): those are returned
//! as [`SendError::Refused`]. `docs/clients.md` explains each choice.
//!
//! `main` starts a small orders service on a memory store in this process (the reference service's `POST /orders`,
//! behind a network that loses the first response), and places an order through it.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// How hard [`post_exactly_once`] tries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// How long one attempt may take before its response counts as lost.
    pub attempt_timeout: Duration,
    /// The first backoff after a lost response or a server error; doubled after each.
    pub base_delay: Duration,
    /// The longest wait between attempts. A `Retry-After` longer than this ends the loop: the caller decides when to
    /// come back (with the same key, from [`SendError::GaveUp`]).
    pub max_delay: Duration,
    /// Whether to send again after a 5xx answered by the handler itself. idem does not store those by default, so
    /// the retry runs the handler again (see `docs/clients.md`); a server that stores them replays the 5xx instead.
    pub retry_server_errors: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            attempt_timeout: Duration::from_secs(10),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            retry_server_errors: true,
        }
    }
}

/// The operation's answer: the handler's response, fresh or replayed.
#[derive(Debug)]
pub struct Answer {
    /// Its status; a 4xx here is the handler's own answer (a declined card), final like a 2xx.
    pub status: StatusCode,
    /// `Idempotent-Replayed: true`: the stored answer of an earlier attempt, not a new execution.
    pub replayed: bool,
    /// The body.
    pub body: Value,
    /// The key every attempt carried.
    pub key: String,
    /// How many attempts it took.
    pub attempts: u32,
}

/// Why there is no answer.
#[derive(Debug)]
pub enum SendError {
    /// idem answered with a problem that no retry with this key can change.
    Refused {
        /// The problem's name (the end of its `type` URI), e.g. `key-reused`.
        problem: String,
        /// Its status.
        status: StatusCode,
        /// Its `detail`.
        detail: String,
        /// The key, for the logs.
        key: String,
    },
    /// The attempts ran out, or the server asked for a longer wait than the policy allows. The operation may or may
    /// not have run: send it again later with the same `key`, never with a new one.
    GaveUp {
        /// The key to retry with.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt got.
        last: String,
    },
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Refused { problem, status, detail, key } => {
                write!(f, "refused ({status} {problem}) for key {key}: {detail}")
            }
            SendError::GaveUp { key, attempts, last } => {
                write!(f, "no final answer after {attempts} attempts with key {key} (last: {last}); retry it later")
            }
        }
    }
}

impl std::error::Error for SendError {}

/// What to do after one attempt.
enum Verdict {
    /// The answer is the operation's: return it.
    Final(Answer),
    /// Nothing final yet: send again with the same key, after `Retry-After` if the server gave one.
    Retry { reason: String, retry_after: Option<Duration> },
    /// No retry can help.
    Refused(SendError),
}

/// Sends `body` to `url` as a `POST` under a fresh key, retrying until an answer is final (see the module docs).
pub async fn post_exactly_once(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    policy: &RetryPolicy,
) -> Result<Answer, SendError> {
    // One key per operation, made before the first attempt and kept for every retry: a new key would be a new
    // operation, run again.
    post_with_key(client, url, &fresh_key(), body, policy).await
}

/// [`post_exactly_once`] with a key the caller chose: to resume an operation that [`SendError::GaveUp`], say.
pub async fn post_with_key(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    policy: &RetryPolicy,
) -> Result<Answer, SendError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent =
            client.post(url).header("idempotency-key", key).json(body).timeout(policy.attempt_timeout).send().await;
        let next = match sent {
            Ok(response) => judge(response, key, attempts, policy).await,
            // No answer (a timeout, a reset connection): the request may have run, or not. The same key makes the
            // retry safe either way: it runs it, waits for it, or replays its answer.
            Err(error) => Verdict::Retry { reason: format!("no response: {error}"), retry_after: None },
        };
        let (reason, retry_after) = match next {
            Verdict::Final(answer) => return Ok(answer),
            Verdict::Refused(error) => return Err(error),
            Verdict::Retry { reason, retry_after } => (reason, retry_after),
        };
        if attempts >= policy.max_attempts {
            return Err(SendError::GaveUp { key: key.to_owned(), attempts, last: reason });
        }
        let delay = match retry_after {
            // The server knows how long it needs (the original finishing, the store coming back): wait that long,
            // plus a little jitter so that clients refused together do not all come back in the same instant.
            Some(after) => after + jitter(policy.base_delay),
            None => backoff(policy, attempts),
        };
        if delay > policy.max_delay {
            return Err(SendError::GaveUp { key: key.to_owned(), attempts, last: reason });
        }
        tokio::time::sleep(delay).await;
    }
}

/// Reads one response and decides: final, retry, or refused.
async fn judge(response: reqwest::Response, key: &str, attempts: u32, policy: &RetryPolicy) -> Verdict {
    let status = response.status();
    let headers = response.headers().clone();
    let replayed = headers.get("idempotent-replayed").is_some_and(|value| value == "true");
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        // The body was lost on the way: as good as no response.
        Err(error) => return Verdict::Retry { reason: format!("response body lost: {error}"), retry_after: None },
    };
    let body: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));

    // A replay is the stored answer of an attempt that ran: whatever its status, sending again gets it again.
    if replayed {
        return Verdict::Final(Answer { status, replayed, body, key: key.to_owned(), attempts });
    }
    let is_problem = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/problem+json"));
    if is_problem && let Some(problem) = problem_name(&body) {
        let refused = |problem: &str| {
            Verdict::Refused(SendError::Refused {
                problem: problem.to_owned(),
                status,
                detail: body["detail"].as_str().unwrap_or_default().to_owned(),
                key: key.to_owned(),
            })
        };
        return match problem {
            // Nothing ran, or the original is still running: the same key later gets it run or replayed.
            "in-progress" | "store-unavailable" | "at-capacity" | "transaction-failed" | "unreadable-body" => {
                Verdict::Retry { reason: format!("{status} {problem}"), retry_after }
            }
            // The handler failed and nothing was stored: a retry runs it again.
            "handler-panicked" if policy.retry_server_errors => {
                Verdict::Retry { reason: format!("{status} {problem}"), retry_after }
            }
            // The key was spent on another request, or on one whose answer was not kept, or the request itself is
            // wrong, or the server is misconfigured: the same request with the same key gets the same refusal.
            other => refused(other),
        };
    }
    match status {
        // A rate limiter in front of the handler (idem never stores a 429), or a proxy that lost the server.
        StatusCode::TOO_MANY_REQUESTS | StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => {
            Verdict::Retry { reason: status.to_string(), retry_after }
        }
        // The handler's own 5xx: idem released the key (unless the server stores 5xx, and then this would have
        // been a replay on the next attempt).
        status if status.is_server_error() && policy.retry_server_errors => {
            Verdict::Retry { reason: status.to_string(), retry_after }
        }
        // 2xx, and the handler's own 4xx: stored by idem, final.
        _ => Verdict::Final(Answer { status, replayed, body, key: key.to_owned(), attempts }),
    }
}

/// The problem's name: the end of its `type` URI (the base is the server's choice, the name is idem's).
fn problem_name(body: &Value) -> Option<&str> {
    let uri = body["type"].as_str()?;
    uri.rsplit(['#', '/']).next().filter(|name| !name.is_empty())
}

/// Exponential backoff with jitter: `base × 2^(attempt−1)`, capped, then between half of it and all of it.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exponential = policy.base_delay.saturating_mul(1 << (attempt - 1).min(16)).min(policy.max_delay);
    exponential / 2 + jitter(exponential / 2)
}

/// A random duration in `[0, up_to)`.
fn jitter(up_to: Duration) -> Duration {
    let nanos = u64::try_from(up_to.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(random_u64() % nanos)
}

/// A fresh, unguessable key. A real client would use a UUID v4 (the `uuid` crate); this example keeps to the
/// workspace's dependencies: std's `RandomState` is seeded from the OS's randomness.
fn fresh_key() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::UNIX_EPOCH.elapsed().map(|elapsed| elapsed.as_nanos()).unwrap_or_default();
    RandomState::new().hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), nanos))
}

// The service: the reference service's `POST /orders` (`examples/orders.rs`) on a memory store, in this process.

#[derive(Clone, Default)]
struct Orders {
    executions: Arc<AtomicU64>,
    /// How many responses the network has lost so far, and how many it loses in all.
    lost: Arc<AtomicU64>,
    to_lose: u64,
}

#[idempotent(ttl = 60, wait_timeout = 3.0, validate_signature)]
async fn create_order(State(orders): State<Orders>, Json(order): Json<Value>) -> impl IntoResponse {
    let order_id = orders.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let body = json!({ "order_id": order_id, "item": order["item"], "qty": order["qty"] });
    (StatusCode::CREATED, [(header::LOCATION, format!("/orders/{order_id}"))], Json(body))
}

async fn stats(State(orders): State<Orders>) -> Json<Value> {
    Json(json!({ "executions": orders.executions.load(Ordering::SeqCst) }))
}

/// A lossy network: the order is placed and recorded, then its response never reaches the client.
async fn lose_responses(State(orders): State<Orders>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if orders.lost.fetch_add(1, Ordering::SeqCst) < orders.to_lose {
        std::future::pending::<()>().await;
    }
    response
}

/// The orders service, losing the first `to_lose` responses.
fn service(idempotency: Idempotency, orders: Orders) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/stats", get(stats))
        .layer(axum::Extension(idempotency))
        .layer(middleware::from_fn_with_state(orders.clone(), lose_responses))
        .with_state(orders)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orders = Orders { to_lose: 1, ..Orders::default() };
    let app = service(Idempotency::in_memory(), orders.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::new();
    let policy = RetryPolicy { attempt_timeout: Duration::from_millis(500), ..RetryPolicy::default() };
    let order = json!({ "item": "book", "qty": 1 });
    let answer = post_exactly_once(&client, &format!("{base}/orders"), &order, &policy).await?;
    println!(
        "{} after {} attempts with key {} (replayed: {}): {}",
        answer.status, answer.attempts, answer.key, answer.replayed, answer.body
    );
    println!("orders placed: {}", orders.executions.load(Ordering::SeqCst));

    // The same key for another order is a client bug: refused at once, not retried.
    let other = json!({ "item": "lamp", "qty": 2 });
    match post_with_key(&client, &format!("{base}/orders"), &answer.key, &other, &policy).await {
        Err(refused @ SendError::Refused { .. }) => println!("{refused}"),
        unexpected => return Err(format!("expected a refusal, got {unexpected:?}").into()),
    }
    Ok(())
}
