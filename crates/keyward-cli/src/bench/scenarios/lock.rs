//! The lock family: `lock`, acquire + release in a loop, on a name per worker (`--names distinct`) or on one
//! name for every worker of every process (`--names one`).
//!
//! The one decision: `lock --names one` checks what it measures. Inside the critical section each worker
//! makes sure no other worker of its process is inside and that its fence is above every fence its process
//! saw before ([`Exclusion`]); a violation is counted and reported, not hidden.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use keyward::Keyward;
use keyward::key::IdParts;
use keyward::lock::Locks;
use keyward::policy::LockClass;
use tokio::task::JoinSet;

use super::workload::{LockNames, Workload};
use crate::bench::measure::{Counters, Measured, Stop, collect_histograms, repeat};
use crate::bench::report::{ScenarioFields, per_op, round};
use crate::stats::Counts;

/// The lock class of the bench policy.
pub(crate) const CLASS: &str = "bench_lock";
/// The lease. Far longer than a critical section (a yield), so that no lease runs out while held, which
/// would let a second holder in and count as a violation without being one.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How long `Locks::lock` waits for the contended name before giving up (a timeout, counted).
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// How long the fencing counters outlive their last use; the bench's keys need not last 7 days.
const LOCK_FENCE_TTL: Duration = Duration::from_secs(10 * 60);

/// The bench's lock class: a [`LOCK_TTL`] lease, a [`LOCK_WAIT`] wait, no watchdog.
pub(crate) fn class() -> LockClass {
    LockClass::new(LOCK_TTL)
        .wait(LOCK_WAIT)
        .fence_ttl(LOCK_FENCE_TTL)
}

/// A connected, warmed-up `lock` scenario.
pub(crate) struct Ready {
    locks: Locks,
    /// `--names distinct`: makes this process's lock names its own (children share `key_id`).
    salt: u64,
}

/// Open the class and warm up with one acquire + release of a name of its own.
pub(crate) async fn prepare(kw: &Keyward, work: &Workload) -> anyhow::Result<Ready> {
    let locks = kw
        .locks(CLASS)
        .context("cannot open the bench lock class")?;
    let salt = rand::random::<u64>();
    let guard = locks
        .try_lock(&("warmup", work.key_id, salt))
        .await
        .context("warm-up lock failed")?
        .context("the warm-up lock, on a name of its own, was held")?;
    if !guard.release().await.context("warm-up release failed")? {
        anyhow::bail!("the warm-up release found its lease gone");
    }
    Ok(Ready { locks, salt })
}

impl Ready {
    /// C workers loop [`lock_cycle`] until `stop`: worker w on a name of its own (`distinct`: names carry
    /// this process's salt, as children share `key_id`), or all of them, in every process, on one name
    /// (`one`), checking mutual exclusion.
    pub(crate) async fn run(self, work: &Workload, stop: Stop) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let exclusion = Arc::new(Exclusion::default());
        let (key_id, salt) = (work.key_id, self.salt);
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency as u64 {
            let (locks, counters, exclusion) = (
                self.locks.clone(),
                Arc::clone(&counters),
                Arc::clone(&exclusion),
            );
            match work.lock_names {
                LockNames::Distinct => workers.spawn(repeat(stop, move || {
                    let locks = locks.clone();
                    async move { lock_cycle(&locks, &("distinct", key_id, salt, w), None).await }
                })),
                LockNames::One => workers.spawn(repeat(stop, move || {
                    let (locks, counters, exclusion) =
                        (locks.clone(), Arc::clone(&counters), Arc::clone(&exclusion));
                    async move {
                        let contended = Contended {
                            exclusion: &exclusion,
                            counters: &counters,
                            worker: w,
                        };
                        lock_cycle(&locks, &("one", key_id), Some(contended)).await
                    }
                })),
            };
        }
        collect_histograms(workers, &counters).await
    }
}

/// `lock --names one`: what a worker needs to check and count what happens while it holds the lock.
#[derive(Clone, Copy)]
struct Contended<'a> {
    exclusion: &'a Exclusion,
    counters: &'a Counters,
    /// The worker's index in its process.
    worker: u64,
}

/// One op of `lock`: take the lock (waiting up to the class's wait), then release it; its latency runs from
/// asking to having released. With `contended` (`--names one`), the holder checks mutual exclusion in
/// between, and a `lock` that gives up is counted as a timeout and is not an op (`false`). Without it (a name
/// no other worker uses), giving up fails the run. So does a release that finds the lease gone.
async fn lock_cycle(
    locks: &Locks,
    name: &(impl IdParts + Sync + ?Sized),
    contended: Option<Contended<'_>>,
) -> anyhow::Result<bool> {
    let Some(guard) = locks.lock(name).await.context("lock failed")? else {
        let Some(c) = contended else {
            anyhow::bail!("a lock no other worker uses was still held after {LOCK_WAIT:?}");
        };
        c.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        return Ok(false);
    };
    if let Some(c) = contended {
        let entry = c.exclusion.enter(guard.fence(), c.worker);
        if entry.violation {
            c.counters.violations.fetch_add(1, Ordering::Relaxed);
        }
        if entry.same_holder {
            c.counters.reacquired.fetch_add(1, Ordering::Relaxed);
        }
        // Hold the lock across a scheduling point, so that another worker of this process that got in
        // meanwhile would be seen.
        tokio::task::yield_now().await;
        c.exclusion.leave();
    }
    if !guard.release().await.context("release failed")? {
        anyhow::bail!(
            "a release found the lease gone: the {LOCK_TTL:?} lease ran out while held (was the machine stalled?)"
        );
    }
    Ok(true)
}

/// The in-process check of `lock --names one`. A holder enters once it has acquired and leaves before it
/// releases. Entering is a violation when another worker of this process is inside, or when the holder's
/// fence is not above the last one this process saw: holders follow one another, and every fence is above
/// all those issued before it, across processes too.
///
/// It also tells when the holder is the worker that held the lock last in this process: it released and took
/// the lock again before any worker its release woke (those wait a random 0–2 ms before trying, to spread
/// out). With one process that is exact; with several, another process may have held the lock in between,
/// so it is an upper bound.
#[derive(Default)]
struct Exclusion {
    inside: AtomicUsize,
    last_fence: AtomicU64,
    /// 1 + the index of the last worker to enter; 0 before the first.
    last_holder: AtomicU64,
}

/// What [`Exclusion::enter`] found.
struct Entry {
    violation: bool,
    same_holder: bool,
}

impl Exclusion {
    /// Enter holding `fence`, as worker `worker`.
    fn enter(&self, fence: u64, worker: u64) -> Entry {
        let others = self.inside.fetch_add(1, Ordering::SeqCst);
        let last = self.last_fence.fetch_max(fence, Ordering::SeqCst);
        let previous = self.last_holder.swap(worker + 1, Ordering::SeqCst);
        Entry {
            violation: others != 0 || fence <= last,
            same_holder: previous == worker + 1,
        }
    }

    fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `names`; with `--names one` also `violations`, `timeouts`, `handoffs_per_s` and `reacquired`; against
/// Redis `acquire_attempts` and `attempts_per_acquire` (see [`acquire_attempts`]).
pub(crate) fn fields(
    work: &Workload,
    measured: &Measured,
    commands: Option<&Counts>,
) -> ScenarioFields {
    let ops = measured.ops();
    let one = work.lock_names == LockNames::One;
    let per_second = if measured.seconds > 0.0 {
        ops as f64 / measured.seconds
    } else {
        0.0
    };
    let attempts = commands.map(|c| acquire_attempts(c, ops));
    ScenarioFields {
        names: Some(work.lock_names.name()),
        violations: one.then_some(measured.violations),
        timeouts: one.then_some(measured.timeouts),
        handoffs_per_s: one.then(|| round(per_second, 1)),
        reacquired: one.then_some(measured.reacquired),
        acquire_attempts: attempts,
        attempts_per_acquire: attempts.map(|a| per_op(a, ops)),
        ..ScenarioFields::default()
    }
}

/// How many acquisition attempts the measured phase made, successful or not. Each attempt is one script call
/// (`lock_acquire.lua`), and so is each release (`lock_release.lua`); every op ends in exactly one successful
/// release, and nothing else the workers do calls a script. So attempts = script calls (`EVALSHA`, plus
/// `EVAL` should a script have had to be sent in full) − ops. Other clients' script calls would count too,
/// as in `redis_cmds`.
fn acquire_attempts(commands: &Counts, ops: u64) -> u64 {
    let scripts: u64 = ["evalsha", "eval"]
        .iter()
        .filter_map(|name| commands.get(*name))
        .sum();
    scripts.saturating_sub(ops)
}

#[cfg(test)]
mod tests {
    use keyward::policy::{Algorithm, Policy};

    use super::super::workload::Scenario;
    use super::super::workload::tests::work;
    use super::*;

    #[test]
    fn the_lock_class_has_the_bench_lease_and_wait() {
        let policy = Policy::builder("bench", "kwbench42")
            .lock(CLASS, class())
            .build()
            .unwrap();
        let lock = policy.class(CLASS).unwrap().as_lock().unwrap();
        assert_eq!(lock.ttl_value(), LOCK_TTL);
        assert_eq!(lock.wait_value(), LOCK_WAIT);
    }

    #[test]
    fn contended_runs_report_their_checks_and_distinct_runs_do_not() {
        let mut m = Measured::empty();
        m.latencies.saturating_record(10);
        m.seconds = 0.5;
        let commands = Counts::from([("evalsha".to_owned(), 3)]);
        let one = fields(
            &work(Scenario::Lock, Algorithm::Gcra, 1),
            &m,
            Some(&commands),
        );
        assert_eq!((one.names, one.violations), (Some("one"), Some(0)));
        assert_eq!(one.handoffs_per_s, Some(2.0));
        assert_eq!(
            (one.acquire_attempts, one.attempts_per_acquire),
            (Some(2), Some(2.0))
        );
        let distinct = Workload {
            lock_names: LockNames::Distinct,
            ..work(Scenario::Lock, Algorithm::Gcra, 1)
        };
        let d = fields(&distinct, &m, None);
        assert_eq!(
            (d.names, d.violations, d.acquire_attempts),
            (Some("distinct"), None, None)
        );
    }

    #[test]
    fn exclusion_sees_a_second_holder_and_a_stale_fence() {
        let x = Exclusion::default();
        let enter = |fence, worker| {
            let e = x.enter(fence, worker);
            (e.violation, e.same_holder)
        };
        assert_eq!(enter(10, 0), (false, false));
        assert_eq!(enter(11, 1), (true, false), "a second holder inside");
        x.leave();
        x.leave();
        assert_eq!(enter(12, 1), (false, true), "worker 1 again");
        x.leave();
        assert_eq!(
            enter(12, 2),
            (true, false),
            "a fence not above the last one"
        );
        x.leave();
        assert_eq!(enter(13, 0), (false, false));
        x.leave();
    }

    #[test]
    fn acquire_attempts_are_script_calls_less_one_release_per_op() {
        let commands = Counts::from([
            ("evalsha".to_owned(), 40),
            ("eval".to_owned(), 2),
            ("pttl".to_owned(), 32),
        ]);
        assert_eq!(acquire_attempts(&commands, 10), 32);
        assert_eq!(acquire_attempts(&Counts::new(), 10), 0);
    }
}
