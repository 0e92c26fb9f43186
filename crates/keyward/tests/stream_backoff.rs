//! Retries of a handler that always fails: each entry is delivered exactly `max_deliveries` times, the gap
//! before delivery `k + 1` is the class's backoff for attempt `k` (`min(max, base × factor^(k − 1))`, minus at
//! most `jitter` percent), and then the entry is in the dead-letter stream (with its delivery count and last
//! error) and nowhere else. On the embedded backend this runs on tokio's paused clock, which the worker's
//! sleeps and the keyspace's clock both follow: the gaps are checked exactly (to the 1 ms of tokio's timer),
//! and a long quiet period after the dead letters proves that no further delivery comes. Against a real Redis
//! (standalone and Cluster), the clock is real: each gap is checked against its lower bound only.

#![allow(unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::Harness;
use keyward::Keyward;
use keyward::policy::{Backoff, Policy, Retention, StreamClass};
use keyward::stream::{Message, WorkerReport};
use tokio::time::Instant;

/// One delivery a handler saw: the entry (its event), the delivery count, when (tokio's clock).
type Attempt = (u32, u64, Instant);

/// The class under test: `max_deliveries` deliveries, backoff `base`, ×`factor`, at most `max`, `jitter` %.
struct Retry {
    max_deliveries: u32,
    backoff: Backoff,
}

impl Retry {
    fn policy(&self, app: &str) -> Policy {
        Policy::builder("test", app)
            .stream(
                "retries",
                StreamClass::new(Retention::maxlen(10_000))
                    .max_deliveries(self.max_deliveries)
                    .backoff(self.backoff)
                    // Far above every backoff: no entry is taken over while it waits for its retry.
                    .claim_idle(Duration::from_secs(60)),
            )
            .build()
            .unwrap()
    }

    /// The gap allowed before delivery `k + 1`: `[delay(k) × (1 − jitter), delay(k)]`, from the policy's
    /// numbers (not from `Backoff::delay`, which is what is under test).
    fn bounds(&self, k: u64) -> (Duration, Duration) {
        let b = &self.backoff;
        let exp = i32::try_from(k - 1).unwrap();
        let full = (b.base_value().as_secs_f64() * b.factor_value().powi(exp))
            .min(b.max_value().as_secs_f64());
        let low = full * (1.0 - b.jitter_percent_value() / 100.0);
        (Duration::from_secs_f64(low), Duration::from_secs_f64(full))
    }
}

/// Publish `entries` events, run a worker whose handler always fails until every entry is dead-lettered, then
/// let `quiet` pass (on the paused clock) and stop it. Returns the report and every delivery seen.
async fn run_until_dead(
    kw: &Keyward,
    entries: u32,
    quiet: Duration,
) -> (WorkerReport, Vec<Attempt>) {
    let stream = kw.stream::<u32>("retries").unwrap();
    let seen: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let worker = {
        let seen = Arc::clone(&seen);
        stream
            .worker("payments", move |m: Message<u32>| {
                seen.lock()
                    .unwrap()
                    .push((m.event, m.deliveries, Instant::now()));
                async move { Err(format!("card declined for order {}", m.event)) }
            })
            .concurrency(usize::try_from(entries).unwrap())
    };
    let events: Vec<u32> = (0..entries).collect();
    stream.publish_many(&events).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    // Bounded by the test's own timeout (paused: by the virtual time the backoffs need, then some).
    while stream.dead_letters(10_000).await.unwrap().len() < entries as usize {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(quiet).await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    (report, seen)
}

/// What every backend must show: per entry, deliveries `1..=max` in order, gaps within `check`, one dead
/// letter with the last error and the full count; the stream holds nothing any more.
async fn check_outcome(
    kw: &Keyward,
    retry: &Retry,
    entries: u32,
    report: &WorkerReport,
    seen: &[Attempt],
    mut check_gap: impl FnMut(u64, Duration),
) {
    let max = u64::from(retry.max_deliveries);
    assert_eq!(
        (report.handled, report.failed, report.dead_lettered),
        (0, max * u64::from(entries), u64::from(entries)),
        "{report:?}"
    );
    for entry in 0..entries {
        let mine: Vec<&Attempt> = seen.iter().filter(|a| a.0 == entry).collect();
        assert_eq!(
            mine.iter().map(|a| a.1).collect::<Vec<_>>(),
            (1..=max).collect::<Vec<_>>(),
            "entry {entry}: exactly max_deliveries deliveries, in order"
        );
        for pair in mine.windows(2) {
            check_gap(pair[0].1, pair[1].2 - pair[0].2);
        }
    }
    let stream = kw.stream::<u32>("retries").unwrap();
    let mut dead = stream.dead_letters(10_000).await.unwrap();
    dead.sort_by_key(|d| serde_json::from_slice::<u32>(&d.payload).unwrap());
    assert_eq!(dead.len(), entries as usize);
    for (entry, d) in (0..entries).zip(&dead) {
        assert_eq!(serde_json::from_slice::<u32>(&d.payload).unwrap(), entry);
        assert_eq!(d.group, "payments");
        assert_eq!(d.deliveries, max);
        assert_eq!(d.error, format!("card declined for order {entry}"));
    }
    assert_eq!(stream.len().await.unwrap(), 0, "not in both places");
    let info = stream.group_info("payments").await.unwrap().unwrap();
    assert_eq!(info.pending, 0, "nothing left to deliver again");
}

/// 1 s, ×3, at most 5 s, 30 % jitter, 5 deliveries: gaps of 1 s, 3 s, 5 s (9 s capped), 5 s, each minus up
/// to 30 %.
fn paused_retry() -> Retry {
    Retry {
        max_deliveries: 5,
        backoff: Backoff::new(Duration::from_secs(1), 3.0, Duration::from_secs(5))
            .jitter_percent(30.0),
    }
}

#[tokio::test(start_paused = true)]
async fn embedded_paused_clock_exact_gaps_then_dead_letter() {
    let retry = paused_retry();
    let kw = Keyward::embedded(retry.policy("backoff-paused"));
    let entries = 20;
    // After the last dead letter, ten times the longest backoff passes: no delivery may follow.
    let quiet = retry.backoff.max_value() * 10;
    let started = Instant::now();
    let (report, seen) = tokio::time::timeout(
        Duration::from_secs(600),
        run_until_dead(&kw, entries, quiet),
    )
    .await
    .expect("every entry dead-lettered within the backoffs' time");
    let last = seen.iter().map(|a| a.2).max().unwrap();
    assert!(
        last < Instant::now() - quiet + Duration::from_millis(50),
        "a delivery came after the dead letters"
    );
    // The timer has 1 ms ticks: a sleep ends on the first tick at or after its deadline.
    let tick = Duration::from_millis(1);
    let mut below_full = 0;
    let mut gaps = 0;
    check_outcome(&kw, &retry, entries, &report, &seen, |k, gap| {
        let (low, full) = retry.bounds(k);
        assert!(
            gap >= low && gap <= full + tick,
            "gap after delivery {k}: {gap:?} not in [{low:?}, {full:?}]"
        );
        gaps += 1;
        if gap + (full - low) / 2 < full {
            below_full += 1;
        }
    })
    .await;
    assert_eq!(gaps, 4 * entries);
    // The jitter is drawn per retry: with 80 gaps, about half fall in the lower half of their range.
    assert!(
        (10..=70).contains(&below_full),
        "{below_full} of {gaps} gaps in the lower half of the jitter range"
    );
    // The first deliveries start at once; the whole run is the sum of the backoffs, not more.
    let first = seen.iter().map(|a| a.2).min().unwrap();
    assert!(first - started < Duration::from_millis(10));
    assert!(last - first <= Duration::from_secs(1 + 3 + 5 + 5) + 4 * tick);
}

/// Real time: 20 ms, ×2, at most 50 ms, 25 % jitter, 4 deliveries. Only lower bounds are asserted (a real
/// scheduler can only be late); the count and the dead letter exactly.
async fn real_clock(h: Harness) {
    let retry = Retry {
        max_deliveries: 4,
        backoff: Backoff::new(Duration::from_millis(20), 2.0, Duration::from_millis(50))
            .jitter_percent(25.0),
    };
    let app = format!("backoff-{}", h.app());
    let kw = Keyward::connect(&h.url().unwrap(), retry.policy(&app))
        .await
        .unwrap();
    let entries = 5;
    let (report, seen) = tokio::time::timeout(
        Duration::from_secs(60),
        run_until_dead(&kw, entries, Duration::ZERO),
    )
    .await
    .expect("every entry dead-lettered");
    check_outcome(&kw, &retry, entries, &report, &seen, |k, gap| {
        let (low, _) = retry.bounds(k);
        assert!(gap >= low, "gap after delivery {k}: {gap:?} < {low:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_real_clock_gaps_then_dead_letter() {
    real_clock(Harness::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_real_clock_gaps_then_dead_letter() {
    real_clock(Harness::cluster()).await;
}
