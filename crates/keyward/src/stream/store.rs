//! The stream operations' storage half: each is one Lua script on Redis (the `stream_*.lua` files next to
//! this one) and one critical section of the embedded keyspace mirroring it line for line, side by side.

use bytes::Bytes;

use super::EntryId;
use crate::Keyward;
use crate::backend::memory::stream::{StreamId, StreamVal};
use crate::backend::{Kv, Reply, scripts};
use crate::error::Result;
use crate::policy::Retention;

scripts! {
    publish: "stream_publish.lua";
    len: "stream_len.lua";
    range: "stream_range.lua";
}

/// The field each entry stores its encoded message in.
pub(super) const FIELD: &[u8] = b"m";

/// The keys of one stream class. They share the hash tag `{<class>}`, so one Cluster slot holds the stream,
/// its dead letters and any helper key, and one script can touch them all. Streams carry no TTL (their
/// retention bounds them); every helper key added here must get one.
#[derive(Debug, Clone)]
pub(crate) struct StreamKeys {
    /// `{env}:{app}:{class}:v{n}:{<class>}`: the stream.
    pub(crate) stream: String,
    /// `…:{<class>}:dead`: the dead-letter stream (its own retention).
    #[allow(dead_code)] // used by the worker runtime, which is not part of this change yet
    pub(crate) dead: String,
}

impl StreamKeys {
    pub(crate) fn new(stream: String) -> Self {
        StreamKeys {
            dead: format!("{stream}:dead"),
            stream,
        }
    }
}

/// What one publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    /// The new entries' ids, in order.
    pub(super) ids: Vec<EntryId>,
    /// Entries the hard cap removed although a group had not acknowledged them.
    pub(super) dropped: u64,
}

fn to_entry(id: StreamId) -> EntryId {
    EntryId {
        ms: id.ms,
        seq: id.seq,
    }
}

/// The retention arguments of `stream_publish.lua`: maxlen (0 = none), max_age ms (0 = none), `~`, hard cap.
fn retention_args(r: &Retention) -> (u64, u64, bool, u64) {
    (
        r.maxlen_value().unwrap_or(0),
        r.max_age_value()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        r.is_approximate(),
        r.hard_maxlen_value(),
    )
}

/// The mirror of `stream_publish.lua`'s trimming over one stream (exact: the embedded backend has no
/// internal nodes, so `~` trims exactly too). Returns the entries dropped by the hard cap that a group
/// still needed.
pub(crate) fn apply_retention(s: &mut StreamVal, r: &Retention, now_ms: i64) -> u64 {
    let (maxlen, max_age, _, hard) = retention_args(r);
    let g = (s.group_names().next().is_some()).then(|| s.groups_floor());
    let mut floor: Option<StreamId> = (max_age > 0).then(|| {
        let now = u64::try_from(now_ms).unwrap_or(0);
        StreamId::new(now.saturating_sub(max_age), 0)
    });
    let len = s.len() as u64;
    if maxlen > 0 && len > maxlen {
        let excess = len - maxlen;
        let upper = g.unwrap_or(StreamId::MAX);
        let old = s.ids_below(upper, usize::try_from(excess).unwrap_or(usize::MAX));
        let l = if old.len() as u64 == excess {
            old.last().map(|id| id.next())
        } else {
            g
        };
        if let Some(l) = l
            && floor.is_none_or(|f| f < l)
        {
            floor = Some(l);
        }
    }
    let mut t = floor;
    if let Some(g) = g
        && t.is_none_or(|t| g < t)
    {
        t = Some(g);
    }
    if let Some(t) = t {
        s.trim_minid(t);
    }
    let len = s.len() as u64;
    let mut dropped = 0;
    if len > hard {
        let cut = s.ids_below(
            StreamId::MAX,
            usize::try_from(len - hard).unwrap_or(usize::MAX),
        );
        dropped = cut.iter().filter(|id| g.is_some_and(|g| **id >= g)).count() as u64;
        if let Some(last) = cut.last() {
            s.trim_minid(last.next());
        }
    }
    dropped
}

/// `stream_publish.lua`: append `payloads` (already encoded and size-checked) and apply `retention`.
pub(super) async fn publish(
    kw: &Keyward,
    keys: &StreamKeys,
    retention: &Retention,
    payloads: &[Vec<u8>],
) -> Result<Published> {
    let (maxlen, max_age, approximate, hard) = retention_args(retention);
    let mut call = SCRIPTS
        .publish
        .call("stream_publish")
        .key(&keys.stream)
        .arg(maxlen)
        .arg(max_age)
        .arg(if approximate { "1" } else { "0" })
        .arg(hard);
    for p in payloads {
        call = call.arg(&p[..]);
    }
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let s = kv.stream_or_create(&keys.stream);
                let ids = payloads
                    .iter()
                    .map(|p| {
                        to_entry(s.add(
                            now_ms,
                            vec![(Bytes::from_static(FIELD), Bytes::copy_from_slice(p))],
                        ))
                    })
                    .collect();
                let dropped = apply_retention(s, retention, now_ms);
                Published { ids, dropped }
            },
            |reply: &Reply| {
                let items = reply.array()?;
                let (dropped, ids) = items.split_first()?;
                let ids = ids
                    .iter()
                    .map(|r| {
                        let b = r.bytes()?;
                        let id = StreamId::parse(std::str::from_utf8(&b).ok()?)?;
                        Some(to_entry(id))
                    })
                    .collect::<Option<Vec<_>>>()?;
                (ids.len() == payloads.len()).then_some(())?;
                Some(Published {
                    ids,
                    dropped: u64::try_from(dropped.int()?).ok()?,
                })
            },
        )
        .await
}

/// `stream_len.lua`.
pub(super) async fn len(kw: &Keyward, keys: &StreamKeys) -> Result<u64> {
    let call = SCRIPTS.len.call("stream_len").key(&keys.stream);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| kv.stream(&keys.stream).map_or(0, |s| s.len() as u64),
            |reply| u64::try_from(reply.int()?).ok(),
        )
        .await
}

/// `stream_range.lua`: up to `count` entries above `after`, each with its payload (empty if it has none).
pub(super) async fn range(
    kw: &Keyward,
    keys: &StreamKeys,
    after: Option<EntryId>,
    count: usize,
) -> Result<Vec<(EntryId, Bytes)>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let call = SCRIPTS
        .range
        .call("stream_range")
        .key(&keys.stream)
        .arg(start)
        .arg(count);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let Some(s) = kv.stream(&keys.stream) else {
                    return Vec::new();
                };
                let from = after.map_or(StreamId::ZERO, |a| StreamId::new(a.ms, a.seq).next());
                s.range(from, StreamId::MAX, count)
                    .into_iter()
                    .map(|(id, fields)| {
                        let payload = fields
                            .into_iter()
                            .find(|(f, _)| &f[..] == FIELD)
                            .map(|(_, v)| v)
                            .unwrap_or_default();
                        (to_entry(id), payload)
                    })
                    .collect()
            },
            |reply| {
                reply
                    .array()?
                    .chunks(2)
                    .map(|pair| {
                        let [id, payload] = pair else { return None };
                        let id = StreamId::parse(std::str::from_utf8(&id.bytes()?).ok()?)?;
                        let payload = if payload.is_nil() {
                            Bytes::new()
                        } else {
                            payload.bytes()?
                        };
                        Some((to_entry(id), payload))
                    })
                    .collect()
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u64) -> StreamVal {
        let mut s = StreamVal::default();
        for ms in 1..=n {
            s.add(i64::try_from(ms).unwrap(), vec![]);
        }
        s
    }

    fn ids(s: &StreamVal) -> Vec<u64> {
        s.range(StreamId::ZERO, StreamId::MAX, usize::MAX)
            .iter()
            .map(|(id, _)| id.ms)
            .collect()
    }

    #[test]
    fn maxlen_trims_to_the_bound_without_groups() {
        let mut s = filled(10);
        let r = Retention::maxlen(4).approximate(false);
        assert_eq!(apply_retention(&mut s, &r, 10), 0);
        assert_eq!(ids(&s), [7, 8, 9, 10]);
    }

    #[test]
    fn max_age_trims_by_id_time() {
        let mut s = filled(10);
        let r = Retention::max_age(std::time::Duration::from_millis(3000));
        // now = 3006 ms: entries at 1..=5 ms are older than 3 s.
        apply_retention(&mut s, &r, 3006);
        assert_eq!(ids(&s), [6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_lagging_group_pins_unacknowledged_entries_up_to_the_hard_cap() {
        let mut s = filled(3);
        s.create_group("g", Some(StreamId::ZERO));
        s.read_new("g", "c", 2, 3); // 1 and 2 pending, 3 not delivered
        s.ack("g", &[StreamId::new(1, 0)]);
        for ms in 4..=10 {
            s.add(ms, vec![]);
        }
        let r = Retention::maxlen(2).hard_maxlen(6);
        // Retention wants 9..=10; the group needs 2 and everything after: 1 goes, then the hard cap
        // keeps the newest 6 and drops 2..=4, which the group had not acknowledged.
        assert_eq!(apply_retention(&mut s, &r, 10), 3);
        assert_eq!(ids(&s), [5, 6, 7, 8, 9, 10]);

        // Once the group catches up, retention applies again.
        s.read_new("g", "c", 100, 11);
        let all: Vec<StreamId> = (1..=10).map(|ms| StreamId::new(ms, 0)).collect();
        s.ack("g", &all);
        assert_eq!(apply_retention(&mut s, &r, 11), 0);
        assert_eq!(ids(&s), [9, 10]);
    }

    #[test]
    fn the_group_floor_wins_over_age_and_length() {
        let mut s = filled(10);
        s.create_group("g", Some(StreamId::new(5, 0))); // needs 6..
        s.create_group("h", Some(StreamId::new(8, 0))); // needs 9..
        let r = Retention::maxlen(1).and_max_age(std::time::Duration::from_millis(1));
        assert_eq!(apply_retention(&mut s, &r, 100), 0);
        assert_eq!(ids(&s), [6, 7, 8, 9, 10], "g's floor holds");
    }
}
