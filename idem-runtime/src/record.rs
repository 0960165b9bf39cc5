//! What a store keeps for a key: in-flight claims and completed records.

use crate::fingerprint::Fingerprint;
use bytes::Bytes;
use std::fmt;

/// Proof of ownership of an in-flight claim. Every write to a claimed key presents it, so a claimant whose lease
/// expired (and whose key was claimed again by someone else) can never overwrite or delete the newer claim.
///
/// Shared text: a clone (the claim's keeper, its fence, a store's in-flight entry) costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OwnerToken(std::sync::Arc<str>);

impl OwnerToken {
    /// A fresh, unguessable token: 128 bits from a cryptographically secure generator (ChaCha12, `rand`'s
    /// `ThreadRng`) seeded per thread from the operating system's random source and reseeded from it every 64 KiB
    /// of output, so making one costs no system call.
    ///
    /// # Panics
    /// If the operating system's random source cannot be read to seed or reseed the generator, which no supported
    /// platform does once booted.
    pub fn generate() -> Self {
        use rand::Rng;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(crate::fingerprint::shared_hex(&bytes))
    }

    /// Wraps a token read back from a store.
    pub fn from_string(token: String) -> Self {
        Self(token.into())
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerToken({})", self.0)
    }
}

/// A completed request: the fingerprint it was made with and what to answer its retries with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The fingerprint of the request that produced this record.
    pub fingerprint: Fingerprint,
    /// The stored answer.
    pub stored: Stored,
}

/// The stored answer of a completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// A complete response, replayed byte for byte.
    Response(StoredResponse),
    /// The request completed but its response could not be kept (too large, or streamed); retries are refused
    /// rather than run twice or answered with a truncated body.
    NotReplayable {
        /// The status the original answer had.
        status: u16,
    },
}

/// A response as kept in a store: status, headers in order (repeated names and non-UTF-8 values preserved), body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Header names (lower case) and raw values, in the original order.
    pub headers: Vec<(String, Bytes)>,
    /// The body bytes.
    pub body: Bytes,
}

impl Record {
    /// Bytes this record occupies, for stores that bound their memory.
    pub fn weight(&self) -> usize {
        match &self.stored {
            Stored::Response(response) => {
                response.body.len() + response.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum::<usize>() + 64
            }
            Stored::NotReplayable { .. } => 64,
        }
    }
}

/// What a store holds under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A claimant is running the request now.
    InFlight {
        /// The fingerprint of the running request.
        fingerprint: Fingerprint,
    },
    /// The request completed.
    Completed(Record),
}
