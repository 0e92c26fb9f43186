//! The audit's report: one JSON document (`--json`, field names documented in `docs/cli.md` and stable) or a
//! readable table, built from the walk's [`Tally`] and the post-walk checks.
//!
//! The one decision: **`violations.total` counts findings, not keys** (one finding per class, pattern,
//! stream, group or setting), and it alone decides the exit status: 0 when it is 0, 3 otherwise.

use std::io::Write;

use keyward::policy::Policy;
use serde::Serialize;

use super::checks::{ServerInfo, ServerSetting, StreamFindings};
use super::tally::{Counts, Finding, KeyAnd, Tally};

/// The whole report.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The format's version: 1.
    pub(crate) keyward_audit: u32,
    pub(crate) namespace: Namespace,
    /// `false` when the audit stopped early (a signal, `--limit-keys`, an error): then `resume_token` is set
    /// (unless the checkpoint could not be saved) and the post-walk checks did not run or did not finish.
    pub(crate) complete: bool,
    pub(crate) resume_token: Option<String>,
    pub(crate) servers: Vec<ServerInfo>,
    pub(crate) scan: ScanStats,
    pub(crate) total: Counts,
    pub(crate) classes: Vec<ClassReport>,
    pub(crate) internal: Counts,
    pub(crate) violations: Violations,
}

#[derive(Debug, Serialize)]
pub(crate) struct Namespace {
    pub(crate) env: String,
    pub(crate) app: String,
}

/// How the walk went.
#[derive(Debug, Serialize)]
pub(crate) struct ScanStats {
    pub(crate) keys_scanned: u64,
    pub(crate) commands: u64,
    pub(crate) seconds: f64,
    /// How many times the pace was halved because the server slowed down.
    pub(crate) backoffs: u64,
    pub(crate) max_ops_per_sec: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ClassReport {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) current_version: u32,
    #[serde(flatten)]
    pub(crate) counts: Counts,
    pub(crate) versions: Vec<VersionReport>,
    pub(crate) biggest: Vec<KeyBytes>,
}

#[derive(Debug, Serialize)]
pub(crate) struct VersionReport {
    pub(crate) version: u32,
    #[serde(flatten)]
    pub(crate) counts: Counts,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct KeyBytes {
    pub(crate) key: String,
    pub(crate) bytes: u64,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct KeyTtl {
    pub(crate) key: String,
    pub(crate) ttl_ms: u64,
}

/// Keys without a TTL, per class (`class`) or per pattern outside every class (`pattern`), or keyward's
/// internal keys (`class` = `_kw`).
#[derive(Debug, Serialize)]
pub(crate) struct NoTtl {
    pub(crate) class: Option<String>,
    pub(crate) pattern: Option<String>,
    pub(crate) keys: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TtlTooLong {
    pub(crate) class: String,
    pub(crate) max_ttl_ms: u64,
    pub(crate) keys: u64,
    pub(crate) examples: Vec<KeyTtl>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outside {
    pub(crate) pattern: String,
    /// Inside the policy's namespace (`{env}:{app}:…`) but not a key keyward writes.
    pub(crate) in_namespace: bool,
    pub(crate) keys: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct OldVersion {
    pub(crate) class: String,
    pub(crate) version: u32,
    pub(crate) current_version: u32,
    pub(crate) keys: u64,
    /// What a purge of this version would free (`MEMORY USAGE`, summed).
    pub(crate) reclaimable_bytes: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct OverMaxValue {
    pub(crate) class: String,
    pub(crate) limit_bytes: u64,
    pub(crate) keys: u64,
    pub(crate) examples: Vec<KeyBytes>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Violations {
    pub(crate) total: u64,
    pub(crate) no_ttl: Vec<NoTtl>,
    pub(crate) ttl_too_long: Vec<TtlTooLong>,
    pub(crate) outside_classes: Vec<Outside>,
    pub(crate) old_versions: Vec<OldVersion>,
    pub(crate) over_max_value: Vec<OverMaxValue>,
    pub(crate) streams_without_retention: Vec<super::checks::StreamNoRetention>,
    pub(crate) streams_over_retention: Vec<super::checks::StreamOverRetention>,
    pub(crate) stuck_groups: Vec<super::checks::StuckGroup>,
    pub(crate) dead_letters: Vec<super::checks::DeadLetters>,
    pub(crate) server_settings: Vec<ServerSetting>,
}

fn examples(f: &Finding) -> Vec<String> {
    f.examples.iter().map(|e| e.key.clone()).collect()
}

fn key_bytes(list: &[KeyAnd]) -> Vec<KeyBytes> {
    list.iter()
        .map(|k| KeyBytes {
            key: k.key.clone(),
            bytes: k.value,
        })
        .collect()
}

/// The limit `over_max_value` compares with, per class kind.
fn size_limit(class: &keyward::policy::Class) -> u64 {
    if let Some(c) = class.as_cache() {
        c.max_value_bytes_value() as u64
    } else if let Some(c) = class.as_session() {
        c.max_data_bytes_value() as u64
    } else if let Some(c) = class.as_idempotency() {
        c.max_response_bytes_value() as u64
    } else {
        0
    }
}

/// Assembles the report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    policy: &Policy,
    tally: &Tally,
    servers: Vec<ServerInfo>,
    scan: ScanStats,
    streams: StreamFindings,
    settings: Vec<ServerSetting>,
    complete: bool,
    resume_token: Option<String>,
) -> Report {
    let mut v = Violations {
        total: 0,
        no_ttl: Vec::new(),
        ttl_too_long: Vec::new(),
        outside_classes: Vec::new(),
        old_versions: Vec::new(),
        over_max_value: Vec::new(),
        streams_without_retention: streams.without_retention,
        streams_over_retention: streams.over_retention,
        stuck_groups: streams.stuck_groups,
        dead_letters: streams.dead_letters,
        server_settings: settings,
    };
    let mut classes = Vec::new();
    for class in policy.classes() {
        let Some(t) = tally.classes.get(class.name()) else {
            continue;
        };
        let current = class.kind().version();
        if t.no_ttl.keys > 0 {
            v.no_ttl.push(NoTtl {
                class: Some(class.name().to_owned()),
                pattern: None,
                keys: t.no_ttl.keys,
                memory_bytes: t.no_ttl.memory_bytes,
                examples: examples(&t.no_ttl),
            });
        }
        if t.ttl_too_long.keys > 0 {
            v.ttl_too_long.push(TtlTooLong {
                class: class.name().to_owned(),
                max_ttl_ms: t.ttl_bound_ms,
                keys: t.ttl_too_long.keys,
                examples: t
                    .ttl_too_long
                    .examples
                    .iter()
                    .map(|e| KeyTtl {
                        key: e.key.clone(),
                        ttl_ms: e.value,
                    })
                    .collect(),
            });
        }
        if t.over_max_value.keys > 0 {
            v.over_max_value.push(OverMaxValue {
                class: class.name().to_owned(),
                limit_bytes: size_limit(class),
                keys: t.over_max_value.keys,
                examples: key_bytes(&t.over_max_value.examples),
            });
        }
        for (version, counts) in &t.versions {
            if *version < current {
                v.old_versions.push(OldVersion {
                    class: class.name().to_owned(),
                    version: *version,
                    current_version: current,
                    keys: counts.keys,
                    reclaimable_bytes: counts.memory_bytes,
                });
            }
        }
        classes.push(ClassReport {
            name: class.name().to_owned(),
            kind: class.kind().name().to_owned(),
            current_version: current,
            counts: t.counts.clone(),
            versions: t
                .versions
                .iter()
                .map(|(version, counts)| VersionReport {
                    version: *version,
                    counts: counts.clone(),
                })
                .collect(),
            biggest: key_bytes(&t.biggest),
        });
    }
    if tally.internal_no_ttl.keys > 0 {
        v.no_ttl.push(NoTtl {
            class: Some("_kw".to_owned()),
            pattern: None,
            keys: tally.internal_no_ttl.keys,
            memory_bytes: tally.internal_no_ttl.memory_bytes,
            examples: examples(&tally.internal_no_ttl),
        });
    }
    for (pattern, f) in &tally.outside_no_ttl {
        v.no_ttl.push(NoTtl {
            class: None,
            pattern: Some(pattern.clone()),
            keys: f.keys,
            memory_bytes: f.memory_bytes,
            examples: examples(f),
        });
    }
    for (pattern, (inside, f)) in &tally.outside {
        v.outside_classes.push(Outside {
            pattern: pattern.clone(),
            in_namespace: *inside,
            keys: f.keys,
            memory_bytes: f.memory_bytes,
            examples: examples(f),
        });
    }
    v.total = [
        v.no_ttl.len(),
        v.ttl_too_long.len(),
        v.outside_classes.len(),
        v.old_versions.len(),
        v.over_max_value.len(),
        v.streams_without_retention.len(),
        v.streams_over_retention.len(),
        v.stuck_groups.len(),
        v.dead_letters.len(),
        v.server_settings.len(),
    ]
    .iter()
    .sum::<usize>() as u64;
    Report {
        keyward_audit: 1,
        namespace: Namespace {
            env: policy.env().to_owned(),
            app: policy.app().to_owned(),
        },
        complete,
        resume_token,
        servers,
        scan,
        total: tally.total.clone(),
        classes,
        internal: tally.internal.clone(),
        violations: v,
    }
}

/// Bytes as `12.3 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ttl_line(c: &Counts) -> String {
    let t = &c.ttl;
    format!(
        "none {} | ≤1m {} | ≤1h {} | ≤1d {} | ≤7d {} | >7d {}",
        t.none, t.under_1m, t.under_1h, t.under_1d, t.under_7d, t.over_7d
    )
}

/// The readable form.
pub(crate) fn write_table(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "keyward audit — namespace {}:{}{}",
        r.namespace.env,
        r.namespace.app,
        if r.complete {
            ""
        } else {
            " — INCOMPLETE (stopped before the end: the counts below are partial)"
        }
    )?;
    if let Some(token) = &r.resume_token {
        writeln!(
            out,
            "resume by running the same command with: --resume {token}"
        )?;
    }
    for s in &r.servers {
        let name = if s.server.is_empty() {
            "server"
        } else {
            &s.server
        };
        writeln!(
            out,
            "{name}: {}, maxmemory-policy {}, persistence {}",
            count(s.keys, "key"),
            s.maxmemory_policy,
            s.persistence
        )?;
    }
    writeln!(
        out,
        "scanned {} with {} in {:.1}s ({})",
        count(r.scan.keys_scanned, "key"),
        count(r.scan.commands, "command"),
        r.scan.seconds,
        count(r.scan.backoffs, "backoff")
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<24} {:<12} {:<7} {:>10} {:>11}  TTL",
        "CLASS", "KIND", "VER", "COUNT", "MEMORY"
    )?;
    // One row per class and version present, each labelled with its keys' version (an old one `old`, one
    // newer than the policy's `new`): a class's counts mix versions, so its row alone would misname them.
    for c in &r.classes {
        for v in &c.versions {
            let mark = match v.version.cmp(&c.current_version) {
                std::cmp::Ordering::Less => " old",
                std::cmp::Ordering::Equal => "",
                std::cmp::Ordering::Greater => " new",
            };
            writeln!(
                out,
                "{:<24} {:<12} {:<7} {:>10} {:>11}  {}",
                c.name,
                c.kind,
                format!("v{}{mark}", v.version),
                v.counts.keys,
                bytes(v.counts.memory_bytes),
                ttl_line(&v.counts)
            )?;
        }
    }
    if r.internal.keys > 0 {
        writeln!(
            out,
            "{:<24} {:<12} {:<7} {:>10} {:>11}  {}",
            "(keyward internal)",
            "",
            "",
            r.internal.keys,
            bytes(r.internal.memory_bytes),
            ttl_line(&r.internal)
        )?;
    }
    let outside: u64 = r.violations.outside_classes.iter().map(|o| o.keys).sum();
    let outside_mem: u64 = r
        .violations
        .outside_classes
        .iter()
        .map(|o| o.memory_bytes)
        .sum();
    if outside > 0 {
        writeln!(
            out,
            "{:<24} {:<12} {:<7} {:>10} {:>11}",
            "(outside any class)",
            "",
            "",
            outside,
            bytes(outside_mem)
        )?;
    }
    writeln!(
        out,
        "{:<24} {:<12} {:<7} {:>10} {:>11}  {}",
        "TOTAL",
        "",
        "",
        r.total.keys,
        bytes(r.total.memory_bytes),
        ttl_line(&r.total)
    )?;
    for c in &r.classes {
        if c.biggest.is_empty() {
            continue;
        }
        let list: Vec<String> = c
            .biggest
            .iter()
            .map(|k| format!("{} ({})", k.key, bytes(k.bytes)))
            .collect();
        writeln!(out, "biggest in {}: {}", c.name, list.join(", "))?;
    }
    writeln!(out)?;
    let v = &r.violations;
    if v.total == 0 {
        writeln!(out, "no violations")?;
        return Ok(());
    }
    writeln!(out, "VIOLATIONS: {}", v.total)?;
    for n in &v.no_ttl {
        let group = n
            .class
            .as_deref()
            .map(|c| format!("class {c}"))
            .or_else(|| n.pattern.as_deref().map(|p| format!("pattern {p}")))
            .unwrap_or_default();
        writeln!(
            out,
            "  no TTL: {group}: {}, {} (e.g. {})",
            count(n.keys, "key"),
            bytes(n.memory_bytes),
            n.examples.join(", ")
        )?;
    }
    for t in &v.ttl_too_long {
        let ex: Vec<String> = t
            .examples
            .iter()
            .map(|e| format!("{} ({})", e.key, ttl(e.ttl_ms)))
            .collect();
        writeln!(
            out,
            "  TTL too long: class {}: {} over its bound ({}; e.g. {})",
            t.class,
            count(t.keys, "key"),
            ttl(t.max_ttl_ms),
            ex.join(", ")
        )?;
    }
    for o in &v.outside_classes {
        writeln!(
            out,
            "  outside any class{}: {}: {}, {} (e.g. {})",
            if o.in_namespace {
                " (in the namespace)"
            } else {
                ""
            },
            o.pattern,
            count(o.keys, "key"),
            bytes(o.memory_bytes),
            o.examples.join(", ")
        )?;
    }
    for o in &v.old_versions {
        writeln!(
            out,
            "  old version: class {} v{} (current v{}): {}, {} reclaimable",
            o.class,
            o.version,
            o.current_version,
            count(o.keys, "key"),
            bytes(o.reclaimable_bytes)
        )?;
    }
    for o in &v.over_max_value {
        let ex: Vec<String> = o
            .examples
            .iter()
            .map(|e| format!("{} ({})", e.key, bytes(e.bytes)))
            .collect();
        writeln!(
            out,
            "  value over max: class {} (limit {}): {} (e.g. {})",
            o.class,
            bytes(o.limit_bytes),
            count(o.keys, "key"),
            ex.join(", ")
        )?;
    }
    for s in &v.streams_without_retention {
        writeln!(
            out,
            "  stream without retention: {} ({})",
            s.key,
            entries(s.length)
        )?;
    }
    for s in &v.streams_over_retention {
        writeln!(
            out,
            "  stream over retention: {} (class {}): {} (maxlen {}), oldest {} (max_age {})",
            s.key,
            s.class,
            entries(s.length),
            s.maxlen
                .map_or_else(|| "none".to_owned(), |m| m.to_string()),
            s.oldest_age_ms.map_or_else(|| "unknown".to_owned(), ttl),
            s.max_age_ms.map_or_else(|| "none".to_owned(), ttl)
        )?;
    }
    for g in &v.stuck_groups {
        writeln!(
            out,
            "  stuck group: {} group {}: {}{} of {} pending idle over {}",
            g.stream,
            g.group,
            g.pending_idle,
            if g.pending_idle >= 100 { "+" } else { "" },
            entries(g.pending_total),
            ttl(g.claim_idle_ms)
        )?;
    }
    for d in &v.dead_letters {
        writeln!(
            out,
            "  dead letters: {} (class {}): {}",
            d.key,
            d.class,
            entries(d.length)
        )?;
    }
    for s in &v.server_settings {
        let name = if s.server.is_empty() {
            "server"
        } else {
            &s.server
        };
        writeln!(
            out,
            "  server setting: {name}: {} = {}: {}",
            s.setting, s.value, s.problem
        )?;
    }
    Ok(())
}

fn count(n: u64, noun: &str) -> String {
    crate::words::count(n, noun)
}

fn entries(n: u64) -> String {
    crate::words::count_of(n, "entry", "entries")
}

fn ttl(ms: u64) -> String {
    crate::words::duration_ms(ms)
}
