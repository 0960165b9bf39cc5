//! NOT PUBLIC API: entry points for the fuzz targets in `fuzz/`, exempt from semver, gone whenever they are not
//! needed. Use [`RedisStore`](crate::RedisStore) instead.
//!
//! The record codec is private to the Redis store, whose module this file must not widen, so it is compiled a
//! second time here from the same source file. Left out of the crate's own test build, where the codec's unit
//! tests would otherwise run twice.

#[allow(dead_code)]
#[path = "store/redis/codec.rs"]
mod codec;

/// Decodes a Redis record as the store does after a claim finds one.
pub fn decode_record(raw: &[u8]) -> Result<crate::Entry, String> {
    codec::decode(raw)
}

/// Encodes a completed record as the store writes it.
pub fn encode_record(record: &crate::Record) -> String {
    codec::completed(record)
}
