//! Reading the `Idempotency-Key` header.

use axum::http::HeaderValue;
use axum::http::header::GetAll;
use std::sync::Arc;

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// A well-formed idempotency key: 1–255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    /// The key's text (the sf-string quoting, if any, removed).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a key header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header was sent more than once.
    #[error("the key header was sent {0} times; send it once")]
    Repeated(usize),
    /// The key is empty.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than 255 characters.
    #[error("the key is {0} characters long; the limit is 255")]
    TooLong(usize),
    /// The key holds a control character, a non-ASCII byte or a broken quoted string.
    #[error("the key must be printable ASCII, bare or as a quoted structured-field string")]
    Malformed,
    /// The key is well formed but not in the format the server asks for (see [`KeyFormat`]).
    #[error("the key must be {0}")]
    Format(Arc<str>),
}

/// Which well-formed keys a server accepts, on top of the basic rule (1–255 printable ASCII). Set with
/// [`IdempotencyBuilder::key_format`](crate::IdempotencyBuilder::key_format); a key in another format is answered
/// `400 invalid-key` before the store is touched.
///
/// The IETF idempotency-key draft recommends UUIDs (or another random identifier with enough entropy): a guessable
/// key lets one client collide with another's within the same scope.
///
/// ```
/// # use idem_runtime as idem;
/// use idem::key::KeyFormat;
/// let uuid = KeyFormat::uuid();
/// assert!(uuid.accepts("9b2f1a64-1c3e-4c6a-9a44-3f0e2b7d8c11"));
/// assert!(!uuid.accepts("order-1"));
/// let prefixed = KeyFormat::custom("an `ord_` key", |key| key.starts_with("ord_") && key.len() >= 20);
/// assert!(prefixed.accepts("ord_4f9d2c81b7e04a6d"));
/// ```
#[derive(Clone)]
pub struct KeyFormat {
    description: Arc<str>,
    accepts: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl KeyFormat {
    /// Every well-formed key (the default).
    pub fn any() -> Self {
        Self::custom("1-255 printable ASCII characters", |_| true)
    }

    /// A UUID in its 36-character text form, any version, either case.
    pub fn uuid() -> Self {
        Self::custom("a UUID (36 characters: 8-4-4-4-12 hexadecimal digits)", is_uuid)
    }

    /// Keys for which `accepts` is true; `description` completes the sentence "the key must be …" in the answer.
    pub fn custom(description: &str, accepts: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self { description: description.into(), accepts: Arc::new(accepts) }
    }

    /// Whether `key` is in this format.
    pub fn accepts(&self, key: &str) -> bool {
        (self.accepts)(key)
    }

    pub(crate) fn check(&self, key: &Key) -> Result<(), KeyError> {
        if self.accepts(key.as_str()) { Ok(()) } else { Err(KeyError::Format(self.description.clone())) }
    }
}

impl Default for KeyFormat {
    fn default() -> Self {
        Self::any()
    }
}

impl std::fmt::Debug for KeyFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KeyFormat").field(&self.description).finish()
    }
}

fn is_uuid(key: &str) -> bool {
    key.len() == 36
        && key.bytes().enumerate().all(|(at, byte)| match at {
            8 | 13 | 18 | 23 => byte == b'-',
            _ => byte.is_ascii_hexdigit(),
        })
}

/// Reads the key from every instance of the header: `Ok(None)` when absent.
///
/// A bare token (`abc`) and an RFC 8941 string (`"abc"`) name the same key.
///
/// ```
/// # use idem_runtime as idem;
/// use axum::http::HeaderMap;
/// use idem::key::parse;
/// let mut headers = HeaderMap::new();
/// headers.insert("idempotency-key", "\"order-1\"".parse().unwrap());
/// assert_eq!(parse(headers.get_all("idempotency-key")).unwrap().unwrap().as_str(), "order-1");
/// ```
pub fn parse(values: GetAll<'_, HeaderValue>) -> Result<Option<Key>, KeyError> {
    let mut values = values.iter();
    let Some(value) = values.next() else { return Ok(None) };
    let extra = values.count();
    if extra > 0 {
        return Err(KeyError::Repeated(extra + 1));
    }
    parse_value(value.as_bytes()).map(Some)
}

fn parse_value(raw: &[u8]) -> Result<Key, KeyError> {
    let raw = raw.trim_ascii();
    let text = match raw {
        [b'"', inner @ .., b'"'] => unquote(inner)?,
        [b'"', ..] => return Err(KeyError::Malformed),
        bare => {
            if !bare.iter().all(|byte| (0x20..=0x7e).contains(byte)) {
                return Err(KeyError::Malformed);
            }
            bare.to_vec()
        }
    };
    match text.len() {
        0 => Err(KeyError::Empty),
        len if len > MAX_KEY_LEN => Err(KeyError::TooLong(len)),
        // Every byte was checked to be printable ASCII, so this cannot fail.
        _ => String::from_utf8(text).map(Key).map_err(|_| KeyError::Malformed),
    }
}

/// Unescapes the inside of an sf-string: printable ASCII, with `\"` and `\\` the only escapes.
fn unquote(inner: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err(KeyError::Malformed),
            },
            b'"' => return Err(KeyError::Malformed),
            0x20..=0x7e => out.push(byte),
            _ => return Err(KeyError::Malformed),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &[u8]) -> Result<String, KeyError> {
        parse_value(raw).map(|key| key.0)
    }

    #[test]
    fn bare_and_quoted_forms_are_the_same_key() {
        assert_eq!(key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(key(b"\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(key(br#""a\"b\\c""#).unwrap(), r#"a"b\c"#);
    }

    #[test]
    fn length_bounds() {
        assert_eq!(key(&[b'k'; 255]).unwrap().len(), 255);
        assert_eq!(key(&[b'k'; 256]), Err(KeyError::TooLong(256)));
        assert_eq!(key(b""), Err(KeyError::Empty));
        assert_eq!(key(b"\"\""), Err(KeyError::Empty));
    }

    #[test]
    fn refuses_control_and_non_ascii_bytes_and_broken_quotes() {
        assert_eq!(key(b"a\x01b"), Err(KeyError::Malformed));
        assert_eq!(key(b"a\tb"), Err(KeyError::Malformed));
        assert_eq!(key("caf\u{e9}".as_bytes()), Err(KeyError::Malformed));
        assert_eq!(key(b"\"abc"), Err(KeyError::Malformed));
        assert_eq!(key(br#""a"b""#), Err(KeyError::Malformed));
        assert_eq!(key(br#""a\nb""#), Err(KeyError::Malformed));
    }
}
