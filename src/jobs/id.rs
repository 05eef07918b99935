//! Job ids and idempotency keys.
//!
//! An id doubles as the Kubernetes Job name, so it is a valid DNS label. With an
//! `Idempotency-Key`, the id is derived from a hash of tenant and key: two replicas handling the
//! same retry compute the same name, and the API server's uniqueness of names makes exactly one
//! create win, with no shared memory between replicas.

use super::FieldError;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

const ID_PREFIX: &str = "job-";
const ID_CHARS: usize = 20;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A job's id: `job-` and 20 characters of lowercase base32 (100 bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

/// Maps keyed by id can be asked with a Kubernetes object's name (the derived `Hash`, `Eq` and
/// `Ord` are those of the one `String` field, so they agree with `str`'s).
impl std::borrow::Borrow<str> for JobId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl JobId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 13];
        rand::rng().fill_bytes(&mut bytes);
        Self::from_bytes(&bytes)
    }

    /// The id that a tenant's idempotency key always maps to.
    pub fn for_idempotency_key(tenant: &str, key: &IdempotencyKey) -> Self {
        let digest = Sha256::new()
            .chain_update(b"oats-idempotency-v1\0")
            .chain_update(tenant.as_bytes())
            .chain_update(b"\0")
            .chain_update(key.0.as_bytes())
            .finalize();
        Self::from_bytes(&digest[..13])
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut bits: u128 = 0;
        for b in &bytes[..13] {
            bits = (bits << 8) | u128::from(*b);
        }
        let mut id = String::with_capacity(ID_PREFIX.len() + ID_CHARS);
        id.push_str(ID_PREFIX);
        for i in (0..ID_CHARS).rev() {
            id.push(BASE32[((bits >> (i * 5 + 4)) & 31) as usize] as char);
        }
        Self(id)
    }

    /// Accept only ids this server could have issued.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let valid = text.len() == ID_PREFIX.len() + ID_CHARS
            && text.starts_with(ID_PREFIX)
            && text[ID_PREFIX.len()..].bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(FieldError::new("id", format!("`{text}` is not a job id (expected job- and 20 of a-z, 2-7)")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value).map_err(|e| e.message)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

/// A client-chosen key that makes retries of one submission safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Longest key accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Keys are 1 to 255 printable ASCII characters (UUIDs, ULIDs and the like).
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        if text.is_empty() || text.len() > Self::MAX_LEN {
            return Err(FieldError::new("Idempotency-Key", format!("must be 1 to {} characters long", Self::MAX_LEN)));
        }
        if !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(FieldError::new("Idempotency-Key", "must be printable ASCII without spaces"));
        }
        Ok(Self(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = JobId::random();
        let b = JobId::random();
        assert_ne!(a, b);
        assert_eq!(JobId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), 24);
    }

    #[test]
    fn idempotency_ids_depend_on_tenant_and_key_only() {
        let key = IdempotencyKey::parse("retry-1").unwrap();
        let other = IdempotencyKey::parse("retry-2").unwrap();
        let id = JobId::for_idempotency_key("acme", &key);
        assert_eq!(id, JobId::for_idempotency_key("acme", &key));
        assert_ne!(id, JobId::for_idempotency_key("other", &key));
        assert_ne!(id, JobId::for_idempotency_key("acme", &other));
        assert!(JobId::parse(id.as_str()).is_ok());
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "job-",
            "job-ABCDEFGHIJKLMNOPQRST",
            "job-abcdefghijklmnopqrs1",
            "../etc/passwd",
            "jobx-abcdefghijklmnopqrst",
            "job-abcdefghijklmnopqrstu",
        ] {
            assert!(JobId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn idempotency_key_limits() {
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("tab\there").is_err());
        assert!(IdempotencyKey::parse("0b3c6a8e-6a4e-4d43-9c1f-2f4b4f6f9d10").is_ok());
    }
}
