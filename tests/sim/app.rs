//! The app under simulation: `#[idempotent]` handlers with three policies, a plain handler under the
//! `IdempotencyLayer`, annotated handlers under the layer (the handoff), and the once door's work. Every handler
//! body reports its start and end to the world (the side effect the invariants count) and behaves as its request's
//! command says.

use super::plan::{Cmd, Kind, STREAM_CHUNK_PAUSE_MS};
use super::world::World;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idem::layer::IdempotencyLayer;
use idem::{Idempotency, idempotent, protocol::Fence};
use policies::*;
use std::sync::Arc;
use std::time::Duration;

/// Request bodies over this are refused (413) by the layer and by axum's limit for annotated handlers.
pub const BODY_LIMIT: usize = 8 * 1024;
/// Answers over this are kept as not replayable.
pub const MAX_RECORD_BYTES: usize = 1024;

/// The annotated routes' settings, shared by their attributes and by the model.
pub mod policies {
    use idem::Policy;
    use std::time::Duration;

    pub const M1_LEASE: Duration = Duration::from_secs(1);
    pub const M1_WAIT: Duration = Duration::ZERO;
    pub const M1_TTL: Duration = Duration::from_secs(600);
    pub const M1: Policy = Policy::new().lease(M1_LEASE).wait_timeout(M1_WAIT).ttl(M1_TTL);

    pub const M2_LEASE: Duration = Duration::from_secs(5);
    pub const M2_WAIT: Duration = Duration::from_millis(1500);
    pub const M2_TTL: Duration = Duration::from_secs(30);
    pub const M2: Policy = Policy::new().lease(M2_LEASE).wait_timeout(M2_WAIT).ttl(M2_TTL);

    pub const M3_LEASE: Duration = Duration::from_secs(10);
    pub const M3_WAIT: Duration = Duration::ZERO;
    pub const M3_TTL: Duration = Duration::from_secs(600);
    pub const M3: Policy = Policy::new().lease(M3_LEASE).wait_timeout(M3_WAIT).ttl(M3_TTL).store_server_errors(true);

    pub const H_LEASE: Duration = Duration::from_secs(3);
    pub const H_WAIT: Duration = Duration::from_millis(500);
    pub const H_TTL: Duration = Duration::from_secs(600);
    pub const H: Policy = Policy::new().lease(H_LEASE).wait_timeout(H_WAIT).ttl(H_TTL);
}

#[derive(Clone)]
pub struct App {
    pub world: Arc<World>,
}

#[idempotent(lease = M1_LEASE, wait_timeout = M1_WAIT, ttl = M1_TTL)]
async fn m1(State(app): State<App>, fence: Option<Fence>, headers: HeaderMap, Json(cmd): Json<Cmd>) -> Response {
    behave(&app.world, fence, &headers, cmd).await
}

#[idempotent(lease = M2_LEASE, wait_timeout = M2_WAIT, ttl = M2_TTL)]
async fn m2(State(app): State<App>, fence: Option<Fence>, headers: HeaderMap, Json(cmd): Json<Cmd>) -> Response {
    behave(&app.world, fence, &headers, cmd).await
}

#[idempotent(lease = M3_LEASE, wait_timeout = M3_WAIT, ttl = M3_TTL, store_server_errors)]
async fn m3(State(app): State<App>, fence: Option<Fence>, headers: HeaderMap, Json(cmd): Json<Cmd>) -> Response {
    behave(&app.world, fence, &headers, cmd).await
}

/// Annotated and under the layer: adopts the layer's claim until its route's first contact.
#[idempotent(lease = H_LEASE, wait_timeout = H_WAIT, ttl = H_TTL)]
async fn handoff(State(app): State<App>, fence: Option<Fence>, headers: HeaderMap, Json(cmd): Json<Cmd>) -> Response {
    behave(&app.world, fence, &headers, cmd).await
}

/// Not annotated: only the layer protects it.
async fn plain(State(app): State<App>, fence: Option<Fence>, headers: HeaderMap, Json(cmd): Json<Cmd>) -> Response {
    behave(&app.world, fence, &headers, cmd).await
}

/// One process's app over `idempotency`.
pub fn router(world: Arc<World>, idempotency: &Idempotency, layer: &IdempotencyLayer) -> Router {
    let annotated = Router::new()
        .route("/m1", post(m1))
        .route("/m2", post(m2))
        .route("/m3", post(m3))
        .layer(Extension(idempotency.clone()));
    let layered = Router::new().route("/l1", post(plain)).layer(layer.clone());
    // One layer service per route: each has its own first contact.
    let handoffs = Router::new()
        .route("/h1", post(handoff))
        .route("/h2", post(handoff))
        .route("/h3", post(handoff))
        .layer(layer.clone());
    Router::new()
        .merge(annotated)
        .merge(layered)
        .merge(handoffs)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(App { world })
}

/// Ends the execution in the world however the body ends (a panic, or the once door's future dropped).
struct Running<'a> {
    world: &'a World,
    exec: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.world.exec_end(self.exec, None);
    }
}

async fn act(world: &World, cmd: &Cmd, fence: Option<&Fence>) {
    match cmd.kind {
        Kind::Slow => tokio::time::sleep(Duration::from_millis(cmd.ms)).await,
        Kind::Block => {
            let until = tokio::time::Instant::now() + Duration::from_millis(cmd.ms);
            world.block(until);
            tokio::time::sleep_until(until).await;
            world.unblock();
        }
        Kind::Panic => panic!("sim: the handler panics"),
        _ => {}
    }
    if cmd.check
        && let Some(fence) = fence
    {
        let held = fence.is_held().await;
        world.log(format!("  is_held -> {held:?}"));
    }
}

fn answer_body(exec: usize, req: usize, cmd: &Cmd) -> serde_json::Value {
    let mut body = serde_json::json!({ "exec": exec, "req": req, "status": cmd.status });
    if cmd.kind == Kind::Big {
        body["pad"] = serde_json::Value::String("x".repeat(2 * MAX_RECORD_BYTES));
    }
    body
}

async fn behave(world: &Arc<World>, fence: Option<Fence>, headers: &HeaderMap, cmd: Cmd) -> Response {
    let req = headers
        .get("x-sim-req")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("every request names itself");
    let exec = world.exec_start(req, fence.as_ref().map(Fence::token));
    let running = Running { world, exec };
    act(world, &cmd, fence.as_ref()).await;
    let status = StatusCode::from_u16(if cmd.kind == Kind::Status { cmd.status } else { 201 }).unwrap();
    let body = Bytes::from(serde_json::to_vec(&answer_body(exec, req, &cmd)).unwrap());
    std::mem::forget(running);
    world.exec_end(exec, Some((status.as_u16(), body.clone())));
    let headers = [("content-type", HeaderValue::from_static("application/json")), ("x-exec", HeaderValue::from(exec))];
    if cmd.kind == Kind::Stream {
        // Unknown length: sent through as it comes, never buffered for a record.
        let chunks = futures_util::stream::unfold(Some(body), |rest| async move {
            let mut rest = rest?;
            tokio::time::sleep(Duration::from_millis(STREAM_CHUNK_PAUSE_MS)).await;
            let chunk = rest.split_to(rest.len().min(8));
            Some((Ok::<_, std::io::Error>(chunk), (!rest.is_empty()).then_some(rest)))
        });
        return (status, headers, Body::from_stream(chunks)).into_response();
    }
    (status, headers, body).into_response()
}

/// The once door's work: runs on the calling task, which holds the claim.
pub async fn once_work(world: Arc<World>, req: usize, cmd: Cmd) -> Result<serde_json::Value, String> {
    let exec = world.exec_start(req, None);
    let running = Running { world: &world, exec };
    act(&world, &cmd, None).await;
    std::mem::forget(running);
    let status = if cmd.kind == Kind::Status { cmd.status } else { 200 };
    if status >= 500 {
        world.exec_end(exec, Some((status, Bytes::new())));
        return Err(format!("failed with {status}"));
    }
    let value = answer_body(exec, req, &cmd);
    world.exec_end(exec, Some((200, Bytes::from(serde_json::to_vec(&value).unwrap()))));
    Ok(value)
}
