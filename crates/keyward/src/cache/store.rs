//! The cache's storage half: each operation as a Lua script for Redis (the `.lua` files next to this one) and
//! its line-for-line mirror over the embedded keyspace, side by side.
//!
//! One string per entry holds a value (`V1:{ns_epoch}:{class_epoch}:v:…`, or `V2:…` with the epochs of its
//! tags, see `envelope.rs`) or a fill lease (`L1:{token}:{w}`). The scripts that read group and tag epochs
//! share `epochs.lua`, prepended to them: epochs never repeat, a corrupt one is re-bumped in place, and each
//! bump prunes tag fields old enough that no entry can still carry an older epoch (argued in `bump.lua`). The
//! top of the epoch range has its own rule, the same here, in the scripts and in the Cluster view ("Exhaustion"
//! in `epochs.lua`): a class or tag field that cannot go higher is re-based (deleted, and `*` bumped instead),
//! never recorded at the top, and an entry filled while `*` was at the top is never current. The
//! fetch fast path is two plain commands in one pipeline; its safety is argued on [`fetch`].
//!
//! Tags: a call names the tags it fills with ([`Entry::tags`]); an entry is judged by the tags it *carries*.
//! On a single server the scripts read both from the epochs hash. On Redis Cluster the epochs come from the
//! handle's view, passed in `ARGV`: the caller's tags, plus — when a script answers that the entry carries
//! others (`{3, tag…}`) — those too, and the call is asked again (a value found by the fast path is judged
//! against the view directly).

use std::time::Duration;

use bytes::Bytes;

use crate::Keyward;
use crate::backend::wake::WakeBus;
use crate::backend::{
    Backend, Call, Kv, Namespace, Pipeline, Reply, Undo, Val, ViewEpochs, scripts,
};
use crate::envelope::{self, Gens, LEASE_PREFIX, Stamp, TOP_EPOCH, TagEpochs, Verdict, judge};
use crate::error::{Error, Result};

/// The batch fetch (`Cache::get_or_set_many`), in its own file.
pub(super) mod many;

scripts! {
    fetch: "epochs.lua", "fetch.lua";
    read: "epochs.lua", "read.lua";
    commit: "commit.lua";
    release: "release.lua";
    set: "epochs.lua", "set.lua";
    wb_set: "epochs.lua", "wb_set.lua", "set.lua";
    invalidate: "invalidate.lua";
    bump: "epochs.lua", "bump.lua";
    heal: "heal.lua";
}

/// The arguments every entry operation shares.
pub(crate) struct Entry<'a> {
    pub(crate) ns: &'a Namespace,
    pub(crate) class: &'a str,
    pub(crate) key: &'a str,
    /// Where fills and releases of this entry are announced (`Backend::wake_channel`).
    pub(crate) wake: std::borrow::Cow<'a, str>,
    /// The tags a fill or set of this call records (validated, no duplicates; see `cache::tags`). Reads
    /// judge an entry by the tags it carries, whatever these are.
    pub(crate) tags: &'a [String],
    /// The class's `stale_grace` and `refresh_ahead` in ms (0: off): a value whose remaining TTL is at most
    /// `grace_ms` is stale, at most `grace_ms + ahead_ms` due for an eager refresh.
    pub(crate) grace_ms: u64,
    pub(crate) ahead_ms: u64,
    /// Whether a hit should say how long the value stays fresh (the class has an in-process tier, whose
    /// copy must not outlive it).
    pub(crate) want_fresh_for: bool,
}

impl<'a> Entry<'a> {
    pub(crate) fn new(b: &Backend, ns: &'a Namespace, class: &'a str, key: &'a str) -> Self {
        Entry {
            ns,
            class,
            key,
            wake: b.wake_channel(ns, key),
            tags: &[],
            grace_ms: 0,
            ahead_ms: 0,
            want_fresh_for: false,
        }
    }

    /// The same entry of a class with an in-process tier.
    pub(crate) fn with_l1(self, l1: bool) -> Self {
        Entry {
            want_fresh_for: l1,
            ..self
        }
    }

    /// Whether the fast path reads the value's remaining TTL.
    pub(crate) fn needs_pttl(&self) -> bool {
        self.has_windows() || self.want_fresh_for
    }

    /// How long a value with `pttl_ms` left stays fresh (its TTL, not counting the grace).
    fn fresh_for(&self, pttl_ms: i64) -> Option<Duration> {
        let ms = pttl_ms.checked_sub(i64::try_from(self.grace_ms).ok()?)?;
        u64::try_from(ms).ok().map(Duration::from_millis)
    }

    /// The same entry of a class with fail-safe (`stale_grace`) and eager refresh (`refresh_ahead`) windows.
    pub(crate) fn windows(self, grace: Option<Duration>, ahead: Option<Duration>) -> Self {
        let ms = |d: Option<Duration>| d.map_or(0, millis);
        Entry {
            grace_ms: ms(grace),
            ahead_ms: ms(ahead),
            ..self
        }
    }

    /// Whether a value with `pttl_ms` left may be served as is (fresh, and not due for an eager refresh).
    fn serve_as_is(&self, pttl_ms: i64) -> bool {
        let (g, a) = (
            i64::try_from(self.grace_ms).unwrap_or(i64::MAX),
            i64::try_from(self.ahead_ms).unwrap_or(i64::MAX),
        );
        pttl_ms < 0 || (g == 0 && a == 0) || pttl_ms > g.saturating_add(a)
    }

    /// Whether the class keeps values past their TTL or refreshes them ahead of it.
    pub(crate) fn has_windows(&self) -> bool {
        self.grace_ms > 0 || self.ahead_ms > 0
    }

    /// The same entry, filled or set with `tags`.
    pub(crate) fn tagged(self, tags: &'a [String]) -> Self {
        Entry { tags, ..self }
    }
}

/// The current epochs a call knows: the group epochs and some tags' (`(tag, epochs)`).
#[derive(Debug, Clone, Default)]
struct Known {
    gens: Gens,
    tags: Vec<(String, TagEpochs)>,
}

impl Known {
    fn tag(&self, tag: &[u8]) -> Option<TagEpochs> {
        self.tags
            .iter()
            .find(|(t, _)| t.as_bytes() == tag)
            .map(|(_, e)| *e)
    }

    /// What a fill leased under these epochs records for `tags` (each known; 0 otherwise).
    fn stamp(&self, tags: &[String]) -> Stamp {
        Stamp {
            gens: self.gens,
            tags: tags
                .iter()
                .map(|t| {
                    let epochs = self.tag(t.as_bytes()).unwrap_or_default();
                    (t.clone(), epochs.stamp())
                })
                .collect(),
            kept: None,
        }
    }
}

/// What a fetch found.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// A stored value (still enveloped; may be corrupt), and how long it stays fresh when known.
    Hit(Bytes, Option<Duration>),
    /// No usable value: the caller now holds the fill lease; the fill records this stamp. With fail-safe,
    /// the stale value the lease keeps (served if the refill fails).
    Leased(Stamp, Option<Bytes>),
    /// A current value due for an eager refresh: the caller now holds the lease to refresh it (everyone else
    /// keeps getting the value meanwhile).
    Refresh(Bytes, Stamp),
    /// Another caller holds the lease; it expires within this long. With fail-safe, the stale value it keeps.
    Wait(Duration, Option<Bytes>),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A stored epoch field, as `epochs.lua` reads it (`kw_valid`): absent is 0; anything but 1 to 16 ASCII
/// digits below 2^53 is corrupt (`None`). Exactly `kw_valid`, not `str::parse` (which takes a leading `+`
/// and any number of leading zeros): the fast path must never read as a number a field the scripts repair.
fn epoch(field: Option<&[u8]>) -> Option<u64> {
    match field {
        None => Some(0),
        Some(f) if f.is_empty() || f.len() > 16 || !f.iter().all(u8::is_ascii_digit) => None,
        Some(f) => std::str::from_utf8(f)
            .ok()?
            .parse::<u64>()
            .ok()
            .filter(|n| *n < 1 << 53),
    }
}

/// The embedded mirror's epochs: a corrupt field counts as 0 (the embedded keyspace only holds what keyward
/// wrote, so this is defensive).
fn current_gens(kv: &Kv, ns: &Namespace, class: &str) -> Gens {
    Gens {
        ns: mirror_epoch(kv, ns, "*"),
        class: mirror_epoch(kv, ns, class),
    }
}

/// One field of the embedded mirror's epochs hash (0 when absent or corrupt).
fn mirror_epoch(kv: &Kv, ns: &Namespace, field: &str) -> u64 {
    let h = kv.get_hash(&ns.gens_key);
    epoch(h.and_then(|h| h.get(field)).map(|b| &b[..])).unwrap_or(0)
}

/// The embedded mirror's epochs of `tag` (fields `t:<tag>` and `x:<tag>`).
fn mirror_tag_epochs(kv: &Kv, ns: &Namespace, tag: &[u8]) -> TagEpochs {
    let Ok(tag) = std::str::from_utf8(tag) else {
        return TagEpochs::default();
    };
    TagEpochs {
        removed: mirror_epoch(kv, ns, &tag_field(tag)),
        expired: mirror_epoch(kv, ns, &expiry_field(tag)),
    }
}

/// The epochs hash field of a tag's removals (`Keyward::invalidate_tag`).
pub(crate) fn tag_field(tag: &str) -> String {
    let mut f = String::with_capacity(tag.len() + 2);
    f.push_str("t:");
    f.push_str(tag);
    f
}

/// The epochs hash field of a tag's expiries (`Keyward::expire_tag`).
pub(crate) fn expiry_field(tag: &str) -> String {
    let mut f = String::with_capacity(tag.len() + 2);
    f.push_str("x:");
    f.push_str(tag);
    f
}

/// The other field of a tag's pair (`t:<tag>` ↔ `x:<tag>`): a bump of either takes both as its floor.
fn sibling_field(field: &str) -> Option<String> {
    if let Some(tag) = field.strip_prefix("t:") {
        Some(expiry_field(tag))
    } else {
        field.strip_prefix("x:").map(tag_field)
    }
}

/// `kw_bump`'s mirror (`epochs.lua`): bump `field` to `max(floor + 1, now in µs)`, the floor being the field
/// or, for a tag, the larger of its pair; or, when that would not fit below [`TOP_EPOCH`], re-base it (rule 1
/// of "Exhaustion": delete it and its sibling, bump `*` instead) or, for `*`, land on the top (rule 3).
/// Returns the new epoch and whether it is `*`'s after a re-base.
fn bump_mirror(kv: &mut Kv, ns: &Namespace, field: &str, life_ms: i64) -> (u64, bool) {
    let read = |kv: &Kv, f: &str| mirror_epoch(kv, ns, f);
    let sibling = sibling_field(field);
    // A tag's removal and expiry epochs draw from one sequence (see `TagEpochs`).
    let floor = read(kv, field).max(sibling.as_deref().map_or(0, |s| read(kv, s)));
    // µs, like `epochs.lua`: the clock floor keeps a recreated field above every epoch issued before.
    let now_us = u64::try_from(kv.now_us()).unwrap_or(0);
    let mut next = floor.saturating_add(1).max(now_us);
    if next >= TOP_EPOCH {
        if field != "*" {
            if let Some(Val::Hash(h)) = kv.get_mut(&ns.gens_key) {
                h.remove(field);
                if let Some(s) = &sibling {
                    h.remove(s.as_str());
                }
            }
            return (bump_mirror(kv, ns, "*", life_ms).0, true);
        }
        next = TOP_EPOCH;
    }
    // Rule 3: while `*` is at the top, the hash only gets a life if it has none, so that it expires.
    let exhausted = read(kv, "*") == TOP_EPOCH;
    kv.hset(
        &ns.gens_key,
        &[(field, Bytes::from(next.to_string()))],
        life_ms,
    );
    let left = kv.pttl(&ns.gens_key);
    if left < life_ms && !(exhausted && left >= 0) {
        kv.pexpire(&ns.gens_key, life_ms);
    }
    (next, false)
}

/// Rule 2 of "Exhaustion" (`epochs.lua`) in the mirror: `e`'s class and tag fields found at the top are
/// re-based before a fill or a set records them. No bump writes one there, so in the embedded keyspace (which
/// holds only what keyward wrote) this never fires; it keeps the mirror's contract the scripts'.
fn mirror_repair(kv: &mut Kv, e: &Entry<'_>) {
    let life_ms = i64::try_from(millis(e.ns.gens_lifetime)).unwrap_or(i64::MAX);
    if mirror_epoch(kv, e.ns, e.class) >= TOP_EPOCH {
        bump_mirror(kv, e.ns, e.class, life_ms);
    }
    for t in e.tags {
        let epochs = mirror_tag_epochs(kv, e.ns, t.as_bytes());
        if epochs.removed.max(epochs.expired) >= TOP_EPOCH {
            bump_mirror(kv, e.ns, &tag_field(t), life_ms);
        }
    }
}

/// Judge stored bytes in the embedded mirror (every epoch is at hand there).
fn mirror_judge(kv: &Kv, e: &Entry<'_>, raw: &[u8], negative_ok: bool) -> Verdict {
    let gens = current_gens(kv, e.ns, e.class);
    judge(
        raw,
        gens,
        |t| Some(mirror_tag_epochs(kv, e.ns, t)),
        negative_ok,
    )
}

/// The embedded mirror's stamp for a fill or set of `e` (its tags' current epochs).
fn mirror_stamp(kv: &Kv, e: &Entry<'_>) -> Stamp {
    Stamp {
        gens: current_gens(kv, e.ns, e.class),
        tags: e
            .tags
            .iter()
            .map(|t| (t.clone(), mirror_tag_epochs(kv, e.ns, t.as_bytes()).stamp()))
            .collect(),
        kept: None,
    }
}

/// The tags stored bytes carry with the epochs they recorded, in their order (none for a `V1` value); `None`
/// for bytes that are not a value the client reads. (A tag that is not UTF-8 was not written by keyward, whose
/// tags are `&str`, and no call can name it; lossy is enough.)
fn kept_tags(raw: &[u8]) -> Option<Vec<(String, u64)>> {
    let (_, tags, _) = envelope::parse_tagged(raw).ok()?;
    Some(
        tags.iter()
            .map(|(t, recorded)| (String::from_utf8_lossy(t).into_owned(), recorded))
            .collect(),
    )
}

/// `kw_kept_epoch` in `fetch.lua`: the epoch a fail-safe throttle records for a tag the kept value recorded at
/// `recorded` and whose current epoch is `current`: the larger, counting `recorded` only if a fill can record
/// it (below the top; see "Exhaustion" in `epochs.lua`).
fn kept_epoch(current: u64, recorded: u64) -> u64 {
    if recorded < TOP_EPOCH {
        current.max(recorded)
    } else {
        current
    }
}

/// Whether `key` still holds the lease whose marker starts with `lease_prefix`.
fn holds(kv: &Kv, key: &str, lease_prefix: &str) -> bool {
    kv.get_str(key)
        .is_some_and(|s| s.starts_with(lease_prefix.as_bytes()))
}

/// `release.lua`'s mirror: give the lease back, and a value it kept with it (same expiry).
pub(super) fn release_mirror(kv: &mut Kv, key: &str, lease_prefix: &str) -> bool {
    if !holds(kv, key, lease_prefix) {
        return false;
    }
    let data = kv.get_str(key).cloned().unwrap_or_default();
    match (envelope::kept(&data), kv.expires_us(key)) {
        (Some((_, body)), Some(expires)) => {
            let body = data.slice_ref(body);
            kv.put_evictable(key, body, expires);
            true
        }
        _ => kv.del(key),
    }
}

/// The same marker with its waiter flag set.
fn flagged(data: &[u8]) -> Bytes {
    let mut flagged = data.to_vec();
    if let Some(flag) = flagged.get_mut(envelope::LEASE_FLAG_AT) {
        *flag = b'1';
    }
    Bytes::from(flagged)
}

/// Gives back a fill lease (`release.lua`: only while the entry still holds this very lease; it wakes the
/// waiters the lease collected): the undo of a fetch whose answer never came, and a release that must land.
/// `lease` is the lease's marker (`L1:{token}:0`) or its prefix (`L1:{token}:`, which ends in `:`).
fn lease_undo(e: &Entry<'_>, lease: &str, lease_ttl: Duration) -> Undo {
    let prefix = lease.strip_suffix('0').unwrap_or(lease);
    Undo {
        script: &SCRIPTS.release,
        keys: vec![e.key.to_owned()],
        args: vec![prefix.as_bytes().to_vec(), e.wake.as_bytes().to_vec()],
        within: lease_ttl,
    }
}

/// `fetch.lua`'s mirror: the value, or the lease for `marker`, or who waits.
fn fetch_mirror(
    kv: &mut Kv,
    e: &Entry<'_>,
    marker: &str,
    lease_ttl: Duration,
    negative_ok: bool,
) -> Fetched {
    mirror_repair(kv, e);
    let now = kv.now_us();
    let stamp = mirror_stamp(kv, e);
    let lease = Bytes::copy_from_slice(marker.as_bytes());
    let lease_until = now.saturating_add(micros(lease_ttl));
    let Some((data, expires)) = kv.get_str(e.key).cloned().zip(kv.expires_us(e.key)) else {
        kv.put_evictable(e.key, lease, lease_until);
        return Fetched::Leased(stamp, None);
    };
    let left = |until_us: i64| Duration::from_micros(u64::try_from(until_us - now).unwrap_or(0));
    let mut held = None;
    let mut body = data.clone();
    if data.starts_with(LEASE_PREFIX) {
        let Some((deadline_ms, kept)) = envelope::kept(&data) else {
            if !envelope::lease_has_waiters(&data) {
                kv.put_evictable(e.key, flagged(&data), expires);
            }
            return Fetched::Wait(left(expires), None);
        };
        body = data.slice_ref(kept);
        let deadline_us = deadline_ms.saturating_mul(1000);
        if deadline_us > now {
            held = Some(deadline_us);
        }
    }
    let wait = |kv: &mut Kv, until: i64, stale: Option<Bytes>| {
        if !envelope::lease_has_waiters(&data) {
            kv.put_evictable(e.key, flagged(&data), expires);
        }
        Fetched::Wait(left(until), stale)
    };
    match mirror_judge(kv, e, &body, negative_ok) {
        Verdict::NotAValue => match held {
            Some(until) => wait(kv, until, None),
            None => Fetched::Hit(body, None),
        },
        Verdict::Stale => match held {
            Some(until) => wait(kv, until, None),
            None => {
                kv.put_evictable(e.key, lease, lease_until);
                Fetched::Leased(stamp, None)
            }
        },
        // Without fail-safe an expired value is simply gone (as `fetch.lua`).
        Verdict::Expired if e.grace_ms == 0 => match held {
            Some(until) => wait(kv, until, None),
            None => {
                kv.put_evictable(e.key, lease, lease_until);
                Fetched::Leased(stamp, None)
            }
        },
        Verdict::Current | Verdict::Unknown
            if envelope::parse(&body).is_ok_and(|(_, b)| b == envelope::Body::Negative) =>
        {
            // A cached absent is never kept for fail-safe nor refreshed ahead (fetch.lua).
            Fetched::Hit(body, None)
        }
        verdict @ (Verdict::Current | Verdict::Unknown | Verdict::Expired) => {
            let pttl_ms = (expires - now) / 1000;
            let fresh = verdict != Verdict::Expired
                && (e.grace_ms == 0 || pttl_ms > i64::try_from(e.grace_ms).unwrap_or(i64::MAX));
            if let Some(until) = held {
                return if fresh {
                    Fetched::Hit(body, e.fresh_for(pttl_ms))
                } else {
                    wait(kv, until, Some(body))
                };
            }
            if fresh && e.serve_as_is(pttl_ms) {
                return Fetched::Hit(body, e.fresh_for(pttl_ms));
            }
            let deadline_ms = lease_until / 1000;
            let mut over = Vec::with_capacity(marker.len() + 24 + body.len());
            over.extend_from_slice(marker.as_bytes());
            over.extend_from_slice(format!(":{deadline_ms}:").as_bytes());
            over.extend_from_slice(&body);
            // As `lease_over` in fetch.lua: without fail-safe the value keeps its TTL.
            let until = if e.grace_ms > 0 {
                expires.max(lease_until)
            } else {
                expires
            };
            kv.put_evictable(e.key, Bytes::from(over), until);
            if fresh {
                Fetched::Refresh(body, stamp)
            } else {
                // As fetch.lua: the kept value's tags at their current epochs (or their own, if higher), for a
                // fail-safe throttle.
                let mut stamp = stamp;
                stamp.kept = kept_tags(&body).map(|tags| {
                    tags.into_iter()
                        .map(|(t, recorded)| {
                            let current = mirror_tag_epochs(kv, e.ns, t.as_bytes()).stamp();
                            (t, kept_epoch(current, recorded))
                        })
                        .collect()
                });
                Fetched::Leased(stamp, Some(body))
            }
        }
    }
}

/// What the fast path's two replies say.
enum Fast {
    Done(Fetched),
    /// Rare cases go through the atomic `fetch.lua`.
    Atomic,
    /// Redis Cluster: a stored value carrying tags the view was not asked about; judge it with them.
    Judge(Bytes, Vec<String>),
}

/// How many times a script call is asked again with more tags' epochs (Redis Cluster; an entry that changes
/// its tags that often between two calls is not a case worth more).
const TAG_ROUNDS: usize = 4;

/// Return the value, or grant the fill lease identified by `marker` (`L1:{token}:0`), or say who waits. A value
/// filled under older epochs (the namespace's, its class's, or any of its tags'), or a negative entry when
/// `negative_ok` is false, counts as absent. A granted lease comes with the stamp the fill records: the epochs
/// of the group and of `e.tags`, as read when the lease was granted.
///
/// On Redis the fast path is two plain commands in one pipeline: `SET key <lease> NX GET PX ttl` (in one
/// command: the value, or our lease on an empty key) and then `HMGET` of the epochs (`*`, the class, and
/// `t:<tag>` for each of the caller's tags). Plain commands cost the server a fraction of a script call,
/// which is what a hit pays. Reading the epochs *after* the `SET` on the same connection is safe: a bump
/// between the two makes a hit look stale (a conservative miss), and for a granted lease the loader starts
/// only after both replies, so its data is at least as new as the epochs recorded. Everything else — a lease
/// held by someone, a value from before a group or tag invalidation, a value carrying tags the caller did not
/// name, an absent the caller cannot use, epochs it cannot read, an error reply — is rarer and goes through
/// the atomic `fetch.lua`.
pub(crate) async fn fetch(
    b: &Backend,
    e: &Entry<'_>,
    marker: &str,
    lease_ttl: Duration,
    negative_ok: bool,
) -> Result<Fetched> {
    // Redis Cluster: the epochs come from the handle's bounded view, and the fast path is the `SET` alone.
    let mut view = view_epochs(b, e, &[]).await?;
    // Sized up front: every read builds these, and growing them step by step was most of the reallocations
    // a hit made (the `hit` bench under `perf`).
    let mut fast = Pipeline::new("fetch")
        .cmd_sized("SET", 6, e.key.len() + marker.len() + 32)
        .key(e.key)
        .arg(marker)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(millis(lease_ttl));
    if e.needs_pttl() {
        // Fail-safe and eager refresh judge a value by its remaining TTL; an in-process copy lives no longer.
        fast = fast.cmd("PTTL").key(e.key);
    }
    if view.is_none() {
        let tag_bytes: usize = e.tags.iter().map(|t| 2 * (t.len() + 2)).sum();
        fast = fast
            .cmd_sized(
                "HMGET",
                3 + 2 * e.tags.len(),
                e.ns.gens_key.len() + 1 + e.class.len() + tag_bytes,
            )
            .arg(&e.ns.gens_key)
            .arg("*")
            .arg(e.class);
        for t in e.tags {
            // Written straight into the command: a tagged read builds no `String` per field.
            fast = fast.arg_joined("t:", t).arg_joined("x:", t);
        }
    }
    let judge_fast = |replies: &[Reply]| match (&view, replies) {
        (Some(known), [stored]) => classify(stored, known, e.tags, negative_ok, true),
        (Some(_), _) => None,
        (None, _) => decode_fast(replies, e.tags, negative_ok),
    };
    let answer = b
        .pipeline(
            fast.evicting(),
            || lease_undo(e, marker, lease_ttl),
            |kv| Fast::Done(fetch_mirror(kv, e, marker, lease_ttl, negative_ok)),
            |replies| {
                if !e.needs_pttl() {
                    return judge_fast(replies);
                }
                let [stored, pttl, rest @ ..] = replies else {
                    return None;
                };
                let pttl = pttl.int()?;
                let negative = stored.bytes().is_some_and(|b| {
                    envelope::parse(&b).is_ok_and(|(_, body)| body == envelope::Body::Negative)
                });
                if !stored.is_nil() && !negative && !e.serve_as_is(pttl) {
                    // Stale, or due for an eager refresh: the atomic path keeps the value under the lease.
                    return Some(Fast::Atomic);
                }
                let mut without = Vec::with_capacity(replies.len() - 1);
                without.push(stored.clone());
                without.extend(rest.iter().cloned());
                match judge_fast(&without)? {
                    Fast::Done(Fetched::Hit(b, _)) => {
                        Some(Fast::Done(Fetched::Hit(b, e.fresh_for(pttl))))
                    }
                    other => Some(other),
                }
            },
        )
        .await;
    match answer {
        Ok(Fast::Done(fetched)) => return Ok(fetched),
        Ok(Fast::Judge(stored, extra)) => {
            view = view_epochs(b, e, &extra).await?;
            if let Some(known) = &view
                && judge(&stored, known.gens, |t| known.tag(t), negative_ok) == Verdict::Current
            {
                return Ok(Fetched::Hit(stored, None));
            }
        }
        Ok(Fast::Atomic) => {}
        // An error reply (e.g. the epochs key is not a hash): the atomic path repairs what it can.
        Err(err @ Error::Redis { .. }) if !err.is_unavailable() => {}
        Err(err) => return Err(err),
    }
    let mut extra = Vec::new();
    for _ in 0..TAG_ROUNDS {
        let call = with_epochs(
            tag_args(
                SCRIPTS
                    .fetch
                    .call("fetch")
                    .key(e.key)
                    .arg(e.class)
                    .arg(marker)
                    .arg(millis(lease_ttl))
                    .arg(if negative_ok { "1" } else { "0" })
                    .arg(millis(e.ns.gens_lifetime))
                    .arg(e.grace_ms)
                    .arg(e.ahead_ms),
                e.tags,
            ),
            e,
            view.as_ref(),
        )
        .undo(lease_undo(e, marker, lease_ttl))
        .evicting();
        let reply = b
            .atomic(
                call,
                |kv| Ok(fetch_mirror(kv, e, marker, lease_ttl, negative_ok)),
                |reply| decode_fetch(reply, e.tags),
            )
            .await?;
        match reply {
            Ok(fetched) => return Ok(fetched),
            Err(unknown) => {
                extra.extend(unknown);
                view = view_epochs(b, e, &extra).await?;
            }
        }
    }
    Err(Error::InvalidArgument {
        what: format!(
            "class `{}`: the entry kept changing its tags while it was read",
            e.class
        ),
    })
}

/// The fast path's replies on a single server: the `SET`'s and the `HMGET`'s (no allocation for an untagged
/// call: this is what every hit pays).
fn decode_fast(replies: &[Reply], tags: &[String], negative_ok: bool) -> Option<Fast> {
    let [stored, epochs] = replies else {
        return None;
    };
    let [ns, class, tag_epochs @ ..] = epochs.array()? else {
        return None;
    };
    if tag_epochs.len() != 2 * tags.len() {
        return None;
    }
    let field = |r: &Reply| -> Option<Option<u64>> {
        Some(if r.is_nil() {
            Some(0)
        } else {
            epoch(Some(&r.bytes()?[..]))
        })
    };
    // A corrupt epoch field (`None` inside), or a class or tag field at the top (which no fill may record):
    // the atomic path repairs it (always safe) and goes on.
    let (Some(ns), Some(class)) = (field(ns)?, field(class)?) else {
        return Some(Fast::Atomic);
    };
    if class >= TOP_EPOCH {
        return Some(Fast::Atomic);
    }
    let mut known = Known {
        gens: Gens { ns, class },
        tags: Vec::with_capacity(tags.len()),
    };
    for (t, pair) in tags.iter().zip(tag_epochs.chunks_exact(2)) {
        let (Some(removed), Some(expired)) = (field(&pair[0])?, field(&pair[1])?) else {
            return Some(Fast::Atomic);
        };
        if removed.max(expired) >= TOP_EPOCH {
            return Some(Fast::Atomic);
        }
        known.tags.push((t.clone(), TagEpochs { removed, expired }));
    }
    classify(stored, &known, tags, negative_ok, false)
}

/// What the fast path's `SET … NX GET` reply means under `known`. `in_view`: the epochs come from a Cluster
/// view, which can be asked about other tags (else a value carrying tags the caller did not name goes to the
/// atomic path, which reads them).
fn classify(
    stored: &Reply,
    known: &Known,
    tags: &[String],
    negative_ok: bool,
    in_view: bool,
) -> Option<Fast> {
    if stored.is_nil() {
        return Some(Fast::Done(Fetched::Leased(known.stamp(tags), None)));
    }
    let stored = stored.bytes()?;
    if stored.starts_with(LEASE_PREFIX) {
        return Some(Fast::Atomic);
    }
    match judge(&stored, known.gens, |t| known.tag(t), negative_ok) {
        // Gone, or expired (kept under a refill lease for fail-safe): the atomic path decides.
        Verdict::Stale | Verdict::Expired => Some(Fast::Atomic),
        Verdict::Unknown if in_view => {
            let unknown = envelope::parse_tagged(&stored)
                .map(|(_, carried, _)| {
                    carried
                        .iter()
                        .filter(|(t, _)| known.tag(t).is_none())
                        .map(|(t, _)| String::from_utf8_lossy(t).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            Some(Fast::Judge(stored, unknown))
        }
        Verdict::Unknown => Some(Fast::Atomic),
        // A current value, or bytes the caller will decode, report and heal.
        Verdict::Current | Verdict::NotAValue => Some(Fast::Done(Fetched::Hit(stored, None))),
    }
}

/// On Redis Cluster, the group epochs and those of the entry's tags and of `extra` tags from the handle's view
/// (see `ConnectOptions::group_invalidation_bound`); `None` elsewhere (the scripts read them). A view that
/// found corrupt fields is repaired first by bumping them (`epochs.lua`: a corrupt field is bumped to the
/// server clock in µs, above every epoch issued before), exactly as the single-server scripts do in place.
async fn view_epochs(b: &Backend, e: &Entry<'_>, extra: &[String]) -> Result<Option<Known>> {
    if !b.epochs_in_view() {
        return Ok(None);
    }
    let mut names: Vec<&str> = e.tags.iter().map(String::as_str).collect();
    for t in extra {
        if !names.contains(&t.as_str()) {
            names.push(t);
        }
    }
    for _ in 0..3 {
        match b.group_epochs(e.ns, e.class, &names).await? {
            None => return Ok(None),
            Some(ViewEpochs::Current(ns, class, tags)) => {
                let tags = tags
                    .into_iter()
                    .map(|(removed, expired)| TagEpochs { removed, expired });
                return Ok(Some(Known {
                    gens: Gens { ns, class },
                    tags: names.iter().map(|t| (*t).to_owned()).zip(tags).collect(),
                }));
            }
            Some(ViewEpochs::Repair(fields)) => {
                for field in fields {
                    bump(b, e.ns, &field).await?;
                }
            }
        }
    }
    Err(Error::InvalidArgument {
        what: format!(
            "the group epochs `{}` stay corrupt after repairing them",
            e.ns.gens_key
        ),
    })
}

/// The caller's tags as a script takes them: a count, then each tag.
fn tag_args(mut call: Call, tags: &[String]) -> Call {
    call = call.arg(tags.len());
    for t in tags {
        call = call.arg(t.as_str());
    }
    call
}

/// A cache script call's epochs: on a single server the script reads the epochs hash (`KEYS[2]`); on Cluster
/// the view's epochs go last in `ARGV` instead: ns, class, a count m, then m triples (tag, removal epoch,
/// expiry epoch) (see `epochs.lua`). `call` has every other argument already.
fn with_epochs(call: Call, e: &Entry<'_>, view: Option<&Known>) -> Call {
    match view {
        None => call.key(&e.ns.gens_key),
        Some(k) => {
            let mut call = call.arg(k.gens.ns).arg(k.gens.class).arg(k.tags.len());
            for (t, epochs) in &k.tags {
                call = call.arg(t.as_str()).arg(epochs.removed).arg(epochs.expired);
            }
            call
        }
    }
}

/// `fetch.lua`'s reply: `{0, stored}` | `{1, ns_gen, class_gen, tag_gen…}` | `{2, pttl_ms}` | `{3, tag…}`
/// (the entry carries tags whose epochs were not passed: `Err` with them).
fn decode_fetch(
    reply: &Reply,
    tags: &[String],
) -> Option<std::result::Result<Fetched, Vec<String>>> {
    let stamp_of = |ns: &Reply, class: &Reply, epochs: &[Reply]| -> Option<Stamp> {
        let mut stamp = Stamp {
            gens: Gens {
                ns: u64::try_from(ns.int()?).ok()?,
                class: u64::try_from(class.int()?).ok()?,
            },
            tags: Vec::with_capacity(tags.len()),
            kept: None,
        };
        for (t, epoch) in tags.iter().zip(epochs) {
            stamp
                .tags
                .push((t.clone(), u64::try_from(epoch.int()?).ok()?));
        }
        Some(stamp)
    };
    let fetched = match reply.array()? {
        [Reply::Int(0), v] => Fetched::Hit(v.bytes()?, None),
        [Reply::Int(0), v, pttl] => Fetched::Hit(
            v.bytes()?,
            u64::try_from(pttl.int()?).ok().map(Duration::from_millis),
        ),
        [Reply::Int(4), ns, class, epochs @ .., kept] if epochs.len() == tags.len() => {
            Fetched::Refresh(kept.bytes()?, stamp_of(ns, class, epochs)?)
        }
        // The caller's tag epochs, then those of the kept value's own tags (in its header's order).
        [Reply::Int(5), ns, class, epochs @ .., kept] if epochs.len() >= tags.len() => {
            let kept = kept.bytes()?;
            let (mine, theirs) = epochs.split_at(tags.len());
            let mut stamp = stamp_of(ns, class, mine)?;
            // A header the script reads and the client does not (a tag epoch of more than 20 digits), or
            // epochs that are not one integer per tag: the kept value's tags stay unknown, and a failed
            // refill serves it (if it decodes) without storing it again. Never a failed call: the lease is
            // ours, and the refill goes on as for any value the client cannot serve.
            stamp.kept = kept_tags(&kept)
                .filter(|names| names.len() == theirs.len())
                .and_then(|names| {
                    names
                        .into_iter()
                        .zip(theirs)
                        .map(|((t, _), epoch)| Some((t, u64::try_from(epoch.int()?).ok()?)))
                        .collect()
                });
            Fetched::Leased(stamp, Some(kept))
        }
        [Reply::Int(2), wait, kept] => Fetched::Wait(
            Duration::from_millis(u64::try_from(wait.int()?).unwrap_or(0)),
            Some(kept.bytes()?),
        ),
        [Reply::Int(1), ns, class, epochs @ ..] if epochs.len() == tags.len() => {
            Fetched::Leased(stamp_of(ns, class, epochs)?, None)
        }
        [Reply::Int(2), pttl] => Fetched::Wait(
            Duration::from_millis(u64::try_from(pttl.int()?).unwrap_or(0)),
            None,
        ),
        [Reply::Int(3), unknown @ ..] => {
            return unknown_tags(unknown).map(Err);
        }
        _ => return None,
    };
    Some(Ok(fetched))
}

/// The tags of a `{3, tag…}` reply (at least one).
fn unknown_tags(replies: &[Reply]) -> Option<Vec<String>> {
    let tags = replies
        .iter()
        .map(|r| String::from_utf8(r.bytes()?.to_vec()).ok())
        .collect::<Option<Vec<_>>>()?;
    (!tags.is_empty()).then_some(tags)
}

/// Read without taking a lease: a current value, or nothing.
pub(crate) async fn read(b: &Backend, e: &Entry<'_>) -> Result<Option<Bytes>> {
    let mut extra = Vec::new();
    for _ in 0..TAG_ROUNDS {
        let view = view_epochs(b, e, &extra).await?;
        let call = with_epochs(
            tag_args(
                SCRIPTS
                    .read
                    .call("read")
                    .key(e.key)
                    .arg(e.class)
                    .arg(millis(e.ns.gens_lifetime))
                    .arg(e.grace_ms),
                &[],
            ),
            e,
            view.as_ref(),
        )
        .evicting();
        let read = b
            .atomic(
                call,
                |kv| {
                    let data = kv.get_str(e.key)?.clone();
                    let value = if data.starts_with(LEASE_PREFIX) {
                        // A lease over a kept value still serves it while fresh.
                        data.slice_ref(envelope::kept(&data)?.1)
                    } else {
                        data
                    };
                    let pttl_ms = (kv.expires_us(e.key)? - kv.now_us()) / 1000;
                    let negative =
                        envelope::parse(&value).is_ok_and(|(_, b)| b == envelope::Body::Negative);
                    if e.grace_ms > 0
                        && !negative
                        && pttl_ms <= i64::try_from(e.grace_ms).unwrap_or(i64::MAX)
                    {
                        return None;
                    }
                    if matches!(
                        mirror_judge(kv, e, &value, true),
                        Verdict::Stale | Verdict::Expired
                    ) {
                        return None;
                    }
                    Some(Ok(value))
                },
                |reply| {
                    if reply.is_nil() {
                        return Some(None);
                    }
                    match reply.array() {
                        Some([Reply::Int(3), unknown @ ..]) => {
                            Some(Some(Err(unknown_tags(unknown)?)))
                        }
                        _ => reply.bytes().map(|v| Some(Ok(v))),
                    }
                },
            )
            .await?;
        match read {
            None => return Ok(None),
            Some(Ok(v)) => return Ok(Some(v)),
            Some(Err(unknown)) => extra.extend(unknown),
        }
    }
    Err(Error::InvalidArgument {
        what: format!(
            "class `{}`: the entry kept changing its tags while it was read",
            e.class
        ),
    })
}

/// Store `value` (a full envelope) only if the lease whose marker starts with `lease_prefix` is still held.
/// Embedded, a value that cannot fit in its class's budget even after evicting is not stored (false).
///
/// One `commit.lua` call per fill. Batching the commits of concurrent fills into one script call was built
/// and measured (2026-12-02): paired against one call each, it cost the server as much per commit and the
/// client more (the hop through a batch task), so it was taken out (BENCHMARKS.md, "2026-12-02 (second
/// session)").
pub(crate) async fn commit(
    kw: &Keyward,
    e: &Entry<'_>,
    lease_prefix: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<bool> {
    let call = SCRIPTS
        .commit
        .call("commit")
        .key(e.key)
        .arg(lease_prefix)
        .arg(value)
        .arg(millis(ttl))
        .arg(&*e.wake)
        .evicting();
    let stored = kw
        .inner
        .backend
        .atomic(
            call,
            |kv| {
                if !holds(kv, e.key, lease_prefix) {
                    return false;
                }
                let until = kv.now_us().saturating_add(micros(ttl));
                kv.put_evictable(e.key, Bytes::copy_from_slice(value), until)
            },
            |reply| Some(reply.int()? == 1),
        )
        .await?;
    // Local waiters (the embedded backend has no pub/sub; on Redis the script published too).
    kw.inner.bus.wake(e.key);
    Ok(stored)
}

/// Give a lease back (the loader failed, or its commit could not be made) so that a waiter takes over now
/// rather than at expiry. The release must land: if the breaker is open or Redis does not answer, it is
/// retried in the background (bypassing the breaker) until the server answers, for at most `lease_ttl`.
pub(crate) async fn release(
    b: &Backend,
    bus: &WakeBus,
    e: &Entry<'_>,
    lease_prefix: &str,
    lease_ttl: Duration,
) -> Result<bool> {
    let call = SCRIPTS
        .release
        .call("release")
        .key(e.key)
        .arg(lease_prefix)
        .arg(&*e.wake)
        .must_land(lease_undo(e, lease_prefix, lease_ttl))
        .evicting();
    let released = b
        .atomic(
            call,
            |kv| release_mirror(kv, e.key, lease_prefix),
            |reply| Some(reply.int()? == 1),
        )
        .await?;
    if released {
        bus.wake(e.key);
    }
    Ok(released)
}

/// Unconditional write of `body` (`v:…`/`n:`) under the current epochs, with the current epochs of `e.tags`
/// (`V2`; `V1` without tags); voids any lease. Embedded, a value too large for its class's budget is not
/// stored, and the previous value is removed (never read as current).
pub(crate) async fn set(
    b: &Backend,
    bus: &WakeBus,
    e: &Entry<'_>,
    body: &[u8],
    ttl: Duration,
) -> Result<()> {
    let view = view_epochs(b, e, &[]).await?;
    let call = with_epochs(
        tag_args(
            SCRIPTS
                .set
                .call("set")
                .key(e.key)
                .arg(e.class)
                .arg(body)
                .arg(millis(ttl))
                .arg(&*e.wake)
                .arg(millis(e.ns.gens_lifetime)),
            e.tags,
        ),
        e,
        view.as_ref(),
    )
    .evicting();
    b.atomic(
        call,
        |kv| {
            mirror_repair(kv, e);
            let value = Bytes::from(envelope::value(&mirror_stamp(kv, e), body));
            let until = kv.now_us().saturating_add(micros(ttl));
            kv.put_evictable(e.key, value, until);
        },
        |_| Some(()),
    )
    .await?;
    bus.wake(e.key);
    Ok(())
}

/// The suffix of an entry's write-version marker (`<entry key>:wv`, a string `ms-seq` with the entry's TTL):
/// the newest write-behind version the entry has taken ([`set_if_newer`]).
pub(crate) const WRITE_VERSION_SUFFIX: &str = ":wv";

/// Write-behind's set (`wb_set.lua`, then `set.lua`): as [`set`], but only if `version` (a write's stream
/// entry id, `(ms, seq)`) is above the entry's write-version marker, which it then becomes (with the same
/// TTL). False, writing nothing, when the entry took a newer write-behind write already. The marker shares
/// the entry's hash tag (its key is the entry's plus [`WRITE_VERSION_SUFFIX`]), so one script holds both on
/// Cluster; it outlives an invalidation of the entry, so a late older set stays refused after one.
pub(crate) async fn set_if_newer(
    b: &Backend,
    bus: &WakeBus,
    e: &Entry<'_>,
    body: &[u8],
    ttl: Duration,
    version: (u64, u64),
) -> Result<bool> {
    let marker = format!("{}{WRITE_VERSION_SUFFIX}", e.key);
    let text = format!("{}-{}", version.0, version.1);
    let view = view_epochs(b, e, &[]).await?;
    let call = with_epochs(
        tag_args(
            SCRIPTS
                .wb_set
                .call("wb_set")
                .key(e.key)
                .arg(e.class)
                .arg(body)
                .arg(millis(ttl))
                .arg(&*e.wake)
                .arg(millis(e.ns.gens_lifetime)),
            e.tags,
        ),
        e,
        view.as_ref(),
    )
    .key(&marker)
    .arg(&text)
    .evicting();
    let written = b
        .atomic(
            call,
            |kv| {
                let current = kv.get_str(&marker).and_then(|m| {
                    let (ms, seq) = std::str::from_utf8(m).ok()?.split_once('-')?;
                    Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
                });
                if current.is_some_and(|c| c >= version) {
                    return false;
                }
                let ttl_ms = i64::try_from(millis(ttl)).unwrap_or(i64::MAX);
                kv.set(&marker, Val::Str(Bytes::from(text.clone())), ttl_ms);
                mirror_repair(kv, e);
                let value = Bytes::from(envelope::value(&mirror_stamp(kv, e), body));
                let until = kv.now_us().saturating_add(micros(ttl));
                kv.put_evictable(e.key, value, until);
                true
            },
            |reply| Some(reply.int()? == 1),
        )
        .await?;
    if written {
        bus.wake(e.key);
    }
    Ok(written)
}

/// Remove the value or lease of one entry; a fill leased before this can no longer commit.
pub(crate) async fn invalidate(b: &Backend, bus: &WakeBus, e: &Entry<'_>) -> Result<bool> {
    let call = SCRIPTS
        .invalidate
        .call("invalidate")
        .key(e.key)
        .arg(&*e.wake)
        .evicting();
    let removed = b
        .atomic(call, |kv| kv.del(e.key), |reply| Some(reply.int()? == 1))
        .await?;
    bus.wake(e.key);
    Ok(removed)
}

/// Bump a group epoch (`*` for the namespace, a class name, or `t:<tag>`/`x:<tag>` for a tag) to
/// `max(current + 1, now in Unix µs)`: O(1), whatever the number of entries, and never a value an older entry
/// carries (see `epochs.lua`). A class or tag field that cannot go higher is re-based instead ("Exhaustion" in
/// `epochs.lua`: deleted, and `*` bumped); the epoch returned is then `*`'s. Then prune a few tag fields older
/// than the epochs' lifetime (see `bump.lua`).
pub(crate) async fn bump(b: &Backend, ns: &Namespace, field: &str) -> Result<u64> {
    let life_ms = millis(ns.gens_lifetime);
    let call = SCRIPTS
        .bump
        .call("bump")
        .key(&ns.gens_key)
        .arg(field)
        .arg(life_ms)
        .arg(if b.epochs_in_view() { "1" } else { "0" });
    let (epoch, rebased) = b
        .atomic(
            call,
            |kv| {
                let life_ms = i64::try_from(life_ms).unwrap_or(i64::MAX);
                let bumped = bump_mirror(kv, ns, field, life_ms);
                prune_mirror(kv, ns, field, life_ms);
                bumped
            },
            |reply| match reply.array()? {
                [epoch, bumped] => Some((
                    u64::try_from(epoch.int()?).ok()?,
                    bumped.bytes()?.as_ref() != field.as_bytes(),
                )),
                _ => None,
            },
        )
        .await?;
    if rebased {
        let sibling = sibling_field(field);
        let dropped: Vec<&str> = std::iter::once(field).chain(sibling.as_deref()).collect();
        b.rebased(&dropped, epoch);
    } else {
        b.bumped(field, epoch);
    }
    Ok(epoch)
}

/// How many tag fields a bump examines for pruning (`bump.lua` samples as many with `HRANDFIELD`).
const PRUNE_SAMPLE: usize = 16;

/// `bump.lua`'s pruning in the embedded mirror: a full sweep of the tag fields older than the lifetime, with
/// probability `PRUNE_SAMPLE / fields` (always for a small hash), so that a bump examines `PRUNE_SAMPLE`
/// fields on average, as on Redis.
fn prune_mirror(kv: &mut Kv, ns: &Namespace, bumped: &str, life_ms: i64) {
    let floor = kv.now_us().saturating_sub(life_ms.saturating_mul(1000));
    let Some(Val::Hash(h)) = kv.get_mut(&ns.gens_key) else {
        return;
    };
    if h.len() > PRUNE_SAMPLE && rand::random_range(0..h.len()) >= PRUNE_SAMPLE {
        return;
    }
    h.retain(|f, v| {
        !((f.starts_with("t:") || f.starts_with("x:"))
            && f != bumped
            && epoch(Some(&v[..])).is_some_and(|e| i64::try_from(e).is_ok_and(|e| e < floor)))
    });
}

/// Delete the entry only if it still holds exactly `raw` (self-healing of undecodable values).
pub(crate) async fn heal(b: &Backend, key: &str, raw: &[u8]) -> Result<bool> {
    let call = SCRIPTS.heal.call("heal").key(key).arg(raw).evicting();
    b.atomic(
        call,
        |kv| kv.get_str(key).is_some_and(|s| s == raw) && kv.del(key),
        |reply| Some(reply.int()? == 1),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keyward;
    use crate::backend::MemoryOptions;
    use crate::policy::{CacheClass, Jitter, Policy};

    fn ns() -> Namespace {
        Namespace {
            gens_key: "t:a:_kw:gens".into(),
            channel: "t:a:_kw:fills".into(),
            backplane: "t:a:_kw:l1".into(),
            gens_lifetime: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bump_never_repeats_an_epoch_and_repairs_a_corrupt_field() {
        let m = Backend::embedded(&MemoryOptions::default(), &[("c", true)]);
        let ns = ns();
        let first = bump(&m, &ns, "c").await.unwrap();
        assert!(
            first > 1_600_000_000_000_000,
            "starts at the clock, in Unix µs: {first}"
        );
        assert_eq!(
            bump(&m, &ns, "c").await.unwrap(),
            first + 1,
            "bumps in one µs still climb"
        );
        tokio::time::advance(Duration::from_secs(120)).await; // the epochs hash expires
        let after = bump(&m, &ns, "c").await.unwrap();
        assert!(after >= first + 120_000_000, "{first} -> {after}");
        let garbage = SCRIPTS.heal.call("test");
        m.atomic(
            garbage,
            |kv| kv.hset(&ns.gens_key, &[("c", Bytes::from_static(b"garbage"))], 1),
            |_| Some(()),
        )
        .await
        .unwrap();
        let repaired = bump(&m, &ns, "c").await.unwrap();
        assert!(repaired >= after, "a corrupt field counts as 0: {repaired}");
    }

    /// The scenario: class ttl 10s, no jitter, lease 1s, loader timeout 500ms (the epochs hash lives
    /// ~71s after a bump). A value filled at 65s must not come back after the bump at 72s, which finds the
    /// epochs hash expired and recreates it.
    #[tokio::test(start_paused = true)]
    async fn an_invalidation_after_the_epochs_expired_is_not_undone() {
        let class = CacheClass::new(Duration::from_secs(10), "tests")
            .jitter(Jitter::Fixed(Duration::ZERO))
            .lease_ttl(Duration::from_secs(1))
            .loader_timeout(Duration::from_millis(500));
        let policy = Policy::builder("t", "epochs")
            .cache("c", class)
            .build()
            .unwrap();
        let kw = Keyward::embedded(policy);
        let cache = kw.cache::<String>("c").unwrap();
        let load = |v: &'static str| move || async move { Ok::<_, std::io::Error>(v.to_owned()) };

        kw.invalidate_namespace().await.unwrap(); // t = 0
        tokio::time::advance(Duration::from_secs(65)).await;
        assert_eq!(cache.get_or_set("k", load("S1")).await.unwrap(), "S1");
        tokio::time::advance(Duration::from_secs(7)).await; // t = 72: the epochs hash has expired
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(
            cache.get("k").await.unwrap(),
            None,
            "the entry filled at 65s is stale"
        );
        assert_eq!(cache.get_or_set("k", load("S2")).await.unwrap(), "S2");

        // The same with the class's own epoch.
        tokio::time::advance(Duration::from_secs(80)).await;
        cache.invalidate_all().await.unwrap();
        tokio::time::advance(Duration::from_secs(65)).await;
        assert_eq!(cache.get_or_set("j", load("S1")).await.unwrap(), "S1");
        tokio::time::advance(Duration::from_secs(7)).await;
        cache.invalidate_all().await.unwrap();
        assert_eq!(cache.get("j").await.unwrap(), None);
        assert_eq!(cache.get_or_set("j", load("S2")).await.unwrap(), "S2");
    }

    /// Tags under a paused clock (class ttl 10s, no jitter, lease 1s: the epochs live 71s after a bump). A tag
    /// field older than that is pruned by a later bump, without bringing back an entry it made stale, and the
    /// tag's next version is above every one issued before, even after the whole hash expired.
    #[tokio::test(start_paused = true)]
    async fn tag_fields_are_pruned_and_tag_versions_never_repeat() {
        let class = CacheClass::new(Duration::from_secs(10), "tests")
            .jitter(Jitter::Fixed(Duration::ZERO))
            .lease_ttl(Duration::from_secs(1))
            .loader_timeout(Duration::from_millis(500));
        let policy = Policy::builder("t", "tags")
            .cache("c", class)
            .build()
            .unwrap();
        let kw = Keyward::embedded(policy);
        let cache = kw.cache::<String>("c").unwrap();
        let fields = || {
            let mut f: Vec<String> = kw
                .inner
                .backend
                .inspect_embedded(|kv| {
                    kv.get_hash("t:tags:_kw:gens")
                        .map(|h| h.keys().cloned().collect())
                        .unwrap_or_default()
                })
                .expect("the embedded backend");
            f.sort();
            f
        };

        cache
            .set_tagged("a", &"A1".to_owned(), &["x"])
            .await
            .unwrap();
        kw.invalidate_tag("x").await.unwrap(); // t = 0
        assert_eq!(cache.get("a").await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(65)).await;
        cache
            .set_tagged("b", &"B".to_owned(), &["x"])
            .await
            .unwrap(); // carries x's epoch from t = 0
        tokio::time::advance(Duration::from_secs(7)).await; // t = 72: x's epoch is past the lifetime
        kw.invalidate_tag("y").await.unwrap();
        assert_eq!(fields(), ["t:y"], "x was pruned, the bumped field kept");
        assert_eq!(
            cache.get("b").await.unwrap().as_deref(),
            Some("B"),
            "filled after x's last invalidation: still current"
        );
        kw.invalidate_tag("x").await.unwrap();
        assert_eq!(
            cache.get("b").await.unwrap(),
            None,
            "x's new version is above the pruned one"
        );

        // The whole hash expires; the next version is still above every one issued before.
        cache
            .set_tagged("c", &"C".to_owned(), &["x"])
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        cache
            .set_tagged("c", &"C".to_owned(), &["x"])
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(67)).await; // t = 144: no bump for 72s
        assert!(fields().is_empty(), "the epochs hash expired");
        kw.invalidate_tag("x").await.unwrap();
        assert_eq!(cache.get("c").await.unwrap(), None);
    }

    /// "Exhaustion" (`epochs.lua`) in the embedded mirror, with fields written at the top of the range behind
    /// keyward's back: a class or tag field at or next to the top is re-based (every older entry is gone) and
    /// never recorded; `*` at the top makes fills never current, stops extending the hash's life, and the
    /// namespace caches again once the hash expired. Every removal lands.
    #[tokio::test(start_paused = true)]
    async fn the_top_of_the_epoch_range_never_swallows_a_removal() {
        let class = CacheClass::new(Duration::from_secs(10), "tests")
            .jitter(Jitter::Fixed(Duration::ZERO))
            .lease_ttl(Duration::from_secs(1))
            .loader_timeout(Duration::from_millis(500));
        let policy = Policy::builder("t", "top")
            .cache("c", class)
            .build()
            .unwrap();
        let kw = Keyward::embedded(policy);
        let c = kw.cache::<u32>("c").unwrap();
        let gens = "t:top:_kw:gens";
        let poke = |field: &str, value: u64| {
            kw.inner
                .backend
                .inspect_embedded(|kv| {
                    kv.hset(gens, &[(field, Bytes::from(value.to_string()))], 60_000);
                })
                .unwrap();
        };
        let field = |f: &str| {
            kw.inner
                .backend
                .inspect_embedded(|kv| kv.get_hash(gens).and_then(|h| h.get(f).cloned()))
                .unwrap()
        };
        let pttl = || {
            kw.inner
                .backend
                .inspect_embedded(|kv| kv.pttl(gens))
                .unwrap()
        };

        // A tag's expiry field at the top (the issue): two removals, both land.
        poke("x:big", TOP_EPOCH);
        c.set_tagged("k", &1, &["big"]).await.unwrap();
        assert_eq!(field("x:big"), None, "re-based before the set recorded it");
        assert_eq!(c.get("k").await.unwrap(), Some(1));
        kw.invalidate_tag("big").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "the first removal");
        c.set_tagged("k", &2, &["big"]).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(2));
        kw.invalidate_tag("big").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None, "the second removal");

        // A removal field one below the top: recorded, then an expiry cannot go higher and re-bases.
        poke("t:near", TOP_EPOCH - 1);
        c.set_tagged("n", &1, &["near"]).await.unwrap();
        c.set("other", &1).await.unwrap();
        assert_eq!(c.get("n").await.unwrap(), Some(1));
        let star = mirror_epoch_of(&kw, "*");
        kw.expire_tag("near").await.unwrap();
        assert_eq!((field("t:near"), field("x:near")), (None, None));
        assert!(mirror_epoch_of(&kw, "*") > star, "`*` was bumped instead");
        assert_eq!(c.get("n").await.unwrap(), None);
        assert_eq!(c.get("other").await.unwrap(), None, "the whole namespace");
        c.set_tagged("n", &2, &["near"]).await.unwrap();
        assert_eq!(c.get("n").await.unwrap(), Some(2));
        kw.invalidate_tag("near").await.unwrap();
        assert_eq!(c.get("n").await.unwrap(), None);

        // A class field one below the top.
        poke("c", TOP_EPOCH - 1);
        c.set("k", &3).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(3));
        c.invalidate_all().await.unwrap();
        assert_eq!(field("c"), None, "re-based");
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set("k", &4).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(4));
        c.invalidate_all().await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);

        // `*` one below the top: the next bump lands on it; nothing filled then is ever current.
        poke("*", TOP_EPOCH - 1);
        c.set("k", &5).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(5));
        kw.invalidate_namespace().await.unwrap();
        assert_eq!(mirror_epoch_of(&kw, "*"), TOP_EPOCH);
        assert_eq!(c.get("k").await.unwrap(), None);
        let loads = std::sync::atomic::AtomicUsize::new(0);
        for _ in 0..3 {
            c.set("k", &6).await.unwrap();
            assert_eq!(
                c.get("k").await.unwrap(),
                None,
                "filled under `*` at the top"
            );
            let v = c
                .get_or_set("j", || async {
                    loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, std::io::Error>(7)
                })
                .await
                .unwrap();
            assert_eq!(v, 7);
        }
        assert_eq!(loads.into_inner(), 3, "nothing is served from the cache");
        // Bumps no longer extend the hash's life, so it expires and `*` starts again from the clock.
        tokio::time::advance(Duration::from_secs(5)).await;
        let left = pttl();
        kw.invalidate_tag("t").await.unwrap();
        kw.invalidate_namespace().await.unwrap();
        assert!(pttl() <= left, "{} > {left}", pttl());
        tokio::time::advance(Duration::from_millis(u64::try_from(left).unwrap() + 1)).await;
        assert_eq!(field("*"), None, "the epochs hash expired");
        c.set("k", &8).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(8));
        kw.invalidate_namespace().await.unwrap();
        assert!(mirror_epoch_of(&kw, "*") < TOP_EPOCH);
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    fn mirror_epoch_of(kw: &Keyward, field: &str) -> u64 {
        kw.inner
            .backend
            .inspect_embedded(|kv| {
                kv.get_hash("t:top:_kw:gens")
                    .and_then(|h| h.get(field))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0)
            })
            .unwrap()
    }

    #[test]
    fn an_epoch_field_is_valid_exactly_when_kw_valid_says_so() {
        for (raw, want) in [
            (&b"0"[..], Some(0)),
            (b"1764512345678901", Some(1_764_512_345_678_901)),
            (b"9007199254740991", Some((1 << 53) - 1)),
            (b"0000000000000001", Some(1)),
            (b"9007199254740992", None),
            (b"00000000000000001", None),
            (b"+1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"-1", None),
            (b"1.5", None),
            (b"", None),
            (b"garbage", None),
        ] {
            assert_eq!(epoch(Some(raw)), want, "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(epoch(None), Some(0), "absent");
    }
    /// Reply 5 (a stale value leased for a refill): the kept value's tags with the epochs the script sent;
    /// a header the client cannot read (a tag epoch of 25 digits, which `fetch.lua` reads) or a kept epoch
    /// that is not an integer leaves them unknown — still the lease over the value, never a failed call.
    #[test]
    fn a_stale_lease_s_kept_tags_are_unknown_rather_than_an_error_when_unreadable() {
        let reply = |kept: &[u8], epochs: Vec<Reply>| {
            let mut r = vec![Reply::Int(5), Reply::Int(1), Reply::Int(2), Reply::Int(7)];
            r.extend(epochs);
            r.push(Reply::Bytes(Bytes::copy_from_slice(kept)));
            Reply::Array(r)
        };
        let tags = ["c".to_owned()];
        let leased = |r: Reply| match decode_fetch(&r, &tags) {
            Some(Ok(Fetched::Leased(stamp, Some(_)))) => stamp,
            other => panic!("not a lease over the kept value: {other:?}"),
        };
        let good = b"V2:1:2:2:1:a:5:1:c:6:v:x";
        let stamp = leased(reply(good, vec![Reply::Int(9), Reply::Int(8)]));
        assert_eq!(stamp.tags, [("c".to_owned(), 7)]);
        assert_eq!(
            stamp.kept,
            Some(vec![("a".to_owned(), 9), ("c".to_owned(), 8)])
        );
        let untagged = leased(reply(b"V1:1:2:v:x", Vec::new()));
        assert_eq!(untagged.kept, Some(Vec::new()));
        let unreadable = b"V2:1:2:1:1:a:1234567890123456789012345:v:x";
        assert_eq!(leased(reply(unreadable, vec![Reply::Int(9)])).kept, None);
        let not_an_int = reply(good, vec![Reply::Int(9), Reply::Other("1e21".into())]);
        assert_eq!(leased(not_an_int).kept, None);
        assert_eq!(
            leased(reply(good, vec![Reply::Int(9)])).kept,
            None,
            "one short"
        );
    }

    /// `kw_kept_epoch`'s rule: the larger of the current epoch and the recorded one, if that is below the top.
    #[test]
    fn a_kept_tag_is_throttled_no_lower_than_the_value_recorded_it() {
        assert_eq!(kept_epoch(10, 7), 10, "an expiry or removal since the fill");
        assert_eq!(kept_epoch(7, 10), 10, "a view lagging the fill");
        assert_eq!(kept_epoch(7, TOP_EPOCH), 7, "the top: no fill records it");
        assert_eq!(kept_epoch(7, u64::MAX), 7);
    }
}
