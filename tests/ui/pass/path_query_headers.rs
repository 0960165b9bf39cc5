// Parts extractors (`Path`, `Query`, `HeaderMap`) before a JSON body.

use axum::extract::{FromRef, Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[derive(Deserialize)]
struct Paging {
    dry_run: Option<bool>,
}

#[derive(Deserialize)]
struct NewLine {
    sku: String,
}

#[idempotent(ttl = 60)]
async fn add_line(
    State(_state): State<AppState>,
    Path((order_id, line)): Path<(u64, u32)>,
    Query(paging): Query<Paging>,
    headers: HeaderMap,
    Json(new_line): Json<NewLine>,
) -> String {
    let agent = headers.get("user-agent").and_then(|value| value.to_str().ok()).unwrap_or("?");
    format!("{order_id}/{line} {} {:?} {agent}", new_line.sku, paging.dry_run)
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new().route("/orders/{id}/lines/{line}", post(add_line)).with_state(state);
}
