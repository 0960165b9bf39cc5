//! A record as the columns of one row, and back.
//!
//! The state lives in columns SQL can compare (`owner`, `expires_at`), so claims, owner checks and the sweep are
//! plain `WHERE` clauses (and a completion inside an application's own transaction is one `UPDATE … WHERE owner =
//! $token`). The response is spread over `status`, `replayable`, `headers` (JSONB, readable in `psql`) and `body`
//! (`bytea`: any bytes, no base64, no JSON escaping, and no `\u0000` that JSONB refuses).
//!
//! Decoding is the trust boundary between the table and a replay, as for the Redis records: a row is either one
//! this build could have written itself, or an error that the engine answers with `500 corrupt-record`. It refuses
//! a status outside `http`'s 100–999, header names or values `http` rejects, a framing header (`content-length`,
//! `transfer-encoding`), a fingerprint that is not 64 hex digits, a replayable row without a body, a
//! not-replayable one with headers or a body.

use crate::fingerprint::Fingerprint;
use crate::record::{Entry, Record, Stored, StoredResponse};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgRow;

/// A header in the `headers` column: the value as text when it is UTF-8, else as base64 in `value_base64`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// The columns of a completed record, ready to bind.
pub(super) struct CompletedColumns {
    pub(super) fingerprint: String,
    pub(super) status: i16,
    pub(super) replayable: bool,
    pub(super) headers: Option<serde_json::Value>,
    pub(super) body: Option<Vec<u8>>,
}

pub(super) fn completed(record: &Record) -> CompletedColumns {
    let fingerprint = record.fingerprint.to_hex();
    match &record.stored {
        Stored::Response(response) => {
            let headers: Vec<Header> = response
                .headers
                .iter()
                .map(|(name, value)| match std::str::from_utf8(value) {
                    Ok(text) => Header { name: name.clone(), value: Some(text.to_owned()), value_base64: None },
                    Err(_) => Header { name: name.clone(), value: None, value_base64: Some(BASE64.encode(value)) },
                })
                .collect();
            CompletedColumns {
                fingerprint,
                status: status_column(response.status),
                replayable: true,
                headers: Some(serde_json::to_value(headers).expect("headers serialise")),
                body: Some(response.body.to_vec()),
            }
        }
        Stored::NotReplayable { status } => CompletedColumns {
            fingerprint,
            status: status_column(*status),
            replayable: false,
            headers: None,
            body: None,
        },
    }
}

/// `http` keeps statuses within 100–999, which `smallint` holds; anything else is stored as 0, which decoding
/// refuses, rather than wrapped into a status that looks valid.
fn status_column(status: u16) -> i16 {
    i16::try_from(status).unwrap_or(0)
}

/// Reads the entry in a row with the columns `owner`, `fingerprint`, `status`, `replayable`, `headers`, `body`.
pub(super) fn entry(row: &PgRow) -> Result<Entry, String> {
    let owner: Option<String> = column(row, "owner")?;
    let fingerprint: String = column(row, "fingerprint")?;
    let status: Option<i16> = column(row, "status")?;
    let replayable: Option<bool> = column(row, "replayable")?;
    let headers: Option<serde_json::Value> = column(row, "headers")?;
    let body: Option<Vec<u8>> = column(row, "body")?;
    let fingerprint = Fingerprint::from_hex(&fingerprint)
        .ok_or_else(|| format!("fingerprint {} is not 64 hex digits", excerpt(&fingerprint)))?;
    if owner.is_some() {
        if status.is_some() || replayable.is_some() || headers.is_some() || body.is_some() {
            return Err("an in-flight row (with an owner) that holds a response".to_owned());
        }
        return Ok(Entry::InFlight { fingerprint });
    }
    let status = status.ok_or("a completed row (no owner) without a status")?;
    let status = u16::try_from(status)
        .ok()
        .filter(|status| StatusCode::from_u16(*status).is_ok())
        .ok_or_else(|| format!("status {status} is not an HTTP status"))?;
    let stored = match replayable {
        Some(true) => {
            let headers = headers.map_or(Ok(Vec::new()), decode_headers)?;
            let body = body.ok_or("a replayable row without a body")?;
            Stored::Response(StoredResponse { status, headers, body: Bytes::from(body) })
        }
        Some(false) if headers.is_none() && body.is_none() => Stored::NotReplayable { status },
        Some(false) => return Err("a not-replayable row with headers or a body".to_owned()),
        None => return Err("a completed row without `replayable`".to_owned()),
    };
    Ok(Entry::Completed(Record { fingerprint, stored }))
}

fn column<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    name: &str,
) -> Result<T, String> {
    row.try_get(name).map_err(|e| format!("column `{name}`: {e}"))
}

fn decode_headers(json: serde_json::Value) -> Result<Vec<(String, Bytes)>, String> {
    let headers: Vec<Header> =
        serde_json::from_value(json).map_err(|e| format!("`headers` is not a list of headers: {e}"))?;
    headers.into_iter().map(decode_header).collect()
}

/// A header as `http` would accept it on a response: a replay never drops or mangles a header silently.
fn decode_header(stored: Header) -> Result<(String, Bytes), String> {
    let Ok(name) = HeaderName::from_bytes(stored.name.as_bytes()) else {
        return Err(format!("header name {} is not a valid header name", excerpt(&stored.name)));
    };
    // The engine never keeps them (the server frames the replayed body itself).
    if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
        return Err(format!("a stored {name} header"));
    }
    let value = match (stored.value, stored.value_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(base64)) => BASE64.decode(base64).map(Bytes::from).map_err(|e| format!("bad base64: {e}"))?,
        (None, None) => Bytes::new(),
        (Some(_), Some(_)) => return Err("a header value both as text and as base64".to_owned()),
    };
    if HeaderValue::from_bytes(&value).is_err() {
        let shown = String::from_utf8_lossy(&value);
        return Err(format!("header {} has an invalid value {}", excerpt(&stored.name), excerpt(&shown)));
    }
    Ok((stored.name, value))
}

/// At most 64 characters of untrusted text, quoted, for an error message that ends up in a log line.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_text_as_text_and_other_bytes_as_base64() {
        let record = Record {
            fingerprint: Fingerprint::builder().field(b"x").finish(),
            stored: Stored::Response(StoredResponse {
                status: 201,
                headers: vec![
                    ("content-type".into(), Bytes::from_static(b"application/json")),
                    ("x-raw".into(), Bytes::from_static(b"\xff\xfe")),
                ],
                body: Bytes::from_static(b"\0binary\xff"),
            }),
        };
        let columns = completed(&record);
        assert_eq!(
            columns.headers.clone().unwrap(),
            serde_json::json!([
                { "name": "content-type", "value": "application/json" },
                { "name": "x-raw", "value_base64": "//4=" },
            ])
        );
        let decoded: Vec<(String, Bytes)> = decode_headers(columns.headers.unwrap()).unwrap();
        let Stored::Response(response) = record.stored else { unreachable!() };
        assert_eq!(decoded, response.headers);
        assert_eq!(columns.body.as_deref(), Some(&b"\0binary\xff"[..]));
    }

    #[test]
    fn refuses_headers_the_engine_never_writes() {
        let cases = [
            (serde_json::json!([{ "name": "bad name", "value": "x" }]), "header name"),
            (serde_json::json!([{ "name": "content-length", "value": "2" }]), "content-length"),
            (serde_json::json!([{ "name": "transfer-encoding", "value": "chunked" }]), "transfer-encoding"),
            (serde_json::json!([{ "name": "x-a", "value": "line\nbreak" }]), "invalid value"),
            (serde_json::json!([{ "name": "x-a", "value_base64": "%%" }]), "bad base64"),
            (serde_json::json!([{ "name": "x-a", "value": "a", "value_base64": "YQ==" }]), "both"),
            (serde_json::json!({ "content-type": "text/plain" }), "not a list"),
            (serde_json::json!([{ "name": "x-a", "values": ["a"] }]), "not a list"),
        ];
        for (json, reason) in cases {
            let refused = decode_headers(json.clone()).expect_err(&json.to_string());
            assert!(refused.contains(reason), "{json}: {refused}");
        }
    }

    #[test]
    fn an_out_of_range_status_is_stored_as_one_decoding_refuses() {
        assert_eq!(status_column(201), 201);
        assert_eq!(status_column(u16::MAX), 0);
    }
}
