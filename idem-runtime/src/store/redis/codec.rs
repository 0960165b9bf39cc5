//! Records as JSON, readable with `redis-cli GET`: text bodies and header values stay text; anything that is not
//! UTF-8 is base64 in a `*_base64` field instead.

use crate::{Entry, Fingerprint, OwnerToken, Record, Stored, StoredResponse};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Json {
    InFlight {
        owner: String,
        fingerprint: String,
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
        (None, Some(base64)) => BASE64.decode(base64).map(Bytes::from).map_err(|e| e.to_string()),
        (None, None) => Ok(Bytes::new()),
        (Some(_), Some(_)) => Err("both a text and a base64 form".to_owned()),
    }
}

/// The in-flight record a claimant writes. It starts with [`owner_prefix`].
pub(super) fn in_flight(owner: &OwnerToken, fingerprint: &Fingerprint) -> String {
    let json = Json::InFlight { owner: owner.as_str().to_owned(), fingerprint: fingerprint.to_hex() };
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

pub(super) fn completed(record: &Record) -> String {
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
            Json::Completed { fingerprint, status: response.status, replayable: true, headers, body, body_base64 }
        }
        Stored::NotReplayable { status } => Json::Completed {
            fingerprint,
            status: *status,
            replayable: false,
            headers: Vec::new(),
            body: None,
            body_base64: None,
        },
    };
    serde_json::to_string(&json).expect("records serialise")
}

pub(super) fn decode(raw: &[u8]) -> Result<Entry, String> {
    let json: Json = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let fingerprint_of = |hex: &str| Fingerprint::from_hex(hex).ok_or_else(|| format!("bad fingerprint {hex:?}"));
    match json {
        Json::InFlight { fingerprint, .. } => Ok(Entry::InFlight { fingerprint: fingerprint_of(&fingerprint)? }),
        Json::Completed { fingerprint, status, replayable, headers, body, body_base64 } => {
            let fingerprint = fingerprint_of(&fingerprint)?;
            let stored = if replayable {
                let headers = headers
                    .into_iter()
                    .map(|header| decode_bytes(header.value, header.value_base64).map(|value| (header.name, value)))
                    .collect::<Result<_, _>>()?;
                Stored::Response(StoredResponse { status, headers, body: decode_bytes(body, body_base64)? })
            } else {
                Stored::NotReplayable { status }
            };
            Ok(Entry::Completed(Record { fingerprint, stored }))
        }
    }
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
}
