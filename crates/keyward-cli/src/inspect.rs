//! `keyward inspect KEY`: what one key is, according to the policy and to its bytes — its class, version and
//! role, its type, TTL against the class's bound, its size, and its content decoded per kind.
//!
//! The one decision: **a description, never a dump.** Every read is read-only and bounded (`GETRANGE`,
//! `HMGET` of known fields, `HSTRLEN`, `ZCARD`, `XINFO`; never `GET` of an unbounded value or `HGETALL`), and
//! nothing that grants access is printed: a session record shows its user, version and times but not its
//! data, a lock's holder token and an idempotency record's lease token are shown as "redacted", a fill
//! lease's token not at all, and the payload of a `personal` cache class is not shown. A key outside every
//! class is described by its type and size only (it may be anything, e.g. another service's session). Bytes
//! that are not the format the class stores are reported as `"format": "unknown"`, never as an error.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use keyward::inspect::{CacheEntry, StoredValue};
use keyward::key::{ClassKey, KeyClass, KeyRole, classify};
use keyward::policy::{Algorithm, Class, Policy};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};

use crate::audit::display_key;
use crate::bench::servers::Servers;
use crate::error::usage;
use crate::redis_url::UrlArg;
use crate::stream_info;

/// Arguments of `keyward inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// The key, as `keyward audit` prints it: text, with `\xNN` for a byte that is not printable UTF-8
    /// (and `\x5c` for a backslash).
    key: String,
    /// The policy file (TOML) that says which class the key belongs to.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    url: UrlArg,
    /// Print one JSON document (field names in docs/cli.md) instead of text.
    #[arg(long)]
    json: bool,
    /// Show at most this many bytes of a cache value's payload (1–65536).
    #[arg(long, default_value_t = 256)]
    max_bytes: usize,
}

/// Runs `keyward inspect`. A key that does not exist is not an error: `"exists": false`.
///
/// # Errors
/// A [`UsageError`](crate::error::UsageError) for a bad policy, key or flag; otherwise when Redis cannot be reached or refuses a read.
pub(crate) fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let policy = crate::policy_cmd::load(&args.policy)?;
    let key = parse_key(&args.key)?;
    if !(1..=65_536).contains(&args.max_bytes) {
        usage!(
            "--max-bytes must be between 1 and 65536, not {}",
            args.max_bytes
        );
    }
    let url = args.url.resolve();
    let doc = runtime()?.block_on(async {
        let (mut conn, _) = connect_holding(&url, &key).await?;
        describe(&policy, &mut conn, &key, args.max_bytes).await
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)
    } else {
        write!(out, "{}", text(&doc))
    }
    .and_then(|()| out.flush())
    .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A connection to the server that holds `key`: the server itself, or on a Cluster the primary that serves
/// the key's slot (the one that answers `EXISTS key` instead of redirecting with `MOVED`), with its label
/// (`host:port`, empty standalone).
///
/// # Errors
/// When no server can be reached, or no primary serves the key's slot (the message never holds the URL's
/// password).
pub(crate) async fn connect_holding(
    url: &str,
    key: &[u8],
) -> anyhow::Result<(MultiplexedConnection, String)> {
    let servers = Servers::discover(url).await?;
    for (addr, node_url) in servers.urls() {
        let label = if addr.is_empty() { "the server" } else { addr };
        let mut conn = crate::audit::walk::connect(node_url).await?;
        if !servers.is_cluster() {
            return Ok((conn, addr.to_owned()));
        }
        match redis::cmd("EXISTS")
            .arg(key)
            .query_async::<u64>(&mut conn)
            .await
        {
            // The primary of the key's slot answers, whether it holds the key or not.
            Ok(_) => return Ok((conn, addr.to_owned())),
            // Another primary's slot: `MOVED`, sent only after the command and the ACL passed.
            Err(e) if e.redirect_node().is_some() => {}
            Err(e) => return Err(e).with_context(|| format!("EXISTS on {label}")),
        }
    }
    anyhow::bail!("no primary of the cluster serves the key's slot (is the cluster resharding?)")
}

/// The key's bytes from its printed form: `\xNN` is one byte; anything else is itself (UTF-8).
fn parse_key(text: &str) -> anyhow::Result<Vec<u8>> {
    if text.is_empty() {
        usage!("KEY is empty");
    }
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, after)) = rest.split_first() {
        if b == b'\\' {
            let hex = after
                .get(..3)
                .filter(|h| h[0] == b'x' && h[1..].iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(&h[1..]).ok()?, 16).ok());
            match hex {
                Some(byte) => {
                    out.push(byte);
                    rest = &after[3..];
                }
                None => usage!(
                    "KEY {text:?}: a backslash starts a \\xNN byte (write \\x5c for a backslash)"
                ),
            }
        } else {
            out.push(b);
            rest = after;
        }
    }
    Ok(out)
}

/// The whole description of `key` as one JSON document.
async fn describe(
    policy: &Policy,
    conn: &mut MultiplexedConnection,
    key: &[u8],
    max_bytes: usize,
) -> anyhow::Result<Value> {
    let class = classify(policy, key);
    // The namespace the key was classified against (after KEYWARD_ENV / KEYWARD_APP): a key "outside the
    // policy's namespace" says which namespace that was.
    let namespace = format!("{}:{}", policy.env(), policy.app());
    let mut doc = json!({
        "key": display_key(key),
        "namespace": namespace,
        "class": class_json(&class),
    });
    let (kind, pttl): (String, i64) = redis::pipe()
        .cmd("TYPE")
        .arg(key)
        .cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .context("TYPE / PTTL")?;
    if kind == "none" {
        doc["exists"] = json!(false);
        return Ok(doc);
    }
    let memory: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .query_async(conn)
        .await
        .context("MEMORY USAGE")?;
    doc["exists"] = json!(true);
    doc["type"] = json!(kind);
    doc["ttl_ms"] = if pttl >= 0 { json!(pttl) } else { Value::Null };
    doc["memory_bytes"] = json!(memory);
    doc["content"] = match &class {
        KeyClass::Class(k) => {
            let bound = k.max_ttl();
            doc["max_ttl_ms"] =
                json!(bound.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX)));
            doc["ttl_ok"] = json!(match (bound, pttl) {
                (None, _) => true,
                (Some(_), p) if p < 0 => false,
                (Some(b), p) => u128::try_from(p).unwrap_or(0) <= b.as_millis(),
            });
            content(k, &kind, conn, key, max_bytes).await?
        }
        _ => {
            json!({ "format": "not_decoded", "reason": "no class of the policy owns this key: only its type and size are shown" })
        }
    };
    Ok(doc)
}

fn class_json(class: &KeyClass<'_>) -> Value {
    match class {
        KeyClass::Class(k) => json!({
            "owner": "class",
            "name": k.class().name(),
            "kind": k.class().kind().name(),
            "version": k.version(),
            "current_version": k.current_version(),
            "version_status": if k.is_current() { "current" } else if k.is_old() { "old" } else { "newer" },
            "role": k.role().name(),
            "id": k.id(),
        }),
        KeyClass::Internal => json!({ "owner": "internal" }),
        KeyClass::Foreign => json!({ "owner": "outside_namespace" }),
        _ => json!({ "owner": "unknown" }),
    }
}

/// `HMGET key u v c e` of a session record: user, version, created and last extension (Unix ms).
type SessionFields = (Option<Vec<u8>>, Option<u64>, Option<u64>, Option<u64>);

fn unknown(reason: impl Into<String>) -> Value {
    json!({ "format": "unknown", "reason": reason.into() })
}

/// The content of a key of a class, decoded as the class's kind and the key's role store it.
async fn content(
    k: &ClassKey<'_>,
    kind: &str,
    conn: &mut MultiplexedConnection,
    key: &[u8],
    max_bytes: usize,
) -> anyhow::Result<Value> {
    let class = k.class();
    let expected = match (class.kind().name(), k.role()) {
        ("cache", _)
        | ("lock", KeyRole::Entry | KeyRole::LockFence)
        | ("stream", KeyRole::StreamWake) => "string",
        ("rate_limit", _) => match class.as_rate_limit().map(|r| r.algorithm_value()) {
            Some(Algorithm::SlidingLog) => "zset",
            _ => "string",
        },
        ("session", KeyRole::SessionIndex) => "zset",
        // A session record is a hash; a tower-sessions record of the same class a string.
        ("session", _) => {
            if kind == "string" {
                "string"
            } else {
                "hash"
            }
        }
        ("lock", _) | ("idempotency", _) => "hash",
        ("stream", _) => "stream",
        (other, _) => return Ok(unknown(format!("a {other} class stores no key"))),
    };
    if kind != expected {
        return Ok(unknown(format!(
            "a {kind} where a {} class keeps a {expected}",
            class.kind().name()
        )));
    }
    Ok(match (class.kind().name(), k.role()) {
        ("cache", KeyRole::WriteVersion) => {
            let version: Option<String> = redis::cmd("GETRANGE")
                .arg(key)
                .arg(0)
                .arg(63)
                .query_async(conn)
                .await?;
            match version.as_deref().filter(|v| is_entry_id(v)) {
                Some(v) => json!({ "format": "write_version", "newest_write": v }),
                None => unknown("not a write-behind version marker (an entry id `ms-seq`)"),
            }
        }
        ("cache", _) => cache(class, conn, key, max_bytes).await?,
        ("rate_limit", _) => rate_limit(class, conn, key).await?,
        ("session", KeyRole::SessionIndex) => {
            let (count, first): (u64, Vec<(String, f64)>) = redis::pipe()
                .cmd("ZCARD")
                .arg(key)
                .cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(conn)
                .await
                .context("ZCARD / ZRANGE")?;
            json!({
                "format": "session_index",
                "sessions": count,
                "next_expiry_unix_ms": first.first().map(|(_, s)| *s as u64),
            })
        }
        ("session", _) if kind == "string" => {
            let len: u64 = redis::cmd("STRLEN").arg(key).query_async(conn).await?;
            json!({ "format": "tower_session", "record_bytes": len, "note": "contents not shown" })
        }
        ("session", _) => {
            let (fields, data): (SessionFields, u64) = redis::pipe()
                .cmd("HMGET")
                .arg(key)
                .arg(&["u", "v", "c", "e"])
                .cmd("HSTRLEN")
                .arg(key)
                .arg("d")
                .query_async(conn)
                .await
                .context("HMGET / HSTRLEN")?;
            let (user, version, created, extended) = fields;
            if version.is_none() || created.is_none() {
                return Ok(unknown("a hash without a session record's fields"));
            }
            json!({
                "format": "session",
                "user": user.map(|u| display_key(&u[..u.len().min(max_bytes)])),
                "version": version,
                "created_unix_ms": created,
                "last_extended_unix_ms": extended,
                "data_bytes": data,
                "note": "session data not shown",
            })
        }
        ("lock", KeyRole::Entry) => {
            let len: u64 = redis::cmd("STRLEN").arg(key).query_async(conn).await?;
            json!({ "format": "lock", "held": true, "holder_token": format!("redacted ({len} bytes)") })
        }
        ("lock", KeyRole::LockFence) => {
            let fence: Option<String> = redis::cmd("GETRANGE")
                .arg(key)
                .arg(0)
                .arg(31)
                .query_async(conn)
                .await?;
            match fence.as_deref().and_then(|f| f.parse::<u64>().ok()) {
                Some(f) => json!({ "format": "lock_fence", "last_fencing_token": f }),
                None => unknown("not a fencing counter"),
            }
        }
        ("lock", _) => {
            let (fence, len): (Option<String>, u64) = redis::pipe()
                .cmd("HGET")
                .arg(key)
                .arg("t")
                .cmd("HSTRLEN")
                .arg(key)
                .arg("v")
                .query_async(conn)
                .await?;
            match fence.as_deref().and_then(|f| f.parse::<u64>().ok()) {
                Some(f) => {
                    json!({ "format": "lock_value", "fencing_token": f, "value_bytes": len })
                }
                None => unknown("not a fenced value"),
            }
        }
        ("idempotency", _) => {
            let (state, lease, fingerprint, response): (Option<String>, bool, u64, u64) =
                redis::pipe()
                    .cmd("HGET")
                    .arg(key)
                    .arg("s")
                    .cmd("HEXISTS")
                    .arg(key)
                    .arg("t")
                    .cmd("HSTRLEN")
                    .arg(key)
                    .arg("f")
                    .cmd("HSTRLEN")
                    .arg(key)
                    .arg("r")
                    .query_async(conn)
                    .await?;
            let status = match state.as_deref() {
                Some("p") => "in_progress",
                Some("c") => "completed",
                _ => return Ok(unknown("a hash without an idempotency record's state")),
            };
            json!({
                "format": "idempotency",
                "status": status,
                "lease_token": lease.then_some("redacted"),
                "fingerprint_bytes": fingerprint,
                "response_bytes": response,
            })
        }
        ("stream", KeyRole::StreamWake) => json!({ "format": "stream_wake" }),
        ("stream", role) => {
            let length: u64 = redis::cmd("XLEN").arg(key).query_async(conn).await?;
            let groups = stream_info::groups(conn, key).await?;
            json!({
                "format": if role == KeyRole::DeadLetters { "dead_letters" } else { "stream" },
                "length": length,
                "oldest_entry_age_ms": stream_info::oldest_age_ms(conn, key).await?,
                "groups": groups.iter().map(|g| json!({
                    "name": display_key(&g.name),
                    "consumers": g.consumers,
                    "pending": g.pending,
                    "lag": g.lag,
                })).collect::<Vec<_>>(),
            })
        }
        (other, _) => unknown(format!("a {other} class stores no key")),
    })
}

async fn cache(
    class: &Class,
    conn: &mut MultiplexedConnection,
    key: &[u8],
    max_bytes: usize,
) -> anyhow::Result<Value> {
    let want = keyward::inspect::MAX_HEADER_BYTES + max_bytes;
    let (raw, len): (Vec<u8>, u64) = redis::pipe()
        .cmd("GETRANGE")
        .arg(key)
        .arg(0)
        .arg(want - 1)
        .cmd("STRLEN")
        .arg(key)
        .query_async(conn)
        .await
        .context("GETRANGE / STRLEN")?;
    let personal = class.as_cache().is_some_and(|c| c.is_personal());
    let value_json = |v: &StoredValue<'_>, raw: &[u8], total: u64| {
        let header = v.header_len(raw) as u64;
        let mut out = json!({
            "namespace_epoch": v.namespace_epoch,
            "class_epoch": v.class_epoch,
            "tags": v.tags.iter().map(|(t, e)| json!({"tag": display_key(t), "epoch": e})).collect::<Vec<_>>(),
            "absent": v.payload.is_none(),
        });
        if let Some(p) = v.payload {
            out["payload_bytes"] = json!(total.saturating_sub(header));
            out["payload"] = if personal {
                json!("not shown (personal class)")
            } else {
                json!(display_key(&p[..p.len().min(max_bytes)]))
            };
            out["payload_truncated"] =
                json!(p.len() > max_bytes || (p.len() as u64) < total.saturating_sub(header));
        }
        out
    };
    Ok(match keyward::inspect::cache_entry(&raw) {
        Some(CacheEntry::Value(v)) => {
            let mut out = value_json(&v, &raw, len);
            out["format"] = json!("cache_value");
            out
        }
        Some(CacheEntry::Lease { waiters, kept }) => {
            let mut out =
                json!({ "format": "cache_lease", "waiters": waiters, "lease_token": "not shown" });
            if let Some((deadline, v)) = kept {
                out["held_until_unix_ms"] = json!(deadline);
                // `header_len` counts the lease's own header too: the payload runs to the end.
                out["kept_value"] = value_json(&v, &raw, len);
            }
            out
        }
        _ => unknown("not a keyward cache value or fill lease"),
    })
}

async fn rate_limit(
    class: &Class,
    conn: &mut MultiplexedConnection,
    key: &[u8],
) -> anyhow::Result<Value> {
    let Some(algorithm) = class.as_rate_limit().map(|r| r.algorithm_value()) else {
        return Ok(unknown("not a rate-limit class"));
    };
    if algorithm == Algorithm::SlidingLog {
        let n: u64 = redis::cmd("ZCARD").arg(key).query_async(conn).await?;
        return Ok(
            json!({ "format": "rate_limit", "algorithm": algorithm.name(), "requests_in_window": n }),
        );
    }
    let raw: String = redis::cmd("GETRANGE")
        .arg(key)
        .arg(0)
        .arg(127)
        .query_async(conn)
        .await?;
    let nums: Vec<u64> = raw.split(' ').map_while(|n| n.parse().ok()).collect();
    let count = raw.split(' ').count();
    let state = match (algorithm, nums.as_slice()) {
        (_, n) if n.len() != count => None,
        (Algorithm::Gcra, [tat]) => Some(json!({ "theoretical_arrival_unix_us": tat })),
        (Algorithm::FixedWindow, [window, count]) => {
            Some(json!({ "window_index": window, "count": count }))
        }
        (Algorithm::TokenBucket, [tokens, last]) => {
            Some(json!({ "tokens": tokens, "last_refill_unix_us": last }))
        }
        (Algorithm::SlidingCounter, [window, current, previous]) => Some(
            json!({ "window_index": window, "current_count": current, "previous_count": previous }),
        ),
        _ => None,
    };
    Ok(match state {
        Some(mut s) => {
            s["format"] = json!("rate_limit");
            s["algorithm"] = json!(algorithm.name());
            s
        }
        None => unknown(format!("not {} state", algorithm.name())),
    })
}

/// The readable form of the [`describe`] document: labelled lines in a fixed order — key, class, kind,
/// version, role, id, type, TTL, size — then the content's fields, most telling first (what the entry is,
/// then its sizes, then its epochs and times). The JSON document stays the stable, complete form; every
/// field of it appears here too.
fn text(doc: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("{label:<9} {value}\n"));
    };
    line("key", plain(&doc["key"]));
    let class = &doc["class"];
    match class["owner"].as_str() {
        Some("class") => {
            line("class", plain(&class["name"]));
            line("kind", plain(&class["kind"]));
            let version = match class["version_status"].as_str() {
                Some("current") => format!("v{} (current)", class["version"]),
                Some(status) => format!(
                    "v{} ({status}: the class is at v{})",
                    class["version"], class["current_version"]
                ),
                None => format!("v{}", class["version"]),
            };
            line("version", version);
            line("role", plain(&class["role"]));
            if !class["id"].is_null() {
                line("id", plain(&class["id"]));
            }
        }
        Some("internal") => line("class", "keyward's own key (_kw)".to_owned()),
        Some("outside_namespace") => line(
            "class",
            format!(
                "outside the policy's namespace {}",
                plain(&doc["namespace"])
            ),
        ),
        _ => line(
            "class",
            "none: no class of the policy owns this key".to_owned(),
        ),
    }
    if doc["exists"] == false {
        line("exists", "no: the key is not in Redis".to_owned());
        return out;
    }
    line("type", plain(&doc["type"]));
    let ttl = match (doc["ttl_ms"].as_u64(), doc.get("max_ttl_ms")) {
        (ttl, None) => ttl.map_or_else(|| "none".to_owned(), seconds),
        (ttl, Some(Value::Null)) => format!(
            "{} (bounded by its retention, not a TTL)",
            ttl.map_or_else(|| "none".to_owned(), seconds)
        ),
        (ttl, Some(bound)) => {
            let bound = bound.as_u64().map_or_else(|| "-".to_owned(), seconds);
            let verdict = if doc["ttl_ok"] == true {
                "ok"
            } else {
                "VIOLATION"
            };
            format!(
                "{} (at most {bound} for this class: {verdict})",
                ttl.map_or_else(|| "none".to_owned(), seconds)
            )
        }
    };
    line("TTL", ttl);
    line(
        "size",
        doc["memory_bytes"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |b| format!("{b} bytes (MEMORY USAGE)")),
    );
    let content = &doc["content"];
    line("content", plain(&content["format"]));
    fields(content, 2, &mut out);
    out
}

/// The content fields a reader looks for first, in this order; any other field follows, by name.
const CONTENT_ORDER: &[&str] = &[
    "reason",
    "status",
    "algorithm",
    "held",
    "absent",
    "user",
    "version",
    "sessions",
    "length",
    "payload_bytes",
    "payload",
    "payload_truncated",
    "data_bytes",
    "record_bytes",
    "value_bytes",
    "fingerprint_bytes",
    "response_bytes",
    "holder_token",
    "lease_token",
    "waiters",
    "held_until_unix_ms",
    "namespace_epoch",
    "class_epoch",
    "tags",
    "fencing_token",
    "last_fencing_token",
    "created_unix_ms",
    "last_extended_unix_ms",
    "next_expiry_unix_ms",
    "oldest_entry_age_ms",
    "groups",
    "kept_value",
    "note",
];

/// `content`'s fields (but `format`) as labelled lines indented by `indent`, in [`CONTENT_ORDER`].
fn fields(content: &Value, indent: usize, out: &mut String) {
    let Value::Object(map) = content else {
        return;
    };
    let rank = |k: &str| {
        CONTENT_ORDER
            .iter()
            .position(|o| *o == k)
            .unwrap_or(usize::MAX)
    };
    let mut keys: Vec<&String> = map.keys().filter(|k| *k != "format").collect();
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    for k in keys {
        let (label, value) = labelled(k, &map[k]);
        match &map[k] {
            Value::Object(_) => {
                out.push_str(&format!("{:indent$}{label}:\n", ""));
                fields(&map[k], indent + 2, out);
            }
            Value::Array(items) => {
                let list: Vec<String> = items.iter().map(item).collect();
                out.push_str(&format!(
                    "{:indent$}{label:<22} {}\n",
                    "",
                    if list.is_empty() {
                        "none".to_owned()
                    } else {
                        list.join(", ")
                    }
                ));
            }
            _ => out.push_str(&format!("{:indent$}{label:<22} {value}\n", "")),
        }
    }
}

/// A field's label and value in words: `oldest_entry_age_ms: 1500` reads `oldest entry age  1.5s`,
/// `created_unix_ms: 17…` reads `created (unix ms)  17…`.
fn labelled(key: &str, value: &Value) -> (String, String) {
    let words = |k: &str| k.replace('_', " ");
    if let Some(k) = key.strip_suffix("_unix_ms") {
        (format!("{} (unix ms)", words(k)), plain(value))
    } else if let Some(k) = key.strip_suffix("_unix_us") {
        (format!("{} (unix µs)", words(k)), plain(value))
    } else if let (Some(k), Some(ms)) = (key.strip_suffix("_ms"), value.as_u64()) {
        (words(k), seconds(ms))
    } else {
        (words(key), plain(value))
    }
}

/// One element of a list: an object as its first field's value and the others in parentheses
/// (`category:7 (epoch 3)`, `billing (consumers 1, pending 0, lag 1)`).
fn item(v: &Value) -> String {
    let Value::Object(map) = v else {
        return plain(v);
    };
    let first = ["tag", "name"]
        .iter()
        .find_map(|k| map.get(*k).map(|v| (*k, v)));
    let rest: Vec<String> = map
        .iter()
        .filter(|(k, _)| first.is_none_or(|(f, _)| f != k.as_str()))
        .map(|(k, v)| format!("{} {}", k.replace('_', " "), plain(v)))
        .collect();
    match first {
        Some((_, name)) if rest.is_empty() => plain(name),
        Some((_, name)) => format!("{} ({})", plain(name), rest.join(", ")),
        None => rest.join(", "),
    }
}

/// A JSON scalar as text: strings without quotes, `null` as `-`.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A TTL or age in readable units (`1 h 5 m`, `90 d`, `3.2 y`); JSON keeps milliseconds.
fn seconds(ms: u64) -> String {
    crate::words::duration_ms(ms)
}

/// Whether `v` is a stream entry id, `ms-seq` (two decimal numbers).
fn is_entry_id(v: &str) -> bool {
    v.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_from_their_printed_form() {
        for raw in [
            &b"prod:shop:a:v1:{x}"[..],
            b"bin\xff\x00\\key",
            "caf\u{e9}".as_bytes(),
        ] {
            assert_eq!(parse_key(&display_key(raw)).unwrap(), raw);
        }
        assert!(parse_key("a\\q").is_err());
        assert!(parse_key("").is_err());
    }
}
