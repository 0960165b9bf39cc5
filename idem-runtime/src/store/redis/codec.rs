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

use crate::{Entry, Fingerprint, OwnerToken, Record, Stored, StoredResponse};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The record format this build writes, and the only one it reads.
const FORMAT: u32 = 1;

fn format_before_versions() -> u32 {
    1
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Json {
    // Field order matters: `owner` comes right after the tag, see `owner_prefix`.
    InFlight {
        owner: String,
        fingerprint: String,
        #[serde(default = "format_before_versions")]
        v: u32,
    },
    Completed {
        fingerprint: String,
        status: u16,
        replayable: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<Header>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
        #[serde(default = "format_before_versions")]
        v: u32,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// Text when it is UTF-8, else base64: `(text, base64)`, one of them set.
fn encode(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_owned()), None),
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

/// At most 64 characters of untrusted text, quoted, for an error message that ends up in a log line.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// The in-flight record a claimant writes. It starts with [`owner_prefix`].
pub(super) fn in_flight(owner: &OwnerToken, fingerprint: &Fingerprint) -> String {
    let json = Json::InFlight { owner: owner.as_str().to_owned(), fingerprint: fingerprint.to_hex(), v: FORMAT };
    serde_json::to_string(&json).expect("records serialise")
}

/// What an in-flight record owned by `owner` starts with: the owner check of the scripts compares this prefix, so
/// they need neither a JSON parser nor the fingerprint (serde writes the tag, then the fields, in order).
pub(super) fn owner_prefix(owner: &OwnerToken) -> String {
    format!("{{\"state\":\"in_flight\",\"owner\":\"{}\"", owner.as_str())
}

/// Whether a held record is an in-flight claim, without decoding it.
pub(super) fn is_in_flight(raw: &[u8]) -> bool {
    raw.starts_with(br#"{"state":"in_flight""#)
}

pub(crate) fn completed(record: &Record) -> String {
    let fingerprint = record.fingerprint.to_hex();
    let json = match &record.stored {
        Stored::Response(response) => {
            let headers = response
                .headers
                .iter()
                .map(|(name, value)| {
                    let (value, value_base64) = encode(value);
                    Header { name: name.clone(), value, value_base64 }
                })
                .collect();
            let (body, body_base64) = encode(&response.body);
            Json::Completed {
                fingerprint,
                status: response.status,
                replayable: true,
                headers,
                body,
                body_base64,
                v: FORMAT,
            }
        }
        Stored::NotReplayable { status } => Json::Completed {
            fingerprint,
            status: *status,
            replayable: false,
            headers: Vec::new(),
            body: None,
            body_base64: None,
            v: FORMAT,
        },
    };
    serde_json::to_string(&json).expect("records serialise")
}

/// Reads a record back, or says why it is not one this build could have written.
pub(crate) fn decode(raw: &[u8]) -> Result<Entry, String> {
    let json: Json = serde_json::from_slice(raw).map_err(|e| format!("not a record: {e}"))?;
    match json {
        Json::InFlight { fingerprint, v, .. } => {
            check_format(v)?;
            Ok(Entry::InFlight { fingerprint: fingerprint_of(&fingerprint)? })
        }
        Json::Completed { fingerprint, status, replayable, headers, body, body_base64, v } => {
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

/// A header as `http` would accept it on a response: a replay never drops or mangles a header silently.
fn decode_header(stored: Header) -> Result<(String, Bytes), String> {
    let Ok(name) = HeaderName::from_bytes(stored.name.as_bytes()) else {
        return Err(format!("header name {} is not a valid header name", excerpt(&stored.name)));
    };
    // The encoder never keeps them (the server frames the replayed body itself).
    if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
        return Err(format!("a stored {name} header"));
    }
    let value = decode_bytes(stored.value, stored.value_base64)?;
    if HeaderValue::from_bytes(&value).is_err() {
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
    fn long_garbage_is_quoted_short_in_the_reason() {
        let raw = completed_with(serde_json::json!({ "fingerprint": "g".repeat(10_000) }));
        assert!(refusal(&raw).len() < 200);
    }
}
