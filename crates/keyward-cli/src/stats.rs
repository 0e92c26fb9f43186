//! Redis command counts from `INFO commandstats`, read over a plain `redis` connection of our own.
//!
//! `INFO commandstats` counts every command the server executed, including the ones a Lua script calls
//! (`EVALSHA` and then each `redis.call` inside it): that is the cost keyward imposes on the server, which is
//! what `redis_cmds_per_op` reports. Our own `INFO` calls are left out.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use redis::aio::MultiplexedConnection;

use crate::UsageError;

/// Calls per command name (`get`, `evalsha`, `client|setinfo`, …).
pub(crate) type Counts = BTreeMap<String, u64>;

/// A connection used only to read `INFO commandstats`.
pub(crate) struct CommandStats {
    conn: MultiplexedConnection,
}

impl CommandStats {
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Self> {
        // redis-rs enables rustls without a crypto provider; for `rediss://` use ring's unless one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // redis-rs errors already display their cause: format them rather than chain them, to say it once.
        let client = redis::Client::open(url)
            .map_err(|e| UsageError(format!("invalid Redis URL (--url or REDIS_URL): {e}")))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .context("the stats connection to Redis did not answer within 5s")?
        .map_err(|e| anyhow!("cannot open the stats connection to Redis: {e}"))?;
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
