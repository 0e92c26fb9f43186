//! Read-only decoding of what keyward stores, for operator tools (`keyward inspect`).
//!
//! The one decision: **this module only describes bytes; it never judges them against live epochs and
//! never exposes a secret.** A fill lease's token is reported by its presence only, not its value, so
//! that printing a description cannot hand anyone a lease to commit under. Bytes that are not one of
//! keyward's formats are `None`, never an error or a panic: an operator inspects whatever is in Redis.

use crate::envelope::{self, Body, LEASE_FLAG_AT, LEASE_PREFIX};

/// What a cache key's stored bytes are (see [`cache_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEntry<'a> {
    /// A value (or a cached "absent") with the epochs it was filled under.
    Value(StoredValue<'a>),
    /// A fill lease: one caller is loading the value from the source. Its token is not reported.
    Lease {
        /// Whether other callers wait to be woken when the fill commits.
        waiters: bool,
        /// For a lease taken over a kept value (fail-safe or eager refresh): the server time (Unix ms) until
        /// which the lease is held, and the value that stays readable meanwhile. `None` for a plain lease.
        kept: Option<(i64, StoredValue<'a>)>,
    },
}

/// A stored cache value's envelope: the epochs it was filled under and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredValue<'a> {
    /// The namespace epoch current when the fill was leased.
    pub namespace_epoch: u64,
    /// The class epoch current when the fill was leased.
    pub class_epoch: u64,
    /// `(tag, tag epoch)` for each tag the value depends on, in stored order (empty for an untagged value).
    pub tags: Vec<(&'a [u8], u64)>,
    /// The codec's bytes (as many as were given); `None` for a cached "absent" (negative caching).
    pub payload: Option<&'a [u8]>,
}

impl StoredValue<'_> {
    /// Bytes of `raw` before the payload: the envelope header, including the `v:` / `n:` marker.
    pub fn header_len(&self, raw: &[u8]) -> usize {
        match self.payload {
            Some(p) => raw.len() - p.len(),
            None => raw.len(),
        }
    }
}

/// The longest envelope header keyward writes (32 tags of 128 bytes with their epochs, plus the
/// generations), in bytes: reading this many bytes plus `n` of a value yields its header and at least `n`
/// bytes of its payload (e.g. with `GETRANGE key 0 MAX_HEADER_BYTES+n-1`), and [`cache_entry`] decodes such a
/// prefix as it decodes the whole value.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Describes the bytes stored under a cache key: a value, a cached "absent", or a fill lease (plain, or over
/// a kept value). `None` for anything else (bytes written by other code, corrupt data). `raw` may be a
/// prefix of the stored bytes that holds at least the header (see [`MAX_HEADER_BYTES`]): the payload is then
/// the prefix's part of it.
///
/// ```
/// use keyward::inspect::{cache_entry, CacheEntry};
/// let Some(CacheEntry::Value(v)) = cache_entry(b"V1:3:17:v:{\"a\":1}") else { panic!() };
/// assert_eq!((v.namespace_epoch, v.class_epoch, v.payload), (3, 17, Some(&b"{\"a\":1}"[..])));
/// assert!(cache_entry(b"\xff\x00garbage").is_none());
/// ```
pub fn cache_entry(raw: &[u8]) -> Option<CacheEntry<'_>> {
    if raw.starts_with(LEASE_PREFIX) {
        let token = raw.get(LEASE_PREFIX.len()..LEASE_FLAG_AT - 1)?;
        if !token.iter().all(u8::is_ascii_hexdigit) || raw.get(LEASE_FLAG_AT - 1) != Some(&b':') {
            return None;
        }
        let waiters = match raw.get(LEASE_FLAG_AT) {
            Some(b'0') => false,
            Some(b'1') => true,
            _ => return None,
        };
        if raw.len() == LEASE_FLAG_AT + 1 {
            return Some(CacheEntry::Lease {
                waiters,
                kept: None,
            });
        }
        let (deadline, value) = envelope::kept(raw)?;
        let value = stored_value(value)?;
        return Some(CacheEntry::Lease {
            waiters,
            kept: Some((deadline, value)),
        });
    }
    stored_value(raw).map(CacheEntry::Value)
}

fn stored_value(raw: &[u8]) -> Option<StoredValue<'_>> {
    let (gens, tags, body) = envelope::parse_tagged(raw).ok()?;
    Some(StoredValue {
        namespace_epoch: gens.ns,
        class_epoch: gens.class,
        tags: tags.iter().collect(),
        payload: match body {
            Body::Value(p) => Some(p),
            Body::Negative => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn values_absents_and_tags() {
        let Some(CacheEntry::Value(v)) = cache_entry(b"V2:1:2:1:3:p:7:5:v:xyz") else {
            panic!()
        };
        assert_eq!(v.tags, vec![(&b"p:7"[..], 5)]);
        assert_eq!(v.payload, Some(&b"xyz"[..]));
        assert_eq!(v.header_len(b"V2:1:2:1:3:p:7:5:v:xyz"), 19);
        let Some(CacheEntry::Value(n)) = cache_entry(b"V1:4:5:n:") else {
            panic!()
        };
        assert_eq!((n.namespace_epoch, n.class_epoch, n.payload), (4, 5, None));
    }

    #[test]
    fn leases_plain_and_over_a_kept_value() {
        assert_eq!(
            cache_entry(format!("L1:{TOKEN}:1").as_bytes()),
            Some(CacheEntry::Lease {
                waiters: true,
                kept: None
            })
        );
        let raw = format!("L1:{TOKEN}:0:1700000000000:V1:1:1:v:old");
        let Some(CacheEntry::Lease {
            waiters: false,
            kept: Some((deadline, value)),
        }) = cache_entry(raw.as_bytes())
        else {
            panic!()
        };
        assert_eq!(
            (deadline, value.payload),
            (1_700_000_000_000, Some(&b"old"[..]))
        );
        let debug = format!("{:?}", cache_entry(raw.as_bytes()));
        assert!(!debug.contains(TOKEN), "the token is never described");
    }

    #[test]
    fn garbage_is_none() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00",
            b"L1:",
            b"L1:zz:0",
            b"L1:0123456789abcdef0123456789abcdef:7",
            b"L1:0123456789abcdef0123456789abcdef:0:x:V1:1:1:v:1",
            b"V1:1:2:q:zz",
            b"hello",
        ] {
            assert_eq!(cache_entry(raw), None, "{raw:?}");
        }
    }
}
