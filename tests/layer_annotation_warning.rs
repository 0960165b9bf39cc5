//! A route both annotated and under an `IdempotencyLayer` says so, once per route and layer, at its first contact:
//! the moment the layer stops applying its own settings to it. Its own test binary: tracing caches, per call site,
//! whether any subscriber wants an event, and a test running beside it without a subscriber can settle that first.

mod log_capture;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem::{Idempotency, idempotent};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent]
async fn annotated(State(runs): State<Runs>) -> StatusCode {
    runs.0.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

async fn plain(State(runs): State<Runs>) -> StatusCode {
    runs.0.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

async fn send(app: &Router, path: &str, key: &str) -> StatusCode {
    let request = Request::post(path).header("idempotency-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn the_first_contact_of_an_annotated_route_under_a_layer_is_reported_once() {
    let (log, _guard) = log_capture::capture();
    let reports = |route: &str| {
        let text = log.text();
        text.lines().filter(|line| line.contains("also under an IdempotencyLayer") && line.contains(route)).count()
    };

    let runs = Runs::default();
    let idempotency = Idempotency::in_memory();
    let app = Router::new()
        .route("/annotated", post(annotated))
        .route("/plain", post(plain))
        .layer(idempotency.layer())
        .with_state(runs.clone());
    assert_eq!(send(&app, "/annotated", "a-1").await, StatusCode::CREATED);
    assert_eq!(reports("\"/annotated\""), 1, "reported at first contact");
    for key in ["a-1", "a-2", "a-3"] {
        assert_eq!(send(&app, "/annotated", key).await, StatusCode::CREATED);
    }
    assert_eq!(reports("\"/annotated\""), 1, "and only then");
    // A plain route under the layer is the layer's alone: nothing to report.
    assert_eq!(send(&app, "/plain", "p-1").await, StatusCode::CREATED);
    assert_eq!(reports("\"/plain\""), 0);
    // a-1 replayed, a-2 and a-3 ran, plus the plain route.
    assert_eq!(runs.0.load(Ordering::SeqCst), 4);

    // An annotated route with no layer in front has nothing to report.
    let alone = Router::new()
        .route("/alone", post(annotated))
        .layer(axum::Extension(Idempotency::in_memory()))
        .with_state(runs.clone());
    assert_eq!(send(&alone, "/alone", "b-1").await, StatusCode::CREATED);
    assert_eq!(reports("\"/alone\""), 0);
}
