//! Records as JSON, readable with `redis-cli GET`: text bodies and header values stay text; anything that is not
//! UTF-8 is base64 in a `*_base64` field instead.
//!
//! The decoder is the trust boundary between Redis and a replay: whatever sits under a record's name (another
//! program's value, a damaged write, a record from a newer idem) is either a record this build could have written
//! itself, or an error that the engine answers with `500 corrupt-record`. So it refuses what the encoder never
//! writes: a status outside `http`'s 100–999, header names or values `http` rejects, a framing header
//! (`content-length`, `transfer-encoding`: a wrong one makes the server drop the connection on every replay), a
//! fingerprint that is not 64 hex digits, a body both as text and as base64, headers or a body on a not-replayable
//! record.
//!
//! Versions: every record carries `"v"`, the format version (a record without one, written before `v` existed,
//! is version 1). A newer idem bumps it only for a change an older reader would misread, and may add fields that
//! older readers can ignore without bumping it; a reader refuses any version it does not know rather than guess.

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, OwnerToken, Record, Stored, StoredResponse};
use axum::http::{HeaderName, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The record format this build writes, and the only one it reads.
const FORMAT: u32 = 1;

fn format_before_versions() -> u32 {
    1
}

/// A record as written: the fields borrow from the record, so encoding copies the body once, into the JSON.
#[derive(Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Written<'a> {
    // Field order matters: `owner` comes right after the tag, see `owner_prefix`.
    InFlight {
        owner: &'a str,
        fingerprint: &'a str,
        v: u32,
    },
    Completed {
        fingerprint: &'a str,
        status: u16,
        replayable: bool,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        headers: Vec<WrittenHeader<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
        v: u32,
    },
}

#[derive(Serialize)]
struct WrittenHeader<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    InFlight,
    Completed,
}

/// A record as read: the fields of either state in one flat struct, read in one pass (an internally tagged enum
/// would first buffer every field of the record, the body included, and copy it once more). Fields this build does
/// not know are ignored, as ones a newer build may add without bumping the version.
#[derive(Deserialize)]
struct Read<'a> {
    state: State,
    /// Required on an in-flight record; only its presence is checked (the scripts compare it, not this decoder).
    #[serde(borrow, default)]
    owner: Option<Cow<'a, str>>,
    #[serde(borrow)]
    fingerprint: Cow<'a, str>,
    status: Option<u16>,
    replayable: Option<bool>,
    #[serde(default)]
    headers: Vec<ReadHeader>,
    body: Option<String>,
    body_base64: Option<String>,
    #[serde(default = "format_before_versions")]
    v: u32,
}

#[derive(Deserialize)]
struct ReadHeader {
    name: String,
    value: Option<String>,
    value_base64: Option<String>,
}

/// Text when it is UTF-8, else base64: `(text, base64)`, one of them set.
fn encode(bytes: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(BASE64.encode(bytes))),
    }
}

fn decode_bytes(text: Option<String>, base64: Option<String>) -> Result<Bytes, String> {
    match (text, base64) {
        (Some(text), None) => Ok(Bytes::from(text)),
        (None, Some(base64)) => BASE64.decode(base64).map(Bytes::from).map_err(|e| format!("bad base64: {e}")),
        (None, None) => Ok(Bytes::new()),
        (Some(_), Some(_)) => Err("both a text and a base64 form".to_owned()),
    }
}

/// JSON text of `record`, in a buffer sized up front for `payload` bytes of body and headers (escaping may add
/// some), so a large body is not copied again each time the buffer would have grown.
fn to_json(record: &Written<'_>, payload: usize) -> String {
    let mut json = Vec::with_capacity(payload + payload / 8 + 256);
    serde_json::to_writer(&mut json, record).expect("records serialise");
    String::from_utf8(json).expect("serde_json writes UTF-8")
}

/// At most 64 characters of untrusted text, quoted, for an error message that ends up in a log line.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// A fingerprint's hex digits, on the stack: one is written on every claim and every completion.
struct Hex([u8; 64]);

impl Hex {
    fn of(fingerprint: &Fingerprint) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(fingerprint.as_bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
        Self(hex)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// The in-flight record a claimant writes. It starts with [`owner_prefix`].
pub(super) fn in_flight(owner: &OwnerToken, fingerprint: &Fingerprint) -> String {
    let fingerprint = Hex::of(fingerprint);
    to_json(&Written::InFlight { owner: owner.as_str(), fingerprint: fingerprint.as_str(), v: FORMAT }, 0)
}

/// What every in-flight record starts with, up to its owner token.
const IN_FLIGHT_OWNER: &str = r#"{"state":"in_flight","owner":""#;
/// What every in-flight record starts with.
pub(super) const IN_FLIGHT: &str = r#"{"state":"in_flight""#;

/// What an in-flight record owned by `owner` starts with: the owner check of the scripts compares this prefix, so
/// they need neither a JSON parser nor the fingerprint (serde writes the tag, then the fields, in order).
pub(super) fn owner_prefix(owner: &OwnerToken) -> String {
    let mut prefix = String::with_capacity(IN_FLIGHT_OWNER.len() + owner.as_str().len() + 1);
    prefix.push_str(IN_FLIGHT_OWNER);
    prefix.push_str(owner.as_str());
    prefix.push('"');
    prefix
}

/// Whether `held` is an in-flight record of `owner`'s, i.e. starts with [`owner_prefix`] (without making it: this
/// runs on every claim that finds a record).
pub(super) fn is_owned_by(held: &[u8], owner: &OwnerToken) -> bool {
    held.strip_prefix(IN_FLIGHT_OWNER.as_bytes())
        .and_then(|rest| rest.strip_prefix(owner.as_str().as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&b'"'))
}

/// Whether a held record is an in-flight claim, without decoding it.
pub(super) fn is_in_flight(raw: &[u8]) -> bool {
    raw.starts_with(IN_FLIGHT.as_bytes())
}

pub(crate) fn completed(record: &Record) -> String {
    let fingerprint = Hex::of(&record.fingerprint);
    let fingerprint = fingerprint.as_str();
    match &record.stored {
        Stored::Response(response) => {
            let headers = response
                .headers
                .iter()
                .map(|(name, value)| {
                    let (value, value_base64) = encode(value);
                    WrittenHeader { name, value, value_base64 }
                })
                .collect();
            let (body, body_base64) = encode(&response.body);
            // Base64 takes 4 bytes for 3; a header's name and value come with some JSON around them.
            let payload = response.body.len() * if body.is_some() { 1 } else { 2 }
                + response.headers.iter().map(|(name, value)| name.len() + value.len() * 2 + 32).sum::<usize>();
            let json = Written::Completed {
                fingerprint,
                status: response.status,
                replayable: true,
                headers,
                body,
                body_base64,
                v: FORMAT,
            };
            to_json(&json, payload)
        }
        Stored::NotReplayable { status } => {
            let json = Written::Completed {
                fingerprint,
                status: *status,
                replayable: false,
                headers: Vec::new(),
                body: None,
                body_base64: None,
                v: FORMAT,
            };
            to_json(&json, 0)
        }
    }
}

/// Reads a record back, or says why it is not one this build could have written.
pub(crate) fn decode(raw: &[u8]) -> Result<Entry, String> {
    let read: Read<'_> = serde_json::from_slice(raw).map_err(|e| format!("not a record: {e}"))?;
    let missing = |field: &str| format!("not a record: missing field `{field}`");
    match read.state {
        State::InFlight => {
            if read.owner.is_none() {
                return Err(missing("owner"));
            }
            check_format(read.v)?;
            Ok(Entry::InFlight { fingerprint: fingerprint_of(&read.fingerprint)? })
        }
        State::Completed => {
            let Read { fingerprint, status, replayable, headers, body, body_base64, v, .. } = read;
            let (Some(status), Some(replayable)) = (status, replayable) else {
                return Err(missing(if status.is_none() { "status" } else { "replayable" }));
            };
            check_format(v)?;
            let fingerprint = fingerprint_of(&fingerprint)?;
            // `http` represents 100–999, so that is every status a handler can answer and the encoder can write.
            if StatusCode::from_u16(status).is_err() {
                return Err(format!("status {status} is not an HTTP status"));
            }
            let stored = if replayable {
                let headers = headers.into_iter().map(decode_header).collect::<Result<_, _>>()?;
                Stored::Response(StoredResponse { status, headers, body: decode_bytes(body, body_base64)? })
            } else if headers.is_empty() && body.is_none() && body_base64.is_none() {
                Stored::NotReplayable { status }
            } else {
                return Err("a not-replayable record with headers or a body".to_owned());
            };
            Ok(Entry::Completed(Record { fingerprint, stored }))
        }
    }
}

fn check_format(v: u32) -> Result<(), String> {
    match v {
        FORMAT => Ok(()),
        newer if newer > FORMAT => {
            Err(format!("record format v{newer} was written by a newer idem; this build reads v{FORMAT}"))
        }
        unknown => Err(format!("unknown record format v{unknown}")),
    }
}

fn fingerprint_of(hex: &str) -> Result<Fingerprint, String> {
    Fingerprint::from_hex(hex).ok_or_else(|| format!("fingerprint {} is not 64 hex digits", excerpt(hex)))
}

/// What `HeaderValue::from_bytes` accepts (visible ASCII, spaces, tabs, obs-text), checked without copying the
/// value into one: every replay decodes its headers.
fn is_header_value(bytes: &[u8]) -> bool {
    bytes.iter().all(|&byte| byte == b'\t' || (byte >= 0x20 && byte != 0x7f))
}

/// A header as `http` would accept it on a response: a replay never drops or mangles a header silently.
fn decode_header(stored: ReadHeader) -> Result<(String, Bytes), String> {
    let Ok(name) = HeaderName::from_bytes(stored.name.as_bytes()) else {
        return Err(format!("header name {} is not a valid header name", excerpt(&stored.name)));
    };
    // The encoder never keeps them (the server frames the replayed body itself).
    if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
        return Err(format!("a stored {name} header"));
    }
    let value = decode_bytes(stored.value, stored.value_base64)?;
    if !is_header_value(&value) {
        let shown = String::from_utf8_lossy(&value);
        return Err(format!("header {} has an invalid value {}", excerpt(&stored.name), excerpt(&shown)));
    }
    Ok((stored.name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint::builder().field(b"x").finish()
    }

    #[test]
    fn completed_records_round_trip_text_and_binary() {
        let record = Record {
            fingerprint: fp(),
            stored: Stored::Response(StoredResponse {
                status: 201,
                headers: vec![
                    ("content-type".into(), Bytes::from_static(b"application/json")),
                    ("x-raw".into(), Bytes::from_static(b"\xff\xfe")),
                    ("x-raw".into(), Bytes::from_static(b"second")),
                ],
                body: Bytes::from_static(br#"{"order_id":1}"#),
            }),
        };
        let text = completed(&record);
        assert!(text.contains(r#""body":"{\"order_id\":1}""#), "{text}");
        assert!(text.contains(r#""value_base64":"//4=""#), "{text}");
        assert_eq!(decode(text.as_bytes()).unwrap(), Entry::Completed(record));

        let binary = Record {
            fingerprint: fp(),
            stored: Stored::Response(StoredResponse {
                status: 200,
                headers: vec![],
                body: (0..=255u8).collect::<Vec<_>>().into(),
            }),
        };
        let text = completed(&binary);
        assert!(text.contains("\"body_base64\":"), "{text}");
        assert_eq!(decode(text.as_bytes()).unwrap(), Entry::Completed(binary));
    }

    #[test]
    fn not_replayable_and_in_flight_round_trip() {
        let record = Record { fingerprint: fp(), stored: Stored::NotReplayable { status: 200 } };
        assert_eq!(decode(completed(&record).as_bytes()).unwrap(), Entry::Completed(record.clone()));
        let owner = OwnerToken::generate();
        let claim = in_flight(&owner, &fp());
        assert_eq!(decode(claim.as_bytes()).unwrap(), Entry::InFlight { fingerprint: fp() });
        assert!(claim.starts_with(&owner_prefix(&owner)), "{claim}");
        assert!(!claim.starts_with(&owner_prefix(&OwnerToken::generate())));
        assert!(is_in_flight(claim.as_bytes()));
        assert!(!is_in_flight(completed(&record).as_bytes()));
    }

    /// A completed record as JSON, with `fields` replacing (or, when new, joining) the ones of a valid record.
    fn completed_with(fields: serde_json::Value) -> Vec<u8> {
        let record = Record {
            fingerprint: fp(),
            stored: Stored::Response(StoredResponse {
                status: 201,
                headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
                body: Bytes::from_static(b"ok"),
            }),
        };
        let mut json: serde_json::Value = serde_json::from_str(&completed(&record)).unwrap();
        for (name, value) in fields.as_object().unwrap() {
            json[name] = value.clone();
        }
        serde_json::to_vec(&json).unwrap()
    }

    fn refusal(raw: &[u8]) -> String {
        match decode(raw) {
            Ok(entry) => panic!("{} decoded as {entry:?}", String::from_utf8_lossy(raw)),
            Err(reason) => reason,
        }
    }

    #[test]
    fn records_carry_their_format_version_and_the_in_flight_prefix_still_leads() {
        let owner = OwnerToken::generate();
        let claim = in_flight(&owner, &fp());
        assert!(claim.starts_with(&owner_prefix(&owner)), "{claim}");
        assert!(claim.ends_with(r#","v":1}"#), "{claim}");
        let record = Record { fingerprint: fp(), stored: Stored::NotReplayable { status: 200 } };
        assert!(completed(&record).ends_with(r#","v":1}"#));
        // Written before the version existed: read as version 1.
        let unversioned = format!(r#"{{"state":"in_flight","owner":"o","fingerprint":"{}"}}"#, fp().to_hex());
        assert_eq!(decode(unversioned.as_bytes()).unwrap(), Entry::InFlight { fingerprint: fp() });
    }

    #[test]
    fn refuses_records_of_other_versions_and_unknown_states() {
        assert!(refusal(&completed_with(serde_json::json!({ "v": 2 }))).contains("newer idem"));
        assert!(refusal(&completed_with(serde_json::json!({ "v": 0 }))).contains("unknown record format v0"));
        assert!(refusal(&completed_with(serde_json::json!({ "state": "archived" }))).contains("not a record"));
        // A field this build does not know is one a newer build may add without bumping the version: ignored.
        assert!(decode(&completed_with(serde_json::json!({ "created_at": 1 }))).is_ok());
    }

    #[test]
    fn refuses_what_the_encoder_never_writes() {
        let cases = [
            (serde_json::json!({ "fingerprint": "abc" }), "not 64 hex digits"),
            (serde_json::json!({ "fingerprint": "z".repeat(64) }), "not 64 hex digits"),
            (serde_json::json!({ "status": 0 }), "status 0"),
            (serde_json::json!({ "status": 99 }), "status 99"),
            (serde_json::json!({ "status": 1000 }), "status 1000"),
            (serde_json::json!({ "status": 65536 }), "not a record"),
            (serde_json::json!({ "status": "200" }), "not a record"),
            (serde_json::json!({ "headers": [{ "name": "bad name", "value": "x" }] }), "header name"),
            (serde_json::json!({ "headers": [{ "name": "", "value": "x" }] }), "header name"),
            (serde_json::json!({ "headers": [{ "name": "Content-Length", "value": "2" }] }), "content-length"),
            (
                serde_json::json!({ "headers": [{ "name": "transfer-encoding", "value": "chunked" }] }),
                "transfer-encoding",
            ),
            (serde_json::json!({ "headers": [{ "name": "x-a", "value": "line\nbreak" }] }), "invalid value"),
            (serde_json::json!({ "headers": [{ "name": "x-a", "value_base64": "AA==" }] }), "invalid value"),
            (serde_json::json!({ "headers": [{ "name": "x-a", "value_base64": "%%" }] }), "bad base64"),
            (serde_json::json!({ "headers": [{ "name": "x-a", "value": "a", "value_base64": "YQ==" }] }), "both"),
            (serde_json::json!({ "body_base64": "b2s=" }), "both"),
            (serde_json::json!({ "replayable": false }), "not-replayable record with headers"),
            (serde_json::json!({ "headers": "content-type" }), "not a record"),
        ];
        for (fields, reason) in cases {
            let raw = completed_with(fields.clone());
            let refused = refusal(&raw);
            assert!(refused.contains(reason), "{fields}: {refused}");
        }
        for raw in
            [&b""[..], b"\xff\xfe", b"null", b"[]", b"{}", br#"{"state":"completed"}"#, b"{\"state\":\"in_flight\""]
        {
            assert!(refusal(raw).contains("not a record"));
        }
        assert!(refusal(br#"{"state":"in_flight","fingerprint":"00"}"#).contains("not a record"), "no owner");
    }

    #[test]
    fn keeps_the_statuses_and_headers_http_can_carry() {
        for status in [100, 204, 402, 599, 999] {
            let raw = completed_with(serde_json::json!({ "status": status }));
            let Entry::Completed(Record { stored: Stored::Response(response), .. }) = decode(&raw).unwrap() else {
                panic!("a replayable record");
            };
            assert_eq!(response.status, status);
        }
        let raw = completed_with(serde_json::json!({ "headers": [{ "name": "x-raw", "value_base64": "gP8=" }] }));
        let Entry::Completed(Record { stored: Stored::Response(response), .. }) = decode(&raw).unwrap() else {
            panic!("a replayable record");
        };
        assert_eq!(response.headers, [("x-raw".to_owned(), Bytes::from_static(b"\x80\xff"))]);
    }

    #[test]
    fn header_values_are_checked_as_http_checks_them() {
        for byte in 0..=255u8 {
            for value in [vec![byte], vec![b'a', byte, b'b']] {
                let http = axum::http::HeaderValue::from_bytes(&value).is_ok();
                assert_eq!(is_header_value(&value), http, "{value:?}");
            }
        }
    }

    #[test]
    fn an_owner_is_recognised_by_its_prefix_without_making_it() {
        let owner = OwnerToken::generate();
        let claim = in_flight(&owner, &fp());
        assert!(is_owned_by(claim.as_bytes(), &owner));
        assert!(!is_owned_by(claim.as_bytes(), &OwnerToken::generate()));
        // A token that is a prefix of the holder's is not the holder's.
        let shorter = OwnerToken::from_string(owner.as_str()[..10].to_owned());
        assert!(!is_owned_by(claim.as_bytes(), &shorter));
        let record = Record { fingerprint: fp(), stored: Stored::NotReplayable { status: 200 } };
        assert!(!is_owned_by(completed(&record).as_bytes(), &owner));
    }

    #[test]
    fn long_garbage_is_quoted_short_in_the_reason() {
        let raw = completed_with(serde_json::json!({ "fingerprint": "g".repeat(10_000) }));
        assert!(refusal(&raw).len() < 200);
    }
}
