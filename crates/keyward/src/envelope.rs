//! The bytes keyward stores: a small header the Lua scripts and the embedded backend can read without the codec.
//!
//! `V1:{ns_gen}:{class_gen}:{kind}:{payload}` for a value (`kind` is `v` for a value, `n` for a cached "absent"),
//! `L1:{token}:{w}` for a fill lease (`w` is `1` once a caller waits on it). The generations are the namespace
//! and class epochs current when the fill was leased; a value whose generations differ from the current ones
//! was filled before a group invalidation and is treated as a miss.

use std::fmt::Write as _;

pub(crate) const VALUE_PREFIX: &[u8] = b"V1:";
pub(crate) const LEASE_PREFIX: &[u8] = b"L1:";

/// Namespace and class epochs, as the server keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Gens {
    pub(crate) ns: u64,
    pub(crate) class: u64,
}

/// What a stored value says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body<'a> {
    /// A value; the codec's bytes.
    Value(&'a [u8]),
    /// A cached "absent" (negative caching).
    Negative,
}

/// A stored value that could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored bytes are not a keyward value: {0}")]
pub(crate) struct EnvelopeError(pub(crate) &'static str);

/// `v:{payload}` or `n:` — the part after the generations.
pub(crate) fn body(payload: Option<&[u8]>) -> Vec<u8> {
    match payload {
        Some(p) => {
            let mut out = Vec::with_capacity(2 + p.len());
            out.extend_from_slice(b"v:");
            out.extend_from_slice(p);
            out
        }
        None => b"n:".to_vec(),
    }
}

/// The full stored form of a value filled under `gens`.
pub(crate) fn value(gens: Gens, body: &[u8]) -> Vec<u8> {
    let mut head = String::with_capacity(32);
    let _ = write!(head, "V1:{}:{}:", gens.ns, gens.class);
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse a stored value.
pub(crate) fn parse(raw: &[u8]) -> Result<(Gens, Body<'_>), EnvelopeError> {
    let rest = raw
        .strip_prefix(VALUE_PREFIX)
        .ok_or(EnvelopeError("missing V1 header"))?;
    let (ns, rest) = split_num(rest)?;
    let (class, rest) = split_num(rest)?;
    let body = match rest {
        [b'v', b':', payload @ ..] => Body::Value(payload),
        [b'n', b':'] => Body::Negative,
        _ => return Err(EnvelopeError("unknown value kind")),
    };
    Ok((Gens { ns, class }, body))
}

fn split_num(s: &[u8]) -> Result<(u64, &[u8]), EnvelopeError> {
    let colon = s
        .iter()
        .position(|&b| b == b':')
        .ok_or(EnvelopeError("truncated header"))?;
    let digits = &s[..colon];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(EnvelopeError("bad generation"));
    }
    let n = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(EnvelopeError("bad generation"))?;
    Ok((n, &s[colon + 1..]))
}

/// Whether stored bytes are a value current under `gens` (and usable: a cached absent only if `negative_ok`).
/// Current means filled under epochs no older than `gens` (epochs only grow; on Cluster a handle's view may lag
/// an entry filled by a handle that saw a bump first, and that entry is current).
/// `None` when they are not a readable value at all (a lease, or bytes the caller must decode, report and heal).
/// Both backends decide hit-or-miss with this, as the Lua scripts do.
pub(crate) fn is_current(raw: &[u8], gens: Gens, negative_ok: bool) -> Option<bool> {
    if !raw.starts_with(VALUE_PREFIX) {
        return None;
    }
    parse(raw).ok().map(|(g, body)| {
        g.ns >= gens.ns && g.class >= gens.class && (negative_ok || body != Body::Negative)
    })
}

/// A fresh lease marker (`L1:{token}:0`) and the prefix that identifies it regardless of its waiter flag.
pub(crate) fn lease_marker(token: &str) -> (String, String) {
    let prefix = format!("L1:{token}:");
    (format!("{prefix}0"), prefix)
}

/// Whether stored bytes are a lease marker whose waiter flag is set.
pub(crate) fn lease_has_waiters(raw: &[u8]) -> bool {
    raw.starts_with(LEASE_PREFIX) && raw.last() == Some(&b'1')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let g = Gens { ns: 3, class: 17 };
        let v = value(g, &body(Some(b"{\"a\":1}")));
        assert_eq!(v, b"V1:3:17:v:{\"a\":1}");
        assert_eq!(parse(&v).unwrap(), (g, Body::Value(b"{\"a\":1}")));
        let n = value(g, &body(None));
        assert_eq!(parse(&n).unwrap(), (g, Body::Negative));
        // payloads may contain colons
        let v = value(g, &body(Some(b"a:b:c")));
        assert_eq!(parse(&v).unwrap().1, Body::Value(b"a:b:c"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for raw in [
            &b""[..],
            b"V1:",
            b"V1:1",
            b"V1:1:",
            b"V1:x:1:v:",
            b"V1:1:2:q:zz",
            b"V1:1:2:n:extra",
            b"L1:abc:0",
            b"\xff\xfe",
            b"V1:99999999999999999999999:1:v:",
        ] {
            assert!(parse(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn lease_flags() {
        let (m, p) = lease_marker("abc");
        assert_eq!(m, "L1:abc:0");
        assert!(m.starts_with(&p));
        assert!(!lease_has_waiters(m.as_bytes()));
        assert!(lease_has_waiters(b"L1:abc:1"));
        assert!(!lease_has_waiters(b"V1:1:1:v:1"));
    }
}
