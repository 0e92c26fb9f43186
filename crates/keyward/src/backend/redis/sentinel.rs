//! Redis behind Sentinel: the `redis+sentinel://` URL, finding the master through the sentinels, and following
//! a failover.
//!
//! The one decision: keyward resolves the master itself instead of using redis-rs's sentinel client, which
//! resolves only at connect time. A background task keeps the connection on the current master: it re-resolves
//! when a sentinel announces `+switch-master`, when a call finds the master unavailable or read-only (at most
//! once per [`RESOLVE_EVERY`]), and every [`POLL_EVERY`] in case both were missed. A new master is used only
//! after it says `master` to `ROLE`; then the connection is swapped and every local waiter is woken.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tokio::sync::Notify;

use super::{Slot, open, redact, scrub};
use crate::backend::breaker::Breaker;
use crate::backend::wake::WakeBus;
use crate::backend::{ConnectOptions, Namespace};
use crate::error::{Error, Result};

/// The least time between two resolutions: failing calls ask for one each, the sentinels are asked at most
/// this often.
pub(crate) const RESOLVE_EVERY: Duration = Duration::from_millis(250);
/// How often the sentinels are asked even when nothing seems wrong (a missed `+switch-master`).
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(1);

/// A parsed `redis+sentinel://[user:pass@]host:port[,host:port…]/master-name` URL.
#[derive(Clone)]
pub(crate) struct SentinelUrl {
    /// The sentinels, in the URL's order (`host`, `port`).
    pub(crate) sentinels: Vec<(String, u16)>,
    /// The master's name as the sentinels know it.
    pub(crate) master: String,
    /// The user-info part exactly as written (still percent-encoded): the data nodes' credentials.
    userinfo: Option<String>,
}

/// Whether `url` names Redis behind Sentinel (`redis+sentinel://` or `rediss+sentinel://`).
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

impl SentinelUrl {
    /// Parse a sentinel URL. The sentinel port defaults to 26379.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] naming what is wrong, with the credentials redacted.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let invalid = |detail: &str| Error::InvalidUrl {
            reason: scrub(url, &format!("{}: {detail}", redact(url))),
        };
        if url.starts_with("rediss+sentinel://") {
            return Err(invalid(
                "TLS to Sentinel (`rediss+sentinel://`) is not supported yet; use `redis+sentinel://`",
            ));
        }
        let rest = url
            .strip_prefix("redis+sentinel://")
            .ok_or_else(|| invalid("a Sentinel URL starts with `redis+sentinel://`"))?;
        let (userinfo, rest) = match rest.rfind('@') {
            Some(at) => (Some(rest[..at].to_owned()), &rest[at + 1..]),
            None => (None, rest),
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(
                "a Sentinel URL takes no query or fragment: \
                 `redis+sentinel://[user:pass@]host:port[,host:port…]/master-name`",
            ));
        }
        let (hosts, master) = rest.split_once('/').ok_or_else(|| {
            invalid(
                "the master name is missing: `redis+sentinel://host:port[,host:port…]/master-name`",
            )
        })?;
        let master = master.strip_suffix('/').unwrap_or(master);
        if master.is_empty() || master.contains(['/', ' ']) {
            return Err(invalid(
                "the master name (the path after the sentinel addresses) must be one non-empty word",
            ));
        }
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            sentinels.push(parse_host(host).map_err(|d| invalid(&d))?);
        }
        Ok(Self {
            sentinels,
            master: master.to_owned(),
            userinfo,
        })
    }

    /// The URL of a data node at `host:port`, carrying the URL's credentials.
    pub(crate) fn data_url(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        match &self.userinfo {
            Some(u) => format!("redis://{u}@{host}:{port}"),
            None => format!("redis://{host}:{port}"),
        }
    }

    /// The sentinels, for messages: `sentinel <master> via host:port,host:port`.
    pub(crate) fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        format!("sentinel {} via {}", self.master, hosts.join(","))
    }
}

/// `host:port` (or `[v6]:port`, or `host` with the default port 26379).
fn parse_host(text: &str) -> std::result::Result<(String, u16), String> {
    if text.is_empty() {
        return Err("an empty sentinel address (a stray `,`?)".to_owned());
    }
    let (host, port) =
        if let Some(v6) = text.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{text}`: an unclosed `[` in an IPv6 address"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| {
                        format!("`{text}`: expected `:port` after the IPv6 address")
                    })?),
                ),
            }
        } else {
            match text.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            }
        };
    if host.is_empty() {
        return Err(format!("`{text}`: the host is missing"));
    }
    let port = match port {
        None => 26379,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{text}`: the port must be a number from 1 to 65535"))?,
    };
    Ok((host.to_owned(), port))
}

fn sentinel_client(host: &str, port: u16) -> redis::RedisResult<Client> {
    let info: ConnectionInfo = ConnectionAddr::Tcp(host.to_owned(), port).into_connection_info()?;
    Client::open(info)
}

/// Ask each sentinel in turn for the master's address, each bounded by `per_sentinel`: the first answer wins.
///
/// # Errors
/// A text saying what each sentinel answered, when none named the master.
pub(crate) async fn ask_sentinels(
    url: &SentinelUrl,
    per_sentinel: Duration,
) -> std::result::Result<((String, u16), MultiplexedConnection), String> {
    let mut failures = Vec::new();
    for (host, port) in &url.sentinels {
        let attempt = async {
            let client = sentinel_client(host, *port).map_err(|e| e.to_string())?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let addr = master_addr(&mut conn, &url.master).await?;
            Ok::<_, String>((addr, conn))
        };
        match tokio::time::timeout(per_sentinel, attempt).await {
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(e)) => failures.push(format!("{host}:{port} {e}")),
            Err(_) => failures.push(format!(
                "{host}:{port} gave no answer within {per_sentinel:?}"
            )),
        }
    }
    Err(format!(
        "no sentinel named the master: {}",
        failures.join("; ")
    ))
}

/// `SENTINEL GET-MASTER-ADDR-BY-NAME master` on a sentinel connection.
async fn master_addr(
    conn: &mut MultiplexedConnection,
    master: &str,
) -> std::result::Result<(String, u16), String> {
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(master)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    addr.ok_or_else(|| format!("does not know a master named `{master}`"))
}

/// The failover follower's shared state: the connection slot it swaps, and what it needs to open a new one.
pub(crate) struct Follower {
    pub(crate) url: SentinelUrl,
    /// Woken to re-resolve now (still at most once per [`RESOLVE_EVERY`]).
    resolve: Notify,
    slot: Arc<Slot>,
    breaker: Arc<Breaker>,
    /// The sentinel connection that answered last, asked first next time (no connection per poll).
    sentinel: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// The master the slot is connected to.
    current: Mutex<(String, u16)>,
    options: ConnectOptions,
    ns: Namespace,
    bus: Arc<WakeBus>,
}

impl Follower {
    pub(crate) fn new(
        url: SentinelUrl,
        slot: Arc<Slot>,
        breaker: Arc<Breaker>,
        current: (String, u16),
        options: ConnectOptions,
        ns: Namespace,
        bus: Arc<WakeBus>,
    ) -> Self {
        Self {
            url,
            resolve: Notify::new(),
            slot,
            breaker,
            sentinel: tokio::sync::Mutex::new(None),
            current: Mutex::new(current),
            options,
            ns,
            bus,
        }
    }

    /// Ask for a re-resolution (cheap; coalesced).
    pub(crate) fn trigger(&self) {
        self.resolve.notify_one();
    }

    /// The time one sentinel gets to answer: the connect timeout shared among them.
    fn per_sentinel(&self) -> Duration {
        let n = u32::try_from(self.url.sentinels.len())
            .unwrap_or(u32::MAX)
            .max(1);
        (self.options.connect_timeout / n).max(Duration::from_millis(100))
    }

    /// The master as the last sentinel that answered names it, or else as the first of the URL's sentinels
    /// that answers.
    async fn resolve(&self) -> std::result::Result<(String, u16), String> {
        let per_sentinel = self.per_sentinel();
        let mut cached = self.sentinel.lock().await;
        if let Some(conn) = cached.as_mut()
            && let Ok(Ok(addr)) =
                tokio::time::timeout(per_sentinel, master_addr(conn, &self.url.master)).await
        {
            return Ok(addr);
        }
        *cached = None;
        let (addr, conn) = ask_sentinels(&self.url, per_sentinel).await?;
        *cached = Some(conn);
        Ok(addr)
    }

    /// Ask the sentinels for the master; if it moved, connect to the new one (verified by `ROLE`), swap the
    /// connection in, and wake every local waiter (wake-ups sent to the old master are lost).
    async fn follow(&self) {
        let addr = match self.resolve().await {
            Ok(addr) => addr,
            Err(e) => {
                tracing::debug!(sentinels = %self.url.describe(), error = %e, "keyward: cannot resolve the master");
                return;
            }
        };
        if *self.current.lock().unwrap_or_else(|e| e.into_inner()) == addr {
            return;
        }
        let data_url = self.url.data_url(&addr.0, addr.1);
        match open(
            &data_url,
            &self.options,
            &self.ns,
            Arc::clone(&self.bus),
            true,
        )
        .await
        {
            Ok(opened) => {
                *self.slot.write().unwrap_or_else(|e| e.into_inner()) =
                    super::Conn::Single(opened.conn);
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = addr;
                // The breaker counted the old master's failures; the new one just answered the probe.
                self.breaker.success();
                tracing::info!(sentinels = %self.url.describe(), master = %opened.server, "keyward: following the new master");
                metrics::counter!("keyward_sentinel_switches_total").increment(1);
                self.bus.wake_all();
            }
            Err(e) => {
                tracing::warn!(sentinels = %self.url.describe(), error = %e, "keyward: the master the sentinels name is not usable yet");
            }
        }
    }
}

/// Run the follower until the returned tasks are aborted: the resolver loop, plus a subscriber to
/// `+switch-master` that triggers it.
pub(crate) fn spawn(follower: &Arc<Follower>) -> Vec<tokio::task::JoinHandle<()>> {
    let subscriber = tokio::spawn(subscribe(Arc::clone(follower)));
    let follower = Arc::clone(follower);
    let resolver = tokio::spawn(async move {
        loop {
            let _ = tokio::time::timeout(POLL_EVERY, follower.resolve.notified()).await;
            follower.follow().await;
            tokio::time::sleep(RESOLVE_EVERY).await;
        }
    });
    vec![subscriber, resolver]
}

/// Stay subscribed to `+switch-master` on one sentinel after another; each announcement for our master (and
/// each new subscription, which may have missed one) triggers a resolution.
async fn subscribe(follower: Arc<Follower>) {
    loop {
        for (host, port) in &follower.url.sentinels {
            let Ok(client) = sentinel_client(host, *port) else {
                continue;
            };
            let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(RESOLVE_EVERY * 4, client.get_async_pubsub()).await
            else {
                continue;
            };
            let subscribed =
                tokio::time::timeout(RESOLVE_EVERY * 4, pubsub.subscribe("+switch-master")).await;
            if !matches!(subscribed, Ok(Ok(()))) {
                continue;
            }
            follower.trigger();
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                // `<master name> <old ip> <old port> <new ip> <new port>`
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload.split(' ').next() == Some(follower.url.master.as_str()) {
                    tracing::info!(master = %follower.url.master, announcement = %payload, "keyward: sentinel announced a new master");
                    follower.trigger();
                }
            }
        }
        tokio::time::sleep(RESOLVE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_urls() {
        let u = SentinelUrl::parse("redis+sentinel://a:1,b:2,[::1]:3,c/mymaster").unwrap();
        assert_eq!(
            u.sentinels,
            vec![
                ("a".to_owned(), 1),
                ("b".to_owned(), 2),
                ("::1".to_owned(), 3),
                ("c".to_owned(), 26379)
            ]
        );
        assert_eq!(u.master, "mymaster");
        assert_eq!(u.data_url("10.0.0.1", 6379), "redis://10.0.0.1:6379");
        let u = SentinelUrl::parse("redis+sentinel://app:p%40ss@h:26379/m").unwrap();
        assert_eq!(u.data_url("::1", 7000), "redis://app:p%40ss@[::1]:7000");
    }

    #[test]
    fn bad_sentinel_urls_are_typed_and_redacted() {
        for url in [
            "redis+sentinel://app:s3cretPW@h:1",
            "redis+sentinel://app:s3cretPW@h:1/",
            "redis+sentinel://app:s3cretPW@h:1,/m",
            "redis+sentinel://app:s3cretPW@h:x/m",
            "redis+sentinel://app:s3cretPW@h:0/m",
            "redis+sentinel://app:s3cretPW@h:1/m/0",
            "redis+sentinel://app:s3cretPW@h:1/m?x=1",
            "redis+sentinel://app:s3cretPW@[::1/m",
            "rediss+sentinel://app:s3cretPW@h:1/m",
        ] {
            match SentinelUrl::parse(url) {
                Err(Error::InvalidUrl { reason }) => {
                    assert!(!reason.contains("s3cretPW"), "{url}: {reason}");
                }
                other => panic!("{url}: {:?}", other.map(|u| u.master)),
            }
        }
    }
}
