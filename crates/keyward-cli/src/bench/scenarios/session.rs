//! The session family: `session`, `Sessions::get` in a loop over a pool of sessions created before the timed
//! phase.
//!
//! The one decision: `--extend` picks the class's `extend_after`, which decides whether a read writes.
//! `always` (0) makes every read push the idle expiry back; `default` (`idle / 10`, 3 min of a 30 min idle
//! timeout) makes reads during a run write nothing. Every read must find its session, or the run fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use keyward::Keyward;
use keyward::policy::SessionClass;
use keyward::session::{SessionSecrets, SessionToken, Sessions};
use tokio::task::JoinSet;

use super::workload::{Extend, Item, Workload};
use crate::bench::measure::{Counters, Measured, Stop, collect_histograms, repeat};
use crate::bench::report::ScenarioFields;

/// The session class of the bench policy.
pub(crate) const CLASS: &str = "bench_session";
/// The class's timeouts; no session ends during a run.
const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
const SESSION_ABSOLUTE: Duration = Duration::from_secs(12 * 60 * 60);
/// The pool's sessions per user (the per-user index the scripts keep has this many entries).
const SESSIONS_PER_USER: u64 = 10;
/// The server secret tokens are keyed under. A benchmark's, not a secret.
const SESSION_SECRET: &[u8; 32] = b"keyward bench: not a real secret";
/// How many sessions are created at once while the pool is built.
const POOL_BUILDERS: usize = 64;

/// The bench's session class: idle 30 min, absolute 12 h, and `extend_after` 0 for `--extend always`, the
/// default (`idle / 10`) for `--extend default`.
pub(crate) fn class(extend: Extend) -> SessionClass {
    let class = SessionClass::new(SESSION_IDLE, SESSION_ABSOLUTE);
    match extend {
        Extend::Always => class.extend_after(Duration::ZERO),
        Extend::Default => class,
    }
}

/// The workload whose client commands are counted, `per_worker` ops per caller: a pool of its own of at most
/// `per_worker` sessions per caller, so that building it stays short.
pub(crate) fn for_counted_ops(work: &Workload, per_worker: u64) -> Workload {
    let audit_pool = per_worker.saturating_mul(work.concurrency as u64);
    Workload {
        keys: work.keys.min(audit_pool).max(1),
        ..work.clone()
    }
}

/// The sessions one process reads.
pub(crate) struct Ready {
    sessions: Sessions<Item>,
    tokens: Arc<[SessionToken]>,
}

/// Create `work.keys` sessions of ≈1 KiB data, [`SESSIONS_PER_USER`] per user, [`POOL_BUILDERS`] at a time;
/// then read one, which loads the read script into Redis.
pub(crate) async fn prepare(kw: &Keyward, work: &Workload) -> anyhow::Result<Ready> {
    let secrets =
        SessionSecrets::new(SESSION_SECRET).context("the bench session secret is refused")?;
    let sessions = kw
        .sessions::<Item>(CLASS, secrets)
        .context("cannot open the bench session class")?;
    let (n, offset) = (work.keys, work.key_offset);
    let next = Arc::new(AtomicU64::new(0));
    let mut builders = JoinSet::new();
    for _ in 0..POOL_BUILDERS.min(usize::try_from(n).unwrap_or(usize::MAX)) {
        let (sessions, next) = (sessions.clone(), Arc::clone(&next));
        builders.spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let index = offset + i;
                let user = format!("user{}", index / SESSIONS_PER_USER);
                let (token, _) = sessions
                    .create(&user, &Item::sized(index))
                    .await
                    .with_context(|| format!("cannot create session {index} of the pool"))?;
                made.push(token);
            }
            anyhow::Ok(made)
        });
    }
    let mut tokens = Vec::new();
    while let Some(made) = builders.join_next().await {
        tokens.extend(made.context("a session builder panicked")??);
    }
    let first = tokens.first().context("the session pool is empty")?;
    sessions
        .get(first.as_str())
        .await
        .context("warm-up get failed")?
        .context("a session just created was not found")?;
    Ok(Ready {
        sessions,
        tokens: tokens.into(),
    })
}

impl Ready {
    /// C workers loop `Sessions::get` until `stop`, worker w of C reading the pool's sessions w, w + C,
    /// w + 2C, … modulo its size. Every read must find its session.
    pub(crate) async fn run(self, work: &Workload, stop: Stop) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let (n, concurrency) = (self.tokens.len(), work.concurrency);
        let mut workers = JoinSet::new();
        for w in 0..concurrency {
            let (sessions, tokens) = (self.sessions.clone(), Arc::clone(&self.tokens));
            let mut next = w % n;
            workers.spawn(repeat(stop, move || {
                let i = next;
                next = (next + concurrency) % n;
                let (sessions, tokens) = (sessions.clone(), Arc::clone(&tokens));
                async move {
                    let session = sessions
                        .get(tokens[i].as_str())
                        .await
                        .context("Sessions::get failed")?
                        .with_context(|| format!("session {i} of the pool was not found"))?;
                    std::hint::black_box(session);
                    Ok(true)
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }
}

/// `extend`, the class's `extend_after_ms`, and `sessions` (the pool size, fleet-wide).
pub(crate) fn fields(work: &Workload) -> ScenarioFields {
    let class = class(work.extend);
    ScenarioFields {
        extend: Some(work.extend.name()),
        extend_after_ms: Some(
            u64::try_from(class.extend_after_value().as_millis()).unwrap_or(u64::MAX),
        ),
        sessions: Some(work.keys),
        ..ScenarioFields::default()
    }
}

#[cfg(test)]
mod tests {
    use keyward::policy::Algorithm;

    use keyward::policy::Policy;

    use super::super::workload::Scenario;
    use super::super::workload::tests::work;
    use super::*;

    #[test]
    fn the_session_scenario_has_a_valid_class_per_extend() {
        for (extend, after) in [
            (Extend::Always, Duration::ZERO),
            (Extend::Default, SESSION_IDLE / 10),
        ] {
            let w = Workload {
                extend,
                ..work(Scenario::Session, Algorithm::Gcra, 100)
            };
            let policy = Policy::builder("bench", "kwbench42")
                .session(CLASS, class(extend))
                .build()
                .unwrap();
            let class = policy.class(CLASS).unwrap().as_session().unwrap();
            assert_eq!(class.extend_after_value(), after);
            assert_eq!(fields(&w).extend_after_ms, Some(after.as_millis() as u64));
        }
        assert!(SessionSecrets::new(SESSION_SECRET).is_ok());
    }

    #[test]
    fn the_counted_pool_is_at_most_per_worker_sessions_per_caller() {
        let w = Workload {
            keys: 10_000,
            concurrency: 4,
            ..work(Scenario::Session, Algorithm::Gcra, 100)
        };
        assert_eq!(for_counted_ops(&w, 16).keys, 64);
        let small = Workload { keys: 3, ..w };
        assert_eq!(for_counted_ops(&small, 16).keys, 3);
    }
}
