//! What the walk has seen so far: counts, memory and TTLs per class, and the violations, kept small enough
//! to be saved in a checkpoint (examples and lists are capped) and merged key by key.
//!
//! The one decision: **the tally is keyed by what [`keyward::key::classify`] says, never by a glob**, so a
//! hand-formatted key that merely starts like a class's is counted outside every class, and the audit and
//! the purge agree on which keys a class owns.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use keyward::key::{KeyClass, KeyRole, classify};
use keyward::policy::Policy;
use serde::{Deserialize, Serialize};

use super::walk::KeyFacts;

/// Example keys kept per finding.
pub(crate) const EXAMPLES: usize = 3;
/// Distinct patterns kept for keys outside every class; later ones go to a catch-all per first segment.
const MAX_PATTERNS: usize = 500;

/// TTL distribution: how many keys have no TTL, or at most 1 minute, 1 hour, 1 day, 7 days, or more left.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct TtlHistogram {
    pub(crate) none: u64,
    pub(crate) under_1m: u64,
    pub(crate) under_1h: u64,
    pub(crate) under_1d: u64,
    pub(crate) under_7d: u64,
    pub(crate) over_7d: u64,
}

impl TtlHistogram {
    fn add(&mut self, pttl_ms: i64) {
        const MIN: i64 = 60_000;
        let slot = match pttl_ms {
            ..0 => &mut self.none,
            0..=MIN => &mut self.under_1m,
            60_001..=3_600_000 => &mut self.under_1h,
            3_600_001..=86_400_000 => &mut self.under_1d,
            86_400_001..=604_800_000 => &mut self.under_7d,
            _ => &mut self.over_7d,
        };
        *slot += 1;
    }
}

/// Keys, memory and TTLs of one group of keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Counts {
    pub(crate) keys: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) ttl: TtlHistogram,
}

impl Counts {
    fn add(&mut self, facts: &KeyFacts) {
        self.keys += 1;
        self.memory_bytes += facts.memory;
        self.ttl.add(facts.pttl_ms);
    }
}

/// A key and a number (bytes, TTL in ms), for examples and the biggest keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct KeyAnd {
    pub(crate) key: String,
    pub(crate) value: u64,
}

/// Keys of a finding: how many, and the first few.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Finding {
    pub(crate) keys: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) examples: Vec<KeyAnd>,
}

impl Finding {
    fn add(&mut self, key: &[u8], value: u64, memory: u64) {
        self.keys += 1;
        self.memory_bytes += memory;
        if self.examples.len() < EXAMPLES {
            self.examples.push(KeyAnd {
                key: display_key(key),
                value,
            });
        }
    }
}

/// One class as seen so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct ClassTally {
    pub(crate) counts: Counts,
    /// Per version in the keys.
    pub(crate) versions: BTreeMap<u32, Counts>,
    /// The biggest keys, biggest first (at most `top` of them).
    pub(crate) biggest: Vec<KeyAnd>,
    pub(crate) no_ttl: Finding,
    pub(crate) ttl_too_long: Finding,
    /// The largest TTL bound (ms) among the keys in `ttl_too_long` (bounds differ by role, e.g. a lock's fence).
    pub(crate) ttl_bound_ms: u64,
    /// Keys whose value is over the class's size limit (value = its size in bytes).
    pub(crate) over_max_value: Finding,
}

/// A stream met during the walk, checked once the walk is complete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct StreamSeen {
    /// Index of the server (in the walk's server order) that holds it.
    pub(crate) node: usize,
    /// The raw key, base64 (keys may be any bytes).
    pub(crate) key_b64: String,
    /// The class it belongs to (by [`classify`]), if any, and its role there.
    pub(crate) class: Option<String>,
    pub(crate) role: Option<String>,
}

/// Everything the walk has counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Tally {
    pub(crate) total: Counts,
    pub(crate) classes: BTreeMap<String, ClassTally>,
    pub(crate) internal: Counts,
    pub(crate) internal_no_ttl: Finding,
    /// Keys outside every class, by inferred pattern; `true` = inside the namespace.
    pub(crate) outside: BTreeMap<String, (bool, Finding)>,
    pub(crate) outside_no_ttl: BTreeMap<String, Finding>,
    pub(crate) streams: Vec<StreamSeen>,
    pub(crate) keys_seen: u64,
}

/// What to measure for a key whose `MEMORY USAGE` is over its class's limit: the command and its field.
pub(crate) fn size_probe(
    policy: &Policy,
    facts: &KeyFacts,
) -> Option<(&'static str, Option<&'static str>, u64)> {
    let KeyClass::Class(k) = classify(policy, &facts.key) else {
        return None;
    };
    if k.role() != KeyRole::Entry {
        return None;
    }
    let class = k.class();
    // MEMORY USAGE includes the value, so a key below the limit in memory cannot be over it in size.
    let (cmd, field, limit) = if let Some(c) = class.as_cache() {
        (
            "STRLEN",
            None,
            c.max_value_bytes_value() as u64 + ENVELOPE_ALLOWANCE,
        )
    } else if let Some(c) = class.as_session() {
        ("HSTRLEN", Some("d"), c.max_data_bytes_value() as u64)
    } else if let Some(c) = class.as_idempotency() {
        ("HSTRLEN", Some("r"), c.max_response_bytes_value() as u64)
    } else {
        return None;
    };
    (facts.memory > limit).then_some((cmd, field, limit))
}

/// The bytes a cache value may carry beyond `max_value_bytes`: keyward's envelope header (at most 128
/// bytes, the range its scripts read).
pub(crate) const ENVELOPE_ALLOWANCE: u64 = 128;

impl Tally {
    /// Counts one key. `value_size` is the confirmed size of its value when [`size_probe`] asked for it.
    pub(crate) fn add(
        &mut self,
        policy: &Policy,
        node: usize,
        facts: &KeyFacts,
        value_size: Option<u64>,
        top: usize,
    ) {
        self.keys_seen += 1;
        self.total.add(facts);
        let class = classify(policy, &facts.key);
        if facts.kind == "stream" {
            let (class_name, role) = match &class {
                KeyClass::Class(k) => (
                    Some(k.class().name().to_owned()),
                    Some(k.role().name().to_owned()),
                ),
                _ => (None, None),
            };
            use base64::Engine as _;
            self.streams.push(StreamSeen {
                node,
                key_b64: base64::engine::general_purpose::STANDARD.encode(&facts.key),
                class: class_name,
                role,
            });
        }
        match class {
            KeyClass::Class(k) => {
                let t = self.classes.entry(k.class().name().to_owned()).or_default();
                t.counts.add(facts);
                t.versions.entry(k.version()).or_default().add(facts);
                match k.max_ttl() {
                    // Streams and dead letters: bounded by their retention, checked after the walk.
                    None => {}
                    Some(max) => {
                        if facts.pttl_ms < 0 {
                            t.no_ttl.add(&facts.key, 0, facts.memory);
                        } else if u128::from(facts.pttl_ms.unsigned_abs()) > max.as_millis() + 1000
                        {
                            t.ttl_too_long.add(
                                &facts.key,
                                facts.pttl_ms.unsigned_abs(),
                                facts.memory,
                            );
                            let bound = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
                            t.ttl_bound_ms = t.ttl_bound_ms.max(bound);
                        }
                    }
                }
                if let Some(size) = value_size {
                    t.over_max_value.add(&facts.key, size, facts.memory);
                }
                push_biggest(&mut t.biggest, &facts.key, facts.memory, top);
            }
            KeyClass::Internal => {
                self.internal.add(facts);
                if facts.pttl_ms < 0 {
                    self.internal_no_ttl.add(&facts.key, 0, facts.memory);
                }
            }
            other => {
                let inside = matches!(other, KeyClass::Unknown);
                let mut pattern = infer_pattern(&facts.key);
                if !self.outside.contains_key(&pattern) && self.outside.len() >= MAX_PATTERNS {
                    pattern = overflow_pattern(&pattern);
                }
                self.outside
                    .entry(pattern.clone())
                    .or_insert_with(|| (inside, Finding::default()))
                    .1
                    .add(&facts.key, facts.memory, facts.memory);
                if facts.pttl_ms < 0 {
                    self.outside_no_ttl.entry(pattern).or_default().add(
                        &facts.key,
                        0,
                        facts.memory,
                    );
                }
            }
        }
    }
}

fn push_biggest(list: &mut Vec<KeyAnd>, key: &[u8], bytes: u64, top: usize) {
    if top == 0 || (list.len() >= top && list.last().is_some_and(|l| l.value >= bytes)) {
        return;
    }
    let at = list.partition_point(|l| l.value >= bytes);
    list.insert(
        at,
        KeyAnd {
            key: display_key(key),
            value: bytes,
        },
    );
    list.truncate(top);
}

/// A key as text: UTF-8 as is, except that `\`, control characters and invalid bytes are written `\xNN`
/// (so a binary key is shown losslessly and never moves the terminal).
pub(crate) fn display_key(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len());
    for chunk in key.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The pattern of a key outside every class: split on `:`, and every segment that looks like an id (has a
/// digit — other than a short version like `v1` —, is longer than 24 bytes, or holds anything but ASCII
/// letters, `_`, `-` and `.`) becomes `*`; hash-tag braces around a segment are kept. `prod:user:session:8f3a`
/// → `prod:user:session:*`.
pub(crate) fn infer_pattern(key: &[u8]) -> String {
    let text = display_key(key);
    text.split(':')
        .map(|seg| {
            let open = seg.starts_with('{');
            let close = seg.ends_with('}') && seg.len() > usize::from(open);
            let core = &seg[usize::from(open)..seg.len() - usize::from(close)];
            let core = if id_like(core) { "*" } else { core };
            format!(
                "{}{core}{}",
                if open { "{" } else { "" },
                if close { "}" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(":")
}

fn id_like(seg: &str) -> bool {
    let version = seg.len() <= 4
        && seg.starts_with('v')
        && seg.len() > 1
        && seg[1..].bytes().all(|b| b.is_ascii_digit());
    if version {
        return false;
    }
    seg.len() > 24
        || seg.bytes().any(|b| b.is_ascii_digit())
        || !seg
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || matches!(b, b'_' | b'-' | b'.'))
}

/// Where a pattern goes once [`MAX_PATTERNS`] are kept: its first segment, then `:*`.
fn overflow_pattern(pattern: &str) -> String {
    match pattern.split_once(':') {
        Some((first, _)) => format!("{first}:*"),
        None => "*".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_replace_ids_and_keep_words() {
        assert_eq!(
            infer_pattern(b"prod:user:session:8f3a9c"),
            "prod:user:session:*"
        );
        assert_eq!(
            infer_pattern(b"prod:user:session:42"),
            "prod:user:session:*"
        );
        assert_eq!(
            infer_pattern(b"app:v1:products:list:en"),
            "app:v1:products:list:en"
        );
        assert_eq!(
            infer_pattern(b"cart:{user:17}:items"),
            "cart:{user:*}:items"
        );
        assert_eq!(infer_pattern("caf\u{e9}:menu".as_bytes()), "*:menu");
        assert_eq!(infer_pattern(b"bin:\xff\x00"), "bin:*");
        assert_eq!(infer_pattern(b"{}"), "{}");
    }

    #[test]
    fn binary_keys_display_losslessly() {
        assert_eq!(display_key(b"a:\xff\x00\\b"), "a:\\xff\\x00\\x5cb");
        assert_eq!(display_key("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }

    #[test]
    fn ttl_buckets() {
        let mut h = TtlHistogram::default();
        for ms in [-1, 0, 60_000, 60_001, 86_400_001, 604_800_001] {
            h.add(ms);
        }
        assert_eq!(
            h,
            TtlHistogram {
                none: 1,
                under_1m: 2,
                under_1h: 1,
                under_1d: 0,
                under_7d: 1,
                over_7d: 1
            }
        );
    }

    #[test]
    fn biggest_keeps_the_top_n_in_order() {
        let mut list = Vec::new();
        for (k, b) in [("a", 5), ("b", 9), ("c", 1), ("d", 7)] {
            push_biggest(&mut list, k.as_bytes(), b, 3);
        }
        let got: Vec<_> = list.iter().map(|k| (k.key.as_str(), k.value)).collect();
        assert_eq!(got, [("b", 9), ("d", 7), ("a", 5)]);
    }
}
