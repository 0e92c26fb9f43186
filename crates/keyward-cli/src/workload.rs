//! The scenarios, measured inside one process: set-up (connect, warm) is separate from the measured phase, so
//! the caller can take its command-count snapshot or do the READY/GO handshake in between.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use keyward::policy::{CacheClass, Policy};
use keyward::{Cache, Keyward};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::bench::Scenario;

/// Target size of one cached value, JSON-encoded.
const VALUE_BYTES: usize = 1024;
/// Highest latency the histograms track (60 s, in µs); slower operations are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;
/// The one cache class of the bench policy.
const CLASS: &str = "bench";

/// The value the benchmark caches: a record shaped like a typical API object, ≈1 KiB as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Item {
    id: u64,
    name: String,
    tags: Vec<String>,
    body: String,
}

impl Item {
    /// An item whose JSON encoding is [`VALUE_BYTES`] long (give or take the digits of `id`).
    pub(crate) fn sized(id: u64) -> Self {
        let mut item = Item {
            id,
            name: format!("benchmark item {id}"),
            tags: ["bench", "keyward", "cache", "redis"]
                .map(str::to_owned)
                .to_vec(),
            body: String::new(),
        };
        let bare = serde_json::to_vec(&item).map_or(0, |v| v.len());
        item.body = "x".repeat(VALUE_BYTES.saturating_sub(bare));
        item
    }
}

/// The policy every bench process uses: one cache class, in a namespace of its own (`app`).
pub(crate) fn policy(app: &str) -> anyhow::Result<Policy> {
    Policy::builder("bench", app)
        .cache(
            CLASS,
            CacheClass::new(Duration::from_secs(600), "keyward bench")
                .lease_ttl(Duration::from_secs(10))
                .loader_timeout(Duration::from_secs(5))
                .max_value_bytes(1024 * 1024),
        )
        .build()
        .context("the built-in bench policy is invalid")
}

/// What one process runs.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) scenario: Scenario,
    /// Concurrent callers in this process.
    pub(crate) concurrency: usize,
    /// How long `hit` runs.
    pub(crate) duration: Duration,
    /// `miss`: how many keys this process loads, and the index of its first one.
    pub(crate) keys: u64,
    pub(crate) key_offset: u64,
    /// `hit` and `get`: how many warm keys the workers spread over.
    pub(crate) hit_keys: u64,
    /// `stampede`: how long the loader takes.
    pub(crate) loader_delay: Duration,
    /// Names the run's key(s), so every run starts cold.
    pub(crate) key_id: u64,
}

/// What one process measured.
#[derive(Debug)]
pub(crate) struct Measured {
    pub(crate) loader_calls: u64,
    pub(crate) seconds: f64,
    /// Latency of every operation, in µs; its length is the operation count.
    pub(crate) latencies: Histogram<u64>,
}

/// A connected, warmed-up workload, ready for its measured phase.
pub(crate) struct Prepared {
    work: Workload,
    cache: Cache<Item>,
    value: Arc<Item>,
    /// `get`: a plain redis-rs connection, as an application without keyward would hold.
    raw: Option<redis::aio::ConnectionManager>,
    /// The namespace app name (the baseline's keys live under it).
    app: String,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Connect to `url` in namespace `app` and warm up (one fill of a key of its own; for `hit`, the hit key is
/// written with `set`).
pub(crate) async fn prepare(url: &str, app: &str, work: Workload) -> anyhow::Result<Prepared> {
    let kw = Keyward::connect(url, policy(app)?)
        .await
        .map_err(|e| match e {
            keyward::Error::InvalidUrl { .. } => {
                anyhow::Error::new(crate::UsageError(e.to_string()))
            }
            other => anyhow::Error::new(other),
        })?;
    let cache = kw
        .cache::<Item>(CLASS)
        .context("cannot open the bench cache class")?;
    let value = Arc::new(Item::sized(work.key_id));
    // Warm-up, outside the measured phase: one fill of a key of its own loads keyward's scripts into Redis
    // and opens the connection, so one-time costs do not count against the scenario.
    let warm = Item::clone(&value);
    cache
        .get_or_set(&("warmup", work.key_id), || async move {
            Ok::<_, Infallible>(warm)
        })
        .await
        .context("warm-up get_or_set failed")?;
    let mut raw = None;
    match work.scenario {
        Scenario::Hit => {
            for k in 0..work.hit_keys {
                cache
                    .set(&("hit", work.key_id, k), &value)
                    .await
                    .context("cannot warm the hit keys")?;
            }
        }
        Scenario::Get => {
            let client = redis::Client::open(url).context("cannot open the baseline client")?;
            let mut con = client
                .get_connection_manager()
                .await
                .context("cannot connect the baseline client")?;
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
        Scenario::Miss | Scenario::Stampede => {}
    }
    Ok(Prepared {
        work,
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

/// When the measured operations of one worker started and ended.
struct Span {
    start: Instant,
    end: Instant,
}

/// Merges what workers report.
struct Tally {
    latencies: Histogram<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latencies: new_histogram(),
            first: None,
            last: None,
        }
    }

    fn span(&mut self, span: &Span) {
        self.first = Some(self.first.map_or(span.start, |f| f.min(span.start)));
        self.last = Some(self.last.map_or(span.end, |l| l.max(span.end)));
    }

    fn finish(self, loader_calls: &AtomicU64) -> Measured {
        let seconds = match (self.first, self.last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        Measured {
            loader_calls: loader_calls.load(Ordering::Relaxed),
            seconds,
            latencies: self.latencies,
        }
    }
}

/// Call `op` in a loop until `deadline`, recording each call's latency.
async fn until_deadline<F, Fut>(
    deadline: Instant,
    mut op: F,
) -> anyhow::Result<(Histogram<u64>, Span)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut latencies = new_histogram();
    let start = Instant::now();
    loop {
        let t = Instant::now();
        if t >= deadline {
            break;
        }
        op().await?;
        latencies.saturating_record(micros(t.elapsed()));
    }
    Ok((
        latencies,
        Span {
            start,
            end: Instant::now(),
        },
    ))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Prepared {
    /// The measured phase.
    pub(crate) async fn run(self) -> anyhow::Result<Measured> {
        match self.work.scenario {
            Scenario::Hit => self.hit().await,
            Scenario::Miss => self.miss().await,
            Scenario::Stampede => self.stampede().await,
            Scenario::Get => self.get().await,
        }
    }

    /// C workers loop `get_or_set` on the warm key until the deadline; the loader must never run.
    async fn hit(self) -> anyhow::Result<Measured> {
        let calls = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + self.work.duration;
        let mut workers = JoinSet::new();
        for w in 0..self.work.concurrency {
            let (cache, value, calls) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&calls),
            );
            let key = ("hit", self.work.key_id, w as u64 % self.work.hit_keys);
            workers.spawn(until_deadline(deadline, move || {
                let (cache, value, calls) = (cache.clone(), Arc::clone(&value), Arc::clone(&calls));
                async move {
                    let loader = || {
                        calls.fetch_add(1, Ordering::Relaxed);
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
        collect_histograms(workers, &calls).await
    }

    /// The baseline: C workers loop a plain GET + JSON decode of the warm value until the deadline.
    async fn get(self) -> anyhow::Result<Measured> {
        let calls = Arc::new(AtomicU64::new(0));
        let Some(con) = self.raw else {
            anyhow::bail!("the get baseline was not prepared with a Redis connection");
        };
        let deadline = Instant::now() + self.work.duration;
        let mut workers = JoinSet::new();
        for w in 0..self.work.concurrency {
            let con = con.clone();
            let key = Arc::new(raw_key(
                &self.app,
                self.work.key_id,
                w as u64 % self.work.hit_keys,
            ));
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
        collect_histograms(workers, &calls).await
    }

    /// C workers take key indices from a shared counter until all N cold keys are loaded once.
    async fn miss(self) -> anyhow::Result<Measured> {
        let calls = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (keys, offset, key_id) = (self.work.keys, self.work.key_offset, self.work.key_id);
        let mut workers = JoinSet::new();
        for _ in 0..self.work.concurrency {
            let (cache, calls, next) = (self.cache.clone(), Arc::clone(&calls), Arc::clone(&next));
            workers.spawn(async move {
                let mut latencies = new_histogram();
                let start = Instant::now();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        break;
                    }
                    let index = offset + i;
                    let t = Instant::now();
                    let loader = || {
                        calls.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Infallible>(Item::sized(index)) }
                    };
                    cache
                        .get_or_set(&("miss", key_id, index), loader)
                        .await
                        .with_context(|| format!("get_or_set on miss key {index} failed"))?;
                    latencies.saturating_record(micros(t.elapsed()));
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
        collect_histograms(workers, &calls).await
    }

    /// C callers wait on a barrier, then all ask for one cold key whose loader is slow.
    async fn stampede(self) -> anyhow::Result<Measured> {
        let calls = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(self.work.concurrency));
        let key = ("stampede", self.work.key_id);
        let delay = self.work.loader_delay;
        let mut callers = JoinSet::new();
        for _ in 0..self.work.concurrency {
            let (cache, value, calls, barrier) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&calls),
                Arc::clone(&barrier),
            );
            callers.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let loader = || {
                    calls.fetch_add(1, Ordering::Relaxed);
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
        let mut tally = Tally::new();
        while let Some(joined) = callers.join_next().await {
            let span = joined.context("a benchmark task panicked")??;
            tally
                .latencies
                .saturating_record(micros(span.end - span.start));
            tally.span(&span);
        }
        Ok(tally.finish(&calls))
    }
}

async fn collect_histograms(
    mut workers: JoinSet<anyhow::Result<(Histogram<u64>, Span)>>,
    calls: &AtomicU64,
) -> anyhow::Result<Measured> {
    let mut tally = Tally::new();
    while let Some(joined) = workers.join_next().await {
        let (latencies, span) = joined.context("a benchmark task panicked")??;
        if latencies.is_empty() {
            continue;
        }
        tally
            .latencies
            .add(&latencies)
            .context("cannot merge latency histograms")?;
        tally.span(&span);
    }
    Ok(tally.finish(calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_about_one_kib() {
        for id in [0, 7, 12_345, u64::MAX] {
            let len = serde_json::to_vec(&Item::sized(id)).unwrap().len();
            assert!((VALUE_BYTES..VALUE_BYTES + 40).contains(&len), "{len}");
        }
    }

    #[test]
    fn the_bench_policy_is_valid() {
        let policy = policy("kwbench42").unwrap();
        assert_eq!(policy.app(), "kwbench42");
        assert!(policy.class(CLASS).is_some());
    }
}
