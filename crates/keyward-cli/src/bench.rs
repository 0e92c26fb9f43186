//! `keyward bench <scenario>`: the arguments, one run (in-process or across `--processes`), and its report.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
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

--hit-keys K spreads `hit` and `get` over K warm keys (worker w reads key w mod K). With K = C no two workers
share a key, so keyward's in-process coalescing of concurrent reads of one key plays no part.

Every run uses a fresh namespace (env `bench`, app `kwbench<random>`) and ~1 KiB JSON values.
--processes P (all scenarios; Redis only) runs P child processes sharing that namespace and key, each with
C/P callers (the remainder goes to the first; for miss the keys are split the same way), starts them
together once all are connected, and merges their latency histograms.

Output fields: peer, scenario, backend, concurrency, processes, ops, seconds, ops_per_s, p50_us, p99_us,
max_us, loader_calls, and against Redis redis_cmds_per_op and redis_cmds: the server's INFO commandstats
calls (including commands run inside Lua scripts, excluding INFO) during the measured phase, per operation
and per command.

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
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Hit => "hit",
            Scenario::Miss => "miss",
            Scenario::Stampede => "stampede",
            Scenario::Get => "get",
        }
    }

    fn default_concurrency(self) -> usize {
        match self {
            Scenario::Hit | Scenario::Miss | Scenario::Get => 64,
            Scenario::Stampede => 1000,
        }
    }
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
    /// Concurrent callers in total. [default: 64 for hit and miss, 1000 for stampede]
    #[arg(long, short = 'c', value_name = "C")]
    concurrency: Option<usize>,
    /// How long `hit` runs, in seconds (fractions allowed).
    #[arg(long, short = 'd', value_name = "SECONDS", default_value_t = 10.0)]
    duration: f64,
    /// OS processes to spread the callers over (Redis only).
    #[arg(long, short = 'p', value_name = "P", default_value_t = 1)]
    processes: usize,
    /// How many cold keys `miss` loads.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    keys: u64,
    /// How many warm keys `hit` and `get` spread their workers over.
    #[arg(long, value_name = "K", default_value_t = 1)]
    hit_keys: u64,
    /// How long the `stampede` loader takes, in milliseconds.
    #[arg(long, value_name = "M", default_value_t = 50)]
    loader_ms: u64,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cmds_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cmds: Option<BTreeMap<String, u64>>,
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
        if args.scenario == Scenario::Miss && u64::try_from(args.processes)? > args.keys {
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
    };
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

/// Run the scenario (in this process, or across children) between two command-count snapshots.
async fn measure(
    url: &str,
    app: &str,
    work: Workload,
    processes: usize,
    embedded: bool,
) -> anyhow::Result<Report> {
    let scenario = work.scenario;
    let concurrency = work.concurrency;
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
    let ops = measured.latencies.len();
    let h = &measured.latencies;
    let per_second = if measured.seconds > 0.0 {
        ops as f64 / measured.seconds
    } else {
        0.0
    };
    let redis_cmds_per_op = commands.as_ref().map(|c| {
        let total: u64 = c.values().sum();
        if ops == 0 {
            0.0
        } else {
            round(total as f64 / ops as f64, 3)
        }
    });
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
        redis_cmds_per_op,
        redis_cmds: commands,
    })
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
    if let Some(per_op) = r.redis_cmds_per_op {
        rows.push(("redis_cmds_per_op", format!("{per_op:.3}")));
    }
    if let Some(cmds) = &r.redis_cmds {
        let mut by_count: Vec<_> = cmds.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let listed = by_count
            .iter()
            .map(|(name, calls)| format!("{name}={calls}"))
            .collect::<Vec<_>>()
            .join(" ");
        rows.push((
            "redis_cmds",
            if listed.is_empty() {
                "none".to_owned()
            } else {
                listed
            },
        ));
    }
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
            redis_cmds_per_op: Some(1.0),
            redis_cmds: Some(BTreeMap::from([("evalsha".to_owned(), 10)])),
        };
        let t = table(&report);
        assert!(t.contains("redis_cmds_per_op  1.000\n"), "{t}");
        assert!(t.contains("peer               keyward\n"), "{t}");
        assert!(t.contains("redis_cmds         evalsha=10\n"), "{t}");
    }
}
