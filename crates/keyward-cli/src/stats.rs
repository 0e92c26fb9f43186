//! Redis command counts, read over plain `redis` connections of our own.
//!
//! `INFO commandstats` ([`CommandStats`]) counts every command the server executed, including the ones a Lua
//! script calls (`EVALSHA` and then each `redis.call` inside it): that is the cost keyward imposes on the
//! server, which is what `redis_cmds_per_op` reports. Our own `INFO` calls are left out.
//!
//! What clients *send* (one `EVALSHA` per rate-limit check, say) cannot be told apart in those counts, nor in
//! `INFO stats` (`total_commands_processed` counts script calls too; checked on Redis 7.0), and per-client
//! command counts only exist from Redis 7.2 on. [`ClientAudit`] counts them from `MONITOR` instead, which tags
//! every command with the client that sent it, or `lua` for a script's calls. `MONITOR` costs the server
//! throughput, so it only runs outside timed phases.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures_util::StreamExt as _;
use redis::aio::{Monitor, MultiplexedConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::UsageError;

/// Calls per command name (`get`, `evalsha`, `client|setinfo`, …).
pub(crate) type Counts = BTreeMap<String, u64>;

/// A connection used only to read `INFO commandstats`.
pub(crate) struct CommandStats {
    conn: MultiplexedConnection,
}

/// How long our own connections may take to connect and to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

fn open(url: &str) -> anyhow::Result<redis::Client> {
    // redis-rs enables rustls without a crypto provider; for `rediss://` use ring's unless one is set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // redis-rs errors already display their cause: format them rather than chain them, to say it once.
    Ok(redis::Client::open(url)
        .map_err(|e| UsageError(format!("invalid Redis URL (--url or REDIS_URL): {e}")))?)
}

async fn connect(client: &redis::Client, what: &str) -> anyhow::Result<MultiplexedConnection> {
    tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .with_context(|| {
            format!("the {what} connection to Redis did not answer within {TIMEOUT:?}")
        })?
        .map_err(|e| anyhow!("cannot open the {what} connection to Redis: {e}"))
}

impl CommandStats {
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Self> {
        let conn = connect(&open(url)?, "stats").await?;
        Ok(Self { conn })
    }

    /// The server's cumulative call count per command, without `info` itself.
    pub(crate) async fn snapshot(&mut self) -> anyhow::Result<Counts> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .map_err(|e| anyhow!("INFO commandstats failed: {e}"))?;
        Ok(parse(&info))
    }
}

/// Counts the top-level commands clients send between [`start`](Self::start) and [`finish`](Self::finish),
/// per command name, from `MONITOR`. The window is delimited by two `ECHO` markers sent on a connection of our
/// own, which sends nothing else: everything the server ran between them is counted except the markers and
/// the commands scripts called. Commands from unrelated clients count too, as in `INFO commandstats`.
pub(crate) struct ClientAudit {
    /// Sends the markers.
    markers: MultiplexedConnection,
    end: String,
    /// Reads the `MONITOR` stream as it comes (the server would buffer it otherwise) and counts.
    reader: JoinHandle<anyhow::Result<Counts>>,
}

impl ClientAudit {
    /// Start `MONITOR` and wait until it shows our start marker.
    ///
    /// # Errors
    /// When the server refuses `MONITOR` (ACLs, managed services) or does not answer.
    pub(crate) async fn start(url: &str) -> anyhow::Result<Self> {
        let client = open(url)?;
        let monitor = tokio::time::timeout(TIMEOUT, client.get_async_monitor())
            .await
            .with_context(|| format!("MONITOR did not answer within {TIMEOUT:?}"))?
            .map_err(|e| anyhow!("MONITOR failed: {e}"))?;
        let markers = connect(&client, "marker").await?;
        let nonce = rand::random::<u64>();
        let start = format!("keyward-bench-count-start-{nonce}");
        let end = format!("keyward-bench-count-end-{nonce}");
        let (started_tx, started) = oneshot::channel();
        let mut audit = Self {
            markers,
            reader: tokio::spawn(count_between(
                monitor,
                start.clone(),
                end.clone(),
                started_tx,
            )),
            end,
        };
        audit.echo(&start).await?;
        tokio::time::timeout(TIMEOUT, started)
            .await
            .with_context(|| format!("MONITOR did not show our start marker within {TIMEOUT:?}"))?
            .map_err(|_| anyhow!("the MONITOR connection closed before our start marker"))?;
        Ok(audit)
    }

    /// Send the end marker and return what the clients sent since the start marker.
    pub(crate) async fn finish(mut self) -> anyhow::Result<Counts> {
        let end = self.end.clone();
        self.echo(&end).await?;
        tokio::time::timeout(TIMEOUT, &mut self.reader)
            .await
            .with_context(|| format!("MONITOR did not show our end marker within {TIMEOUT:?}"))?
            .context("the MONITOR reader panicked")?
    }

    async fn echo(&mut self, marker: &str) -> anyhow::Result<()> {
        let _: String = tokio::time::timeout(
            TIMEOUT,
            redis::cmd("ECHO")
                .arg(marker)
                .query_async(&mut self.markers),
        )
        .await
        .with_context(|| format!("ECHO did not answer within {TIMEOUT:?}"))?
        .map_err(|e| anyhow!("ECHO failed: {e}"))?;
        Ok(())
    }
}

impl Drop for ClientAudit {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Read `MONITOR` lines: signal `started` at the line of the `start` marker, then count the commands of every
/// client but `lua` until the line of the `end` marker.
async fn count_between(
    monitor: Monitor,
    start: String,
    end: String,
    started: oneshot::Sender<()>,
) -> anyhow::Result<Counts> {
    let mut lines = monitor.into_on_message::<String>();
    let mut started = Some(started);
    let mut counts = Counts::new();
    while let Some(line) = lines.next().await {
        let Some((client, command)) = parse_monitor_line(&line) else {
            continue;
        };
        let marker = |m: &str| command == "echo" && line.contains(m);
        if let Some(tx) = started.take_if(|_| marker(&start)) {
            let _ = tx.send(());
        } else if started.is_some() {
            // Before the start marker.
        } else if marker(&end) {
            return Ok(counts);
        } else if client != "lua" {
            *counts.entry(command).or_default() += 1;
        }
    }
    bail!("the MONITOR connection closed before our end marker")
}

/// The client and the lower-case command name of a `MONITOR` line such as
/// `1700000000.123456 [0 127.0.0.1:50000] "evalsha" "…" "1"` (`[0 lua]` for a script's calls; the client is
/// `unix:/path` for a unix socket and `[::1]:50000` for IPv6, hence the search from the first quote).
fn parse_monitor_line(line: &str) -> Option<(&str, String)> {
    let quote = line.find('"')?;
    let head = &line[..quote];
    let inside = &head[head.find('[')? + 1..head.rfind(']')?];
    let (_db, client) = inside.split_once(' ')?;
    let command = line[quote + 1..].split('"').next()?;
    Some((client, command.to_ascii_lowercase()))
}

/// Parses `cmdstat_<name>:calls=<n>,usec=…` lines; every other line is ignored.
pub(crate) fn parse(info: &str) -> Counts {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            if name == "info" {
                return None;
            }
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Calls made between two snapshots, per command; commands not called in between are left out.
pub(crate) fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(name, &calls)| {
            let d = calls.saturating_sub(before.get(name).copied().unwrap_or(0));
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_client|setinfo:calls=2,usec=1,usec_per_call=0.50,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_hmget:calls=7,usec=7,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn parses_calls_and_skips_info() {
        let counts = parse(INFO);
        assert_eq!(counts.get("evalsha"), Some(&10));
        assert_eq!(counts.get("client|setinfo"), Some(&2));
        assert_eq!(counts.get("hmget"), Some(&7));
        assert!(!counts.contains_key("info"));
    }

    #[test]
    fn monitor_lines_name_their_client_and_command() {
        let cases = [
            (
                r#"1795434334.642870 [0 unix:/tmp/r.sock] "eval" "return 1" "0""#,
                ("unix:/tmp/r.sock", "eval"),
            ),
            (r#"1795434334.642936 [0 lua] "TIME""#, ("lua", "time")),
            (
                r#"1795434334.642936 [3 [::1]:6379] "EVALSHA" "ab" "1" "k""#,
                ("[::1]:6379", "evalsha"),
            ),
            (
                r#"1795434334.642936 [0 127.0.0.1:5000] "echo" "a \"quoted\" [x] arg""#,
                ("127.0.0.1:5000", "echo"),
            ),
        ];
        for (line, (client, command)) in cases {
            assert_eq!(
                parse_monitor_line(line),
                Some((client, command.to_owned())),
                "{line}"
            );
        }
        assert_eq!(parse_monitor_line("OK"), None);
    }

    #[test]
    fn delta_keeps_only_commands_called_in_between() {
        let before = parse(INFO);
        let mut after = before.clone();
        *after.get_mut("evalsha").unwrap() += 4;
        after.insert("set".to_owned(), 1);
        let d = delta(&before, &after);
        assert_eq!(
            d,
            Counts::from([("evalsha".to_owned(), 4), ("set".to_owned(), 1)])
        );
    }
}
