//! The rate-limit family: `ratelimit_exact` (C racing checks of one identity: are exactly `limit` allowed?)
//! and `ratelimit_throughput` (checks over 10,000 identities in a loop, never refused).
//!
//! The one decision: every run gets a class of its own (in the run's fresh namespace) whose numbers are
//! chosen for what the scenario measures. For `ratelimit_exact`, nothing replenishes during the run, so any
//! allowance beyond the limit is a race; for `ratelimit_throughput`, nothing is ever refused, so every check
//! costs the same. The class has `on_error = deny`, and a decision the store did not make fails the run: it
//! would measure the fallback, not the limiter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keyward::policy::{Algorithm, OnError, RateLimitClass};
use keyward::rate_limit::Source;
use keyward::{Keyward, RateLimiter};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::workload::Workload;
use crate::bench::measure::{
    Counters, Measured, Span, Stop, collect_histograms, one_shot_tally, repeat,
};
use crate::bench::report::{ScenarioFields, round};

/// The rate-limit class of the bench policy.
pub(crate) const CLASS: &str = "bench_rl";
/// `ratelimit_exact`: the window of every algorithm but `sliding_log`. Long, so that nothing replenishes during
/// a run (token bucket and GCRA refill one unit per window / limit) and a fixed window's edge (aligned to the
/// Unix epoch) falls inside a run of a few seconds with odds of about 1 in a million. The run's one key
/// expires on its own, within this window.
const EXACT_WINDOW: Duration = Duration::from_secs(100 * 24 * 60 * 60);
/// `ratelimit_exact` with `sliding_log`: its entries only leave the window when it has passed, so any window
/// longer than the run is exact; a short one keeps the run's (up to `limit`) entries from lingering.
const EXACT_LOG_WINDOW: Duration = Duration::from_secs(60 * 60);
/// `ratelimit_throughput`: a limit no identity gets near (10,000 identities at any plausible rate).
const THROUGHPUT_LIMIT: u64 = 1_000_000_000;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(60 * 60);
/// `ratelimit_throughput` with `sliding_log`, which allows at most 100,000 per window and stores one entry per
/// request for the window's length: 100,000 per second per identity is never reached, and a 1 s window keeps
/// the log of each identity short.
const THROUGHPUT_LOG_LIMIT: u64 = 100_000;
const THROUGHPUT_LOG_WINDOW: Duration = Duration::from_secs(1);
/// `ratelimit_throughput`: how many identities the workers spread their checks over.
pub(crate) const IDENTITIES: u64 = 10_000;

/// The scenarios of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `ratelimit_exact`.
    Exact,
    /// `ratelimit_throughput`.
    Throughput,
}

/// The class of `kind`. `ratelimit_exact`: `--limit` per [`EXACT_WINDOW`] (`sliding_log`: per
/// [`EXACT_LOG_WINDOW`]), burst = limit. `ratelimit_throughput`: [`THROUGHPUT_LIMIT`] per hour
/// (`sliding_log`: [`THROUGHPUT_LOG_LIMIT`] per second), burst = limit. `on_error = deny`, so that a Redis
/// failure can never pass for an allowance.
pub(crate) fn class(kind: Kind, work: &Workload) -> RateLimitClass {
    let log = work.algorithm == Algorithm::SlidingLog;
    let (limit, window) = match kind {
        Kind::Exact if log => (work.limit, EXACT_LOG_WINDOW),
        Kind::Exact => (work.limit, EXACT_WINDOW),
        Kind::Throughput if log => (THROUGHPUT_LOG_LIMIT, THROUGHPUT_LOG_WINDOW),
        Kind::Throughput => (THROUGHPUT_LIMIT, THROUGHPUT_WINDOW),
    };
    let class = RateLimitClass::new(work.algorithm, limit, window).on_error(OnError::Deny);
    if work.algorithm.has_burst() {
        class.burst(limit)
    } else {
        class
    }
}

/// A connected, warmed-up rate-limit scenario.
pub(crate) struct Ready {
    limiter: RateLimiter,
}

/// Open the class and warm up with one check of an identity of its own, which must be decided by the store.
pub(crate) async fn prepare(kw: &Keyward, work: &Workload) -> anyhow::Result<Ready> {
    let limiter = kw
        .rate_limiter(CLASS)
        .context("cannot open the bench rate-limit class")?;
    let warm = limiter
        .check(&("warmup", work.key_id))
        .await
        .context("warm-up check failed")?;
    if warm.source() != Source::Store {
        anyhow::bail!(
            "the warm-up check was decided without the store ({:?}): Redis failed, see the warning above",
            warm.source()
        );
    }
    Ok(Ready { limiter })
}

impl Ready {
    /// The measured phase of `kind`; `stop` applies to `ratelimit_throughput` (`ratelimit_exact` makes one
    /// check per caller).
    pub(crate) async fn run(
        self,
        kind: Kind,
        work: &Workload,
        stop: Stop,
    ) -> anyhow::Result<Measured> {
        match kind {
            Kind::Exact => self.exact(work).await,
            Kind::Throughput => self.throughput(work, stop).await,
        }
    }

    /// C callers wait on a barrier, then each makes exactly one check of the same identity.
    async fn exact(self, work: &Workload) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let barrier = Arc::new(Barrier::new(work.concurrency));
        let id = ("exact", work.key_id);
        let mut callers = JoinSet::new();
        for _ in 0..work.concurrency {
            let (limiter, counters, barrier) = (
                self.limiter.clone(),
                Arc::clone(&counters),
                Arc::clone(&barrier),
            );
            callers.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                check(&limiter, &id, &counters).await?;
                anyhow::Ok(Span {
                    start,
                    end: Instant::now(),
                })
            });
        }
        one_shot_tally(callers, &counters).await
    }

    /// C workers loop `check` until `stop`, worker w of C checking identities w, w + C, w + 2C, … modulo
    /// [`IDENTITIES`]. The class never refuses.
    async fn throughput(self, work: &Workload, stop: Stop) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let concurrency = work.concurrency as u64;
        let mut workers = JoinSet::new();
        for w in 0..concurrency {
            let (limiter, counters) = (self.limiter.clone(), Arc::clone(&counters));
            let mut next = w % IDENTITIES;
            workers.spawn(repeat(stop, move || {
                let id = next;
                next = (next + concurrency) % IDENTITIES;
                let (limiter, counters) = (limiter.clone(), Arc::clone(&counters));
                async move { check(&limiter, &id, &counters).await.map(|()| true) }
            }));
        }
        collect_histograms(workers, &counters).await
    }
}

/// One check, counted as allowed or limited. A decision the store did not make (Redis failed and `on_error`
/// answered) fails the run: it would measure the fallback, not the limiter.
async fn check(
    limiter: &RateLimiter,
    id: &(impl keyward::key::IdParts + ?Sized),
    counters: &Counters,
) -> anyhow::Result<()> {
    let decision = limiter.check(id).await.context("rate-limit check failed")?;
    if decision.source() != Source::Store {
        anyhow::bail!(
            "a check was decided without the store ({:?}): Redis failed, see the warning above",
            decision.source()
        );
    }
    let counter = if decision.is_allowed() {
        &counters.allowed
    } else {
        &counters.limited
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `algorithm`, the class's `limit` and `window_s`, the checks `allowed` and `limited` fleet-wide, and for
/// `ratelimit_exact` whether exactly `min(limit, concurrency)` were allowed.
pub(crate) fn fields(kind: Kind, work: &Workload, measured: &Measured) -> ScenarioFields {
    let class = class(kind, work);
    ScenarioFields {
        algorithm: Some(work.algorithm.name()),
        limit: Some(class.limit_value()),
        window_s: Some(round(class.window_value().as_secs_f64(), 6)),
        allowed: Some(measured.allowed),
        limited: Some(measured.limited),
        exact: (kind == Kind::Exact)
            .then(|| measured.allowed == work.limit.min(work.concurrency as u64)),
        ..ScenarioFields::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::workload::Scenario;
    use super::super::workload::tests::work;
    use super::*;

    #[test]
    fn the_throughput_class_never_refuses_ten_thousand_identities() {
        for algorithm in Algorithm::ALL {
            let w = work(Scenario::RatelimitThroughput, algorithm, 100);
            let c = class(Kind::Throughput, &w);
            // Allowed per identity per second, and what 10,000 identities would need at 10M checks/s.
            let per_second = c.limit_value() as f64 / c.window_value().as_secs_f64();
            assert!(
                per_second >= 10_000_000.0 / IDENTITIES as f64,
                "{algorithm}: {per_second}"
            );
        }
    }

    #[test]
    fn exact_is_reported_only_for_ratelimit_exact() {
        let w = work(Scenario::RatelimitExact, Algorithm::Gcra, 3);
        let mut m = crate::bench::measure::Measured::empty();
        m.allowed = 3;
        m.limited = 1;
        let f = fields(Kind::Exact, &w, &m);
        assert_eq!(
            (f.allowed, f.limited, f.exact),
            (Some(3), Some(1), Some(true))
        );
        assert_eq!(f.algorithm, Some("gcra"));
        let t = fields(Kind::Throughput, &w, &m);
        assert_eq!(t.exact, None);
    }
}
