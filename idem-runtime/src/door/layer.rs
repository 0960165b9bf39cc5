//! The tower layer: app-wide idempotency for every unsafe method of a router.

use crate::door::handoff::{AnnotatedRoutes, Handoff, LayerRoutes};
use crate::door::pipeline::{BodyLimit, process};
use crate::door::span::{Door, request_span};
use crate::engine::Idempotency;
use crate::http::execution::Execution;
use crate::policy::Policy;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tracing::Instrument;

/// Makes every `POST`, `PUT`, `PATCH` and `DELETE` of a router idempotent when it carries the key header, with the
/// app-wide settings of an [`Idempotency`]; other methods pass through untouched.
///
/// Built with [`Idempotency::layer`] (or [`IdempotencyLayer::new`]) and applied with `Router::layer`. The layer
/// uses the engine's settings (store, key header, principal, fingerprint headers, record size, store-failure
/// policy, metrics) plus its own, each with a setter here:
/// - [`policy`](Self::policy): ttl, `wait_timeout`, signature validation, lease, `store_server_errors`, and
///   `required`, which defaults to **false** on a layer (a request without a key runs unprotected), unlike on
///   `#[idempotent]`;
/// - [`body_limit`](Self::body_limit): how much of a body the layer buffers to fingerprint it (default 2 MiB; over
///   it, `413 payload-too-large`). The layer runs before route-level `DefaultBodyLimit`s, so it has its own;
/// - [`methods`](Self::methods) and [`unstored_statuses`](Self::unstored_statuses), below.
///
/// It also puts the `Idempotency` in the request extensions, so `#[idempotent]` handlers under it find the engine
/// without `FromRef`.
///
/// On a route that is not annotated the layer cannot tell a handler's answer from a rejection by an extractor, the
/// router or a middleware further in, so it never stores the statuses such rejections use
/// ([`unstored_statuses`](Self::unstored_statuses); default 400, 401, 403, 404, 405, 408, 409, 413, 415, 422 and
/// 429): they are sent, the key is released, a retry runs.
///
/// ```
/// # use idem_runtime as idem;
/// use axum::{Router, routing::post};
/// use idem::{Idempotency, MemoryStore, Policy};
/// use std::time::Duration;
///
/// let idempotency = Idempotency::new(MemoryStore::new());
/// let app: Router = Router::new()
///     .route("/transfers", post(|| async { "moved" }))
///     .layer(idempotency.layer().policy(Policy::new().required(false).ttl(Duration::from_secs(3600))));
/// # let _ = app;
/// ```
///
/// # Routes that are also annotated
///
/// A route under the layer that is also annotated with `#[idempotent]` is processed **once**, with the
/// annotation's settings:
///
/// - When the layer claims a key it offers the claim to the handler through the request extensions. The annotated
///   handler adopts it (no second claim, no second fingerprint), runs, stores the response with its own `ttl`,
///   `lease` and `store_server_errors`, and sets the `Idempotency-Key`, `X-Idempotency-Status` and
///   `X-Idempotency-Signature` headers itself; the layer then passes the response through untouched. The claim's
///   renewals go on through the handoff (the layer's task keeps renewing it), at once with the annotation's `lease`
///   before the handler runs, so the key is never unowned, whichever of the two leases is longer.
/// - The annotated handler also records its route (method and [`MatchedPath`]) with the layer that wraps that route
///   (each route under `Router::layer` gets its own service, with its own record) the first time a request reaches
///   it, before its extractors run. From then on the layer does not process that route at
///   all and the annotation applies in full: `wait_timeout`, `validate_signature`, `required` and axum's
///   `DefaultBodyLimit` included.
/// - So until a request has reached an annotated handler once in a process (its **first contact**), requests to
///   that route are claimed by the layer with the layer's settings: its body limit, and for a duplicate of a
///   request the layer claimed, its `wait_timeout` and signature check. Whatever the layer claimed is still run
///   once and stored with the annotation's `ttl`, `lease` and `store_server_errors`. A request without a key
///   passes the layer (its `required` is false by default) and meets the annotation's `required` even before
///   first contact. Processes that share a store each have their own first contact.
/// - Why first contact stays: the layer must decide whether to claim before it calls the route, and only the
///   handler can tell it, by running, that the route is annotated *in this process*. Telling it through the store
///   (records and claims marked by annotated handlers, the layer passing marked keys through untouched) would not
///   be sound: a mark describes the process and the version of the app that wrote it, and after a rolling deploy
///   that made the handler plain, or beside another app on the same store, the layer would let a retry of a
///   completed request through to a plain handler, which runs it again, and would stop protecting the route. Nor
///   could it help a fresh key, whose body the layer must read (within its limit) to fingerprint it before there is
///   anything in the store to look at. To have an annotation apply from the very first request, keep the layer off
///   annotated routes (below).
/// - The registry needs [`MatchedPath`], which axum sets for routes under `Router::layer` or
///   `Router::route_layer`. Wrapping a whole router from outside (`IdempotencyLayer::new(..).layer(router)`)
///   leaves only the handoff: every request to an annotated route is then claimed with the layer's settings and
///   completed with the annotation's.
///
/// # One policy per route or per router
///
/// Each layer carries its own settings: [`IdempotencyLayer::policy`],
/// [`IdempotencyLayer::methods`], [`IdempotencyLayer::body_limit`] and [`IdempotencyLayer::unstored_statuses`]. Put
/// one on a single route (`post(handler).layer(..)`) or on a nested router to give those routes their own `ttl` or
/// `wait_timeout`, the tower way, instead of one policy for the whole app:
///
/// ```
/// # use idem_runtime as idem;
/// use axum::{Router, routing::post};
/// use idem::{Idempotency, MemoryStore, Policy};
/// use std::time::Duration;
///
/// let idempotency = Idempotency::new(MemoryStore::new());
/// let payments = Policy::new().required(true).ttl(Duration::from_secs(86_400)).wait_timeout(Duration::from_secs(5));
/// let app: Router = Router::new()
///     // Keys required and kept a day on this route only.
///     .route("/payments", post(|| async { "paid" }).layer(idempotency.layer().policy(payments)))
///     // The rest of the API: the engine's layer defaults.
///     .nest("/v1", Router::new().route("/notes", post(|| async { "noted" })).layer(idempotency.layer()));
/// # let _ = app;
/// ```
///
/// An annotated route needs no layer: its annotation is its policy. Keeping layers off annotated routes (a layer per
/// route or per router of plain handlers, as above) also keeps clear of the first-contact rule described above.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    idempotency: Idempotency,
    settings: Arc<LayerSettings>,
}

/// What one layer applies.
#[derive(Debug, Clone)]
struct LayerSettings {
    policy: Policy,
    body_limit: usize,
    unstored: Vec<StatusCode>,
    methods: Vec<Method>,
}

impl IdempotencyLayer {
    /// A layer over `idempotency`'s store and settings.
    pub fn new(idempotency: Idempotency) -> Self {
        let settings = LayerSettings {
            policy: Policy::new().required(false),
            body_limit: DEFAULT_BODY_LIMIT,
            unstored: UNSTORED.to_vec(),
            methods: vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
        };
        Self { idempotency, settings: Arc::new(settings) }
    }

    /// This layer's policy (default: [`Policy::new`] with `required(false)`).
    pub fn policy(mut self, policy: Policy) -> Self {
        Arc::make_mut(&mut self.settings).policy = policy;
        self
    }

    /// The methods this layer makes idempotent (default `POST`, `PUT`, `PATCH`, `DELETE`); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        Arc::make_mut(&mut self.settings).methods = methods.into_iter().collect();
        self
    }

    /// How much of a body this layer buffers to fingerprint it (default 2 MiB, axum's default body limit); a larger
    /// one is answered `413 payload-too-large`. Annotated handlers keep using axum's `DefaultBodyLimit` instead.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.settings).body_limit = bytes;
        self
    }

    /// Statuses this layer sends through but never stores, where it cannot tell a handler's answer from a rejection
    /// by an extractor, the router or a middleware further in; a retry then runs again. Default: 400, 401, 403, 404,
    /// 405, 408, 409, 413, 415, 422 and 429 (5xx follow the policy's `store_server_errors`). Annotated routes tell
    /// the two apart and store every answer their handler gives.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use axum::http::StatusCode;
    /// use idem::Idempotency;
    /// // A plain handler whose own 409 is a final answer worth replaying:
    /// let layer = Idempotency::in_memory()
    ///     .layer()
    ///     .unstored_statuses([StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::TOO_MANY_REQUESTS]);
    /// # let _ = layer;
    /// ```
    pub fn unstored_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        Arc::make_mut(&mut self.settings).unstored = statuses.into_iter().collect();
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // `Router::layer` layers each route (each method of each path) on its own, so a registry per service is a
        // registry per route: an annotation elsewhere, even in another router on the same engine, cannot switch this
        // route's protection off.
        IdempotencyService {
            inner,
            idempotency: self.idempotency.clone(),
            settings: self.settings.clone(),
            annotated: Arc::default(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Debug, Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    idempotency: Idempotency,
    settings: Arc<LayerSettings>,
    /// The annotated routes behind this service, as their handlers reported them (shared by its clones).
    annotated: Arc<AnnotatedRoutes>,
}

impl<S, B> Service<axum::http::Request<B>> for IdempotencyService<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Response: IntoResponse,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        // The clone-and-swap idiom: call the service that was polled ready, leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let idempotency = self.idempotency.clone();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(idempotency.clone());
        // A layer further out already owns this request's claim (layers nested with nested routers): one claim.
        let claimed_outside = request.extensions().get::<Handoff>().is_some();
        let annotated = request
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|path| self.annotated.contains(request.method(), path.as_str()));
        match request.extensions_mut().get_mut::<LayerRoutes>() {
            Some(routes) => routes.0.push(self.annotated.clone()),
            None => {
                request.extensions_mut().insert(LayerRoutes(vec![self.annotated.clone()]));
            }
        }
        let settings = self.settings.clone();
        if !settings.methods.contains(request.method()) || claimed_outside || annotated {
            return Box::pin(async move { inner.call(request).await.map(IntoResponse::into_response) });
        }
        Box::pin(async move {
            let span = request_span(Door::Layer, &request);
            let policy = settings.policy;
            let limit = BodyLimit::Bytes(settings.body_limit);
            // The inner service's error cannot travel through the engine (it answers responses): it is parked
            // here, the claim released as for a rejection, and returned as the error it was.
            let failed = Arc::new(Mutex::new(None));
            let parked = failed.clone();
            let run = move |request: Request| async move {
                match inner.call(request).await {
                    // The layer cannot tell a handler's answer from a rejection by an extractor, the router or a
                    // middleware further in (a 404, a 429): those statuses are sent but never stored.
                    Ok(response) => {
                        let response = response.into_response();
                        if settings.unstored.contains(&response.status()) {
                            Execution::Rejected(response)
                        } else {
                            Execution::Ran(response)
                        }
                    }
                    Err(error) => {
                        *parked.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                        Execution::Rejected(StatusCode::INTERNAL_SERVER_ERROR.into_response())
                    }
                }
            };
            let response =
                process(&idempotency.engine, &policy, limit, request, run, Door::Layer).instrument(span).await;
            match failed.lock().unwrap_or_else(PoisonError::into_inner).take() {
                Some(error) => Err(error),
                None => Ok(response),
            }
        })
    }
}

/// How much of a body a layer buffers by default: axum's own default body limit, 2 MiB.
const DEFAULT_BODY_LIMIT: usize = 2 << 20;

/// What a layer never stores by default: answers that routing, extractors and middleware give without the handler
/// running (a malformed body, an unknown route, a rate limit, missing credentials), which a retry must be able to
/// get past. The same set `axum-idempotent` and Stripe leave unstored.
const UNSTORED: [StatusCode; 11] = [
    StatusCode::BAD_REQUEST,
    StatusCode::UNAUTHORIZED,
    StatusCode::FORBIDDEN,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::REQUEST_TIMEOUT,
    StatusCode::CONFLICT,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::UNSUPPORTED_MEDIA_TYPE,
    StatusCode::UNPROCESSABLE_ENTITY,
    StatusCode::TOO_MANY_REQUESTS,
];

// An `Infallible` inner error (axum's `Route`) makes the layer's error `Infallible` too, as `Router::layer` needs.
const _: fn() = || {
    fn assert_router_layer<L>()
    where
        L: Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
    {
    }
    assert_router_layer::<IdempotencyLayer>();
};
