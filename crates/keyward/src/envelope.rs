//! The bytes keyward stores: a small header the Lua scripts and the embedded backend can read without the codec.
//!
//! - `V1:{ns_gen}:{class_gen}:{kind}:{payload}`: a value without tags (`kind` is `v` for a value, `n` for a
//!   cached "absent");
//! - `V2:{ns_gen}:{class_gen}:{n}:` then `n` times `{len}:{tag}:{tag_gen}:`, then `{kind}:{payload}`: a value
//!   that depends on `n` tags (the tag is exactly `len` bytes, so it may hold any byte, `:` included);
//! - `L1:{token}:{w}`: a fill lease (`w` is `1` once a caller waits on it).
//!
//! The generations are the namespace, class and tag epochs current when the fill was leased (a tag's epoch is
//! the larger of the fields `t:{tag}` and `x:{tag}` of the namespace's epochs hash). A value any of whose
//! generations is below the current one was filled before a group or tag invalidation and is treated as a
//! miss; one whose tag epoch is below only `x:{tag}` was filled before a tag *expiry*: stale, kept for
//! fail-safe (see [`TagEpochs`]). Untagged values are
//! still written as `V1` (the header every existing entry has), so entries written before tags existed read
//! exactly as before.

use std::fmt::Write as _;

pub(crate) const VALUE_PREFIX: &[u8] = b"V1:";
pub(crate) const TAGGED_PREFIX: &[u8] = b"V2:";
pub(crate) const LEASE_PREFIX: &[u8] = b"L1:";

/// The most tags one entry may carry (see `cache::tags`); a header claiming more is corrupt.
pub(crate) const MAX_TAGS: usize = 32;
/// The longest tag, in bytes.
pub(crate) const MAX_TAG_BYTES: usize = 128;

/// The last valid epoch, 2^53 - 1: no epoch follows it. A class or tag epoch never reaches it (a bump that
/// would re-bases the field instead), and a value whose *namespace* epoch is at it is never current: see
/// "Exhaustion" in `cache/epochs.lua`.
pub(crate) const TOP_EPOCH: u64 = (1 << 53) - 1;

/// Namespace and class epochs, as the server keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Gens {
    pub(crate) ns: u64,
    pub(crate) class: u64,
}

/// A tag's two current epochs: `removed` (field `t:{tag}`, bumped by `Keyward::invalidate_tag`) and `expired`
/// (field `x:{tag}`, bumped by `Keyward::expire_tag`). Both bumps take the larger of the two as their floor, so
/// they draw from one increasing sequence per tag, and a fill records the larger (`stamp`). A recorded epoch
/// below `removed` is gone; one below only `expired` is stale but usable as a fail-safe fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TagEpochs {
    pub(crate) removed: u64,
    pub(crate) expired: u64,
}

impl TagEpochs {
    /// What a fill leased under these epochs records for the tag.
    pub(crate) fn stamp(self) -> u64 {
        self.removed.max(self.expired)
    }
}

/// What a fill records: the group epochs and each tag's epoch, as read when its lease was granted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    pub(crate) gens: Gens,
    /// `(tag, epoch)`, in the caller's order (no duplicates).
    pub(crate) tags: Vec<(String, u64)>,
    /// The tags of the stale value a lease was granted over and keeps (fail-safe), in the value's order, each at
    /// the epoch a fill leased then records for it (the larger of its two fields), or at the one the value
    /// recorded when that is higher (a Redis Cluster view lagging the fill that recorded it). `None` when the
    /// lease keeps no stale value or its tags could not be read. A successful refill records only `tags` (the
    /// caller's dependency set); a failed one that stores the kept value again for `fail_safe_throttle`
    /// records these too ([`Stamp::throttled`]), so that a removal of one of them while the refill ran still
    /// removes the value.
    pub(crate) kept: Option<Vec<(String, u64)>>,
}

impl Stamp {
    /// The stamp a fail-safe throttle stores the kept value under: the caller's `tags`, then each of `kept`
    /// the caller did not name; a tag both name is recorded at the larger of the two epochs. `None` when the
    /// kept value's tags are not known, or when that is more than [`MAX_TAGS`] tags (the header could not
    /// hold them): the value is then not stored again.
    ///
    /// A kept tag's epoch is the one current when the lease was granted, not the (lower) one the value
    /// recorded: a value that was stale because the tag was *expired* counts as current during the throttle
    /// (that is its point), while a removal after the grant lands above it and removes the value. It is never
    /// below the value's own: on Redis Cluster the caller's epochs come from a view that may lag the fill that
    /// recorded the value, and a copy recorded below it would read as removed to every up-to-date reader.
    pub(crate) fn throttled(&self) -> Option<Stamp> {
        let kept = self.kept.as_ref()?;
        let mut tags = self.tags.clone();
        for (t, epoch) in kept {
            match tags.iter_mut().find(|(c, _)| c == t) {
                Some((_, mine)) => *mine = (*mine).max(*epoch),
                None => tags.push((t.clone(), *epoch)),
            }
        }
        (tags.len() <= MAX_TAGS).then_some(Stamp {
            gens: self.gens,
            tags,
            kept: None,
        })
    }
}

impl From<Gens> for Stamp {
    fn from(gens: Gens) -> Self {
        Stamp {
            gens,
            tags: Vec::new(),
            kept: None,
        }
    }
}

/// What a stored value says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body<'a> {
    /// A value; the codec's bytes.
    Value(&'a [u8]),
    /// A cached "absent" (negative caching).
    Negative,
}

/// The tag section of a `V2` value, already checked by [`parse_tagged`]: iterate it without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tags<'a> {
    n: usize,
    raw: &'a [u8],
}

impl<'a> Tags<'a> {
    /// `(tag, epoch recorded at the fill's lease)`, in the stored order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'a [u8], u64)> + 'a {
        let mut rest = self.raw;
        (0..self.n).map_while(move |_| {
            let (tag, epoch, after) = split_tag(rest).ok()?;
            rest = after;
            Some((tag, epoch))
        })
    }
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

/// The full stored form of a value filled under `stamp`: `V1` without tags, `V2` with.
pub(crate) fn value(stamp: &Stamp, body: &[u8]) -> Vec<u8> {
    let mut head = String::with_capacity(32);
    let g = stamp.gens;
    if stamp.tags.is_empty() {
        let _ = write!(head, "V1:{}:{}:", g.ns, g.class);
    } else {
        let _ = write!(head, "V2:{}:{}:{}:", g.ns, g.class, stamp.tags.len());
        for (tag, epoch) in &stamp.tags {
            let _ = write!(head, "{}:{tag}:{epoch}:", tag.len());
        }
    }
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse a stored value (either version), ignoring its tags.
pub(crate) fn parse(raw: &[u8]) -> Result<(Gens, Body<'_>), EnvelopeError> {
    parse_tagged(raw).map(|(g, _, b)| (g, b))
}

/// Parse a stored value with its tags (none for a `V1` value).
pub(crate) fn parse_tagged(raw: &[u8]) -> Result<(Gens, Tags<'_>, Body<'_>), EnvelopeError> {
    let (tagged, rest) = if let Some(rest) = raw.strip_prefix(VALUE_PREFIX) {
        (false, rest)
    } else if let Some(rest) = raw.strip_prefix(TAGGED_PREFIX) {
        (true, rest)
    } else {
        return Err(EnvelopeError("missing V1/V2 header"));
    };
    let (ns, rest) = split_num(rest)?;
    let (class, mut rest) = split_num(rest)?;
    let mut tags = Tags::default();
    if tagged {
        let (n, after) = split_num(rest)?;
        let n = usize::try_from(n).map_err(|_| EnvelopeError("bad tag count"))?;
        if n == 0 || n > MAX_TAGS {
            return Err(EnvelopeError("bad tag count"));
        }
        let section = after;
        rest = after;
        for _ in 0..n {
            rest = split_tag(rest)?.2;
        }
        tags = Tags {
            n,
            raw: &section[..section.len() - rest.len()],
        };
    }
    let body = match rest {
        [b'v', b':', payload @ ..] => Body::Value(payload),
        [b'n', b':'] => Body::Negative,
        _ => return Err(EnvelopeError("unknown value kind")),
    };
    Ok((Gens { ns, class }, tags, body))
}

/// One `{len}:{tag}:{epoch}:` item: the tag, its epoch and what follows.
fn split_tag(s: &[u8]) -> Result<(&[u8], u64, &[u8]), EnvelopeError> {
    let (len, rest) = split_num(s)?;
    let len = usize::try_from(len).map_err(|_| EnvelopeError("bad tag length"))?;
    if len == 0 || len > MAX_TAG_BYTES || rest.len() <= len || rest[len] != b':' {
        return Err(EnvelopeError("bad tag"));
    }
    let tag = &rest[..len];
    let (epoch, rest) = split_num(&rest[len + 1..])?;
    Ok((tag, epoch, rest))
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

/// How stored bytes compare with the current epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not a readable value: a lease, or bytes the caller must decode, report and heal.
    NotAValue,
    /// Filled under epochs no older than the current ones (and usable: a cached absent only if allowed).
    Current,
    /// Filled before a group or tag invalidation, or an absent the caller cannot use: a miss.
    Stale,
    /// Filled before a tag *expiry* (and after every removal): not fresh, but a value a fail-safe class may
    /// keep under a refill lease and serve if the refill fails. A cached absent is never expired: it is stale.
    Expired,
    /// It carries a tag whose current epoch the caller did not supply (Redis Cluster: look it up, ask again).
    Unknown,
}

/// Judge stored bytes against the current epochs: `gens`, and `tag_epochs(tag)` for each tag the value carries
/// (`None`: not known to the caller). Current means filled under epochs no older than the current ones
/// (epochs only grow; on Cluster a handle's view may lag an entry filled by a handle that saw a bump first,
/// and that entry is current). Both backends decide hit-or-miss with this, as the Lua scripts do
/// (`kw_stale` in `cache/epochs.lua`).
pub(crate) fn judge(
    raw: &[u8],
    gens: Gens,
    tag_epochs: impl Fn(&[u8]) -> Option<TagEpochs>,
    negative_ok: bool,
) -> Verdict {
    if !raw.starts_with(VALUE_PREFIX) && !raw.starts_with(TAGGED_PREFIX) {
        return Verdict::NotAValue;
    }
    let Ok((g, tags, body)) = parse_tagged(raw) else {
        return Verdict::NotAValue;
    };
    // Filled while the namespace epoch was exhausted: never current (`kw_stale`).
    if g.ns >= TOP_EPOCH
        || g.ns < gens.ns
        || g.class < gens.class
        || (!negative_ok && body == Body::Negative)
    {
        return Verdict::Stale;
    }
    let (mut unknown, mut expired) = (false, false);
    for (tag, recorded) in tags.iter() {
        match tag_epochs(tag) {
            Some(current) if recorded < current.removed => return Verdict::Stale,
            Some(current) if recorded < current.expired => expired = true,
            Some(_) => {}
            None => unknown = true,
        }
    }
    if unknown {
        Verdict::Unknown
    } else if expired && body == Body::Negative {
        Verdict::Stale
    } else if expired {
        Verdict::Expired
    } else {
        Verdict::Current
    }
}

/// A fresh lease marker, `L1:{token}:0` with `token` as 32 lowercase hex digits, built in one allocation
/// (every cache read sends one, hits included).
pub(crate) fn lease_marker(token: u128) -> String {
    use std::fmt::Write as _;
    let mut m = String::with_capacity(LEASE_FLAG_AT + 1);
    m.push_str("L1:");
    // Writing to a `String` cannot fail.
    let _ = write!(m, "{token:032x}:0");
    m
}

/// The prefix that identifies a lease marker regardless of its waiter flag: all of it but the flag.
pub(crate) fn lease_prefix(marker: &str) -> &str {
    &marker[..marker.len().saturating_sub(1)]
}

/// Where a lease marker's waiter flag is (0-based): after `L1:`, the 32-hex-digit token and `:`.
pub(crate) const LEASE_FLAG_AT: usize = 36;

/// Whether stored bytes are a lease marker whose waiter flag is set.
pub(crate) fn lease_has_waiters(raw: &[u8]) -> bool {
    raw.starts_with(LEASE_PREFIX) && raw.get(LEASE_FLAG_AT) == Some(&b'1')
}

/// A lease taken over a kept value (`L1:{token}:{w}:{deadline_ms}:{value}`, see `cache/fetch.lua`): the
/// deadline (server ms) until which it is held, and the value it keeps. `None` for a plain lease or anything
/// else.
pub(crate) fn kept(raw: &[u8]) -> Option<(i64, &[u8])> {
    if !raw.starts_with(LEASE_PREFIX) || raw.get(LEASE_FLAG_AT + 1) != Some(&b':') {
        return None;
    }
    let rest = raw.get(LEASE_FLAG_AT + 2..)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let digits = &rest[..colon];
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let deadline = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((deadline, &rest[colon + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untagged(g: Gens) -> Stamp {
        g.into()
    }

    #[test]
    fn round_trip() {
        let g = Gens { ns: 3, class: 17 };
        let v = value(&untagged(g), &body(Some(b"{\"a\":1}")));
        assert_eq!(v, b"V1:3:17:v:{\"a\":1}");
        assert_eq!(parse(&v).unwrap(), (g, Body::Value(b"{\"a\":1}")));
        let n = value(&untagged(g), &body(None));
        assert_eq!(parse(&n).unwrap(), (g, Body::Negative));
        // payloads may contain colons
        let v = value(&untagged(g), &body(Some(b"a:b:c")));
        assert_eq!(parse(&v).unwrap().1, Body::Value(b"a:b:c"));
    }

    #[test]
    fn tagged_round_trip() {
        let stamp = Stamp {
            gens: Gens { ns: 1, class: 2 },
            tags: vec![("product:42".into(), 7), ("a:b:12:".into(), 0)],
            kept: None,
        };
        let v = value(&stamp, &body(Some(b"x:1")));
        assert_eq!(v, b"V2:1:2:2:10:product:42:7:7:a:b:12::0:v:x:1");
        let (g, tags, b) = parse_tagged(&v).unwrap();
        assert_eq!(g, stamp.gens);
        assert_eq!(b, Body::Value(b"x:1"));
        assert_eq!(tags.iter().count(), 2);
        assert_eq!(
            tags.iter().collect::<Vec<_>>(),
            vec![(&b"product:42"[..], 7), (&b"a:b:12:"[..], 0)]
        );
        let n = value(&stamp, &body(None));
        assert_eq!(parse(&n).unwrap(), (stamp.gens, Body::Negative));
    }

    #[test]
    fn v1_values_read_as_untagged() {
        let (g, tags, b) = parse_tagged(b"V1:5:6:v:42").unwrap();
        assert_eq!(
            (g, tags.iter().count(), b),
            (Gens { ns: 5, class: 6 }, 0, Body::Value(b"42"))
        );
    }

    #[test]
    fn judging_follows_every_epoch() {
        let stamp = Stamp {
            gens: Gens { ns: 1, class: 2 },
            tags: vec![("p".into(), 10), ("c".into(), 20)],
            kept: None,
        };
        let v = value(&stamp, &body(Some(b"1")));
        let g = stamp.gens;
        let removed = |e: u64| TagEpochs {
            removed: e,
            expired: 0,
        };
        let at = |p: u64, c: u64| move |t: &[u8]| Some(removed(if t == b"p" { p } else { c }));
        assert_eq!(judge(&v, g, at(10, 20), false), Verdict::Current);
        assert_eq!(judge(&v, g, at(9, 0), false), Verdict::Current);
        assert_eq!(judge(&v, g, at(11, 20), false), Verdict::Stale);
        assert_eq!(judge(&v, g, at(10, 21), false), Verdict::Stale);
        let newer = Gens { ns: 2, class: 2 };
        assert_eq!(judge(&v, newer, at(0, 0), false), Verdict::Stale);
        let only_p = |t: &[u8]| (t == b"p").then_some(removed(10));
        assert_eq!(judge(&v, g, only_p, false), Verdict::Unknown);
        let p_stale = |t: &[u8]| (t == b"p").then_some(removed(11));
        assert_eq!(
            judge(&v, g, p_stale, false),
            Verdict::Stale,
            "one stale tag decides"
        );
        let n = value(&stamp, &body(None));
        assert_eq!(judge(&n, g, at(0, 0), false), Verdict::Stale);
        assert_eq!(judge(&n, g, at(0, 0), true), Verdict::Current);
        assert_eq!(judge(b"L1:x:0", g, at(0, 0), true), Verdict::NotAValue);
        assert_eq!(judge(b"V2:1:2:1:", g, at(0, 0), true), Verdict::NotAValue);
    }

    #[test]
    fn an_expired_tag_keeps_the_value_for_fail_safe_and_a_removal_wins() {
        let stamp = Stamp {
            gens: Gens { ns: 1, class: 2 },
            tags: vec![("p".into(), 10), ("c".into(), 20)],
            kept: None,
        };
        let v = value(&stamp, &body(Some(b"1")));
        let g = stamp.gens;
        let at = |p: TagEpochs, c: TagEpochs| move |t: &[u8]| Some(if t == b"p" { p } else { c });
        let e = |removed: u64, expired: u64| TagEpochs { removed, expired };
        assert_eq!(
            judge(&v, g, at(e(0, 10), e(20, 0)), false),
            Verdict::Current
        );
        assert_eq!(
            judge(&v, g, at(e(0, 11), e(20, 0)), false),
            Verdict::Expired
        );
        assert_eq!(
            judge(&v, g, at(e(0, 11), e(21, 0)), false),
            Verdict::Stale,
            "a removal of another tag wins over an expiry"
        );
        assert_eq!(judge(&v, g, at(e(11, 12), e(0, 0)), false), Verdict::Stale);
        let only_p = |t: &[u8]| (t == b"p").then_some(e(0, 11));
        assert_eq!(judge(&v, g, only_p, false), Verdict::Unknown);
        let n = value(&stamp, &body(None));
        assert_eq!(
            judge(&n, g, at(e(0, 11), e(0, 0)), true),
            Verdict::Stale,
            "a cached absent is never kept"
        );
        assert_eq!(e(3, 9).stamp(), 9);
        assert_eq!(e(9, 3).stamp(), 9);
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
            b"V2:1:2:0:v:1",
            b"V2:1:2:1:v:1",
            b"V2:1:2:1:3:ab:1:v:1",
            b"V2:1:2:1:2:ab:x:v:1",
            b"V2:1:2:1:2:ab1:v:1",
            b"V2:1:2:1:0::1:v:1",
            b"V2:1:2:33:1:a:1:v:1",
            b"V2:1:2:2:1:a:1:v:1",
            b"V2:1:2:1:999999999999:a:1:v:1",
            b"V2:1:2:1:1:a:1:",
        ] {
            assert!(parse(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn lease_flags() {
        let m = lease_marker(0xabc);
        assert_eq!(m, "L1:00000000000000000000000000000abc:0");
        assert_eq!(m.len(), LEASE_FLAG_AT + 1, "the flag is the last byte");
        assert_eq!(m.capacity(), m.len(), "built without growing");
        assert_eq!(lease_prefix(&m), "L1:00000000000000000000000000000abc:");
        assert!(!lease_has_waiters(m.as_bytes()));
        let t = "0123456789abcdef0123456789abcdef";
        assert!(lease_has_waiters(format!("L1:{t}:1").as_bytes()));
        assert!(lease_has_waiters(
            format!("L1:{t}:1:99:V1:1:1:v:x").as_bytes()
        ));
        assert!(!lease_has_waiters(
            format!("L1:{t}:0:99:V1:1:1:v:1").as_bytes()
        ));
        assert_eq!(
            kept(format!("L1:{t}:0:99:V1:1:1:v:x").as_bytes()),
            Some((99, &b"V1:1:1:v:x"[..]))
        );
        assert_eq!(kept(format!("L1:{t}:0").as_bytes()), None);
        assert_eq!(kept(b"V1:1:1:v:x"), None);
        assert!(!lease_has_waiters(b"V1:1:1:v:1"));
    }

    #[test]
    fn a_throttle_records_the_caller_s_tags_then_the_kept_value_s_others() {
        let owned = |tags: &[(&str, u64)]| -> Vec<(String, u64)> {
            tags.iter().map(|&(t, e)| (t.to_owned(), e)).collect()
        };
        let stamp = Stamp {
            gens: Gens { ns: 1, class: 2 },
            tags: owned(&[("b", 5), ("c", 8)]),
            kept: Some(owned(&[("a", 9), ("b", 7), ("c", 6)])),
        };
        let throttled = stamp.throttled().unwrap();
        assert_eq!(throttled.gens, stamp.gens);
        // A tag both name: the larger epoch (`b`: the value's, above a lagging view's; `c`: the caller's).
        assert_eq!(throttled.tags, owned(&[("b", 7), ("c", 8), ("a", 9)]));
        assert!(throttled.kept.is_none());
        // The kept value's tags are not known: nothing to store.
        let unknown = Stamp {
            kept: None,
            ..stamp.clone()
        };
        assert!(unknown.throttled().is_none());
        // An untagged kept value: the caller's tags.
        let untagged = Stamp {
            kept: Some(Vec::new()),
            ..stamp
        };
        assert_eq!(
            untagged.throttled().unwrap().tags,
            owned(&[("b", 5), ("c", 8)])
        );
        // More than one header holds: nothing to store.
        let many: Vec<(String, u64)> = (0..=MAX_TAGS).map(|i| (format!("t{i}"), 1)).collect();
        let over = Stamp {
            gens: Gens::default(),
            tags: Vec::new(),
            kept: Some(many),
        };
        assert!(over.throttled().is_none());
    }
}
