//! Hostile requests through a real router: arbitrary `Idempotency-Key` header instances (repeated, quoted, broken
//! escapes, tabs, non-ASCII, past 255 characters), arbitrary bodies and arbitrary extra headers, each sent twice to
//! an `#[idempotent]` handler, to a plain route under the `IdempotencyLayer`, and to an annotated route under the
//! layer (the layer claims, the handler adopts), on a `MemoryStore`.
//!
//! Properties: nothing panics; idem never answers a 5xx problem of its own; a key the reference reading of
//! DESIGN.md §3 below calls malformed is answered `400 invalid-key` without running the handler; a well-formed key
//! runs the handler once, and the retry is a replay with the same status, body and headers.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256: a few seconds in a debug build).

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem::{Idempotency, MemoryStore, idempotent};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

// --- the reference reading of a key header ----------------------------------------------------------------------

/// What DESIGN.md §3 makes of the key header's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Absent,
    Malformed,
    Key,
}

/// Written from the design, not from the parser: exactly one instance; its value without the surrounding
/// whitespace HTTP strips (SP, HTAB); either an RFC 8941 sf-string (read with the RFC's algorithm: printable ASCII,
/// `\"` and `\\` the only escapes, nothing after the closing quote) or bare printable ASCII; 1–255 characters.
fn verdict(instances: &[Vec<u8>]) -> Verdict {
    match instances {
        [] => Verdict::Absent,
        [value] if reference_key(value).is_some() => Verdict::Key,
        _ => Verdict::Malformed,
    }
}

fn reference_key(value: &[u8]) -> Option<Vec<u8>> {
    let is_ows = |byte: &u8| matches!(byte, b' ' | b'\t');
    let start = value.iter().position(|byte| !is_ows(byte)).unwrap_or(value.len());
    let end = value.iter().rposition(|byte| !is_ows(byte)).map_or(start, |last| last + 1);
    let value = &value[start..end];
    let printable = |byte: u8| (0x20..=0x7e).contains(&byte);
    let text = if value.first() == Some(&b'"') {
        let mut chars = value[1..].iter().copied();
        let mut text = Vec::new();
        loop {
            match chars.next()? {
                b'\\' => match chars.next()? {
                    escaped @ (b'"' | b'\\') => text.push(escaped),
                    _ => return None,
                },
                b'"' if chars.next().is_none() => break text,
                b'"' => return None,
                byte if printable(byte) => text.push(byte),
                _ => return None,
            }
        }
    } else if value.iter().all(|&byte| printable(byte)) {
        value.to_vec()
    } else {
        return None;
    };
    (1..=255).contains(&text.len()).then_some(text)
}

#[test]
fn the_reference_reading_agrees_with_the_design_table() {
    let one = |value: &[u8]| verdict(&[value.to_vec()]);
    assert_eq!(verdict(&[]), Verdict::Absent);
    for good in [&b"abc"[..], b"\"abc\"", b" abc\t", br#""a\"b\\c""#, b"a\"b", b"a b", &[b'k'; 255]] {
        assert_eq!(one(good), Verdict::Key, "{}", good.escape_ascii());
    }
    let long_quoted = [&b"\""[..], &[b'k'; 255], b"\""].concat();
    assert_eq!(one(&long_quoted), Verdict::Key);
    for bad in [
        &b""[..],
        b"  ",
        b"\"\"",
        b"a\tb",
        "caf\u{e9}".as_bytes(),
        b"\"abc",
        br#""a\nb""#,
        br#""a"b""#,
        b"\"",
        &[b'k'; 256],
    ] {
        assert_eq!(one(bad), Verdict::Malformed, "{}", bad.escape_ascii());
    }
    assert_eq!(verdict(&[b"abc".to_vec(), b"abc".to_vec()]), Verdict::Malformed, "two instances, even equal");
    // Bytes a header value cannot hold at all never reach idem: `http` refuses them, and so does a server.
    assert!(HeaderValue::from_bytes(b"a\x01b").is_err() && HeaderValue::from_bytes(b"a\x7fb").is_err());
}

// --- the app under test ---------------------------------------------------------------------------------------

const BODY_LIMIT: usize = 1024;

/// What the handlers answer, picked by the body's first byte: the statuses idem stores and replays.
const STATUSES: [u16; 9] = [200, 201, 202, 204, 400, 402, 404, 409, 422];

/// The statuses the layer sends without storing on a plain route (where it cannot tell a handler's answer from an
/// extractor's rejection): a retry runs again. Set here rather than left to the default, so 400 and 422 are stored.
const LAYER_UNSTORED: [StatusCode; 2] = [StatusCode::NOT_FOUND, StatusCode::CONFLICT];

fn status_for(body: &[u8]) -> StatusCode {
    let status = body.first().map_or(201, |&byte| STATUSES[usize::from(byte) % STATUSES.len()]);
    StatusCode::from_u16(status).unwrap()
}

#[derive(Clone)]
struct App {
    idempotency: Idempotency,
    annotated_runs: Arc<AtomicUsize>,
    layered_runs: Arc<AtomicUsize>,
    both_runs: Arc<AtomicUsize>,
}

impl FromRef<App> for Idempotency {
    fn from_ref(app: &App) -> Self {
        app.idempotency.clone()
    }
}

/// Echoes the body and every `x-echo` request header (raw bytes both), numbered by execution.
fn answer(runs: &AtomicUsize, headers: &HeaderMap, body: Bytes) -> Response {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = (status_for(&body), [("x-run", run.to_string())], body).into_response();
    for value in headers.get_all("x-echo") {
        response.headers_mut().append("x-echo", value.clone());
    }
    response
}

#[idempotent]
async fn annotated(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&app.annotated_runs, &headers, body)
}

#[idempotent]
async fn annotated_under_layer(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&app.both_runs, &headers, body)
}

async fn plain(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&app.layered_runs, &headers, body)
}

/// A fresh store per case, so a key drawn twice by two cases cannot meet a different request.
fn app() -> (Router, App) {
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = App {
        idempotency: idempotency.clone(),
        annotated_runs: Arc::default(),
        layered_runs: Arc::default(),
        both_runs: Arc::default(),
    };
    let layered = Router::new()
        .route("/layered", post(plain).put(plain).patch(plain).delete(plain))
        .route("/both", post(annotated_under_layer).layer(DefaultBodyLimit::max(BODY_LIMIT)))
        .layer(idempotency.layer().body_limit(BODY_LIMIT).unstored_statuses(LAYER_UNSTORED));
    let annotated = Router::new().route("/annotated", post(annotated)).layer(DefaultBodyLimit::max(BODY_LIMIT));
    (layered.merge(annotated).with_state(app.clone()), app)
}

// --- what a case is ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    keys: Vec<Vec<u8>>,
    body: Vec<u8>,
    extra: Vec<(String, Vec<u8>)>,
    method: Method,
}

impl Case {
    fn request(&self, method: Method, path: &str) -> Request<Body> {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in &self.extra {
            builder = builder.header(name.as_str(), HeaderValue::from_bytes(value).expect("a header value"));
        }
        for key in &self.keys {
            builder = builder.header("idempotency-key", HeaderValue::from_bytes(key).expect("a header value"));
        }
        builder.body(Body::from(self.body.clone())).unwrap()
    }
}

fn printable() -> impl Strategy<Value = u8> {
    0x20u8..=0x7e
}

/// Any byte a header value can hold, weighted towards the ones the key parser branches on.
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => Just(b'"'),
        1 => Just(b'\\'),
        1 => 0x80u8..=0xff,
    ]
}

/// An sf-string: quoted printable ASCII with escapes, now and then a broken escape or a stray quote.
fn quoted(length: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        // Printable ASCII but the quote and the backslash, which are escaped.
        12 => prop_oneof![0x20u8..=0x21, 0x23u8..=0x5b, 0x5du8..=0x7e].prop_map(|byte| vec![byte]),
        1 => Just(b"\\\"".to_vec()),
        1 => Just(b"\\\\".to_vec()),
        1 => prop_oneof![Just(b"\\n".to_vec()), Just(b"\\".to_vec()), Just(b"\"".to_vec()), Just(b"\t".to_vec())],
    ];
    vec(piece, length).prop_map(|pieces| [&b"\""[..], &pieces.concat(), b"\""].concat())
}

fn key_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(printable(), 1..=40),
        2 => vec(printable(), 253..=258),
        3 => quoted(0..=30),
        1 => quoted(250..=258),
        3 => vec(header_byte(), 0..=48),
        1 => vec(header_byte(), 240..=300),
        // Well-formed, padded with the whitespace HTTP allows around a value.
        1 => (vec(prop_oneof![Just(b' '), Just(b'\t')], 0..3), vec(0x21u8..=0x7e, 1..20), vec(prop_oneof![Just(b' '), Just(b'\t')], 0..3))
            .prop_map(|(before, key, after)| [before, key, after].concat()),
    ]
}

fn key_instances() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        1 => Just(Vec::new()),
        8 => key_value().prop_map(|key| vec![key]),
        1 => key_value().prop_map(|key| vec![key.clone(), key]),
        1 => vec(key_value(), 2..=3),
    ]
}

fn extra_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    const KNOWN: [&str; 11] = [
        "content-type",
        "authorization",
        "x-echo",
        "content-length",
        "transfer-encoding",
        "connection",
        "cookie",
        "expect",
        "x-idempotency-status",
        "idempotent-replayed",
        "x-idempotency-signature",
    ];
    let name = prop_oneof![
        proptest::sample::select(&KNOWN[..]).prop_map(str::to_owned),
        "[a-z0-9-]{1,16}".prop_filter("the key header is drawn on its own", |name| name != "idempotency-key"),
    ];
    let value = vec(prop_oneof![4 => printable(), 1 => Just(b'\t'), 1 => 0x80u8..=0xff], 0..48);
    vec((name, value), 0..6)
}

fn cases() -> impl Strategy<Value = Case> {
    let body = prop_oneof![8 => vec(any::<u8>(), 0..=256), 1 => vec(any::<u8>(), BODY_LIMIT - 2..=BODY_LIMIT + 64)];
    let method = prop_oneof![Just(Method::POST), Just(Method::PUT), Just(Method::PATCH), Just(Method::DELETE)];
    (key_instances(), body, extra_headers(), method).prop_map(|(keys, body, extra, method)| Case {
        keys,
        body,
        extra,
        method,
    })
}

// --- the properties -----------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    async fn read(router: &Router, request: Request<Body>) -> Self {
        let response = router.clone().oneshot(request).await.expect("the router is infallible");
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.expect("a readable body");
        Self { status: parts.status, headers: parts.headers, body }
    }

    fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers.get_all(name).iter().map(HeaderValue::as_bytes).collect()
    }

    /// The `type` of a problem idem answered itself.
    fn idem_problem(&self) -> Option<String> {
        if self.all("content-type") != [b"application/problem+json"] {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("a problem is JSON");
        let kind = json["type"]
            .as_str()?
            .strip_prefix("https://docs.rs/axum-idem/latest/idem/problems/index.html#")?
            .to_owned();
        assert_eq!(json["status"], self.status.as_u16(), "the problem's status is the answer's");
        Some(kind)
    }

    fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!((self.status.as_u16(), self.idem_problem().as_deref()), (status, Some(kind)), "{self:?}");
    }
}

#[derive(Debug, Clone, Copy)]
enum Door {
    Annotated,
    Layered,
    /// An annotated handler under the layer: on first contact the layer claims and the handler adopts.
    Both,
}

async fn check(case: &Case, door: Door) {
    let (router, app) = app();
    let (method, path, runs) = match door {
        Door::Annotated => (Method::POST, "/annotated", &app.annotated_runs),
        Door::Layered => (case.method.clone(), "/layered", &app.layered_runs),
        Door::Both => (Method::POST, "/both", &app.both_runs),
    };
    let first = Reply::read(&router, case.request(method.clone(), path)).await;
    let retry = Reply::read(&router, case.request(method, path)).await;
    for reply in [&first, &retry] {
        if let Some(kind) = reply.idem_problem() {
            assert!(reply.status.as_u16() < 500, "idem answered {} {kind} to {case:?}", reply.status);
        }
    }
    let runs = runs.load(Ordering::SeqCst);
    let verdict = verdict(&case.keys);
    match (verdict, door) {
        (Verdict::Malformed, _) => {
            first.assert_problem(400, "invalid-key");
            retry.assert_problem(400, "invalid-key");
            assert_eq!(runs, 0, "a malformed key never runs the handler");
        }
        (Verdict::Absent, Door::Annotated | Door::Both) => {
            first.assert_problem(400, "missing-key");
            retry.assert_problem(400, "missing-key");
            assert_eq!(runs, 0);
        }
        (Verdict::Absent, Door::Layered) => {
            // The layer's key is optional: the route answers as if idem were not there, every time.
            assert_eq!((first.status, retry.status), (status_for(&case.body), status_for(&case.body)));
            assert!(first.all("x-idempotency-status").is_empty() && retry.all("x-idempotency-status").is_empty());
            assert_eq!(runs, 2);
        }
        (Verdict::Key, _) if case.body.len() > BODY_LIMIT => {
            first.assert_problem(413, "payload-too-large");
            retry.assert_problem(413, "payload-too-large");
            assert_eq!(runs, 0);
        }
        (Verdict::Key, Door::Layered) if LAYER_UNSTORED.contains(&status_for(&case.body)) => {
            for reply in [&first, &retry] {
                assert_eq!((reply.status, &reply.body[..]), (status_for(&case.body), &case.body[..]));
                assert!(reply.all("x-idempotency-status").is_empty() && reply.all("idempotent-replayed").is_empty());
            }
            assert_eq!(runs, 2, "an unstored status leaves the key free: the retry runs");
        }
        (Verdict::Key, _) => {
            assert_eq!(runs, 1, "a well-formed key runs the handler once across a retry");
            assert_eq!(first.status, status_for(&case.body));
            assert_eq!(first.body, case.body, "the handler's body");
            assert_eq!(first.all("x-idempotency-status"), [b"new"]);
            assert_eq!(first.all("idempotency-key"), [case.keys[0].as_slice()], "the key echoed as sent");
            assert_eq!(retry.all("x-idempotency-status"), [b"hit"], "{retry:?}");
            assert_eq!(retry.all("idempotent-replayed"), [b"true"]);
            assert_eq!((retry.status, &retry.body), (first.status, &first.body), "replayed byte for byte");
            for name in ["x-run", "x-echo", "content-type", "idempotency-key", "x-idempotency-signature"] {
                assert_eq!(retry.all(name), first.all(name), "header {name} replayed");
            }
        }
    }
}

fn case_count() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(256)
}

#[test]
fn hostile_requests_get_a_clear_answer_and_run_the_handler_at_most_once() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut runner = TestRunner::new(Config { cases: case_count(), ..Config::default() });
    // How many cases fell in each class, so a generator that stopped reaching one fails loudly.
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<&str, u32>::new());
    runner
        .run(&cases(), |case| {
            let class = match verdict(&case.keys) {
                Verdict::Absent => "absent",
                Verdict::Malformed if case.keys.len() > 1 => "repeated",
                Verdict::Malformed => "malformed",
                Verdict::Key if case.body.len() > BODY_LIMIT => "too large",
                Verdict::Key => "well-formed",
            };
            *seen.borrow_mut().entry(class).or_default() += 1;
            runtime.block_on(async {
                check(&case, Door::Annotated).await;
                check(&case, Door::Layered).await;
                check(&case, Door::Both).await;
            });
            Ok(())
        })
        .unwrap();
    let seen = seen.into_inner();
    eprintln!("cases by class: {seen:?}");
    for class in ["absent", "repeated", "malformed", "too large", "well-formed"] {
        assert!(seen.contains_key(class), "no {class} case: {seen:?}");
    }
}
