//! One run's report: the JSON line of the benchmark output contract (`BENCHMARKS.md`, `DESIGN.md`) or the
//! same fields as an aligned table.
//!
//! The one decision: the field names and their order are a contract (other peers' results are compared
//! against them), so the common fields live here and each scenario family fills only its own
//! [`ScenarioFields`], which are flattened into the line at a fixed place; a field a scenario does not set is
//! left out, never printed as `null`.

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::Context as _;
use serde::Serialize;

/// One line of output.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) peer: &'static str,
    pub(crate) scenario: &'static str,
    pub(crate) backend: &'static str,
    pub(crate) concurrency: usize,
    pub(crate) processes: usize,
    pub(crate) ops: u64,
    pub(crate) seconds: f64,
    pub(crate) ops_per_s: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
    pub(crate) loader_calls: u64,
    /// What the scenario's family adds (rate limits, locks, sessions).
    #[serde(flatten)]
    pub(crate) fields: ScenarioFields,
    /// Against Redis: the server's `INFO commandstats` calls during the measured phase, per op and per command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_cmds_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_cmds: Option<BTreeMap<String, u64>>,
    /// `ratelimit_throughput`, `lock` and `session` against Redis: the top-level commands clients sent, per op
    /// and per command (from `MONITOR`, outside the timed phase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_client_cmds_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_client_cmds: Option<BTreeMap<String, u64>>,
    /// Against a Cluster only: how many primaries the `redis_cmds` (and `redis_client_cmds`) are summed
    /// over, and each primary's share of `redis_cmds` (all commands, by `host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_primaries: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_cmds_by_primary: Option<BTreeMap<String, u64>>,
}

/// The fields only some scenarios report, in their output order. Each family sets its own and leaves the
/// others `None`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ScenarioFields {
    /// Rate-limit scenarios only (with `limited` and `allowed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) algorithm: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) window_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allowed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limited: Option<u64>,
    /// `ratelimit_exact` only: `allowed == min(limit, concurrency)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exact: Option<bool>,
    /// `lock` only: `distinct` or `one`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) names: Option<&'static str>,
    /// `lock --names one`: acquisitions that found another worker of their process inside the critical
    /// section, or a fence not above the last one their process saw. `staleness`: reads that started more
    /// than `l1_max_stale` after an invalidation of their value returned. Must be 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) violations: Option<u64>,
    /// `lock --names one` only: `lock` calls that gave up at the class's wait (not counted as ops).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) timeouts: Option<u64>,
    /// `lock --names one` only: acquisitions (each followed by a release) per second, = `ops_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) handoffs_per_s: Option<f64>,
    /// `lock --names one` only: acquisitions by the worker that held the lock last in its process, i.e.
    /// that took it again right after releasing it, before any worker its release woke. Exact with one
    /// process, an upper bound with several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reacquired: Option<u64>,
    /// `lock` against Redis: acquisition attempts (successful or not) during the measured phase, and per
    /// successful acquisition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) acquire_attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) attempts_per_acquire: Option<f64>,
    /// `session` only: `always` or `default`, the class's `extend_after` in ms, and the pool size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) extend: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) extend_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sessions: Option<u64>,
    /// `hit_l1` and `staleness`: the class's `l1_max_stale` in ms, reads answered by L1, and their share of
    /// all reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) l1_max_stale_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) l1_hits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) l1_hit_ratio: Option<f64>,
    /// `staleness` only: the longest a read started after an invalidation of its value had returned (µs),
    /// and how many reads did (`violations` counts those beyond `l1_max_stale`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_stale_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_reads: Option<u64>,
    /// `staleness` only: invalidations of one key and of the whole class that returned; invalidation calls
    /// that failed (and were retried); reads that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_invalidations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) group_invalidations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) invalidation_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) read_errors: Option<u64>,
    /// `staleness --kill-backplane-every`: how often `CLIENT KILL TYPE pubsub` ran (on every server) and
    /// the subscribers it disconnected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backplane_kills: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pubsub_clients_killed: Option<u64>,
    /// `staleness --pause-every`: how often `CLIENT PAUSE <pause_ms> WRITE` ran (on every server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pauses: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pause_ms: Option<u64>,
    /// `stale_serve` only: the class's `ttl`, `stale_grace` and `fail_safe_throttle` in ms, and how many keys
    /// the workers read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_grace_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fail_safe_throttle_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) keys: Option<u64>,
    /// `stale_serve` only: reads answered with a stale value (`CacheLookup::Stale`), their share of `ops`,
    /// and their latency (µs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_served: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_p99_us: Option<u64>,
    /// `stale_serve` only: reads per `CacheLookup` name (`hit`, `stale_loader_error`, `coalesced`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lookups: Option<BTreeMap<String, u64>>,
    /// `stale_serve` only: reads that returned an error (not counted as ops). Must be 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) errors: Option<u64>,
    /// The stream scenarios: events per publish call, the class's `maxlen`, events published and publish
    /// calls made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) batch: Option<u64>,
    /// `stream_e2e` and `stream_chaos`: publish calls the producer kept outstanding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inflight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) maxlen: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) published: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_calls: Option<u64>,
    /// `stream_e2e` only: events to publish (`--messages`), handler calls, handler calls beyond one per
    /// event, the workers' failed handlers and dead letters (both 0 with the no-op handler), and the
    /// producer's `group_info` calls while it waited for the group to drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) handled: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) duplicates: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dead_lettered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) drain_polls: Option<u64>,
    /// `stream_chaos` only: events published that no handler recorded and that are not dead letters (must be
    /// 0), worker processes SIGKILLed (and restarted), and how often.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kills: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kill_every_ms: Option<u64>,
}

/// `x` rounded to `decimals` decimal places.
pub(crate) fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// `numerator / ops` to 3 decimals; 0 when there were no ops.
pub(crate) fn per_op(numerator: u64, ops: u64) -> f64 {
    if ops == 0 {
        0.0
    } else {
        round(numerator as f64 / ops as f64, 3)
    }
}

/// Print the report on stdout: one JSON line, or the table.
///
/// # Errors
/// When stdout cannot be written (a closed pipe is told apart by the caller).
pub(crate) fn print(report: &Report, json: bool) -> anyhow::Result<()> {
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
    let f = &r.fields;
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
        ("algorithm", f.algorithm.map(str::to_owned)),
        ("limit", f.limit.map(|l| l.to_string())),
        ("window_s", f.window_s.map(|w| w.to_string())),
        ("allowed", f.allowed.map(|a| a.to_string())),
        ("limited", f.limited.map(|l| l.to_string())),
        ("exact", f.exact.map(|e| e.to_string())),
        ("names", f.names.map(str::to_owned)),
        ("violations", f.violations.map(|v| v.to_string())),
        ("timeouts", f.timeouts.map(|t| t.to_string())),
        (
            "handoffs_per_s",
            f.handoffs_per_s.map(|h| format!("{h:.0}")),
        ),
        (
            "acquire_attempts",
            f.acquire_attempts.map(|a| a.to_string()),
        ),
        (
            "attempts_per_acquire",
            f.attempts_per_acquire.map(|a| format!("{a:.3}")),
        ),
        ("extend", f.extend.map(str::to_owned)),
        ("extend_after_ms", f.extend_after_ms.map(|e| e.to_string())),
        ("sessions", f.sessions.map(|n| n.to_string())),
        ("l1_max_stale_ms", f.l1_max_stale_ms.map(|n| n.to_string())),
        ("l1_hits", f.l1_hits.map(|n| n.to_string())),
        ("l1_hit_ratio", f.l1_hit_ratio.map(|r| format!("{r:.4}"))),
        ("max_stale_us", f.max_stale_us.map(|n| n.to_string())),
        ("stale_reads", f.stale_reads.map(|n| n.to_string())),
        (
            "key_invalidations",
            f.key_invalidations.map(|n| n.to_string()),
        ),
        (
            "group_invalidations",
            f.group_invalidations.map(|n| n.to_string()),
        ),
        (
            "invalidation_errors",
            f.invalidation_errors.map(|n| n.to_string()),
        ),
        ("read_errors", f.read_errors.map(|n| n.to_string())),
        ("backplane_kills", f.backplane_kills.map(|n| n.to_string())),
        (
            "pubsub_clients_killed",
            f.pubsub_clients_killed.map(|n| n.to_string()),
        ),
        ("pauses", f.pauses.map(|n| n.to_string())),
        ("pause_ms", f.pause_ms.map(|n| n.to_string())),
        ("ttl_ms", f.ttl_ms.map(|n| n.to_string())),
        ("stale_grace_ms", f.stale_grace_ms.map(|n| n.to_string())),
        (
            "fail_safe_throttle_ms",
            f.fail_safe_throttle_ms.map(|n| n.to_string()),
        ),
        ("keys", f.keys.map(|n| n.to_string())),
        ("stale_served", f.stale_served.map(|n| n.to_string())),
        ("stale_ratio", f.stale_ratio.map(|r| format!("{r:.4}"))),
        ("stale_p50_us", f.stale_p50_us.map(|n| n.to_string())),
        ("stale_p99_us", f.stale_p99_us.map(|n| n.to_string())),
        ("lookups", f.lookups.as_ref().map(list_counts)),
        ("errors", f.errors.map(|n| n.to_string())),
        ("batch", f.batch.map(|n| n.to_string())),
        ("inflight", f.inflight.map(|n| n.to_string())),
        ("maxlen", f.maxlen.map(|n| n.to_string())),
        ("published", f.published.map(|n| n.to_string())),
        ("publish_calls", f.publish_calls.map(|n| n.to_string())),
        ("messages", f.messages.map(|n| n.to_string())),
        ("handled", f.handled.map(|n| n.to_string())),
        ("duplicates", f.duplicates.map(|n| n.to_string())),
        ("failed", f.failed.map(|n| n.to_string())),
        ("dead_lettered", f.dead_lettered.map(|n| n.to_string())),
        ("drain_polls", f.drain_polls.map(|n| n.to_string())),
        ("lost", f.lost.map(|n| n.to_string())),
        ("kills", f.kills.map(|n| n.to_string())),
        ("kill_every_ms", f.kill_every_ms.map(|n| n.to_string())),
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
        ("redis_primaries", r.redis_primaries.map(|n| n.to_string())),
        (
            "redis_cmds_by_primary",
            r.redis_cmds_by_primary.as_ref().map(list_counts),
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

    fn report(scenario: &'static str, fields: ScenarioFields) -> Report {
        Report {
            peer: "keyward",
            scenario,
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
            fields,
            redis_cmds_per_op: Some(1.0),
            redis_cmds: Some(BTreeMap::from([("evalsha".to_owned(), 10)])),
            redis_client_cmds_per_op: None,
            redis_client_cmds: None,
            redis_primaries: None,
            redis_cmds_by_primary: None,
        }
    }

    #[test]
    fn table_aligns_values() {
        let t = table(&report("hit", ScenarioFields::default()));
        assert!(t.contains("redis_cmds_per_op  1.000\n"), "{t}");
        assert!(t.contains("peer               keyward\n"), "{t}");
        assert!(t.contains("redis_cmds         evalsha=10\n"), "{t}");
        assert!(!t.contains("exact"), "{t}");
    }

    #[test]
    fn rate_limit_fields_are_in_the_table_and_the_json() {
        let mut r = report(
            "ratelimit_exact",
            ScenarioFields {
                algorithm: Some("gcra"),
                limit: Some(100),
                window_s: Some(8_640_000.0),
                allowed: Some(100),
                limited: Some(900),
                exact: Some(true),
                ..ScenarioFields::default()
            },
        );
        r.redis_client_cmds_per_op = Some(1.0);
        r.redis_client_cmds = Some(BTreeMap::from([("evalsha".to_owned(), 1024)]));
        let t = table(&r);
        assert!(t.contains("exact                     true\n"), "{t}");
        assert!(t.contains("redis_client_cmds_per_op  1.000\n"), "{t}");
        assert!(
            t.contains("redis_client_cmds         evalsha=1024\n"),
            "{t}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["allowed"], 100);
        assert_eq!(v["exact"], true);
        assert_eq!(v["algorithm"], "gcra");
    }

    #[test]
    fn the_json_line_keeps_the_contracts_field_order_and_leaves_unset_fields_out() {
        let r = report(
            "lock",
            ScenarioFields {
                names: Some("one"),
                violations: Some(0),
                ..ScenarioFields::default()
            },
        );
        let line = serde_json::to_string(&r).unwrap();
        let order = [
            "peer",
            "scenario",
            "backend",
            "concurrency",
            "processes",
            "ops",
            "seconds",
            "ops_per_s",
            "p50_us",
            "p99_us",
            "max_us",
            "loader_calls",
            "names",
            "violations",
            "redis_cmds_per_op",
            "redis_cmds",
        ];
        let positions: Vec<usize> = order
            .iter()
            .map(|k| {
                line.find(&format!("\"{k}\":"))
                    .unwrap_or_else(|| panic!("{k} in {line}"))
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(!line.contains("null"), "{line}");
        assert!(!line.contains("allowed"), "{line}");
    }
}
