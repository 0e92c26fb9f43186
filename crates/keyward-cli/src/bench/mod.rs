//! `keyward bench <scenario>`: the arguments, one run (in-process or across `--processes`), and its report.
//!
//! Modules, each depending only on those listed before it (no cycle):
//! - [`measure`](mod@measure) — histograms, spans and counts, and the worker loops: what every scenario
//!   measures with.
//! - [`report`] — the JSON line of the output contract (`BENCHMARKS.md`) and the table.
//! - [`scenarios`] — the [`Scenario`] abstraction and one file per scenario family.
//! - [`fleet`] — `--processes`: child processes, the READY/GO handshake, merging their results; it runs
//!   scenarios through the abstraction and knows none of them.
//! - [`servers`] — the servers the command counts are read from: one, or every primary of a Cluster.
//! - [`faults`] — what the parent does to those servers during `staleness` (`--kill-backplane-every`,
//!   `--pause-every`).
//!
//! This file validates the arguments (bad usage exits 2 before anything connects), runs the scenario between
//! two command-count snapshots, and builds the report.

mod faults;
mod fleet;
mod measure;
mod report;
mod scenarios;
pub(crate) mod servers;

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use keyward::policy::Algorithm;

use self::faults::{Injected, Injector, Plan};
use self::fleet::Fleet;
use self::measure::Measured;
use self::report::{Report, ScenarioFields, per_op, round};
use self::scenarios::{Extend, LockNames, Scenario, Workload};
use self::servers::{ServerAudit, ServerStats, Servers};
use crate::error::usage;
use crate::stats;

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

  hit_l1    like hit, through a cache class with an in-process tier (L1: 64 MiB, 30s, l1_max_stale 500ms):
            --hit-keys K warm keys, each read until L1 answers it before the timed phase; C workers loop
            get_or_set for --duration (yielding to the runtime every 64 reads, outside the timed reads)
  staleness needs --processes P >= 2 and Redis. The first process is the writer: every
            --invalidate-every MS it invalidates the next of --hit-keys K keys, and after the K-th the whole
            class (invalidate_all, the group case). Before each invalidation it sets the target's next
            version in a plain Redis key; after it returned, it records the wall-clock time
            (CLOCK_REALTIME) in the target's history.
            The other processes' C/P workers loop get_or_set over the K keys through L1; the loader reads
            the versions. After each read, one round trip asks the history when the invalidation that
            superseded the value returned: a read that started after that is stale by the difference.
            --kill-backplane-every MS: the parent runs CLIENT KILL TYPE pubsub on every server that often;
            --pause-every MS: CLIENT PAUSE <--pause-for MS> WRITE on every server that often (writes, scripts
            and PUBLISH wait: keyward's heartbeats, invalidations and Redis reads; plain reads answer).
  stale_serve
            fail-safe: --keys K keys of a class with a 1s TTL (no jitter), stale_grace 1min and
            fail_safe_throttle 50ms are written; once their TTL ran out, each is read with a loader that
            always fails until keyward serves it stale. Then C workers loop get_or_set with that loader for
            --duration, worker w reading keys w, w+C, w+2C, … modulo K: each read is answered with the stale
            value (a refill failed; it is stored again as current for the throttle) or a hit (within the
            throttle), counted by CacheLookup. A run that served no stale value fails. One process only.

  stream_produce
            C loops publish ~1 KiB JSON events to a stream class (maxlen 10000, approximate) for --duration,
            --batch B events per call (1: Stream::publish; more: publish_many). Every event is an op, with
            the latency of its call. No consumer group: every publish trims by maxlen once it is reached.
  stream_e2e
            one producer publishes --messages N events (default 20000), --batch B per call, keeping
            --inflight W calls outstanding (default 64: as W concurrent request handlers of a service
            would; concurrent calls share round trips; 1: one call after the other, which measures the
            round-trip latency rather than the throughput), while a worker (Stream::worker, group `bench`) with handler concurrency C consumes
            them with a no-op handler. When every event is published the producer polls group_info every
            1 ms until nothing is pending or undelivered: ops_per_s = handled / (that moment - the first
            publish); p50_us/p99_us are enqueue-to-handled latencies (wall clock at the publish call to
            the handler's start). --processes P: the workers run in P child processes (C/P handlers each)
            and the producer in the parent, which sends them STOP once the group has drained.
  stream_chaos
            stream_e2e with --processes P >= 2 (Redis only) whose worker processes are SIGKILLed: every
            --kill-every MS (default 500) while the producer publishes, the parent kills a worker process
            picked at random and starts it again at once. The class's claim_idle is 1s, so a killed
            worker's entries are taken over soon. Each handler first counts its event in a Redis hash
            (HINCRBY, outside keyward's keyspace, 10 min TTL; a failed count fails the delivery). After
            the drain the parent reads that hash and the dead letters: lost = events neither counted nor
            dead-lettered (must be 0), duplicates = counts beyond one per event (a handler that ran in a
            killed process before its acknowledgement, or whose entry was taken over).

--hit-keys K spreads `hit` and `get` over K warm keys (worker w reads key w mod K). With K = C no two workers
share a key, so keyward's in-process coalescing of concurrent reads of one key plays no part.

Every run uses a fresh namespace (env `bench`, app `kwbench<random>`) and ~1 KiB JSON values. Its keys are
left in the server to expire with their TTLs (ratelimit_exact's live its 100-day window): run against a server
you can flush, not one a service uses.
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
hit_l1 and staleness add l1_max_stale_ms, l1_hits (reads answered by L1) and l1_hit_ratio (of ops);
staleness adds max_stale_us (the longest a read started after an invalidation of its value returned),
stale_reads (reads that did), violations (those beyond l1_max_stale; must be 0), key_invalidations and
group_invalidations (class and tag invalidations; that returned), invalidation_errors (failed calls, retried), read_errors (failed reads,
not counted as ops), and with faults backplane_kills, pubsub_clients_killed, pauses and pause_ms. For
staleness, ops are the readers' reads; the writer's invalidations are not ops.
stale_serve adds ttl_ms, stale_grace_ms and fail_safe_throttle_ms (the class's), keys, stale_served (reads
answered CacheLookup::Stale), stale_ratio (of ops), stale_p50_us and stale_p99_us (those reads' latency),
lookups (reads per CacheLookup name: hit, stale_loader_error, coalesced, …) and errors (reads that failed,
not counted as ops; must be 0). loader_calls counts the failing loader's calls.
stream_produce and stream_e2e add batch, maxlen (the class's), published (events) and publish_calls;
stream_e2e adds messages, inflight, handled (handler calls), duplicates (handled beyond one per message; 0 without
failures), failed and dead_lettered (the workers' reports; 0 with the no-op handler) and drain_polls (the
producer's group_info calls while waiting for the drain, included in redis_cmds). A stream_e2e run in which
fewer events were handled than published fails. stream_chaos adds the same fields, lost, kills and
kill_every_ms; its handled, duplicates and dead_lettered come from the hash and the dead-letter stream (every
process, killed ones included), but ops, the latencies, redis_cmds_per_op and failed are of the worker
processes alive at the end only (a killed process's figures die with it): its figures are lost and
duplicates, not its speed.
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
    /// Redis URL (redis://, rediss://, redis+unix://, redis+cluster://host:port[,host:port…]) or mem:// for
    /// the embedded backend.
    /// [default: $REDIS_URL, else mem://]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Concurrent callers in total. [default: 1000 for stampede and ratelimit_exact, else 64]
    #[arg(long, short = 'c', value_name = "C")]
    concurrency: Option<usize>,
    /// How long `hit`, `get`, `hit_l1`, `staleness`, `stale_serve`, `ratelimit_throughput`, `lock`,
    /// `session` and `stream_produce` run, in seconds (fractions allowed).
    #[arg(long, short = 'd', value_name = "SECONDS", default_value_t = 10.0)]
    duration: f64,
    /// OS processes to spread the callers over (Redis only).
    #[arg(long, short = 'p', value_name = "P", default_value_t = 1)]
    processes: usize,
    /// How many cold keys `miss` loads; how many sessions `session` creates and reads; how many stale keys
    /// `stale_serve` reads.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    keys: u64,
    /// How many warm keys `hit`, `get` and `hit_l1` spread their workers over; how many keys `staleness`
    /// invalidates and reads.
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
    /// `staleness`: how long the writer waits between two invalidations, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5)]
    invalidate_every: u64,
    /// `staleness`: run `CLIENT KILL TYPE pubsub` on every server this often, in milliseconds.
    #[arg(long, value_name = "MS")]
    kill_backplane_every: Option<u64>,
    /// `staleness`: run `CLIENT PAUSE <--pause-for> WRITE` on every server this often, in milliseconds.
    #[arg(long, value_name = "MS")]
    pause_every: Option<u64>,
    /// `staleness --pause-every`: how long each pause lasts, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 750)]
    pause_for: u64,
    /// `stream_e2e`: how many events the producer publishes.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    messages: u64,
    /// The stream scenarios: events per publish call (1: `publish`; more: one `publish_many`).
    #[arg(long, value_name = "B", default_value_t = 1)]
    batch: usize,
    /// `stream_e2e` and `stream_chaos`: publish calls the one producer keeps outstanding at once (as a
    /// service's concurrent request handlers would; they share round trips through the stream's batching).
    #[arg(long, value_name = "N", default_value_t = 64)]
    inflight: usize,
    /// `stream_chaos`: how often a worker process is killed (and restarted) while the producer publishes,
    /// in milliseconds. [default: 500]
    #[arg(long, value_name = "MS")]
    kill_every: Option<u64>,
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
    /// Internal: this child's index in the fleet (`staleness`: 0 is the writer).
    #[arg(long, hide = true, default_value_t = 0)]
    process_index: usize,
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
    if args.scenario.needs_redis() && embedded {
        usage!("the `get` baseline needs Redis: pass --url redis://… or set REDIS_URL");
    }
    if args.processes == 0 {
        usage!("--processes must be at least 1");
    }
    if args.messages == 0 {
        usage!("--messages must be at least 1");
    }
    if !(1..=10_000).contains(&args.batch) {
        usage!("--batch must be between 1 and 10000, got {}", args.batch);
    }
    if !(1..=10_000).contains(&args.inflight) {
        usage!(
            "--inflight must be between 1 and 10000, got {}",
            args.inflight
        );
    }
    if args.kill_every.is_some() && args.scenario != Scenario::StreamChaos {
        usage!("--kill-every is for the `stream_chaos` scenario only");
    }
    if args.kill_every == Some(0) {
        usage!("--kill-every must be at least 1 (ms)");
    }
    if args.scenario == Scenario::StreamChaos && !args.child && (embedded || args.processes < 2) {
        usage!(
            "`stream_chaos` needs Redis and --processes 2 or more: its worker processes are killed and \
             restarted while the producer (this process) publishes"
        );
    }
    let plan = fault_plan(&args)?;
    if args.scenario == Scenario::Staleness && !args.child {
        if embedded {
            usage!(
                "`staleness` needs Redis: its processes share the store and the backplane; pass --url \
                 redis://… or set REDIS_URL"
            );
        }
        if args.processes < 2 {
            usage!(
                "`staleness` needs --processes 2 or more: one writer and at least one reader process"
            );
        }
    }
    if args.processes > 1 {
        if args.scenario == Scenario::StaleServe {
            usage!(
                "`stale_serve` runs in one process: its counts by lookup and stale-serve latencies are not \
                 merged across --processes"
            );
        }
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
        if args.scenario.splits_keys() && u64::try_from(args.processes)? > args.keys {
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
        process: args.process_index,
        invalidate_every: Duration::from_millis(args.invalidate_every),
        messages: args.messages,
        batch: args.batch,
        inflight: args.inflight,
        kill_every: Duration::from_millis(args.kill_every.unwrap_or(500)),
    };
    // Children would only fail on a bad class after starting: check it once, here. Only the rate-limit class
    // depends on flags; the others are constants that the unit tests check.
    if let Err(e) = scenarios::policy("kwbench", &work) {
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
    let report = runtime.block_on(measure(&url, &app, work, args.processes, embedded, plan))?;
    report::print(&report, args.json)
}

/// `--kill-backplane-every`, `--pause-every` and `--pause-for`, checked: only for `staleness`, periods above
/// 0, and a pause shorter than its period.
fn fault_plan(args: &BenchArgs) -> anyhow::Result<Plan> {
    let plan = Plan {
        kill_every: args.kill_backplane_every.map(Duration::from_millis),
        pause_every: args.pause_every.map(Duration::from_millis),
        pause_for: Duration::from_millis(args.pause_for),
    };
    if (plan.kill_every.is_some() || plan.pause_every.is_some())
        && args.scenario != Scenario::Staleness
    {
        usage!("--kill-backplane-every and --pause-every are for the `staleness` scenario only");
    }
    if args.kill_backplane_every == Some(0) {
        usage!("--kill-backplane-every must be at least 1 (ms)");
    }
    if let Some(every) = args.pause_every {
        if args.pause_for == 0 {
            usage!("--pause-for must be at least 1 (ms)");
        }
        if every <= args.pause_for {
            usage!(
                "--pause-every {every} must be longer than --pause-for {}: the server must answer \
                 between pauses",
                args.pause_for
            );
        }
    }
    Ok(plan)
}

/// Run the scenario (in this process, or across children) between two command-count snapshots; for
/// scenarios that [audit client commands](Scenario::audits_client_commands) against Redis, then count what an
/// op sends (see [`client_commands`]).
async fn measure(
    url: &str,
    app: &str,
    work: Workload,
    processes: usize,
    embedded: bool,
    plan: Plan,
) -> anyhow::Result<Report> {
    // The client-command count runs in this process, with one process's share of the callers.
    let audit_work = work.split(processes).swap_remove(0);
    let measured: Measured;
    let mut counter;
    let before;
    let mut injected = None;
    if processes > 1 {
        counter = Counter::connect(url, embedded).await?;
        let fleet = Fleet::start(url, app, work.split(processes), work.duration).await?;
        // The children run until stopped: this process publishes meanwhile (`stream_e2e`).
        let lead = if work.scenario.runs_until_stopped() {
            Some(scenarios::prepare(url, app, work.clone()).await?)
        } else {
            None
        };
        let injector = match counter.as_ref() {
            Some(c) => Injector::start(&c.servers, plan).await?,
            None => None,
        };
        before = Counter::snapshot(counter.as_mut()).await?;
        let run = match lead {
            Some(lead) => {
                let (published, on_published) = tokio::sync::oneshot::channel();
                let chaos = (work.scenario == Scenario::StreamChaos)
                    .then_some((work.kill_every, on_published));
                fleet.go_with(lead.lead(published), chaos).await
            }
            None => fleet.go().await,
        };
        if let Some(injector) = injector {
            injected = Some(injector.finish().await?);
        }
        measured = run?;
    } else {
        // keyward connects first: its connection errors are the most helpful ones.
        let prepared = scenarios::prepare(url, app, work.clone()).await?;
        counter = Counter::connect(url, embedded).await?;
        before = Counter::snapshot(counter.as_mut()).await?;
        measured = prepared.run().await?;
    }
    scenarios::check(&work, &measured)?;
    let commands = match (counter.as_mut(), before) {
        (Some(counter), Some(before)) => Some(counter.since(&before).await?),
        _ => None,
    };
    let servers = counter.as_ref().map(|c| &c.servers);
    let client = match servers {
        Some(servers) if work.scenario.audits_client_commands() => {
            client_commands(url, app, servers, &audit_work).await?
        }
        _ => None,
    };
    let ops = measured.ops();
    let h = &measured.latencies;
    let per_second = if measured.seconds > 0.0 {
        ops as f64 / measured.seconds
    } else {
        0.0
    };
    let total = |calls: &stats::Counts| calls.values().sum::<u64>();
    Ok(Report {
        peer: "keyward",
        scenario: work.scenario.name(),
        backend: match servers {
            None => "embedded",
            Some(s) if s.is_cluster() => "redis_cluster",
            Some(_) => "redis",
        },
        concurrency: work.concurrency,
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
        fields: with_faults(
            scenarios::fields(&work, &measured, commands.as_ref().map(|c| &c.total)),
            injected,
            plan,
        ),
        redis_cmds_per_op: commands.as_ref().map(|c| per_op(total(&c.total), ops)),
        redis_client_cmds_per_op: client.as_ref().map(|c| per_op(total(&c.commands), c.ops)),
        redis_client_cmds: client.map(|c| c.commands),
        redis_primaries: servers.filter(|s| s.is_cluster()).map(Servers::count),
        redis_cmds_by_primary: commands.as_ref().and_then(|c| c.by_primary.clone()),
        redis_cmds: commands.map(|c| c.total),
    })
}

/// The report's fields with what the fault injector did, when it ran.
fn with_faults(fields: ScenarioFields, injected: Option<Injected>, plan: Plan) -> ScenarioFields {
    let Some(done) = injected else {
        return fields;
    };
    let kills = plan.kill_every.is_some();
    let pauses = plan.pause_every.is_some();
    ScenarioFields {
        backplane_kills: kills.then_some(done.kills),
        pubsub_clients_killed: kills.then_some(done.killed),
        pauses: pauses.then_some(done.pauses),
        pause_ms: pauses.then(|| u64::try_from(plan.pause_for.as_millis()).unwrap_or(u64::MAX)),
        ..fields
    }
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
/// So after the timed run, this process connects its own keyward handle (same namespace and classes; see
/// [`scenarios::counted_workload`]), and while `MONITOR` shows the server's commands, each of
/// `work.concurrency` callers makes [`CLIENT_AUDIT_OPS`] ops. Connecting and warming up happen before the
/// count starts. `MONITOR` slows the server down, which is why the timed run goes without it. `None` (with a
/// warning) when the server refuses `MONITOR` (e.g. a managed Redis).
async fn client_commands(
    url: &str,
    app: &str,
    servers: &Servers,
    work: &Workload,
) -> anyhow::Result<Option<ClientCommands>> {
    let prepared = scenarios::prepare(
        url,
        app,
        scenarios::counted_workload(work, CLIENT_AUDIT_OPS),
    )
    .await?;
    let audit = match ServerAudit::start(servers).await {
        Ok(audit) => audit,
        Err(e) => {
            eprintln!("warning: redis_client_cmds_per_op left out: {e:#}");
            return Ok(None);
        }
    };
    let measured = prepared.counted_ops(CLIENT_AUDIT_OPS).await?;
    let commands = audit.finish().await?;
    Ok(Some(ClientCommands {
        ops: measured.ops(),
        commands,
    }))
}

/// The servers' command counts, read before and after the measured phase: from the one server, or summed
/// over every primary of a Cluster (see [`servers`]).
struct Counter {
    servers: Servers,
    stats: ServerStats,
}

impl Counter {
    /// `None` for the embedded backend.
    async fn connect(url: &str, embedded: bool) -> anyhow::Result<Option<Self>> {
        if embedded {
            return Ok(None);
        }
        let servers = Servers::discover(url).await?;
        let stats = ServerStats::connect(&servers).await?;
        Ok(Some(Self { servers, stats }))
    }

    async fn snapshot(counter: Option<&mut Self>) -> anyhow::Result<Option<servers::Snapshot>> {
        match counter {
            Some(c) => Ok(Some(c.stats.snapshot().await?)),
            None => Ok(None),
        }
    }

    /// The commands run since `before`.
    async fn since(&mut self, before: &servers::Snapshot) -> anyhow::Result<servers::Commands> {
        let after = self.stats.snapshot().await?;
        Ok(servers::delta(&self.servers, before, &after))
    }
}
