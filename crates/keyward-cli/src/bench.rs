//! `keyward bench <scenario>`: the arguments, one run (in-process or across `--processes`), and its report.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use keyward::policy::Algorithm;
use serde::Serialize;

use crate::fleet::{self, Fleet};
use crate::stats::{self, CommandStats};
use crate::usage;
use crate::workload::{self, Measured, Workload};

/// Shown at the end of `keyward bench --help`.
const BENCH_HELP: &str = "\
Scenarios (the names are stable):
  hit       one warm key; C workers loop get_or_set for --duration; the loader must never run
  miss      --keys N cold keys taken by C workers from a shared counter, each loaded once
  stampede  C callers released at once (a barrier) on ONE cold key whose loader sleeps --loader-ms;
            keyward should call the loader exactly once, fleet-wide
  get       baseline without keyward (Redis only): C workers loop a plain GET of the same ~1 KiB JSON value
            through redis-rs's ConnectionManager, decoding it, for --duration; keyward's overhead is hit / get
  ratelimit_exact
            C callers (default 1000) released at once (a barrier), each making exactly ONE check of the
            same identity, in a fresh rate-limit class of --algorithm with limit and burst --limit L
            (default 100) per 100 days (sliding_log: per hour), so that nothing replenishes during the run;
            exactly min(L, C) should be allowed, fleet-wide. Not being exact is reported, not an error.
  ratelimit_throughput
            C workers loop checks for --duration, worker w of C checking identities w, w+C, w+2C, … modulo
            10000, in a class of --algorithm that never refuses: 1000000000 per hour (sliding_log, which
            stores one entry per request: 100000 per second)
  lock      C workers loop for --duration: Locks::lock (a class with a 10s lease and a 60s wait), then
            LockGuard::release. --names distinct (the default): every worker has a lock name of its own,
            so each acquisition is one uncontended attempt. --names one: all workers, in every process, fight
            for ONE name; a waiter is woken by the holder's release. Inside the critical section a worker
            checks mutual exclusion in process (no other worker of this process inside; the fence above every
            fence this process saw before) and yields to the scheduler before leaving. One op = ask, acquire,
            release: for --names one, one handoff.
  session   a pool of --keys N sessions (10 per user, ~1 KiB JSON data each) is created before the timed
            phase; then C workers loop Sessions::get for --duration, worker w reading sessions w, w+C, w+2C, …
            modulo N. Every read must find its session. --extend always: a class with extend_after = 0, so
            every read pushes the idle expiry back (a write); --extend default: extend_after = idle / 10
            (3 min of a 30 min idle timeout), so reads during the run write nothing.

--hit-keys K spreads `hit` and `get` over K warm keys (worker w reads key w mod K). With K = C no two workers
share a key, so keyward's in-process coalescing of concurrent reads of one key plays no part.

Every run uses a fresh namespace (env `bench`, app `kwbench<random>`) and ~1 KiB JSON values.
--processes P (all scenarios; Redis only) runs P child processes sharing that namespace and key, each with
C/P callers (the remainder goes to the first; for miss and session the keys are split the same way), starts
them together once all are connected, and merges their latency histograms and counts.
Rate-limit classes use on_error = deny, and a check the store did not decide fails the run.

Output fields: peer, scenario, backend, concurrency, processes, ops, seconds, ops_per_s, p50_us, p99_us,
max_us, loader_calls, and against Redis redis_cmds_per_op and redis_cmds: the server's INFO commandstats
calls (including commands run inside Lua scripts, excluding INFO) during the measured phase, per operation
and per command.
The rate-limit scenarios add algorithm, limit and window_s (the class's), allowed and limited (checks
allowed and refused, fleet-wide), and ratelimit_exact adds exact (allowed == min(limit, concurrency)).
lock adds names; with --names one also violations (must be 0), timeouts (lock gave up after its 60s wait;
not counted as ops), handoffs_per_s (acquisitions per second, = ops_per_s) and reacquired (acquisitions by
the worker that held the lock last in its process: it took the lock again right after releasing it, before
the waiters its release woke; exact with one process, an upper bound with several); against Redis,
acquire_attempts and attempts_per_acquire: the script calls (EVALSHA, EVAL) of the measured phase less one
release per op, i.e. every acquisition attempt, including those that found the lock held. session adds extend, extend_after_ms
and sessions (the pool size).
ratelimit_throughput, lock and session against Redis add redis_client_cmds_per_op and redis_client_cmds:
the top-level commands clients sent (EVALSHA, EVAL, any plain command; not the commands scripts call), per
op and per command. Redis counts a script's calls in INFO commandstats and in total_commands_processed
alike, so these come from MONITOR, which costs throughput: after the timed phase, this process runs 16 ops
per caller (C/P callers) with its own keyward handle (session: on a pool of its own, of at most 16 × C/P
sessions) while MONITOR runs; connecting and warming up are not counted, unrelated clients' commands are.
Left out, with a warning, when the server refuses MONITOR. For lock --names one that count depends on
contention, which MONITOR changes (it slows the server); attempts_per_acquire, from the timed run, is the
figure to quote.

Exit codes: 0 success, 1 runtime failure (e.g. cannot connect), 2 bad usage.";

/// A benchmark scenario.
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

/// `lock`: which names the workers lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LockNames {
    /// A name per worker: no contention.
    Distinct,
    /// One name for every worker of every process.
    One,
}

impl LockNames {
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
    pub(crate) fn name(self) -> &'static str {
        match self {
            Extend::Always => "always",
            Extend::Default => "default",
        }
    }
}

impl Scenario {
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

    pub(crate) fn is_rate_limit(self) -> bool {
        matches!(
            self,
            Scenario::RatelimitExact | Scenario::RatelimitThroughput
        )
    }

    /// Whether the report counts the commands clients send per op (`redis_client_cmds_per_op`).
    fn audits_client_commands(self) -> bool {
        matches!(
            self,
            Scenario::RatelimitThroughput | Scenario::Lock | Scenario::Session
        )
    }

    fn default_concurrency(self) -> usize {
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

/// Parses `--algorithm`: the policy names (`gcra`, `token_bucket`, …), listed in `--help`.
fn algorithm_parser() -> impl TypedValueParser<Value = Algorithm> {
    PossibleValuesParser::new(Algorithm::ALL.map(Algorithm::name)).map(|name| {
        // Only the names listed above get here.
        Algorithm::from_name(&name).unwrap_or(Algorithm::Gcra)
    })
}

#[derive(Debug, Args)]
#[command(after_help = BENCH_HELP)]
pub(crate) struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Redis URL (redis://, rediss://, redis+unix://) or mem:// for the embedded backend.
    /// [default: $REDIS_URL, else mem://]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Concurrent callers in total. [default: 1000 for stampede and ratelimit_exact, else 64]
    #[arg(long, short = 'c', value_name = "C")]
    concurrency: Option<usize>,
    /// How long `hit`, `get`, `ratelimit_throughput`, `lock` and `session` run, in seconds (fractions
    /// allowed).
    #[arg(long, short = 'd', value_name = "SECONDS", default_value_t = 10.0)]
    duration: f64,
    /// OS processes to spread the callers over (Redis only).
    #[arg(long, short = 'p', value_name = "P", default_value_t = 1)]
    processes: usize,
    /// How many cold keys `miss` loads; how many sessions `session` creates and reads.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    keys: u64,
    /// How many warm keys `hit` and `get` spread their workers over.
    #[arg(long, value_name = "K", default_value_t = 1)]
    hit_keys: u64,
    /// How long the `stampede` loader takes, in milliseconds.
    #[arg(long, value_name = "M", default_value_t = 50)]
    loader_ms: u64,
    /// The rate-limit algorithm of `ratelimit_exact` and `ratelimit_throughput`.
    #[arg(long, value_name = "NAME", default_value = "gcra", value_parser = algorithm_parser())]
    algorithm: Algorithm,
    /// The limit (and burst) of `ratelimit_exact`.
    #[arg(long, value_name = "L", default_value_t = 100)]
    limit: u64,
    /// `lock`: a lock name per worker, or one name for all.
    #[arg(long, value_enum, value_name = "WHICH", default_value = "distinct")]
    names: LockNames,
    /// `session`: extend the idle expiry on every read, or with the class default (`idle / 10`).
    #[arg(long, value_enum, value_name = "WHEN", default_value = "default")]
    extend: Extend,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,

    /// Internal: run as a child of `--processes`.
    #[arg(long, hide = true, requires_all = ["app", "key_id"])]
    child: bool,
    /// Internal: the namespace app name shared by the children.
    #[arg(long, hide = true)]
    app: Option<String>,
    /// Internal: the id of the run's key(s), shared by the children.
    #[arg(long, hide = true)]
    key_id: Option<u64>,
    /// Internal: the index of this child's first `miss` key.
    #[arg(long, hide = true, default_value_t = 0)]
    key_offset: u64,
}

/// One line of output.
#[derive(Debug, Serialize)]
struct Report {
    peer: &'static str,
    scenario: &'static str,
    backend: &'static str,
    concurrency: usize,
    processes: usize,
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    loader_calls: u64,
    /// Rate-limit scenarios only (with `limited` and `allowed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    algorithm: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limited: Option<u64>,
    /// `ratelimit_exact` only: `allowed == min(limit, concurrency)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    /// `lock` only: `distinct` or `one`.
    #[serde(skip_serializing_if = "Option::is_none")]
    names: Option<&'static str>,
    /// `lock --names one` only: acquisitions that found another worker of their process inside the
    /// critical section, or a fence not above the last one their process saw. Must be 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    violations: Option<u64>,
    /// `lock --names one` only: `lock` calls that gave up at the class's wait (not counted as ops).
    #[serde(skip_serializing_if = "Option::is_none")]
    timeouts: Option<u64>,
    /// `lock --names one` only: acquisitions (each followed by a release) per second, = `ops_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    handoffs_per_s: Option<f64>,
    /// `lock --names one` only: acquisitions by the worker that held the lock last in its process, i.e.
    /// that took it again right after releasing it, before any worker its release woke. Exact with one
    /// process, an upper bound with several.
    #[serde(skip_serializing_if = "Option::is_none")]
    reacquired: Option<u64>,
    /// `lock` against Redis: acquisition attempts (successful or not) during the measured phase, and per
    /// successful acquisition. See [`acquire_attempts`].
    #[serde(skip_serializing_if = "Option::is_none")]
    acquire_attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts_per_acquire: Option<f64>,
    /// `session` only: `always` or `default`, the class's `extend_after` in ms, and the pool size.
    #[serde(skip_serializing_if = "Option::is_none")]
    extend: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extend_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sessions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cmds_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cmds: Option<BTreeMap<String, u64>>,
    /// `ratelimit_throughput`, `lock` and `session` against Redis: see [`ClientCommands`].
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_client_cmds_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_client_cmds: Option<BTreeMap<String, u64>>,
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let url = args
        .url
        .clone()
        .or_else(|| std::env::var("REDIS_URL").ok())
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "mem://".to_owned());
    let embedded = url.starts_with("mem://");
    let concurrency = args
        .concurrency
        .unwrap_or_else(|| args.scenario.default_concurrency());
    if concurrency == 0 {
        usage!("--concurrency must be at least 1");
    }
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 86_400.0) {
        usage!(
            "--duration must be a number of seconds above 0 and at most 86400, got {}",
            args.duration
        );
    }
    if args.keys == 0 {
        usage!("--keys must be at least 1");
    }
    if args.hit_keys == 0 {
        usage!("--hit-keys must be at least 1");
    }
    if args.scenario == Scenario::Get && embedded {
        usage!("the `get` baseline needs Redis: pass --url redis://… or set REDIS_URL");
    }
    if args.processes == 0 {
        usage!("--processes must be at least 1");
    }
    if args.processes > 1 {
        if embedded {
            usage!(
                "--processes {} needs Redis: the embedded backend (mem://) lives in one process; \
                 pass --url redis://… or set REDIS_URL",
                args.processes
            );
        }
        if args.processes > concurrency {
            usage!(
                "--processes {} exceeds --concurrency {concurrency}: every process needs a caller",
                args.processes
            );
        }
        if matches!(args.scenario, Scenario::Miss | Scenario::Session)
            && u64::try_from(args.processes)? > args.keys
        {
            usage!(
                "--processes {} exceeds --keys {}: every process needs a key",
                args.processes,
                args.keys
            );
        }
    }
    let work = Workload {
        scenario: args.scenario,
        concurrency,
        duration: Duration::from_secs_f64(args.duration),
        keys: args.keys,
        hit_keys: args.hit_keys,
        key_offset: args.key_offset,
        loader_delay: Duration::from_millis(args.loader_ms),
        key_id: args.key_id.unwrap_or_else(rand::random),
        algorithm: args.algorithm,
        limit: args.limit,
        lock_names: args.names,
        extend: args.extend,
    };
    // Children would only fail on a bad class after starting: check it once, here. Only the rate-limit class
    // depends on flags; the others are constants that the unit tests check.
    if let Err(e) = workload::policy("kwbench", &work) {
        if work.scenario.is_rate_limit() {
            usage!(
                "--algorithm {} --limit {}: {}",
                work.algorithm,
                work.limit,
                e.message()
            );
        }
        anyhow::bail!("the bench policy is invalid: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if args.child {
        let app = args.app.as_deref().unwrap_or_default();
        return runtime.block_on(fleet::child(&url, app, work));
    }
    let app = format!("kwbench{}", rand::random::<u32>());
    let report = runtime.block_on(measure(&url, &app, work, args.processes, embedded))?;
    print_report(&report, args.json)
}

/// Run the scenario (in this process, or across children) between two command-count snapshots; for
/// `ratelimit_throughput`, `lock` and `session` against Redis, then count what an op sends (see
/// [`client_commands`]).
async fn measure(
    url: &str,
    app: &str,
    work: Workload,
    processes: usize,
    embedded: bool,
) -> anyhow::Result<Report> {
    let scenario = work.scenario;
    let concurrency = work.concurrency;
    let (algorithm, limit) = (work.algorithm, work.limit);
    let (lock_names, extend, pool) = (work.lock_names, work.extend, work.keys);
    let rate_class = workload::rate_class(&work);
    let session_class = workload::session_class(&work);
    // The client-command count runs in this process, with one process's share of the callers.
    let audit_work = split(&work, processes).swap_remove(0);
    let measured: Measured;
    let commands;
    if processes > 1 {
        let mut stats = connect_stats(url, embedded).await?;
        let fleet = Fleet::start(url, app, split(&work, processes), work.duration).await?;
        let before = snapshot(stats.as_mut()).await?;
        measured = fleet.go().await?;
        commands = delta(stats.as_mut(), before).await?;
    } else {
        // keyward connects first: its connection errors are the most helpful ones.
        let prepared = workload::prepare(url, app, work).await?;
        let mut stats = connect_stats(url, embedded).await?;
        let before = snapshot(stats.as_mut()).await?;
        measured = prepared.run().await?;
        commands = delta(stats.as_mut(), before).await?;
    }
    let client = if scenario.audits_client_commands() && !embedded {
        client_commands(url, app, audit_work).await?
    } else {
        None
    };
    let ops = measured.latencies.len();
    let h = &measured.latencies;
    let per_second = if measured.seconds > 0.0 {
        ops as f64 / measured.seconds
    } else {
        0.0
    };
    let per_op = |calls: &stats::Counts, ops: u64| {
        let total: u64 = calls.values().sum();
        if ops == 0 {
            0.0
        } else {
            round(total as f64 / ops as f64, 3)
        }
    };
    let redis_cmds_per_op = commands.as_ref().map(|c| per_op(c, ops));
    let is_rate_limit = scenario.is_rate_limit();
    let is_lock = scenario == Scenario::Lock;
    let lock_one = is_lock && lock_names == LockNames::One;
    let attempts = commands
        .as_ref()
        .filter(|_| is_lock)
        .map(|c| acquire_attempts(c, ops));
    Ok(Report {
        peer: "keyward",
        scenario: scenario.name(),
        backend: if embedded { "embedded" } else { "redis" },
        concurrency,
        processes,
        ops,
        seconds: round(measured.seconds, 6),
        ops_per_s: round(per_second, 1),
        p50_us: if ops == 0 {
            0
        } else {
            h.value_at_quantile(0.50)
        },
        p99_us: if ops == 0 {
            0
        } else {
            h.value_at_quantile(0.99)
        },
        max_us: h.max(),
        loader_calls: measured.loader_calls,
        algorithm: is_rate_limit.then(|| algorithm.name()),
        limit: rate_class.as_ref().map(|c| c.limit_value()),
        window_s: rate_class
            .as_ref()
            .map(|c| round(c.window_value().as_secs_f64(), 6)),
        allowed: is_rate_limit.then_some(measured.allowed),
        limited: is_rate_limit.then_some(measured.limited),
        exact: (scenario == Scenario::RatelimitExact)
            .then(|| measured.allowed == limit.min(concurrency as u64)),
        names: is_lock.then(|| lock_names.name()),
        violations: lock_one.then_some(measured.violations),
        timeouts: lock_one.then_some(measured.timeouts),
        handoffs_per_s: lock_one.then(|| round(per_second, 1)),
        reacquired: lock_one.then_some(measured.reacquired),
        acquire_attempts: attempts,
        attempts_per_acquire: attempts.map(|a| {
            if ops == 0 {
                0.0
            } else {
                round(a as f64 / ops as f64, 3)
            }
        }),
        extend: session_class.as_ref().map(|_| extend.name()),
        extend_after_ms: session_class
            .as_ref()
            .map(|c| u64::try_from(c.extend_after_value().as_millis()).unwrap_or(u64::MAX)),
        sessions: session_class.as_ref().map(|_| pool),
        redis_cmds_per_op,
        redis_cmds: commands,
        redis_client_cmds_per_op: client.as_ref().map(|c| per_op(&c.commands, c.ops)),
        redis_client_cmds: client.map(|c| c.commands),
    })
}

/// `lock`: how many acquisition attempts the measured phase made, successful or not. Each attempt is one
/// script call (`lock_acquire.lua`), and so is each release (`lock_release.lua`); every op ends in exactly one
/// successful release, and nothing else the workers do calls a script. So attempts = script calls (`EVALSHA`,
/// plus `EVAL` should a script have had to be sent in full) − ops. Other clients' script calls would count
/// too, as in `redis_cmds`.
fn acquire_attempts(commands: &stats::Counts, ops: u64) -> u64 {
    let scripts: u64 = ["evalsha", "eval"]
        .iter()
        .filter_map(|name| commands.get(*name))
        .sum();
    scripts.saturating_sub(ops)
}

/// What the client sent for [`CLIENT_AUDIT_OPS`] ops per caller.
struct ClientCommands {
    ops: u64,
    /// Top-level commands received from clients, per command name.
    commands: stats::Counts,
}

/// How many ops each caller makes while the client commands are counted.
const CLIENT_AUDIT_OPS: u64 = 16;

/// The commands clients send per op (a rate-limit check, a lock acquire + release, a session read), which
/// neither `INFO commandstats` nor `INFO stats` (`total_commands_processed`) can tell: both count the commands
/// a Lua script calls as well (checked on Redis 7.0), and Redis before 7.2 keeps no per-client command count.
/// So after the timed run, this process connects its own keyward handle (same namespace and classes; for
/// `session`, a pool of its own of at most [`CLIENT_AUDIT_OPS`] sessions per caller), and while `MONITOR`
/// shows the server's commands, each of `work.concurrency` callers makes [`CLIENT_AUDIT_OPS`] ops.
/// Connecting and warming up happen before the count starts. `MONITOR` slows the server down, which is why
/// the timed run goes without it. `None` (with a warning) when the server refuses `MONITOR` (e.g. a managed
/// Redis).
async fn client_commands(
    url: &str,
    app: &str,
    mut work: Workload,
) -> anyhow::Result<Option<ClientCommands>> {
    if work.scenario == Scenario::Session {
        let audit_pool = CLIENT_AUDIT_OPS.saturating_mul(work.concurrency as u64);
        work.keys = work.keys.min(audit_pool).max(1);
    }
    let prepared = workload::prepare(url, app, work).await?;
    let audit = match stats::ClientAudit::start(url).await {
        Ok(audit) => audit,
        Err(e) => {
            eprintln!("warning: redis_client_cmds_per_op left out: {e:#}");
            return Ok(None);
        }
    };
    let measured = prepared.counted_ops(CLIENT_AUDIT_OPS).await?;
    let commands = audit.finish().await?;
    Ok(Some(ClientCommands {
        ops: measured.latencies.len(),
        commands,
    }))
}

async fn connect_stats(url: &str, embedded: bool) -> anyhow::Result<Option<CommandStats>> {
    if embedded {
        Ok(None)
    } else {
        CommandStats::connect(url).await.map(Some)
    }
}

async fn snapshot(stats: Option<&mut CommandStats>) -> anyhow::Result<Option<stats::Counts>> {
    match stats {
        Some(s) => Ok(Some(s.snapshot().await?)),
        None => Ok(None),
    }
}

async fn delta(
    stats: Option<&mut CommandStats>,
    before: Option<stats::Counts>,
) -> anyhow::Result<Option<stats::Counts>> {
    match (stats, before) {
        (Some(s), Some(before)) => Ok(Some(stats::delta(&before, &s.snapshot().await?))),
        _ => Ok(None),
    }
}

/// Split one workload over `processes` children: C/P callers each (and N/P keys for miss, with consecutive
/// ranges), the remainders going to the first child.
fn split(work: &Workload, processes: usize) -> Vec<Workload> {
    let p = processes as u64;
    let mut offset = work.key_offset;
    (0..processes)
        .map(|i| {
            let first = i == 0;
            let concurrency = work.concurrency / processes
                + if first {
                    work.concurrency % processes
                } else {
                    0
                };
            let keys = work.keys / p + if first { work.keys % p } else { 0 };
            let child = Workload {
                concurrency,
                keys,
                key_offset: offset,
                ..work.clone()
            };
            offset += keys;
            child
        })
        .collect()
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    let text = if json {
        let mut line = serde_json::to_string(report).context("cannot encode the report")?;
        line.push('\n');
        line
    } else {
        table(report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// `name=calls` pairs, most called first; `none` for none.
fn list_counts(counts: &BTreeMap<String, u64>) -> String {
    let mut by_count: Vec<_> = counts.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let listed = by_count
        .iter()
        .map(|(name, calls)| format!("{name}={calls}"))
        .collect::<Vec<_>>()
        .join(" ");
    if listed.is_empty() {
        "none".to_owned()
    } else {
        listed
    }
}

/// The report as aligned `field  value` rows.
fn table(r: &Report) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("peer", r.peer.to_owned()),
        ("scenario", r.scenario.to_owned()),
        ("backend", r.backend.to_owned()),
        ("concurrency", r.concurrency.to_string()),
        ("processes", r.processes.to_string()),
        ("ops", r.ops.to_string()),
        ("seconds", format!("{:.3}", r.seconds)),
        ("ops_per_s", format!("{:.0}", r.ops_per_s)),
        ("p50_us", r.p50_us.to_string()),
        ("p99_us", r.p99_us.to_string()),
        ("max_us", r.max_us.to_string()),
        ("loader_calls", r.loader_calls.to_string()),
    ];
    let optional = [
        ("algorithm", r.algorithm.map(str::to_owned)),
        ("limit", r.limit.map(|l| l.to_string())),
        ("window_s", r.window_s.map(|w| w.to_string())),
        ("allowed", r.allowed.map(|a| a.to_string())),
        ("limited", r.limited.map(|l| l.to_string())),
        ("exact", r.exact.map(|e| e.to_string())),
        ("names", r.names.map(str::to_owned)),
        ("violations", r.violations.map(|v| v.to_string())),
        ("timeouts", r.timeouts.map(|t| t.to_string())),
        (
            "handoffs_per_s",
            r.handoffs_per_s.map(|h| format!("{h:.0}")),
        ),
        (
            "acquire_attempts",
            r.acquire_attempts.map(|a| a.to_string()),
        ),
        (
            "attempts_per_acquire",
            r.attempts_per_acquire.map(|a| format!("{a:.3}")),
        ),
        ("extend", r.extend.map(str::to_owned)),
        ("extend_after_ms", r.extend_after_ms.map(|e| e.to_string())),
        ("sessions", r.sessions.map(|n| n.to_string())),
        (
            "redis_cmds_per_op",
            r.redis_cmds_per_op.map(|p| format!("{p:.3}")),
        ),
        ("redis_cmds", r.redis_cmds.as_ref().map(list_counts)),
        (
            "redis_client_cmds_per_op",
            r.redis_client_cmds_per_op.map(|p| format!("{p:.3}")),
        ),
        (
            "redis_client_cmds",
            r.redis_client_cmds.as_ref().map(list_counts),
        ),
    ];
    rows.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(concurrency: usize, keys: u64) -> Workload {
        Workload {
            scenario: Scenario::Miss,
            concurrency,
            duration: Duration::from_secs(1),
            keys,
            key_offset: 0,
            hit_keys: 1,
            loader_delay: Duration::ZERO,
            key_id: 7,
            algorithm: Algorithm::Gcra,
            limit: 100,
            lock_names: LockNames::Distinct,
            extend: Extend::Default,
        }
    }

    #[test]
    fn split_gives_the_remainder_to_the_first_child() {
        let parts = split(&work(10, 1003), 4);
        let callers: Vec<_> = parts.iter().map(|w| w.concurrency).collect();
        assert_eq!(callers, [4, 2, 2, 2]);
        let keys: Vec<_> = parts.iter().map(|w| (w.key_offset, w.keys)).collect();
        assert_eq!(keys, [(0, 253), (253, 250), (503, 250), (753, 250)]);
        assert!(parts.iter().all(|w| w.key_id == 7));
    }

    #[test]
    fn table_aligns_values() {
        let report = Report {
            peer: "keyward",
            scenario: "hit",
            backend: "redis",
            concurrency: 1,
            processes: 1,
            ops: 10,
            seconds: 1.0,
            ops_per_s: 10.0,
            p50_us: 5,
            p99_us: 9,
            max_us: 9,
            loader_calls: 0,
            algorithm: None,
            limit: None,
            window_s: None,
            allowed: None,
            limited: None,
            exact: None,
            names: None,
            violations: None,
            timeouts: None,
            handoffs_per_s: None,
            reacquired: None,
            acquire_attempts: None,
            attempts_per_acquire: None,
            extend: None,
            extend_after_ms: None,
            sessions: None,
            redis_cmds_per_op: Some(1.0),
            redis_cmds: Some(BTreeMap::from([("evalsha".to_owned(), 10)])),
            redis_client_cmds_per_op: None,
            redis_client_cmds: None,
        };
        let t = table(&report);
        assert!(t.contains("redis_cmds_per_op  1.000\n"), "{t}");
        assert!(t.contains("peer               keyward\n"), "{t}");
        assert!(t.contains("redis_cmds         evalsha=10\n"), "{t}");
        assert!(!t.contains("exact"), "{t}");
    }

    #[test]
    fn rate_limit_fields_are_in_the_table_and_the_json() {
        let report = Report {
            peer: "keyward",
            scenario: "ratelimit_exact",
            backend: "redis",
            concurrency: 1000,
            processes: 4,
            ops: 1000,
            seconds: 0.1,
            ops_per_s: 10_000.0,
            p50_us: 5,
            p99_us: 9,
            max_us: 9,
            loader_calls: 0,
            algorithm: Some("gcra"),
            limit: Some(100),
            window_s: Some(8_640_000.0),
            allowed: Some(100),
            limited: Some(900),
            exact: Some(true),
            names: None,
            violations: None,
            timeouts: None,
            handoffs_per_s: None,
            reacquired: None,
            acquire_attempts: None,
            attempts_per_acquire: None,
            extend: None,
            extend_after_ms: None,
            sessions: None,
            redis_cmds_per_op: Some(5.0),
            redis_cmds: Some(BTreeMap::from([("evalsha".to_owned(), 1000)])),
            redis_client_cmds_per_op: Some(1.0),
            redis_client_cmds: Some(BTreeMap::from([("evalsha".to_owned(), 1024)])),
        };
        let t = table(&report);
        assert!(t.contains("exact                     true\n"), "{t}");
        assert!(t.contains("redis_client_cmds_per_op  1.000\n"), "{t}");
        assert!(
            t.contains("redis_client_cmds         evalsha=1024\n"),
            "{t}"
        );
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["allowed"], 100);
        assert_eq!(v["exact"], true);
        assert_eq!(v["algorithm"], "gcra");
    }

    #[test]
    fn acquire_attempts_are_script_calls_less_one_release_per_op() {
        let commands = stats::Counts::from([
            ("evalsha".to_owned(), 40),
            ("eval".to_owned(), 2),
            ("pttl".to_owned(), 32),
        ]);
        assert_eq!(acquire_attempts(&commands, 10), 32);
        assert_eq!(acquire_attempts(&stats::Counts::new(), 10), 0);
    }
}
