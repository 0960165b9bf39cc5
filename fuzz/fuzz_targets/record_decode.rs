//! The Redis record decoder on arbitrary bytes: it never panics, and whatever it accepts can be replayed as it
//! stands (a status and headers `http` takes) and survives being written and read again unchanged.
#![no_main]

use axum::http::{HeaderName, HeaderValue, StatusCode};
use idem_runtime::fuzzing::{decode_record, encode_record};
use idem_runtime::{Entry, Stored};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Entry::Completed(record)) = decode_record(data) else { return };
    let status = match &record.stored {
        Stored::Response(response) => response.status,
        Stored::NotReplayable { status } => *status,
    };
    assert!(StatusCode::from_u16(status).is_ok(), "accepted status {status}");
    if let Stored::Response(response) = &record.stored {
        for (name, value) in &response.headers {
            assert!(HeaderName::from_bytes(name.as_bytes()).is_ok(), "accepted header name {name:?}");
            assert!(HeaderValue::from_bytes(value).is_ok(), "accepted header value {value:?}");
        }
    }
    let written = encode_record(&record);
    assert_eq!(decode_record(written.as_bytes()), Ok(Entry::Completed(record)), "{written}");
});
