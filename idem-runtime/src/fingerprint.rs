//! The request signature: what makes two requests "the same request".

use sha2::{Digest, Sha256};
use std::fmt;

/// A SHA-256 digest of everything that identifies a request (or a plain-API input).
///
/// Two requests carrying one idempotency key must have the same fingerprint to be treated as retries of each other;
/// otherwise the key is being reused for a different request and the engine refuses it (`key-reused`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Starts a fingerprint; feed it fields in a fixed order.
    ///
    /// ```
    /// # use idem_runtime as idem;
    /// use idem::store::Fingerprint;
    /// let a = Fingerprint::builder().field(b"POST").field(b"/orders").finish();
    /// let b = Fingerprint::builder().field(b"POST/").field(b"orders").finish();
    /// assert_ne!(a, b, "fields are length-prefixed, so boundaries matter");
    /// ```
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder(Sha256::new())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds a fingerprint from its raw digest (as stored by a [`Store`](crate::store::Store)).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Lower-case hex, as sent in `X-Idempotency-Signature` and stored in records.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses the output of [`Fingerprint::to_hex`].
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let high = (pair[0] as char).to_digit(16)?;
            let low = (pair[1] as char).to_digit(16)?;
            out[i] = (high * 16 + low) as u8;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Accumulates length-prefixed fields into a [`Fingerprint`].
pub struct FingerprintBuilder(Sha256);

impl std::fmt::Debug for FingerprintBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FingerprintBuilder").finish_non_exhaustive()
    }
}

impl FingerprintBuilder {
    /// Adds one field. The length prefix keeps `("ab", "c")` and `("a", "bc")` apart.
    pub fn field(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// Finishes the digest.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finalize().into())
    }
}

/// `bytes` (at most 32) as lower-case hex, in one allocation: written on the stack, then shared.
pub(crate) fn shared_hex(bytes: &[u8]) -> std::sync::Arc<str> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    let out = &mut out[..bytes.len() * 2];
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    std::str::from_utf8(out).expect("hex digits are ASCII").into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[(byte >> 4) as usize] as char);
        out.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let fp = Fingerprint::builder().field(b"x").finish();
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }

    #[test]
    fn field_order_and_boundaries_matter() {
        let ab = Fingerprint::builder().field(b"a").field(b"b").finish();
        let ba = Fingerprint::builder().field(b"b").field(b"a").finish();
        let joined = Fingerprint::builder().field(b"ab").finish();
        assert_ne!(ab, ba);
        assert_ne!(ab, joined);
    }
}
