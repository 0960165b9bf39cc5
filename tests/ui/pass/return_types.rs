// Any `IntoResponse` return type, not only JSON.

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::{Idempotency, idempotent};
use serde::Serialize;

#[derive(Clone, FromRef)]
struct AppState {
    idempotency: Idempotency,
}

#[derive(Serialize)]
struct Order {
    id: u64,
}

enum AppError {
    OutOfStock,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::OutOfStock => (StatusCode::CONFLICT, "out of stock").into_response(),
        }
    }
}

#[idempotent]
async fn json(State(_state): State<AppState>) -> Json<Order> {
    Json(Order { id: 1 })
}

#[idempotent]
async fn status_and_json(State(_state): State<AppState>) -> (StatusCode, Json<Order>) {
    (StatusCode::CREATED, Json(Order { id: 1 }))
}

#[idempotent]
async fn string(State(_state): State<AppState>) -> String {
    String::from("created")
}

#[idempotent]
async fn result(State(_state): State<AppState>, body: String) -> Result<Json<Order>, AppError> {
    if body.is_empty() { Err(AppError::OutOfStock) } else { Ok(Json(Order { id: 1 })) }
}

#[idempotent]
async fn response(State(_state): State<AppState>) -> Response {
    StatusCode::ACCEPTED.into_response()
}

#[idempotent]
async fn opaque(State(_state): State<AppState>) -> impl IntoResponse {
    (StatusCode::CREATED, [("location", "/orders/1")], Json(Order { id: 1 }))
}

fn main() {
    let state = AppState { idempotency: Idempotency::in_memory() };
    let _app: Router = Router::new()
        .route("/json", post(json))
        .route("/status_and_json", post(status_and_json))
        .route("/string", post(string))
        .route("/result", post(result))
        .route("/response", post(response))
        .route("/opaque", post(opaque))
        .with_state(state);
}
