//! The embedded keyspace's stream value: Redis Streams' data model (entries with `ms-seq` ids, consumer
//! groups with their last-delivered id, pending entry lists, consumers) and the commands keyward's stream
//! scripts use, with Redis 7.0's semantics.
//!
//! **The one decision to know:** ids come from the keyspace's clock exactly as Redis makes them from its
//! own (`ms-0`, or `last.ms-(last.seq+1)` when the clock has not moved past the last id), so ids are
//! strictly increasing, and trimming and ages (`MINID`, idle times) read the same clock as expiry — a paused
//! tokio clock drives them in tests. The value keeps a running byte count, so measuring it after a critical
//! section costs nothing per entry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use bytes::Bytes;

/// Approximate bytes one entry, pending entry or consumer costs beyond its own data.
const ENTRY_OVERHEAD: usize = 48;

/// A stream entry id: milliseconds and a sequence number within them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StreamId {
    /// Unix ms of the clock that made the id.
    pub(crate) ms: u64,
    /// Sequence within `ms`.
    pub(crate) seq: u64,
}

impl StreamId {
    /// `0-0`, below every entry.
    pub(crate) const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
    /// Above every entry.
    pub(crate) const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// An id.
    pub(crate) fn new(ms: u64, seq: u64) -> Self {
        StreamId { ms, seq }
    }

    /// The smallest id above this one.
    pub(crate) fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }

    /// `ms-seq` or `ms` (sequence 0), as Redis parses an id argument.
    pub(crate) fn parse(text: &str) -> Option<StreamId> {
        match text.split_once('-') {
            Some((ms, seq)) => Some(StreamId {
                ms: ms.parse().ok()?,
                seq: seq.parse().ok()?,
            }),
            None => Some(StreamId {
                ms: text.parse().ok()?,
                seq: 0,
            }),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One entry's fields, in order.
pub(crate) type Fields = Vec<(Bytes, Bytes)>;

/// One pending entry: delivered to `consumer` and not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The consumer that holds it.
    pub(crate) consumer: String,
    /// When it was last delivered, Unix ms.
    pub(crate) delivered_ms: i64,
    /// How many times it was delivered.
    pub(crate) deliveries: u64,
}

/// A consumer of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Consumer {
    /// When it last read or claimed, Unix ms.
    pub(crate) seen_ms: i64,
}

/// A consumer group.
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    /// The last entry id handed out by `>` reads.
    pub(crate) last_delivered: StreamId,
    /// The pending entry list.
    pub(crate) pending: BTreeMap<StreamId, Pending>,
    /// The consumers, by name.
    pub(crate) consumers: HashMap<String, Consumer>,
}

/// What `XPENDING key group` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingSummary {
    /// Entries pending in the group.
    pub(crate) count: usize,
    /// The oldest and newest pending ids (none when nothing is pending).
    pub(crate) range: Option<(StreamId, StreamId)>,
    /// Pending entries per consumer, by name.
    pub(crate) per_consumer: BTreeMap<String, usize>,
}

/// One row of `XPENDING key group [IDLE ms] start end count [consumer]`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // mirrored Redis command not used by a script yet
pub(crate) struct PendingRow {
    pub(crate) id: StreamId,
    pub(crate) consumer: String,
    pub(crate) idle_ms: i64,
    pub(crate) deliveries: u64,
}

/// What `XAUTOCLAIM` answers: the cursor to continue from (`0-0` when the list was scanned to its end), the
/// claimed entries, and the ids that were pending but no longer in the stream (removed from the list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AutoClaim {
    pub(crate) next: StreamId,
    pub(crate) claimed: Vec<(StreamId, Fields)>,
    pub(crate) deleted: Vec<StreamId>,
}

/// A stream: entries in id order and its consumer groups.
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamVal {
    entries: BTreeMap<StreamId, Fields>,
    last_id: StreamId,
    groups: BTreeMap<String, Group>,
    /// Running approximate size in bytes (entries, pending entries, consumers, names).
    bytes: usize,
}

fn fields_bytes(fields: &Fields) -> usize {
    ENTRY_OVERHEAD + fields.iter().map(|(f, v)| f.len() + v.len()).sum::<usize>()
}

fn pending_bytes(consumer: &str) -> usize {
    ENTRY_OVERHEAD + consumer.len()
}

impl StreamVal {
    /// Approximate heap bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// `XLEN`.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The id of the last entry ever added (it survives trims and deletes, as in Redis).
    #[cfg_attr(not(test), allow(dead_code))] // mirrored Redis command not used by a script yet
    pub(crate) fn last_id(&self) -> StreamId {
        self.last_id
    }

    /// The oldest entry's id.
    #[cfg_attr(not(test), allow(dead_code))] // mirrored Redis command not used by a script yet
    pub(crate) fn first_id(&self) -> Option<StreamId> {
        self.entries.keys().next().copied()
    }

    /// The entry `id`.
    pub(crate) fn entry(&self, id: StreamId) -> Option<&Fields> {
        self.entries.get(&id)
    }

    /// `XRANGE key start end COUNT count` (both ends inclusive).
    pub(crate) fn range(
        &self,
        start: StreamId,
        end: StreamId,
        count: usize,
    ) -> Vec<(StreamId, Fields)> {
        if start > end {
            return Vec::new();
        }
        self.entries
            .range(start..=end)
            .take(count)
            .map(|(id, f)| (*id, f.clone()))
            .collect()
    }

    /// `XRANGE key - (bound COUNT count`: the ids of up to `count` oldest entries below `bound`.
    pub(crate) fn ids_below(&self, bound: StreamId, count: usize) -> Vec<StreamId> {
        self.entries
            .range(..bound)
            .take(count)
            .map(|(id, _)| *id)
            .collect()
    }

    /// `XADD key * field value …` at `now_ms`: the new entry's id, after the last one.
    pub(crate) fn add(&mut self, now_ms: i64, fields: Fields) -> StreamId {
        let ms = u64::try_from(now_ms).unwrap_or(0);
        let id = if ms > self.last_id.ms {
            StreamId::new(ms, 0)
        } else {
            self.last_id.next()
        };
        self.bytes += fields_bytes(&fields);
        self.entries.insert(id, fields);
        self.last_id = id;
        id
    }

    /// `XTRIM key MINID min` (exact): removes the entries below `min`; how many went.
    pub(crate) fn trim_minid(&mut self, min: StreamId) -> usize {
        let kept = self.entries.split_off(&min);
        let gone = std::mem::replace(&mut self.entries, kept);
        self.bytes -= gone.values().map(fields_bytes).sum::<usize>();
        gone.len()
    }

    /// `XTRIM key MAXLEN max` (exact): keeps the newest `max` entries; how many went.
    pub(crate) fn trim_maxlen(&mut self, max: usize) -> usize {
        let excess = self.entries.len().saturating_sub(max);
        if excess == 0 {
            return 0;
        }
        match self.entries.keys().nth(excess) {
            Some(&min) => self.trim_minid(min),
            None => {
                let gone = std::mem::take(&mut self.entries);
                self.bytes -= gone.values().map(fields_bytes).sum::<usize>();
                gone.len()
            }
        }
    }

    /// `XDEL key id …`: how many existed.
    pub(crate) fn delete(&mut self, ids: &[StreamId]) -> usize {
        let mut n = 0;
        for id in ids {
            if let Some(f) = self.entries.remove(id) {
                self.bytes -= fields_bytes(&f);
                n += 1;
            }
        }
        n
    }

    /// `XGROUP CREATE key group <start>`: `start` `None` is `$` (the last id). False if the group exists
    /// (`BUSYGROUP`), which leaves it as it is.
    pub(crate) fn create_group(&mut self, group: &str, start: Option<StreamId>) -> bool {
        if self.groups.contains_key(group) {
            return false;
        }
        self.bytes += ENTRY_OVERHEAD + group.len();
        self.groups.insert(
            group.to_owned(),
            Group {
                last_delivered: start.unwrap_or(self.last_id),
                ..Group::default()
            },
        );
        true
    }

    /// The group `name`.
    pub(crate) fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    /// The groups' names, in order.
    pub(crate) fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    fn touch(&mut self, group: &str, consumer: &str, now_ms: i64) -> Option<&mut Group> {
        let g = self.groups.get_mut(group)?;
        if !g.consumers.contains_key(consumer) {
            self.bytes += ENTRY_OVERHEAD + consumer.len();
        }
        g.consumers
            .insert(consumer.to_owned(), Consumer { seen_ms: now_ms });
        Some(g)
    }

    /// `XREADGROUP GROUP group consumer COUNT count STREAMS key >`: up to `count` entries after the group's
    /// last-delivered id, now pending with `consumer`. `None` if there is no such group (`NOGROUP`).
    pub(crate) fn read_new(
        &mut self,
        group: &str,
        consumer: &str,
        count: usize,
        now_ms: i64,
    ) -> Option<Vec<(StreamId, Fields)>> {
        let g = self.groups.get(group)?;
        let out: Vec<(StreamId, Fields)> = self
            .entries
            .range(g.last_delivered.next()..)
            .take(count)
            .map(|(id, f)| (*id, f.clone()))
            .collect();
        let mut added = 0;
        let g = self.touch(group, consumer, now_ms)?;
        for (id, _) in &out {
            let fresh = g
                .pending
                .insert(
                    *id,
                    Pending {
                        consumer: consumer.to_owned(),
                        delivered_ms: now_ms,
                        deliveries: 1,
                    },
                )
                .is_none();
            if fresh {
                added += pending_bytes(consumer);
            }
            g.last_delivered = *id;
        }
        self.bytes += added;
        Some(out)
    }

    /// `XREADGROUP GROUP group consumer COUNT count STREAMS key <after>` (reading its own history): up to
    /// `count` entries pending with `consumer` above `after`, each delivered once more (its time and count
    /// updated). An entry no longer in the stream comes back with `None` fields, as Redis's nil.
    #[cfg_attr(not(test), allow(dead_code))] // mirrored Redis command not used by a script yet
    pub(crate) fn read_own_pending(
        &mut self,
        group: &str,
        consumer: &str,
        after: StreamId,
        count: usize,
        now_ms: i64,
    ) -> Option<Vec<(StreamId, Option<Fields>)>> {
        let entries = &self.entries;
        let g = self.groups.get_mut(group)?;
        let mut out = Vec::new();
        for (id, p) in g.pending.range_mut(after.next()..) {
            if out.len() >= count {
                break;
            }
            if p.consumer != consumer {
                continue;
            }
            p.delivered_ms = now_ms;
            p.deliveries += 1;
            out.push((*id, entries.get(id).cloned()));
        }
        self.touch(group, consumer, now_ms);
        Some(out)
    }

    /// `XACK key group id …`: how many were pending.
    pub(crate) fn ack(&mut self, group: &str, ids: &[StreamId]) -> usize {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        let mut n = 0;
        let mut freed = 0;
        for id in ids {
            if let Some(p) = g.pending.remove(id) {
                freed += pending_bytes(&p.consumer);
                n += 1;
            }
        }
        self.bytes -= freed;
        n
    }

    /// `XPENDING key group` (the summary).
    pub(crate) fn pending_summary(&self, group: &str) -> Option<PendingSummary> {
        let g = self.groups.get(group)?;
        let mut per_consumer = BTreeMap::new();
        for p in g.pending.values() {
            *per_consumer.entry(p.consumer.clone()).or_insert(0) += 1;
        }
        Some(PendingSummary {
            count: g.pending.len(),
            range: g
                .pending
                .first_key_value()
                .zip(g.pending.last_key_value())
                .map(|((a, _), (b, _))| (*a, *b)),
            per_consumer,
        })
    }

    /// `XPENDING key group IDLE min_idle start end count [consumer]`.
    #[cfg_attr(not(test), allow(dead_code))] // mirrored Redis command not used by a script yet
    pub(crate) fn pending_range(
        &self,
        group: &str,
        ids: std::ops::RangeInclusive<StreamId>,
        count: usize,
        consumer: Option<&str>,
        min_idle_ms: i64,
        now_ms: i64,
    ) -> Option<Vec<PendingRow>> {
        let g = self.groups.get(group)?;
        if ids.start() > ids.end() {
            return Some(Vec::new());
        }
        Some(
            g.pending
                .range(ids)
                .filter(|(_, p)| consumer.is_none_or(|c| p.consumer == c))
                .filter(|(_, p)| now_ms - p.delivered_ms >= min_idle_ms)
                .take(count)
                .map(|(id, p)| PendingRow {
                    id: *id,
                    consumer: p.consumer.clone(),
                    idle_ms: now_ms - p.delivered_ms,
                    deliveries: p.deliveries,
                })
                .collect(),
        )
    }

    /// `XAUTOCLAIM key group consumer min_idle start COUNT count` (Redis 7.0): walks the pending list from
    /// `start`, looking at most `10 × count` entries. One no longer in the stream leaves the list and is
    /// reported as deleted **whatever its idle time** (Redis checks existence before idleness); one idle at
    /// least `min_idle_ms` moves to `consumer`, delivered once more. Deleted and claimed entries both count
    /// against `count`, as in Redis.
    pub(crate) fn autoclaim(
        &mut self,
        group: &str,
        consumer: &str,
        min_idle_ms: i64,
        start: StreamId,
        count: usize,
        now_ms: i64,
    ) -> Option<AutoClaim> {
        let entries = &self.entries;
        let g = self.groups.get_mut(group)?;
        let mut attempts = count.saturating_mul(10);
        let mut claimed = Vec::new();
        let mut deleted = Vec::new();
        let mut next = StreamId::ZERO;
        let mut moved_bytes: isize = 0;
        let mut budget = count;
        for (id, p) in g.pending.range_mut(start..) {
            if budget == 0 || attempts == 0 {
                next = *id;
                break;
            }
            attempts -= 1;
            match entries.get(id) {
                None => {
                    deleted.push(*id);
                    budget -= 1;
                }
                Some(_) if now_ms - p.delivered_ms < min_idle_ms => {}
                Some(fields) => {
                    budget -= 1;
                    moved_bytes += consumer.len() as isize - p.consumer.len() as isize;
                    p.consumer = consumer.to_owned();
                    p.delivered_ms = now_ms;
                    p.deliveries += 1;
                    claimed.push((*id, fields.clone()));
                }
            }
        }
        let mut freed = 0;
        for id in &deleted {
            if let Some(p) = g.pending.remove(id) {
                freed += pending_bytes(&p.consumer);
            }
        }
        self.bytes = self.bytes.saturating_add_signed(moved_bytes) - freed;
        self.touch(group, consumer, now_ms);
        Some(AutoClaim {
            next,
            claimed,
            deleted,
        })
    }

    /// The pending entry `id` of `group` (`XPENDING key group id id 1`).
    pub(crate) fn pending_entry(&self, group: &str, id: StreamId) -> Option<&Pending> {
        self.groups.get(group)?.pending.get(&id)
    }

    /// `XCLAIM key group consumer 0 id [JUSTID]`: the pending entry `id` moves to `consumer`, its idle time
    /// reset; without `justid` it counts one more delivery. Returns the delivery count after the claim, or
    /// `None` if `id` is not pending in the group. As in Redis 7.0, a pending entry no longer in the stream
    /// is removed from the pending list instead (and `None` returned).
    pub(crate) fn claim(
        &mut self,
        group: &str,
        consumer: &str,
        id: StreamId,
        justid: bool,
        now_ms: i64,
    ) -> Option<u64> {
        if !self.entries.contains_key(&id) {
            let p = self.groups.get_mut(group)?.pending.remove(&id)?;
            self.bytes -= pending_bytes(&p.consumer);
            return None;
        }
        let p = self.groups.get_mut(group)?.pending.get_mut(&id)?;
        let grown = consumer.len() as isize - p.consumer.len() as isize;
        p.consumer = consumer.to_owned();
        p.delivered_ms = now_ms;
        if !justid {
            p.deliveries += 1;
        }
        let deliveries = p.deliveries;
        self.bytes = self.bytes.saturating_add_signed(grown);
        self.touch(group, consumer, now_ms);
        Some(deliveries)
    }

    /// The consumers of `group` other than `except` that hold no pending entry and were last seen more than
    /// `idle_ms` ago (`XINFO CONSUMERS`' `pending` and `idle`).
    pub(crate) fn idle_consumers(
        &self,
        group: &str,
        except: &str,
        idle_ms: i64,
        now_ms: i64,
    ) -> Vec<String> {
        let Some(g) = self.groups.get(group) else {
            return Vec::new();
        };
        g.consumers
            .iter()
            .filter(|(name, c)| {
                name.as_str() != except
                    && now_ms - c.seen_ms > idle_ms
                    && !g.pending.values().any(|p| &p.consumer == *name)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `XGROUP DELCONSUMER key group consumer`: how many entries it had pending (now gone from the list).
    pub(crate) fn delete_consumer(&mut self, group: &str, consumer: &str) -> Option<usize> {
        let g = self.groups.get_mut(group)?;
        let Some(_) = g.consumers.remove(consumer) else {
            return Some(0);
        };
        let before = g.pending.len();
        g.pending.retain(|_, p| p.consumer != consumer);
        let n = before - g.pending.len();
        self.bytes -= ENTRY_OVERHEAD + consumer.len() + n * pending_bytes(consumer);
        Some(n)
    }

    /// The group's lag: entries in the stream after its last-delivered id (what `XINFO GROUPS` reports as
    /// `lag` when it can count it).
    pub(crate) fn lag(&self, group: &str) -> Option<usize> {
        let g = self.groups.get(group)?;
        Some(self.entries.range(g.last_delivered.next()..).count())
    }

    /// The oldest id `group` has not acknowledged: its oldest pending id, or else the id after its
    /// last-delivered one. Trimming below it drops nothing the group still needs.
    pub(crate) fn unacked_floor(&self, group: &str) -> Option<StreamId> {
        let g = self.groups.get(group)?;
        Some(
            g.pending
                .first_key_value()
                .map_or(g.last_delivered.next(), |(id, _)| *id),
        )
    }

    /// The lowest [`unacked_floor`](Self::unacked_floor) of every group; [`StreamId::MAX`] without groups.
    pub(crate) fn groups_floor(&self) -> StreamId {
        self.groups
            .keys()
            .filter_map(|g| self.unacked_floor(g))
            .min()
            .unwrap_or(StreamId::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: &'static str) -> Fields {
        vec![(Bytes::from_static(b"m"), Bytes::from_static(v.as_bytes()))]
    }

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId::new(ms, seq)
    }

    #[test]
    fn ids_follow_the_clock_and_never_go_back() {
        let mut s = StreamVal::default();
        assert_eq!(s.add(1000, f("a")), id(1000, 0));
        assert_eq!(s.add(1000, f("b")), id(1000, 1));
        assert_eq!(
            s.add(999, f("c")),
            id(1000, 2),
            "a clock behind the last id"
        );
        assert_eq!(s.add(1005, f("d")), id(1005, 0));
        assert_eq!(s.len(), 4);
        assert_eq!(s.last_id(), id(1005, 0));
        assert_eq!(StreamId::parse("1005-3"), Some(id(1005, 3)));
        assert_eq!(StreamId::parse("7"), Some(id(7, 0)));
        assert_eq!(StreamId::parse("x-1"), None);
        assert_eq!(id(3, u64::MAX).next(), id(4, 0));
        assert_eq!(id(1005, 0).to_string(), "1005-0");
    }

    #[test]
    fn trims_and_deletes_keep_the_size_honest() {
        let mut s = StreamVal::default();
        let empty = s.bytes();
        for ms in 1..=10 {
            s.add(ms, f("x"));
        }
        assert_eq!(s.trim_maxlen(7), 3);
        assert_eq!(s.first_id(), Some(id(4, 0)));
        assert_eq!(s.trim_minid(id(6, 0)), 2);
        assert_eq!(s.trim_minid(id(6, 0)), 0);
        assert_eq!(s.trim_maxlen(100), 0);
        assert_eq!(s.delete(&[id(6, 0), id(6, 0), id(1, 0)]), 1);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s.range(id(7, 0), StreamId::MAX, 2)
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>(),
            [id(7, 0), id(8, 0)]
        );
        assert_eq!(s.last_id(), id(10, 0), "trims keep the last id");
        s.trim_maxlen(0);
        assert_eq!(s.bytes(), empty);
    }

    #[test]
    fn groups_deliver_new_entries_once_and_track_pending() {
        let mut s = StreamVal::default();
        s.add(1, f("before"));
        assert!(s.create_group("g", None), "created at `$`");
        assert!(!s.create_group("g", Some(StreamId::ZERO)), "BUSYGROUP");
        assert_eq!(s.read_new("nope", "c", 10, 5), None, "NOGROUP");
        assert_eq!(s.read_new("g", "c1", 10, 5).unwrap(), []);
        let a = s.add(10, f("a"));
        let b = s.add(11, f("b"));
        let c = s.add(12, f("c"));
        assert_eq!(s.lag("g"), Some(3));
        let got = s.read_new("g", "c1", 2, 20).unwrap();
        assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [a, b]);
        let got = s.read_new("g", "c2", 10, 21).unwrap();
        assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [c]);
        assert_eq!(s.lag("g"), Some(0));
        assert_eq!(s.read_new("g", "c2", 10, 22).unwrap(), []);
        let sum = s.pending_summary("g").unwrap();
        assert_eq!(sum.count, 3);
        assert_eq!(sum.range, Some((a, c)));
        assert_eq!(sum.per_consumer.get("c1"), Some(&2));
        assert_eq!(s.unacked_floor("g"), Some(a));
        assert_eq!(s.ack("g", &[a, a, id(99, 0)]), 1);
        assert_eq!(s.unacked_floor("g"), Some(b));
        assert_eq!(s.groups_floor(), b);

        // Own history: delivered again, count and time updated.
        let again = s
            .read_own_pending("g", "c1", StreamId::ZERO, 10, 30)
            .unwrap();
        assert_eq!(again, vec![(b, Some(f("b")))]);
        let rows = s
            .pending_range("g", StreamId::ZERO..=StreamId::MAX, 10, None, 0, 40)
            .unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.id, r.consumer.as_str(), r.idle_ms, r.deliveries))
                .collect::<Vec<_>>(),
            [(b, "c1", 10, 2), (c, "c2", 19, 1)]
        );
        let idle = s
            .pending_range("g", StreamId::ZERO..=StreamId::MAX, 10, None, 15, 40)
            .unwrap();
        assert_eq!(idle.len(), 1);
        assert_eq!(
            s.pending_range("g", StreamId::ZERO..=StreamId::MAX, 10, Some("c1"), 0, 40)
                .unwrap()
                .len(),
            1
        );

        s.ack("g", &[b, c]);
        assert_eq!(
            s.unacked_floor("g"),
            Some(c.next()),
            "nothing pending: after last-delivered"
        );
        assert_eq!(s.pending_summary("g").unwrap().range, None);
    }

    #[test]
    fn autoclaim_takes_idle_entries_and_reports_deleted_ones() {
        let mut s = StreamVal::default();
        s.create_group("g", Some(StreamId::ZERO));
        let ids: Vec<_> = (1..=5).map(|ms| s.add(ms, f("x"))).collect();
        s.read_new("g", "dead", 5, 100).unwrap();
        s.delete(&[ids[1]]);
        // Not idle long enough yet: nothing is claimed, but the deleted entry leaves the list at once
        // (Redis 7.0 checks existence before idleness).
        let none = s
            .autoclaim("g", "live", 50, StreamId::ZERO, 10, 120)
            .unwrap();
        assert!(none.claimed.is_empty());
        assert_eq!(none.deleted, [ids[1]]);
        assert_eq!(none.next, StreamId::ZERO);
        s.delete(&[ids[3]]);
        // COUNT 2: claims two, and a cursor to go on from.
        let first = s
            .autoclaim("g", "live", 50, StreamId::ZERO, 2, 200)
            .unwrap();
        assert_eq!(
            first.claimed.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [ids[0], ids[2]]
        );
        assert!(first.deleted.is_empty());
        assert_eq!(first.next, ids[3]);
        // COUNT 1: a deleted entry uses up the count, as in Redis.
        let deleted = s.autoclaim("g", "live", 50, first.next, 1, 200).unwrap();
        assert!(deleted.claimed.is_empty());
        assert_eq!(deleted.deleted, [ids[3]]);
        assert_eq!(deleted.next, ids[4]);
        let rest = s.autoclaim("g", "live", 50, deleted.next, 10, 200).unwrap();
        assert_eq!(rest.claimed.len(), 1);
        assert_eq!(rest.next, StreamId::ZERO);
        let rows = s
            .pending_range("g", StreamId::ZERO..=StreamId::MAX, 10, None, 0, 200)
            .unwrap();
        assert_eq!(rows.len(), 3, "the deleted entries left the pending list");
        assert!(
            rows.iter()
                .all(|r| r.consumer == "live" && r.deliveries == 2 && r.idle_ms == 0)
        );
        assert_eq!(s.pending_entry("g", ids[0]).map(|p| p.deliveries), Some(2));
        assert_eq!(
            s.claim("g", "other", ids[0], true, 300),
            Some(2),
            "JUSTID: no delivery"
        );
        assert_eq!(s.claim("g", "live", ids[0], false, 300), Some(3));
        assert_eq!(
            s.claim("g", "live", ids[1], false, 300),
            None,
            "not pending"
        );
        let mut idle = s.idle_consumers("g", "live", 50, 400);
        idle.sort();
        assert_eq!(idle, ["dead", "other"], "they hold nothing now");
        assert!(
            s.idle_consumers("g", "live", 150, 400)
                .contains(&"dead".to_owned())
        );
        assert_eq!(s.idle_consumers("g", "live", 150, 400).len(), 1);
        assert_eq!(s.delete_consumer("g", "live"), Some(3));
        assert_eq!(s.delete_consumer("g", "nobody"), Some(0));
        assert_eq!(s.pending_summary("g").unwrap().count, 0);
    }

    #[test]
    fn size_accounting_returns_to_empty() {
        let mut s = StreamVal::default();
        let empty = s.bytes();
        s.create_group("g", Some(StreamId::ZERO));
        let a = s.add(1, f("a"));
        s.read_new("g", "c", 10, 1);
        s.autoclaim("g", "longer-name", 0, StreamId::ZERO, 10, 2);
        s.ack("g", &[a]);
        s.delete(&[a]);
        s.delete_consumer("g", "c");
        s.delete_consumer("g", "longer-name");
        assert_eq!(
            s.bytes(),
            empty + ENTRY_OVERHEAD + 1,
            "only the group remains"
        );
    }
}
