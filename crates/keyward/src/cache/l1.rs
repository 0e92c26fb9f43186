//! The in-process tier (L1): a size-bounded `moka` cache per class in front of the store, kept in sync across
//! instances by a **backplane** (pub/sub on the namespace's channel, sharded on Cluster).
//!
//! **The one decision to know: an instance serves from L1 only while it can vouch for it.** Every instance
//! publishes a heartbeat every quarter of `l1_max_stale` on the same channel as the invalidations, and reads
//! its own messages back. Redis delivers the messages of one channel in the order it processed them (Cluster:
//! the channel lives on one shard, whose replicas forward in order too), so when an instance receives its own
//! message sent at time `s`, every invalidation that *returned* before `s` has been applied to its L1. L1 is
//! therefore served only while the newest own message received was sent less than `l1_max_stale` ago — an
//! invalidation that returned at `t` is applied before any read that starts after `t + l1_max_stale` (see
//! `docs/cache.md` for the argument, including lost messages):
//! - **a lost message** breaks a publisher's sequence (every instance numbers its messages, heartbeats
//!   included): the next message from that publisher shows the gap and the receiver drops its whole L1;
//!   a gap in its *own* echoes (a subscription hole) does the same, as does a message from a publisher first
//!   met mid-sequence;
//! - **a dropped subscription** (`CLIENT KILL TYPE pubsub`, a reconnect) drops L1 at once; trust resumes with
//!   the echo of a message sent after the drop;
//! - **silence** (Redis paused, the subscription dead without a disconnect) makes trust lapse after
//!   `l1_max_stale`: reads go to Redis (and fail open per the class policy), and L1 is dropped before it is
//!   trusted again.
//!
//! **Fenced fills in L1:** a value read from Redis enters L1 only if no eviction touched its key (or its class)
//! and trust was not lost between the moment the read was *sent* and the insert — checked *after* inserting, so
//! an eviction racing the insert removes it either way. A load that started before an invalidation can
//! therefore never land in L1 after the invalidation's message was applied.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::wake::BackplaneSink;
use crate::client::Inner;
use crate::error::Result;
use crate::policy::L1Tier;

/// Eviction counters per key stripe: an eviction of one key only refuses in-flight inserts of keys in its
/// stripe, not of every key.
const STRIPES: usize = 1024;
/// Publishers not heard from for this long are forgotten (their sequence is no longer tracked).
const FORGET_PUBLISHER: Duration = Duration::from_secs(600);
/// Format version of a backplane message, its first word.
const VERSION: &str = "kw1";

/// What an L1 entry holds: the codec's bytes of a stored value. (Cached "absent" entries are not kept in L1:
/// their TTL is often shorter than the tier's.)
#[derive(Clone, Debug)]
pub(crate) enum L1Value {
    Value(Bytes),
}

/// The hasher of L1's table and of the fence's stripes: foldhash (randomly seeded per table), several times
/// cheaper than the standard SipHash on keys of 30–100 bytes, which a hit hashes once.
type Hasher = foldhash::fast::RandomState;

/// An L1 entry: the value and how long it may stay (the tier's `ttl`, or less if the value in the store
/// stops being fresh sooner: an in-process copy never outlives the value it copies). Cloned on every hit
/// (moka hands out clones), so it is one `Arc`.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    held: Arc<Held>,
    lifetime: Duration,
}

/// What an entry holds: the codec's bytes, and the value decoded from them once for the shared reads
/// (`Cache::get_shared`, `Cache::get_or_set_shared`), kept for the entry's life.
pub(crate) struct Held {
    bytes: Bytes,
    /// A `Memo<V, C>` of the first `(V, C)` that decoded this entry.
    decoded: OnceLock<Box<dyn Any + Send + Sync>>,
    /// The tags the entry carries, as [`TagFence`] readings taken when it was inserted.
    tags: TagMarks,
}

/// What an L1 entry knows of its tags: served only while these readings of the [`TagFence`] still hold.
#[derive(Debug)]
enum TagMarks {
    /// Its tags are not known (a copy made where the stored envelope was not at hand): any tag's
    /// invalidation drops it. The reading of [`TagFence::any`].
    Unknown(u64),
    /// It carries exactly these tags (possibly none): `(stripe, reading)` per tag.
    Known(Box<[(usize, u64)]>),
}

/// A value decoded as `V` by codec `C`: the type a [`Held`] memo is looked up by, so that two `Cache`s of one
/// class with different value types or codecs never see each other's decoding.
struct Memo<V, C> {
    value: Arc<V>,
    _codec: PhantomData<fn() -> C>,
}

impl Held {
    /// The codec's bytes of the value.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The entry's value decoded as `V` by codec `C`: decoded on the first call with this `(V, C)` and then
    /// shared; `decode` runs again only for another `(V, C)` than the first one that decoded the entry.
    ///
    /// # Errors
    /// `decode`'s error (nothing is kept then).
    pub(crate) fn shared<V, C, E>(
        &self,
        decode: impl FnOnce(&[u8]) -> std::result::Result<V, E>,
    ) -> std::result::Result<Arc<V>, E>
    where
        V: Send + Sync + 'static,
        C: 'static,
    {
        if let Some(memo) = self.decoded.get() {
            return match memo.downcast_ref::<Memo<V, C>>() {
                Some(memo) => Ok(Arc::clone(&memo.value)),
                None => decode(&self.bytes).map(Arc::new),
            };
        }
        let value = Arc::new(decode(&self.bytes)?);
        // Another caller may have decoded it meanwhile: either copy serves (both decode the same bytes).
        let _ = self.decoded.set(Box::new(Memo::<V, C> {
            value: Arc::clone(&value),
            _codec: PhantomData,
        }));
        Ok(value)
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("bytes", &self.bytes.len())
            .field("decoded", &self.decoded.get().is_some())
            .field("tags", &self.tags)
            .finish()
    }
}

/// Tag stripes: a tag's invalidation bumps its stripe (and [`any`](Self::any)); an entry records the
/// stripes of its tags when it is inserted and is served only while none of them moved. Two tags may share
/// a stripe: the invalidation of one then also drops entries carrying the other (never the reverse error).
const TAG_STRIPES: usize = 4096;

/// Counters that names (keys, tags) hash to: a bump for one name moves its stripe, and so also every other
/// name sharing it (a conservative error: a copy or an insert refused without need, never one kept).
struct Stripes {
    cells: Box<[AtomicU64]>,
    hasher: Hasher,
}

impl Stripes {
    fn new(n: usize) -> Self {
        Stripes {
            cells: (0..n).map(|_| AtomicU64::new(0)).collect(),
            hasher: Hasher::default(),
        }
    }

    /// The stripe of `name`.
    fn index(&self, name: &[u8]) -> usize {
        // The stripe count is far below u64::MAX; the cast keeps the low bits.
        #[allow(clippy::cast_possible_truncation)]
        let i = (self.hasher.hash_one(name) as usize) % self.cells.len();
        i
    }

    fn of(&self, name: &[u8]) -> &AtomicU64 {
        &self.cells[self.index(name)]
    }
}

/// The handle's tag fence (namespace-wide: tags cross classes). See [`TagMarks`].
struct TagFence {
    /// Bumped by every tag invalidation: what entries with unknown tags are checked against.
    any: AtomicU64,
    stripes: Stripes,
}

impl TagFence {
    fn new() -> Self {
        TagFence {
            any: AtomicU64::new(0),
            stripes: Stripes::new(TAG_STRIPES),
        }
    }

    fn stripe(&self, tag: &[u8]) -> usize {
        self.stripes.index(tag)
    }

    /// A tag's invalidation: its stripe first, then `any`.
    fn bump(&self, tag: &str) {
        self.stripes
            .of(tag.as_bytes())
            .fetch_add(1, Ordering::SeqCst);
        self.any.fetch_add(1, Ordering::SeqCst);
    }

    /// The readings for an entry carrying `tags` (`None`: not known).
    fn marks<'t>(&self, tags: Option<impl Iterator<Item = &'t [u8]>>) -> TagMarks {
        match tags {
            None => TagMarks::Unknown(self.any.load(Ordering::SeqCst)),
            Some(tags) => TagMarks::Known(
                tags.map(|t| {
                    let i = self.stripe(t);
                    (i, self.stripes.cells[i].load(Ordering::SeqCst))
                })
                .collect(),
            ),
        }
    }

    /// Whether no tag of an entry with these readings was invalidated since.
    fn holds(&self, marks: &TagMarks) -> bool {
        match marks {
            TagMarks::Unknown(any) => self.any.load(Ordering::SeqCst) == *any,
            TagMarks::Known(marks) => marks
                .iter()
                .all(|&(i, v)| self.stripes.cells[i].load(Ordering::SeqCst) == v),
        }
    }
}

/// The tags of a value being inserted into L1, when known.
#[derive(Clone, Copy, Debug)]
pub(crate) enum InsertTags<'a> {
    /// Not known: any tag invalidation drops the copy.
    Unknown,
    /// The tags the call filled it with.
    Names(&'a [String]),
    /// The tags recorded in the stored envelope it was read from.
    Stored(&'a StoredTags),
}

/// The tag names of a stored value, read from its envelope (owned: the envelope's bytes are gone by the time
/// the copy is inserted).
#[derive(Debug, Default, Clone)]
pub(crate) struct StoredTags(pub(crate) Vec<Vec<u8>>);

/// Per-entry lifetimes for moka.
struct Lifetime;

impl moka::Expiry<String, Slot> for Lifetime {
    fn expire_after_create(&self, _: &String, slot: &Slot, _: Instant) -> Option<Duration> {
        Some(slot.lifetime)
    }
}

/// What an invalidation changed, as it travels on the backplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Nothing; proves the channel is alive and carries the publisher's sequence.
    Heartbeat,
    /// One entry of a class (invalidated or overwritten).
    Key { class: String, key: String },
    /// Every entry of a class.
    Class { class: String },
    /// Every entry of the namespace.
    Namespace,
    /// Every entry carrying a tag.
    Tag { tag: String },
}

impl Event {
    fn encode(&self, instance: u64, seq: u64) -> String {
        let head = format!("{VERSION} {instance:016x} {seq}");
        match self {
            Event::Heartbeat => format!("{head} h"),
            Event::Key { class, key } => format!("{head} k {class} {key}"),
            Event::Class { class } => format!("{head} c {class}"),
            Event::Namespace => format!("{head} n"),
            Event::Tag { tag } => format!("{head} t {tag}"),
        }
    }

    /// `(instance, seq, event)`; `None` for a message this version does not understand.
    fn decode(payload: &[u8]) -> Option<(u64, u64, Event)> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(5, ' ');
        if parts.next()? != VERSION {
            return None;
        }
        let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
        let seq = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        // The rest may contain spaces (keys and tags do).
        let rest = parts.next();
        let event = match (kind, rest) {
            ("h", None) => Event::Heartbeat,
            ("n", None) => Event::Namespace,
            ("c", Some(class)) => Event::Class {
                class: class.to_owned(),
            },
            ("t", Some(tag)) => Event::Tag {
                tag: tag.to_owned(),
            },
            ("k", Some(rest)) => {
                let (class, key) = rest.split_once(' ')?;
                Event::Key {
                    class: class.to_owned(),
                    key: key.to_owned(),
                }
            }
            _ => return None,
        };
        Some((instance, seq, event))
    }
}

/// Counters that refuse an insert whose read raced an eviction.
struct Fence {
    all: AtomicU64,
    stripes: Stripes,
}

/// A fence reading taken before a read was sent; an insert is allowed only if it still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    trust: u64,
    all: u64,
    stripe: u64,
}

impl Fence {
    fn new() -> Self {
        Fence {
            all: AtomicU64::new(0),
            stripes: Stripes::new(STRIPES),
        }
    }

    fn stripe(&self, key: &str) -> &AtomicU64 {
        self.stripes.of(key.as_bytes())
    }
}

/// One class's L1 on one handle.
pub(crate) struct ClassL1 {
    class: String,
    cache: moka::future::Cache<String, Slot, Hasher>,
    fence: Fence,
    max_stale: Duration,
    /// The tier's `ttl`: the longest an entry stays.
    ttl: Duration,
    hub: Arc<Hub>,
}

impl ClassL1 {
    /// The entry for `key`, if L1 may serve it now.
    pub(crate) async fn get(&self, key: &str) -> Option<L1Value> {
        self.get_held(key)
            .await
            .map(|held| L1Value::Value(held.bytes.clone()))
    }

    /// The entry for `key` with its decoded-value memo (see [`Held::shared`]), if L1 may serve it now.
    pub(crate) async fn get_held(&self, key: &str) -> Option<Arc<Held>> {
        if !self.hub.vouched(self.max_stale) {
            return None;
        }
        let hit = self
            .cache
            .get(key)
            .await
            .map(|slot| slot.held)
            .filter(|held| self.hub.tags.holds(&held.tags));
        // A hit never waits on I/O: without a yield point, a task reading L1 in a loop would keep the
        // runtime's threads from the backplane's heartbeats until trust lapses. This yields only once the
        // task's cooperative budget is spent.
        tokio::task::coop::consume_budget().await;
        hit
    }

    /// Read the fence before sending the read whose result may be inserted.
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        Ticket {
            trust: self.hub.trust_gen.load(Ordering::SeqCst),
            all: self.fence.all.load(Ordering::SeqCst),
            stripe: self.fence.stripe(key).load(Ordering::SeqCst),
        }
    }

    fn still(&self, key: &str, t: Ticket) -> bool {
        self.ticket(key) == t && self.hub.vouched(self.max_stale)
    }

    /// Insert a value read from the store under `ticket`, unless an eviction or a loss of trust came between.
    /// `fresh_for`: how long the stored value stays fresh, when known (the entry lives no longer).
    /// `tags`: what the value carries, when known (a tag's invalidation then drops only copies carrying it;
    /// an unknown copy is dropped by any tag's).
    pub(crate) async fn insert(
        &self,
        key: &str,
        value: L1Value,
        ticket: Ticket,
        fresh_for: Option<Duration>,
        tags: InsertTags<'_>,
    ) {
        if !self.still(key, ticket) {
            return;
        }
        let lifetime = fresh_for.map_or(self.ttl, |f| f.min(self.ttl));
        if lifetime.is_zero() {
            return;
        }
        let L1Value::Value(bytes) = value;
        // Read after the ticket held: a tag invalidation between the ticket and here also moved the class's
        // fence (see `Hub::apply`), so the check after the insert removes this copy; one after the readings
        // shows in them.
        let fence = &self.hub.tags;
        let tags = match tags {
            InsertTags::Unknown => fence.marks(None::<std::iter::Empty<&[u8]>>),
            InsertTags::Names(names) => fence.marks(Some(names.iter().map(String::as_bytes))),
            InsertTags::Stored(stored) => fence.marks(Some(stored.0.iter().map(Vec::as_slice))),
        };
        let held = Arc::new(Held {
            bytes,
            decoded: OnceLock::new(),
            tags,
        });
        self.cache
            .insert(key.to_owned(), Slot { held, lifetime })
            .await;
        // Checked again after the insert: an eviction bumps the fence *before* removing, so either it sees
        // (and removes) our entry, or we see its bump here and remove it ourselves.
        if !self.still(key, ticket) {
            self.cache.invalidate(key).await;
        }
    }

    /// Drop one entry (its invalidation was applied).
    pub(crate) async fn evict(&self, key: &str) {
        self.fence.stripe(key).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(key).await;
    }

    /// Refuse every insert of the class whose read was sent before now (a tag invalidation: which keys
    /// carry the tag is known only once their values are read).
    fn refuse_in_flight(&self) {
        self.fence.all.fetch_add(1, Ordering::SeqCst);
    }

    /// Drop every entry of the class.
    pub(crate) fn evict_all(&self) {
        self.fence.all.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }
}

/// Own messages sent and not yet received back.
#[derive(Default)]
struct Echoes {
    /// `(seq, sent at)`, oldest first.
    pending: VecDeque<(u64, Instant)>,
}

/// The handle's backplane state: its identity and sequence, what it can vouch for, the sequences of the other
/// publishers, and the L1 of every class.
pub(crate) struct Hub {
    instance: u64,
    seq: AtomicU64,
    /// Whether the backend is shared (Redis): without it (embedded) L1 is always vouched for.
    remote: AtomicBool,
    base: Instant,
    /// ns since `base` at which the newest own message received back was sent; 0: none since the last loss.
    echoed_sent: AtomicU64,
    /// Bumped on every loss of trust (a gap, a dropped subscription, a lapse): refuses in-flight inserts.
    trust_gen: AtomicU64,
    echoes: Mutex<Echoes>,
    publishers: Mutex<HashMap<u64, (u64, Instant)>>,
    classes: Mutex<HashMap<String, Arc<ClassL1>>>,
    /// The smallest `l1_max_stale` of the classes with L1, in ns (0 before the first one).
    min_max_stale: AtomicU64,
    heartbeat: AtomicBool,
    /// Held from numbering a message until Redis answered its publish, so that messages reach the channel in
    /// the order of their sequence numbers (concurrent publishes on one multiplexed connection may not).
    sending: tokio::sync::Mutex<()>,
    /// Whether [`hub`] connected it to the handle's subscription.
    wired: AtomicBool,
    losses: AtomicU64,
    /// The handle's single-flight table: an applied invalidation also detaches the loads it makes stale, so a
    /// caller arriving after it never shares a load that started before (set by [`hub`]).
    flights: std::sync::OnceLock<Arc<crate::flight::Flights>>,
    /// Pushes from the subscription, applied in arrival order by one task (started on first use).
    inbox: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Inbound>>>,
    /// What tag invalidations moved, for the entries that carry those tags.
    tags: TagFence,
}

/// What the subscription delivered.
#[derive(Debug)]
pub(crate) enum Inbound {
    Message(Bytes),
    Disconnected,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            instance: rand::random::<u64>() | 1,
            seq: AtomicU64::new(0),
            remote: AtomicBool::new(false),
            base: Instant::now(),
            echoed_sent: AtomicU64::new(0),
            trust_gen: AtomicU64::new(0),
            echoes: Mutex::default(),
            publishers: Mutex::default(),
            classes: Mutex::default(),
            min_max_stale: AtomicU64::new(0),
            heartbeat: AtomicBool::new(false),
            wired: AtomicBool::new(false),
            sending: tokio::sync::Mutex::new(()),
            losses: AtomicU64::new(0),
            inbox: Mutex::default(),
            flights: std::sync::OnceLock::new(),
            tags: TagFence::new(),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Hub {
    /// Mark the hub as fed by a shared store's backplane (called when a Redis backend is connected).
    pub(crate) fn set_remote(&self) {
        self.remote.store(true, Ordering::SeqCst);
    }

    fn since_base(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.base)).max(1)
    }

    /// Whether L1 may be served with this bound: every invalidation that returned more than `max_stale` ago
    /// has been applied.
    pub(crate) fn vouched(&self, max_stale: Duration) -> bool {
        if !self.remote.load(Ordering::Relaxed) {
            return true;
        }
        let sent = self.echoed_sent.load(Ordering::SeqCst);
        sent != 0 && self.since_base(Instant::now()).saturating_sub(sent) < nanos(max_stale)
    }

    #[cfg(test)]
    /// How many times L1 was dropped because trust was lost (gaps, dropped subscriptions, lapses).
    pub(crate) fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// The L1 of `class`, created on first use (one per handle and class, shared by every `Cache` of it).
    pub(crate) fn class(
        self: &Arc<Self>,
        class: &str,
        tier: L1Tier,
        max_stale: Duration,
    ) -> Arc<ClassL1> {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = classes.get(class) {
            return Arc::clone(c);
        }
        let cache = moka::future::Cache::builder()
            .max_capacity(tier.capacity_bytes())
            .weigher(|k: &String, v: &Slot| {
                // moka's own bookkeeping per entry, roughly. A decoded copy kept by the shared reads is not
                // counted (it does not exist yet when the entry is weighed).
                let len = k.len() + v.held.bytes.len() + 64;
                u32::try_from(len).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetime)
            .build_with_hasher(Hasher::default());
        let l1 = Arc::new(ClassL1 {
            class: class.to_owned(),
            cache,
            fence: Fence::new(),
            max_stale,
            ttl: tier.ttl(),
            hub: Arc::clone(self),
        });
        classes.insert(class.to_owned(), Arc::clone(&l1));
        let ms = nanos(max_stale);
        let _ = self
            .min_max_stale
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur == 0 || ms < cur).then_some(ms)
            });
        l1
    }

    /// Whether any class of this handle has an L1.
    pub(crate) fn any_class(&self) -> bool {
        self.min_max_stale.load(Ordering::Relaxed) != 0
    }

    fn each_class(&self, f: impl Fn(&ClassL1)) {
        let classes: Vec<Arc<ClassL1>> = self
            .classes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in classes {
            f(&c);
        }
    }

    /// Drop every L1 entry and refuse every in-flight insert.
    fn drop_all(&self, why: &'static str) {
        self.trust_gen.fetch_add(1, Ordering::SeqCst);
        self.each_class(ClassL1::evict_all);
        if self.any_class() {
            self.losses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keyward_cache_l1_drops_total", "reason" => why).increment(1);
            tracing::debug!(reason = why, "keyward: L1 dropped");
        }
    }

    /// Hand a push over from the subscription's callback (which must not block); applied in order by the
    /// hub's task. Outside a tokio runtime the push is dropped, and a disconnection applied at once.
    pub(crate) fn feed(self: &Arc<Self>, push: Inbound) {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox
            .as_ref()
            .is_none_or(tokio::sync::mpsc::UnboundedSender::is_closed)
        {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                drop(inbox);
                if matches!(push, Inbound::Disconnected) {
                    self.on_disconnect();
                }
                return;
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let hub = Arc::downgrade(self);
            rt.spawn(async move {
                while let Some(push) = rx.recv().await {
                    let Some(hub) = hub.upgrade() else { return };
                    match push {
                        Inbound::Message(m) => hub.on_message(&m).await,
                        Inbound::Disconnected => hub.on_disconnect(),
                    }
                }
            });
            *inbox = Some(tx);
        }
        if let Some(tx) = inbox.as_ref() {
            let _ = tx.send(push);
        }
    }

    /// The subscription was dropped (or reconnected): messages may have been missed.
    pub(crate) fn on_disconnect(&self) {
        self.echoed_sent.store(0, Ordering::SeqCst);
        self.echoes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .clear();
        self.drop_all("disconnect");
    }

    /// Apply `event` to this handle's L1 (the local half of an invalidation, or a received one).
    pub(crate) async fn apply(&self, event: &Event) {
        if let Some(flights) = self.flights.get() {
            match event {
                Event::Heartbeat => {}
                Event::Key { key, .. } => {
                    flights.detach(&super::flight_key(key, true));
                    flights.detach(&super::flight_key(key, false));
                }
                Event::Class { .. } | Event::Namespace | Event::Tag { .. } => flights.detach_all(),
            }
        }
        match event {
            Event::Heartbeat => {}
            Event::Key { class, key } => {
                let l1 = self
                    .classes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(class)
                    .cloned();
                if let Some(l1) = l1 {
                    l1.evict(key).await;
                }
            }
            Event::Class { class } => {
                let l1 = self
                    .classes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(class)
                    .cloned();
                if let Some(l1) = l1 {
                    l1.evict_all();
                }
            }
            Event::Namespace => self.each_class(ClassL1::evict_all),
            // Entries record their tags (or that they are unknown): the tag's stripe drops those carrying it,
            // at their next read. Which reads in flight carry it is not known: all of them are refused, the
            // class fences first, so that an insert that passed its last check before the stripe moved was
            // inserted with readings the stripe then invalidates.
            Event::Tag { tag } => {
                self.each_class(ClassL1::refuse_in_flight);
                self.tags.bump(tag);
            }
        }
    }

    /// A message arrived on the backplane channel.
    pub(crate) async fn on_message(&self, payload: &[u8]) {
        let Some((instance, seq, event)) = Event::decode(payload) else {
            tracing::debug!("keyward: unreadable backplane message ignored");
            return;
        };
        if instance == self.instance {
            self.on_echo(seq);
            return;
        }
        let gap = {
            let now = Instant::now();
            let mut pubs = self.publishers.lock().unwrap_or_else(|e| e.into_inner());
            let gap = match pubs.insert(instance, (seq, now)) {
                Some((last, _)) => seq != last + 1,
                // Met mid-sequence: what came before may have been missed.
                None => seq != 1,
            };
            if pubs.len() > 1024 {
                pubs.retain(|_, (_, at)| now.duration_since(*at) < FORGET_PUBLISHER);
            }
            gap
        };
        if gap {
            self.drop_all("gap");
        } else {
            self.apply(&event).await;
        }
    }

    /// One of our own messages came back.
    fn on_echo(&self, seq: u64) {
        let sent = {
            let mut echoes = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
            let mut skipped = false;
            let mut sent = None;
            while let Some(&(s, at)) = echoes.pending.front() {
                if s > seq {
                    break;
                }
                echoes.pending.pop_front();
                if s == seq {
                    sent = Some(at);
                } else {
                    skipped = true;
                }
            }
            if skipped {
                // A hole in our own subscription: other publishers' messages may have fallen in it too.
                drop(echoes);
                self.drop_all("own_gap");
                return;
            }
            sent
        };
        let Some(sent) = sent else { return };
        let sent = self.since_base(sent);
        let bound = self.min_max_stale.load(Ordering::SeqCst);
        let prev = self.echoed_sent.load(Ordering::SeqCst);
        // Trust had lapsed (or was never there): messages may have been lost meanwhile without a gap we can
        // see, so start from an empty L1.
        // (With no trust at all, L1 was emptied when it was lost and nothing was inserted since.)
        if prev != 0 && self.since_base(Instant::now()).saturating_sub(prev) >= bound {
            self.drop_all("lapse");
        }
        self.echoed_sent.fetch_max(sent, Ordering::SeqCst);
    }

    /// The next own message, recorded as awaiting its echo.
    fn stamp(&self, event: &Event) -> String {
        let mut echoes = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        echoes.pending.push_back((seq, Instant::now()));
        if echoes.pending.len() > 4096 {
            echoes.pending.pop_front();
        }
        event.encode(self.instance, seq)
    }

    /// Publish `event` (and apply it locally first). The remote half is skipped on the embedded backend.
    ///
    /// # Errors
    /// Backend failures: other instances will notice the missing sequence number at this instance's next
    /// message and drop their L1.
    ///
    /// Cancellation-safe: the publish runs in its own task, started before this function first waits, so a
    /// caller dropped after its store write still announces it (a silent drop would leave other instances'
    /// L1 stale with no gap to notice).
    pub(crate) async fn publish(self: &Arc<Self>, kw: &crate::Keyward, event: Event) -> Result<()> {
        let sent = if self.remote.load(Ordering::Relaxed) {
            let (hub, kw, event) = (Arc::clone(self), kw.clone(), event.clone());
            Some(tokio::spawn(
                async move { hub.send(&kw.inner, &event).await },
            ))
        } else {
            None
        };
        self.apply(&event).await;
        match sent {
            None => Ok(()),
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(crate::Error::InvalidArgument {
                    what: format!("the backplane publish task failed: {e}"),
                })
            }),
        }
    }

    /// Number `event` and publish it, in sequence order.
    async fn send(&self, inner: &Inner, event: &Event) -> Result<()> {
        let _order = self.sending.lock().await;
        let message = self.stamp(event);
        inner
            .backend
            .publish_backplane(&inner.ns.backplane, message.as_bytes())
            .await
    }

    /// Start the heartbeat task once (Redis only): a message every quarter of the smallest `l1_max_stale`,
    /// a re-subscription when own messages stop coming back, and the lapse check.
    pub(crate) fn start_heartbeat(self: &Arc<Self>, inner: &Arc<Inner>) {
        if !self.remote.load(Ordering::Relaxed) || self.heartbeat.swap(true, Ordering::SeqCst) {
            return;
        }
        let hub = Arc::downgrade(self);
        let handle: Weak<Inner> = Arc::downgrade(inner);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.heartbeat.store(false, Ordering::SeqCst);
            return;
        };
        rt.spawn(async move {
            let mut silent_ticks = 0u32;
            loop {
                let (Some(hub), Some(inner)) = (hub.upgrade(), handle.upgrade()) else {
                    return;
                };
                let bound = Duration::from_nanos(hub.min_max_stale.load(Ordering::SeqCst).max(1));
                let tick = (bound / 4).max(Duration::from_millis(5));
                let echoed = hub.echoed_sent.load(Ordering::SeqCst);
                let age = hub.since_base(Instant::now()).saturating_sub(echoed);
                if echoed != 0 && age >= nanos(bound) {
                    // Lapsed: stop vouching now (readers already stopped) and start empty when trust is back.
                    hub.echoed_sent.store(0, Ordering::SeqCst);
                    hub.drop_all("lapse");
                }
                if age >= nanos(tick * 2) || echoed == 0 {
                    silent_ticks += 1;
                } else {
                    silent_ticks = 0;
                }
                if silent_ticks >= 3 {
                    // Our messages stopped coming back: make sure we are (still) subscribed.
                    silent_ticks = 0;
                    inner
                        .backend
                        .resubscribe_backplane(&inner.ns.backplane)
                        .await;
                }
                let _ = hub.send(&inner, &Event::Heartbeat).await;
                drop(inner);
                drop(hub);
                tokio::time::sleep(tick).await;
            }
        });
    }
}

/// The handle's hub, created (and wired to the subscription) on first use: when the first class with L1 is
/// opened, or the first invalidation that must reach other instances' L1 is made.
pub(crate) fn hub(kw: &crate::Keyward) -> Arc<Hub> {
    let hub = kw.shared::<Hub>();
    if !hub.wired.swap(true, Ordering::SeqCst) {
        let _ = hub.flights.set(kw.shared::<crate::flight::Flights>());
        if kw.inner.backend.kind() == crate::BackendKind::Redis {
            hub.set_remote();
        }
        kw.inner.bus.set_backplane(Arc::new(Sink(Arc::clone(&hub))));
    }
    hub
}

/// The hub as the subscription's backplane receiver.
pub(crate) struct Sink(pub(crate) Arc<Hub>);

impl BackplaneSink for Sink {
    fn message(&self, payload: Bytes) {
        self.0.feed(Inbound::Message(payload));
    }

    fn disconnected(&self) {
        self.0.feed(Inbound::Disconnected);
    }
}

impl std::fmt::Debug for ClassL1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassL1")
            .field("class", &self.class)
            .field("max_stale", &self.max_stale)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for e in [
            Event::Heartbeat,
            Event::Namespace,
            Event::Class {
                class: "product".into(),
            },
            Event::Key {
                class: "product".into(),
                key: "dev:shop:product:v1:{a b}:c".into(),
            },
            Event::Tag {
                tag: "category: 7".into(),
            },
        ] {
            let m = e.encode(0xabc, 42);
            assert_eq!(Event::decode(m.as_bytes()), Some((0xabc, 42, e)), "{m}");
        }
        for bad in [
            "",
            "kw1",
            "kw2 1 1 h",
            "kw1 zz 1 h",
            "kw1 1 x h",
            "kw1 1 1 q",
            "kw1 1 1 k a",
        ] {
            assert_eq!(Event::decode(bad.as_bytes()), None, "{bad}");
        }
    }

    fn remote_hub() -> Arc<Hub> {
        let hub = Arc::new(Hub::default());
        hub.set_remote();
        hub
    }

    fn tier() -> L1Tier {
        L1Tier::new(1 << 20, Duration::from_secs(60))
    }

    #[test]
    fn a_shared_read_decodes_once_per_entry_and_type() {
        let held = Held {
            bytes: Bytes::from_static(b"42"),
            decoded: OnceLock::new(),
            tags: TagMarks::Known(Box::new([])),
        };
        let decodes = std::cell::Cell::new(0);
        let parse = |b: &[u8]| {
            decodes.set(decodes.get() + 1);
            std::str::from_utf8(b).unwrap().parse::<u64>()
        };
        let a = held.shared::<u64, (), _>(parse).unwrap();
        let b = held.shared::<u64, (), _>(parse).unwrap();
        assert_eq!((*a, decodes.get()), (42, 1));
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second read shares the first decoding"
        );
        // Another value type (or codec) decodes for itself, never gets the first one's value.
        let s = held
            .shared::<String, (), _>(|b| Ok::<_, ()>(String::from_utf8_lossy(b).into_owned()))
            .unwrap();
        assert_eq!(*s, "42");
        let c = held.shared::<u64, u8, _>(parse).unwrap();
        assert_eq!((*c, decodes.get()), (42, 2));
        assert!(!Arc::ptr_eq(&a, &c));
        // A failed decoding is not kept.
        let bad = Held {
            bytes: Bytes::from_static(b"x"),
            decoded: OnceLock::new(),
            tags: TagMarks::Known(Box::new([])),
        };
        assert!(bad.shared::<u64, (), _>(parse).is_err());
        assert!(bad.decoded.get().is_none());
    }

    #[test]
    fn a_tag_bump_moves_the_copies_carrying_it_and_those_with_unknown_tags() {
        let fence = TagFence::new();
        let y = (0..100)
            .map(|i| format!("y{i}"))
            .find(|y| fence.stripe(y.as_bytes()) != fence.stripe(b"x"))
            .unwrap();
        let names = |tags: &[&str]| {
            fence.marks(Some(
                tags.iter()
                    .map(|t| t.as_bytes())
                    .collect::<Vec<_>>()
                    .into_iter(),
            ))
        };
        let (x_copy, y_copy, none) = (names(&["x"]), names(&[y.as_str()]), names(&[]));
        let both = names(&["x", y.as_str()]);
        let unknown = fence.marks(None::<std::iter::Empty<&[u8]>>);
        for m in [&x_copy, &y_copy, &none, &both, &unknown] {
            assert!(fence.holds(m), "{m:?}");
        }
        fence.bump("x");
        assert!(!fence.holds(&x_copy));
        assert!(!fence.holds(&both));
        assert!(
            !fence.holds(&unknown),
            "a copy of unknown tags goes with any tag"
        );
        assert!(fence.holds(&y_copy));
        assert!(fence.holds(&none));
        // Copies made after the bump hold until the next one.
        assert!(fence.holds(&names(&["x"])));
    }

    #[tokio::test]
    async fn not_vouched_until_an_own_message_comes_back() {
        let hub = remote_hub();
        let l1 = hub.class("c", tier(), Duration::from_secs(5));
        assert!(!hub.vouched(Duration::from_secs(5)));
        let t = l1.ticket("k");
        l1.insert(
            "k",
            L1Value::Value(Bytes::from_static(b"v")),
            t,
            None,
            InsertTags::Unknown,
        )
        .await;
        assert!(l1.get("k").await.is_none());
        let m = hub.stamp(&Event::Heartbeat);
        hub.on_message(m.as_bytes()).await;
        assert!(hub.vouched(Duration::from_secs(5)));
        let t = l1.ticket("k");
        l1.insert(
            "k",
            L1Value::Value(Bytes::from_static(b"v")),
            t,
            None,
            InsertTags::Unknown,
        )
        .await;
        assert!(l1.get("k").await.is_some());
    }

    #[tokio::test]
    async fn an_eviction_after_the_ticket_refuses_the_insert() {
        let hub = Arc::new(Hub::default());
        let l1 = hub.class("c", tier(), Duration::from_secs(5));
        let t = l1.ticket("k");
        l1.evict("k").await;
        l1.insert(
            "k",
            L1Value::Value(Bytes::from_static(b"v")),
            t,
            None,
            InsertTags::Unknown,
        )
        .await;
        assert!(l1.get("k").await.is_none());
        let t = l1.ticket("k");
        hub.apply(&Event::Class { class: "c".into() }).await;
        l1.insert(
            "k",
            L1Value::Value(Bytes::from_static(b"v")),
            t,
            None,
            InsertTags::Unknown,
        )
        .await;
        assert!(l1.get("k").await.is_none());
        let t = l1.ticket("k");
        l1.insert(
            "k",
            L1Value::Value(Bytes::from_static(b"v")),
            t,
            None,
            InsertTags::Unknown,
        )
        .await;
        assert!(l1.get("k").await.is_some());
    }

    #[tokio::test]
    async fn gaps_and_disconnects_drop_everything() {
        let hub = remote_hub();
        let l1 = hub.class("c", tier(), Duration::from_secs(5));
        let echo = hub.stamp(&Event::Heartbeat);
        hub.on_message(echo.as_bytes()).await;
        let fill = |l1: Arc<ClassL1>| async move {
            let t = l1.ticket("k");
            l1.insert(
                "k",
                L1Value::Value(Bytes::from_static(b"v")),
                t,
                None,
                InsertTags::Unknown,
            )
            .await;
            assert!(l1.get("k").await.is_some());
        };
        fill(Arc::clone(&l1)).await;
        // Another publisher, in sequence: applied, nothing else dropped.
        let other = |seq| Event::Heartbeat.encode(7, seq);
        hub.on_message(other(1).as_bytes()).await;
        hub.on_message(other(2).as_bytes()).await;
        assert!(l1.get("k").await.is_some());
        // Message 3 lost.
        hub.on_message(other(4).as_bytes()).await;
        assert!(l1.get("k").await.is_none());
        fill(Arc::clone(&l1)).await;
        // A publisher met mid-sequence.
        hub.on_message(Event::Heartbeat.encode(9, 5).as_bytes())
            .await;
        assert!(l1.get("k").await.is_none());
        fill(Arc::clone(&l1)).await;
        // Our own message 2 never came back, 3 did: a hole in our subscription.
        let _lost = hub.stamp(&Event::Heartbeat);
        let back = hub.stamp(&Event::Heartbeat);
        hub.on_message(back.as_bytes()).await;
        assert!(l1.get("k").await.is_none());
        fill(Arc::clone(&l1)).await;
        hub.on_disconnect();
        assert!(l1.get("k").await.is_none());
        assert!(!hub.vouched(Duration::from_secs(5)));
        assert_eq!(hub.losses(), 4);
    }
}
