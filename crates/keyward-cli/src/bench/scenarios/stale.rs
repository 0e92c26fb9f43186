//! The fail-safe family: `stale_serve`, reads of keys past their TTL while the source is down.
//!
//! The one decision: **the measured phase starts only once every key has been served stale**. Preparing
//! writes the keys, waits out their TTL, and reads each one with the failing loader until keyward answers it
//! with [`CacheLookup::Stale`]; a key that never is fails the run before anything is measured. During the
//! measured phase every read is counted by how keyward answered it, and a run that served no stale value is
//! an error, not a figure: with a 1 s TTL, a 1 min `stale_grace` and a 50 ms `fail_safe_throttle`, each key
//! alternates between a stale serve (a refill whose loader failed; the value is stored again as current)
//! and 50 ms of plain hits, so the mix of the two depends on how often each key is read (`--keys`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use keyward::policy::{CacheClass, Jitter};
use keyward::{Cache, CacheLookup, Keyward};
use tokio::task::JoinSet;

use super::workload::{Item, Workload};
use crate::bench::measure::{self, Counters, Measured, Span, StaleCounts, collect_histograms};
use crate::bench::report::{ScenarioFields, round};

/// The family's cache class (in the policy of its scenario only).
pub(crate) const CLASS: &str = "bench_stale";
/// The class's TTL: short, so that the keys go stale soon after they are written.
pub(crate) const TTL: Duration = Duration::from_secs(1);
/// The class's `stale_grace`: far longer than a run needs (each failed refill extends it again).
pub(crate) const STALE_GRACE: Duration = Duration::from_secs(60);
/// The class's `fail_safe_throttle`: short, so that the failing loader keeps being tried.
pub(crate) const FAIL_SAFE_THROTTLE: Duration = Duration::from_millis(50);
/// How long preparing may wait, past the TTL, for every key to be served stale once.
const STALE_WAIT: Duration = Duration::from_secs(10);
/// How long preparing waits before reading a key again that was not yet served stale.
const STALE_POLL: Duration = Duration::from_millis(5);

/// The family's class: [`TTL`] without jitter (every key goes stale at a known moment), [`STALE_GRACE`],
/// [`FAIL_SAFE_THROTTLE`], and the bench class's lease, loader timeout and value limit. No L1: every read
/// asks the store, which is where fail-safe keeps the stale value.
pub(crate) fn class() -> CacheClass {
    CacheClass::new(TTL, "keyward bench (fail-safe): never invalidated")
        .jitter(Jitter::Percent(0.0))
        .lease_ttl(Duration::from_secs(10))
        .loader_timeout(Duration::from_secs(5))
        .max_value_bytes(1024 * 1024)
        .stale_grace(STALE_GRACE)
        .fail_safe_throttle(FAIL_SAFE_THROTTLE)
}

/// The error of the loader that always fails: the source of the values is down.
#[derive(Debug, thiserror::Error)]
#[error("the bench source is down (stale_serve's loader always fails)")]
struct SourceDown;

/// The cache id of key `k` of run `key_id`.
fn cache_key(key_id: u64, k: u64) -> (&'static str, u64, u64) {
    ("stale", key_id, k)
}

/// The keys worker `w` of `c` reads, in turn: `w`, `w + c`, `w + 2c`, … modulo `keys`.
fn nth_key(w: u64, c: u64, i: u64, keys: u64) -> u64 {
    w.wrapping_add(i.wrapping_mul(c)) % keys
}

/// A connected scenario whose keys have all been served stale once.
pub(crate) struct Ready {
    cache: Cache<Item>,
}

/// Write the `--keys` keys, wait out their TTL, then read each with the failing loader until it is served
/// stale (at most [`STALE_WAIT`] past the TTL). `concurrency` workers share the keys.
pub(crate) async fn prepare(kw: &Keyward, work: &Workload) -> anyhow::Result<Ready> {
    let cache = kw
        .cache::<Item>(CLASS)
        .context("cannot open the bench fail-safe cache class")?;
    let value = Arc::new(Item::sized(work.key_id));
    let written = Instant::now();
    let (keys, c) = (work.keys, work.concurrency as u64);
    let mut writers = JoinSet::new();
    for w in 0..c.min(keys) {
        let (cache, value, key_id) = (cache.clone(), Arc::clone(&value), work.key_id);
        writers.spawn(async move {
            for k in (w..keys).step_by(usize::try_from(c).unwrap_or(usize::MAX)) {
                cache
                    .set(&cache_key(key_id, k), &*value)
                    .await
                    .with_context(|| format!("cannot write stale_serve key {k}"))?;
            }
            anyhow::Ok(())
        });
    }
    join_all(writers).await?;
    // Nothing can be stale before the TTL has passed since the first write.
    tokio::time::sleep_until((written + TTL).into()).await;
    let deadline = Instant::now() + STALE_WAIT;
    let mut waiters = JoinSet::new();
    for w in 0..c.min(keys) {
        let (cache, key_id) = (cache.clone(), work.key_id);
        waiters.spawn(async move {
            for k in (w..keys).step_by(usize::try_from(c).unwrap_or(usize::MAX)) {
                loop {
                    let (_, lookup) = cache
                        .get_or_set_with_status(&cache_key(key_id, k), || async {
                            Err::<Item, _>(SourceDown)
                        })
                        .await
                        .with_context(|| {
                            format!(
                                "stale_serve key {k} was not served stale after its TTL ({TTL:?}): \
                                 fail-safe (stale_grace {STALE_GRACE:?}) did not keep it"
                            )
                        })?;
                    if matches!(lookup, CacheLookup::Stale(_)) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "stale_serve key {k} was still answered `{}` {STALE_WAIT:?} after its TTL \
                             ({TTL:?}) ran out; it never went stale",
                            lookup.as_str()
                        );
                    }
                    tokio::time::sleep(STALE_POLL).await;
                }
            }
            anyhow::Ok(())
        });
    }
    join_all(waiters).await?;
    Ok(Ready { cache })
}

async fn join_all(mut set: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(joined) = set.join_next().await {
        joined.context("a stale_serve set-up task panicked")??;
    }
    Ok(())
}

impl Ready {
    /// C workers loop `get_or_set_with_status` with the failing loader until the deadline, worker w reading
    /// keys w, w+C, w+2C, … modulo K; each read is counted by how it was answered. Reads that fail are
    /// counted, not ops, and do not stop the run.
    ///
    /// # Errors
    /// When no read was served stale: the scenario measured something else.
    pub(crate) async fn run(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + work.duration;
        let (keys, c, key_id) = (work.keys, work.concurrency as u64, work.key_id);
        // Each worker adds its counts here once, when it stops.
        let shared = Arc::new(Mutex::new(StaleCounts::default()));
        let mut workers = JoinSet::new();
        for w in 0..c {
            let (cache, counters, shared) = (
                self.cache.clone(),
                Arc::clone(&counters),
                Arc::clone(&shared),
            );
            workers.spawn(async move {
                let mut latencies = measure::new_histogram();
                let mut counts = StaleCounts::default();
                let start = Instant::now();
                let mut i = 0u64;
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break;
                    }
                    let key = cache_key(key_id, nth_key(w, c, i, keys));
                    i += 1;
                    let loader = || {
                        counters
                            .loader_calls
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async { Err::<Item, _>(SourceDown) }
                    };
                    match cache.get_or_set_with_status(&key, loader).await {
                        Ok((value, lookup)) => {
                            let us = measure::micros(t.elapsed());
                            latencies.saturating_record(us);
                            if matches!(lookup, CacheLookup::Stale(_)) {
                                counts.stale_latencies.saturating_record(us);
                            }
                            *counts.lookups.entry(lookup.as_str()).or_default() += 1;
                            std::hint::black_box(value);
                        }
                        Err(_) => counts.errors += 1,
                    }
                }
                let end = Instant::now();
                shared
                    .lock()
                    .map_err(|_| anyhow::anyhow!("a stale_serve worker panicked"))?
                    .merge(&counts)?;
                anyhow::Ok((latencies, Span { start, end }))
            });
        }
        let mut measured = collect_histograms(workers, &counters).await?;
        let stale = std::mem::take(
            &mut *shared
                .lock()
                .map_err(|_| anyhow::anyhow!("a stale_serve worker panicked"))?,
        );
        let served = stale.stale_latencies.len();
        if served == 0 {
            bail!(
                "stale_serve served no stale value in {} reads ({} failed; lookups {:?}): the measured \
                 phase did not exercise fail-safe",
                measured.ops(),
                stale.errors,
                stale.lookups
            );
        }
        measured.stale = stale;
        Ok(measured)
    }
}

/// What the family adds to the report: the class's windows, the key count, the stale serves (count, share
/// and latency), the reads by lookup and the failed reads.
pub(crate) fn fields(work: &Workload, measured: &Measured) -> ScenarioFields {
    let stale = &measured.stale;
    let served = stale.stale_latencies.len();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let quantile = |q| (served > 0).then(|| stale.stale_latencies.value_at_quantile(q));
    ScenarioFields {
        ttl_ms: Some(ms(TTL)),
        stale_grace_ms: Some(ms(STALE_GRACE)),
        fail_safe_throttle_ms: Some(ms(FAIL_SAFE_THROTTLE)),
        keys: Some(work.keys),
        stale_served: Some(served),
        stale_ratio: Some(if measured.ops() == 0 {
            0.0
        } else {
            round(served as f64 / measured.ops() as f64, 4)
        }),
        stale_p50_us: quantile(0.50),
        stale_p99_us: quantile(0.99),
        lookups: Some(
            stale
                .lookups
                .iter()
                .map(|(name, n)| ((*name).to_owned(), *n))
                .collect(),
        ),
        errors: Some(stale.errors),
        ..ScenarioFields::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_is_valid_and_keeps_stale_values() {
        let policy = keyward::policy::Policy::builder("bench", "kwbench1")
            .cache(CLASS, class())
            .build()
            .unwrap();
        let class = policy.class(CLASS).unwrap().as_cache().unwrap();
        assert_eq!(class.stale_grace_value(), Some(STALE_GRACE));
        assert_eq!(class.fail_safe_throttle_value(), FAIL_SAFE_THROTTLE);
        // No jitter: the stored TTL is exactly ttl + stale_grace.
        assert_eq!(class.stored_ttl(), TTL + STALE_GRACE);
    }

    #[test]
    fn workers_cover_every_key_and_keep_their_own_when_keys_equal_workers() {
        let (c, keys) = (4, 10);
        let mut seen = std::collections::BTreeSet::new();
        for w in 0..c {
            for i in 0..keys {
                seen.insert(nth_key(w, c, i, keys));
            }
        }
        assert_eq!(seen.len(), 10);
        assert!((0..20).all(|i| nth_key(3, 8, i, 8) == 3));
    }
}
