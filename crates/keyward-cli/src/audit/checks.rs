//! The checks that run once the walk is complete: the streams it met (retention, stuck consumer groups,
//! dead letters) and each server's settings against what the policy assumes.
//!
//! The one decision: **a stream's findings come from `XINFO` and `XPENDING … IDLE`, read-only**, never from
//! reading entries (the reading is `crate::stream_info`, shared with `keyward streams`); a stream outside every stream class is reported as having no retention bound, because
//! nothing declares one for it.

use std::time::Duration;

use anyhow::Context as _;
use keyward::policy::Policy;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use super::tally::{StreamSeen, display_key};

/// How idle a pending entry of a stream outside every class may be before its group counts as stuck (the
/// default `claim_idle` of a stream class).
pub(crate) const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(60);
/// `XPENDING … IDLE` reads at most this many entries per group: a count at this value means "at least".
pub(crate) const PENDING_PAGE: usize = 100;

/// A stream with no retention bound (outside every stream class).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StreamNoRetention {
    pub(crate) key: String,
    pub(crate) length: u64,
}

/// A stream of a class that holds more than its retention allows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StreamOverRetention {
    pub(crate) key: String,
    pub(crate) class: String,
    pub(crate) length: u64,
    pub(crate) maxlen: Option<u64>,
    pub(crate) oldest_age_ms: Option<u64>,
    pub(crate) max_age_ms: Option<u64>,
}

/// A consumer group with entries pending longer than the class's `claim_idle`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StuckGroup {
    pub(crate) stream: String,
    pub(crate) group: String,
    /// Entries idle longer than `claim_idle_ms` (at most 100 are counted: 100 means "100 or more").
    pub(crate) pending_idle: u64,
    pub(crate) pending_total: u64,
    pub(crate) claim_idle_ms: u64,
}

/// A dead-letter stream that is not empty.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct DeadLetters {
    pub(crate) key: String,
    pub(crate) class: String,
    pub(crate) length: u64,
}

/// A server setting that breaks an assumption of the policy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ServerSetting {
    pub(crate) server: String,
    pub(crate) setting: String,
    pub(crate) value: String,
    pub(crate) problem: String,
}

/// What one server says about itself.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ServerInfo {
    pub(crate) server: String,
    /// `DBSIZE` before the walk.
    pub(crate) keys: u64,
    pub(crate) maxmemory_policy: String,
    pub(crate) maxmemory_bytes: u64,
    /// `off`, `rdb`, `aof` or `rdb+aof`.
    pub(crate) persistence: String,
}

/// The stream findings.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct StreamFindings {
    pub(crate) without_retention: Vec<StreamNoRetention>,
    pub(crate) over_retention: Vec<StreamOverRetention>,
    pub(crate) stuck_groups: Vec<StuckGroup>,
    pub(crate) dead_letters: Vec<DeadLetters>,
}

/// `CONFIG GET` one setting.
async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> anyhow::Result<String> {
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .with_context(|| format!("CONFIG GET {name}"))?;
    Ok(reply.get(1).cloned().unwrap_or_default())
}

/// The server's size and settings.
pub(crate) async fn server_info(
    conn: &mut MultiplexedConnection,
    server: &str,
) -> anyhow::Result<ServerInfo> {
    let keys: u64 = redis::cmd("DBSIZE")
        .query_async(conn)
        .await
        .context("DBSIZE")?;
    let maxmemory_policy = config_get(conn, "maxmemory-policy").await?;
    let maxmemory_bytes = config_get(conn, "maxmemory").await?.parse().unwrap_or(0);
    let rdb = !config_get(conn, "save").await?.trim().is_empty();
    let aof = config_get(conn, "appendonly").await? == "yes";
    let persistence = match (rdb, aof) {
        (false, false) => "off",
        (true, false) => "rdb",
        (false, true) => "aof",
        (true, true) => "rdb+aof",
    };
    Ok(ServerInfo {
        server: server.to_owned(),
        keys,
        maxmemory_policy,
        maxmemory_bytes,
        persistence: persistence.to_owned(),
    })
}

/// The settings of `info` that break the policy's assumptions.
pub(crate) fn check_settings(policy: &Policy, info: &ServerInfo) -> Vec<ServerSetting> {
    let mut out = Vec::new();
    let never_evict: Vec<&str> = policy
        .classes()
        .filter(|c| !c.kind().evictable() && c.kind().name() != "channel")
        .map(|c| c.name())
        .collect();
    if info.maxmemory_policy != "noeviction" && !never_evict.is_empty() {
        out.push(ServerSetting {
            server: info.server.clone(),
            setting: "maxmemory-policy".to_owned(),
            value: info.maxmemory_policy.clone(),
            problem: format!(
                "evicts keys under memory pressure, but classes {} must never be evicted (use noeviction, or a separate instance for caches)",
                never_evict.join(", ")
            ),
        });
    }
    let streams: Vec<&str> = policy
        .classes()
        .filter(|c| c.as_stream().is_some())
        .map(|c| c.name())
        .collect();
    if info.persistence == "off" && !streams.is_empty() {
        out.push(ServerSetting {
            server: info.server.clone(),
            setting: "save/appendonly".to_owned(),
            value: "off".to_owned(),
            problem: format!(
                "no persistence, but stream classes {} (write-behind and side effects) lose every undrained entry on a restart",
                streams.join(", ")
            ),
        });
    }
    out
}

/// Entries kept in keyward's own purge log, `{env}:{app}:_kw:purges` (`XADD … MAXLEN ~`, with a TTL).
pub(crate) const PURGE_LOG_MAXLEN: u64 = 1000;

/// Checks one stream met by the walk and adds what it finds to `out`. A stream deleted (or replaced by
/// another type) since the walk saw it — before these checks or during them — is gone: it has no findings,
/// and is not an error.
pub(crate) async fn check_stream(
    policy: &Policy,
    conn: &mut MultiplexedConnection,
    seen: &StreamSeen,
    key: &[u8],
    out: &mut StreamFindings,
) -> anyhow::Result<()> {
    let mut found = StreamFindings::default();
    match check_one_stream(policy, conn, seen, key, &mut found).await {
        Ok(true) => {
            out.without_retention.extend(found.without_retention);
            out.over_retention.extend(found.over_retention);
            out.stuck_groups.extend(found.stuck_groups);
            out.dead_letters.extend(found.dead_letters);
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) if vanished(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a stream command failed because the stream (or its group) is gone: `ERR no such key` from
/// `XINFO`, `NOGROUP` from `XPENDING`, `WRONGTYPE` when the key now holds another type.
fn vanished(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<redis::RedisError>().is_some_and(|e| {
            matches!(e.code(), Some("NOGROUP" | "WRONGTYPE"))
                || e.detail()
                    .is_some_and(|d| d.to_ascii_lowercase().contains("no such key"))
        })
    })
}

/// [`check_stream`]'s reads: `Ok(false)` when the key is no longer a stream.
async fn check_one_stream(
    policy: &Policy,
    conn: &mut MultiplexedConnection,
    seen: &StreamSeen,
    key: &[u8],
    out: &mut StreamFindings,
) -> anyhow::Result<bool> {
    let shown = display_key(key);
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .with_context(|| format!("TYPE {shown}"))?;
    if kind != "stream" {
        // Deleted, expired or replaced by another type since the walk.
        return Ok(false);
    }
    let class = seen.class.as_deref().and_then(|c| policy.class(c));
    let settings = class.and_then(|c| c.as_stream());
    let length: u64 = match redis::cmd("XLEN").arg(key).query_async(conn).await {
        Ok(n) => n,
        // Replaced by another type since the walk.
        Err(e) if e.code() == Some("WRONGTYPE") => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("XLEN {shown}")),
    };
    let role = seen.role.as_deref();
    if key == keyward::key::internal_key(policy, "purges").as_bytes() {
        // keyward's own purge log: bounded by its MAXLEN (and a TTL), not by a class of the policy.
        if length > PURGE_LOG_MAXLEN + 100 {
            out.over_retention.push(StreamOverRetention {
                key: shown,
                class: "_kw:purges".to_owned(),
                length,
                maxlen: Some(PURGE_LOG_MAXLEN),
                oldest_age_ms: None,
                max_age_ms: None,
            });
        }
        return Ok(true);
    }
    match (settings, role) {
        (Some(_), Some("dead_letters")) => {
            if length > 0 {
                out.dead_letters.push(DeadLetters {
                    key: shown.clone(),
                    class: seen.class.clone().unwrap_or_default(),
                    length,
                });
            }
        }
        (Some(s), Some("stream")) => {
            let r = s.retention_value();
            // Approximate trimming keeps up to one radix-tree node (100 entries by default) beyond the bound.
            let over_len = r.maxlen_value().is_some_and(|m| length > m + 100);
            let oldest_age_ms = crate::stream_info::oldest_age_ms(conn, key).await?;
            let over_age = match (r.max_age_value(), oldest_age_ms) {
                (Some(max), Some(age)) => u128::from(age) > max.as_millis() + 60_000,
                _ => false,
            };
            if over_len || over_age {
                out.over_retention.push(StreamOverRetention {
                    key: shown.clone(),
                    class: seen.class.clone().unwrap_or_default(),
                    length,
                    maxlen: r.maxlen_value(),
                    oldest_age_ms,
                    max_age_ms: r
                        .max_age_value()
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                });
            }
        }
        _ => out.without_retention.push(StreamNoRetention {
            key: shown.clone(),
            length,
        }),
    }
    if role == Some("dead_letters") {
        return Ok(true);
    }
    let claim_idle = settings.map_or(DEFAULT_CLAIM_IDLE, |s| s.claim_idle_value());
    let claim_idle_ms = u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX);
    for group in crate::stream_info::groups(conn, key).await? {
        if group.pending == 0 {
            continue;
        }
        let idle =
            crate::stream_info::pending_idle(conn, key, &group.name, claim_idle_ms, PENDING_PAGE)
                .await?;
        if idle > 0 {
            out.stuck_groups.push(StuckGroup {
                stream: shown.clone(),
                group: display_key(&group.name),
                pending_idle: idle,
                pending_total: group.pending,
                claim_idle_ms,
            });
        }
    }
    Ok(true)
}
