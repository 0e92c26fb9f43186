//! Redis Cluster: the `redis+cluster://` URL, the slot map keyward keeps for itself (one circuit breaker per
//! primary, keyspace walks per primary), the group-epoch view, and sharded wake-up subscriptions.
//!
//! Commands travel on redis-rs's async cluster client, which follows `MOVED`/`ASK`, refreshes its topology
//! and re-subscribes sharded channels after a failover. Every keyward script touches one slot.
//!
//! **The one decision: group epochs are read from a view, not from their key.** On a single server the cache
//! scripts read the namespace's epoch hash next to the entry. On Cluster that hash lives in its own slot, and
//! reading it on every hit would send every read of the namespace to one node. So each handle keeps a view of
//! the epochs in process: a bump publishes its new epoch on a sharded channel (applied on arrival), and the
//! whole hash is re-read every quarter of the bound. A view is used only while its last full read was *sent*
//! less than half of [`ConnectOptions::group_invalidation_bound`](crate::ConnectOptions::group_invalidation_bound)
//! ago; an older one is re-read before the call (one extra round trip, to the epochs' node). A caller shares
//! another caller's fetch in progress (single-flight) only if it started less than half the bound ago. Since a
//! read sent after a bump returned sees it, no call starting later than the bound after `invalidate_all` or
//! `invalidate_namespace` returned can be served an entry filled before it — whatever push was lost. A field
//! the view finds corrupt is repaired (bumped) before the view is trusted again. A re-base (an exhausted field
//! deleted, `*` bumped) reaches a view as one step — from this handle's bump, or from an announcement naming
//! the field — and a full read sent before it cannot bring the field back; a read sent after the view last
//! raised a field is the truth even when it is lower, and a read sent before one already merged is ignored.
//! So no fill records an epoch the hash no longer holds, which no later bump of that field would reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::Value;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{redact, scrub};
use crate::backend::breaker::{Breaker, BreakerState};
use crate::backend::{ConnectOptions, KeyTtl};
use crate::error::{Error, Result};

/// Number of hash slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// How often the slot map is re-read when nothing seems wrong.
const SLOT_MAP_EVERY: Duration = Duration::from_secs(1);
/// The least time between two slot-map reads asked for by failing calls.
const SLOT_MAP_MIN_GAP: Duration = Duration::from_millis(100);

/// Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`).
pub(crate) fn is_cluster_url(url: &str) -> bool {
    url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://")
}

/// The seed node URLs of `redis+cluster://[user:pass@]host:port[,host:port…][/][?…]`: one `redis://` (or
/// `rediss://`) URL per node, each with the user-info and query.
///
/// # Errors
/// [`Error::InvalidUrl`] naming what is wrong, with the credentials redacted.
pub(crate) fn seed_urls(url: &str) -> Result<Vec<String>> {
    let invalid = |detail: &str| Error::InvalidUrl {
        reason: scrub(url, &format!("{}: {detail}", redact(url))),
    };
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Err(invalid("a Cluster URL starts with `redis+cluster://`"));
    };
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hosts, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let tail = tail.strip_prefix('/').unwrap_or(tail);
    if !(tail.is_empty() || tail.starts_with(['?', '#']) || tail == "0") {
        return Err(invalid(
            "a Cluster has only database 0: `redis+cluster://host:port[,host:port…]`",
        ));
    }
    let tail = tail.strip_prefix('0').unwrap_or(tail);
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err(invalid(
                "an empty node in the list: `redis+cluster://host:port[,host:port…]`",
            ));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.ends_with(']')
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(invalid(&format!(
                "`{port}` is not a port (1–65535) in `{host}`"
            )));
        }
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !host.ends_with(']')
        {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        seeds.push(format!("{scheme}://{auth}{with_port}/{tail}"));
    }
    Ok(seeds)
}

/// The slot a key hashes to (Redis Cluster's rule; see [`crate::key::cluster_slot`]).
pub(crate) fn slot_of(key: &[u8]) -> u16 {
    crate::key::cluster_slot(key)
}

/// A key's hash tag as Redis uses it (see [`slot_of`]): what a channel must carry to live in the key's slot.
pub(crate) fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key)
}

/// Who serves each slot: the primaries' addresses, and per slot an index into them.
#[derive(Debug, Default)]
pub(crate) struct SlotMap {
    /// `(host, port)` of each primary.
    pub(crate) primaries: Vec<(String, u16)>,
    /// Per slot, the index of its primary in `primaries` (`u16::MAX`: not covered).
    owner: Vec<u16>,
}

impl SlotMap {
    /// Parse a `CLUSTER SLOTS` reply; `seed_host` fills in an empty host (a node announcing no address).
    fn parse(reply: &Value, seed_host: &str) -> Option<SlotMap> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut map = SlotMap {
            primaries: Vec::new(),
            owner: vec![u16::MAX; usize::from(SLOTS)],
        };
        for range in ranges {
            let Value::Array(parts) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = match node.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" {
                seed_host.to_owned()
            } else {
                host
            };
            let Some(Value::Int(port)) = node.get(1) else {
                return None;
            };
            let addr = (host, u16::try_from(*port).ok()?);
            let index = match map.primaries.iter().position(|p| *p == addr) {
                Some(i) => i,
                None => {
                    map.primaries.push(addr);
                    map.primaries.len() - 1
                }
            };
            let index = u16::try_from(index).ok()?;
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            for slot in start..=end.min(usize::from(SLOTS) - 1) {
                map.owner[slot] = index;
            }
        }
        Some(map)
    }

    pub(crate) fn primary_of_slot(&self, slot: u16) -> Option<&(String, u16)> {
        let index = *self.owner.get(usize::from(slot))?;
        self.primaries.get(usize::from(index))
    }
}

/// The group epochs as this handle last saw them (see the module docs).
#[derive(Default)]
struct EpochState {
    /// Field (`*`, a class, or `t:<tag>`) → its epoch, merged by maximum (epochs only grow), and when this view
    /// last raised it. A field a full read sent after that no longer finds was pruned (or the hash expired):
    /// it is dropped, so the view holds what the hash holds and tags bumped long ago do not pile up here.
    fields: HashMap<String, (u64, Instant)>,
    /// When the last successful full read was sent.
    read_at: Option<Instant>,
    /// Fields a re-base deleted (learned from this handle's bump or from the re-base's announcement), and
    /// when the view learned it: a full read sent before then still holds the deleted value and must not
    /// bring it back. Settled (dropped) by the first read sent after.
    rebased: HashMap<String, Instant>,
    /// Fields the last read found corrupt (not a decimal integer below 2^53; `*` when the key is not a hash):
    /// until a bump repairs them, the view vouches for nothing.
    corrupt: Vec<String>,
}

/// The largest valid epoch plus one (`epochs.lua` treats anything from here on as corrupt).
const EPOCH_LIMIT: u64 = 1 << 53;

/// The last valid epoch (`envelope::TOP_EPOCH`). A class or tag field found here is repaired before the view
/// vouches for it: no fill may record it ("Exhaustion" in `cache/epochs.lua`; a bump of it re-bases it). `*`
/// may be here: entries filled under it are never current.
const TOP_EPOCH: u64 = EPOCH_LIMIT - 1;

/// Whether `field` holding `epoch` must be repaired before a fill records it (see [`TOP_EPOCH`]).
fn exhausted(field: &str, epoch: u64) -> bool {
    field != "*" && epoch >= TOP_EPOCH
}

/// The other field of a tag's pair (`t:<tag>` ↔ `x:<tag>`), deleted with it by a re-base.
fn sibling_of(field: &str) -> Option<String> {
    if let Some(tag) = field.strip_prefix("t:") {
        Some(format!("x:{tag}"))
    } else {
        field.strip_prefix("x:").map(|tag| format!("t:{tag}"))
    }
}

/// A stored epoch, if valid (as `epochs.lua`'s `kw_valid`).
fn valid_epoch(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 16 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n < EPOCH_LIMIT)
}

/// What a handle's view says about a class's group epochs and some tags' epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ViewEpochs {
    /// The namespace and class epochs, and each tag's asked for (in order; fields `t:<tag>` and `x:<tag>`,
    /// its removal and expiry epochs; 0 when never bumped or pruned), vouched for by a read within the bound.
    Current(u64, u64, Vec<(u64, u64)>),
    /// These fields are corrupt: bump them (which repairs them) before trusting the view.
    Repair(Vec<String>),
}

/// Whether a sharded channel's subscription was made (initialised once, by the first watcher that completes it).
type Subscribed = Arc<tokio::sync::OnceCell<()>>;

/// Per-cluster state shared by the backend and its background tasks.
pub(crate) struct ClusterState {
    map: RwLock<Arc<SlotMap>>,
    /// One breaker per primary (by `host:port`), created on first use.
    breakers: Mutex<HashMap<(String, u16), Arc<Breaker>>>,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    /// Woken when a call suspects the slot map is out of date.
    remap: Notify,
    seed_host: String,
    epochs: Mutex<EpochState>,
    pub(crate) epochs_bound: Duration,
    /// Sharded wake-up channels: the number of live watchers, and whether the subscription was made.
    watched: Mutex<HashMap<String, (usize, Subscribed)>>,
    /// Held while a subscribe or an unsubscribe is sent and answered, so that they reach a node in the order
    /// their decisions were made: an unsubscribe decided when the last watcher left can never land after a
    /// new watcher's subscribe.
    pub(crate) subscribing: tokio::sync::Mutex<()>,
    /// Held while a caller re-reads a stale epoch view (see `RedisBackend::group_epochs`).
    pub(crate) reading: tokio::sync::Mutex<()>,
}

impl ClusterState {
    pub(crate) fn new(options: &ConnectOptions, seed_host: String, map: SlotMap) -> Self {
        ClusterState {
            map: RwLock::new(Arc::new(map)),
            breakers: Mutex::new(HashMap::new()),
            breaker_failures: options.breaker_failures,
            breaker_cooldown: options.breaker_cooldown,
            remap: Notify::new(),
            seed_host,
            epochs: Mutex::new(EpochState::default()),
            epochs_bound: options.group_invalidation_bound,
            watched: Mutex::new(HashMap::new()),
            subscribing: tokio::sync::Mutex::new(()),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    fn slot_map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The primaries, as the last slot map names them.
    pub(crate) fn primaries(&self) -> Vec<(String, u16)> {
        self.slot_map().primaries.clone()
    }

    /// The primary serving `slot`, as the last slot map says.
    pub(crate) fn primary_of(&self, slot: u16) -> Option<(String, u16)> {
        self.slot_map().primary_of_slot(slot).cloned()
    }

    /// The breaker of the primary serving `slot` (`None` when the map does not know it yet).
    pub(crate) fn breaker_for(&self, slot: u16) -> Option<Arc<Breaker>> {
        let map = self.slot_map();
        let addr = map.primary_of_slot(slot)?;
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        Some(Arc::clone(breakers.entry(addr.clone()).or_insert_with(
            || Arc::new(Breaker::new(self.breaker_failures, self.breaker_cooldown)),
        )))
    }

    /// The worst state among the current primaries' breakers.
    pub(crate) fn breaker_state(&self) -> BreakerState {
        let map = self.slot_map();
        let breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let mut worst = BreakerState::Closed;
        for addr in &map.primaries {
            match breakers.get(addr).map(|b| b.state()) {
                Some(BreakerState::Open) => return BreakerState::Open,
                Some(BreakerState::HalfOpen) => worst = BreakerState::HalfOpen,
                _ => {}
            }
        }
        worst
    }

    /// Ask for the slot map to be read again soon (coalesced).
    pub(crate) fn suspect(&self) {
        self.remap.notify_one();
    }

    /// Apply one epoch (from a bump's reply or its announcement).
    pub(crate) fn apply_epoch(&self, field: &str, epoch: u64) {
        if epoch >= EPOCH_LIMIT {
            return;
        }
        let mut s = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        if exhausted(field, epoch) {
            // No bump writes this (it re-bases instead); whatever wrote it, it is repaired before use.
            if !s.corrupt.iter().any(|f| f == field) {
                s.corrupt.push(field.to_owned());
            }
            return;
        }
        let now = Instant::now();
        let e = s.fields.entry(field.to_owned()).or_insert((0, now));
        if epoch > e.0 {
            *e = (epoch, now);
        }
        // A bump of a corrupt field (or of `*`, after a key of the wrong type) repaired it.
        s.corrupt.retain(|f| f != field);
    }

    /// Apply a re-base this handle made ("Exhaustion" in `cache/epochs.lua`): `dropped` were deleted from the
    /// hash (they read as 0 until bumped again, and no longer need a repair) and `*` went to `ns_epoch`, above
    /// every entry filled before. Other handles learn it from the re-base's announcement (which names the
    /// field, so that they drop it and raise `*` in one step) or from their next full read. A full read sent
    /// before the re-base and merged after it does not bring the deleted fields back (`rebased`).
    pub(crate) fn apply_rebase(&self, dropped: &[&str], ns_epoch: u64) {
        {
            let now = Instant::now();
            let mut s = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
            s.fields.retain(|f, _| !dropped.contains(&f.as_str()));
            s.corrupt.retain(|f| !dropped.contains(&f.as_str()));
            for f in dropped {
                s.rebased.insert((*f).to_owned(), now);
            }
        }
        self.apply_epoch("*", ns_epoch);
    }

    /// Apply an announcement from the epochs channel (`bump.lua`): `"<field> <epoch>"`, or for a re-base
    /// `"* <epoch> <re-based field>"` (the field and, for a tag, its sibling were deleted).
    pub(crate) fn apply_announcement(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let mut parts = text.split(' ');
        let (Some(field), Some(epoch)) = (parts.next(), parts.next().map(str::as_bytes)) else {
            return;
        };
        let Some(epoch) = valid_epoch(epoch) else {
            return;
        };
        match (field, parts.next(), parts.next()) {
            (_, None, _) => self.apply_epoch(field, epoch),
            ("*", Some(rebased), None) if !rebased.is_empty() && rebased != "*" => {
                let sibling = sibling_of(rebased);
                let dropped: Vec<&str> =
                    std::iter::once(rebased).chain(sibling.as_deref()).collect();
                self.apply_rebase(&dropped, epoch);
            }
            _ => {}
        }
    }

    /// Merge a full read of the epochs hash, sent at `sent`.
    /// `None` for a key of the wrong type.
    fn apply_read(&self, sent: Instant, fields: Option<HashMap<String, Vec<u8>>>) {
        let mut s = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        // Reads are not serialised (the background reader and a caller's re-read): one sent before a read
        // already merged has nothing newer to say, and merged now it would bring back what a re-base deleted
        // in between.
        if s.read_at.is_some_and(|merged| sent < merged) {
            return;
        }
        let mut corrupt = Vec::new();
        match fields {
            None => corrupt.push("*".to_owned()),
            Some(fields) => {
                // Absent from a read sent after this view last raised it: pruned, or the hash expired (the
                // server reads it as 0 too). A field raised after the read was sent is kept.
                s.fields
                    .retain(|f, (_, raised)| fields.contains_key(f) || *raised >= sent);
                for (field, raw) in fields {
                    // Deleted by a re-base the view learned after this read was sent.
                    if s.rebased.get(&field).is_some_and(|at| *at >= sent) {
                        continue;
                    }
                    match valid_epoch(&raw) {
                        Some(epoch) if !exhausted(&field, epoch) => {
                            let e = s.fields.entry(field).or_insert((0, sent));
                            // A read sent after the view last raised a field is the truth, lower or not: no
                            // bump lowers a field, so it came down because it was deleted in between (a
                            // re-base, or `*` at the top when the hash expired) and then started again from
                            // the clock. Keeping the higher value would hand it to fills, which would record
                            // an epoch that no later bump of the field reaches: never invalidated again.
                            if epoch > e.0 || e.1 < sent {
                                *e = (epoch, sent);
                            }
                        }
                        // Read as 0 it would bring back entries it invalidated; as a huge number it would
                        // outrank every later bump. Neither: it is repaired first. The same for a class or
                        // tag field at the top, which no fill may record (its repair re-bases it).
                        _ => corrupt.push(field),
                    }
                }
            }
        }
        s.corrupt = corrupt;
        s.rebased.retain(|_, at| *at >= sent);
        s.read_at = Some(s.read_at.map_or(sent, |t| t.max(sent)));
    }

    /// The namespace, `class` and `tags` epochs, if the view is within its bound (or the fields to repair
    /// first).
    pub(crate) fn epochs(&self, class: &str, tags: &[&str]) -> Option<ViewEpochs> {
        let s = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        // Half the bound: a caller may share the outcome of another's fetch started up to half the bound
        // earlier (`Backend::flight_max_age`), so the two halves together stay within the bound.
        let fresh = s
            .read_at
            .is_some_and(|t| t.elapsed() < self.epochs_bound / 2);
        fresh.then(|| {
            if s.corrupt.is_empty() {
                let get = |f: &str| s.fields.get(f).map_or(0, |e| e.0);
                let mut field = String::new();
                let mut tag_field = |kind: &str, tag: &str| {
                    field.clear();
                    field.push_str(kind);
                    field.push_str(tag);
                    get(&field)
                };
                let tags = tags
                    .iter()
                    .map(|t| (tag_field("t:", t), tag_field("x:", t)))
                    .collect();
                ViewEpochs::Current(get("*"), get(class), tags)
            } else {
                ViewEpochs::Repair(s.corrupt.clone())
            }
        })
    }

    /// Count one more watcher of `channel`; its subscription's once-cell (initialised by whoever subscribes
    /// first; a watcher cancelled while subscribing leaves the work to the next one).
    pub(crate) fn watch(&self, channel: &str) -> Subscribed {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let entry = w
            .entry(channel.to_owned())
            .or_insert_with(|| (0, Arc::new(tokio::sync::OnceCell::new())));
        entry.0 += 1;
        Arc::clone(&entry.1)
    }

    /// One watcher fewer; `true` if none is left (unsubscribe).
    pub(crate) fn unwatch(&self, channel: &str) -> bool {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        match w.get_mut(channel) {
            Some((n, _)) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                w.remove(channel);
                true
            }
            None => false,
        }
    }

    /// Whether `channel` has watchers (checked again, under [`ClusterState::subscribing`], right before an
    /// unsubscribe is sent).
    pub(crate) fn is_watched(&self, channel: &str) -> bool {
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(channel)
    }
}

/// Read `CLUSTER SLOTS` through `conn`.
///
/// Asked of a random node, up to 5 times (each bounded by `timeout`): one node that is down or frozen does not
/// keep the map from being read.
pub(crate) async fn read_slot_map(
    conn: &mut ClusterConnection,
    seed_host: &str,
    timeout: Duration,
) -> std::result::Result<SlotMap, String> {
    let mut last = String::new();
    for _ in 0..5 {
        let reply = tokio::time::timeout(
            timeout,
            conn.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => {
                return SlotMap::parse(&reply, seed_host)
                    .ok_or_else(|| "CLUSTER SLOTS: unexpected reply".to_owned());
            }
            Ok(Err(e)) => last = format!("CLUSTER SLOTS: {e}"),
            Err(_) => last = format!("CLUSTER SLOTS: no answer within {timeout:?}"),
        }
    }
    Err(last)
}

/// Read the whole epochs hash and merge it into the view.
///
/// # Errors
/// The client's error, or `None` on timeout.
pub(crate) async fn read_epochs(
    state: &ClusterState,
    conn: &mut ClusterConnection,
    gens_key: &str,
    timeout: Duration,
) -> std::result::Result<(), Option<redis::RedisError>> {
    let sent = Instant::now();
    let fields: redis::RedisResult<HashMap<String, Vec<u8>>> = tokio::time::timeout(
        timeout,
        redis::cmd("HGETALL").arg(gens_key).query_async(conn),
    )
    .await
    .map_err(|_| None)?;
    match fields {
        Ok(fields) => state.apply_read(sent, Some(fields)),
        // Not a hash: the bump of `*` deletes and recreates it (`epochs.lua`).
        Err(e) if e.code() == Some("WRONGTYPE") => {
            state.apply_read(sent, None);
        }
        Err(e) => return Err(Some(e)),
    }
    Ok(())
}

/// Build the cluster client for `seeds`, speaking RESP3 with `on_push` receiving pushes.
///
/// # Errors
/// [`Error::InvalidUrl`] when the seeds or TLS material cannot be used.
pub(crate) fn client(
    url: &str,
    seeds: &[String],
    options: &ConnectOptions,
    on_push: impl redis::aio::AsyncPushSender,
) -> Result<redis::cluster::ClusterClient> {
    let invalid = |detail: String| Error::InvalidUrl {
        reason: scrub(url, &format!("{}: {detail}", redact(url))),
    };
    let tls = url.starts_with("rediss+");
    if !tls && options.has_tls_material() {
        return Err(invalid(
            "a TLS CA or client certificate is set (ConnectOptions::tls_ca_* / tls_client_cert_*), which \
             needs a TLS URL: use `rediss+cluster://`"
                .to_owned(),
        ));
    }
    let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .use_protocol(redis::ProtocolVersion::RESP3)
        // Per node: a node that cannot complete a connection within the response timeout (0.5 s at least) is
        // as good as down for calls, and must not hold up a connect while the other nodes answer.
        .connection_timeout(
            options
                .connect_timeout
                .min(options.response_timeout.max(Duration::from_millis(500))),
        )
        .response_timeout(options.response_timeout)
        // Few, quick retries: enough to follow MOVED/ASK and ride out a TRYAGAIN, while a CLUSTERDOWN reaches
        // the caller as itself within ~150 ms instead of after redis-rs's default waits (1.28 s at least),
        // which every call would otherwise spend against the response timeout.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .retry_wait_formula(10, 2)
        .push_sender(on_push);
    if tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if options.danger_accept_invalid_certs {
            builder = builder.tls(redis::TlsMode::Insecure);
        }
        if let Some(certs) = options.tls_certificates()? {
            builder = builder.certs(certs);
        }
    }
    builder
        .build()
        .map_err(|e| invalid(e.detail().map_or_else(|| e.to_string(), str::to_owned)))
}

/// Walk every primary with its own `SCAN` cursor; each match with its TTL. `call` bounds each command.
pub(crate) async fn scan(
    conn: &ClusterConnection,
    primaries: &[(String, u16)],
    pattern: &str,
    batch: usize,
    timeout: Duration,
) -> std::result::Result<Vec<KeyTtl>, redis::RedisError> {
    let mut out = Vec::new();
    for (host, port) in primaries {
        let route = SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        };
        let mut conn = conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(batch.max(1));
            let reply = bounded(
                timeout,
                conn.route_command(scan, RoutingInfo::SingleNode(route.clone())),
            )
            .await?;
            let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("PTTL").arg(k);
                }
                let ttls = bounded(
                    timeout,
                    conn.route_pipeline(pipe, 0, keys.len(), route.clone()),
                )
                .await?;
                let ttls = ttls
                    .into_iter()
                    .map(redis::from_redis_value::<i64>)
                    .collect::<Result<Vec<_>, _>>()?;
                super::push_ttls(&mut out, keys, ttls);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(super::sorted(out))
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within the response timeout",
            )))
        })
}

/// Keep the slot map current: re-read it every [`SLOT_MAP_EVERY`], and soon after a call suspects it.
///
/// When slots moved to another primary (a failover), one key of each moved range is touched (`EXISTS` of a
/// probe key under `probe_prefix`, inside the namespace) through the client: if the client still routes that
/// slot to the old primary, the failure makes it refresh its own topology, which also moves sharded
/// subscriptions (wake-up waiters') to the new primary. Without it, a handle with no other traffic to those
/// slots would keep its waiters subscribed to a dead node.
pub(crate) fn spawn_slot_mapper(
    state: &Arc<ClusterState>,
    conn: ClusterConnection,
    timeout: Duration,
    probe_prefix: String,
) -> tokio::task::JoinHandle<()> {
    // The task holds the state; the backend aborts it when dropped.
    let s = Arc::clone(state);
    tokio::spawn(async move {
        let mut conn = conn;
        loop {
            let _ = tokio::time::timeout(SLOT_MAP_EVERY, s.remap.notified()).await;
            match read_slot_map(&mut conn, &s.seed_host, timeout).await {
                Ok(map) if !map.primaries.is_empty() => {
                    let moved = moved_slots(&s.slot_map(), &map);
                    *s.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
                    for slot in moved {
                        let probe = format!("{probe_prefix}{{{}}}", crate::key::slot_tag(slot));
                        let _ = tokio::time::timeout(
                            timeout,
                            redis::cmd("EXISTS")
                                .arg(&probe)
                                .query_async::<i64>(&mut conn),
                        )
                        .await;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "keyward: cannot read the cluster slot map"),
            }
            tokio::time::sleep(SLOT_MAP_MIN_GAP).await;
        }
    })
}

/// One slot of each range that `new` gives to another primary than `old` did.
fn moved_slots(old: &SlotMap, new: &SlotMap) -> Vec<u16> {
    let mut out = Vec::new();
    let mut previous_moved = false;
    for slot in 0..SLOTS {
        let before = old.primary_of_slot(slot);
        let after = new.primary_of_slot(slot);
        let moved = before.is_some() && after.is_some() && before != after;
        if moved && !previous_moved {
            out.push(slot);
        }
        previous_moved = moved;
    }
    out
}

/// Keep the epoch view fresh: a full read every quarter of the bound (and, until it succeeds, the subscription
/// to the epochs' announcements that the connect could not make).
pub(crate) fn spawn_epoch_reader(
    state: &Arc<ClusterState>,
    conn: ClusterConnection,
    gens_key: String,
    timeout: Duration,
    subscribed: bool,
) -> tokio::task::JoinHandle<()> {
    let every = (state.epochs_bound / 4).max(Duration::from_millis(5));
    let s = Arc::clone(state);
    tokio::spawn(async move {
        let mut conn = conn;
        let mut subscribed = subscribed;
        loop {
            tokio::time::sleep(every).await;
            if !subscribed {
                subscribed = matches!(
                    tokio::time::timeout(timeout, conn.ssubscribe(&gens_key)).await,
                    Ok(Ok(()))
                );
            }
            if let Err(e) = read_epochs(&s, &mut conn, &gens_key, timeout.min(every * 2)).await {
                tracing::debug!(error = ?e, "keyward: cannot read the group epochs");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(fields: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
        fields
            .iter()
            .map(|(f, v)| ((*f).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_view_drops_fields_a_later_read_no_longer_finds() {
        let state = ClusterState::new(&ConnectOptions::default(), "h".into(), SlotMap::default());
        let read = |fields: &[(&str, &str)]| -> HashMap<String, Vec<u8>> {
            fields
                .iter()
                .map(|(f, v)| ((*f).to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        let now = Instant::now();
        let (first, before) = (
            now - Duration::from_millis(2),
            now - Duration::from_millis(1),
        );
        state.apply_read(first, Some(read(&[("*", "3"), ("t:old", "4")])));
        state.apply_epoch("t:new", 9);
        state.apply_epoch("x:new", 11);
        assert_eq!(
            state.epochs("c", &["old", "new", "none"]),
            Some(ViewEpochs::Current(3, 0, vec![(4, 0), (9, 11), (0, 0)]))
        );
        // A read sent before the bump of t:new was learned cannot say it is gone; one sent after can.
        state.apply_read(before, Some(read(&[("*", "3")])));
        assert_eq!(
            state.epochs("c", &["old", "new"]),
            Some(ViewEpochs::Current(3, 0, vec![(0, 0), (9, 11)])),
            "t:old was pruned, t:new is newer than the read"
        );
        state.apply_read(Instant::now(), Some(read(&[("*", "3")])));
        assert_eq!(
            state.epochs("c", &["new"]),
            Some(ViewEpochs::Current(3, 0, vec![(0, 0)]))
        );
        // Epochs only grow in the view: an older value does not lower one.
        state.apply_epoch("t:a", 7);
        state.apply_announcement(b"t:a 5");
        assert_eq!(
            state.epochs("c", &["a"]),
            Some(ViewEpochs::Current(3, 0, vec![(7, 0)]))
        );
    }

    /// "Exhaustion" in `cache/epochs.lua`, in the view: a class or tag field at the top is repaired before the
    /// view vouches for anything (no fill may record it); the handle's own re-base drops it; `*` at the top is
    /// used as is, and comes down only through a read sent after the view learned it (the hash expired).
    #[test]
    fn the_view_repairs_fields_at_the_top_and_follows_a_rebase() {
        let state = ClusterState::new(&ConnectOptions::default(), "h".into(), SlotMap::default());
        let read = |fields: &[(&str, &str)]| -> HashMap<String, Vec<u8>> {
            fields
                .iter()
                .map(|(f, v)| ((*f).to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        let top = TOP_EPOCH.to_string();
        let below = (TOP_EPOCH - 1).to_string();
        state.apply_read(
            Instant::now(),
            Some(read(&[("*", "3"), ("x:big", &top), ("t:ok", &below)])),
        );
        assert_eq!(
            state.epochs("c", &["ok"]),
            Some(ViewEpochs::Repair(vec!["x:big".to_owned()])),
            "a tag field at the top is repaired first; one below it is a valid epoch"
        );
        state.apply_rebase(&["x:big", "t:big"], 20);
        assert_eq!(
            state.epochs("c", &["big", "ok"]),
            Some(ViewEpochs::Current(20, 0, vec![(0, 0), (TOP_EPOCH - 1, 0)]))
        );
        state.apply_read(Instant::now(), Some(read(&[("*", "20"), ("t:ok", &below)])));
        assert_eq!(
            state.epochs("c", &["big", "ok"]),
            Some(ViewEpochs::Current(20, 0, vec![(0, 0), (TOP_EPOCH - 1, 0)]))
        );
        // A class field at the top, from a read or an announcement, needs a repair too.
        state.apply_announcement(format!("c {top}").as_bytes());
        assert_eq!(
            state.epochs("c", &[]),
            Some(ViewEpochs::Repair(vec!["c".to_owned()]))
        );
        state.apply_rebase(&["c"], 21);
        state.apply_read(Instant::now(), Some(read(&[("*", "21")])));
        assert_eq!(
            state.epochs("c", &[]),
            Some(ViewEpochs::Current(21, 0, vec![]))
        );
        // `*` at the top is an epoch like another (entries filled under it are never current)...
        state.apply_epoch("*", TOP_EPOCH);
        state.apply_read(Instant::now(), Some(read(&[("*", &top)])));
        assert_eq!(
            state.epochs("c", &[]),
            Some(ViewEpochs::Current(TOP_EPOCH, 0, vec![]))
        );
        // ...that no announcement lowers, and that a read sent after it was learned does (the hash expired).
        state.apply_announcement(b"* 30");
        assert_eq!(
            state.epochs("c", &[]),
            Some(ViewEpochs::Current(TOP_EPOCH, 0, vec![]))
        );
        state.apply_read(Instant::now(), Some(read(&[("*", "30")])));
        assert_eq!(
            state.epochs("c", &[]),
            Some(ViewEpochs::Current(30, 0, vec![]))
        );
    }

    /// Was a bug (a CI flake of `a_tag_field_next_to_the_top_is_rebased_and_a_removal_wins` on Cluster): the
    /// background read, sent before this handle's re-base and merged after it, brought the deleted `t:near`
    /// back at `TOP - 1`. The view only ever raised a field, so when the tag started again from the clock it
    /// kept `TOP - 1`: fills recorded it, and no removal of the tag reached them again.
    #[test]
    fn a_read_sent_before_a_rebase_brings_nothing_back() {
        let state = ClusterState::new(&ConnectOptions::default(), "h".into(), SlotMap::default());
        let near = (TOP_EPOCH - 1).to_string();
        state.apply_read(Instant::now(), Some(read(&[("*", "3"), ("t:near", &near)])));
        let in_flight = Instant::now();
        state.apply_rebase(&["t:near", "x:near"], 10);
        state.apply_read(in_flight, Some(read(&[("*", "3"), ("t:near", &near)])));
        assert_eq!(
            state.epochs("c", &["near"]),
            Some(ViewEpochs::Current(10, 0, vec![(0, 0)])),
            "a read sent before the re-base cannot bring the field back"
        );
        // The tag is removed again, from the clock: the next read (or a push) brings the new epoch.
        state.apply_read(Instant::now(), Some(read(&[("*", "10"), ("t:near", "50")])));
        assert_eq!(
            state.epochs("c", &["near"]),
            Some(ViewEpochs::Current(10, 0, vec![(50, 0)]))
        );
    }

    /// Found by an adversarial trial: the background reader and a caller's re-read are not serialised. Read
    /// R0 was sent before another handle's re-base, R1 after; R1 merged first, then R0 brought the deleted
    /// field back while the view counted as fresh.
    #[test]
    fn reads_merged_out_of_order_bring_nothing_back() {
        let state = ClusterState::new(&ConnectOptions::default(), "h".into(), SlotMap::default());
        let near = (TOP_EPOCH - 1).to_string();
        state.apply_read(Instant::now(), Some(read(&[("*", "3"), ("t:near", &near)])));
        let r0 = Instant::now();
        let r1 = r0 + Duration::from_millis(1);
        state.apply_read(r1, Some(read(&[("*", "10")])));
        assert_eq!(
            state.epochs("c", &["near"]),
            Some(ViewEpochs::Current(10, 0, vec![(0, 0)]))
        );
        state.apply_read(r0, Some(read(&[("*", "3"), ("t:near", &near)])));
        assert_eq!(
            state.epochs("c", &["near"]),
            Some(ViewEpochs::Current(10, 0, vec![(0, 0)])),
            "a read sent before the last merged one changes nothing"
        );
    }

    /// Another handle's re-base arrives as one announcement naming the field: the view drops it (and its
    /// sibling) and raises `*` in one step. A namespace invalidation's announcement (`*` alone) keeps the
    /// other fields and needs no read; a read sent after the view raised a field may lower it (the field was
    /// deleted and started again from the clock).
    #[test]
    fn a_rebase_announcement_drops_the_field_with_the_rise_of_the_namespace_epoch() {
        let state = ClusterState::new(&ConnectOptions::default(), "h".into(), SlotMap::default());
        let near = (TOP_EPOCH - 1).to_string();
        state.apply_read(
            Instant::now(),
            Some(read(&[("*", "3"), ("x:near", &near), ("t:ok", "5")])),
        );
        let in_flight = Instant::now();
        state.apply_announcement(b"* 10 x:near");
        assert_eq!(
            state.epochs("c", &["near", "ok"]),
            Some(ViewEpochs::Current(10, 0, vec![(0, 0), (5, 0)]))
        );
        state.apply_read(
            in_flight,
            Some(read(&[("*", "3"), ("x:near", &near), ("t:ok", "5")])),
        );
        assert_eq!(
            state.epochs("c", &["near"]),
            Some(ViewEpochs::Current(10, 0, vec![(0, 0)])),
            "nor does a read sent before the announcement arrived"
        );
        state.apply_announcement(b"* 11");
        assert_eq!(
            state.epochs("c", &["ok"]),
            Some(ViewEpochs::Current(11, 0, vec![(5, 0)]))
        );
        // Lost pushes: the view holds a value the hash lost; a read sent after it says so.
        state.apply_epoch("t:gone", 900);
        state.apply_read(
            Instant::now(),
            Some(read(&[("*", "11"), ("t:gone", "40"), ("t:ok", "5")])),
        );
        assert_eq!(
            state.epochs("c", &["gone"]),
            Some(ViewEpochs::Current(11, 0, vec![(40, 0)]))
        );
        // Malformed announcements change nothing.
        for bad in [
            &b"* 12 "[..],
            b"* 12 *",
            b"* 12 t:a t:b",
            b"t:ok 12 x:ok",
            b"* x",
            b"\xff 1",
        ] {
            state.apply_announcement(bad);
        }
        assert_eq!(
            state.epochs("c", &["ok"]),
            Some(ViewEpochs::Current(11, 0, vec![(5, 0)]))
        );
    }

    #[test]
    fn hash_tags_follow_redis() {
        assert_eq!(hash_tag("p:{a:1}:f"), "a:1");
        assert_eq!(hash_tag("foo{}{bar}"), "foo{}{bar}");
        assert_eq!(hash_tag("plain"), "plain");
    }

    #[test]
    fn moved_ranges_are_found() {
        let map = |owners: &[(u16, u16, usize)], primaries: usize| {
            let mut m = SlotMap {
                primaries: (0..primaries)
                    .map(|i| ("h".to_owned(), 7000 + u16::try_from(i).unwrap()))
                    .collect(),
                owner: vec![u16::MAX; usize::from(SLOTS)],
            };
            for &(a, b, o) in owners {
                for slot in a..=b {
                    m.owner[usize::from(slot)] = u16::try_from(o).unwrap();
                }
            }
            m
        };
        let old = map(&[(0, 5460, 0), (5461, 10922, 1), (10923, 16383, 2)], 4);
        let new = map(&[(0, 5460, 0), (5461, 10922, 3), (10923, 16383, 2)], 4);
        assert_eq!(moved_slots(&old, &new), vec![5461]);
        assert!(moved_slots(&old, &old).is_empty());
    }

    #[test]
    fn seed_urls_split_the_node_list() {
        assert_eq!(
            seed_urls("redis+cluster://u:p%40w@a:7000,b:7001").unwrap(),
            vec!["redis://u:p%40w@a:7000/", "redis://u:p%40w@b:7001/"]
        );
        assert_eq!(
            seed_urls("rediss+cluster://h/?protocol=3").unwrap(),
            vec!["rediss://h:6379/?protocol=3"]
        );
        let e = seed_urls("redis+cluster://u:s3cretPW@a:1/2").unwrap_err();
        assert!(!e.to_string().contains("s3cretPW"), "{e}");
        assert!(seed_urls("redis+cluster://a:1,,b:2").is_err());
        let e = seed_urls("redis+cluster://u:pw@h:99999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`99999` is not a port"), "{e}");
        assert_eq!(
            seed_urls("redis+cluster://[::1]:7000").unwrap(),
            vec!["redis://[::1]:7000/"]
        );
    }
}
