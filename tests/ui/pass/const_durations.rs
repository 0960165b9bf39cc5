// `ttl`, `wait_timeout` and `lease` given as consts: `u64` or `f64` seconds, a `Duration`, a path, any const
// expression, mixed with literals. `main` checks on paused time that a `u64` const ttl is read as seconds.

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::{Idempotency, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

const ORDER_TTL: u64 = 60;
const WAIT: f64 = 2.5;
const LEASE: Duration = Duration::from_millis(1_500);

mod config {
    pub const TTL: u64 = 3_600;
}

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(ttl = ORDER_TTL, wait_timeout = WAIT, lease = LEASE)]
async fn orders(State(_state): State<AppState>) -> String {
    RUNS.fetch_add(1, Ordering::SeqCst).to_string()
}

#[idempotent(ttl = config::TTL, wait_timeout = 0.5, lease = 10)]
async fn by_path(State(_state): State<AppState>) -> &'static str {
    "ok"
}

#[idempotent(ttl = 60 * 60, wait_timeout = LEASE.as_secs_f64() * 2.0, lease = Duration::from_secs(5))]
async fn expressions(State(_state): State<AppState>) -> &'static str {
    "ok"
}

// Literal ttl and const lease, the check between them runs on the const's value.
#[idempotent(ttl = 30, lease = ORDER_TTL / 2, wait_timeout = 0.0)]
async fn literal_ttl(State(_state): State<AppState>) -> &'static str {
    "ok"
}

// A const ttl under the default lease (30 s): the lease shrinks to fit it, as with a literal.
const SHORT_TTL: f64 = 5.0;

#[idempotent(ttl = SHORT_TTL)]
async fn short_ttl(State(_state): State<AppState>) -> &'static str {
    "ok"
}

// A const `wait_timeout` of zero answers at once, as `wait_timeout = 0` does.
const NO_WAIT: u64 = 0;

#[idempotent(wait_timeout = NO_WAIT)]
async fn no_wait(State(_state): State<AppState>) -> &'static str {
    "ok"
}

// Literals forwarded by `macro_rules!` arrive in invisible groups and still read as literals.
macro_rules! forwarded {
    ($ttl:literal, $wait:expr, $validate:literal) => {
        #[idempotent(ttl = $ttl, wait_timeout = $wait, validate_signature = $validate)]
        async fn forwarded(State(_state): State<AppState>) -> &'static str {
            "ok"
        }
    };
}

forwarded!(0.5, (0.25), false);

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let app: Router = Router::new()
        .route("/orders", post(orders))
        .route("/by-path", post(by_path))
        .route("/expressions", post(expressions))
        .route("/literal-ttl", post(literal_ttl))
        .route("/short", post(short_ttl))
        .route("/no-wait", post(no_wait))
        .route("/forwarded", post(forwarded))
        .with_state(state);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    runtime.block_on(async move {
        let send = || async {
            let request = Request::post("/orders").header("idempotency-key", "order-1").body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            String::from_utf8(body.to_vec()).unwrap()
        };
        assert_eq!(send().await, "0");
        tokio::time::advance(Duration::from_secs(ORDER_TTL - 1)).await;
        assert_eq!(send().await, "0", "replayed within `ORDER_TTL` seconds");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(send().await, "1", "expired after `ORDER_TTL` seconds: the key runs again");
        assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    });
}
