//! Redis behind Sentinel: the `redis+sentinel://` and `rediss+sentinel://` URLs, finding the master through the
//! sentinels, and following a failover.
//!
//! The one decision: keyward resolves the master itself instead of using redis-rs's sentinel client, which
//! resolves only at connect time. A background task keeps the connection on the current master: it re-resolves
//! when a sentinel announces `+switch-master`, when a call finds the master unavailable or read-only (at most
//! once per [`RESOLVE_EVERY`]), and every [`POLL_EVERY`] in case both were missed. A new master is used only
//! after it says `master` to `ROLE`; then the connection is swapped and every local waiter is woken.
//!
//! A call whose connection attempt the old master's port refused was never sent, so it is not lost yet: the
//! follower asks the sentinels at once ([`Follower::recheck`], one resolution for every call refused at the
//! same time) and, when they name another master, the call is sent there once, inside the same response
//! timeout. An idle handle that missed `+switch-master` thus does not fail its first call after a failover
//! while its poll is still up to [`POLL_EVERY`] away.
//!
//! URL shape: `redis[s]+sentinel://[user:pass@]host:port[,host:port…]/master-name[?sentinel_username=…&
//! sentinel_password=…]`. The user-info is the **data nodes'** credentials; the sentinels' own (`requirepass`
//! or an ACL user on the sentinels) are the query parameters, because the two are configured apart in Redis
//! and usually differ. `rediss+sentinel://` speaks TLS to the sentinels and to the data nodes alike, with the
//! same CA and client certificate ([`ConnectOptions`]); the data nodes are dialled at the address the
//! sentinels announce, so their certificates must name that address (an IP unless the sentinels run with
//! `resolve-hostnames`/`announce-hostnames`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::Client;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use super::{Slot, client_for, open, redact, scrub};
use crate::backend::breaker::Breaker;
use crate::backend::wake::WakeBus;
use crate::backend::{ConnectOptions, Namespace};
use crate::error::{Error, Result};

/// The least time between two resolutions: failing calls ask for one each, the sentinels are asked at most
/// this often.
pub(crate) const RESOLVE_EVERY: Duration = Duration::from_millis(250);
/// How often the sentinels are asked even when nothing seems wrong (a missed `+switch-master`).
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(1);

/// The query parameter naming the sentinels' ACL user.
const SENTINEL_USERNAME: &str = "sentinel_username";
/// The query parameter holding the sentinels' password.
const SENTINEL_PASSWORD: &str = "sentinel_password";

/// A parsed `redis[s]+sentinel://…` URL, with one client per sentinel. It holds credentials, so it has no
/// `Debug`; [`SentinelUrl::describe`] is what messages show.
#[derive(Clone)]
pub(crate) struct SentinelUrl {
    /// The sentinels, in the URL's order (`host`, `port`).
    pub(crate) sentinels: Vec<(String, u16)>,
    /// The master's name as the sentinels know it.
    pub(crate) master: String,
    /// The user-info part exactly as written (still percent-encoded): the data nodes' credentials.
    userinfo: Option<String>,
    /// `rediss+sentinel://`: TLS to the sentinels and to the data nodes.
    tls: bool,
    /// One client per sentinel (same order as `sentinels`), carrying the sentinels' credentials and the TLS
    /// material; built once, so the certificate files are read at connect only.
    clients: Vec<Client>,
    /// Everything that may be a secret (the URL as written and the decoded sentinel credentials), masked by
    /// [`SentinelUrl::scrub`].
    raw: String,
    decoded_secrets: Vec<String>,
}

/// Whether `url` names Redis behind Sentinel (`redis+sentinel://` or `rediss+sentinel://`).
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

impl SentinelUrl {
    /// Parse a sentinel URL (the sentinel port defaults to 26379) and build a client per sentinel with the
    /// sentinels' credentials and `options`' TLS material. Nothing is connected yet.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] naming what is wrong, with the credentials redacted; [`Error::InvalidArgument`]
    /// for unreadable TLS material (naming the file or option).
    pub(crate) fn parse(url: &str, options: &ConnectOptions) -> Result<Self> {
        let invalid = |detail: &str| Error::InvalidUrl {
            reason: scrub(url, &format!("{}: {detail}", redact(url))),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else {
            return Err(invalid(
                "a Sentinel URL starts with `redis+sentinel://` (or `rediss+sentinel://` for TLS)",
            ));
        };
        if !tls && options.has_tls_material() {
            return Err(invalid(
                "a TLS CA or client certificate is set (ConnectOptions::tls_ca_* / tls_client_cert_*), which \
                 needs a TLS URL: use `rediss+sentinel://`",
            ));
        }
        let (userinfo, rest) = match rest.rfind('@') {
            Some(at) => (Some(rest[..at].to_owned()), &rest[at + 1..]),
            None => (None, rest),
        };
        if rest.contains('#') {
            return Err(invalid("a Sentinel URL takes no fragment (`#…`)"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
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
        let (username, password) =
            parse_query(query.unwrap_or_default()).map_err(|d| invalid(&d))?;
        let auth = match (&username, &password) {
            (None, None) => String::new(),
            (Some(_), None) => {
                return Err(invalid(&format!(
                    "`{SENTINEL_USERNAME}` needs `{SENTINEL_PASSWORD}` too"
                )));
            }
            (user, Some(password)) => format!(
                "{}:{}@",
                encode(user.as_deref().unwrap_or_default()),
                encode(password)
            ),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        let mut clients = Vec::with_capacity(sentinels.len());
        for (host, port) in &sentinels {
            let sentinel_url = format!("{scheme}://{auth}{}:{port}", bracket(host));
            let (client, _) = client_for(&sentinel_url, options).map_err(|e| match e {
                Error::InvalidUrl { reason } => {
                    invalid(&format!("sentinel {host}:{port}: {reason}"))
                }
                other => other,
            })?;
            clients.push(client);
        }
        Ok(Self {
            sentinels,
            master: master.to_owned(),
            userinfo,
            tls,
            clients,
            raw: url.to_owned(),
            decoded_secrets: [username, password]
                .into_iter()
                .flatten()
                .filter(|s| s.len() >= 3)
                .collect(),
        })
    }

    /// The URL of a data node at `host:port`, carrying the URL's credentials (`rediss://` over TLS).
    pub(crate) fn data_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = bracket(host);
        match &self.userinfo {
            Some(u) => format!("{scheme}://{u}@{host}:{port}"),
            None => format!("{scheme}://{host}:{port}"),
        }
    }

    /// The sentinels, for messages: `sentinel <master> via host:port,host:port` (`tls://host:port` over TLS).
    pub(crate) fn describe(&self) -> String {
        let prefix = if self.tls { "tls://" } else { "" };
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| format!("{prefix}{}:{p}", bracket(h)))
            .collect();
        format!("sentinel {} via {}", self.master, hosts.join(","))
    }

    /// `message` with every credential of the URL masked (a sentinel or a data node may quote what it was
    /// given).
    fn scrub(&self, message: &str) -> String {
        let mut out = scrub(&self.raw, message);
        for secret in &self.decoded_secrets {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }
}

/// `[v6]` for an IPv6 address, the host itself otherwise.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The sentinel credentials from the query (`sentinel_username`, `sentinel_password`), percent-decoded.
/// Messages name parameters, never values.
fn parse_query(query: &str) -> std::result::Result<(Option<String>, Option<String>), String> {
    let mut username = None;
    let mut password = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            SENTINEL_USERNAME => &mut username,
            SENTINEL_PASSWORD => &mut password,
            _ => {
                // Not named: an unencoded `&` in a password makes its tail look like a parameter.
                return Err(format!(
                    "an unknown query parameter: a Sentinel URL takes only `{SENTINEL_USERNAME}` and \
                     `{SENTINEL_PASSWORD}` (the sentinels' credentials; the data nodes' go before the `@`); \
                     percent-encode `&`, `=`, `@` and `#` in passwords (`%26`, `%3D`, `%40`, `%23`)"
                ));
            }
        };
        if slot.is_some() {
            return Err(format!("`{key}` is given twice"));
        }
        let value = decode(value).ok_or_else(|| {
            format!("`{key}` is not valid percent-encoding (e.g. `@` as `%40`, `&` as `%26`)")
        })?;
        if value.is_empty() {
            return Err(format!("`{key}` is empty"));
        }
        *slot = Some(value);
    }
    Ok((username, password))
}

/// Percent-decode `text` (`%XX` to its byte; `+` stays `+`); `None` if malformed or not UTF-8.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode everything but RFC 3986's unreserved characters, for a URL's user-info.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// Ask each sentinel in turn for the master's address, each bounded by `per_sentinel`: the first answer wins.
///
/// # Errors
/// A text saying what each sentinel answered, when none named the master (credentials masked).
pub(crate) async fn ask_sentinels(
    url: &SentinelUrl,
    per_sentinel: Duration,
) -> std::result::Result<((String, u16), MultiplexedConnection), String> {
    let mut failures = Vec::new();
    for ((host, port), client) in url.sentinels.iter().zip(&url.clients) {
        let attempt = async {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let addr = master_addr(&mut conn, &url.master).await?;
            Ok::<_, String>((addr, conn))
        };
        let host = bracket(host);
        match tokio::time::timeout(per_sentinel, attempt).await {
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(e)) => failures.push(format!("{host}:{port} {e}")),
            Err(_) => failures.push(format!(
                "{host}:{port} gave no answer within {per_sentinel:?}"
            )),
        }
    }
    let hint = if failures.iter().any(|f| f.contains("NOAUTH")) {
        " (the sentinels require credentials: `?sentinel_password=…`, with `&sentinel_username=…` for an \
         ACL user)"
    } else {
        ""
    };
    Err(url.scrub(&format!(
        "no sentinel named the master: {}{hint}",
        failures.join("; ")
    )))
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
    /// How many times the slot was swapped to a new master: a call that saw one generation and failed knows
    /// whether the connection changed since.
    generation: AtomicU64,
    /// Held while the sentinels are asked and the connection maybe swapped (one resolution at a time); holds
    /// when the last resolution started, so calls refused together share one ([`Follower::recheck`]).
    resolving: tokio::sync::Mutex<Option<Instant>>,
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
            generation: AtomicU64::new(0),
            resolving: tokio::sync::Mutex::new(None),
            options,
            ns,
            bus,
        }
    }

    /// The master the shared connection is on now (`host`, `port`).
    pub(crate) fn current_master(&self) -> (String, u16) {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The options the handle connected with.
    pub(crate) fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// Ask for a re-resolution (cheap; coalesced).
    pub(crate) fn trigger(&self) {
        self.resolve.notify_one();
    }

    /// How many times the connection was swapped to a new master so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A call that started at `started`, on the connection of generation `seen`, was refused by the master's
    /// port (never sent): make sure the sentinels were asked since it started — by this call, or by a
    /// resolution that started after it, whose outcome it waits for — and say whether the connection is now
    /// another one (then the call may be sent again on it).
    ///
    /// Not rate-limited by [`RESOLVE_EVERY`]: every call refused at the same time shares one resolution, and a
    /// later refusal is new information. Cancel-safe: dropped mid-way (the caller's response timeout), the
    /// connection is either swapped whole or not at all.
    pub(crate) async fn recheck(&self, started: Instant, seen: u64) -> bool {
        if self.generation() != seen {
            return true;
        }
        let mut last = self.resolving.lock().await;
        if last.is_none_or(|at| at < started) {
            *last = Some(Instant::now());
            self.follow_locked().await;
        }
        self.generation() != seen
    }

    /// A call that started on the connection of generation `seen` was refused by the circuit breaker (never
    /// sent): wait for the resolution under way, if one is (it asks nothing itself: a breaker that stays open
    /// through an outage must not turn every refused call into a question to the sentinels), and say whether
    /// the connection is now another one.
    pub(crate) async fn settled(&self, seen: u64) -> bool {
        if self.generation() != seen {
            return true;
        }
        drop(self.resolving.lock().await);
        self.generation() != seen
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
        let mut last = self.resolving.lock().await;
        *last = Some(Instant::now());
        self.follow_locked().await;
    }

    /// [`follow`](Self::follow), with `resolving` held by the caller.
    async fn follow_locked(&self) {
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
                self.generation.fetch_add(1, Ordering::AcqRel);
                // The breaker counted the old master's failures; the new one just answered the probe.
                self.breaker.success();
                tracing::info!(sentinels = %self.url.describe(), master = %opened.server, "keyward: following the new master");
                metrics::counter!("keyward_sentinel_switches_total").increment(1);
                self.bus.wake_all();
            }
            Err(e) => {
                let error = self.url.scrub(&e.to_string());
                tracing::warn!(sentinels = %self.url.describe(), %error, "keyward: the master the sentinels name is not usable yet");
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
        for ((host, port), client) in follower.url.sentinels.iter().zip(&follower.url.clients) {
            let subscribed = tokio::time::timeout(RESOLVE_EVERY * 4, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            let pubsub = match subscribed {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    // E.g. an ACL user without `&*` (Redis 7 gives new users no channel): the follower
                    // still polls every POLL_EVERY.
                    let error = match failed {
                        Ok(Err(e)) => follower.url.scrub(&e.to_string()),
                        _ => format!("no answer within {:?}", RESOLVE_EVERY * 4),
                    };
                    tracing::debug!(sentinel = %format!("{}:{port}", bracket(host)), %error, "keyward: cannot subscribe to +switch-master");
                    continue;
                }
            };
            follower.trigger();
            let mut messages = pubsub.into_on_message();
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

    fn parse(url: &str) -> Result<SentinelUrl> {
        SentinelUrl::parse(url, &ConnectOptions::default())
    }

    #[test]
    fn parses_sentinel_urls() {
        let u = parse("redis+sentinel://a:1,b:2,[::1]:3,c/mymaster").unwrap();
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
        assert_eq!(u.clients.len(), 4);
        assert_eq!(u.data_url("10.0.0.1", 6379), "redis://10.0.0.1:6379");
        assert_eq!(
            u.describe(),
            "sentinel mymaster via a:1,b:2,[::1]:3,c:26379"
        );
        let u = parse("redis+sentinel://app:p%40ss@h:26379/m").unwrap();
        assert_eq!(u.data_url("::1", 7000), "redis://app:p%40ss@[::1]:7000");
    }

    #[test]
    fn tls_sentinel_urls_use_tls_for_data_nodes_and_sentinels() {
        let u = parse("rediss+sentinel://app:pw@h:26379,k:1/m").unwrap();
        assert_eq!(
            u.data_url("10.0.0.1", 6379),
            "rediss://app:pw@10.0.0.1:6379"
        );
        assert_eq!(u.describe(), "sentinel m via tls://h:26379,tls://k:1");
        for client in &u.clients {
            assert!(
                matches!(
                    client.get_connection_info().addr(),
                    redis::ConnectionAddr::TcpTls { .. }
                ),
                "{:?}",
                client.get_connection_info().addr()
            );
        }
    }

    #[test]
    fn sentinel_credentials_come_from_the_query_and_reach_only_the_sentinels() {
        let u = parse(
            "redis+sentinel://app:dataPW1@h:1/m?sentinel_username=sentinel-admin&sentinel_password=s%40nt%26PW9",
        )
        .unwrap();
        let redis = u.clients[0].get_connection_info().redis_settings();
        assert_eq!(redis.username(), Some("sentinel-admin"));
        assert_eq!(redis.password(), Some("s@nt&PW9"));
        assert_eq!(u.data_url("10.0.0.1", 1), "redis://app:dataPW1@10.0.0.1:1");
        // A password alone authenticates as the sentinels' default user (`requirepass`).
        let u = parse("redis+sentinel://h:1/m?sentinel_password=pw%2Fwith%3Aodd%20chars").unwrap();
        let redis = u.clients[0].get_connection_info().redis_settings();
        assert_eq!(redis.username(), None);
        assert_eq!(redis.password(), Some("pw/with:odd chars"));
        assert_eq!(u.data_url("10.0.0.1", 1), "redis://10.0.0.1:1");
        let masked = u.scrub("said pw/with:odd chars and pw%2Fwith%3Aodd%20chars");
        assert!(!masked.contains("odd"), "{masked}");
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
            "redis+sentinel://app:s3cretPW@h:1/m#frag",
            "redis+sentinel://app:s3cretPW@[::1/m",
            "redis+sentinel://h:1/m?sentinel_username=s3cretPW",
            "redis+sentinel://h:1/m?sentinel_password=s3cretPW%zz",
            "redis+sentinel://h:1/m?sentinel_password=s3cretPW&sentinel_password=s3cretPW",
            "redis+sentinel://h:1/m?sentinel_password=",
            "rediss+sentinel://app:s3cretPW@h:1",
            "sentinel://app:s3cretPW@h:1/m",
        ] {
            match parse(url) {
                Err(Error::InvalidUrl { reason }) => {
                    assert!(!reason.contains("s3cretPW"), "{url}: {reason}");
                }
                other => panic!("{url}: {:?}", other.map(|u| u.master)),
            }
        }
    }

    #[test]
    fn tls_options_need_a_tls_sentinel_url() {
        let options = ConnectOptions::default().tls_ca_pem("-----BEGIN CERTIFICATE-----");
        match SentinelUrl::parse("redis+sentinel://h:1/m", &options) {
            Err(Error::InvalidUrl { reason }) => {
                assert!(reason.contains("rediss+sentinel://"), "{reason}");
            }
            other => panic!("{:?}", other.map(|u| u.master)),
        }
    }
}
