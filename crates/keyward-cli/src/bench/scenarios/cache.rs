//! The cache family: `hit`, `miss`, `stampede`, and the `get` baseline without keyward.
//!
//! The one decision: `get` goes through the same client type (redis-rs's `ConnectionManager`, cloned per
//! call as keyward's backend does) and decodes the same ≈1 KiB JSON value, so that `hit / get` is keyward's
//! own overhead and nothing else. On a Cluster it is redis-rs's async cluster client, the one keyward uses
//! there.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keyward::policy::CacheClass;
use keyward::{Cache, Keyward};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::raw::Raw;
use super::workload::{Item, Workload};
use crate::bench::measure::{
    self, Counters, Measured, Span, collect_histograms, one_shot_tally, until_deadline,
};

/// The one cache class of the bench policy (in every scenario's policy).
pub(crate) const CLASS: &str = "bench";

/// The scenarios of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Hit,
    Miss,
    Stampede,
    Get,
}

/// The bench's cache class: 10 min TTL, a 10 s fill lease, a 5 s loader timeout, values up to 1 MiB.
pub(crate) fn class() -> CacheClass {
    CacheClass::new(Duration::from_secs(600), "keyward bench")
        .lease_ttl(Duration::from_secs(10))
        .loader_timeout(Duration::from_secs(5))
        .max_value_bytes(1024 * 1024)
}

/// A connected, warmed-up cache scenario.
pub(crate) struct Ready {
    cache: Cache<Item>,
    value: Arc<Item>,
    /// `get`: a plain redis-rs connection, as an application without keyward would hold.
    raw: Option<Raw>,
    /// The namespace app name (the baseline's keys live under it).
    app: String,
}

/// Warm up with one fill of a key of its own; then `hit` writes its warm keys with `set`, and `get` opens
/// its own redis-rs connection and writes the baseline's keys.
pub(crate) async fn prepare(
    kw: &Keyward,
    url: &str,
    app: &str,
    kind: Kind,
    work: &Workload,
) -> anyhow::Result<Ready> {
    let cache = kw
        .cache::<Item>(CLASS)
        .context("cannot open the bench cache class")?;
    let value = Arc::new(Item::sized(work.key_id));
    let warm = Item::clone(&value);
    cache
        .get_or_set(&("warmup", work.key_id), || async move {
            Ok::<_, Infallible>(warm)
        })
        .await
        .context("warm-up get_or_set failed")?;
    let mut raw = None;
    match kind {
        Kind::Hit => {
            for k in 0..work.hit_keys {
                cache
                    .set(&("hit", work.key_id, k), &value)
                    .await
                    .context("cannot warm the hit keys")?;
            }
        }
        Kind::Get => {
            let mut con = Raw::connect(url).await?;
            let bytes = serde_json::to_vec(&*value)?;
            for k in 0..work.hit_keys {
                let _: () = redis::cmd("SET")
                    .arg(raw_key(app, work.key_id, k))
                    .arg(&bytes)
                    .arg("PX")
                    .arg(600_000)
                    .query_async(&mut con)
                    .await
                    .context("cannot warm the baseline keys")?;
            }
            raw = Some(con);
        }
        Kind::Miss | Kind::Stampede => {}
    }
    Ok(Ready {
        cache,
        value,
        raw,
        app: app.to_owned(),
    })
}

/// The baseline's keys: in the bench namespace, with a TTL, like everything else the bench writes.
fn raw_key(app: &str, key_id: u64, k: u64) -> String {
    format!("bench:{app}:_baseline:{key_id}:{k}")
}

impl Ready {
    /// The measured phase of `kind`.
    pub(crate) async fn run(self, kind: Kind, work: &Workload) -> anyhow::Result<Measured> {
        match kind {
            Kind::Hit => self.hit(work).await,
            Kind::Miss => self.miss(work).await,
            Kind::Stampede => self.stampede(work).await,
            Kind::Get => self.get(work).await,
        }
    }

    /// C workers loop `get_or_set` on the warm key until the deadline; the loader must never run.
    async fn hit(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + work.duration;
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency {
            let (cache, value, counters) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&counters),
            );
            let key = ("hit", work.key_id, w as u64 % work.hit_keys);
            workers.spawn(until_deadline(deadline, move || {
                let (cache, value, counters) =
                    (cache.clone(), Arc::clone(&value), Arc::clone(&counters));
                async move {
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        let v = Item::clone(&value);
                        async move { Ok::<_, Infallible>(v) }
                    };
                    cache
                        .get_or_set(&key, loader)
                        .await
                        .context("get_or_set on the hit key failed")?;
                    Ok(())
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// The baseline: C workers loop a plain GET + JSON decode of the warm value until the deadline.
    async fn get(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let Some(con) = self.raw else {
            anyhow::bail!("the get baseline was not prepared with a Redis connection");
        };
        let deadline = Instant::now() + work.duration;
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency {
            let con = con.clone();
            let key = Arc::new(raw_key(&self.app, work.key_id, w as u64 % work.hit_keys));
            workers.spawn(until_deadline(deadline, move || {
                // A clone per call, as keyward's backend does: the same cost on both sides.
                let (mut con, key) = (con.clone(), Arc::clone(&key));
                async move {
                    let bytes: Vec<u8> = redis::cmd("GET")
                        .arg(key.as_str())
                        .query_async(&mut con)
                        .await
                        .context("GET on the baseline key failed")?;
                    let item: Item =
                        serde_json::from_slice(&bytes).context("baseline value did not decode")?;
                    std::hint::black_box(item);
                    Ok(())
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// C workers take key indices from a shared counter until all N cold keys are loaded once.
    async fn miss(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let next = Arc::new(AtomicU64::new(0));
        let (keys, offset, key_id) = (work.keys, work.key_offset, work.key_id);
        let mut workers = JoinSet::new();
        // Every worker's histogram made before any worker starts: making one zeroes a few hundred KiB, which
        // would otherwise fall inside the other workers' measured spans (this run lasts well under a second).
        let histograms: Vec<_> = (0..work.concurrency)
            .map(|_| measure::new_histogram())
            .collect();
        for mut latencies in histograms {
            let (cache, counters, next) =
                (self.cache.clone(), Arc::clone(&counters), Arc::clone(&next));
            workers.spawn(async move {
                let start = Instant::now();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        break;
                    }
                    let index = offset + i;
                    let t = Instant::now();
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Infallible>(Item::sized(index)) }
                    };
                    cache
                        .get_or_set(&("miss", key_id, index), loader)
                        .await
                        .with_context(|| format!("get_or_set on miss key {index} failed"))?;
                    latencies.saturating_record(measure::micros(t.elapsed()));
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
        collect_histograms(workers, &counters).await
    }

    /// C callers wait on a barrier, then all ask for one cold key whose loader is slow.
    async fn stampede(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let barrier = Arc::new(Barrier::new(work.concurrency));
        let key = ("stampede", work.key_id);
        let delay = work.loader_delay;
        let mut callers = JoinSet::new();
        for _ in 0..work.concurrency {
            let (cache, value, counters, barrier) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&counters),
                Arc::clone(&barrier),
            );
            callers.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let loader = || {
                    counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                    let v = Item::clone(&value);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(v)
                    }
                };
                cache
                    .get_or_set(&key, loader)
                    .await
                    .context("get_or_set on the stampede key failed")?;
                anyhow::Ok(Span {
                    start,
                    end: Instant::now(),
                })
            });
        }
        one_shot_tally(callers, &counters).await
    }
}
