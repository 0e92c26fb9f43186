//! What one process runs: the scenario's stable name and properties ([`Scenario`]), its options
//! ([`Workload`], with [`LockNames`] and [`Extend`]) and the value it stores ([`Item`]).
//!
//! The one decision: this is the leaf of the scenario modules. The families and the dispatch in `mod.rs`
//! depend on it and it depends on none of them, so the scenario files form no import cycle, parent and
//! children included.

use std::time::Duration;

use clap::ValueEnum;
use keyward::policy::Algorithm;
use serde::{Deserialize, Serialize};

/// Target size of one cached value (and one session's data), JSON-encoded.
pub(crate) const VALUE_BYTES: usize = 1024;

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
    /// Warm keys read through the in-process tier (L1) in a loop for the duration.
    #[value(name = "hit_l1")]
    HitL1,
    /// One process invalidates in a loop while the others read through L1: is any read staler than
    /// `l1_max_stale`?
    Staleness,
    /// Stale keys read in a loop for the duration while their loader always fails: fail-safe serving.
    #[value(name = "stale_serve")]
    StaleServe,
    /// C loops publishing ≈1 KiB JSON events to a stream for the duration.
    #[value(name = "stream_produce")]
    StreamProduce,
    /// `--messages` events published by one producer and consumed by a worker runtime (no-op handler):
    /// throughput from the first publish to the last acknowledgement, and enqueue-to-handled latency.
    #[value(name = "stream_e2e")]
    StreamE2e,
    /// `stream_e2e` with the worker processes SIGKILLed and restarted while the producer publishes: is any
    /// message lost?
    #[value(name = "stream_chaos")]
    StreamChaos,
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
            Scenario::HitL1 => "hit_l1",
            Scenario::Staleness => "staleness",
            Scenario::StaleServe => "stale_serve",
            Scenario::StreamProduce => "stream_produce",
            Scenario::StreamE2e => "stream_e2e",
            Scenario::StreamChaos => "stream_chaos",
        }
    }

    pub(crate) fn is_rate_limit(self) -> bool {
        matches!(
            self,
            Scenario::RatelimitExact | Scenario::RatelimitThroughput
        )
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
    /// `Prepared::counted_ops`.
    pub(crate) fn audits_client_commands(self) -> bool {
        matches!(
            self,
            Scenario::RatelimitThroughput | Scenario::Lock | Scenario::Session
        )
    }

    /// Whether children of `--processes` run until the parent stops them (`stream_e2e`'s workers, while
    /// the parent publishes), rather than for `--duration`.
    pub(crate) fn runs_until_stopped(self) -> bool {
        matches!(self, Scenario::StreamE2e | Scenario::StreamChaos)
    }

    /// `--concurrency` when not given: 1000 for the one-shot races, else 64.
    pub(crate) fn default_concurrency(self) -> usize {
        match self {
            Scenario::Hit
            | Scenario::Miss
            | Scenario::Get
            | Scenario::RatelimitThroughput
            | Scenario::Lock
            | Scenario::Session
            | Scenario::HitL1
            | Scenario::Staleness
            | Scenario::StaleServe
            | Scenario::StreamProduce
            | Scenario::StreamE2e
            | Scenario::StreamChaos => 64,
            Scenario::Stampede | Scenario::RatelimitExact => 1000,
        }
    }
}

/// `lock`: which names the workers lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LockNames {
    /// A name per worker: no contention.
    Distinct,
    /// One name for every worker of every process.
    One,
}

impl LockNames {
    /// The name on the command line and in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            LockNames::Distinct => "distinct",
            LockNames::One => "one",
        }
    }
}

/// `session`: how often a read pushes the idle expiry back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Extend {
    /// `extend_after = 0`: every read extends (writes).
    Always,
    /// The class default, `extend_after = idle / 10`: reads within it write nothing.
    Default,
}

impl Extend {
    /// The name on the command line and in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Extend::Always => "always",
            Extend::Default => "default",
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
    /// `stale_serve`: how many keys go stale and are read.
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
    /// `staleness`: this process's index in the fleet (0: the writer; 0 also without `--processes`).
    pub(crate) process: usize,
    /// `staleness`: how long the writer waits between two invalidations.
    pub(crate) invalidate_every: Duration,
    /// `stream_e2e`: how many events the producer publishes (in the whole fleet).
    pub(crate) messages: u64,
    /// The stream scenarios: events per publish call (1: `publish`, more: `publish_many`).
    pub(crate) batch: usize,
    /// `stream_e2e` and `stream_chaos`: publish calls the producer keeps outstanding.
    pub(crate) inflight: usize,
    /// `stream_chaos`: how often a worker process is killed (and restarted) while the producer publishes.
    pub(crate) kill_every: Duration,
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
                    process: i,
                    ..self.clone()
                };
                offset += keys;
                child
            })
            .collect()
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A workload of `scenario` with small numbers, for the scenario modules' tests.
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
            process: 0,
            invalidate_every: Duration::from_millis(5),
            messages: 100,
            batch: 1,
            inflight: 64,
            kill_every: Duration::from_millis(500),
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
    fn every_scenario_names_itself_as_clap_does() {
        for scenario in Scenario::value_variants() {
            let clap_name = scenario.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(scenario.name(), clap_name);
            assert_eq!(
                scenario.is_rate_limit(),
                scenario.name().starts_with("ratelimit_"),
                "{clap_name}"
            );
        }
        for names in LockNames::value_variants() {
            assert_eq!(names.name(), names.to_possible_value().unwrap().get_name());
        }
        for extend in Extend::value_variants() {
            assert_eq!(
                extend.name(),
                extend.to_possible_value().unwrap().get_name()
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
        let processes: Vec<_> = parts.iter().map(|w| w.process).collect();
        assert_eq!(processes, [0, 1, 2, 3]);
    }
}
