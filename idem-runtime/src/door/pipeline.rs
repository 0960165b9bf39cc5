//! The HTTP pipeline every protected request runs, whichever door it came in by (`#[idempotent]` or the layer):
//! read the key, buffer and fingerprint the body, claim or wait, then run the handler on a task of its own, replay,
//! or refuse, as the protocol's [`decide`] says.

use crate::capacity::holding;
use crate::door::handoff::{Adoptable, Handoff, register_annotated_route};
use crate::door::span::{Door, request_span};
use crate::engine::Engine;
use crate::fingerprint::Fingerprint;
use crate::http::execution::Execution;
use crate::http::extract::IdempotencyKey;
use crate::http::fingerprint::of_request;
use crate::http::headers::{REPLAYED_HEADER, SIGNATURE_HEADER, STATUS_HEADER};
use crate::http::key;
use crate::http::problem::{Answers, Problem};
use crate::http::replay;
use crate::http::target::target;
use crate::metrics::{Event, Metrics};
use crate::policy::Policy;
use crate::protocol::begin::begin_observed;
use crate::protocol::claim::Claim;
use crate::protocol::decision::{Decision, Refusal, decide};
use crate::record::Stored;
use crate::store::contract::Write;
use crate::store_key;
use crate::tx::hook::HandlerTransaction;
use crate::tx::unkept::Unkept;
use axum::RequestExt;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tracing::Instrument;

/// How much of a request body the door buffers before fingerprinting it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyLimit {
    /// axum's `DefaultBodyLimit` (2 MiB unless the router sets another): the annotated handler's door.
    Axum,
    /// A fixed number of bytes: the layer's door, which runs before any route-level `DefaultBodyLimit`.
    Bytes(usize),
}

/// How a claimed request's work ended.
enum Finished {
    /// As [`Execution::Ran`]: the answer of the work.
    Ran(Response),
    /// As [`Execution::Rejected`].
    Rejected(Response),
    /// An annotated handler further in took the claim over and answered with its own settings and headers.
    Adopted(Response),
}

/// Answers `request` idempotently under `policy`: reads the key, buffers the body under axum's
/// `DefaultBodyLimit`, fingerprints it, then runs `run` once (detached from the connection, so a client that
/// disconnects does not cancel it), replays, waits or refuses as the behaviour table says.
///
/// Under an `IdempotencyLayer` that already claimed the key, it adopts that claim instead of claiming again, so the
/// request is processed once, with `policy`.
pub(crate) async fn handle<F, Fut>(engine: &Engine, policy: &Policy, mut request: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    register_annotated_route(&request);
    let span = request_span(Door::Handler, &request);
    if let Some(handoff) = request.extensions_mut().remove::<Handoff>()
        && let Some(adoptable) = handoff.take()
    {
        span.record("outcome", "adopted");
        return adopt(engine, adoptable, policy, request, run).instrument(span).await;
    }
    process(engine, policy, BodyLimit::Axum, request, run, Door::Handler).instrument(span).await
}

/// The annotated handler's half of the layer handoff: run with the claim the layer made, under `policy`.
async fn adopt<F, Fut>(engine: &Engine, adoptable: Adoptable, policy: &Policy, request: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let Adoptable { mut claim, echo } = adoptable;
    let fingerprint = claim.fingerprint();
    // The layer's lease runs on until this renewal lands with the annotation's lease: the key is never unowned,
    // whichever of the two leases is longer.
    let mut response = match claim.renew_for(policy.get_lease()).await {
        Ok(Write::Applied) => {
            // The key and fence extensions the layer set stay: they name the same key and the same claim.
            match execute(engine, claim, policy, request, run, None).await {
                Finished::Ran(response) => with_status(response, "new"),
                Finished::Rejected(response) | Finished::Adopted(response) => response,
            }
        }
        // The layer's claim lapsed before the handler was reached and the key is someone else's now.
        Ok(Write::Fenced) => engine.answers.render(Problem::InProgress),
        Err(error) => {
            tracing::error!(%error, "idempotency store failed while taking the claim over: answering 503");
            drop(claim);
            engine.answers.render(Problem::StoreUnavailable)
        }
    };
    identify(&engine.answers, &mut response, echo, fingerprint);
    response
}

/// The protocol of one request, shared by the annotated handler's door and the layer's. With `door` =
/// [`Door::Layer`] a claimed request offers its claim to an annotated handler further in.
pub(crate) async fn process<F, Fut>(
    engine: &Engine,
    policy: &Policy,
    limit: BodyLimit,
    request: Request,
    run: F,
    door: Door,
) -> Response
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let shared = engine;
    let span = tracing::Span::current();
    let parsed = key::parse(request.headers().get_all(&shared.key_header))
        .and_then(|key| key.map(|key| shared.key_format.check(&key).map(|()| key)).transpose());
    let key = match parsed {
        Ok(Some(key)) => key,
        Ok(None) if policy.get_required() => {
            span.record("outcome", "missing-key");
            return shared.answers.render(Problem::MissingKey { header: shared.key_header.to_string() });
        }
        Ok(None) => {
            let Some(slot) = shared.handler_slots.take() else {
                let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
                return at_capacity(shared, &shared.metrics_at(door.name(), route));
            };
            span.record("outcome", "no-key");
            return run_unprotected(shared, request, holding(slot, run)).await;
        }
        Err(error) => {
            span.record("outcome", "invalid-key");
            return shared.answers.render(Problem::InvalidKey { reason: error.to_string() });
        }
    };
    let echo = request.headers().get(&shared.key_header).map(|value| (shared.key_header.clone(), value.clone()));
    let (parts, body) = match limit {
        BodyLimit::Axum => request.with_limited_body().into_parts(),
        BodyLimit::Bytes(limit) => {
            let (parts, body) = request.into_parts();
            (parts, Body::new(http_body_util::Limited::new(body, limit)))
        }
    };
    // Before the body is read: a request refused here costs nothing more.
    let Some(principal) = (shared.principal)(&parts) else {
        span.record("outcome", "no-principal");
        tracing::error!(
            "idempotency: a request with a key reached idem without the extension `principal_from_extension` \
             scopes records by: answering 500 no-principal, nothing ran. The app's authentication must insert \
             it before idem runs (layer it outside the routes or the IdempotencyLayer)"
        );
        return shared.answers.render(Problem::NoPrincipal);
    };
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(error) if is_length_limit(&error) => {
            span.record("outcome", "payload-too-large");
            return shared.answers.render(Problem::PayloadTooLarge);
        }
        Err(_) => {
            span.record("outcome", "unreadable-body");
            return shared.answers.render(Problem::UnreadableBody);
        }
    };
    let fingerprint = of_request(&shared.fingerprint_headers, &parts, &body, policy.get_fingerprint_body());
    if principal.is_empty() {
        shared.warn_unscoped_once();
    }
    let path = target(parts.extensions.get(), &parts.uri).path();
    let store_key = store_key::http(&parts.method, path, &principal, key.as_str());
    span.record("key", store_key.as_str());
    let mut request = Request::from_parts(parts, Body::from(body));
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
    let metrics = shared.metrics_at(door.name(), route);
    // Taken after the body is read (a client sending its body slowly holds no slot) and before the store is
    // touched, so a refused request claimed nothing and its retry runs. The handler's future holds it: it is
    // given back when the handler ends, or at once when no handler runs (a replay, a refusal).
    let Some(slot) = shared.handler_slots.take() else {
        let mut response = at_capacity(shared, &metrics);
        identify(&shared.answers, &mut response, echo, fingerprint);
        return response;
    };
    let run = holding(slot, run);
    let begun = begin_observed(&shared.background, &metrics, store_key, fingerprint, policy).await;
    let mut response = match decide(begun, shared.on_store_failure) {
        Decision::Execute(claim) => {
            // Only for requests that run: a replay or a refusal never reaches the handler.
            request.extensions_mut().insert(IdempotencyKey::new(key.as_str()));
            let handoff = match door {
                Door::Layer => Some(echo.clone()),
                Door::Handler => None,
            };
            match execute(shared, claim, policy, request, run, handoff).await {
                Finished::Ran(response) => with_status(response, "new"),
                Finished::Rejected(rejection) => rejection,
                // The adopting handler set the headers; adding them again would repeat them.
                Finished::Adopted(response) => return response,
            }
        }
        Decision::Replay(record) => match &record.stored {
            Stored::Response(stored) => {
                let mut response = replay::rebuild(stored);
                response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                with_status(response, "hit")
            }
            Stored::NotReplayable { status } => shared.answers.render(Problem::NotReplayable { status: *status }),
        },
        Decision::Refuse(refusal) => shared.answers.render(match refusal {
            Refusal::InFlight => Problem::InProgress,
            Refusal::Mismatch => Problem::KeyReused,
            Refusal::Corrupt(_) => Problem::CorruptRecord,
            Refusal::StoreUnavailable(_) => Problem::StoreUnavailable,
        }),
        Decision::RunUnprotected => {
            // A handler forwarding the key downstream keeps that protection, at least.
            request.extensions_mut().insert(IdempotencyKey::new(key.as_str()));
            return run_unprotected(shared, request, run).await;
        }
    };
    identify(&shared.answers, &mut response, echo, fingerprint);
    response
}

/// The answer to a request refused because the engine runs as many handlers as it may, counted in `metrics`.
fn at_capacity(shared: &Engine, metrics: &Arc<dyn Metrics>) -> Response {
    tracing::Span::current().record("outcome", "at-capacity");
    metrics.record(Event::AtCapacity);
    shared.answers.render(Problem::AtCapacity)
}

fn with_status(mut response: Response, status: &'static str) -> Response {
    response.headers_mut().insert(STATUS_HEADER, HeaderValue::from_static(status));
    response
}

/// The headers that name the request on every answer made after the key was read: the key echoed, the signature.
fn identify(
    answers: &Answers,
    response: &mut Response,
    echo: Option<(HeaderName, HeaderValue)>,
    fingerprint: Fingerprint,
) {
    let headers = response.headers_mut();
    if let Some((name, value)) = echo {
        headers.insert(name, value);
    }
    if answers.signature_header
        && let Ok(signature) = HeaderValue::try_from(fingerprint.to_hex())
    {
        headers.insert(SIGNATURE_HEADER, signature);
    }
}

/// Runs the handler on its own task, so the connection's future being dropped (client gone) cannot cancel it
/// between the side effect and the record; a panic is caught there and becomes a 500 that releases the key.
///
/// With `handoff` (the layer's door, carrying the key header to echo), the claim is offered to an annotated
/// handler further in through the request extensions; if one takes it, it completes the claim itself and the
/// answer is `Finished::Adopted`. The engine's lease keeper renews the lease, on a task apart from the handler's
/// (a handler that blocks its thread keeps its lease), until the claim is completed, released or dropped.
///
/// The task is counted in `shared.running` until it ends, for `Idempotency::drain`.
async fn execute<F, Fut>(
    shared: &Engine,
    claim: Claim,
    policy: &Policy,
    request: Request,
    run: F,
    handoff: Option<Option<(HeaderName, HeaderValue)>>,
) -> Finished
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let task = spawn_execution(shared, claim, policy, request, run, handoff);
    task.await.unwrap_or_else(|error| {
        tracing::error!(%error, "the idempotent handler's task ended abnormally");
        Finished::Ran(shared.answers.render(Problem::HandlerPanicked))
    })
}

/// Makes and spawns [`execute`]'s task. A plain function, so that the task's future (a whole handler's, several KiB)
/// is never part of the state of the `async fn` awaiting it: there it would be copied with that state, and again
/// with every future wrapping it.
fn spawn_execution<F, Fut>(
    shared: &Engine,
    claim: Claim,
    policy: &Policy,
    mut request: Request,
    run: F,
    handoff: Option<Option<(HeaderName, HeaderValue)>>,
) -> tokio::task::JoinHandle<Finished>
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let ttl = policy.get_ttl();
    let store_server_errors = policy.get_store_server_errors();
    let limit = shared.max_record_bytes;
    let answers = shared.answers.clone();
    let running = shared.running.enter();
    // The fence starts the keeper (under the layer's handoff it keeps the lease already).
    request.extensions_mut().insert(claim.fence());
    let transaction = HandlerTransaction::offer(shared, &mut request);
    let task = async move {
        let _running = running;
        let (claim, ran) = match handoff {
            None => (claim, AssertUnwindSafe(run(request)).catch_unwind().await),
            Some(echo) => {
                // The claim travels with its keeper's handle: an adopting handler renews it through this task.
                let offered = Handoff::offer(Adoptable { claim, echo });
                request.extensions_mut().insert(offered.clone());
                let ran = AssertUnwindSafe(run(request)).catch_unwind().await;
                match offered.take() {
                    Some(adoptable) => (adoptable.claim, ran),
                    None => {
                        let response =
                            ran.map_or_else(|_| answers.render(Problem::HandlerPanicked), |e| e.into_response());
                        return Finished::Adopted(response);
                    }
                }
            }
        };
        let response = match ran {
            Ok(Execution::Ran(response)) => response,
            Ok(Execution::Rejected(rejection)) => {
                transaction.roll_back().await;
                let _ = claim.release().await;
                return Finished::Rejected(rejection);
            }
            Err(_) => {
                tracing::error!(key = %claim.key(), "the idempotent handler panicked; its key is released");
                // Whatever it wrote before panicking is half done: never committed, even where 5xx are stored.
                transaction.roll_back().await;
                answers.render(Problem::HandlerPanicked)
            }
        };
        if response.status().is_server_error() && !store_server_errors {
            transaction.roll_back().await;
            let _ = claim.release().await;
            return Finished::Ran(response);
        }
        let (response, stored) = replay::capture(response, limit).await;
        match transaction.complete(claim, stored, ttl).await {
            Ok(Ok(())) => {}
            // Its writes were rolled back: the answer must not claim they happened.
            Ok(Err(unkept)) => return Finished::Rejected(answers.render(unkept_problem(unkept))),
            Err((claim, stored)) => {
                let _ = claim.complete(stored, ttl).await;
            }
        }
        Finished::Ran(response)
    };
    // Boxed: the task then holds a pointer, not the whole future, which it would otherwise copy once more when it
    // hands its output over.
    tokio::spawn(Box::pin(task.instrument(tracing::Span::current())))
}

/// Runs a request that no claim protects (no key and none required, or a store failure under fail-open) the way a
/// protected one runs: on its own task, so a client that disconnects does not cancel it halfway through its side
/// effects, and with a panic answered as a 500 problem rather than a dropped connection.
async fn run_unprotected<F, Fut>(shared: &Engine, request: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    match spawn_unprotected(shared, request, run).await {
        Ok(Ok(execution)) => execution.into_response(),
        Ok(Err(_)) | Err(_) => {
            tracing::error!("a handler run without an idempotency claim panicked");
            shared.answers.render(Problem::HandlerPanicked)
        }
    }
}

/// Makes and spawns [`run_unprotected`]'s task, outside any `async fn` (see [`spawn_execution`]).
fn spawn_unprotected<F, Fut>(
    shared: &Engine,
    mut request: Request,
    run: F,
) -> tokio::task::JoinHandle<std::thread::Result<Execution>>
where
    F: FnOnce(Request) -> Fut + Send + 'static,
    Fut: Future<Output = Execution> + Send + 'static,
{
    let running = shared.running.enter();
    let transaction = HandlerTransaction::offer(shared, &mut request);
    let answers = shared.answers.clone();
    let task = async move {
        let ran = AssertUnwindSafe(run(request)).catch_unwind().await;
        let keep = matches!(&ran, Ok(Execution::Ran(response)) if !response.status().is_server_error());
        let finished = transaction.finish_unclaimed(keep).await;
        drop(running);
        match finished {
            Ok(()) => ran,
            Err(unkept) => Ok(Execution::Ran(answers.render(unkept_problem(unkept)))),
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()))
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// How the pipeline answers a handler whose transactional writes were not kept with its record.
fn unkept_problem(unkept: Unkept) -> Problem {
    match unkept {
        // Its writes were rolled back: the answer must not claim they happened.
        Unkept::ClaimLost => Problem::InProgress,
        Unkept::Failed => Problem::TransactionFailed,
    }
}
