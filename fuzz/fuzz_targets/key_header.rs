//! The `Idempotency-Key` header parser against an independent reading of DESIGN.md §3: for any set of header
//! instances, `parse` accepts exactly the keys the reference accepts, with the same text, and never panics.
//!
//! Input: the header's instances separated by `\n` (a byte no header value can hold); instances that `http` would
//! not accept as a value are left out, as a server never delivers them. An empty input sends no header.
#![no_main]

use axum::http::{HeaderMap, HeaderValue};
use idem_runtime::http::key::{MAX_KEY_LEN, parse};
use libfuzzer_sys::fuzz_target;

/// RFC 8941 §4.2.5, run as the algorithm the RFC writes out (not as a grammar match): the whole field must be one
/// sf-string, with `\"` and `\\` the only escapes and printable ASCII inside.
fn sf_string(field: &[u8]) -> Option<Vec<u8>> {
    let mut chars = field.iter().copied();
    if chars.next() != Some(b'"') {
        return None;
    }
    let mut out = Vec::new();
    loop {
        match chars.next()? {
            b'\\' => match chars.next()? {
                escaped @ (b'"' | b'\\') => out.push(escaped),
                _ => return None,
            },
            b'"' => return chars.next().is_none().then_some(out),
            byte if !(0x20..=0x7e).contains(&byte) => return None,
            byte => out.push(byte),
        }
    }
}

/// The key a single header instance names, if it is well-formed.
fn reference_key(value: &[u8]) -> Option<String> {
    // A field value's surrounding whitespace (SP, HTAB) is not part of it (RFC 9110 §5.5).
    let start = value.iter().position(|byte| !matches!(byte, b' ' | b'\t')).unwrap_or(value.len());
    let end = value.iter().rposition(|byte| !matches!(byte, b' ' | b'\t')).map_or(start, |last| last + 1);
    let value = &value[start..end];
    let text = if value.first() == Some(&b'"') {
        sf_string(value)?
    } else if value.iter().all(|byte| (0x20..=0x7e).contains(byte)) {
        value.to_vec()
    } else {
        return None;
    };
    if text.is_empty() || text.len() > 255 {
        return None;
    }
    String::from_utf8(text).ok()
}

fuzz_target!(|data: &[u8]| {
    let instances: Vec<&[u8]> = if data.is_empty() {
        Vec::new()
    } else {
        data.split(|byte| *byte == b'\n').filter(|value| HeaderValue::from_bytes(value).is_ok()).collect()
    };
    let mut headers = HeaderMap::new();
    for value in &instances {
        headers.append("idempotency-key", HeaderValue::from_bytes(value).expect("filtered"));
    }
    let parsed = parse(headers.get_all("idempotency-key"));
    match instances.as_slice() {
        [] => assert_eq!(parsed, Ok(None)),
        [value] => match (parsed, reference_key(value)) {
            (Ok(Some(key)), Some(expected)) => {
                assert_eq!(key.as_str(), expected);
                assert!(key.as_str().len() <= MAX_KEY_LEN);
            }
            (Err(_), None) => {}
            (parsed, expected) => {
                panic!("{:?}: parse gave {parsed:?}, the reference {expected:?}", value.escape_ascii())
            }
        },
        _ => assert!(parsed.is_err(), "{} instances accepted: {parsed:?}", instances.len()),
    }
});
