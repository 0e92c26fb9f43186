//! The keyspace walker: `SCAN` on one server, paced, with each batch's keys inspected in the same round trip.
//!
//! The one decision: **one pipeline per batch carries both the inspection of the keys the last `SCAN`
//! returned (`TYPE`, `PTTL`, `MEMORY USAGE … SAMPLES n` per key) and the next `SCAN`**, so a batch costs one
//! round trip, and the cursor a checkpoint stores is always the one *after* the keys already counted: a walk
//! stopped between batches and resumed from that cursor sees every key exactly as one uninterrupted walk.
//! `KEYS` is never used. Pacing is per server: after each batch the walker waits until its commands fit the
//! current rate (waits shorter than 2 ms are carried over to the next batch rather than slept, because the
//! timer cannot sleep less than a millisecond), and the rate backs off (halves, down to 1/64 of `--max-ops-per-sec`) whenever a batch's
//! round trip per command rises above four times its smoothed baseline (and the round trip is at least 5 ms),
//! then climbs back by 1/16 of the ceiling per calm batch.
//! `keyward purge` walks with the same code, restricted by `SCAN … MATCH` ([`NodeWalk::matching`]), and
//! both keep and resume their checkpoints through [`ResumePoint`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use redis::Value;
use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::UsageError;

/// Keys inspected per pipeline: about 150 short commands (≈6 KiB), well under one read of the server's
/// 16 KiB query buffer, so each pipeline is one short burst of server time. A `SCAN` that returns more keys
/// is inspected by several such pipelines sent together.
const CHUNK_KEYS: usize = 50;

/// How long one pipeline may take before the walk fails (and prints its resume token).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// One key as the server described it.
#[derive(Debug, Clone)]
pub(crate) struct KeyFacts {
    pub(crate) key: Vec<u8>,
    /// `string`, `hash`, `stream`, … (`TYPE`).
    pub(crate) kind: String,
    /// Milliseconds left (`PTTL`): -1 when the key has no TTL.
    pub(crate) pttl_ms: i64,
    /// `MEMORY USAGE` in bytes (nested values sampled).
    pub(crate) memory: u64,
}

/// Largest `--count` of the audit and the purge: a `SCAN … COUNT n` blocks the server for about n keys, and
/// the next batch is a pipeline of 3n commands, whatever the pace.
pub(crate) const MAX_COUNT: usize = 10_000;

/// Runs the walk's commands (and, with `confirmed`, a purge's `EVAL`) once on `key`, a plain ASCII name, before
/// the walk: a command renamed away or not granted fails here with an error naming it. In the walk's
/// pipelines the same refusal echoes the scanned key's raw bytes, which for a binary key name redis-rs cannot
/// parse (it drops the connection, and the error read "broken pipe"). On a Cluster node that does not serve
/// `key`'s slot the answer is `MOVED`, which Redis sends only after the command and the ACL passed: a pass.
pub(crate) async fn probe(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    samples: u64,
    confirmed: bool,
) -> anyhow::Result<()> {
    let mut cmds = vec![
        redis::cmd("TYPE").arg(key).clone(),
        redis::cmd("PTTL").arg(key).clone(),
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(samples)
            .clone(),
    ];
    if confirmed {
        cmds.push(redis::cmd("EVAL").arg("return 0").arg(0).clone());
    }
    for cmd in cmds {
        match cmd.query_async::<redis::Value>(conn).await {
            Ok(_) => {}
            Err(e) if e.redirect_node().is_some() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Which server a walk is on: its address and its `run_id`, as a checkpoint records them.
///
/// A resume must be on the very server the walk started on: another server's keys are not where the cursor
/// points, and a *restarted* server (same address, new `run_id`) hashes keys with a new random seed, so an
/// old cursor skips keys there too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerId {
    /// `host:port`, `tls://host:port` or `unix:/path`: never credentials.
    pub(crate) addr: String,
    /// `INFO server`'s `run_id`.
    pub(crate) run_id: String,
}

impl ServerId {
    /// Reads the `run_id` of the server behind `conn`, known by `addr`.
    ///
    /// # Errors
    /// When `INFO server` is refused or has no `run_id`.
    pub(crate) async fn read(conn: &mut MultiplexedConnection, addr: &str) -> anyhow::Result<Self> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(conn)
            .await
            .with_context(|| format!("INFO server on {addr}"))?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| anyhow!("INFO server on {addr} has no run_id"))?;
        Ok(ServerId {
            addr: addr.to_owned(),
            run_id,
        })
    }
}

impl std::fmt::Display for ServerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = self.run_id.get(..12).unwrap_or(&self.run_id);
        write!(f, "{} (run_id {short}…)", self.addr)
    }
}

/// One server's progress in a checkpoint (the audit's and the purge's alike).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct NodeState {
    /// `host:port` (`tls://host:port`, `unix:/path`), never credentials. Older checkpoints wrote `""`
    /// for a standalone server.
    pub(crate) server: String,
    /// The server's `run_id` when the walk started (absent in older checkpoints: they resume nowhere).
    #[serde(default)]
    pub(crate) run_id: String,
    /// The `SCAN` cursor to resume from.
    pub(crate) cursor: u64,
    pub(crate) done: bool,
}

impl NodeState {
    /// Every server of `ids`, from the start.
    pub(crate) fn start(ids: &[ServerId]) -> Vec<NodeState> {
        ids.iter()
            .map(|id| NodeState {
                server: id.addr.clone(),
                run_id: id.run_id.clone(),
                cursor: 0,
                done: false,
            })
            .collect()
    }

    /// Records a counted batch: resume at `resume_at` ([`Batch::resume_at`]), or done when `None`.
    pub(crate) fn advance(&mut self, resume_at: Option<u64>) {
        self.cursor = resume_at.unwrap_or(0);
        self.done = resume_at.is_none();
    }

    /// When a checkpoint's `nodes` are not the servers `ids` names now (the same servers, in the same order,
    /// each still the process that started the walk), a sentence saying which servers the checkpoint belongs
    /// to and what the URL names now.
    pub(crate) fn mismatch(nodes: &[NodeState], ids: &[ServerId]) -> Option<String> {
        let same = nodes.len() == ids.len()
            && nodes
                .iter()
                .zip(ids)
                .all(|(n, id)| n.server == id.addr && n.run_id == id.run_id);
        if same {
            return None;
        }
        let list = |ids: Vec<String>| ids.join(", ");
        let then = list(
            nodes
                .iter()
                .map(|n| {
                    let server = if n.server.is_empty() {
                        "an unrecorded server (a checkpoint of an older keyward)"
                    } else {
                        &n.server
                    };
                    if n.run_id.is_empty() {
                        server.to_owned()
                    } else {
                        ServerId {
                            addr: server.to_owned(),
                            run_id: n.run_id.clone(),
                        }
                        .to_string()
                    }
                })
                .collect(),
        );
        let now = list(ids.iter().map(ToString::to_string).collect());
        let restarted =
            nodes.len() == ids.len() && nodes.iter().zip(ids).all(|(n, id)| n.server == id.addr);
        Some(if restarted {
            format!(
                "it belongs to {then}, and the server there now is {now}: restarted (or replaced) since, so the saved cursor no longer means anything; start again without --resume"
            )
        } else {
            format!("it belongs to {then}, but the URL names {now}")
        })
    }
}

/// Which command walks: its resume tokens and checkpoint files are its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walker {
    /// `keyward audit`: tokens `kwa1-<16 hex>`, files `keyward-audit-<16 hex>.json`.
    Audit,
    /// `keyward purge`: tokens `kwp1-<16 hex>`, files `keyward-purge-<16 hex>.json`.
    Purge,
}

impl Walker {
    fn name(self) -> &'static str {
        match self {
            Walker::Audit => "audit",
            Walker::Purge => "purge",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Walker::Audit => "kwa1-",
            Walker::Purge => "kwp1-",
        }
    }
}

/// Where a walk that stops early keeps its checkpoint, and the token an operator passes back with `--resume`.
/// The audit and the purge share the whole cycle: a fresh token (or the one given), loading the checkpoint,
/// and, when the walk stops early, saving it and printing how to resume ([`save`](Self::save)).
#[derive(Debug)]
pub(crate) struct ResumePoint {
    walker: Walker,
    token: String,
    path: PathBuf,
}

impl ResumePoint {
    /// A new resume point in `dir`, with a random token.
    pub(crate) fn fresh(walker: Walker, dir: &Path) -> Self {
        let id = format!("{:016x}", rand::random::<u64>());
        ResumePoint {
            walker,
            token: format!("{}{id}", walker.prefix()),
            path: dir.join(format!("keyward-{}-{id}.json", walker.name())),
        }
    }

    /// The resume point `token` (given to `--resume`) names in `dir`.
    ///
    /// # Errors
    /// A [`UsageError`] when `token` is not one of `walker`'s tokens.
    pub(crate) fn named(walker: Walker, dir: &Path, token: &str) -> anyhow::Result<Self> {
        let id = token
            .strip_prefix(walker.prefix())
            .filter(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                UsageError(format!(
                    "--resume: {token:?} is not {} {} resume token ({}…)",
                    if walker == Walker::Audit { "an" } else { "a" },
                    walker.name(),
                    walker.prefix()
                ))
            })?;
        Ok(ResumePoint {
            walker,
            token: token.to_owned(),
            path: dir.join(format!("keyward-{}-{id}.json", walker.name())),
        })
    }

    /// The token (`kwa1-…`, `kwp1-…`).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Reads the checkpoint a stopped walk saved.
    ///
    /// # Errors
    /// A [`UsageError`] when the file cannot be read (a spent token, another `--checkpoint-dir`); an error
    /// naming the file when it is not a checkpoint.
    pub(crate) fn load<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            UsageError(format!(
                "--resume {}: cannot read the checkpoint {}: {e}",
                self.token,
                self.path.display()
            ))
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("checkpoint {} is corrupt", self.path.display()))
    }

    /// Saves `checkpoint()` for a walk that did not finish (a signal, `--limit-keys`, an error) and tells
    /// stderr how to resume after `keys` keys (`same`: what the repeated command must keep, e.g. "same
    /// selection and --confirm").
    ///
    /// # Errors
    /// The checkpoint cannot be encoded or written (then the token resumes nothing).
    pub(crate) fn save<T: Serialize>(
        &self,
        keys: u64,
        same: Option<&str>,
        checkpoint: impl FnOnce() -> T,
    ) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        let bytes = serde_json::to_vec(&checkpoint()).context("cannot encode the checkpoint")?;
        std::fs::write(&self.path, bytes)
            .with_context(|| format!("cannot save the checkpoint {}", self.path.display()))?;
        let (name, token) = (self.walker.name(), &self.token);
        eprintln!(
            "keyward {name}: stopped after {}; resume by running the same command{} with: --resume {token}",
            crate::words::count(keys, "key"),
            same.map(|s| format!(" ({s})")).unwrap_or_default()
        );
        Ok(())
    }

    /// Deletes the checkpoint (a finished walk): its token is spent.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits for every per-server task of a walk (`what`: "walk", "purge") and returns the first failure, a task
/// that panicked included.
pub(crate) async fn first_failure(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    what: &str,
) -> Option<anyhow::Error> {
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(anyhow!("a {what} task failed: {e}"))),
        }
    }
    failure
}

/// A plain connection to one server (one primary of a Cluster): [`crate::redis_url::connect`] with the
/// walk's timeouts.
///
/// # Errors
/// As [`crate::redis_url::connect`]: a [`UsageError`] when the URL does not parse; otherwise an error naming
/// the server (`host:port`, never the password) and what to check.
pub(crate) async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    crate::redis_url::connect(url, Duration::from_secs(5), RESPONSE_TIMEOUT).await
}

/// The pace of one server's walk: a ceiling in commands per second and the current rate under it.
#[derive(Debug)]
pub(crate) struct Pacer {
    max: f64,
    rate: f64,
    /// Smoothed time per command of the calm batches (an exponential moving average, weight 1/8).
    baseline_per_cmd: Option<f64>,
    /// How many times the rate was halved.
    pub(crate) backoffs: u64,
    /// Seconds of waiting owed and not yet slept (negative: a sleep overshot, credited to the next batches).
    owed: f64,
}

/// Waits shorter than this are carried over rather than slept: tokio's timer has a 1 ms resolution, so
/// sleeping after every small batch for its few hundred microseconds would cost a whole millisecond each time
/// and hold the walk far below its ceiling (it did: 32–38 s for 1,000,000 keys at a 300,000 ops/s ceiling).
const MIN_SLEEP: Duration = Duration::from_millis(2);

/// A batch counts as slow when its time per command is this many times the baseline …
const SLOW_FACTOR: f64 = 4.0;
/// … and its round trip is at least this long (shorter ones are scheduling noise, not a busy server).
const SLOW_RTT: Duration = Duration::from_millis(5);

impl Pacer {
    pub(crate) fn new(max_ops_per_sec: u64) -> Self {
        let max = max_ops_per_sec.max(1) as f64;
        Pacer {
            max,
            rate: max,
            baseline_per_cmd: None,
            backoffs: 0,
            owed: 0.0,
        }
    }

    /// Records a batch of `commands` that took `rtt`, and returns how long to wait before the next one so
    /// that this batch's commands fit the (possibly lowered) rate.
    pub(crate) fn after_batch(&mut self, commands: usize, rtt: Duration) -> Duration {
        let commands = commands.max(1);
        let per_cmd = rtt.as_secs_f64() / commands as f64;
        let baseline = *self.baseline_per_cmd.get_or_insert(per_cmd);
        if per_cmd > baseline * SLOW_FACTOR && rtt >= SLOW_RTT {
            self.rate = (self.rate / 2.0).max(self.max / 64.0);
            self.backoffs += 1;
        } else {
            self.baseline_per_cmd = Some(baseline + (per_cmd - baseline) / 8.0);
            self.rate = (self.rate + self.max / 16.0).min(self.max);
        }
        Duration::from_secs_f64(commands as f64 / self.rate).saturating_sub(rtt)
    }

    /// Adds a batch's wait (from [`after_batch`](Self::after_batch)) to what is owed, and returns how long
    /// to sleep now: nothing until at least [`MIN_SLEEP`] is owed, then all of it.
    pub(crate) fn owe(&mut self, wait: Duration) -> Option<Duration> {
        self.owed += wait.as_secs_f64();
        (self.owed >= MIN_SLEEP.as_secs_f64()).then(|| Duration::from_secs_f64(self.owed))
    }

    /// Records that a sleep lasted `slept`: time slept beyond what was owed is credited to the next batches
    /// (at most [`MIN_SLEEP`] of it, so a long stall never turns into a burst).
    pub(crate) fn slept(&mut self, slept: Duration) {
        self.owed = (self.owed - slept.as_secs_f64()).max(-MIN_SLEEP.as_secs_f64());
    }
}

/// The walk of one server: its connection, cursor and pace.
pub(crate) struct NodeWalk {
    conn: MultiplexedConnection,
    /// The next `SCAN` cursor (`0` before the first batch and after the last).
    cursor: u64,
    /// Keys returned by the last `SCAN`, to inspect in the next pipeline.
    pending: Vec<Vec<u8>>,
    started: bool,
    count: usize,
    samples: u64,
    /// `SCAN … MATCH` pattern, if any.
    pattern: Option<String>,
    pub(crate) pacer: Pacer,
    pub(crate) commands: u64,
}

/// One inspected batch.
pub(crate) struct Batch {
    pub(crate) keys: Vec<KeyFacts>,
    /// The cursor to resume from once these keys are counted; `None` when the walk of this server is done.
    pub(crate) resume_at: Option<u64>,
}

impl NodeWalk {
    /// A walk starting at `cursor` (`0`: from the start).
    pub(crate) fn new(
        conn: MultiplexedConnection,
        cursor: u64,
        count: usize,
        samples: u64,
        max_ops: u64,
    ) -> Self {
        NodeWalk {
            conn,
            cursor,
            pending: Vec::new(),
            started: false,
            count,
            samples,
            pattern: None,
            pacer: Pacer::new(max_ops),
            commands: 0,
        }
    }

    /// Walks only the keys matching `pattern` (`SCAN … MATCH`).
    #[must_use]
    pub(crate) fn matching(mut self, pattern: String) -> Self {
        self.pattern = Some(pattern);
        self
    }

    /// The walk's connection, for follow-up commands on this server (size checks, the purge's deletes).
    pub(crate) fn conn(&mut self) -> &mut MultiplexedConnection {
        &mut self.conn
    }

    /// Scans and inspects the next batch, then waits as the pace requires. `None` when the server is done.
    ///
    /// The cursor a checkpoint may store after this batch is [`Batch::resume_at`]: the keys of the `SCAN`
    /// sent in this pipeline are inspected by the next call, so when the walk stops here they are scanned
    /// again on resume, never lost and never counted twice.
    pub(crate) async fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        if self.started && self.cursor == 0 && self.pending.is_empty() {
            return Ok(None);
        }
        let scanned_from = self.cursor;
        // One pipeline per CHUNK_KEYS keys, all sent at once on the multiplexed connection; the last one also
        // carries the next SCAN.
        let mut pipes: Vec<redis::Pipeline> = self
            .pending
            .chunks(CHUNK_KEYS)
            .map(|chunk| {
                let mut pipe = redis::pipe();
                // Refusals come back as values, to be reported once with a count (`refusals`), not one
                // line per command.
                pipe.ignore_errors();
                for key in chunk {
                    pipe.cmd("TYPE").arg(key);
                    pipe.cmd("PTTL").arg(key);
                    pipe.cmd("MEMORY")
                        .arg("USAGE")
                        .arg(key)
                        .arg("SAMPLES")
                        .arg(self.samples);
                }
                pipe
            })
            .collect();
        let scan_more = !(self.started && self.cursor == 0);
        if scan_more {
            if pipes.is_empty() {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                pipes.push(pipe);
            }
            let last = pipes.last_mut().expect("at least one pipeline");
            let scan = last.cmd("SCAN").arg(self.cursor);
            if let Some(pattern) = &self.pattern {
                scan.arg("MATCH").arg(pattern);
            }
            scan.arg("COUNT").arg(self.count);
        }
        let commands = self.pending.len() * 3 + usize::from(scan_more);
        let t0 = Instant::now();
        let waves = pipes.iter().map(|pipe| {
            let mut conn = self.conn.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        });
        let replies: Vec<Value> = futures_util::future::try_join_all(waves)
            .await
            .context("SCAN / TYPE / PTTL / MEMORY USAGE pipeline failed")?
            .into_iter()
            .flatten()
            .collect();
        let rtt = t0.elapsed();
        if let Some(refused) = refusals(&replies) {
            return Err(refused);
        }
        self.commands += commands as u64;
        let inspected = self.pending.len() * 3;
        let mut keys = Vec::with_capacity(self.pending.len());
        for (key, reply) in self.pending.drain(..).zip(replies[..inspected].chunks(3)) {
            let kind = match &reply[0] {
                Value::SimpleString(s) => s.clone(),
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => return Err(anyhow!("unexpected TYPE reply {other:?}")),
            };
            if kind == "none" {
                // Expired or deleted between the SCAN and the inspection.
                continue;
            }
            let pttl_ms = match reply[1] {
                Value::Int(n) => n,
                ref other => return Err(anyhow!("unexpected PTTL reply {other:?}")),
            };
            if pttl_ms == -2 {
                continue;
            }
            let memory = match reply[2] {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            };
            keys.push(KeyFacts {
                key,
                kind,
                pttl_ms,
                memory,
            });
        }
        self.started = true;
        let resume_at = scanned_from;
        if scan_more {
            let (next, found) = parse_scan(&replies[inspected])?;
            self.cursor = next;
            self.pending = found;
        }
        let wait = self.pacer.after_batch(commands, rtt);
        if let Some(owed) = self.pacer.owe(wait) {
            let t = Instant::now();
            tokio::time::sleep(owed).await;
            self.pacer.slept(t.elapsed());
        }
        let done = self.cursor == 0 && self.pending.is_empty();
        Ok(Some(Batch {
            keys,
            resume_at: if done { None } else { Some(resume_at) },
        }))
    }
}

/// The server errors among `replies`, as one error: each distinct message once, with how many commands got
/// it (a refused command used to print one line per key of the batch).
pub(crate) fn refusals(replies: &[Value]) -> Option<anyhow::Error> {
    let mut refused: Vec<(String, u64)> = Vec::new();
    for reply in replies {
        if let Value::ServerError(e) = reply {
            let why = e.to_string();
            match refused.iter_mut().find(|(w, _)| *w == why) {
                Some((_, n)) => *n += 1,
                None => refused.push((why, 1)),
            }
        }
    }
    if refused.is_empty() {
        return None;
    }
    let total: u64 = refused.iter().map(|(_, n)| n).sum();
    let reasons: Vec<String> = refused
        .iter()
        .map(|(why, n)| format!("{why} ({}×)", n))
        .collect();
    Some(anyhow!(
        "the server refused {} of the batch: {}",
        crate::words::count(total, "command"),
        reasons.join("; ")
    ))
}

/// `[cursor, [key, …]]`.
fn parse_scan(reply: &Value) -> anyhow::Result<(u64, Vec<Vec<u8>>)> {
    let Value::Array(parts) = reply else {
        return Err(anyhow!("unexpected SCAN reply {reply:?}"));
    };
    let cursor = match parts.first() {
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("unexpected SCAN cursor {b:?}"))?,
        other => return Err(anyhow!("unexpected SCAN cursor {other:?}")),
    };
    let keys = match parts.get(1) {
        Some(Value::Array(keys)) => keys
            .iter()
            .filter_map(|k| match k {
                Value::BulkString(b) => Some(b.clone()),
                _ => None,
            })
            .collect(),
        other => return Err(anyhow!("unexpected SCAN keys {other:?}")),
    };
    Ok((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_holds_the_rate_and_backs_off_when_the_server_slows() {
        let mut p = Pacer::new(10_000);
        // 1000 commands in 10 ms at 10 000/s: wait the remaining 90 ms.
        assert_eq!(
            p.after_batch(1000, Duration::from_millis(10)),
            Duration::from_millis(90)
        );
        // Ten times slower per command: halve the rate, wait accordingly.
        let wait = p.after_batch(1000, Duration::from_millis(100));
        assert_eq!(p.backoffs, 1);
        assert_eq!(wait, Duration::from_millis(100));
        // Calm again: the rate climbs back by a sixteenth of the ceiling.
        let wait = p.after_batch(1000, Duration::from_millis(10));
        assert!(wait < Duration::from_millis(190), "{wait:?}");
        assert_eq!(p.backoffs, 1);
        // A slow but short round trip is noise, not a busy server.
        p.after_batch(10, Duration::from_millis(4));
        assert_eq!(p.backoffs, 1);
        // Never below 1/64 of the ceiling.
        for _ in 0..20 {
            p.after_batch(1000, Duration::from_secs(1));
        }
        assert_eq!(p.rate, 10_000.0 / 64.0);
    }

    #[test]
    fn short_waits_add_up_before_a_sleep_and_an_overshoot_is_credited() {
        let mut p = Pacer::new(300_000);
        let us = Duration::from_micros;
        assert_eq!(p.owe(us(500)), None);
        assert_eq!(p.owe(us(500)), None);
        assert_eq!(p.owe(us(500)), None);
        assert_eq!(p.owe(us(600)), Some(us(2100)));
        // The timer slept 3.1 ms for 2.1: the next 1 ms of waits are already paid.
        p.slept(us(3100));
        assert_eq!(p.owe(us(900)), None);
        assert_eq!(p.owe(us(2100)), Some(us(2000)));
        // A long stall is credited only up to MIN_SLEEP.
        p.slept(Duration::from_secs(1));
        assert_eq!(p.owe(us(3000)), None);
        assert_eq!(p.owe(us(1000)), Some(us(2000)));
    }
}
