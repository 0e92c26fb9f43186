//! `keyward streams [STREAM…]`: the state of the policy's stream classes — length against retention, each
//! consumer group's consumers, lag, pending entries and oldest pending age, and the dead letters.
//!
//! The one decision: **the same read-only reads as the audit's stream checks** (`crate::stream_info`), so
//! the two commands can never disagree about a group being stuck: a group is stuck when an entry has been
//! pending longer than the class's `claim_idle`, counted as the audit counts it (one `XPENDING … IDLE` page).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use keyward::key::KeySpace;
use keyward::policy::Policy;
use serde_json::{Value, json};

use crate::audit::checks::PENDING_PAGE;
use crate::audit::display_key;
use crate::error::{UsageError, usage};
use crate::inspect::{connect_holding, runtime};
use crate::redis_url::UrlArg;
use crate::stream_info;

/// Arguments of `keyward streams`.
#[derive(Debug, Args)]
pub(crate) struct StreamsArgs {
    /// Stream classes to show (default: every stream class of the policy).
    streams: Vec<String>,
    /// The policy file (TOML) that declares the stream classes.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    url: UrlArg,
    /// Print one JSON document (field names in docs/cli.md) instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `keyward streams`.
///
/// # Errors
/// A [`UsageError`] for a bad policy or a name that is not a stream class; otherwise when Redis cannot be
/// reached or refuses a read.
pub(crate) fn run(args: StreamsArgs) -> anyhow::Result<ExitCode> {
    let policy = crate::policy_cmd::load(&args.policy)?;
    let names: Vec<String> = if args.streams.is_empty() {
        policy
            .classes()
            .filter(|c| c.as_stream().is_some())
            .map(|c| c.name().to_owned())
            .collect()
    } else {
        for name in &args.streams {
            match policy.class(name).map(|c| c.kind().name()) {
                None => usage!("{}: no class `{name}` in the policy", args.policy.display()),
                Some("stream") => {}
                Some(other) => usage!("class `{name}` is a {other} class, not a stream"),
            }
        }
        args.streams.clone()
    };
    if names.is_empty() && !args.json {
        // Without this the command printed nothing at all, which reads like a failure or an empty server.
        println!(
            "{}: the policy declares no stream class; nothing to show",
            args.policy.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let url = args.url.resolve();
    let streams = runtime()?.block_on(async {
        let mut out = Vec::with_capacity(names.len());
        for name in &names {
            out.push(describe(&policy, name, &url).await?);
        }
        anyhow::Ok(out)
    })?;
    let doc = json!({ "streams": streams });
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)
    } else {
        write!(out, "{}", table(&streams))
    }
    .and_then(|()| out.flush())
    .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

async fn describe(policy: &Policy, name: &str, url: &str) -> anyhow::Result<Value> {
    let settings = policy
        .class(name)
        .and_then(|c| c.as_stream())
        .ok_or_else(|| UsageError(format!("class `{name}` is not a stream")))?;
    let key = KeySpace::new(policy, name)
        .ok_or_else(|| UsageError(format!("no class `{name}`")))?
        .key(name)?;
    let dead_key = format!("{key}:dead");
    let (mut conn, server) = connect_holding(url, key.as_bytes()).await?;
    let length: u64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .with_context(|| format!("XLEN {key}"))?;
    let dead: u64 = redis::cmd("XLEN")
        .arg(&dead_key)
        .query_async(&mut conn)
        .await
        .with_context(|| format!("XLEN {dead_key}"))?;
    let retention = settings.retention_value();
    let oldest_age_ms = stream_info::oldest_age_ms(&mut conn, key.as_bytes()).await?;
    let max_age_ms = retention
        .max_age_value()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // As the audit judges it: approximate trimming may keep one radix-tree node (100 entries) or a minute
    // beyond the bound.
    let over_retention = retention.maxlen_value().is_some_and(|m| length > m + 100)
        || matches!((max_age_ms, oldest_age_ms), (Some(max), Some(age)) if age > max.saturating_add(60_000));
    let claim_idle_ms = u64::try_from(settings.claim_idle_value().as_millis()).unwrap_or(u64::MAX);
    let exists: u64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await?;
    let mut groups = Vec::new();
    if exists == 1 {
        for g in stream_info::groups(&mut conn, key.as_bytes()).await? {
            let consumers = stream_info::consumers(&mut conn, key.as_bytes(), &g.name).await?;
            let (oldest, stuck) = if g.pending > 0 {
                (
                    stream_info::oldest_pending(&mut conn, key.as_bytes(), &g.name).await?,
                    stream_info::pending_idle(
                        &mut conn,
                        key.as_bytes(),
                        &g.name,
                        claim_idle_ms,
                        PENDING_PAGE,
                    )
                    .await?,
                )
            } else {
                (None, 0)
            };
            groups.push(json!({
                "name": display_key(&g.name),
                "consumers": consumers.iter().map(|c| json!({
                    "name": display_key(&c.name),
                    "pending": c.pending,
                    "idle_ms": c.idle_ms,
                })).collect::<Vec<_>>(),
                "lag": g.lag,
                "pending": g.pending,
                "oldest_pending_age_ms": oldest.map(|(age, _)| age),
                "oldest_pending_idle_ms": oldest.map(|(_, idle)| idle),
                "pending_idle_over_claim_idle": stuck,
                "stuck": stuck > 0,
                "last_delivered_id": g.last_delivered_id,
            }));
        }
    }
    Ok(json!({
        "stream": name,
        "key": key,
        "server": (!server.is_empty()).then_some(server),
        "exists": exists == 1,
        "length": length,
        "retention": { "maxlen": retention.maxlen_value(), "max_age_ms": max_age_ms },
        "oldest_entry_age_ms": oldest_age_ms,
        "over_retention": over_retention,
        "claim_idle_ms": claim_idle_ms,
        "groups": groups,
        "dead_letters": dead,
    }))
}

fn table(streams: &[Value]) -> String {
    let mut out = String::new();
    let ms = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "-".to_owned(), crate::words::duration_ms)
    };
    for s in streams {
        let r = &s["retention"];
        let bound = [
            r["maxlen"].as_u64().map(|m| format!("maxlen {m}")),
            r["max_age_ms"]
                .as_u64()
                .map(|a| format!("max_age {}", span(a))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        let bound = if bound.is_empty() {
            "none".to_owned()
        } else {
            bound
        };
        out.push_str(&format!(
            "{}  ({})\n",
            s["stream"].as_str().unwrap_or_default(),
            s["key"].as_str().unwrap_or_default(),
        ));
        if s["exists"] == false {
            out.push_str(&format!(
                "  does not exist (no entries were ever published, or it expired)\n  retention {bound}  dead letters {}\n",
                s["dead_letters"],
            ));
            continue;
        }
        out.push_str(&format!(
            "  length {}  retention {}{}  oldest entry {}  dead letters {}\n",
            s["length"],
            bound,
            if s["over_retention"] == true {
                "  OVER RETENTION"
            } else {
                ""
            },
            ms(&s["oldest_entry_age_ms"]),
            s["dead_letters"],
        ));
        let groups = s["groups"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if groups.is_empty() {
            out.push_str("  no consumer groups\n");
        }
        for g in groups {
            out.push_str(&format!(
                "  group {}  lag {}  pending {}  oldest pending {} (idle {}){}\n",
                g["name"].as_str().unwrap_or_default(),
                g["lag"]
                    .as_u64()
                    .map_or_else(|| "-".to_owned(), |l| l.to_string()),
                g["pending"],
                ms(&g["oldest_pending_age_ms"]),
                ms(&g["oldest_pending_idle_ms"]),
                if g["stuck"] == true {
                    format!(
                        "  STUCK: {} idle over claim_idle",
                        g["pending_idle_over_claim_idle"]
                    )
                } else {
                    String::new()
                },
            ));
            for c in g["consumers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                out.push_str(&format!(
                    "    consumer {}  pending {}  idle {}\n",
                    c["name"].as_str().unwrap_or_default(),
                    c["pending"],
                    ms(&c["idle_ms"]),
                ));
            }
        }
    }
    out
}

/// A policy duration as the policy writes it: `7d`, `1h`, `90s`, or `1500ms` when not whole seconds.
fn span(ms: u64) -> String {
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_the_policy_writes_them() {
        assert_eq!(span(7 * 86_400_000), "7d");
        assert_eq!(span(3_600_000), "1h");
        assert_eq!(span(90_000), "90s");
        assert_eq!(span(120_000), "2m");
        assert_eq!(span(1500), "1500ms");
    }
}
