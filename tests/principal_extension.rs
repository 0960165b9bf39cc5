//! Scoping records by the identity the app's authentication established
//! (`IdempotencyBuilder::principal_from_extension`), on both doors (issue 16, item 6): a retry sent with a refreshed
//! token is the same client's retry and is replayed; two users never share a record, even with one key; a request
//! that reaches idem without the identity is refused before the store is touched.

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idem::metrics::{Event, Metrics, StoreOperation};
use idem::test_kit::client::{Reply, fresh_key};
use idem::{Idempotency, MemoryStore, idempotent};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

/// What the app's authentication establishes: the user, whichever of the user's tokens the request carried.
#[derive(Clone, Debug)]
struct UserId(u64);

const ALICE: u64 = 7;
const BOB: u64 = 8;

/// The app's authentication: a valid token names its user; a request without one goes through unidentified (as an
/// optional-authentication middleware lets it), for the route to decide.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let token = request.headers().get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    let user = match token {
        // Alice's token before and after a refresh.
        Some("Bearer alice-v1" | "Bearer alice-v2") => Some(UserId(ALICE)),
        Some("Bearer bob-v1") => Some(UserId(BOB)),
        _ => None,
    };
    if let Some(user) = user {
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    runs: Arc<AtomicUsize>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// A payment: which run made it and for whom. The user is read from the extension the handler's own code uses.
async fn pay(app: &App, user: Option<&UserId>, body: &Value) -> Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let user = user.map(|user| user.0);
    (StatusCode::CREATED, Json(json!({ "run": run, "user": user, "amount": body["amount"] }))).into_response()
}

#[idempotent]
async fn annotated_pay(State(app): State<App>, user: Option<Extension<UserId>>, Json(body): Json<Value>) -> Response {
    pay(&app, user.as_ref().map(|Extension(user)| user), &body).await
}

async fn plain_pay(State(app): State<App>, user: Option<Extension<UserId>>, Json(body): Json<Value>) -> Response {
    pay(&app, user.as_ref().map(|Extension(user)| user), &body).await
}

#[derive(Debug, Clone, Copy)]
enum Door {
    Annotated,
    Layer,
}

const DOORS: [Door; 2] = [Door::Annotated, Door::Layer];

/// Counts the store's claims: a request refused before the store claims nothing.
#[derive(Default)]
struct StoreClaims(AtomicUsize);

impl Metrics for StoreClaims {
    fn record(&self, _: Event) {}

    fn observe_wait(&self, _: Duration) {}

    fn observe_store(&self, operation: StoreOperation, _: Duration, _: bool) {
        if operation == StoreOperation::Claim {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The engine the app would build: records scoped by the authenticated user.
fn engine(claims: &Arc<StoreClaims>) -> Idempotency {
    Idempotency::builder(MemoryStore::new())
        .principal_from_extension(|user: &UserId| user.0.to_string())
        .metrics(claims.clone())
        .build()
}

/// `door` in front of the payment handler, with the authentication outermost so it runs before idem.
fn app(door: Door, idempotency: Idempotency) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let state = App { idempotency: idempotency.clone(), runs: runs.clone() };
    let router = match door {
        Door::Annotated => Router::new().route("/payments", post(annotated_pay)),
        Door::Layer => Router::new().route("/payments", post(plain_pay)).layer(idempotency.layer()),
    };
    (router.layer(middleware::from_fn(authenticate)).with_state(state), runs)
}

async fn send(router: &Router, key: &str, token: Option<&str>, body: &Value) -> Reply {
    let mut request = Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    if let Some(token) = token {
        request.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    }
    Reply::read(router.clone().oneshot(request).await.expect("infallible")).await
}

#[tokio::test]
async fn a_retry_after_a_token_refresh_is_replayed_not_run_again() {
    for door in DOORS {
        let (router, runs) = app(door, engine(&Arc::default()));
        let key = fresh_key("refresh");
        let body = json!({ "amount": 100 });

        let first = send(&router, &key, Some("alice-v1"), &body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{door:?}: {first:?}");
        first.assert_new(&key);
        assert_eq!(first.json()["user"], ALICE, "{door:?}");

        // The token expired and the client refreshed it before retrying: the same user, the same payment.
        let retry = send(&router, &key, Some("alice-v2"), &body).await;
        retry.assert_replays(&first, &key);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{door:?}: the refreshed token's retry ran the payment again");
    }
}

#[tokio::test]
async fn two_users_with_one_key_never_share_a_record() {
    for door in DOORS {
        let (router, runs) = app(door, engine(&Arc::default()));
        let key = fresh_key("two-users");
        let body = json!({ "amount": 250 });

        let alice = send(&router, &key, Some("alice-v1"), &body).await;
        alice.assert_new(&key);
        let bob = send(&router, &key, Some("bob-v1"), &body).await;
        bob.assert_new(&key);
        assert_eq!((alice.json()["user"].clone(), bob.json()["user"].clone()), (json!(ALICE), json!(BOB)), "{door:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{door:?}: one run per user");

        // Each is replayed its own answer, Alice's also under her refreshed token.
        send(&router, &key, Some("bob-v1"), &body).await.assert_replays(&bob, &key);
        send(&router, &key, Some("alice-v2"), &body).await.assert_replays(&alice, &key);
        send(&router, &key, Some("alice-v1"), &body).await.assert_replays(&alice, &key);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{door:?}: replays run nothing");
    }
}

#[tokio::test]
async fn a_request_without_the_extension_is_refused_before_the_store_and_claims_nothing() {
    for door in DOORS {
        let claims = Arc::new(StoreClaims::default());
        let (router, runs) = app(door, engine(&claims));
        let key = fresh_key("unidentified");
        let body = json!({ "amount": 5 });

        // Two unidentified clients with one key: neither runs, so neither can receive the other's answer.
        for token in [None, Some("stolen")] {
            let refused = send(&router, &key, token, &body).await;
            refused.assert_problem(500, "no-principal");
            assert_eq!(refused.header(header::RETRY_AFTER), None, "{door:?}: not a condition that passes by itself");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0, "{door:?}: an unidentified request ran");
        assert_eq!(claims.0.load(Ordering::SeqCst), 0, "{door:?}: an unidentified request reached the store");

        // Nothing was claimed: the same key, authenticated, runs at once.
        let identified = send(&router, &key, Some("alice-v1"), &body).await;
        identified.assert_new(&key);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{door:?}");
        assert_eq!(claims.0.load(Ordering::SeqCst), 1, "{door:?}");
    }
}

/// The default principal (the `Authorization` header) is the safe one when the app names no identity: a refreshed
/// token is another principal, so its retry runs again rather than risk two clients sharing a scope.
#[tokio::test]
async fn the_default_principal_treats_a_refreshed_token_as_another_client() {
    for door in DOORS {
        let (router, runs) = app(door, Idempotency::in_memory());
        let key = fresh_key("default");
        let body = json!({ "amount": 1 });
        send(&router, &key, Some("alice-v1"), &body).await.assert_new(&key);
        send(&router, &key, Some("alice-v2"), &body).await.assert_new(&key);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{door:?}");
    }
}
