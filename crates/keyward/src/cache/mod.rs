//! Cache-aside with fenced fills and fleet-wide stampede protection.
//!
//! The decision a reader must know: **a fill can only land while its lease is still held.** A miss takes a fill
//! lease (one round trip: value *or* lease); the holder loads from the source and commits with a
//! second script that writes only if its lease is still there. Invalidation deletes the entry — value or lease —
//! so a fill that started before an invalidation is refused and the next reader loads fresh data. Group
//! invalidation (a class, the namespace) bumps an epoch that every value carries, in O(1).
//!
//! Around that: one fetch per key per process (single-flight), callers that find the lease held elsewhere wait
//! to be *woken* by the commit (pub/sub on Redis), and a holder that dies simply lets its lease expire, after
//! which exactly one waiter takes over.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Histogram};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::Keyward;
pub(crate) mod l1;
pub(crate) mod many;
mod store;
mod tags;
pub(crate) mod write_behind;

use self::l1::{ClassL1, Event, L1Value};
use self::store::{Entry, Fetched};
use crate::backend::Watch;
use crate::codec::{Codec, Json};
use crate::envelope::{self, Body, Stamp};
use crate::error::{BoxError, Error, Result};
use crate::flight::{self, Flights, Leader, Outcome, Role, Shared};
use crate::key::{IdParts, KeySpace};
use crate::policy::{CacheClass, CacheOnError, ClassKind};

/// Undecodable values healed in a row before a fetch gives up on the stored entry and loads uncached.
const MAX_HEALS: u32 = 3;

/// Per-class counters, registered once per handle (the `metrics` facade; install any recorder).
pub(crate) struct CacheMetrics {
    hits: Tally,
    /// L1 hits have a [`Striped`] total rather than a [`Tally`]'s single atomic (see [`l1_hit`](Self::l1_hit)).
    l1_hits: Counter,
    l1_hits_total: Arc<Striped>,
    misses: Tally,
    negative_hits: Tally,
    coalesced: Tally,
    loader_calls: Tally,
    loader_errors: Tally,
    lease_waits: Tally,
    fills_refused: Tally,
    decode_errors: Tally,
    fail_open: Tally,
    stale_served: Tally,
    refreshes: Tally,
    loader_seconds: Histogram,
}

/// One counter, twice: the `metrics` counter (for an exporter) and this handle's own total (for
/// [`Cache::stats`]).
struct Tally {
    counter: Counter,
    total: Arc<AtomicU64>,
}

impl Tally {
    fn increment(&self, n: u64) {
        self.counter.increment(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }
}

impl CacheMetrics {
    /// One read answered by L1: counted as a hit and an L1 hit in the metrics, and with one add to a
    /// [`Striped`] total (L1 hits are added to `hits` when a snapshot is taken, see [`ClassTotals::hits`]).
    pub(crate) fn l1_hit(&self) {
        self.hits.counter.increment(1);
        self.l1_hits.increment(1);
        self.l1_hits_total.add(1);
    }
}

/// A total that many threads add to at once, kept in one cache-padded cell per stripe: threads add to
/// their own stripe, so that the L1 hit path (millions of adds per second from every core) does not bounce
/// one cache line between cores; a read sums the stripes. Relaxed, like every total of
/// [`Cache::stats`]: a snapshot taken while adds run may miss the latest of them.
#[derive(Default)]
struct Striped([crossbeam_utils::CachePadded<AtomicU64>; STRIPES]);

/// Stripes of a [`Striped`] total: enough that the threads of a common runtime rarely share one.
const STRIPES: usize = 16;

impl Striped {
    fn add(&self, n: u64) {
        use std::cell::Cell;
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            /// This thread's stripe: threads take them in turn as they first add.
            static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        let i = STRIPE.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
            }
            s.get()
        });
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Per-handle totals of every cache class, so that all `Cache` values of one class share them.
#[derive(Default)]
struct StatsTable(std::sync::Mutex<std::collections::HashMap<String, Arc<ClassTotals>>>);

/// One class's totals.
#[derive(Default)]
struct ClassTotals {
    /// Hits answered by the store; [`CacheStats::hits`] is this plus `l1_hits` (an L1 hit, the hot path,
    /// adds to one total only: see [`CacheMetrics::l1_hit`]).
    hits: Arc<AtomicU64>,
    l1_hits: Arc<Striped>,
    misses: Arc<AtomicU64>,
    negative_hits: Arc<AtomicU64>,
    coalesced: Arc<AtomicU64>,
    loader_calls: Arc<AtomicU64>,
    loader_errors: Arc<AtomicU64>,
    lease_waits: Arc<AtomicU64>,
    fills_refused: Arc<AtomicU64>,
    decode_errors: Arc<AtomicU64>,
    fail_open: Arc<AtomicU64>,
    stale_served: Arc<AtomicU64>,
    refreshes: Arc<AtomicU64>,
}

/// What one cache class did through one [`Keyward`] handle since the handle was created (every `Cache` of
/// the class on the handle counts here): a snapshot from [`Cache::stats`], for an application to show. The
/// same counts go to the `keyward_cache_*_total` metrics, labelled by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered with a stored value (from either tier).
    pub hits: u64,
    /// The part of `hits` (and `negative_hits`) answered by the in-process tier (L1) without asking Redis.
    pub l1_hits: u64,
    /// Reads that found no usable value (this caller, or the one it shared a load with, loaded).
    pub misses: u64,
    /// Reads answered with a cached "absent" (negative caching).
    pub negative_hits: u64,
    /// Calls that shared another caller's fetch in this process (single-flight) instead of asking Redis.
    pub coalesced: u64,
    /// Loader calls.
    pub loader_calls: u64,
    /// Loader calls that failed or timed out.
    pub loader_errors: u64,
    /// Waits for another caller's fill lease (anywhere in the fleet).
    pub lease_waits: u64,
    /// Fills refused because an invalidation voided their lease (the value was returned, not stored).
    pub fills_refused: u64,
    /// Stored values that could not be decoded (removed and treated as misses).
    pub decode_errors: u64,
    /// Calls answered from the source because Redis was unavailable (`on_error = "fail_open"`).
    pub fail_open: u64,
    /// Calls answered with a stale value (fail-safe: a refill failed, overran the loader timeout, or the
    /// soft timeout).
    pub stale_served: u64,
    /// Eager refreshes started (an entry read within `refresh_ahead` of its expiry).
    pub refreshes: u64,
}

impl CacheStats {
    /// `hits + negative_hits` over all reads that found or loaded a value; `None` before the first one.
    pub fn hit_ratio(&self) -> Option<f64> {
        let found = self.hits + self.negative_hits;
        let total = found + self.misses;
        // Counts stay far below 2^52, where u64 → f64 is exact.
        #[allow(clippy::cast_precision_loss)]
        (total > 0).then(|| found as f64 / total as f64)
    }
}

/// How a [`Cache::get_or_set_with_status`] call was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheLookup {
    /// A stored value, from Redis (or the embedded store).
    Hit,
    /// A value from the in-process tier (L1), without asking the store.
    L1Hit,
    /// A cached "absent" (negative caching).
    NegativeHit,
    /// No usable value: this caller loaded it (and stored it, unless an invalidation raced the load).
    Miss,
    /// Another caller in this process was already fetching it; this caller shared that outcome.
    Coalesced,
    /// Redis was unavailable (or the stored bytes kept failing to decode): the loader answered and nothing was
    /// stored (`on_error = "fail_open"`).
    FailOpen,
    /// A stale value (past its TTL, within the class's `stale_grace`), and why it was served instead of a
    /// fresh one.
    Stale(StaleReason),
    /// A current value due for an eager refresh ([`Cache::get_or_set_detached`]): it was returned at once, and
    /// this call refreshes the entry in the background.
    RefreshAhead,
    /// A value this call just loaded to refresh an entry ahead of its expiry (`refresh_ahead`), everyone else
    /// having kept the current one meanwhile.
    Refreshed,
}

/// Why a stale value was served ([`CacheLookup::Stale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StaleReason {
    /// The refill's loader returned an error.
    LoaderError,
    /// The refill's loader overran `loader_timeout` (the hard timeout).
    LoaderTimeout,
    /// The refill took longer than `soft_timeout`; it goes on (in the background for
    /// [`Cache::get_or_set_detached`]) and commits if its lease is still valid.
    SoftTimeout,
}

impl CacheLookup {
    /// The name used in tracing spans and metrics: `hit`, `l1_hit`, `negative_hit`, `miss`, `coalesced`,
    /// `fail_open`, `stale_loader_error`, `stale_loader_timeout`, `stale_soft_timeout`, `refresh_ahead`,
    /// `refreshed`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheLookup::Hit => "hit",
            CacheLookup::L1Hit => "l1_hit",
            CacheLookup::NegativeHit => "negative_hit",
            CacheLookup::Miss => "miss",
            CacheLookup::Coalesced => "coalesced",
            CacheLookup::FailOpen => "fail_open",
            CacheLookup::Stale(StaleReason::LoaderError) => "stale_loader_error",
            CacheLookup::Stale(StaleReason::LoaderTimeout) => "stale_loader_timeout",
            CacheLookup::Stale(StaleReason::SoftTimeout) => "stale_soft_timeout",
            CacheLookup::RefreshAhead => "refresh_ahead",
            CacheLookup::Refreshed => "refreshed",
        }
    }

    fn from_u8(n: u8) -> Option<Self> {
        [
            CacheLookup::Hit,
            CacheLookup::NegativeHit,
            CacheLookup::Miss,
            CacheLookup::Coalesced,
            CacheLookup::FailOpen,
            CacheLookup::L1Hit,
            CacheLookup::Stale(StaleReason::LoaderError),
            CacheLookup::Stale(StaleReason::LoaderTimeout),
            CacheLookup::Stale(StaleReason::SoftTimeout),
            CacheLookup::RefreshAhead,
            CacheLookup::Refreshed,
        ]
        .get(usize::from(n).checked_sub(1)?)
        .copied()
    }

    fn to_u8(self) -> u8 {
        match self {
            CacheLookup::Hit => 1,
            CacheLookup::NegativeHit => 2,
            CacheLookup::Miss => 3,
            CacheLookup::Coalesced => 4,
            CacheLookup::FailOpen => 5,
            CacheLookup::L1Hit => 6,
            CacheLookup::Stale(StaleReason::LoaderError) => 7,
            CacheLookup::Stale(StaleReason::LoaderTimeout) => 8,
            CacheLookup::Stale(StaleReason::SoftTimeout) => 9,
            CacheLookup::RefreshAhead => 10,
            CacheLookup::Refreshed => 11,
        }
    }
}

/// A value a lease keeps (see `fetch.lua`), decodable: stale (fail-safe), or current (`fresh`: an eager
/// refresh's).
#[derive(Clone)]
struct Fallback {
    /// The codec's bytes.
    payload: Bytes,
    fresh: bool,
}

/// How a fill may answer before its load ends.
struct Plan<'a> {
    fallback: Option<Fallback>,
    early: Option<&'a Early>,
    soft_deadline: Option<tokio::time::Instant>,
    /// See [`Ask::fresh_for`].
    fresh_for: Option<&'a AtomicU64>,
}

/// What one call brings to a load besides its key and loader.
#[derive(Clone, Copy)]
struct Ask<'a> {
    /// Where the call records how it was answered.
    seen: &'a Seen,
    /// A detached call's channel for answers before the load ends.
    early: Option<&'a Early>,
    /// When a caller with a stale value at hand stops waiting (`soft_timeout`, from the call's start).
    soft_deadline: Option<tokio::time::Instant>,
    /// The in-process flight this call leads, if any: an eager refresh completes it early with the current
    /// value, so that callers in this process do not wait for the refresh.
    flight: Option<&'a std::sync::Mutex<Option<Leader>>>,
    /// Where the leader records how long the value it answered with stays fresh in the store (ms + 1; 0:
    /// unknown), for the in-process copy's lifetime.
    fresh_for: Option<&'a AtomicU64>,
    /// Where a hit records the tags of the stored value it answered with, for the in-process copy.
    stored_tags: Option<&'a std::sync::Mutex<Option<l1::StoredTags>>>,
}

/// What a load answers with: `from_l1` turns an L1 entry into the answer (`None`: it cannot, go to the store),
/// `from_load` a value read from the store or loaded (e.g. the value itself, or it in an `Arc`).
struct Answer<L, S> {
    from_l1: L,
    from_load: S,
}

/// Where a detached load ([`Cache::get_or_set_detached`]) offers its caller an answer before it ends: a stale
/// value (taken at the soft timeout) or the current value of an entry it refreshes ahead (taken at once).
#[derive(Default)]
struct Early {
    offer: std::sync::Mutex<Option<(Bytes, CacheLookup)>>,
    notify: tokio::sync::Notify,
}

impl Early {
    fn offer(&self, payload: &Bytes, how: CacheLookup) {
        *self.offer.lock().unwrap_or_else(|e| e.into_inner()) = Some((payload.clone(), how));
        self.notify.notify_one();
    }

    fn taken(&self) -> Option<(Bytes, CacheLookup)> {
        self.offer.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Where a load records how it was answered (0: not yet); an atomic so that the load's future stays `Send`.
type Seen = std::sync::atomic::AtomicU8;

/// Run a store write and its backplane announcement: in a task of its own when in-process tiers must hear of
/// it (`announced`), so that a caller dropped while Redis's reply is in flight still announces what Redis
/// applied; inline otherwise.
pub(crate) async fn run_announced(
    announced: bool,
    work: impl Future<Output = Result<()>> + Send + 'static,
) -> Result<()> {
    if !announced {
        return work.await;
    }
    tokio::spawn(work).await.unwrap_or_else(|e| {
        Err(Error::InvalidArgument {
            what: format!("the cache write task failed: {e}"),
        })
    })
}

/// A store write that in-process tiers must hear of.
enum Write {
    Invalidate,
    Set {
        body: Vec<u8>,
        tags: Vec<String>,
        ttl: Duration,
    },
    /// Write-behind's set: only if `version` is newer than the entry's last write-behind write
    /// (`store::set_if_newer`; built in `write_behind.rs`).
    SetIfNewer {
        body: Vec<u8>,
        ttl: Duration,
        version: (u64, u64),
    },
}

/// Apply `write` to `key`, detach this process's loads of it, and announce it on the backplane (classes with
/// L1): the body of `Cache::write_and_announce`, owning nothing it borrows so that it can run in a task.
async fn write_then_announce(
    kw: &Keyward,
    class: &Arc<ClassInfo>,
    key: &str,
    write: Write,
) -> Result<()> {
    let inner = &kw.inner;
    let e = Entry::new(&inner.backend, &inner.ns, &class.name, key);
    match &write {
        Write::Invalidate => {
            store::invalidate(&inner.backend, &inner.bus, &e).await?;
        }
        Write::Set { body, tags, ttl } => {
            store::set(&inner.backend, &inner.bus, &e.tagged(tags), body, *ttl).await?;
        }
        Write::SetIfNewer { body, ttl, version } => {
            store::set_if_newer(&inner.backend, &inner.bus, &e, body, *ttl, *version).await?;
        }
    }
    // After the backend: a caller arriving from now on must not join a fetch that began before.
    let flights = kw.shared::<Flights>();
    flights.detach(&flight_key(key, true));
    flights.detach(&flight_key(key, false));
    if class.policy.l1_value().is_none() {
        return Ok(());
    }
    let event = Event::Key {
        class: class.name.clone(),
        key: key.to_owned(),
    };
    l1::hub(kw).publish(kw, event).await
}

/// Record how long the value a load answered with stays fresh in the store (for its in-process copy).
fn record_fresh_for(slot: Option<&AtomicU64>, fresh: Option<Duration>) {
    if let (Some(slot), Some(fresh)) = (slot, fresh) {
        let ms = u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX - 1);
        slot.store(ms + 1, Ordering::Relaxed);
    }
}

/// Record the tags of the stored value a hit answered with (for its in-process copy); a value whose tags
/// cannot be read records nothing (the copy is then dropped by any tag's invalidation).
fn record_stored_tags(slot: Option<&std::sync::Mutex<Option<l1::StoredTags>>>, raw: &[u8]) {
    let Some(slot) = slot else { return };
    if let Some(tags) = stored_tags(raw) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(tags);
    }
}

/// The tag names a stored value records (`None` when its envelope cannot be read).
fn stored_tags(raw: &[u8]) -> Option<l1::StoredTags> {
    let (_, tags, _) = envelope::parse_tagged(raw).ok()?;
    Some(l1::StoredTags(
        tags.iter().map(|(t, _)| t.to_vec()).collect(),
    ))
}

/// The tags a stored value records, each with the epoch recorded for it (`None` if its envelope cannot be
/// read). An eager refresh by a caller that names no tags (a batch, an untagged `get_or_set`) stamps its new
/// value with these: the value it replaces was current under them, so a tag invalidation before or during the
/// refresh still removes the refreshed value.
fn kept_tags(raw: &[u8]) -> Option<Vec<(String, u64)>> {
    let (_, tags, _) = envelope::parse_tagged(raw).ok()?;
    tags.iter()
        .map(|(t, epoch)| Some((String::from_utf8(t.to_vec()).ok()?, epoch)))
        .collect()
}

/// The soft deadline of a call starting now: `soft_timeout` from now, in a class that also keeps stale values
/// (`stale_grace`); a soft timeout means nothing without one.
fn soft_deadline(policy: &CacheClass) -> Option<tokio::time::Instant> {
    policy
        .soft_timeout_value()
        .filter(|_| policy.stale_grace_value().is_some())
        .map(|d| tokio::time::Instant::now() + d)
}

/// Record `lookup` for the caller and in the current tracing span.
fn saw(seen: &Seen, lookup: CacheLookup) {
    seen.store(lookup.to_u8(), Ordering::Relaxed);
    tracing::Span::current().record("status", lookup.as_str());
}

impl CacheMetrics {
    fn new(class: &str, totals: &ClassTotals) -> Self {
        let t = |name: &'static str, total: &Arc<AtomicU64>| Tally {
            counter: metrics::counter!(name, "class" => class.to_owned()),
            total: Arc::clone(total),
        };
        Self {
            hits: t("keyward_cache_hits_total", &totals.hits),
            l1_hits: metrics::counter!("keyward_cache_l1_hits_total", "class" => class.to_owned()),
            l1_hits_total: Arc::clone(&totals.l1_hits),
            misses: t("keyward_cache_misses_total", &totals.misses),
            negative_hits: t("keyward_cache_negative_hits_total", &totals.negative_hits),
            coalesced: t("keyward_cache_coalesced_total", &totals.coalesced),
            loader_calls: t("keyward_cache_loader_calls_total", &totals.loader_calls),
            loader_errors: t("keyward_cache_loader_errors_total", &totals.loader_errors),
            lease_waits: t("keyward_cache_lease_waits_total", &totals.lease_waits),
            fills_refused: t("keyward_cache_fills_refused_total", &totals.fills_refused),
            decode_errors: t("keyward_cache_decode_errors_total", &totals.decode_errors),
            fail_open: t("keyward_cache_fail_open_total", &totals.fail_open),
            stale_served: t("keyward_cache_stale_served_total", &totals.stale_served),
            refreshes: t("keyward_cache_refreshes_total", &totals.refreshes),
            loader_seconds: metrics::histogram!("keyward_cache_loader_seconds", "class" => class.to_owned()),
        }
    }
}

impl ClassTotals {
    fn snapshot(&self) -> CacheStats {
        let g = |a: &Arc<AtomicU64>| a.load(Ordering::Relaxed);
        CacheStats {
            hits: g(&self.hits) + self.l1_hits.get(),
            l1_hits: self.l1_hits.get(),
            misses: g(&self.misses),
            negative_hits: g(&self.negative_hits),
            coalesced: g(&self.coalesced),
            loader_calls: g(&self.loader_calls),
            loader_errors: g(&self.loader_errors),
            lease_waits: g(&self.lease_waits),
            fills_refused: g(&self.fills_refused),
            decode_errors: g(&self.decode_errors),
            fail_open: g(&self.fail_open),
            stale_served: g(&self.stale_served),
            refreshes: g(&self.refreshes),
        }
    }
}

pub(crate) struct ClassInfo {
    name: String,
    policy: CacheClass,
    keys: KeySpace,
    metrics: CacheMetrics,
    totals: Arc<ClassTotals>,
    /// The in-process tier, when the class declares one (shared by every `Cache` of the class on the handle).
    l1: Option<Arc<ClassL1>>,
}

impl ClassInfo {
    fn new(
        name: &str,
        policy: CacheClass,
        keys: KeySpace,
        totals: Arc<ClassTotals>,
        l1: Option<Arc<ClassL1>>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            metrics: CacheMetrics::new(name, &totals),
            totals,
            policy,
            keys,
            l1,
        }
    }
}

/// A typed cache over one `cache` class of the policy. Cheap to clone.
///
/// Every write takes its TTL (with jitter) from the policy: there is no way to store without one.
///
/// # No per-entry TTL, by design
/// Coming from moka (`Expiry`) or Redis's `SET … EX`: there is no `set_with_ttl` and no per-entry
/// expiry. **The policy owns TTLs**: every entry of a class lives the class's `ttl` (plus its jitter), so
/// the lifetime of a value is written down once, reviewed with the policy file, audited by `keyward
/// audit`, and cannot drift call site by call site. Entries that need another lifetime belong to another
/// class (declare `product_hot` with `ttl = "30s"` next to `product` with `ttl = "1h"`); a value that
/// must go *now* is invalidated ([`invalidate`](Self::invalidate), [`invalidate_all`](Self::invalidate_all),
/// tags), not given a short TTL.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keyward::{Keyward, policy::{CacheClass, Policy}};
///
/// let policy = Policy::builder("dev", "shop")
///     .cache("product_list", CacheClass::new(Duration::from_secs(600), "catalog service, after each product write"))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let products = kw.cache::<Vec<String>>("product_list")?;
///
/// let list = products
///     .get_or_set("all", || async { Ok::<_, std::io::Error>(vec!["apple".to_owned()]) })
///     .await?;
/// assert_eq!(list, ["apple"]);
/// products.invalidate("all").await?; // after the source-of-truth write
/// # Ok(()) }
/// ```
pub struct Cache<V, C = Json> {
    kw: Keyward,
    /// The handle's single-flight table, shared by every cache of the handle.
    flights: Arc<Flights>,
    class: Arc<ClassInfo>,
    _types: PhantomData<fn() -> (V, C)>,
}

impl<V, C> Clone for Cache<V, C> {
    fn clone(&self) -> Self {
        Self {
            kw: self.kw.clone(),
            flights: Arc::clone(&self.flights),
            class: Arc::clone(&self.class),
            _types: PhantomData,
        }
    }
}

impl Keyward {
    /// A typed cache for a `cache` class of the policy, storing JSON.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`], or [`Error::PersonalData`] for a `personal = true` class
    /// that does not also set `allow_shared = true`.
    pub fn cache<V>(&self, class: &str) -> Result<Cache<V>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.cache_with_codec::<V, Json>(class)
    }

    /// A typed cache with another codec, e.g. `MsgPack` (feature `msgpack`).
    ///
    /// # Errors
    /// As [`cache`](Self::cache).
    pub fn cache_with_codec<V, C>(&self, class: &str) -> Result<Cache<V, C>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let (declared, keys) = self.declared(class)?;
        let cache_class = match declared.kind() {
            ClassKind::Cache(c) => c.clone(),
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "cache",
                    found: other.name(),
                });
            }
        };
        if cache_class.is_personal() && !cache_class.is_shared_allowed() {
            return Err(Error::PersonalData {
                class: class.to_owned(),
            });
        }
        let l1 = cache_class.l1_value().map(|tier| {
            let hub = l1::hub(self);
            let l1 = hub.class(class, tier, cache_class.l1_max_stale_value());
            hub.start_heartbeat(&self.inner);
            l1
        });
        let totals = {
            let table = self.shared::<StatsTable>();
            let mut map = table.0.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(class.to_owned()).or_default())
        };
        Ok(Cache {
            kw: self.clone(),
            flights: self.shared::<Flights>(),
            class: Arc::new(ClassInfo::new(class, cache_class, keys, totals, l1)),
            _types: PhantomData,
        })
    }

    /// Invalidate every cache entry of the namespace in O(1): bumps the namespace epoch, so entries filled
    /// before it read as misses and fills leased before it never become visible. No SCAN, no FLUSH.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn invalidate_namespace(&self) -> Result<()> {
        let kw = self.clone();
        let has_l1 = self.has_l1();
        let work = async move {
            store::bump(&kw.inner.backend, &kw.inner.ns, "*").await?;
            kw.shared::<Flights>().detach_all();
            if has_l1 {
                l1::hub(&kw).publish(&kw, Event::Namespace).await?;
            }
            Ok(())
        };
        run_announced(has_l1, work).await
    }

    /// Whether any cache class of the policy has an in-process tier (then invalidations go on the backplane).
    pub(crate) fn has_l1(&self) -> bool {
        self.inner
            .policy
            .classes()
            .any(|c| c.as_cache().is_some_and(|c| c.l1_value().is_some()))
    }
}

impl<V, C> std::fmt::Debug for Cache<V, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("class", &self.class.name)
            .field("keyward", &self.kw)
            .finish()
    }
}

enum Decoded<V> {
    Value(V, Bytes),
    Negative,
}

/// Gives a lease back if the filling caller is dropped (cancelled) before it commits, so waiters elsewhere
/// take over at once rather than when the lease expires.
struct LeaseGuard {
    kw: Keyward,
    class: Arc<ClassInfo>,
    key: String,
    prefix: String,
    armed: bool,
}

impl LeaseGuard {
    async fn release(mut self) {
        self.armed = false;
        let inner = &self.kw.inner;
        let e = Entry::new(&inner.backend, &inner.ns, &self.class.name, &self.key);
        if let Err(err) = store::release(
            &self.kw.inner.backend,
            &self.kw.inner.bus,
            &e,
            &self.prefix,
            self.class.policy.lease_ttl_value(),
        )
        .await
        {
            tracing::warn!(class = %self.class.name, error = %err, "could not release fill lease; it will expire");
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let kw = self.kw.clone();
            let class = Arc::clone(&self.class);
            let key = std::mem::take(&mut self.key);
            let prefix = std::mem::take(&mut self.prefix);
            rt.spawn(async move {
                let e = Entry::new(&kw.inner.backend, &kw.inner.ns, &class.name, &key);
                let lease_ttl = class.policy.lease_ttl_value();
                let _ =
                    store::release(&kw.inner.backend, &kw.inner.bus, &e, &prefix, lease_ttl).await;
            });
        }
    }
}

/// An error for the caller and, shared, for its followers.
fn failed<T>(err: Error) -> (Result<T>, Outcome) {
    (Err(err.clone()), Err(err))
}

pub(super) fn flight_key(key: &str, negative_ok: bool) -> String {
    let mut k = String::with_capacity(key.len() + 2);
    k.push_str(key);
    k.push('\0');
    k.push(if negative_ok { 'n' } else { 'v' });
    k
}

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// The class name.
    pub fn class(&self) -> &str {
        &self.class.name
    }

    /// The class's declared policy.
    pub fn policy(&self) -> &CacheClass {
        &self.class.policy
    }

    /// What this class did through this handle so far (every `Cache` of the class on the handle counts):
    /// hits, misses, loader calls, fail-open answers… A snapshot; the same counts go to the
    /// `keyward_cache_*_total` metrics.
    pub fn stats(&self) -> CacheStats {
        self.class.totals.snapshot()
    }

    /// The full Redis key of an entry (for logs and operators; the API never needs it).
    ///
    /// # Errors
    /// [`Error::Key`] for an empty id part or an over-long key.
    pub fn key(&self, id: &(impl IdParts + ?Sized)) -> Result<String> {
        Ok(self.class.keys.key(id)?)
    }

    fn entry<'a>(&'a self, key: &'a str) -> Entry<'a> {
        let inner = &self.kw.inner;
        let policy = &self.class.policy;
        Entry::new(&inner.backend, &inner.ns, &self.class.name, key)
            .windows(policy.stale_grace_value(), policy.refresh_ahead_value())
            .with_l1(self.class.l1.is_some())
    }

    fn decode(&self, raw: &Bytes) -> std::result::Result<Decoded<V>, String> {
        let (_, body) = envelope::parse(raw).map_err(|e| e.to_string())?;
        match body {
            Body::Value(payload) => C::decode::<V>(payload)
                .map(|v| Decoded::Value(v, raw.slice_ref(payload)))
                .map_err(|e| format!("{} decode failed: {e}", C::NAME)),
            Body::Negative => Ok(Decoded::Negative),
        }
    }

    /// Count, log and delete a stored value that cannot be decoded. It is never returned.
    async fn heal(&self, key: &str, raw: &[u8], reason: &str) -> Result<()> {
        self.class.metrics.decode_errors.increment(1);
        tracing::warn!(class = %self.class.name, key, reason, "undecodable cache value removed");
        store::heal(&self.kw.inner.backend, key, raw).await?;
        Ok(())
    }

    /// Whether `err` is the store being unavailable and this class fails open; counts and logs it if so.
    fn fails_open(&self, err: &Error) -> bool {
        if self.class.policy.on_error_value() != CacheOnError::FailOpen || !err.is_unavailable() {
            return false;
        }
        self.class.metrics.fail_open.increment(1);
        // An open breaker is expected for its whole cooldown (the failure that opened it was logged), and
        // a lazy handle's connect attempts are logged by its connecting task.
        if !err.is_reported_outage() {
            tracing::warn!(class = %self.class.name, error = %err, "keyward: cache store unavailable; serving from the source (fail open)");
        }
        true
    }

    fn encode(&self, value: &V) -> Result<Vec<u8>> {
        let payload = C::encode(value).map_err(|e| Error::Encode {
            class: self.class.name.clone(),
            source: Arc::new(e),
        })?;
        let max = self.class.policy.max_value_bytes_value();
        if payload.len() > max {
            return Err(Error::ValueTooLarge {
                class: self.class.name.clone(),
                field: "max_value_bytes",
                size: payload.len(),
                max,
            });
        }
        Ok(payload)
    }

    /// Read an entry. `None` for a miss, a cached absent, a stale value (fail-safe classes: past its TTL,
    /// kept only for a failing refill), or a value that failed to decode (which is removed). Never takes a
    /// lease and never loads.
    ///
    /// # Errors
    /// Backend failures and [`Error::Key`].
    pub async fn get(&self, id: &(impl IdParts + ?Sized)) -> Result<Option<V>> {
        let key = self.key(id)?;
        self.read(&key, |held| C::decode::<V>(held.bytes()).ok(), |v| v)
            .await
    }

    /// [`get`](Self::get), sharing the value instead of decoding it again: an entry of the in-process tier
    /// (L1) is decoded once, on its first shared read, and every later shared read of it gets the same
    /// [`Arc`] (no decoding, no copy). Use it, or [`get_or_set_shared`](Self::get_or_set_shared), for classes
    /// with an L1: an L1 hit through [`get`](Self::get) decodes the stored bytes on every call. Without L1, or
    /// when L1 does not answer, it reads the store as `get` does. The decoded copy lives as long as the L1
    /// entry and is not counted in the tier's `capacity` (which counts the encoded bytes).
    ///
    /// # Errors
    /// As [`get`](Self::get): backend failures and [`Error::Key`].
    pub async fn get_shared(&self, id: &(impl IdParts + ?Sized)) -> Result<Option<Arc<V>>> {
        let key = self.key(id)?;
        self.read(
            &key,
            |held| held.shared::<V, C, _>(C::decode::<V>).ok(),
            Arc::new,
        )
        .await
    }

    /// The body of [`get`](Self::get): `from_l1` turns an L1 entry into the answer (`None`: it cannot, read
    /// the store), `from_store` a value decoded from the store.
    async fn read<T>(
        &self,
        key: &str,
        from_l1: impl FnOnce(&l1::Held) -> Option<T>,
        from_store: impl FnOnce(V) -> T,
    ) -> Result<Option<T>> {
        let span = tracing::debug_span!("keyward.cache.get", class = %self.class.name, status = tracing::field::Empty);
        async {
            let m = &self.class.metrics;
            if let Some(l1) = &self.class.l1
                && let Some(held) = l1.get_held(key).await
                && let Some(v) = from_l1(&held)
            {
                m.l1_hit();
                tracing::Span::current().record("status", "l1_hit");
                return Ok(Some(v));
            }
            let read = match store::read(&self.kw.inner.backend, &self.entry(key)).await {
                Ok(read) => read,
                Err(err) if self.fails_open(&err) => {
                    tracing::Span::current().record("status", "fail_open");
                    return Ok(None);
                }
                Err(err) => return Err(err),
            };
            let status = match read {
                None => {
                    m.misses.increment(1);
                    ("miss", None)
                }
                Some(raw) => match self.decode(&raw) {
                    Ok(Decoded::Value(v, _)) => {
                        m.hits.increment(1);
                        ("hit", Some(from_store(v)))
                    }
                    Ok(Decoded::Negative) => {
                        m.negative_hits.increment(1);
                        ("negative_hit", None)
                    }
                    Err(reason) => {
                        self.heal(key, &raw, &reason).await?;
                        m.misses.increment(1);
                        ("decode_error", None)
                    }
                },
            };
            tracing::Span::current().record("status", status.0);
            Ok(status.1)
        }
        .instrument(span)
        .await
    }

    /// Store a value with the class TTL (plus jitter). Voids any fill in progress for the entry.
    ///
    /// # Errors
    /// [`Error::ValueTooLarge`], [`Error::Encode`], backend failures.
    pub async fn set(&self, id: &(impl IdParts + ?Sized), value: &V) -> Result<()> {
        let key = self.key(id)?;
        let payload = self.encode(value)?;
        self.store(&key, &payload, &[]).await
    }

    /// `tags`: validated (see `tags.rs`); the value records their current epochs.
    async fn store(&self, key: &str, payload: &[u8], tags: &[String]) -> Result<()> {
        let write = Write::Set {
            body: envelope::body(Some(payload)),
            tags: tags.to_vec(),
            ttl: self.class.policy.stored_ttl(),
        };
        self.write_and_announce(key.to_owned(), write).await
    }

    /// Invalidate one entry: removes its value (or a fill lease in progress, which can then no longer commit).
    /// Call it *after* the source-of-truth write, or use [`invalidate_after`](Self::invalidate_after).
    ///
    /// # Errors
    /// Backend failures and [`Error::Key`].
    pub async fn invalidate(&self, id: &(impl IdParts + ?Sized)) -> Result<()> {
        let key = self.key(id)?;
        self.write_and_announce(key, Write::Invalidate).await
    }

    /// Run a store write of `key` and its announcement to the in-process tiers. With L1, both run in a task of
    /// their own: a caller dropped after Redis applied the write (its reply still in flight) must not leave
    /// other instances' L1 serving the old value with no message and no gap to notice.
    async fn write_and_announce(&self, key: String, write: Write) -> Result<()> {
        let (kw, class) = (self.kw.clone(), Arc::clone(&self.class));
        let has_l1 = class.policy.l1_value().is_some();
        run_announced(has_l1, async move {
            write_then_announce(&kw, &class, &key, write).await
        })
        .await
    }

    /// Invalidate every entry of this class in O(1) by bumping the class epoch. No SCAN, no FLUSH.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn invalidate_all(&self) -> Result<()> {
        let (kw, class) = (self.kw.clone(), Arc::clone(&self.class));
        let has_l1 = class.policy.l1_value().is_some();
        let work = async move {
            store::bump(&kw.inner.backend, &kw.inner.ns, &class.name).await?;
            let pattern = class.keys.scan_pattern();
            kw.shared::<Flights>()
                .detach_prefix(pattern.trim_end_matches('*'));
            if class.policy.l1_value().is_some() {
                let class = class.name.clone();
                l1::hub(&kw).publish(&kw, Event::Class { class }).await?;
            }
            Ok(())
        };
        run_announced(has_l1, work).await
    }

    /// Return the cached value, or load it with `loader` — once per key across the whole fleet — and cache it.
    ///
    /// Concurrent callers in this process share one fetch; callers in other processes wait for the fill to be
    /// committed and are woken by it. A loader error is returned to every caller waiting on that load and is
    /// never cached. A fill refused because of a concurrent invalidation is still returned to the caller that
    /// loaded it (its call overlapped the invalidation), but never stored.
    ///
    /// # Errors
    /// [`Error::Loader`] / [`Error::LoaderTimeout`] (after the class `loader_timeout`), [`Error::ValueTooLarge`],
    /// backend failures.
    pub async fn get_or_set<F, Fut, E>(&self, id: &(impl IdParts + ?Sized), loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_set_with_status(id, loader)
            .await
            .map(|(v, _)| v)
    }

    /// [`get_or_set`](Self::get_or_set), also saying how the call was answered ([`CacheLookup`]): a hit (from
    /// Redis or the in-process tier), a miss this caller loaded, an outcome shared with another caller in this
    /// process, the loader answering because Redis is unavailable, a stale value served by fail-safe and why,
    /// or an eager refresh. The same counts are in [`stats`](Self::stats) and the metrics.
    ///
    /// # Errors
    /// As [`get_or_set`](Self::get_or_set).
    pub async fn get_or_set_with_status<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        loader: F,
    ) -> Result<(V, CacheLookup)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let seen = Seen::new(0);
        let loaded = self
            .load(id, &[], false, || async { loader().await.map(Some) }, &seen)
            .await?;
        // Every path that returns a value records how; a miss is the conservative answer otherwise.
        let lookup = CacheLookup::from_u8(seen.into_inner()).unwrap_or(CacheLookup::Miss);
        loaded.map(|v| (v, lookup)).ok_or_else(|| self.no_value())
    }

    /// The error for a non-optional load that came back without a value (a bug: every such path returns one).
    fn no_value(&self) -> Error {
        Error::Loader {
            class: self.class.name.clone(),
            source: Arc::new(
                "keyward returned no value for a non-optional load (please report this bug)".into(),
            ),
        }
    }

    /// [`get_or_set`](Self::get_or_set), sharing the value instead of decoding it again: an entry of the
    /// in-process tier (L1) is decoded once, on its first shared read, and every later shared read of it gets
    /// the same [`Arc`] — an L1 hit then costs no decoding and no copy of the value (see
    /// [`get_shared`](Self::get_shared)). This is the read to use on classes with an L1. Everything else
    /// (single-flight, fill leases, fail-safe, counts) is as in `get_or_set`; a value loaded or read from the
    /// store is returned in a new `Arc`.
    ///
    /// # Errors
    /// As [`get_or_set`](Self::get_or_set).
    pub async fn get_or_set_shared<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        loader: F,
    ) -> Result<Arc<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_set_shared_with_status(id, loader)
            .await
            .map(|(v, _)| v)
    }

    /// [`get_or_set_shared`](Self::get_or_set_shared), also saying how the call was answered, as
    /// [`get_or_set_with_status`](Self::get_or_set_with_status) does.
    ///
    /// # Errors
    /// As [`get_or_set`](Self::get_or_set).
    pub async fn get_or_set_shared_with_status<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        loader: F,
    ) -> Result<(Arc<V>, CacheLookup)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let key = self.key(id)?;
        self.load_shared(&key, &[], loader).await
    }

    /// The shared reads' load of `key` (filled with `tags`): the answer in an [`Arc`] shared with the L1
    /// entry (decoded once), and how it was answered.
    async fn load_shared<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        loader: F,
    ) -> Result<(Arc<V>, CacheLookup)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let seen = Seen::new(0);
        let answer = Answer {
            from_l1: |held: &l1::Held| held.shared::<V, C, _>(C::decode::<V>).ok(),
            from_load: Arc::new,
        };
        let load = || async { loader().await.map(Some) };
        let loaded = self
            .load_key_as(key, tags, false, load, &seen, None, answer)
            .await?;
        let lookup = CacheLookup::from_u8(seen.into_inner()).unwrap_or(CacheLookup::Miss);
        loaded.map(|v| (v, lookup)).ok_or_else(|| self.no_value())
    }

    /// [`get_or_set_with_status`](Self::get_or_set_with_status) with a loader that owns what it uses
    /// (`'static`), so that the load may outlive the call: with the class's `soft_timeout`, a caller that has
    /// a stale value at hand gets it after the soft timeout while the refill goes on in the background (and
    /// commits if its lease is still valid); with `refresh_ahead`, the caller that wins the refresh lease gets
    /// the current value at once ([`CacheLookup::RefreshAhead`]) and the refresh runs in the background. With
    /// a borrowing loader ([`get_or_set`](Self::get_or_set)) the same caller instead refreshes inline, and a
    /// soft timeout abandons the refill.
    ///
    /// The load runs in a task on the current tokio runtime.
    ///
    /// # Errors
    /// As [`get_or_set`](Self::get_or_set); a load task that panicked is [`Error::Loader`].
    pub async fn get_or_set_detached<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        loader: F,
    ) -> Result<(V, CacheLookup)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
        C: 'static,
    {
        let key = self.key(id)?;
        let this = self.clone();
        let early = Arc::new(Early::default());
        let task_early = Arc::clone(&early);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let seen = Seen::new(0);
            let loaded = this
                .load_key(
                    &key,
                    &[],
                    false,
                    || async move { loader().await.map(Some) },
                    &seen,
                    Some(&task_early),
                )
                .await;
            let _ = tx.send((loaded, seen.into_inner()));
        });
        let soft = self
            .class
            .policy
            .soft_timeout_value()
            .map(|d| tokio::time::Instant::now() + d);
        let mut soft_passed = false;
        let mut rx = rx;
        loop {
            // An offer this caller may take now: a refresh's current value at once, a stale value once the
            // soft timeout passed.
            if let Some((payload, how)) = early.taken()
                && (how == CacheLookup::RefreshAhead || soft_passed)
                && let Ok(v) = C::decode::<V>(&payload)
            {
                if how != CacheLookup::RefreshAhead {
                    self.class.metrics.stale_served.increment(1);
                }
                return Ok((v, how));
            }
            tokio::select! {
                done = &mut rx => {
                    let Ok((loaded, seen)) = done else {
                        return Err(Error::Loader {
                            class: self.class.name.clone(),
                            source: Arc::new("the load task ended without an answer (it panicked)".into()),
                        });
                    };
                    let lookup = CacheLookup::from_u8(seen).unwrap_or(CacheLookup::Miss);
                    return loaded?.map(|v| (v, lookup)).ok_or_else(|| self.no_value());
                }
                () = early.notify.notified() => {}
                () = async {
                    match soft {
                        Some(at) if !soft_passed => tokio::time::sleep_until(at).await,
                        _ => std::future::pending().await,
                    }
                } => soft_passed = true,
            }
        }
    }

    /// Like [`get_or_set`](Self::get_or_set) for sources where the entry may not exist: a `None` from the loader
    /// is cached for the class's `negative_ttl` (and not cached at all if the class sets none).
    ///
    /// # Errors
    /// As [`get_or_set`](Self::get_or_set).
    pub async fn get_or_set_opt<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        loader: F,
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        self.load(id, &[], true, loader, &Seen::new(0)).await
    }

    /// Write-through: run `persist` (the source-of-truth write) first; only if it succeeds, store `value`.
    ///
    /// The value is encoded and size-checked *before* `persist` runs, so a value this class cannot hold is
    /// refused without writing anything. If `persist` fails the cache is untouched. Two concurrent
    /// write-throughs of one entry can land in the cache in the other order than in the source; where writers
    /// race, prefer [`invalidate_after`](Self::invalidate_after).
    ///
    /// # Errors
    /// [`Error::Source`] (persist failed; cache untouched), [`Error::CacheAfterSource`] (persisted, but the
    /// cache write failed; keyward then tries to invalidate the entry), encode errors.
    pub async fn write_through<T, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        value: &V,
        persist: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T>
    where
        E: Into<BoxError>,
    {
        let key = self.key(id)?;
        let payload = self.encode(value)?;
        let out = persist.await.map_err(|e| self.source_err(e))?;
        if let Err(cause) = self.store(&key, &payload, &[]).await {
            let _ = self.write_and_announce(key, Write::Invalidate).await;
            return Err(self.after_source(cause));
        }
        Ok(out)
    }

    /// Run a source-of-truth write and invalidate the entry only after it succeeded (DB write, then delete).
    ///
    /// # Errors
    /// [`Error::Source`] (the write failed; cache untouched), [`Error::CacheAfterSource`] (written, but the
    /// invalidation failed: the entry may be stale until its TTL).
    pub async fn invalidate_after<T, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        write: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T>
    where
        E: Into<BoxError>,
    {
        let key = self.key(id)?;
        let out = write.await.map_err(|e| self.source_err(e))?;
        if let Err(cause) = self.write_and_announce(key, Write::Invalidate).await {
            return Err(self.after_source(cause));
        }
        Ok(out)
    }

    fn source_err<E: Into<BoxError>>(&self, e: E) -> Error {
        Error::Source {
            class: self.class.name.clone(),
            source: Arc::new(e.into()),
        }
    }

    fn after_source(&self, cause: Error) -> Error {
        Error::CacheAfterSource {
            class: self.class.name.clone(),
            cause: Box::new(cause),
        }
    }

    /// `tags`: validated (see `tags.rs`); a fill records their epochs.
    async fn load<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        tags: &[String],
        negative_ok: bool,
        loader: F,
        seen: &Seen,
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let key = self.key(id)?;
        self.load_key(&key, tags, negative_ok, loader, seen, None)
            .await
    }

    /// [`load`](Self::load) of a key; `early`: a detached call's channel for answers before the load ends.
    async fn load_key<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        negative_ok: bool,
        loader: F,
        seen: &Seen,
        early: Option<&Early>,
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let answer = Answer {
            from_l1: |held: &l1::Held| C::decode::<V>(held.bytes()).ok(),
            from_load: |v| v,
        };
        self.load_key_as(key, tags, negative_ok, loader, seen, early, answer)
            .await
    }

    /// [`load_key`](Self::load_key), answering with what `answer` makes of an L1 entry or of a loaded value.
    #[allow(clippy::too_many_arguments)]
    async fn load_key_as<F, Fut, E, T>(
        &self,
        key: &str,
        tags: &[String],
        negative_ok: bool,
        loader: F,
        seen: &Seen,
        early: Option<&Early>,
        answer: Answer<impl FnOnce(&l1::Held) -> Option<T>, impl FnOnce(V) -> T>,
    ) -> Result<Option<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let Answer { from_l1, from_load } = answer;
        let ask = Ask {
            seen,
            early,
            soft_deadline: soft_deadline(&self.class.policy),
            flight: None,
            fresh_for: None,
            stored_tags: None,
        };
        let span = tracing::debug_span!("keyward.cache.get_or_set", class = %self.class.name, status = tracing::field::Empty);
        let Some(l1) = &self.class.l1 else {
            let loaded = self
                .load_shared_then(key, tags, negative_ok, loader, ask, |_| {})
                .instrument(span)
                .await;
            return loaded.map(|v| v.map(from_load));
        };
        async {
            if let Some(held) = l1.get_held(key).await
                && let Some(v) = from_l1(&held)
            {
                let m = &self.class.metrics;
                m.l1_hit();
                saw(seen, CacheLookup::L1Hit);
                return Ok(Some(v));
            }
            // Taken before the store is asked: the answer enters L1 only if nothing evicted it meanwhile.
            let ticket = l1.ticket(key);
            let payload = std::sync::Mutex::new(None);
            let fresh_for = AtomicU64::new(0);
            let stored_tags = std::sync::Mutex::new(None);
            let ask = Ask {
                fresh_for: Some(&fresh_for),
                stored_tags: Some(&stored_tags),
                ..ask
            };
            let loaded = self
                .load_shared_then(key, tags, negative_ok, loader, ask, |outcome| {
                    // Only what the store holds goes to L1: a hit, or a fill that committed (never a load
                    // answered uncached, a refused fill, or an outcome shared with another caller).
                    if let Ok(Shared::Value(b)) = outcome
                        && matches!(
                            CacheLookup::from_u8(seen.load(Ordering::Relaxed)),
                            Some(
                                CacheLookup::Hit
                                    | CacheLookup::Miss
                                    | CacheLookup::RefreshAhead
                                    | CacheLookup::Refreshed
                            )
                        )
                    {
                        *payload.lock().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
                    }
                })
                .await;
            let payload = payload.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = payload {
                let fresh_for = match fresh_for.load(Ordering::Relaxed) {
                    0 => None,
                    ms => Some(Duration::from_millis(ms - 1)),
                };
                // What the copy carries: a hit's stored tags, a fill's own; a value answered while an eager
                // refresh runs is the old stored one, whose tags were not read here.
                let stored = stored_tags.into_inner().unwrap_or_else(|e| e.into_inner());
                let tags = match CacheLookup::from_u8(seen.load(Ordering::Relaxed)) {
                    Some(CacheLookup::Hit) => stored
                        .as_ref()
                        .map_or(l1::InsertTags::Unknown, l1::InsertTags::Stored),
                    // A refresh by an untagged call keeps the stored value's tags, not read here.
                    Some(CacheLookup::Refreshed) if tags.is_empty() => l1::InsertTags::Unknown,
                    Some(CacheLookup::Miss | CacheLookup::Refreshed) => l1::InsertTags::Names(tags),
                    _ => l1::InsertTags::Unknown,
                };
                l1.insert(key, L1Value::Value(b), ticket, fresh_for, tags)
                    .await;
            }
            loaded.map(|v| v.map(from_load))
        }
        .instrument(span)
        .await
    }

    /// The store half of a load: single-flight in this process, then the fenced fetch and fill; `led` gets
    /// the outcome when this caller led the fetch.
    async fn load_shared_then<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        negative_ok: bool,
        loader: F,
        ask: Ask<'_>,
        led: impl FnOnce(&Outcome),
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let fkey = flight_key(key, negative_ok);
        {
            let leader = loop {
                match self
                    .flights
                    .join_younger_than(&fkey, self.kw.inner.backend.flight_max_age())
                {
                    Role::Leader(l) => break l,
                    Role::Follower(rx) => match tokio::time::timeout_at(
                        // With a soft timeout, no longer than it: past it, this caller asks the store itself
                        // (and gets a stale value if one is kept); else as long as a lease can be held.
                        ask.soft_deadline.unwrap_or_else(|| {
                            tokio::time::Instant::now() + self.class.policy.lease_ttl_value()
                        }),
                        flight::follow(rx),
                    )
                    .await
                    {
                        // The local leader has outlived any lease it could hold (it is stuck or leaked), or the
                        // soft timeout: fetch directly; the backend's lease still admits one loader fleet-wide.
                        Err(_) => {
                            let (result, _) = self.lead(key, tags, negative_ok, loader, ask).await;
                            return result;
                        }
                        Ok(followed) => match followed {
                            Some(Ok(Shared::Value(bytes))) => {
                                if let Ok(v) = C::decode::<V>(&bytes) {
                                    self.class.metrics.coalesced.increment(1);
                                    saw(ask.seen, CacheLookup::Coalesced);
                                    return Ok(Some(v));
                                }
                            }
                            Some(Ok(Shared::Negative)) => {
                                self.class.metrics.coalesced.increment(1);
                                saw(ask.seen, CacheLookup::Coalesced);
                                return Ok(None);
                            }
                            Some(Err(e)) => return Err(e),
                            // The leader's fill was refused, or the leader went away: fetch again.
                            Some(Ok(Shared::Retry)) | None => {}
                        },
                    },
                }
            };
            let flight = std::sync::Mutex::new(Some(leader));
            let ask = Ask {
                flight: Some(&flight),
                ..ask
            };
            let (result, outcome) = self.lead(key, tags, negative_ok, loader, ask).await;
            led(&outcome);
            // Unless an eager refresh completed it early.
            if let Some(leader) = flight.lock().unwrap_or_else(|e| e.into_inner()).take() {
                leader.complete(outcome);
            }
            result
        }
    }

    async fn lead<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        negative_ok: bool,
        loader: F,
        ask: Ask<'_>,
    ) -> (Result<Option<V>>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &self.kw.inner;
        let m = &self.class.metrics;
        let e = self.entry(key).tagged(tags);
        // Fail-safe: when a caller with a stale value at hand (kept under someone's lease) stops waiting for the
        // refill (`soft_timeout`).
        let Ask {
            seen,
            early,
            soft_deadline,
            ..
        } = ask;
        let marker = envelope::lease_marker(rand::random());
        let lease_ttl = self.class.policy.lease_ttl_value();
        let mut heals = 0;
        // Registered only once a fetch says "wait" (hits never pay for it); from then on, every fetch is asked
        // with the listener already armed, so a commit between the answer and the wait cannot be missed.
        let mut listener: Option<Watch> = None;
        loop {
            let notify = listener.as_ref().map(Watch::shared);
            let mut woken = notify.as_ref().map(|n| Box::pin(n.notified()));
            if let Some(w) = woken.as_mut() {
                w.as_mut().enable();
            }
            let fetched =
                match store::fetch(&inner.backend, &e, &marker, lease_ttl, negative_ok).await {
                    Ok(f) => f,
                    // The store is down: the source still answers. This caller is the single-flight leader, so
                    // concurrent callers in this process share this one load; nothing is written.
                    Err(err) if self.fails_open(&err) => {
                        saw(seen, CacheLookup::FailOpen);
                        return self.load_uncached(loader).await;
                    }
                    Err(err) => return failed(err),
                };
            match fetched {
                Fetched::Hit(raw, fresh) => match self.decode(&raw) {
                    Ok(Decoded::Value(v, payload)) => {
                        record_fresh_for(ask.fresh_for, fresh);
                        record_stored_tags(ask.stored_tags, &raw);
                        m.hits.increment(1);
                        saw(seen, CacheLookup::Hit);
                        return (Ok(Some(v)), Ok(Shared::Value(payload)));
                    }
                    Ok(Decoded::Negative) if negative_ok => {
                        m.negative_hits.increment(1);
                        saw(seen, CacheLookup::NegativeHit);
                        return (Ok(None), Ok(Shared::Negative));
                    }
                    Ok(Decoded::Negative) => {
                        // Only a corrupt header can get here; heal like any undecodable value.
                        if let Err(err) = self.heal(key, &raw, "unexpected absent marker").await {
                            return failed(err);
                        }
                        heals += 1;
                    }
                    Err(reason) => {
                        if let Err(err) = self.heal(key, &raw, &reason).await {
                            return failed(err);
                        }
                        heals += 1;
                    }
                },
                Fetched::Wait(left, stale) => {
                    // What the holder keeps now (an invalidation since the last look may have removed it).
                    let kept = stale.and_then(|raw| self.fallback(raw, false));
                    if let (Some(fb), Some(early)) = (&kept, early) {
                        early.offer(&fb.payload, CacheLookup::Stale(StaleReason::SoftTimeout));
                    }
                    match woken {
                        // First "wait": arm the listener, then ask again before sleeping.
                        None => {
                            listener = Some(inner.backend.watch(&inner.bus, &inner.ns, key).await);
                        }
                        Some(woken) => {
                            m.lease_waits.increment(1);
                            // Woken by the holder's commit or release; otherwise re-check when its lease runs
                            // out, and at least every response timeout: a hung Redis sends no wake-up, and the
                            // next fetch is what notices it (and fails open).
                            let mut left = left.clamp(Duration::from_millis(1), lease_ttl);
                            if let Some(slice) = inner.backend.wait_slice() {
                                left = left.min(slice);
                            }
                            if let (Some(deadline), Some(fb), None) = (soft_deadline, &kept, early)
                            {
                                let now = tokio::time::Instant::now();
                                if now >= deadline {
                                    // Waited `soft_timeout` with a stale value at hand: serve it.
                                    return self.serve_stale(
                                        fb.clone(),
                                        StaleReason::SoftTimeout,
                                        seen,
                                    );
                                }
                                left = left.min(deadline - now);
                            }
                            let _ = tokio::time::timeout(left, woken).await;
                        }
                    }
                }
                Fetched::Leased(gens, stale) => {
                    m.misses.increment(1);
                    saw(seen, CacheLookup::Miss);
                    let guard = LeaseGuard {
                        kw: self.kw.clone(),
                        class: Arc::clone(&self.class),
                        key: key.to_owned(),
                        prefix: envelope::lease_prefix(&marker).to_owned(),
                        armed: true,
                    };
                    let fallback = stale.and_then(|raw| self.fallback(raw, false));
                    let plan = Plan {
                        fallback,
                        early,
                        soft_deadline,
                        fresh_for: ask.fresh_for,
                    };
                    return self.fill(guard, gens, loader, plan, seen).await;
                }
                Fetched::Refresh(raw, mut gens) => {
                    if gens.tags.is_empty()
                        && let Some(kept) = kept_tags(&raw)
                    {
                        gens.tags = kept;
                    }
                    let guard = LeaseGuard {
                        kw: self.kw.clone(),
                        class: Arc::clone(&self.class),
                        key: key.to_owned(),
                        prefix: envelope::lease_prefix(&marker).to_owned(),
                        armed: true,
                    };
                    let Some(fb) = self.fallback(raw.clone(), true) else {
                        // Not a value this caller can serve (an absent, or bytes that do not decode): give the
                        // lease back and read it again as a plain hit would.
                        guard.release().await;
                        if let Err(err) = self.heal(key, &raw, "not refreshable").await {
                            return failed(err);
                        }
                        heals += 1;
                        continue;
                    };
                    m.hits.increment(1);
                    m.refreshes.increment(1);
                    // Detached: the caller gets the current value now, and this task refreshes it. Otherwise
                    // this caller refreshes it inline (everyone else keeps getting the current value).
                    let how = match early {
                        Some(early) => {
                            early.offer(&fb.payload, CacheLookup::RefreshAhead);
                            CacheLookup::RefreshAhead
                        }
                        None => CacheLookup::Refreshed,
                    };
                    // Callers in this process that joined this fetch get the current value now.
                    let leader = ask
                        .flight
                        .and_then(|f| f.lock().unwrap_or_else(|e| e.into_inner()).take());
                    if let Some(leader) = leader {
                        leader.complete(Ok(Shared::Value(fb.payload.clone())));
                    }
                    saw(seen, how);
                    let plan = Plan {
                        fallback: Some(fb),
                        early: None,
                        soft_deadline: None,
                        fresh_for: ask.fresh_for,
                    };
                    return self.fill(guard, gens, loader, plan, seen).await;
                }
            }
            if heals >= MAX_HEALS {
                // Something keeps writing bytes we cannot read: serve from the source, store nothing.
                tracing::warn!(class = %self.class.name, key, "entry keeps failing to decode; loading uncached");
                saw(seen, CacheLookup::FailOpen);
                return self.load_uncached(loader).await;
            }
        }
    }

    /// After a failed refill served the stale value: store it again as current for `fail_safe_throttle`, so
    /// that a failing source is not asked on every read (while the lease is still ours; else just let go).
    /// It is stored under the lease's stamp (`gens`), as a successful refill would be, together with the
    /// value's own tags at their epochs when the lease was granted ([`Stamp::throttled`]): a value that was
    /// stale because a tag *expired* it must count as current during the throttle too (and must not keep the
    /// old stamp, which would read as current again once the expiry's epoch field is pruned), while a tag
    /// *removal* during the refill must still remove it, whether or not the caller named the tag.
    /// Returns whether the lease was still held (no invalidation came in between).
    async fn throttle(&self, guard: LeaseGuard, fb: &Fallback, gens: &Stamp) -> bool {
        let Some(stamp) = gens.throttled() else {
            // More tags than one header holds: serve the kept value to this caller, store nothing.
            guard.release().await;
            return true;
        };
        let policy = &self.class.policy;
        // Above the refresh window too, or every read during the throttle would try the source again.
        let ttl = policy
            .fail_safe_throttle_value()
            .saturating_add(policy.stale_grace_value().unwrap_or_default())
            .saturating_add(policy.refresh_ahead_value().unwrap_or_default());
        let e = self.entry(&guard.key);
        let restamped = envelope::value(&stamp, &envelope::body(Some(&fb.payload)));
        match store::commit(&self.kw, &e, &guard.prefix, &restamped, ttl).await {
            Ok(held) => {
                let mut guard = guard;
                guard.armed = false;
                held
            }
            // The store is unreachable: nothing says the value was invalidated; serve it (fail-safe).
            Err(_) => {
                guard.release().await;
                true
            }
        }
    }

    async fn run_loader<F, Fut, E>(&self, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        self.timed_load(loader()).await
    }

    /// One loader call (counted, timed), bounded by the class `loader_timeout` (the hard timeout); its error
    /// or timeout typed and counted.
    pub(super) async fn timed_load<T, E: Into<BoxError>>(
        &self,
        load: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T> {
        let m = &self.class.metrics;
        m.loader_calls.increment(1);
        let timeout = self.class.policy.loader_timeout_value();
        let started = std::time::Instant::now();
        let loaded = tokio::time::timeout(timeout, load).await;
        m.loader_seconds.record(started.elapsed().as_secs_f64());
        match loaded {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                m.loader_errors.increment(1);
                Err(Error::Loader {
                    class: self.class.name.clone(),
                    source: Arc::new(e.into()),
                })
            }
            Err(_) => {
                m.loader_errors.increment(1);
                Err(Error::LoaderTimeout {
                    class: self.class.name.clone(),
                    after: timeout,
                })
            }
        }
    }

    async fn load_uncached<F, Fut, E>(&self, loader: F) -> (Result<Option<V>>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        match self.run_loader(loader).await {
            Ok(Some(v)) => match self.encode(&v) {
                Ok(p) => (Ok(Some(v)), Ok(Shared::Value(Bytes::from(p)))),
                Err(err) => failed(err),
            },
            Ok(None) => (Ok(None), Ok(Shared::Negative)),
            Err(err) => failed(err),
        }
    }

    /// The stale (or, for an eager refresh, current) value a lease keeps, if it is a value this caller can
    /// serve.
    fn fallback(&self, raw: Bytes, fresh: bool) -> Option<Fallback> {
        match self.decode(&raw) {
            Ok(Decoded::Value(_, payload)) => Some(Fallback { payload, fresh }),
            _ => None,
        }
    }

    /// Answer with a kept value instead of the refill's outcome (fail-safe).
    fn serve_stale(
        &self,
        fb: Fallback,
        reason: StaleReason,
        seen: &Seen,
    ) -> (Result<Option<V>>, Outcome) {
        match C::decode::<V>(&fb.payload) {
            Ok(v) => {
                self.class.metrics.stale_served.increment(1);
                saw(seen, CacheLookup::Stale(reason));
                (Ok(Some(v)), Ok(Shared::Value(fb.payload)))
            }
            Err(e) => failed(Error::Loader {
                class: self.class.name.clone(),
                source: Arc::new(e),
            }),
        }
    }

    async fn fill<F, Fut, E>(
        &self,
        guard: LeaseGuard,
        gens: Stamp,
        loader: F,
        plan: Plan<'_>,
        seen: &Seen,
    ) -> (Result<Option<V>>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let Plan {
            fallback,
            early,
            soft_deadline,
            fresh_for,
        } = plan;
        let stale = fallback.as_ref().filter(|fb| !fb.fresh);
        if let (Some(fb), Some(early)) = (stale, early) {
            // A detached caller takes this at its soft timeout; the load goes on here regardless.
            early.offer(&fb.payload, CacheLookup::Stale(StaleReason::SoftTimeout));
        }
        let load = self.run_loader(loader);
        let loaded = match (stale, soft_deadline, early) {
            (Some(fb), Some(deadline), None) => {
                match tokio::time::timeout_at(deadline, load).await {
                    Ok(loaded) => loaded,
                    Err(_) => {
                        // Past the soft timeout with a stale value at hand: serve it; the load is abandoned
                        // (its loader borrows from the caller) and the lease gives the stale value back.
                        let fb = fb.clone();
                        guard.release().await;
                        return self.serve_stale(fb, StaleReason::SoftTimeout, seen);
                    }
                }
            }
            _ => load.await,
        };
        let value = match loaded {
            Ok(v) => v,
            Err(err) => {
                let Some(fb) = fallback else {
                    guard.release().await;
                    return failed(err);
                };
                if fb.fresh {
                    // An eager refresh failed: the current value stays, and so does the lease until its
                    // deadline, so that the failing source is tried again at most once per `lease_ttl`.
                    let mut guard = guard;
                    guard.armed = false;
                    saw(seen, CacheLookup::Hit);
                    return match C::decode::<V>(&fb.payload) {
                        Ok(v) => (Ok(Some(v)), Ok(Shared::Value(fb.payload))),
                        Err(_) => failed(err),
                    };
                }
                let reason = if matches!(err, Error::LoaderTimeout { .. }) {
                    StaleReason::LoaderTimeout
                } else {
                    StaleReason::LoaderError
                };
                // Only while our lease still stands: an invalidation that voided it removed the stale value
                // too, and it must not be served after that.
                if !self.throttle(guard, &fb, &gens).await {
                    return failed(err);
                }
                return self.serve_stale(fb, reason, seen);
            }
        };
        let (payload, ttl) = match &value {
            Some(v) => match self.encode(v) {
                Ok(p) => (Some(p), self.class.policy.stored_ttl()),
                Err(err) => {
                    guard.release().await;
                    return failed(err);
                }
            },
            None => match self.class.policy.jittered_negative_ttl() {
                Some(ttl) => (None, ttl),
                None => {
                    // Absent, and the class does not cache absence.
                    guard.release().await;
                    return (Ok(None), Ok(Shared::Negative));
                }
            },
        };
        let stored = envelope::value(&gens, &envelope::body(payload.as_deref()));
        let shared = match payload {
            Some(p) => Shared::Value(Bytes::from(p)),
            None => Shared::Negative,
        };
        let e = self.entry(&guard.key);
        let committed = store::commit(&self.kw, &e, &guard.prefix, &stored, ttl).await;
        match committed {
            Ok(true) => {
                let mut guard = guard;
                guard.armed = false;
                let grace = self.class.policy.stale_grace_value().unwrap_or_default();
                record_fresh_for(fresh_for, Some(ttl.saturating_sub(grace)));
                (Ok(value), Ok(shared))
            }
            Ok(false) => {
                // An invalidation (or a direct set) voided the lease while we loaded: the value may predate
                // it, so it is not stored, and callers who joined this fetch must fetch again.
                self.class.metrics.fills_refused.increment(1);
                let mut guard = guard;
                guard.armed = false;
                (Ok(value), Ok(Shared::Retry))
            }
            // Redis went away while we loaded: the value is good, it just is not cached (fail open).
            Err(err) if self.fails_open(&err) => {
                guard.release().await;
                (Ok(value), Ok(shared))
            }
            // An error reply (a missing ACL grant) or a class that does not fail open: the caller must see it,
            // or a misconfiguration would hide behind a cache that silently never stores anything.
            Err(err) => {
                guard.release().await;
                failed(err)
            }
        }
    }
}
