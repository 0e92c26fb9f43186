//! The scenarios: one [`Scenario`] per stable name, grouped in families that share a policy class and a
//! set-up — [`cache`] (`hit`, `miss`, `stampede`, `get`), [`rate_limit`] (`ratelimit_exact`,
//! `ratelimit_throughput`), [`lock`] and [`session`] — each family in a file of its own.
//!
//! Every scenario goes through the same phases, which is what the rest of `bench` relies on:
//! 1. [`policy`]: the classes it needs, in the run's fresh namespace;
//! 2. [`prepare`]: connect and warm up (outside the measured phase, so that the caller can take its
//!    command-count snapshot or do the READY/GO handshake in between);
//! 3. [`Prepared::run`]: the measured phase, giving a [`Measured`];
//! 4. [`Prepared::counted_ops`] (some scenarios): a fixed number of ops, while the caller counts commands;
//! 5. [`fields`]: what the family adds to the report.
//!
//! **Why an enum and not a trait.** The set of scenarios is closed and its names are a contract (clap lists
//! them; results are compared across libraries by name), and the phases are `async`: a trait would need boxed
//! futures (`async fn` in traits is not object-safe) or generics threaded through `fleet` and `bench`, for no
//! extension point anyone outside this crate can use. [`Family`] carries each family's own sub-kind, so the
//! dispatch in this file is exhaustive `match`es: adding a scenario makes the compiler point at every phase
//! that must handle it, and no family ever sees a scenario of another.

pub(crate) mod cache;
pub(crate) mod lock;
pub(crate) mod rate_limit;
pub(crate) mod session;

use std::time::{Duration, Instant};

use clap::ValueEnum;
use keyward::Keyward;
use keyward::policy::{Algorithm, Policy, PolicyError};
use serde::{Deserialize, Serialize};

use crate::bench::measure::{Measured, Stop};
use crate::bench::report::ScenarioFields;
use crate::error::UsageError;
use crate::stats::Counts;

use self::lock::LockNames;
use self::session::Extend;

/// Target size of one cached value (and one session's data), JSON-encoded.
const VALUE_BYTES: usize = 1024;

/// A benchmark scenario, by its stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// One warm key, read in a loop for the duration.
    Hit,
    /// Many cold keys, each loaded once.
    Miss,
    /// Many callers on one cold key with a slow loader, all at once.
    Stampede,
    /// Baseline without keyward: plain GETs of the same value through redis-rs.
    Get,
    /// Many racing rate-limit checks on one identity, all at once: are exactly `limit` allowed?
    #[value(name = "ratelimit_exact")]
    RatelimitExact,
    /// Rate-limit checks over 10,000 identities in a loop for the duration, never refused.
    #[value(name = "ratelimit_throughput")]
    RatelimitThroughput,
    /// Lock acquire + release in a loop for the duration, on distinct names or on one contended name.
    Lock,
    /// `Sessions::get` over a pool of sessions in a loop for the duration, extending on every read or not.
    Session,
}

/// A scenario's family, with the family's own kind of scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Cache(cache::Kind),
    RateLimit(rate_limit::Kind),
    Lock,
    Session,
}

impl Scenario {
    /// The stable name, as on the command line and in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Hit => "hit",
            Scenario::Miss => "miss",
            Scenario::Stampede => "stampede",
            Scenario::Get => "get",
            Scenario::RatelimitExact => "ratelimit_exact",
            Scenario::RatelimitThroughput => "ratelimit_throughput",
            Scenario::Lock => "lock",
            Scenario::Session => "session",
        }
    }

    pub(crate) fn family(self) -> Family {
        match self {
            Scenario::Hit => Family::Cache(cache::Kind::Hit),
            Scenario::Miss => Family::Cache(cache::Kind::Miss),
            Scenario::Stampede => Family::Cache(cache::Kind::Stampede),
            Scenario::Get => Family::Cache(cache::Kind::Get),
            Scenario::RatelimitExact => Family::RateLimit(rate_limit::Kind::Exact),
            Scenario::RatelimitThroughput => Family::RateLimit(rate_limit::Kind::Throughput),
            Scenario::Lock => Family::Lock,
            Scenario::Session => Family::Session,
        }
    }

    pub(crate) fn is_rate_limit(self) -> bool {
        matches!(self.family(), Family::RateLimit(_))
    }

    /// Whether the scenario runs without keyward and so needs Redis (`get`).
    pub(crate) fn needs_redis(self) -> bool {
        self == Scenario::Get
    }

    /// Whether `--keys` is split between processes (each needs at least one key).
    pub(crate) fn splits_keys(self) -> bool {
        matches!(self, Scenario::Miss | Scenario::Session)
    }

    /// Whether the report counts the commands clients send per op (`redis_client_cmds_per_op`), which needs
    /// [`Prepared::counted_ops`].
    pub(crate) fn audits_client_commands(self) -> bool {
        matches!(
            self,
            Scenario::RatelimitThroughput | Scenario::Lock | Scenario::Session
        )
    }

    /// `--concurrency` when not given: 1000 for the one-shot races, else 64.
    pub(crate) fn default_concurrency(self) -> usize {
        match self {
            Scenario::Hit
            | Scenario::Miss
            | Scenario::Get
            | Scenario::RatelimitThroughput
            | Scenario::Lock
            | Scenario::Session => 64,
            Scenario::Stampede | Scenario::RatelimitExact => 1000,
        }
    }
}

/// What one process runs.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) scenario: Scenario,
    /// Concurrent callers in this process.
    pub(crate) concurrency: usize,
    /// How long the timed scenarios run.
    pub(crate) duration: Duration,
    /// `miss`: how many keys this process loads, and the index of its first one. `session`: how many
    /// sessions this process creates and reads (and the index of its first, which names their users).
    pub(crate) keys: u64,
    pub(crate) key_offset: u64,
    /// `hit` and `get`: how many warm keys the workers spread over.
    pub(crate) hit_keys: u64,
    /// `stampede`: how long the loader takes.
    pub(crate) loader_delay: Duration,
    /// Names the run's key(s), so every run starts cold.
    pub(crate) key_id: u64,
    /// Rate-limit scenarios: the algorithm of the class.
    pub(crate) algorithm: Algorithm,
    /// `ratelimit_exact`: the class's limit (and burst).
    pub(crate) limit: u64,
    /// `lock`: a name per worker, or one for all.
    pub(crate) lock_names: LockNames,
    /// `session`: extend on every read, or with the class default.
    pub(crate) extend: Extend,
}

impl Workload {
    /// Split over `processes` children: C/P callers each (and N/P keys, with consecutive ranges), the
    /// remainders going to the first child.
    pub(crate) fn split(&self, processes: usize) -> Vec<Workload> {
        let p = processes as u64;
        let mut offset = self.key_offset;
        (0..processes)
            .map(|i| {
                let first = i == 0;
                let concurrency = self.concurrency / processes
                    + if first {
                        self.concurrency % processes
                    } else {
                        0
                    };
                let keys = self.keys / p + if first { self.keys % p } else { 0 };
                let child = Workload {
                    concurrency,
                    keys,
                    key_offset: offset,
                    ..self.clone()
                };
                offset += keys;
                child
            })
            .collect()
    }

    /// The workload [`Prepared::counted_ops`] runs with `per_worker` ops per caller (`session`: on a pool of
    /// its own, of at most `per_worker` sessions per caller).
    pub(crate) fn for_counted_ops(&self, per_worker: u64) -> Workload {
        match self.scenario.family() {
            Family::Session => session::for_counted_ops(self, per_worker),
            Family::Cache(_) | Family::RateLimit(_) | Family::Lock => self.clone(),
        }
    }
}

/// The value the benchmark caches (and keeps as session data): a record shaped like a typical API object,
/// ≈1 KiB as JSON.
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

/// The policy every bench process uses, in a namespace of its own (`app`): the cache class (always), plus
/// the class of the scenario's family (see each family's `class`).
///
/// # Errors
/// A [`PolicyError`] when the rate-limit class is invalid (e.g. a `--limit` out of range for the algorithm).
pub(crate) fn policy(app: &str, work: &Workload) -> Result<Policy, PolicyError> {
    let builder = Policy::builder("bench", app).cache(cache::CLASS, cache::class());
    let builder = match work.scenario.family() {
        Family::Cache(_) => builder,
        Family::RateLimit(kind) => {
            builder.rate_limit(rate_limit::CLASS, rate_limit::class(kind, work))
        }
        Family::Lock => builder.lock(lock::CLASS, lock::class()),
        Family::Session => builder.session(session::CLASS, session::class(work.extend)),
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
    RateLimit(rate_limit::Ready),
    Lock(lock::Ready),
    Session(session::Ready),
}

/// Connect to `url` in namespace `app` and warm up: one call on a key of its own loads keyward's scripts into
/// Redis and opens the connection, so one-time costs do not count against the scenario (see each family's
/// `prepare` for what else it sets up).
///
/// # Errors
/// A [`UsageError`] for an invalid policy or URL; otherwise when connecting or warming up fails.
pub(crate) async fn prepare(url: &str, app: &str, work: Workload) -> anyhow::Result<Prepared> {
    let policy = policy(app, &work).map_err(|e| anyhow::Error::new(UsageError(e.to_string())))?;
    let kw = Keyward::connect(url, policy).await.map_err(|e| match e {
        keyward::Error::InvalidUrl { .. } => anyhow::Error::new(UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    let ready = match work.scenario.family() {
        Family::Cache(kind) => Ready::Cache(cache::prepare(&kw, url, app, kind, &work).await?),
        Family::RateLimit(_) => Ready::RateLimit(rate_limit::prepare(&kw, &work).await?),
        Family::Lock => Ready::Lock(lock::prepare(&kw, &work).await?),
        Family::Session => Ready::Session(session::prepare(&kw, &work).await?),
    };
    Ok(Prepared { work, ready })
}

impl Prepared {
    /// The measured phase.
    pub(crate) async fn run(self) -> anyhow::Result<Measured> {
        let timed = Stop::At(Instant::now() + self.work.duration);
        match (self.ready, self.work.scenario.family()) {
            (Ready::Cache(ready), Family::Cache(kind)) => ready.run(kind, &self.work).await,
            (Ready::RateLimit(ready), Family::RateLimit(kind)) => {
                ready.run(kind, &self.work, timed).await
            }
            (Ready::Lock(ready), Family::Lock) => ready.run(&self.work, timed).await,
            (Ready::Session(ready), Family::Session) => ready.run(&self.work, timed).await,
            _ => anyhow::bail!(
                "`{}` was prepared for another family",
                self.work.scenario.name()
            ),
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
    match work.scenario.family() {
        Family::Cache(_) => ScenarioFields::default(),
        Family::RateLimit(kind) => rate_limit::fields(kind, work, measured),
        Family::Lock => lock::fields(work, measured, commands),
        Family::Session => session::fields(work),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A workload of `scenario` with small numbers, for the families' tests.
    pub(crate) fn work(scenario: Scenario, algorithm: Algorithm, limit: u64) -> Workload {
        Workload {
            scenario,
            concurrency: 4,
            duration: Duration::from_secs(1),
            keys: 1,
            key_offset: 0,
            hit_keys: 1,
            loader_delay: Duration::ZERO,
            key_id: 7,
            algorithm,
            limit,
            lock_names: LockNames::One,
            extend: Extend::Default,
        }
    }

    #[test]
    fn items_are_about_one_kib() {
        for id in [0, 7, 12_345, u64::MAX] {
            let len = serde_json::to_vec(&Item::sized(id)).unwrap().len();
            assert!((VALUE_BYTES..VALUE_BYTES + 40).contains(&len), "{len}");
        }
    }

    #[test]
    fn the_bench_policy_is_valid() {
        let policy = policy("kwbench42", &work(Scenario::Hit, Algorithm::Gcra, 100)).unwrap();
        assert_eq!(policy.app(), "kwbench42");
        assert!(policy.class(cache::CLASS).is_some());
        assert!(policy.class(rate_limit::CLASS).is_none());
    }

    #[test]
    fn every_scenario_names_itself_as_clap_does_and_belongs_to_one_family() {
        for scenario in Scenario::value_variants() {
            let clap_name = scenario.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(scenario.name(), clap_name);
            assert_eq!(
                scenario.is_rate_limit(),
                scenario.name().starts_with("ratelimit_"),
                "{clap_name}"
            );
        }
    }

    #[test]
    fn split_gives_the_remainder_to_the_first_child() {
        let w = Workload {
            concurrency: 10,
            keys: 1003,
            ..work(Scenario::Miss, Algorithm::Gcra, 100)
        };
        let parts = w.split(4);
        let callers: Vec<_> = parts.iter().map(|w| w.concurrency).collect();
        assert_eq!(callers, [4, 2, 2, 2]);
        let keys: Vec<_> = parts.iter().map(|w| (w.key_offset, w.keys)).collect();
        assert_eq!(keys, [(0, 253), (253, 250), (503, 250), (753, 250)]);
        assert!(parts.iter().all(|w| w.key_id == 7));
    }
}
