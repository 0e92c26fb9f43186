//! The in-process tier (L1) family: `hit_l1` (warm keys read through L1) and `staleness` (one process
//! invalidates in a loop, the others read through L1, and every read is checked for staleness).
//!
//! The one decision: **`staleness` judges keyward against a source of truth kept outside keyward**, in plain
//! Redis keys that keyward never touches. Every invalidation [`Target`] has a version counter and a history:
//! the writer bumps the counter, invalidates, and then records in the history the wall-clock time
//! (`CLOCK_REALTIME`, shared by the processes of one machine) at which the invalidation returned. (The writer
//! is the only one to write the counters, so it bumps them with a `SET` of the next version rather than an
//! `INCR`: every call to the source of truth is idempotent, and is retried while the server is paused.) The loader
//! stamps each value with the versions it read, so a value of version `v` became invalid when the
//! invalidation of `v + 1` returned. After every read, the reader looks that moment up: if it is before the
//! read *started*, the read was stale by the difference. That is exact up to the microseconds between the
//! invalidation's return and the writer's clock reading (they make a measured staleness slightly smaller), and
//! it needs no coordination between the reader and the writer beyond Redis itself.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use keyward::policy::{CacheClass, L1Tier};
use keyward::{Cache, CacheLookup, Keyward};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::raw::Raw;
use super::workload::{VALUE_BYTES, Workload};
use crate::bench::measure::{
    self, Counters, L1Counts, Measured, Span, collect_histograms, new_histogram,
};
use crate::bench::report::{ScenarioFields, round};

/// The family's cache class (in the policy of its scenarios only).
pub(crate) const CLASS: &str = "bench_l1";
/// The class's `l1_max_stale`: `staleness` counts a read staler than this as a violation.
pub(crate) const L1_MAX_STALE: Duration = Duration::from_millis(500);
/// The class's L1: 64 MiB, entries live at most 30 s.
const L1_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;
const L1_TTL: Duration = Duration::from_secs(30);
/// How long preparing may wait for L1 to serve a first read (the first heartbeat must come back).
const WARM_TIMEOUT: Duration = Duration::from_secs(10);
/// `hit_l1`: a worker lets the others (and keyward's backplane task) run after this many reads, outside the
/// timed reads. An L1 hit never waits, so without it one worker would keep its thread to itself.
const YIELD_EVERY: u64 = 64;
/// `staleness`: how long the writer waits before retrying an invalidation that failed, and anyone before
/// retrying a call to the source of truth.
const RETRY_AFTER: Duration = Duration::from_millis(10);
/// How long a call to the source of truth is retried (a paused server times calls out) before the run fails.
const TRUTH_PATIENCE: Duration = Duration::from_secs(30);
/// How long the source of truth outlives a run.
const TRUTH_TTL_MS: u64 = 600_000;

/// The scenarios of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    HitL1,
    Staleness,
}

/// The family's class: the bench cache class (10 min TTL, 10 s fill lease, 5 s loader timeout, values up to
/// 1 MiB) with an L1 of [`L1_CAPACITY_BYTES`] and [`L1_TTL`], and `l1_max_stale` = [`L1_MAX_STALE`].
pub(crate) fn class() -> CacheClass {
    CacheClass::new(Duration::from_secs(600), "keyward bench (L1)")
        .lease_ttl(Duration::from_secs(10))
        .loader_timeout(Duration::from_secs(5))
        .max_value_bytes(1024 * 1024)
        .l1(L1Tier::new(L1_CAPACITY_BYTES, L1_TTL))
        .l1_max_stale(L1_MAX_STALE)
}

/// The value the family caches: the versions of its [`Target`]s it was loaded at (in [`Target::of`]
/// order), padded to ≈1 KiB of JSON like the other scenarios' values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stamped {
    versions: Vec<u64>,
    body: String,
}

impl Stamped {
    fn sized(versions: Vec<u64>) -> Self {
        let mut value = Stamped {
            versions,
            body: String::new(),
        };
        let bare = serde_json::to_vec(&value).map_or(0, |v| v.len());
        value.body = "x".repeat(VALUE_BYTES.saturating_sub(bare));
        value
    }
}

/// What an invalidation in `staleness` invalidates, and so what a value depends on. Each target has its own
/// version counter and history in the source of truth ([`Truth`]).
///
/// This is the extension point for new kinds of invalidation (tags, namespaces): a variant, its name, the
/// keyward call in [`invalidate`](Self::invalidate), the targets a key depends on in [`of`](Self::of), and
/// its turn in [`schedule`](Self::schedule). The writer, the loader and the check work on any target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// One key: `Cache::invalidate`.
    Key(u64),
    /// Every key of the class (the group case): `Cache::invalidate_all`.
    Class,
    /// Every key carrying a tag (key `k` carries tag `k mod 2`): `Keyward::invalidate_tag`.
    Tag(u64),
}

impl Target {
    /// Its name in the source of truth's keys.
    fn name(self) -> String {
        match self {
            Target::Key(k) => format!("key{k}"),
            Target::Class => "class".to_owned(),
            Target::Tag(t) => format!("tag{t}"),
        }
    }

    /// The targets whose invalidation invalidates key `k`.
    fn of(k: u64) -> [Target; 3] {
        [Target::Key(k), Target::Class, Target::Tag(k % 2)]
    }

    /// The writer's `i`-th invalidation over `keys` keys: each key in turn, then the whole class, then each
    /// of the two tags.
    fn schedule(i: u64, keys: u64) -> Target {
        match i % (keys + 3) {
            k if k == keys => Target::Class,
            k if k > keys => Target::Tag(k - keys - 1),
            k => Target::Key(k),
        }
    }

    /// The tag key `k` is filled with.
    fn tag_of(k: u64) -> [String; 1] {
        [format!("staleness:{}", k % 2)]
    }

    async fn invalidate(self, cache: &Cache<Stamped>, key_id: u64) -> keyward::Result<()> {
        match self {
            Target::Key(k) => cache.invalidate(&cache_key(key_id, k)).await,
            Target::Class => cache.invalidate_all().await,
            Target::Tag(t) => cache.invalidate_tag(&format!("staleness:{t}")).await,
        }
    }
}

/// The cache id of key `k` of run `key_id`.
fn cache_key(key_id: u64, k: u64) -> (&'static str, u64, u64) {
    ("l1", key_id, k)
}

/// The source of truth's keys: in the bench namespace, all in one hash slot (the hash tag names the run), so
/// that one round trip reads several of them on a Cluster too.
#[derive(Debug, Clone)]
struct Truth {
    prefix: Arc<str>,
}

impl Truth {
    fn new(app: &str, key_id: u64) -> Self {
        Truth {
            prefix: format!("bench:{{{app}:{key_id}}}:_truth").into(),
        }
    }

    /// The version counter the writer bumps before invalidating `t`.
    fn version(&self, t: Target) -> String {
        format!("{}:ver:{}", self.prefix, t.name())
    }

    /// Version → the wall-clock µs at which its invalidation returned.
    fn history(&self, t: Target) -> String {
        format!("{}:inv:{}", self.prefix, t.name())
    }
}

/// Microseconds since the Unix epoch, from `CLOCK_REALTIME`: the one clock every process of the machine
/// shares.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A connected, warmed-up L1 scenario.
pub(crate) struct Ready {
    cache: Cache<Stamped>,
    /// `staleness`: the source of truth's connection.
    raw: Option<Raw>,
    truth: Truth,
}

/// Warm up: write the warm keys (`hit_l1`) and read each until L1 answers it, which also proves that the
/// backplane vouches for L1 (this handle's first heartbeat came back). `staleness` readers do the same after
/// loading each key once through the source of truth; the writer only connects.
pub(crate) async fn prepare(
    kw: &Keyward,
    url: &str,
    app: &str,
    kind: Kind,
    work: &Workload,
) -> anyhow::Result<Ready> {
    let cache = kw
        .cache::<Stamped>(CLASS)
        .context("cannot open the bench L1 cache class")?;
    let truth = Truth::new(app, work.key_id);
    let mut raw = None;
    match kind {
        Kind::HitL1 => {
            let value = Stamped::sized(vec![work.key_id]);
            for k in 0..work.hit_keys {
                cache
                    .set(&cache_key(work.key_id, k), &value)
                    .await
                    .context("cannot warm the hit_l1 keys")?;
            }
            let value = Arc::new(value);
            warm(&cache, work, |_| {
                let v = Stamped::clone(&value);
                async move { Ok::<_, Infallible>(v) }
            })
            .await?;
        }
        Kind::Staleness => {
            let con = Raw::connect(url).await?;
            if work.process != 0 {
                let (con, truth) = (con.clone(), truth.clone());
                warm(&cache, work, move |k| load(con.clone(), truth.clone(), k)).await?;
            }
            raw = Some(con);
        }
    }
    Ok(Ready { cache, raw, truth })
}

/// Read every key until L1 answers it, for at most [`WARM_TIMEOUT`].
async fn warm<F, Fut, E>(cache: &Cache<Stamped>, work: &Workload, loader: F) -> anyhow::Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Stamped, E>>,
    E: Into<keyward::BoxError>,
{
    let deadline = Instant::now() + WARM_TIMEOUT;
    for k in 0..work.hit_keys {
        loop {
            let (_, lookup) = cache
                .get_or_set_tagged_with_status(
                    &cache_key(work.key_id, k),
                    &Target::tag_of(k),
                    || loader(k),
                )
                .await
                .context("warm-up read failed")?;
            if lookup == CacheLookup::L1Hit {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "L1 answered no read of key {k} within {WARM_TIMEOUT:?}: this process's backplane \
                     heartbeats did not come back (is the Redis server dropping pub/sub?)"
                );
            }
            // L1 serves only once this handle's own heartbeat came back: a quarter of l1_max_stale at most.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

/// The loader of `staleness`: the current versions of every target key `k` depends on, in one `MGET`.
async fn load(con: Raw, truth: Truth, k: u64) -> anyhow::Result<Stamped> {
    let keys: Vec<String> = Target::of(k).iter().map(|&t| truth.version(t)).collect();
    let versions: Vec<Option<u64>> = ask(
        &con,
        "read the versions",
        Query::Cmd(redis::cmd("MGET").arg(&keys)),
    )
    .await?;
    Ok(Stamped::sized(
        versions
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
    ))
}

/// A call to the source of truth: one command or a pipeline.
enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

/// One idempotent call to the source of truth, retried for up to [`TRUTH_PATIENCE`] when it fails.
async fn ask<T: redis::FromRedisValue>(
    con: &Raw,
    what: &str,
    query: Query<'_>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + TRUTH_PATIENCE;
    loop {
        let mut c = con.clone();
        let answer = match query {
            Query::Cmd(cmd) => cmd.query_async(&mut c).await,
            Query::Pipe(pipe) => pipe.query_async(&mut c).await,
        };
        match answer {
            Ok(v) => return Ok(v),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(RETRY_AFTER).await,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot {what} in the source of truth (retried for {TRUTH_PATIENCE:?})"
                )));
            }
        }
    }
}

impl Ready {
    /// The measured phase of `kind`.
    pub(crate) async fn run(self, kind: Kind, work: &Workload) -> anyhow::Result<Measured> {
        match kind {
            Kind::HitL1 => self.hit_l1(work).await,
            Kind::Staleness if work.process == 0 => self.write(work).await,
            Kind::Staleness => self.read(work).await,
        }
    }

    /// C workers loop `get_or_set_shared` on the warm keys (worker w on key w mod K) until the deadline; the
    /// loader must never run. `l1_hits` comes from the class's stats.
    async fn hit_l1(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + work.duration;
        let before = self.cache.stats().l1_hits;
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency {
            let (cache, counters) = (self.cache.clone(), Arc::clone(&counters));
            let key = cache_key(work.key_id, w as u64 % work.hit_keys);
            workers.spawn(async move {
                let mut latencies = new_histogram();
                let start = Instant::now();
                let mut n = 0u64;
                // One clock reading per read: the end of one read is the start of the next (a reading of the
                // clock is about a twentieth of an L1 hit here, so a second one per read showed up in the
                // rate). Only the yield below is kept out of the timed span.
                let mut t = start;
                loop {
                    if t >= deadline {
                        break;
                    }
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        async { Ok::<_, Infallible>(Stamped::sized(Vec::new())) }
                    };
                    // The shared read, the one documented for L1 classes: an L1 hit hands out the value
                    // decoded once per entry instead of decoding its bytes again.
                    let value = cache
                        .get_or_set_shared(&key, loader)
                        .await
                        .context("get_or_set_shared on the hit_l1 key failed")?;
                    let done = Instant::now();
                    latencies.saturating_record(measure::micros(done.saturating_duration_since(t)));
                    t = done;
                    std::hint::black_box(value);
                    n += 1;
                    if n.is_multiple_of(YIELD_EVERY) {
                        tokio::task::yield_now().await;
                        t = Instant::now();
                    }
                }
                anyhow::Ok((
                    latencies,
                    Span {
                        start,
                        end: Instant::now(),
                    },
                ))
            });
        }
        let mut measured = collect_histograms(workers, &counters).await?;
        measured.l1.l1_hits = self.cache.stats().l1_hits - before;
        Ok(measured)
    }

    /// The writer (process 0): one loop until the deadline, invalidating the targets in turn
    /// ([`Target::schedule`]) every `invalidate_every`. Each time: bump the target's version, invalidate
    /// (retried until it returns), read the clock, record the moment in the target's history.
    async fn write(self, work: &Workload) -> anyhow::Result<Measured> {
        let Some(con) = self.raw else {
            bail!("the staleness writer was not prepared with a Redis connection");
        };
        // The writer is the only one to bump versions: it knows each target's last one (0 in a fresh run).
        let mut versions = std::collections::HashMap::<String, u64>::new();
        let deadline = Instant::now() + work.duration;
        let start = Instant::now();
        let mut l1 = L1Counts::default();
        let mut first_error = None;
        let mut i = 0u64;
        'run: while Instant::now() < deadline {
            let target = Target::schedule(i, work.hit_keys);
            i += 1;
            let version = {
                let last = versions.entry(target.name()).or_default();
                *last += 1;
                *last
            };
            let mut bump = redis::cmd("SET");
            bump.arg(self.truth.version(target))
                .arg(version)
                .arg("PX")
                .arg(TRUTH_TTL_MS);
            let () = ask(&con, "bump a version", Query::Cmd(&bump)).await?;
            loop {
                match target.invalidate(&self.cache, work.key_id).await {
                    Ok(()) => break,
                    Err(e) => {
                        l1.invalidation_errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        if Instant::now() >= deadline {
                            // Never returned: nothing to record, and no read can be judged against it.
                            break 'run;
                        }
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
            }
            let returned = wall_us();
            let mut record = redis::pipe();
            record
                .hset(self.truth.history(target), version, returned)
                .ignore()
                .pexpire(self.truth.history(target), TRUTH_TTL_MS as i64)
                .ignore();
            let () = ask(&con, "record an invalidation", Query::Pipe(&record)).await?;
            match target {
                Target::Key(_) => l1.key_invalidations += 1,
                // Group invalidations: the class and the tags.
                Target::Class | Target::Tag(_) => l1.group_invalidations += 1,
            }
            tokio::time::sleep(work.invalidate_every).await;
        }
        if let Some(e) = first_error {
            eprintln!(
                "note: {} invalidation(s) failed and were retried; the first: {e}",
                l1.invalidation_errors
            );
        }
        let mut measured = Measured::empty();
        measured.seconds = start.elapsed().as_secs_f64();
        measured.l1 = l1;
        Ok(measured)
    }

    /// The readers (every other process): C workers loop `get_or_set` over the keys (worker w starting at
    /// key w) until the deadline. After each read, one round trip asks the history when the invalidation
    /// that superseded each version the value carries returned; if that was before the read started, the
    /// read was stale by the difference.
    async fn read(self, work: &Workload) -> anyhow::Result<Measured> {
        let Some(con) = self.raw else {
            bail!("the staleness readers were not prepared with a Redis connection");
        };
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(ReadCounts::default());
        let deadline = Instant::now() + work.duration;
        let bound_us = measure::micros(L1_MAX_STALE);
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency {
            let (cache, counters, shared) = (
                self.cache.clone(),
                Arc::clone(&counters),
                Arc::clone(&shared),
            );
            let (con, truth, key_id, keys) =
                (con.clone(), self.truth.clone(), work.key_id, work.hit_keys);
            workers.spawn(async move {
                let mut latencies = new_histogram();
                let start = Instant::now();
                let mut k = w as u64 % keys;
                while Instant::now() < deadline {
                    k = (k + 1) % keys;
                    let started = wall_us();
                    let t = Instant::now();
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        load(con.clone(), truth.clone(), k)
                    };
                    let read = cache
                        .get_or_set_tagged_with_status(
                            &cache_key(key_id, k),
                            &Target::tag_of(k),
                            loader,
                        )
                        .await;
                    let elapsed = t.elapsed();
                    let (value, lookup) = match read {
                        Ok(read) => read,
                        Err(e) => {
                            if shared.read_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "note: a staleness read failed (counted in read_errors): {e}"
                                );
                            }
                            continue;
                        }
                    };
                    latencies.saturating_record(measure::micros(elapsed));
                    if lookup == CacheLookup::L1Hit {
                        shared.l1_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    let targets = Target::of(k);
                    if value.versions.len() != targets.len() {
                        bail!(
                            "a value of key {k} carries {} versions",
                            value.versions.len()
                        );
                    }
                    let mut pipe = redis::pipe();
                    for (&target, &version) in targets.iter().zip(&value.versions) {
                        pipe.hget(truth.history(target), version + 1);
                    }
                    let returned: Vec<Option<u64>> =
                        ask(&con, "read the history", Query::Pipe(&pipe)).await?;
                    // The earliest invalidation of the value that returned before the read started.
                    if let Some(invalidated) = returned.into_iter().flatten().min()
                        && invalidated < started
                    {
                        let stale = started - invalidated;
                        shared.stale_reads.fetch_add(1, Ordering::Relaxed);
                        shared.max_stale_us.fetch_max(stale, Ordering::Relaxed);
                        if stale > bound_us {
                            counters.violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                anyhow::Ok((
                    latencies,
                    Span {
                        start,
                        end: Instant::now(),
                    },
                ))
            });
        }
        let mut measured = collect_histograms(workers, &counters).await?;
        measured.l1 = L1Counts {
            l1_hits: shared.l1_hits.load(Ordering::Relaxed),
            stale_reads: shared.stale_reads.load(Ordering::Relaxed),
            max_stale_us: shared.max_stale_us.load(Ordering::Relaxed),
            read_errors: shared.read_errors.load(Ordering::Relaxed),
            ..L1Counts::default()
        };
        Ok(measured)
    }
}

/// What the readers of one process count together.
#[derive(Default)]
struct ReadCounts {
    l1_hits: AtomicU64,
    stale_reads: AtomicU64,
    max_stale_us: AtomicU64,
    read_errors: AtomicU64,
}

/// What the family adds to the report: the L1 counts, and for `staleness` the bound, the staleness found
/// and the invalidations made.
pub(crate) fn fields(kind: Kind, measured: &Measured) -> ScenarioFields {
    let l1 = &measured.l1;
    let ratio = if measured.ops() == 0 {
        0.0
    } else {
        round(l1.l1_hits as f64 / measured.ops() as f64, 4)
    };
    let mut fields = ScenarioFields {
        l1_max_stale_ms: Some(u64::try_from(L1_MAX_STALE.as_millis()).unwrap_or(u64::MAX)),
        l1_hits: Some(l1.l1_hits),
        l1_hit_ratio: Some(ratio),
        ..ScenarioFields::default()
    };
    if kind == Kind::Staleness {
        fields.max_stale_us = Some(l1.max_stale_us);
        fields.stale_reads = Some(l1.stale_reads);
        fields.violations = Some(measured.violations);
        fields.key_invalidations = Some(l1.key_invalidations);
        fields.group_invalidations = Some(l1.group_invalidations);
        fields.invalidation_errors = Some(l1.invalidation_errors);
        fields.read_errors = Some(l1.read_errors);
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_invalidates_every_key_then_the_class_then_each_tag() {
        let order: Vec<Target> = (0..7).map(|i| Target::schedule(i, 2)).collect();
        assert_eq!(
            order,
            [
                Target::Key(0),
                Target::Key(1),
                Target::Class,
                Target::Tag(0),
                Target::Tag(1),
                Target::Key(0),
                Target::Key(1)
            ]
        );
        assert_eq!(Target::schedule(4, 1), Target::Key(0));
        assert_eq!(Target::schedule(5, 1), Target::Class);
    }

    #[test]
    fn the_truth_lives_in_one_slot_per_run_and_apart_per_target() {
        let truth = Truth::new("kwbench1", 7);
        let keys = [
            truth.version(Target::Key(3)),
            truth.history(Target::Key(3)),
            truth.version(Target::Class),
            truth.history(Target::Class),
        ];
        for key in &keys {
            assert!(key.starts_with("bench:{kwbench1:7}:_truth:"), "{key}");
        }
        let mut distinct = keys.to_vec();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn values_are_about_one_kib() {
        let len = serde_json::to_vec(&Stamped::sized(vec![12_345, 678]))
            .unwrap()
            .len();
        assert!((VALUE_BYTES..VALUE_BYTES + 40).contains(&len), "{len}");
    }
}
