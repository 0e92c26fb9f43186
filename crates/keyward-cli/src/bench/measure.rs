//! Measuring, shared by every scenario: latency histograms (µs), the span of a run, the counts workers keep,
//! and the loops that drive workers (until a deadline, or for a number of calls).
//!
//! The one decision: a scenario's figures are a [`Measured`], whatever its family, so that the fleet can add
//! the children's up (counts summed, histograms merged, the slowest child's seconds) without knowing which
//! scenario ran, and the report reads one shape.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// Highest latency the histograms track (60 s, in µs); slower operations are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one process (or, merged, a fleet) measured.
#[derive(Debug)]
pub(crate) struct Measured {
    pub(crate) loader_calls: u64,
    /// Rate-limit scenarios: checks allowed and refused.
    pub(crate) allowed: u64,
    pub(crate) limited: u64,
    /// `lock --names one`: mutual-exclusion violations seen, and `lock` calls that gave up at the class's
    /// wait.
    pub(crate) violations: u64,
    pub(crate) timeouts: u64,
    /// `lock --names one`: acquisitions by the worker that held the lock last in its process.
    pub(crate) reacquired: u64,
    pub(crate) seconds: f64,
    /// Latency of every operation, in µs; its length is the operation count.
    pub(crate) latencies: Histogram<u64>,
    /// The L1 scenarios' counts (all zero for the others).
    pub(crate) l1: L1Counts,
    /// `stale_serve`'s counts (empty for the others).
    pub(crate) stale: StaleCounts,
    /// The stream scenarios' counts (all zero for the others).
    pub(crate) stream: StreamCounts,
}

/// What the stream scenarios count besides latencies. Merged across processes by adding up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StreamCounts {
    /// Events published (`stream_produce`: in the measured phase; `stream_e2e`: by the producer).
    pub(crate) published: u64,
    /// Publish calls (`publish`, or `publish_many` of `--batch` events).
    pub(crate) publish_calls: u64,
    /// `stream_e2e`: handler calls (every delivery, duplicates included), from the workers' reports.
    pub(crate) handled: u64,
    /// `stream_e2e`: the workers' `WorkerReport` counts.
    pub(crate) failed: u64,
    pub(crate) dead_lettered: u64,
    /// The workers' `WorkerReport::lost` (entries trimmed past the hard cap while pending).
    pub(crate) worker_lost: u64,
    pub(crate) group_recreated: u64,
    /// `stream_e2e`: `group_info` calls the producer made while waiting for the group to drain.
    pub(crate) drain_polls: u64,
    /// `stream_chaos`: events no handler recorded that are not dead letters; handler calls beyond one
    /// per event (from the hash of handled events); worker processes killed.
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) kills: u64,
    /// `stream_chaos`: successful handler calls in every process, killed ones included (the hash's sum).
    pub(crate) recorded: u64,
}

impl StreamCounts {
    fn merge(&mut self, other: &StreamCounts) {
        self.published += other.published;
        self.publish_calls += other.publish_calls;
        self.handled += other.handled;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.worker_lost += other.worker_lost;
        self.group_recreated += other.group_recreated;
        self.drain_polls += other.drain_polls;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.kills += other.kills;
        self.recorded += other.recorded;
    }
}

/// What the L1 scenarios (`hit_l1`, `staleness`) count besides latencies. Merged across processes by adding
/// up, except `max_stale_us` (the largest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct L1Counts {
    /// Reads answered by the in-process tier.
    pub(crate) l1_hits: u64,
    /// `staleness`: reads that returned a value whose invalidation had returned before the read started.
    pub(crate) stale_reads: u64,
    /// `staleness`: the longest such a read started after that invalidation returned, in µs.
    pub(crate) max_stale_us: u64,
    /// `staleness`: invalidations of one key, and of the whole class, that returned.
    pub(crate) key_invalidations: u64,
    pub(crate) group_invalidations: u64,
    /// `staleness`: invalidation calls that failed (retried until one returns), and reads that failed.
    pub(crate) invalidation_errors: u64,
    pub(crate) read_errors: u64,
}

impl L1Counts {
    fn merge(&mut self, other: &L1Counts) {
        self.l1_hits += other.l1_hits;
        self.stale_reads += other.stale_reads;
        self.max_stale_us = self.max_stale_us.max(other.max_stale_us);
        self.key_invalidations += other.key_invalidations;
        self.group_invalidations += other.group_invalidations;
        self.invalidation_errors += other.invalidation_errors;
        self.read_errors += other.read_errors;
    }
}

/// What `stale_serve` counts besides the latencies of all reads: how each read was answered, the reads that
/// failed, and the latencies of the reads answered with a stale value. Merged by adding up.
#[derive(Debug)]
pub(crate) struct StaleCounts {
    /// Reads per [`keyward::CacheLookup::as_str`] (`hit`, `stale_loader_error`, `coalesced`, …).
    pub(crate) lookups: BTreeMap<&'static str, u64>,
    /// Reads that returned an error (not counted as ops).
    pub(crate) errors: u64,
    /// Latency of every read answered with a stale value, in µs.
    pub(crate) stale_latencies: Histogram<u64>,
}

impl Default for StaleCounts {
    fn default() -> Self {
        Self {
            lookups: BTreeMap::new(),
            errors: 0,
            stale_latencies: new_histogram(),
        }
    }
}

impl StaleCounts {
    /// Add another worker's (or process's) counts.
    ///
    /// # Errors
    /// When the histograms cannot be merged (a value beyond the other's bounds).
    pub(crate) fn merge(&mut self, other: &StaleCounts) -> anyhow::Result<()> {
        for (name, n) in &other.lookups {
            *self.lookups.entry(name).or_default() += n;
        }
        self.errors += other.errors;
        self.stale_latencies
            .add(&other.stale_latencies)
            .context("cannot merge stale-serve latency histograms")
    }
}

impl Measured {
    /// Nothing measured yet: the start of a merge.
    pub(crate) fn empty() -> Self {
        Self {
            loader_calls: 0,
            allowed: 0,
            limited: 0,
            violations: 0,
            timeouts: 0,
            reacquired: 0,
            seconds: 0.0,
            latencies: new_histogram(),
            l1: L1Counts::default(),
            stale: StaleCounts::default(),
            stream: StreamCounts::default(),
        }
    }

    /// Add another process's figures: counts add up, histograms merge, `seconds` is the longer of the two
    /// (processes run side by side).
    ///
    /// # Errors
    /// When the histograms cannot be merged (a value beyond the other's bounds).
    pub(crate) fn merge(&mut self, other: &Measured) -> anyhow::Result<()> {
        self.loader_calls += other.loader_calls;
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.violations += other.violations;
        self.timeouts += other.timeouts;
        self.reacquired += other.reacquired;
        self.seconds = self.seconds.max(other.seconds);
        self.l1.merge(&other.l1);
        self.stream.merge(&other.stream);
        self.stale.merge(&other.stale)?;
        self.latencies
            .add(&other.latencies)
            .context("cannot merge latency histograms")
    }

    /// The operation count.
    pub(crate) fn ops(&self) -> u64 {
        self.latencies.len()
    }
}

/// An empty latency histogram: 1 µs to 60 s, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// When the measured operations of one worker started and ended.
pub(crate) struct Span {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
}

/// What the workers of one process count besides latencies.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) loader_calls: AtomicU64,
    pub(crate) allowed: AtomicU64,
    pub(crate) limited: AtomicU64,
    pub(crate) violations: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) reacquired: AtomicU64,
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

    fn finish(self, counters: &Counters) -> Measured {
        let seconds = match (self.first, self.last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        Measured {
            loader_calls: counters.loader_calls.load(Ordering::Relaxed),
            allowed: counters.allowed.load(Ordering::Relaxed),
            limited: counters.limited.load(Ordering::Relaxed),
            violations: counters.violations.load(Ordering::Relaxed),
            timeouts: counters.timeouts.load(Ordering::Relaxed),
            reacquired: counters.reacquired.load(Ordering::Relaxed),
            seconds,
            latencies: self.latencies,
            l1: L1Counts::default(),
            stale: StaleCounts::default(),
            stream: StreamCounts::default(),
        }
    }
}

/// Joins callers that each made one timed call, and tallies their latencies and overall span.
pub(crate) async fn one_shot_tally(
    mut callers: JoinSet<anyhow::Result<Span>>,
    counters: &Counters,
) -> anyhow::Result<Measured> {
    let mut tally = Tally::new();
    while let Some(joined) = callers.join_next().await {
        let span = joined.context("a benchmark task panicked")??;
        tally
            .latencies
            .saturating_record(micros(span.end - span.start));
        tally.span(&span);
    }
    Ok(tally.finish(counters))
}

/// Joins workers that each looped, and merges their histograms and spans.
pub(crate) async fn collect_histograms(
    mut workers: JoinSet<anyhow::Result<(Histogram<u64>, Span)>>,
    counters: &Counters,
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
    Ok(tally.finish(counters))
}

/// When a worker stops.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// At this instant (a timed run); an op under way when it passes finishes first.
    At(Instant),
    /// After this many calls (counting those that were not ops, e.g. a lock timeout).
    After(u64),
}

/// Call `op` in a loop until `stop`, recording the latency of each call that returns `true` (an op; `false`
/// is a call that does not count as one).
pub(crate) async fn repeat<F, Fut>(stop: Stop, mut op: F) -> anyhow::Result<(Histogram<u64>, Span)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut latencies = new_histogram();
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        let t = Instant::now();
        let done = match stop {
            Stop::At(deadline) => t >= deadline,
            Stop::After(n) => calls >= n,
        };
        if done {
            break;
        }
        calls += 1;
        if op().await? {
            latencies.saturating_record(micros(t.elapsed()));
        }
    }
    Ok((
        latencies,
        Span {
            start,
            end: Instant::now(),
        },
    ))
}

/// Call `op` in a loop until `deadline`, recording each call's latency.
pub(crate) async fn until_deadline<F, Fut>(
    deadline: Instant,
    mut op: F,
) -> anyhow::Result<(Histogram<u64>, Span)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    repeat(Stop::At(deadline), move || {
        let call = op();
        async move { call.await.map(|()| true) }
    })
    .await
}

/// A duration in whole µs, at least 1 (the histograms' lowest value).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn repeat_stops_after_n_calls_and_records_only_ops() {
        let mut call = 0;
        let (latencies, span) = repeat(Stop::After(5), || {
            call += 1;
            let counted = call % 2 == 1;
            async move { Ok(counted) }
        })
        .await
        .unwrap();
        assert_eq!(latencies.len(), 3, "calls 1, 3 and 5 are ops");
        assert!(span.end >= span.start);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_longest_run() {
        let mut total = Measured::empty();
        let mut one = Measured::empty();
        one.allowed = 3;
        one.seconds = 0.5;
        one.latencies.saturating_record(10);
        let mut two = Measured::empty();
        two.allowed = 4;
        two.seconds = 0.25;
        two.latencies.saturating_record(20);
        one.l1.stale_reads = 2;
        one.l1.max_stale_us = 300;
        two.l1.stale_reads = 1;
        two.l1.max_stale_us = 200;
        total.merge(&one).unwrap();
        total.merge(&two).unwrap();
        assert_eq!((total.allowed, total.ops()), (7, 2));
        assert_eq!((total.l1.stale_reads, total.l1.max_stale_us), (3, 300));
        assert!((total.seconds - 0.5).abs() < f64::EPSILON);
    }
}
