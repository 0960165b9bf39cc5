//! NOT PUBLIC API: entry points for the fuzz targets in `fuzz/`, exempt from semver, gone whenever they are not
//! needed. Use [`RedisStore`](crate::store::redis::RedisStore) instead.

use crate::store::redis::codec;

/// Decodes a Redis record as the store does after a claim finds one.
pub fn decode_record(raw: &[u8]) -> Result<crate::record::Entry, String> {
    codec::decode(raw)
}

/// Encodes a completed record as the store writes it.
pub fn encode_record(record: &crate::record::Record) -> String {
    codec::completed(record)
}
