//! The scenarios: one [`Scenario`] per stable name, grouped in families that share a policy class and a
//! set-up — `cache` (`hit`, `miss`, `stampede`, `get`), `l1` (`hit_l1`, `staleness`), `rate_limit`
//! (`ratelimit_exact`, `ratelimit_throughput`), `lock`, `session`, `stale` (`stale_serve`) and `stream`
//! (`stream_produce`, `stream_e2e`) — each family in a file of its own.
//!
//! Every scenario goes through the same phases, which is all the rest of `bench` (and the fleet) sees:
//! 1. [`policy`]: the classes it needs, in the run's fresh namespace;
//! 2. [`prepare`]: connect and warm up (outside the measured phase, so that the caller can take its
//!    command-count snapshot or do the READY/GO handshake in between);
//! 3. [`Prepared::run`]: the measured phase, giving a [`Measured`];
//! 4. [`Prepared::counted_ops`] (some scenarios, on a [`counted_workload`]): a fixed number of ops, while
//!    the caller counts commands;
//! 5. [`fields`]: what the family adds to the report.
//!
//! **Why an enum and not a trait.** The set of scenarios is closed and its names are a contract (clap lists
//! them; results are compared across libraries by name), and the phases are `async`: a trait would need boxed
//! futures (`async fn` in traits is not object-safe) or generics threaded through `fleet` and `bench`, for no
//! extension point anyone outside this crate can use. `Family` carries each family's own sub-kind, so the
//! dispatch in this file is exhaustive `match`es: adding a scenario makes the compiler point at every phase
//! that must handle it, and no family ever sees a scenario of another.
//!
//! Files: `workload.rs` (the names, options and stored value) and `raw.rs` (a plain redis-rs connection) are
//! the leaves; each family file depends on them only; this file depends on them all. No family imports this
//! file or another family.

mod cache;
mod l1;
mod lock;
mod rate_limit;
mod raw;
mod session;
mod stale;
mod stream;
mod workload;

use std::future::Future;
use std::time::Instant;

use keyward::Keyward;
use keyward::policy::{Policy, PolicyError};

use crate::bench::measure::{Measured, Stop};
use crate::bench::report::ScenarioFields;
use crate::error::UsageError;
use crate::stats::Counts;

pub(crate) use self::workload::{Extend, LockNames, Scenario, Workload};

/// A scenario's family, with the family's own kind of scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Cache(cache::Kind),
    L1(l1::Kind),
    RateLimit(rate_limit::Kind),
    Lock,
    Session,
    Stale,
    Stream(stream::Kind),
}

/// The family of `scenario`.
fn family(scenario: Scenario) -> Family {
    match scenario {
        Scenario::Hit => Family::Cache(cache::Kind::Hit),
        Scenario::Miss => Family::Cache(cache::Kind::Miss),
        Scenario::Stampede => Family::Cache(cache::Kind::Stampede),
        Scenario::Get => Family::Cache(cache::Kind::Get),
        Scenario::RatelimitExact => Family::RateLimit(rate_limit::Kind::Exact),
        Scenario::RatelimitThroughput => Family::RateLimit(rate_limit::Kind::Throughput),
        Scenario::Lock => Family::Lock,
        Scenario::Session => Family::Session,
        Scenario::HitL1 => Family::L1(l1::Kind::HitL1),
        Scenario::Staleness => Family::L1(l1::Kind::Staleness),
        Scenario::StaleServe => Family::Stale,
        Scenario::StreamProduce => Family::Stream(stream::Kind::Produce),
        Scenario::StreamE2e => Family::Stream(stream::Kind::E2e),
        Scenario::StreamChaos => Family::Stream(stream::Kind::Chaos),
    }
}

/// The workload [`Prepared::counted_ops`] runs with `per_worker` ops per caller (`session`: on a pool of its
/// own, of at most `per_worker` sessions per caller).
pub(crate) fn counted_workload(work: &Workload, per_worker: u64) -> Workload {
    match family(work.scenario) {
        Family::Session => session::for_counted_ops(work, per_worker),
        Family::Cache(_)
        | Family::L1(_)
        | Family::RateLimit(_)
        | Family::Lock
        | Family::Stale
        | Family::Stream(_) => work.clone(),
    }
}

/// The policy every bench process uses, in a namespace of its own (`app`): the cache class (always), plus
/// the class of the scenario's family (see each family's `class`).
///
/// # Errors
/// A [`PolicyError`] when the rate-limit class is invalid (e.g. a `--limit` out of range for the algorithm).
pub(crate) fn policy(app: &str, work: &Workload) -> Result<Policy, PolicyError> {
    let builder = Policy::builder("bench", app).cache(cache::CLASS, cache::class());
    let builder = match family(work.scenario) {
        Family::Cache(_) => builder,
        Family::L1(_) => builder.cache(l1::CLASS, l1::class()),
        Family::RateLimit(kind) => {
            builder.rate_limit(rate_limit::CLASS, rate_limit::class(kind, work))
        }
        Family::Lock => builder.lock(lock::CLASS, lock::class()),
        Family::Session => builder.session(session::CLASS, session::class(work.extend)),
        Family::Stale => builder.cache(stale::CLASS, stale::class()),
        Family::Stream(kind) => builder.stream(stream::CLASS, stream::class(kind)),
    };
    builder.build()
}

/// A connected, warmed-up workload, ready for its measured phase.
pub(crate) struct Prepared {
    work: Workload,
    ready: Ready,
}

/// A family's connected, warmed-up state.
enum Ready {
    Cache(cache::Ready),
    L1(l1::Ready),
    RateLimit(rate_limit::Ready),
    Lock(lock::Ready),
    Session(session::Ready),
    Stale(stale::Ready),
    Stream(stream::Ready),
}

/// Connect to `url` in namespace `app` and warm up: one call on a key of its own loads keyward's scripts into
/// Redis and opens the connection, so one-time costs do not count against the scenario (see each family's
/// `prepare` for what else it sets up).
///
/// # Errors
/// A [`UsageError`] for an invalid policy or URL; otherwise when connecting or warming up fails.
/// Said after a failure to reach the server, as [`crate::redis_url::HINT`] is by the other commands, with
/// `bench`'s own rule for picking the server.
const UNREACHABLE_HINT: &str = "is it up, and is it the server meant? (--url, else $REDIS_URL; with \
                                neither, bench measures the embedded backend)";

pub(crate) async fn prepare(url: &str, app: &str, work: Workload) -> anyhow::Result<Prepared> {
    let policy = policy(app, &work).map_err(|e| anyhow::Error::new(UsageError(e.to_string())))?;
    let kw = Keyward::connect(url, policy).await.map_err(|e| match e {
        keyward::Error::InvalidUrl { .. } => anyhow::Error::new(UsageError(e.to_string())),
        // As every command says after failing to reach a server: what to check (bench's own URL rule), or
        // that the server wants other credentials.
        keyward::Error::Connect { .. } => {
            crate::redis_url::library_connect_failed(&e, UNREACHABLE_HINT)
        }
        other => anyhow::Error::new(other),
    })?;
    let ready = match family(work.scenario) {
        Family::Cache(kind) => Ready::Cache(cache::prepare(&kw, url, app, kind, &work).await?),
        Family::L1(kind) => Ready::L1(l1::prepare(&kw, url, app, kind, &work).await?),
        Family::RateLimit(_) => Ready::RateLimit(rate_limit::prepare(&kw, &work).await?),
        Family::Lock => Ready::Lock(lock::prepare(&kw, &work).await?),
        Family::Session => Ready::Session(session::prepare(&kw, &work).await?),
        Family::Stale => Ready::Stale(stale::prepare(&kw, &work).await?),
        Family::Stream(kind) => Ready::Stream(stream::prepare(&kw, url, app, kind, &work).await?),
    };
    Ok(Prepared { work, ready })
}

impl Prepared {
    /// The measured phase.
    pub(crate) async fn run(self) -> anyhow::Result<Measured> {
        let timed = Stop::At(Instant::now() + self.work.duration);
        match (self.ready, family(self.work.scenario)) {
            (Ready::Cache(ready), Family::Cache(kind)) => ready.run(kind, &self.work).await,
            (Ready::L1(ready), Family::L1(kind)) => ready.run(kind, &self.work).await,
            (Ready::RateLimit(ready), Family::RateLimit(kind)) => {
                ready.run(kind, &self.work, timed).await
            }
            (Ready::Lock(ready), Family::Lock) => ready.run(&self.work, timed).await,
            (Ready::Session(ready), Family::Session) => ready.run(&self.work, timed).await,
            (Ready::Stale(ready), Family::Stale) => ready.run(&self.work).await,
            (Ready::Stream(ready), Family::Stream(kind)) => {
                ready.run(kind, &self.work, timed).await
            }
            _ => anyhow::bail!(
                "`{}` was prepared for another family",
                self.work.scenario.name()
            ),
        }
    }

    /// `stream_e2e` in a child of `--processes`: consume (this process's share of the handler concurrency)
    /// until `stop`; the parent's [`lead`](Self::lead) publishes.
    pub(crate) async fn consume_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Measured> {
        match (self.ready, self.work.scenario) {
            (Ready::Stream(ready), Scenario::StreamE2e | Scenario::StreamChaos) => {
                ready.consume_until(&self.work, stop).await
            }
            (_, other) => anyhow::bail!("`{}` does not run until stopped", other.name()),
        }
    }

    /// `stream_e2e` and `stream_chaos` with `--processes`, in the parent: publish every event (then say so
    /// on `published`) and wait until the children's workers have drained the group (see `stream.rs`).
    pub(crate) async fn lead(
        self,
        published: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<Measured> {
        match (self.ready, self.work.scenario) {
            (Ready::Stream(ready), Scenario::StreamE2e | Scenario::StreamChaos) => {
                ready.lead(&self.work, Some(published)).await
            }
            (_, other) => anyhow::bail!("`{}` has no producer to lead", other.name()),
        }
    }

    /// Not a scenario: every worker makes `per_worker` ops as the timed run of `ratelimit_throughput`, `lock`
    /// or `session` does (same classes; same identities, names or pool), then stops. What the caller observes
    /// meanwhile (the commands the server receives) is the cost of an op, outside the timed run.
    pub(crate) async fn counted_ops(self, per_worker: u64) -> anyhow::Result<Measured> {
        let counted = Stop::After(per_worker);
        match (self.ready, self.work.scenario) {
            (Ready::RateLimit(ready), Scenario::RatelimitThroughput) => {
                ready
                    .run(rate_limit::Kind::Throughput, &self.work, counted)
                    .await
            }
            (Ready::Lock(ready), Scenario::Lock) => ready.run(&self.work, counted).await,
            (Ready::Session(ready), Scenario::Session) => ready.run(&self.work, counted).await,
            (_, other) => anyhow::bail!("`{}` has no counted form", other.name()),
        }
    }
}

/// What the scenario's family adds to the report, from the run's workload (the whole fleet's), what it
/// measured and, against Redis, the commands the server ran.
pub(crate) fn fields(
    work: &Workload,
    measured: &Measured,
    commands: Option<&Counts>,
) -> ScenarioFields {
    match family(work.scenario) {
        Family::Cache(_) => ScenarioFields::default(),
        Family::L1(kind) => l1::fields(kind, measured),
        Family::RateLimit(kind) => rate_limit::fields(kind, work, measured),
        Family::Lock => lock::fields(work, measured, commands),
        Family::Session => session::fields(work),
        Family::Stale => stale::fields(work, measured),
        Family::Stream(kind) => stream::fields(kind, work, measured),
    }
}

/// A scenario's own check of a run's merged figures (a run that measured something else is an error).
///
/// # Errors
/// `stream_e2e`: fewer events handled than published.
pub(crate) fn check(work: &Workload, measured: &Measured) -> anyhow::Result<()> {
    match family(work.scenario) {
        Family::Stream(kind) => stream::check(kind, work, measured),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use keyward::policy::{Algorithm, OnError};

    use super::workload::tests::work;
    use super::*;

    #[test]
    fn the_bench_policy_is_valid() {
        let policy = policy("kwbench42", &work(Scenario::Hit, Algorithm::Gcra, 100)).unwrap();
        assert_eq!(policy.app(), "kwbench42");
        assert!(policy.class(cache::CLASS).is_some());
        assert!(policy.class(rate_limit::CLASS).is_none());
    }

    #[test]
    fn every_algorithm_has_valid_rate_limit_classes() {
        for algorithm in Algorithm::ALL {
            for scenario in [Scenario::RatelimitExact, Scenario::RatelimitThroughput] {
                for limit in [1, 100, 100_000] {
                    let w = work(scenario, algorithm, limit);
                    let policy = policy("kwbench42", &w)
                        .unwrap_or_else(|e| panic!("{scenario:?} {algorithm}: {e}"));
                    let class = policy
                        .class(rate_limit::CLASS)
                        .unwrap()
                        .as_rate_limit()
                        .unwrap();
                    assert_eq!(class.algorithm_value(), algorithm);
                    assert_eq!(class.on_error_value(), OnError::Deny);
                    if scenario == Scenario::RatelimitExact {
                        assert_eq!(class.limit_value(), limit);
                        assert_eq!(class.capacity(), limit);
                    }
                }
            }
        }
    }

    #[test]
    fn an_out_of_range_limit_is_a_policy_error() {
        let w = work(Scenario::RatelimitExact, Algorithm::SlidingLog, 200_000);
        let err = policy("kwbench42", &w).unwrap_err();
        assert_eq!(err.field(), Some("limit"), "{err}");
        let w = work(Scenario::RatelimitExact, Algorithm::Gcra, 0);
        assert!(policy("kwbench42", &w).is_err());
    }

    #[test]
    fn l1_scenarios_get_a_class_with_l1_and_the_plain_one_has_none() {
        for scenario in [Scenario::HitL1, Scenario::Staleness] {
            let p = policy("kwbench42", &work(scenario, Algorithm::Gcra, 100)).unwrap();
            let class = p.class(l1::CLASS).unwrap().as_cache().unwrap();
            assert!(class.l1_value().is_some());
            assert_eq!(class.l1_max_stale_value(), l1::L1_MAX_STALE);
        }
        let p = policy("kwbench42", &work(Scenario::Hit, Algorithm::Gcra, 100)).unwrap();
        assert!(p.class(l1::CLASS).is_none());
        assert!(
            p.class(cache::CLASS)
                .unwrap()
                .as_cache()
                .unwrap()
                .l1_value()
                .is_none()
        );
    }

    #[test]
    fn lock_and_session_scenarios_get_their_class_and_no_other() {
        let locking = policy("kwbench42", &work(Scenario::Lock, Algorithm::Gcra, 100)).unwrap();
        assert!(locking.class(lock::CLASS).unwrap().as_lock().is_some());
        assert!(locking.class(session::CLASS).is_none());
        for extend in [Extend::Always, Extend::Default] {
            let w = Workload {
                extend,
                ..work(Scenario::Session, Algorithm::Gcra, 100)
            };
            let sessions = policy("kwbench42", &w).unwrap();
            assert!(
                sessions
                    .class(session::CLASS)
                    .unwrap()
                    .as_session()
                    .is_some()
            );
            assert!(sessions.class(lock::CLASS).is_none());
        }
    }

    #[test]
    fn every_scenario_belongs_to_the_family_its_name_says() {
        for &scenario in <Scenario as clap::ValueEnum>::value_variants() {
            let name = scenario.name();
            let expected = match family(scenario) {
                Family::Cache(_) => ["hit", "miss", "stampede", "get"].contains(&name),
                Family::L1(_) => ["hit_l1", "staleness"].contains(&name),
                Family::RateLimit(_) => name.starts_with("ratelimit_"),
                Family::Lock => name == "lock",
                Family::Session => name == "session",
                Family::Stale => name == "stale_serve",
                Family::Stream(_) => name.starts_with("stream_"),
            };
            assert!(expected, "{name}");
        }
    }
}
