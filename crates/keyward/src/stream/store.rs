//! The stream operations' storage half: each is one Lua script on Redis (the `stream_*.lua` files next to
//! this one) or a few plain commands in one round trip, and one critical section of the embedded keyspace
//! mirroring it line for line, side by side.

use bytes::Bytes;

use super::EntryId;
use super::worker::{DeadLetter, GroupInfo};
use crate::Keyward;
use crate::backend::memory::stream::{StreamId, StreamVal};
use crate::backend::{Kv, Pipeline, Reply, scripts};
use crate::error::Result;
use crate::policy::Retention;

scripts! {
    len: "stream_len.lua";
    range: "stream_range.lua";
    group: "stream_group.lua";
    read: "stream_read.lua";
    claim: "stream_claim.lua";
    reclaim: "stream_reclaim.lua";
    dead: "stream_dead.lua";
    dead_read: "stream_dead_read.lua";
    replay: "stream_replay.lua";
    group_info: "stream_group_info.lua";
}

/// The field each entry stores its encoded message in.
pub(super) const FIELD: &[u8] = b"m";

/// The field a replayed dead letter carries (and keeps through further dead-lettering and replays): its
/// origin, the id the event was first published under (`stream_replay.lua`).
const ORIGIN: &[u8] = b"o";

/// One entry read for a consumer: its id, its encoded event, and its origin (for a replayed dead letter).
pub(super) type ReadEntry = (EntryId, Bytes, Option<EntryId>);

/// The keys of one stream class. They share the hash tag `{<class>}`, so one Cluster slot holds the stream,
/// its dead letters and any helper key, and one script can touch them all. Streams carry no TTL (their
/// retention bounds them); every helper key added here must get one.
#[derive(Debug, Clone)]
pub(crate) struct StreamKeys {
    /// `{env}:{app}:{class}:v{n}:{<class>}`: the stream.
    pub(crate) stream: String,
    /// `…:{<class>}:dead`: the dead-letter stream (its own retention).
    pub(crate) dead: String,
    /// `…:{<class>}:wake`: set (with a TTL) by a worker that found nothing to read; the next publish deletes
    /// it and sends one wake-up.
    pub(crate) wake: String,
}

impl StreamKeys {
    pub(crate) fn new(stream: String) -> Self {
        StreamKeys {
            dead: format!("{stream}:dead"),
            wake: format!("{stream}:wake"),
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

/// The retention arguments of `stream_retain.lua`: maxlen (0 = none), max_age ms (0 = none), `~`, hard cap.
fn retention_args(r: &Retention) -> (u64, u64, bool, u64) {
    (
        r.maxlen_value().unwrap_or(0),
        r.max_age_value()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        r.is_approximate(),
        r.hard_maxlen_value(),
    )
}

/// With approximate (`~`) retention, the count bound is looked at only once the stream holds at least this
/// many entries more than `maxlen` (`stream_retain.lua`'s ARGV[6]): below that, a publish skips the groups'
/// scan that finding the trim point needs. It is Redis's default `stream-node-max-entries`: `XADD … MAXLEN ~`
/// itself keeps up to a node's worth of entries past the bound, so `~` already promises no more than that
/// (a node holds at most 100 entries by default, fewer when `stream-node-max-bytes` fills first; the trim, once
/// due, still only removes whole nodes). So a `~` stream holds at most `maxlen + APPROX_SLACK` entries plus
/// the last publish call's messages, and at most `hard_maxlen` always.
pub(crate) const APPROX_SLACK: u64 = 100;

/// The streams of one [`Keyward`] whose publishes keep every entry while the stream has no consumer group
/// (`stream_retain.lua`'s ARGV\[7\]): those of write-behind handles ([`keep_unread`]). By stream key.
///
/// Why a registry and not a flag on the handle: every handle of a stream made from one `Keyward` shares
/// one publish batcher, and a batch is flushed with whichever handle's settings queued first; a flag that
/// belongs to the stream key holds for all of them, so a write-behind write is never published under a
/// plain handle's retention.
#[derive(Default)]
pub(crate) struct UnreadKept(std::sync::RwLock<std::collections::HashSet<String>>);

impl UnreadKept {
    fn contains(&self, stream: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(stream)
    }
}

/// From now on, publishes to `stream`'s key from its [`Keyward`] keep every entry while no consumer group
/// exists, instead of trimming them to the retention (only the hard cap still applies, and counts what it
/// cuts as dropped): a write-behind queue's entries are unpersisted writes until a drain's group has read
/// them, whether or not that group exists yet.
pub(crate) fn keep_unread<E, C>(stream: &super::Stream<E, C>) {
    let kept = stream.kw.shared::<UnreadKept>();
    let key = &stream.inner.keys.stream;
    if !kept.contains(key) {
        kept.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone());
    }
}

/// The mirror of `stream_retain.lua`'s trimming over one stream (exact once it trims: the embedded backend
/// has no internal nodes, so `~` trims exactly too; but as on Redis, a `~` count bound is looked at only
/// once the stream is [`APPROX_SLACK`] entries over it). With `keep_unread` (a write-behind queue) and no
/// group, only the hard cap trims, and every entry it cuts counts as dropped. Returns the entries dropped
/// by the hard cap that a group (or, with `keep_unread` and no group, a future drain) still needed.
pub(crate) fn apply_retention(
    s: &mut StreamVal,
    r: &Retention,
    now_ms: i64,
    keep_unread: bool,
) -> u64 {
    let (maxlen, max_age, approximate, hard) = retention_args(r);
    if keep_unread && s.group_names().next().is_none() {
        let len = s.len() as u64;
        if len <= hard {
            return 0;
        }
        let cut = s.ids_below(
            StreamId::MAX,
            usize::try_from(len - hard).unwrap_or(usize::MAX),
        );
        if let Some(last) = cut.last() {
            s.trim_minid(last.next());
        }
        return cut.len() as u64;
    }
    let age_floor: Option<StreamId> = (max_age > 0).then(|| {
        let now = u64::try_from(now_ms).unwrap_or(0);
        StreamId::new(now.saturating_sub(max_age), 0)
    });
    let len = s.len() as u64;
    let over = maxlen > 0 && len > maxlen && (!approximate || len - maxlen >= APPROX_SLACK);
    // The fast path, as `stream_retain.lua`: nothing can be trimmed, so the groups are not looked at.
    if !over && len <= hard {
        let aged = age_floor.is_some_and(|a| s.first_id().is_some_and(|first| first < a));
        if !aged {
            return 0;
        }
    }
    let g = (s.group_names().next().is_some()).then(|| s.groups_floor());
    let mut floor = age_floor;
    if over {
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
    // T = min(G, max(A, L)): the groups' floor only ever lowers a trim the retention asks for; with neither
    // an age nor a length over `maxlen`, nothing is trimmed (as `stream_retain.lua`).
    let mut t = floor;
    if let (Some(g), Some(f)) = (g, floor)
        && g < f
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
        // Needed by some group: not delivered to it yet, or pending in it (at or above G, an entry may be
        // acknowledged already).
        let needed = |id: StreamId| {
            s.group_names().any(|name| {
                s.group(name)
                    .is_some_and(|gr| gr.last_delivered < id || gr.pending.contains_key(&id))
            })
        };
        dropped = cut
            .iter()
            .filter(|id| g.is_some_and(|g| **id >= g) && needed(**id))
            .count() as u64;
        if let Some(last) = cut.last() {
            s.trim_minid(last.next());
        }
    }
    dropped
}

/// The channel on which an append wakes the stream's idle workers (sharded in the stream's slot on Cluster).
fn wake_channel(kw: &Keyward, keys: &StreamKeys) -> String {
    kw.inner
        .backend
        .wake_channel(&kw.inner.ns, &keys.stream)
        .into_owned()
}

/// `stream_retain.lua` without its comment lines: sent as `EVAL` with every publish (see [`publish`]), so
/// the server hashes these bytes on each call; the comments would be most of them.
static RETAIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("stream_retain.lua")
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with("--")
        })
        .collect::<Vec<_>>()
        .join("\n")
});

/// Append `payloads` (already encoded and size-checked) and apply `retention`: on Redis one pipeline (one
/// round trip) of a plain `XADD <stream> * m <payload>` per message, then `EVAL` of `stream_retain.lua`.
///
/// The decision a reader must know: the messages go as plain commands because a script that appends them
/// copies each payload into Lua and back out through `redis.call`, which cost the server about 2.5 µs per
/// 1 KiB message, more than the `XADD` itself; and the retention script goes as `EVAL` of its text, never
/// `EVALSHA`, because a `NOSCRIPT` would arrive after the `XADD`s ran, and retrying the pipeline would append
/// every message twice (Redis caches the compiled script by its hash: `EVAL` costs hashing its text, about
/// 2.6 KB without comments, not compiling it). Also:
/// - The ids are the `XADD` replies, in order; another client's entries may fall between them.
/// - Not atomic: if the connection drops mid-pipeline, the server may have run any prefix of it (some
///   `XADD`s, no retention). The caller gets an error and may have published, as after any call that got no
///   answer (at least once; see `Stream::publish`'s errors); the next publish applies the retention.
/// - Cluster: every key shares the `{<class>}` hash tag, so the pipeline goes to one slot on one node.
/// - The ACL rule of `docs/operations.md` grants `xadd` and `eval` already.
/// - The embedded backend appends and trims in one critical section, with the same results.
pub(super) async fn publish(
    kw: &Keyward,
    keys: &StreamKeys,
    retention: &Retention,
    payloads: &[Vec<u8>],
) -> Result<Published> {
    let (maxlen, max_age, approximate, hard) = retention_args(retention);
    let keep = kw.shared::<UnreadKept>().contains(&keys.stream);
    let channel = wake_channel(kw, keys);
    let mut pipe = Pipeline::new("stream_publish");
    for p in payloads {
        pipe = pipe
            .cmd_sized("XADD", 4, keys.stream.len() + 1 + FIELD.len() + p.len())
            .key(&keys.stream)
            .arg("*")
            .arg(FIELD)
            .arg(&p[..]);
    }
    let pipe = pipe
        .cmd("EVAL")
        .arg(RETAIN.as_str())
        .arg(2)
        .key(&keys.stream)
        .key(&keys.wake)
        .arg(maxlen)
        .arg(max_age)
        .arg(if approximate { "1" } else { "0" })
        .arg(hard)
        .arg(channel)
        .arg(APPROX_SLACK)
        .arg(if keep { "1" } else { "0" });
    kw.inner
        .backend
        .commands(
            pipe,
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
                let dropped = apply_retention(s, retention, now_ms, keep);
                kv.del(&keys.wake);
                Published { ids, dropped }
            },
            |replies: &[Reply]| {
                let (dropped, ids) = replies.split_last()?;
                let ids = ids.iter().map(parse_id).collect::<Option<Vec<_>>>()?;
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

/// The field `m` of an entry's fields.
fn payload_of(fields: &[(Bytes, Bytes)]) -> Bytes {
    fields
        .iter()
        .find(|(f, _)| &f[..] == FIELD)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The field `o` of an entry's fields, raw.
fn origin_field(fields: &[(Bytes, Bytes)]) -> Option<Bytes> {
    fields
        .iter()
        .find(|(f, _)| &f[..] == ORIGIN)
        .map(|(_, v)| v.clone())
}

/// The origin of an entry (its field `o`, parsed).
fn origin_of(fields: &[(Bytes, Bytes)]) -> Option<EntryId> {
    origin_field(fields).and_then(|o| parse_id(&Reply::Bytes(o)))
}

/// An origin reply: nil is `None`; bytes that are no id are `None` too (an entry written by hand).
fn parse_origin(r: &Reply) -> Option<EntryId> {
    if r.is_nil() { None } else { parse_id(r) }
}

fn sid(id: EntryId) -> StreamId {
    StreamId::new(id.ms, id.seq)
}

fn parse_id(r: &Reply) -> Option<EntryId> {
    // Borrowed, not `Reply::bytes` (a clone, which allocates for a reply's bytes): one id per entry read.
    let Reply::Bytes(b) = r else { return None };
    Some(to_entry(StreamId::parse(std::str::from_utf8(b).ok()?)?))
}

/// A payload reply: nil (no entry, or no field `m`) is `None`.
fn parse_payload(r: &Reply) -> Option<Option<Bytes>> {
    if r.is_nil() {
        return Some(None);
    }
    Some(Some(r.bytes()?))
}

/// `stream_group.lua`: whether the group was created (false: it existed). `from_oldest`: a new group starts
/// at the oldest entry kept (`0`), else at new entries only (`$`).
pub(super) async fn create_group(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    from_oldest: bool,
) -> Result<bool> {
    let call = SCRIPTS
        .group
        .call("stream_group")
        .key(&keys.stream)
        .arg(group)
        .arg(if from_oldest { "0" } else { "$" });
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let start = from_oldest.then_some(StreamId::ZERO);
                kv.stream_or_create(&keys.stream).create_group(group, start)
            },
            |reply| Some(reply.int()? == 1),
        )
        .await
}

/// The busy path of [`read`]: one plain `XREADGROUP` for up to `count` new entries, without the wake-up
/// marker (a script would copy every payload into Lua and back, which cost the server about 2 µs per 1 KiB
/// entry, four times the read itself). `None` when there is no new entry; an error when there is no group
/// (or for any other reason): in both cases the caller reads again with [`read`], which leaves the marker
/// and tells a missing group apart.
pub(super) async fn read_plain(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    count: usize,
) -> Result<Option<Vec<ReadEntry>>> {
    let pipe = Pipeline::new("stream_read")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .key(&keys.stream)
        .arg(">");
    kw.inner
        .backend
        .commands(
            pipe,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let got = kv
                    .stream_mut(&keys.stream)
                    .and_then(|s| s.read_new(group, consumer, count, now_ms));
                got.filter(|g| !g.is_empty()).map(|g| {
                    g.into_iter()
                        .map(|(id, fields)| (to_entry(id), payload_of(&fields), origin_of(&fields)))
                        .collect()
                })
            },
            |replies| {
                let [reply] = replies else { return None };
                if reply.is_nil() {
                    return Some(None);
                }
                // RESP2: [[stream, entries]]; RESP3 (a map, flattened): [stream, entries].
                let streams = reply.array()?;
                let entries = match streams {
                    [one] => one.array()?.get(1)?,
                    [_, entries] => entries,
                    _ => return None,
                };
                let out = entries
                    .array()?
                    .iter()
                    .map(|e| {
                        let [id, fields] = e.array()? else {
                            return None;
                        };
                        let (mut payload, mut origin) = (Bytes::new(), None);
                        for pair in fields.array().unwrap_or_default().chunks(2) {
                            let [name, value] = pair else { continue };
                            let Reply::Bytes(name) = name else { continue };
                            if name[..] == *FIELD {
                                payload = value.bytes().unwrap_or_default();
                            } else if name[..] == *ORIGIN {
                                origin = parse_id(value);
                            }
                        }
                        Some((parse_id(id)?, payload, origin))
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some((!out.is_empty()).then_some(out))
            },
        )
        .await
}

/// `stream_read.lua`: up to `count` new entries for `consumer` (`None`: the group does not exist); when
/// there are none, the wake-up marker is left for `marker_ttl_ms`.
pub(super) async fn read(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    count: usize,
    marker_ttl_ms: u64,
) -> Result<Option<Vec<ReadEntry>>> {
    let call = SCRIPTS
        .read
        .call("stream_read")
        .key(&keys.stream)
        .key(&keys.wake)
        .arg(group)
        .arg(consumer)
        .arg(count)
        .arg(marker_ttl_ms);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let got = kv
                    .stream_mut(&keys.stream)
                    .and_then(|s| s.read_new(group, consumer, count, now_ms))?;
                let out: Vec<_> = got
                    .into_iter()
                    .map(|(id, fields)| (to_entry(id), payload_of(&fields), origin_of(&fields)))
                    .collect();
                if out.is_empty() {
                    kv.set(
                        &keys.wake,
                        crate::backend::Val::Str(Bytes::from_static(b"1")),
                        i64::try_from(marker_ttl_ms).unwrap_or(i64::MAX),
                    );
                }
                Some(out)
            },
            |reply| {
                let items = reply.array()?;
                let (status, rest) = items.split_first()?;
                if status.int()? == -1 {
                    return Some(None);
                }
                let out = rest
                    .chunks(3)
                    .map(|c| {
                        let [id, payload, origin] = c else {
                            return None;
                        };
                        Some((
                            parse_id(id)?,
                            parse_payload(payload)?.unwrap_or_default(),
                            parse_origin(origin),
                        ))
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Some(out))
            },
        )
        .await
}

/// `XACK` of `ids` (at most 1,024) in one plain command (a script would cost the server ten times more and
/// add nothing: it is one command); how many were pending in the group.
pub(super) async fn ack(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    ids: &[EntryId],
) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut pipe = Pipeline::new("stream_ack")
        .cmd("XACK")
        .key(&keys.stream)
        .arg(group);
    for id in ids {
        pipe = pipe.arg(id.to_string());
    }
    kw.inner
        .backend
        .commands(
            pipe,
            |kv: &mut Kv| {
                kv.stream_mut(&keys.stream).map_or(0, |s| {
                    let ids: Vec<StreamId> = ids.iter().map(|id| sid(*id)).collect();
                    s.ack(group, &ids) as u64
                })
            },
            |replies| match replies {
                [n] => u64::try_from(n.int()?).ok(),
                _ => None,
            },
        )
        .await
}

/// An entry taken for one more delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claimed {
    pub(super) id: EntryId,
    /// Deliveries counted so far, this one included.
    pub(super) deliveries: u64,
    /// `None` when the entry is no longer in the stream (trimmed past the hard cap).
    pub(super) payload: Option<Bytes>,
    /// For a replayed dead letter, the id its event was first published under.
    pub(super) origin: Option<EntryId>,
}

/// `stream_claim.lua` for one entry this consumer still holds: its next delivery (a retry), or `None` if
/// another consumer took it over or it is no longer pending.
pub(super) async fn redeliver(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    id: EntryId,
) -> Result<Option<Claimed>> {
    let call = SCRIPTS
        .claim
        .call("stream_claim")
        .key(&keys.stream)
        .arg(group)
        .arg(consumer)
        .arg("0")
        .arg(id.to_string());
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let s = kv.stream_mut(&keys.stream)?;
                let p = s.pending_entry(group, sid(id))?;
                if p.consumer != consumer {
                    return None;
                }
                let before = p.deliveries;
                // No longer in the stream: the claim removes it from the pending list (as Redis 7.0's
                // XCLAIM does) and the script reports it with no payload.
                let deliveries = s
                    .claim(group, consumer, sid(id), false, now_ms)
                    .unwrap_or(before + 1);
                let payload = s.entry(sid(id)).map(|f| payload_of(f));
                let origin = s.entry(sid(id)).and_then(|f| origin_of(f));
                Some(Claimed {
                    id,
                    deliveries,
                    payload,
                    origin,
                })
            },
            |reply| match reply.array()? {
                [] => Some(None),
                [rid, deliveries, payload, origin] => Some(Some(Claimed {
                    id: parse_id(rid)?,
                    deliveries: u64::try_from(deliveries.int()?).ok()?,
                    payload: parse_payload(payload)?,
                    origin: parse_origin(origin),
                })),
                _ => None,
            },
        )
        .await
}

/// `stream_claim.lua` with JUSTID: reset the idle time of the entries this consumer still holds (so no
/// live worker reclaims them), without counting a delivery. Returns the ids still held.
pub(super) async fn touch(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    ids: &[EntryId],
) -> Result<Vec<EntryId>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut call = SCRIPTS
        .claim
        .call("stream_touch")
        .key(&keys.stream)
        .arg(group)
        .arg(consumer)
        .arg("1");
    for id in ids {
        call = call.arg(id.to_string());
    }
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let Some(s) = kv.stream_mut(&keys.stream) else {
                    return Vec::new();
                };
                // As the script: every id still this consumer's is listed, also one no longer in the stream
                // (which the claim removes from the pending list, as Redis 7.0's XCLAIM does).
                ids.iter()
                    .copied()
                    .filter(|id| {
                        let mine = s
                            .pending_entry(group, sid(*id))
                            .is_some_and(|p| p.consumer == consumer);
                        if mine {
                            s.claim(group, consumer, sid(*id), true, now_ms);
                        }
                        mine
                    })
                    .collect()
            },
            |reply| reply.array()?.iter().map(parse_id).collect(),
        )
        .await
}

/// What one reclaim pass found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reclaimed {
    /// Where the next pass goes on (`None`: the pending list was walked to its end).
    pub(super) cursor: Option<EntryId>,
    /// Pending entries no longer in the stream, removed from the pending list.
    pub(super) deleted: u64,
    /// Entries taken over, with their deliveries so far (this one included).
    pub(super) claimed: Vec<Claimed>,
}

/// `stream_reclaim.lua` (`None`: the group does not exist).
#[allow(clippy::too_many_arguments)]
pub(super) async fn reclaim(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    claim_idle_ms: u64,
    cursor: Option<EntryId>,
    count: usize,
    consumer_idle_ms: u64,
) -> Result<Option<Reclaimed>> {
    let call = SCRIPTS
        .reclaim
        .call("stream_reclaim")
        .key(&keys.stream)
        .arg(group)
        .arg(consumer)
        .arg(claim_idle_ms)
        .arg(cursor.map_or_else(|| "0-0".to_owned(), |c| c.to_string()))
        .arg(count)
        .arg(consumer_idle_ms);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let s = kv.stream_mut(&keys.stream)?;
                let start = cursor.map_or(StreamId::ZERO, sid);
                let idle = i64::try_from(claim_idle_ms).unwrap_or(i64::MAX);
                let got = s.autoclaim(group, consumer, idle, start, count, now_ms)?;
                let claimed = got
                    .claimed
                    .iter()
                    .map(|(id, fields)| Claimed {
                        id: to_entry(*id),
                        deliveries: s.pending_entry(group, *id).map_or(0, |p| p.deliveries),
                        payload: Some(payload_of(fields)),
                        origin: origin_of(fields),
                    })
                    .collect();
                let bound = i64::try_from(consumer_idle_ms).unwrap_or(i64::MAX);
                for name in s.idle_consumers(group, consumer, bound, now_ms) {
                    s.delete_consumer(group, &name);
                }
                Some(Reclaimed {
                    cursor: (got.next != StreamId::ZERO).then(|| to_entry(got.next)),
                    deleted: got.deleted.len() as u64,
                    claimed,
                })
            },
            |reply| {
                let items = reply.array()?;
                if let [status] = items
                    && status.int() == Some(-1)
                {
                    return Some(None);
                }
                let [next, deleted, rest @ ..] = items else {
                    return None;
                };
                let next = parse_id(next)?;
                let claimed = rest
                    .chunks(4)
                    .map(|c| {
                        let [id, deliveries, payload, origin] = c else {
                            return None;
                        };
                        Some(Claimed {
                            id: parse_id(id)?,
                            deliveries: u64::try_from(deliveries.int()?).ok()?,
                            payload: parse_payload(payload)?,
                            origin: parse_origin(origin),
                        })
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Some(Reclaimed {
                    cursor: (next != EntryId::new(0, 0)).then_some(next),
                    deleted: u64::try_from(deleted.int()?).ok()?,
                    claimed,
                }))
            },
        )
        .await
}

/// `stream_dead.lua`: move the entry `id` (held by `consumer`) to the dead letters with its last `error`,
/// acknowledge it, and delete it from the stream if no other group needs it; with `dead` `None` (dead
/// letters off) only acknowledge it. False if `consumer` no longer holds it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn dead_letter(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
    consumer: &str,
    id: EntryId,
    error: &str,
    deliveries: u64,
    dead: Option<&Retention>,
) -> Result<bool> {
    let (maxlen, max_age, _, hard) = dead.map_or((0, 0, false, 0), retention_args);
    let call = SCRIPTS
        .dead
        .call("stream_dead")
        .key(&keys.stream)
        .key(&keys.dead)
        .arg(group)
        .arg(consumer)
        .arg(id.to_string())
        .arg(error)
        .arg(deliveries)
        .arg(if dead.is_some() { "1" } else { "0" })
        .arg(maxlen)
        .arg(max_age)
        .arg(hard);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let Some(s) = kv.stream_mut(&keys.stream) else {
                    return false;
                };
                if s.pending_entry(group, sid(id))
                    .is_none_or(|p| p.consumer != consumer)
                {
                    return false;
                }
                let payload = s.entry(sid(id)).map(|f| payload_of(f)).unwrap_or_default();
                let origin = s.entry(sid(id)).and_then(|f| origin_field(f));
                s.ack(group, &[sid(id)]);
                let needed = s.group_names().filter(|g| *g != group).any(|g| {
                    s.group(g).is_some_and(|other| {
                        other.last_delivered < sid(id) || other.pending.contains_key(&sid(id))
                    })
                });
                if !needed {
                    s.delete(&[sid(id)]);
                }
                if dead.is_some() {
                    let d = kv.stream_or_create(&keys.dead);
                    let mut fields = vec![
                        (Bytes::from_static(FIELD), payload),
                        (Bytes::from_static(b"id"), Bytes::from(id.to_string())),
                        (
                            Bytes::from_static(b"group"),
                            Bytes::copy_from_slice(group.as_bytes()),
                        ),
                        (
                            Bytes::from_static(b"error"),
                            Bytes::copy_from_slice(error.as_bytes()),
                        ),
                        (
                            Bytes::from_static(b"deliveries"),
                            Bytes::from(deliveries.to_string()),
                        ),
                    ];
                    if let Some(o) = origin {
                        fields.push((Bytes::from_static(ORIGIN), o));
                    }
                    d.add(now_ms, fields);
                    if max_age > 0 {
                        let now = u64::try_from(now_ms).unwrap_or(0);
                        if now > max_age {
                            d.trim_minid(StreamId::new(now - max_age, 0));
                        }
                    }
                    let cap = if maxlen == 0 { hard } else { maxlen };
                    d.trim_maxlen(usize::try_from(cap).unwrap_or(usize::MAX));
                }
                true
            },
            |reply| Some(reply.int()? == 1),
        )
        .await
}

/// `stream_dead_read.lua`: the oldest `count` dead letters.
pub(super) async fn dead_letters(
    kw: &Keyward,
    keys: &StreamKeys,
    count: usize,
) -> Result<Vec<DeadLetter>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let call = SCRIPTS
        .dead_read
        .call("stream_dead_read")
        .key(&keys.dead)
        .arg(count);
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let Some(d) = kv.stream(&keys.dead) else {
                    return Vec::new();
                };
                d.range(StreamId::ZERO, StreamId::MAX, count)
                    .into_iter()
                    .map(|(dead_id, fields)| {
                        let field = |name: &[u8]| {
                            fields
                                .iter()
                                .find(|(f, _)| &f[..] == name)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let text = |name: &[u8]| String::from_utf8_lossy(&field(name)).into_owned();
                        DeadLetter {
                            dead_id: to_entry(dead_id),
                            id: text(b"id").parse().unwrap_or(EntryId::new(0, 0)),
                            group: text(b"group"),
                            error: text(b"error"),
                            deliveries: text(b"deliveries").parse().unwrap_or(0),
                            payload: field(FIELD),
                            origin: origin_of(&fields),
                        }
                    })
                    .collect()
            },
            |reply| {
                reply
                    .array()?
                    .chunks(7)
                    .map(|c| {
                        let [dead_id, payload, id, group, error, deliveries, origin] = c else {
                            return None;
                        };
                        let text = |r: &Reply| {
                            parse_payload(r).map(|b| {
                                String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
                            })
                        };
                        Some(DeadLetter {
                            dead_id: parse_id(dead_id)?,
                            payload: parse_payload(payload)?.unwrap_or_default(),
                            id: text(id)?.parse().unwrap_or(EntryId::new(0, 0)),
                            group: text(group)?,
                            error: text(error)?,
                            deliveries: text(deliveries)?.parse().unwrap_or(0),
                            origin: parse_origin(origin),
                        })
                    })
                    .collect()
            },
        )
        .await
}

/// `stream_replay.lua`: move the dead letters `dead_ids` back into the stream; the (dead id, new id) of each
/// one moved (those already gone are left out).
pub(super) async fn replay(
    kw: &Keyward,
    keys: &StreamKeys,
    dead_ids: &[EntryId],
) -> Result<Vec<(EntryId, EntryId)>> {
    if dead_ids.is_empty() {
        return Ok(Vec::new());
    }
    let channel = wake_channel(kw, keys);
    let mut call = SCRIPTS
        .replay
        .call("stream_replay")
        .key(&keys.stream)
        .key(&keys.dead)
        .key(&keys.wake)
        .arg(channel);
    for id in dead_ids {
        call = call.arg(id.to_string());
    }
    let moved = kw
        .inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let mut payloads = Vec::new();
                if let Some(d) = kv.stream_mut(&keys.dead) {
                    for id in dead_ids {
                        if let Some(fields) = d.entry(sid(*id)) {
                            // The origin: the dead letter's own (replayed before), else its entry id.
                            let origin = origin_field(fields).or_else(|| {
                                fields
                                    .iter()
                                    .find(|(f, _)| &f[..] == b"id")
                                    .map(|(_, v)| v.clone())
                            });
                            let mut entry = vec![(Bytes::from_static(FIELD), payload_of(fields))];
                            if let Some(o) = origin {
                                entry.push((Bytes::from_static(ORIGIN), o));
                            }
                            payloads.push((*id, entry));
                            d.delete(&[sid(*id)]);
                        }
                    }
                }
                if payloads.is_empty() {
                    return Vec::new();
                }
                let s = kv.stream_or_create(&keys.stream);
                let moved = payloads
                    .into_iter()
                    .map(|(dead, entry)| (dead, to_entry(s.add(now_ms, entry))))
                    .collect();
                kv.del(&keys.wake);
                moved
            },
            |reply| {
                reply
                    .array()?
                    .chunks(2)
                    .map(|c| {
                        let [dead, new] = c else { return None };
                        Some((parse_id(dead)?, parse_id(new)?))
                    })
                    .collect()
            },
        )
        .await?;
    kw.inner.bus.wake(&keys.stream);
    Ok(moved)
}

/// `stream_group_info.lua` (`None`: no such group).
pub(super) async fn group_info(
    kw: &Keyward,
    keys: &StreamKeys,
    group: &str,
) -> Result<Option<GroupInfo>> {
    let call = SCRIPTS
        .group_info
        .call("stream_group_info")
        .key(&keys.stream)
        .arg(group);
    let age = |oldest: Option<EntryId>, now_ms: i64| {
        oldest.map(|o| {
            std::time::Duration::from_millis(
                u64::try_from(now_ms).unwrap_or(0).saturating_sub(o.ms),
            )
        })
    };
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let now_ms = kv.now_ms();
                let s = kv.stream(&keys.stream)?;
                let summary = s.pending_summary(group)?;
                let oldest = summary.range.map(|(a, _)| to_entry(a));
                Some(GroupInfo {
                    consumers: s.group(group).map_or(0, |g| g.consumers.len() as u64),
                    pending: summary.count as u64,
                    lag: s.lag(group).map(|l| l as u64),
                    oldest_pending: oldest,
                    oldest_pending_age: age(oldest, now_ms),
                })
            },
            |reply| match reply.array()? {
                [] => Some(None),
                [consumers, pending, lag, oldest, now] => {
                    let oldest = if oldest.is_nil() {
                        None
                    } else {
                        Some(parse_id(oldest)?)
                    };
                    Some(Some(GroupInfo {
                        consumers: u64::try_from(consumers.int()?).ok()?,
                        pending: u64::try_from(pending.int()?).ok()?,
                        lag: u64::try_from(lag.int()?).ok(),
                        oldest_pending: oldest,
                        oldest_pending_age: age(oldest, now.int()?),
                    }))
                }
                _ => None,
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
        assert_eq!(apply_retention(&mut s, &r, 10, false), 0);
        assert_eq!(ids(&s), [7, 8, 9, 10]);
    }

    #[test]
    fn acknowledged_entries_stay_while_the_retention_asks_for_no_trim() {
        // Was a bug: the groups' floor alone trimmed every entry all groups had acknowledged, although
        // `stream_retain.lua` trims only min(G, max(A, L)) and neither A nor L asked for anything.
        let mut s = filled(5);
        s.create_group("g", Some(StreamId::ZERO));
        s.read_new("g", "c", 5, 5);
        let all: Vec<StreamId> = (1..=5).map(|ms| StreamId::new(ms, 0)).collect();
        s.ack("g", &all);
        let r = Retention::maxlen(10).approximate(false);
        assert_eq!(apply_retention(&mut s, &r, 6, false), 0);
        assert_eq!(ids(&s), [1, 2, 3, 4, 5], "under maxlen: nothing trimmed");
    }

    #[test]
    fn max_age_trims_by_id_time() {
        let mut s = filled(10);
        let r = Retention::max_age(std::time::Duration::from_millis(3000));
        // now = 3006 ms: entries at 1..=5 ms are older than 3 s.
        apply_retention(&mut s, &r, 3006, false);
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
        let r = Retention::maxlen(2).approximate(false).hard_maxlen(6);
        // Retention wants 9..=10; the group needs 2 and everything after: 1 goes, then the hard cap
        // keeps the newest 6 and drops 2..=4, which the group had not acknowledged.
        assert_eq!(apply_retention(&mut s, &r, 10, false), 3);
        assert_eq!(ids(&s), [5, 6, 7, 8, 9, 10]);

        // Once the group catches up, retention applies again.
        s.read_new("g", "c", 100, 11);
        let all: Vec<StreamId> = (1..=10).map(|ms| StreamId::new(ms, 0)).collect();
        s.ack("g", &all);
        assert_eq!(apply_retention(&mut s, &r, 11, false), 0);
        assert_eq!(ids(&s), [9, 10]);
    }

    #[test]
    fn approximate_maxlen_waits_for_a_node_of_slack_then_trims() {
        let r = Retention::maxlen(10).hard_maxlen(10_000); // `~`
        let mut s = filled(10 + APPROX_SLACK - 1);
        assert_eq!(apply_retention(&mut s, &r, 1000, false), 0);
        assert_eq!(
            s.len() as u64,
            10 + APPROX_SLACK - 1,
            "within `~`'s slack: untouched"
        );
        s.add(1000, vec![]);
        apply_retention(&mut s, &r, 1000, false);
        assert_eq!(s.len(), 10, "a node's worth over: trimmed to the bound");
        // Exact retention has no slack.
        let mut s = filled(11);
        apply_retention(&mut s, &r.approximate(false), 1000, false);
        assert_eq!(ids(&s), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn the_slack_never_lets_the_hard_cap_or_a_group_floor_slip() {
        // Within `~`'s slack but past the hard cap: the hard cap still holds.
        let mut s = filled(30);
        s.create_group("g", Some(StreamId::new(25, 0))); // needs 26..
        let r = Retention::maxlen(10).hard_maxlen(20);
        assert_eq!(
            apply_retention(&mut s, &r, 30, false),
            0,
            "1..=10 were delivered and acknowledged"
        );
        assert_eq!(ids(&s), (11..=30).collect::<Vec<_>>());
        // Past the slack with a lagging group: its floor holds.
        let mut s = filled(10 + APPROX_SLACK + 5);
        s.create_group("g", Some(StreamId::new(3, 0))); // needs 4..
        let r = Retention::maxlen(10).hard_maxlen(1000);
        assert_eq!(apply_retention(&mut s, &r, 1000, false), 0);
        assert_eq!(s.first_id(), Some(StreamId::new(4, 0)));
    }

    #[test]
    fn an_aged_entry_is_trimmed_even_within_the_slack() {
        let mut s = filled(10);
        let r = Retention::maxlen(5).and_max_age(std::time::Duration::from_millis(5));
        // now = 12: entries below 7 ms are past max_age; 10 entries are within maxlen's slack.
        apply_retention(&mut s, &r, 12, false);
        assert_eq!(ids(&s), [7, 8, 9, 10]);
        // Nothing aged and within the slack: untouched.
        let mut s = filled(10);
        apply_retention(&mut s, &r, 6, false);
        assert_eq!(s.len(), 10);
    }

    #[test]
    fn a_write_behind_queue_without_a_group_is_trimmed_only_by_the_hard_cap() {
        let r = Retention::maxlen(2)
            .approximate(false)
            .and_max_age(std::time::Duration::from_millis(1))
            .hard_maxlen(6);
        let mut s = filled(5);
        assert_eq!(apply_retention(&mut s, &r, 100, true), 0);
        assert_eq!(ids(&s), [1, 2, 3, 4, 5], "past maxlen and max_age: kept");
        let mut s = filled(9);
        assert_eq!(
            apply_retention(&mut s, &r, 100, true),
            3,
            "every entry the hard cap cuts was unread"
        );
        assert_eq!(ids(&s), [4, 5, 6, 7, 8, 9]);
        // Once a group exists, its floor rules as for any stream.
        s.create_group("g", Some(StreamId::new(7, 0))); // needs 8..
        assert_eq!(apply_retention(&mut s, &r, 100, true), 0);
        assert_eq!(ids(&s), [8, 9]);
    }

    #[test]
    fn the_group_floor_wins_over_age_and_length() {
        let mut s = filled(10);
        s.create_group("g", Some(StreamId::new(5, 0))); // needs 6..
        s.create_group("h", Some(StreamId::new(8, 0))); // needs 9..
        let r = Retention::maxlen(1).and_max_age(std::time::Duration::from_millis(1));
        assert_eq!(apply_retention(&mut s, &r, 100, false), 0);
        assert_eq!(ids(&s), [6, 7, 8, 9, 10], "g's floor holds");
    }
}
