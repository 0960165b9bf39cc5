//! Building requests, reading answers (in process or over a raw TCP connection) and the assertions every case
//! shares: problem documents, the idempotency headers, replay equality.

use axum::body::{Body, Bytes};
use axum::http::request::Builder;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const STATUS: HeaderName = HeaderName::from_static("x-idempotency-status");
pub const SIGNATURE: HeaderName = HeaderName::from_static("x-idempotency-signature");
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Headers the engine adds to an answer; everything else comes from the handler (or its stored copy).
const ENGINE_HEADERS: [HeaderName; 4] = [KEY, STATUS, SIGNATURE, REPLAYED];

/// A key no other test, and no earlier run against a persistent store, has used.
pub fn fresh_key(label: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{nanos:x}.{:x}", std::process::id())
    });
    format!("{label}-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `POST path`, to finish with [`RequestExt`].
pub fn post(path: &str) -> Builder {
    Request::builder().method(Method::POST).uri(path)
}

/// Finishing touches for a request builder.
pub trait RequestExt {
    /// Adds the idempotency key header.
    fn key(self, key: &str) -> Builder;
    /// A JSON body with `content-type: application/json`.
    fn json(self, body: &Value) -> Request<Body>;
    /// An empty body.
    fn empty(self) -> Request<Body>;
}

impl RequestExt for Builder {
    fn key(self, key: &str) -> Builder {
        self.header(KEY, key)
    }

    fn json(self, body: &Value) -> Request<Body> {
        self.header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("a valid request")
    }

    fn empty(self) -> Request<Body> {
        self.body(Body::empty()).expect("a valid request")
    }
}

/// An answer, read in full.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn read(response: axum::response::Response) -> Self {
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.expect("the response body reads in full");
        Self { status: parts.status, headers: parts.headers, body }
    }

    /// A header's value as text; `None` when absent. Panics if it is there more than once.
    pub fn header(&self, name: impl axum::http::header::AsHeaderName + Clone) -> Option<&str> {
        let mut values = self.headers.get_all(name.clone()).iter();
        let value = values.next()?;
        assert!(values.next().is_none(), "header {:?} sent more than once: {:?}", name.as_str(), self.headers);
        Some(value.to_str().expect("a text header value"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an RFC 9457 problem with `status` whose `type` ends in `name`; returns the document.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, name: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "status of {self:?}");
        assert_eq!(self.header(header::CONTENT_TYPE), Some("application/problem+json"), "content-type of {self:?}");
        let problem = self.json();
        let kind = problem["type"].as_str().unwrap_or_else(|| panic!("problem without a `type`: {problem}"));
        assert!(kind.ends_with(name), "problem type {kind:?} should end in {name:?}");
        let boundary = kind.len() - name.len();
        assert!(
            boundary == 0 || !kind.as_bytes()[boundary - 1].is_ascii_alphanumeric(),
            "problem type {kind:?} should end in the name {name:?}, not merely in those characters"
        );
        assert_eq!(problem["status"].as_u64(), Some(u64::from(status)), "problem status field: {problem}");
        assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()), "problem without a title: {problem}");
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()), "problem without a detail: {problem}");
        problem
    }

    /// Asserts a `Retry-After` of a whole number of seconds.
    #[track_caller]
    pub fn assert_retry_after(&self) {
        let value = self.header(header::RETRY_AFTER).unwrap_or_else(|| panic!("no Retry-After on {self:?}"));
        assert!(value.parse::<u64>().is_ok(), "Retry-After {value:?} is not a number of seconds");
    }

    /// Asserts a first execution's headers: the key echoed, `new`, a SHA-256 hex signature, not replayed.
    #[track_caller]
    pub fn assert_new(&self, key: &str) {
        assert_eq!(self.header(KEY), Some(key), "key echo on {self:?}");
        assert_eq!(self.header(STATUS), Some("new"), "idempotency status on {self:?}");
        let signature = self.header(SIGNATURE).unwrap_or_else(|| panic!("no signature on {self:?}"));
        assert!(
            signature.len() == 64 && signature.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "signature {signature:?} is not 64 lower-case hex digits"
        );
        assert_eq!(self.header(REPLAYED), None, "a first execution is not a replay: {self:?}");
    }

    /// Asserts a replay's headers: the key echoed, `hit`, `Idempotent-Replayed: true`.
    #[track_caller]
    pub fn assert_hit(&self, key: &str) {
        assert_eq!(self.header(KEY), Some(key), "key echo on {self:?}");
        assert_eq!(self.header(STATUS), Some("hit"), "idempotency status on {self:?}");
        assert_eq!(self.header(REPLAYED), Some("true"), "replayed marker on {self:?}");
    }

    /// Asserts that the engine added none of its headers.
    #[track_caller]
    pub fn assert_untouched(&self) {
        for name in ENGINE_HEADERS {
            assert!(!self.headers.contains_key(&name), "unexpected {name} on {self:?}");
        }
    }

    /// The handler's own headers, in order, values as raw bytes: the engine's headers, the framing ones and those
    /// listed in `also_skip` left out.
    pub fn handler_headers(&self, also_skip: &[HeaderName]) -> Vec<(String, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(name, _)| !ENGINE_HEADERS.contains(name) && *name != header::CONTENT_LENGTH)
            .filter(|(name, _)| !also_skip.contains(name))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect()
    }

    /// Asserts that `self` replays `first`: same status, the same handler headers in the same order (less `Date`
    /// and `Set-Cookie`, which are never replayed), the same body byte for byte, and the replay headers.
    #[track_caller]
    pub fn assert_replays(&self, first: &Reply, key: &str) {
        assert_eq!(self.status, first.status, "replayed status");
        assert_eq!(
            self.handler_headers(&[]),
            first.handler_headers(&[header::DATE, header::SET_COOKIE]),
            "replayed headers (in order)"
        );
        assert_eq!(self.body, first.body, "replayed body, byte for byte");
        self.assert_hit(key);
    }
}

/// Serves `router` on a real socket on 127.0.0.1; the server lives as long as the test's runtime.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let address = listener.local_addr().expect("a bound address");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("the test server runs") });
    address
}

/// The bytes of an HTTP/1.1 request with a body, written by hand so that nothing between the test and the server
/// can normalise them.
pub fn raw_request(path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n", body.len()).into_bytes();
    for (name, value) in headers {
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body);
    raw
}

/// Sends `request` (which should carry `connection: close`) on a new connection and reads the answer to the end.
pub async fn exchange(address: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(address).await.expect("connect to the test server");
    stream.write_all(request).await.expect("send the request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers within 5 s")
        .expect("read the answer");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let (head, body) = (&raw[..split], &raw[split + 4..]);
    let mut lines = head.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let status_line = std::str::from_utf8(lines.next().expect("a status line")).expect("a text status line");
    let code = status_line.split(' ').nth(1).expect("a status code");
    let status = StatusCode::from_bytes(code.as_bytes()).expect("a valid status code");
    let mut headers = HeaderMap::new();
    for line in lines {
        let colon = line.iter().position(|&b| b == b':').expect("a header line");
        let name = HeaderName::from_bytes(&line[..colon]).expect("a header name");
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).expect("a header value");
        headers.append(name, value);
    }
    let chunked = headers.get(header::TRANSFER_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Reply { status, headers, body: body.into() }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = std::str::from_utf8(&raw[..end]).expect("a text chunk size").split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}
