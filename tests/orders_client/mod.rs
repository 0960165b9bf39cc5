//! A client of the reference service (`examples/orders`) that keeps everything an answer carried (status,
//! headers, body) and when it was sent and answered, so fault tests can assert on what every client received and
//! on timings.
#![allow(dead_code)]

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The route with a 2 s lease (renewed every ~0.67 s while the handler runs) and `wait_timeout = 3`.
pub const SHORT_LEASE_ROUTE: &str = "/short-lease/orders";
/// Its lease.
pub const LEASE: Duration = Duration::from_secs(2);

/// One answer, as the client received it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// When the request was sent.
    pub sent: Instant,
    /// When the answer had been read in full.
    pub answered: Instant,
}

impl Answer {
    pub fn took(&self) -> Duration {
        self.answered - self.sent
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// `X-Idempotency-Status`: `new` or `hit`.
    pub fn idempotency_status(&self) -> Option<&str> {
        self.header("x-idempotency-status")
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub fn retry_after(&self) -> Option<&str> {
        self.header("retry-after")
    }

    /// The problem's name (`store-unavailable`, …) when the answer is an RFC 9457 problem.
    pub fn problem(&self) -> Option<&str> {
        if self.header("content-type") != Some("application/problem+json") {
            return None;
        }
        self.body["type"].as_str()?.strip_prefix("https://docs.rs/axum-idem/latest/idem/problems/index.html#")
    }

    pub fn order_id(&self) -> Option<u64> {
        self.body["order_id"].as_u64()
    }

    /// A first execution's answer: `201`, `X-Idempotency-Status: new`, not replayed, with an order id.
    pub fn is_new_order(&self) -> bool {
        self.status == StatusCode::CREATED
            && self.idempotency_status() == Some("new")
            && !self.replayed()
            && self.order_id().is_some()
    }

    /// A replay of `original`: its status and body, `X-Idempotency-Status: hit`, `Idempotent-Replayed: true`.
    pub fn replays(&self, original: &Answer) -> bool {
        self.status == original.status
            && self.body == original.body
            && self.idempotency_status() == Some("hit")
            && self.replayed()
            && self.header("location") == original.header("location")
    }

    /// The engine's own problem `name` with `status`, and `Retry-After` where the problem carries one.
    pub fn is_problem(&self, status: u16, name: &str) -> bool {
        let retry_after_ok = match name {
            "store-unavailable" => self.retry_after() == Some("5"),
            "in-progress" => self.retry_after() == Some("1"),
            _ => true,
        };
        self.status.as_u16() == status && self.problem() == Some(name) && retry_after_ok
    }

    /// A short description for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {} [{}] after {:?}: {}",
            self.status.as_u16(),
            self.idempotency_status().unwrap_or("-"),
            if self.replayed() { "replayed" } else { "not replayed" },
            self.took(),
            self.body
        )
    }
}

/// An order body; `delay_ms` makes the handler sleep after it counted its execution.
pub fn order(item: &str, delay_ms: u64) -> Value {
    json!({ "item": item, "qty": 1, "delay_ms": delay_ms })
}

/// Sends requests to any instance and records what came back.
#[derive(Clone)]
pub struct OrdersClient {
    http: reqwest::Client,
}

impl Default for OrdersClient {
    fn default() -> Self {
        Self::new()
    }
}

impl OrdersClient {
    pub fn new() -> Self {
        // A bound on every request, so a test whose service hangs fails rather than stalls; far above any wait here.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("a reqwest client");
        Self { http }
    }

    /// `POST {base}{route}` with `Idempotency-Key: key`; `Err` when no HTTP answer came (the process died).
    pub async fn try_post(&self, base: &str, route: &str, key: &str, body: &Value) -> Result<Answer, String> {
        let sent = Instant::now();
        let response = self
            .http
            .post(format!("{base}{route}"))
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .map_err(|error| format!("{error:?}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|error| format!("{error:?}"))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, headers, body, sent, answered: Instant::now() })
    }

    /// As [`OrdersClient::try_post`], on the short-lease route; panics when no HTTP answer came.
    pub async fn post(&self, base: &str, key: &str, body: &Value) -> Answer {
        self.try_post(base, SHORT_LEASE_ROUTE, key, body).await.unwrap_or_else(|error| panic!("POST {key}: {error}"))
    }
}

/// The median of `durations` (which must not be empty).
pub fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
