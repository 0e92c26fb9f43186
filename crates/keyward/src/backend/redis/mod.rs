//! The Redis connection: script calls and pipelines (the capabilities' own, see `backend::script`), `SCAN`,
//! `PING`, wake-up subscriptions, and the one place every call is bounded by the response timeout and admitted by
//! a circuit breaker ([`RedisBackend::call`]).
//!
//! Three topologies, one connection type ([`Conn`]):
//! - a standalone server (TCP, TLS, unix socket): one multiplexed, auto-reconnecting connection
//!   (`ConnectionManager`) carries every command of the process; concurrent calls are pipelined on it. It speaks
//!   RESP3 so that the fill wake-up subscription rides the same connection as push messages, and is
//!   re-subscribed automatically after a reconnect;
//! - a master behind Sentinel (`redis+sentinel://`, see [`sentinel`]): the same, in a swappable slot that the
//!   failover follower replaces when the master moves; every call takes the current one (one uncontended read
//!   lock and a clone);
//! - Redis Cluster (`redis+cluster://`, see [`cluster`]): redis-rs's async cluster client, one breaker per
//!   primary, sharded wake-ups subscribed while someone waits, and the group epochs read from a bounded view.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ProtocolVersion, PushInfo, PushKind,
    RedisError, RedisFuture, Value,
};

pub(crate) mod cluster;
pub(crate) mod dedicated;
pub(crate) mod failure;
mod sentinel;

use super::ConnectOptions;
use super::breaker::{Admit, Breaker, BreakerState};
use super::{Call, KeyTtl, Namespace, Pipeline, Reply, Undo, is_unavailable};
use crate::backend::wake::WakeBus;
use crate::error::{Error, Result};

/// The oldest server keyward runs on: `SET … NX GET` (get-or-lease in one command) arrived in 7.0.
const MIN_REDIS_MAJOR: u32 = 7;

/// The connection every call uses; replaced only when a Sentinel failover moves the master.
pub(crate) type Slot = std::sync::RwLock<Conn>;

/// A multiplexed connection: to one server, or to a cluster (which routes each command by its first key).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub(crate) struct RedisBackend {
    conn: Arc<Slot>,
    /// Behind Sentinel: the failover follower, asked to re-resolve when a call finds the master unavailable
    /// or read-only.
    follower: Option<Arc<sentinel::Follower>>,
    /// On Cluster: the slot map, the per-primary breakers, the epoch view and the watched shard channels.
    cluster: Option<Arc<cluster::ClusterState>>,
    /// The follower's tasks, aborted on drop.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    server: String,
    response_timeout: Duration,
    /// One breaker for every capability of this handle (see [`RedisBackend::call`]); shared with the failover
    /// follower, which closes it when it switches to a verified new master. On Cluster, each primary has its
    /// own and this one admits only calls without a key (`PING`).
    breaker: Arc<Breaker>,
    /// Local wake-ups, woken all at once when the breaker opens.
    bus: Arc<WakeBus>,
    /// The server's `maxmemory-policy` at connect (from `INFO memory`), if it reported one.
    maxmemory_policy: Option<String>,
    /// How to open connections of their own (typed channels' subscriptions).
    dial: Arc<dedicated::Dial>,
    /// The typed channels' subscriptions, on a dedicated connection opened at the first `subscribe`.
    channels: std::sync::OnceLock<Arc<super::channels::RedisHub>>,
}

/// `host:port`, `tls://host:port` or `unix:/path` — never credentials.
pub(crate) fn describe(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("{}:{port}", bracketed(host)),
        ConnectionAddr::TcpTls { host, port, .. } => format!("tls://{}:{port}", bracketed(host)),
        ConnectionAddr::Unix(path) => format!("unix:{}", path.display()),
        other => format!("{other:?}"),
    }
}

/// `[::1]` for an IPv6 address (so `[::1]:7000` reads as host and port), the host itself otherwise.
fn bracketed(host: &str) -> std::borrow::Cow<'_, str> {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]").into()
    } else {
        host.into()
    }
}

/// A URL with its credentials removed, for messages: the user-info part (everything between `://` and the
/// *last* `@`, since an unencoded password may hold `/`, `:`, `?` or `@`) becomes `***`, and any query or
/// fragment (`?password=…`) is dropped.
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = split_scheme(url);
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        // An `@` after a `?` may be inside a query value (a sentinel password with an unencoded `@`): what
        // follows it cannot be told apart from a secret, so nothing is shown.
        Some(at) if rest[..at].contains(['?', '#']) => {
            out.push_str("***…");
            return out;
        }
        Some(at) => {
            out.push_str("***@");
            &rest[at + 1..]
        }
        None => rest,
    };
    match rest.find(['?', '#']) {
        Some(q) => {
            out.push_str(&rest[..q]);
            out.push_str(if rest[q..].starts_with('#') {
                "#…"
            } else {
                "?…"
            });
        }
        None => out.push_str(rest),
    }
    out
}

/// `(scheme, rest)` when `url` starts with a scheme (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`)
/// and `://`; otherwise no scheme. A `://` further on (say, inside a password) is not a scheme separator.
fn split_scheme(url: &str) -> (Option<&str>, &str) {
    match url.split_once("://") {
        Some((scheme, rest))
            if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            (Some(scheme), rest)
        }
        _ => (None, url),
    }
}

/// The parts of `url` that may be secrets: the user-info (and its password half) and query values.
fn secrets(url: &str) -> Vec<&str> {
    let rest = split_scheme(url).1;
    let mut out = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        out.push(userinfo);
        if let Some((_, password)) = userinfo.split_once(':') {
            out.push(password);
        }
    }
    if let Some(q) = rest.find('?') {
        out.extend(
            rest[q + 1..]
                .split(['&', '#'])
                .filter_map(|kv| kv.split_once('=').map(|(_, v)| v)),
        );
    }
    out.retain(|s| s.len() >= 3);
    out
}

/// `message` with every possible secret of `url` masked: a last line of defence for client error texts
/// that might quote the URL.
pub(crate) fn scrub(url: &str, message: &str) -> String {
    let mut out = message.to_owned();
    for secret in secrets(url) {
        out = out.replace(secret, "***");
    }
    out
}

/// Why redis-rs refused `url`, naming the part that is wrong (`detail` is redis-rs's word, when it has one);
/// never quotes the user-info. When the URL without its user-info parses, the credentials are what breaks it:
/// then (only) the answer says how to percent-encode them.
fn why_not_a_redis_url(url: &str, detail: Option<&str>) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some(at) = rest.rfind('@')
    {
        let bare = format!("{scheme}://{}", &rest[at + 1..]);
        return match Client::open(bare.as_str()) {
            Ok(_) => format!(
                "{} (percent-encode special characters in the user name and password, e.g. `/` as `%2F`, \
                 `@` as `%40`, `:` as `%3A`)",
                detail.unwrap_or("the user name or password breaks the URL")
            ),
            Err(e) => why_not_a_redis_url(&bare, e.detail()),
        };
    }
    match url::Url::parse(url) {
        // "invalid port number", "empty host", "relative URL without a base", …
        Err(e) => e.to_string(),
        Ok(parsed) => match parsed.scheme() {
            "redis" | "rediss" | "redis+unix" | "unix" | "valkey" | "valkeys" | "valkey+unix" => {
                let db = parsed.path().trim_start_matches('/');
                if !db.is_empty() && db.parse::<i64>().is_err() {
                    format!(
                        "the path `/{db}` is not a database number (e.g. `redis://host:6379/0`)"
                    )
                } else {
                    detail.unwrap_or("not a Redis URL").to_owned()
                }
            }
            other => format!(
                "the scheme `{other}://` is not a Redis one: use `redis://`, `rediss://` (TLS) or \
                 `redis+unix://`"
            ),
        },
    }
}

/// A connection opened by [`open`].
pub(crate) struct Opened {
    pub(crate) conn: ConnectionManager,
    /// `host:port` (never credentials).
    pub(crate) server: String,
    pub(crate) maxmemory_policy: Option<String>,
}

/// The client for the standalone server at `url` (TLS material from `options` applied, RESP3), and the
/// server's address for messages (never credentials).
fn client_for(url: &str, options: &ConnectOptions) -> Result<(Client, String)> {
    let invalid = |detail: &str| Error::InvalidUrl {
        reason: scrub(url, &format!("{}: {detail}", redact(url))),
    };
    let client = Client::open(url).map_err(|e| invalid(&why_not_a_redis_url(url, e.detail())))?;
    let mut info = client.get_connection_info().clone();
    if info.redis_settings().username().is_some() && info.redis_settings().password().is_none() {
        // redis-rs would send no AUTH at all and log in as `default`: the intended ACL user silently bypassed.
        return Err(invalid(
            "a user name without a password: ACL users log in with both (`redis://user:password@host`)",
        ));
    }
    if let ConnectionAddr::TcpTls {
        host,
        port,
        insecure,
        tls_params,
    } = info.addr().clone()
    {
        if insecure && !options.danger_accept_invalid_certs {
            return Err(invalid(
                "the `#insecure` fragment turns off TLS certificate verification; keyward does that only \
                 through the explicit ConnectOptions::danger_accept_invalid_certs()",
            ));
        }
        if options.danger_accept_invalid_certs {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    server = %format!("{host}:{port}"),
                    "keyward: TLS certificate verification is OFF (ConnectOptions::danger_accept_invalid_certs); \
                     anyone on the network path can impersonate Redis"
                );
            });
            info = info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params,
            });
        }
        // redis-rs enables rustls without a crypto provider; install ring's unless the app chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    } else if options.has_tls_material() {
        return Err(invalid(
            "a TLS CA or client certificate is set (ConnectOptions::tls_ca_* / tls_client_cert_*), which \
                 needs a TLS URL: use `rediss://`",
        ));
    }
    let server = describe(info.addr());
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    // One client for the probe and the connection: both present the client certificate and trust only the
    // given CA.
    let client = match options.tls_certificates()? {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
    .map_err(|e| invalid(e.detail().unwrap_or("not a Redis URL")))?;
    Ok((client, server))
}

/// `reason` for a connect that got no answer in time, with what one look at the port tells when the URL is
/// `rediss://`. A plain-text Redis port never answers a TLS handshake (it waits for a command line), so a
/// `rediss://` URL against one only times out: a plain TCP connection sending `PING` tells that case apart
/// (it gets `+PONG` or an `-ERR`/`-NOAUTH` line) from a port that accepts and stays silent (a slow TLS
/// server, say) and from one whose connection is never accepted (a host or firewall dropping packets). The
/// look takes at most `min(connect_timeout, 1 s)` and sends no credentials; the text holds none either.
/// (The `keyward` CLI's own connections use it too, through `keyward::__cli`.)
pub async fn unanswered(
    addr: &ConnectionAddr,
    reason: String,
    connect_timeout: Duration,
) -> String {
    let ConnectionAddr::TcpTls { host, port, .. } = addr else {
        return reason;
    };
    let wait = connect_timeout.min(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + wait;
    let tcp = tokio::time::timeout_at(
        deadline,
        tokio::net::TcpStream::connect((host.as_str(), *port)),
    )
    .await;
    let Ok(Ok(mut tcp)) = tcp else {
        return format!(
            "{reason} (no TCP connection to the port within {wait:?} either: is the host reachable and the \
             port open, or does a firewall drop the packets?)"
        );
    };
    let plain_text = tokio::time::timeout_at(deadline, async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut first = [0u8; 1];
        tcp.write_all(b"PING\r\n").await.is_ok()
            && matches!(tcp.read(&mut first).await, Ok(1))
            && matches!(first[0], b'+' | b'-')
    })
    .await
    .unwrap_or(false);
    if plain_text {
        format!(
            "{reason} (the TLS handshake got no answer, but the port answers plain-text Redis: does this \
             port speak TLS? use redis:// for it, or the server's TLS port)"
        )
    } else {
        format!(
            "{reason} (the port accepts TCP connections but answered neither the TLS handshake nor a \
             plain-text PING: a slow or overloaded server?)"
        )
    }
}

/// One direct connection to `client`'s server: it reports the real reason (refused, auth, TLS) instead of
/// retrying, checks the server version, with `must_be_master` that `ROLE` says `master`, and unless
/// `cluster_node` that it is not a cluster node (a plain URL given for one). Returns the server's
/// `maxmemory-policy`.
async fn probe(
    client: &Client,
    options: &ConnectOptions,
    must_be_master: bool,
    cluster_node: bool,
) -> std::result::Result<Option<String>, String> {
    let probe_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.connect_timeout));
    let connected = tokio::time::timeout(
        options.connect_timeout,
        client.get_multiplexed_async_connection_with_config(&probe_config),
    )
    .await;
    let opened = match connected {
        Ok(Ok(probe)) => Ok(probe),
        Ok(Err(e)) if !e.is_timeout() => Err(e.to_string()),
        Ok(Err(e)) => Err(unanswered(
            client.get_connection_info().addr(),
            e.to_string(),
            options.connect_timeout,
        )
        .await),
        Err(_) => Err(unanswered(
            client.get_connection_info().addr(),
            format!("no answer within {:?}", options.connect_timeout),
            options.connect_timeout,
        )
        .await),
    };
    let mut probe = opened?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .arg("memory")
        .arg("cluster")
        .query_async(&mut probe)
        .await
        .map_err(|e| e.to_string())?;
    check_version(&info)?;
    if !cluster_node && info_field(&info, "cluster_enabled") == Some("1") {
        return Err(
            "this server is a Redis Cluster node: connect with `redis+cluster://host:port[,host:port…]` \
             (a plain connection would fail on every key of another node's slots)"
                .to_owned(),
        );
    }
    let maxmemory_policy = info_field(&info, "maxmemory_policy").map(str::to_owned);
    if must_be_master {
        let role: Vec<Value> = redis::cmd("ROLE")
            .query_async(&mut probe)
            .await
            .map_err(|e| e.to_string())?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => {}
            Some(Value::SimpleString(r)) if r == "master" => {}
            other => {
                return Err(format!(
                    "the sentinels name this server as the master, but ROLE says {other:?}"
                ));
            }
        }
    }
    Ok(maxmemory_policy)
}

/// Open the connection manager to the standalone server at `url`, subscribed to `ns`'s wake-up channel, after
/// one direct [`probe`].
pub(crate) async fn open(
    url: &str,
    options: &ConnectOptions,
    ns: &Namespace,
    bus: Arc<WakeBus>,
    must_be_master: bool,
) -> Result<Opened> {
    let (client, server) = client_for(url, options)?;
    let connect_err = |reason: String| Error::Connect {
        server: server.clone(),
        reason,
    };
    let maxmemory_policy = probe(&client, options, must_be_master, false)
        .await
        .map_err(connect_err)?;

    let wake = bus;
    let backplane = ns.backplane.clone();
    let on_push = move |push: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
        match push.kind {
            // Messages may have been missed while disconnected: every waiter re-checks, and the in-process
            // tier drops what it can no longer vouch for.
            PushKind::Disconnection => {
                wake.wake_all();
                wake.backplane_push(super::wake::Push::Disconnected);
            }
            PushKind::Message => match (push.data.first(), push.data.get(1)) {
                (Some(Value::BulkString(channel)), Some(Value::BulkString(payload)))
                    if channel == backplane.as_bytes() =>
                {
                    wake.backplane_push(super::wake::Push::Message(bytes::Bytes::copy_from_slice(
                        payload,
                    )));
                }
                (_, Some(Value::BulkString(key))) => {
                    if let Ok(key) = std::str::from_utf8(key) {
                        wake.wake(key);
                    }
                }
                _ => {}
            },
            _ => {}
        }
        Ok(())
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout))
        // Behind Sentinel (`must_be_master`), one retry of the old address: a master that is gone is found
        // again by the follower, and a call that waited on retries against a dead port would time out,
        // where a quick refusal is resent to the new master (`Backend::call_resending`). One, not none: the
        // first attempt, made the moment the connection drops, can reach a dying server's listener and be
        // reset, which a call cannot tell from a reset after its command was sent (never resent); the
        // retry, 250 ms later, finds the port closed.
        .set_number_of_retries(if must_be_master {
            1
        } else {
            options.reconnect_retries
        })
        // Short backoff: a restarted server is found within a few hundred ms. Callers never wait for it
        // (every call is cut at the response timeout), so a short delay costs only a few connect attempts.
        .set_max_delay(Duration::from_millis(250))
        .set_push_sender(on_push)
        .set_automatic_resubscription();
    let mut conn = tokio::time::timeout(
        options.connect_timeout,
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| connect_err(format!("no answer within {:?}", options.connect_timeout)))?
    .map_err(|e| connect_err(e.to_string()))?;
    tokio::time::timeout(options.connect_timeout, conn.subscribe(&ns.channel))
        .await
        .map_err(|_| connect_err(format!("no answer within {:?}", options.connect_timeout)))?
        .map_err(|e| {
            connect_err(format!(
                "cannot subscribe to the wake-up channel `{}`: {e}",
                ns.channel
            ))
        })?;
    tokio::time::timeout(options.connect_timeout, conn.subscribe(&ns.backplane))
        .await
        .map_err(|_| connect_err(format!("no answer within {:?}", options.connect_timeout)))?
        .map_err(|e| {
            connect_err(format!(
                "cannot subscribe to the backplane channel `{}`: {e}",
                ns.backplane
            ))
        })?;
    Ok(Opened {
        conn,
        server,
        maxmemory_policy,
    })
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RedisBackend {
    /// Check, without connecting, everything about `url` and `options` that no retry could fix (the URL's
    /// form, TLS material); returns the server's description for messages (never credentials).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], or [`Error::InvalidArgument`] for TLS material.
    pub(crate) fn check_url(url: &str, options: &ConnectOptions) -> Result<String> {
        if cluster::is_cluster_url(url) {
            let seeds = cluster::seed_urls(url)?;
            if !url.starts_with("rediss+") && options.has_tls_material() {
                return Err(Error::InvalidUrl {
                    reason: scrub(
                        url,
                        &format!(
                            "{}: a TLS CA or client certificate is set, which needs a TLS URL: use \
                             `rediss+cluster://`",
                            redact(url)
                        ),
                    ),
                });
            }
            let nodes = seeds
                .iter()
                .map(|seed| client_for(seed, options).map(|(_, node)| node))
                .collect::<Result<Vec<_>>>()?;
            return Ok(format!("cluster {}", nodes.join(",")));
        }
        if sentinel::is_sentinel_url(url) {
            return Ok(sentinel::SentinelUrl::parse(url, options)?.describe());
        }
        client_for(url, options).map(|(_, server)| server)
    }

    /// Connect to `url`: a standalone server, or (`redis+sentinel://`) the master the sentinels name, followed
    /// across failovers.
    pub(crate) async fn connect(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: Arc<WakeBus>,
    ) -> Result<Self> {
        let breaker = Arc::new(Breaker::new(
            options.breaker_failures,
            options.breaker_cooldown,
        ));
        if cluster::is_cluster_url(url) {
            return Self::connect_cluster(url, options, ns, bus, breaker).await;
        }
        if !sentinel::is_sentinel_url(url) {
            let opened = open(url, options, ns, Arc::clone(&bus), false).await?;
            return Ok(Self {
                conn: Arc::new(Slot::new(Conn::Single(opened.conn))),
                follower: None,
                cluster: None,
                tasks: Vec::new(),
                server: opened.server,
                response_timeout: options.response_timeout,
                breaker,
                bus,
                maxmemory_policy: opened.maxmemory_policy,
                dial: Arc::new(dedicated::Dial::Single {
                    url: url.to_owned(),
                    options: options.clone(),
                }),
                channels: std::sync::OnceLock::new(),
            });
        }
        let parsed = sentinel::SentinelUrl::parse(url, options)?;
        let server = parsed.describe();
        let n = u32::try_from(parsed.sentinels.len())
            .unwrap_or(u32::MAX)
            .max(1);
        let per_sentinel = (options.connect_timeout / n).max(Duration::from_millis(100));
        let (addr, _) = sentinel::ask_sentinels(&parsed, per_sentinel)
            .await
            .map_err(|reason| Error::Connect {
                server: server.clone(),
                reason,
            })?;
        let opened = open(
            &parsed.data_url(&addr.0, addr.1),
            options,
            ns,
            Arc::clone(&bus),
            true,
        )
        .await
        .map_err(|e| match e {
            Error::Connect {
                server: master,
                reason,
            } => Error::Connect {
                server: server.clone(),
                reason: format!("master {master}: {reason}"),
            },
            other => other,
        })?;
        tracing::info!(sentinels = %server, master = %opened.server, "keyward: connected to the master the sentinels name");
        let conn = Arc::new(Slot::new(Conn::Single(opened.conn)));
        let follower = Arc::new(sentinel::Follower::new(
            parsed,
            Arc::clone(&conn),
            Arc::clone(&breaker),
            addr,
            options.clone(),
            ns.clone(),
            Arc::clone(&bus),
        ));
        let tasks = sentinel::spawn(&follower);
        Ok(Self {
            conn,
            dial: Arc::new(dedicated::Dial::Sentinel(Arc::clone(&follower))),
            follower: Some(follower),
            cluster: None,
            tasks,
            server,
            response_timeout: options.response_timeout,
            breaker,
            bus,
            maxmemory_policy: opened.maxmemory_policy,
            channels: std::sync::OnceLock::new(),
        })
    }

    /// Connect to a Redis Cluster: probe the seeds one by one (the real reason on failure, the version check),
    /// then open the cluster client, read the slot map and the group epochs, and subscribe to the epochs'
    /// sharded channel.
    async fn connect_cluster(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: Arc<WakeBus>,
        breaker: Arc<Breaker>,
    ) -> Result<Self> {
        let seeds = cluster::seed_urls(url)?;
        if !url.starts_with("rediss+") && options.has_tls_material() {
            return Err(Error::InvalidUrl {
                reason: scrub(
                    url,
                    &format!(
                        "{}: a TLS CA or client certificate is set (ConnectOptions::tls_ca_* / \
                         tls_client_cert_*), which needs a TLS URL: use `rediss+cluster://`",
                        redact(url)
                    ),
                ),
            });
        }
        let mut reasons = Vec::new();
        let mut probed = None;
        for seed in &seeds {
            // A seed's URL is keyward's rewrite of the one given: name the given one too.
            let (client, node) = client_for(seed, options).map_err(|e| match e {
                Error::InvalidUrl { reason } => Error::InvalidUrl {
                    reason: format!("{} (seed node {reason})", redact(url)),
                },
                other => other,
            })?;
            match probe(&client, options, false, true).await {
                Ok(policy) => {
                    probed = Some((node, policy));
                    break;
                }
                Err(reason) => reasons.push(format!("{node}: {reason}")),
            }
        }
        let describe_all = seeds
            .iter()
            .filter_map(|s| Client::open(s.as_str()).ok())
            .map(|c| describe(c.get_connection_info().addr()))
            .collect::<Vec<_>>()
            .join(",");
        let server = format!("cluster {describe_all}");
        let connect_err = |reason: String| Error::Connect {
            server: server.clone(),
            reason: scrub(url, &reason),
        };
        let Some((seed_node, maxmemory_policy)) = probed else {
            return Err(connect_err(format!(
                "no seed node answered: {}",
                reasons.join("; ")
            )));
        };
        let seed_host = seed_node
            .rsplit_once(':')
            .map_or(seed_node.as_str(), |(h, _)| h)
            .trim_start_matches("tls://")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();

        // Pushes arrive before the state exists (the subscription below); they go through a weak slot.
        let state_slot: Arc<std::sync::OnceLock<std::sync::Weak<cluster::ClusterState>>> =
            Arc::default();
        let on_push = {
            let wake = Arc::clone(&bus);
            let state_slot = Arc::clone(&state_slot);
            let gens_key = ns.gens_key.clone();
            let backplane = ns.backplane.clone();
            move |push: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
                match push.kind {
                    PushKind::Disconnection => {
                        wake.wake_all();
                        wake.backplane_push(super::wake::Push::Disconnected);
                    }
                    PushKind::SMessage | PushKind::Message => {
                        if let (
                            Some(Value::BulkString(channel)),
                            Some(Value::BulkString(payload)),
                        ) = (push.data.first(), push.data.get(1))
                        {
                            if channel == backplane.as_bytes() {
                                wake.backplane_push(super::wake::Push::Message(
                                    bytes::Bytes::copy_from_slice(payload),
                                ));
                            } else if channel == gens_key.as_bytes() {
                                if let Some(state) =
                                    state_slot.get().and_then(std::sync::Weak::upgrade)
                                {
                                    state.apply_announcement(payload);
                                }
                            } else if let Ok(key) = std::str::from_utf8(payload) {
                                wake.wake(key);
                            }
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
        };
        let client = cluster::client(url, &seeds, options, on_push)?;
        let timeout = options.connect_timeout;
        let mut conn = tokio::time::timeout(timeout, client.get_async_connection())
            .await
            .map_err(|_| connect_err(format!("no answer within {timeout:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let map = cluster::read_slot_map(&mut conn, &seed_host, options.response_timeout)
            .await
            .map_err(connect_err)?;
        let state = Arc::new(cluster::ClusterState::new(options, seed_host, map));
        let _ = state_slot.set(Arc::downgrade(&state));
        // The epochs' primary may be down (its failover window): the handle still connects, and until the
        // epochs can be read its cache calls fail open (the view vouches for nothing); the epoch reader keeps
        // trying to subscribe and read.
        let response = options.response_timeout;
        let subscribed = matches!(
            tokio::time::timeout(response, conn.ssubscribe(&ns.gens_key)).await,
            Ok(Ok(()))
        );
        // The backplane: its heartbeats find a missing subscription and subscribe again.
        let _ = tokio::time::timeout(response, conn.ssubscribe(&ns.backplane)).await;
        let read = cluster::read_epochs(&state, &mut conn, &ns.gens_key, response).await;
        if !subscribed || read.is_err() {
            tracing::warn!(cluster = %server, epochs = %ns.gens_key, "keyward: the group epochs cannot be read yet (is their primary down?); cache calls fail open until they can");
        }
        let tasks = vec![
            cluster::spawn_slot_mapper(
                &state,
                conn.clone(),
                options.response_timeout,
                // `{env}:{app}:_kw:probe:`: inside the namespace, so the ACL rule covers it.
                format!("{}probe:", ns.gens_key.trim_end_matches("gens")),
            ),
            cluster::spawn_epoch_reader(
                &state,
                conn.clone(),
                ns.gens_key.clone(),
                options.response_timeout,
                subscribed,
            ),
        ];
        tracing::info!(cluster = %server, primaries = state.primaries().len(), "keyward: connected to the cluster");
        Ok(Self {
            conn: Arc::new(Slot::new(Conn::Cluster(conn))),
            follower: None,
            cluster: Some(state),
            tasks,
            server,
            response_timeout: options.response_timeout,
            breaker,
            bus,
            maxmemory_policy,
            dial: Arc::new(dedicated::Dial::Cluster {
                url: url.to_owned(),
                seeds,
                options: options.clone(),
            }),
            channels: std::sync::OnceLock::new(),
        })
    }

    /// On Cluster, the group-invalidation bound.
    pub(crate) fn epochs_bound(&self) -> Option<Duration> {
        self.cluster.as_ref().map(|c| c.epochs_bound)
    }

    /// Whether this is a Redis Cluster (group epochs from the view, sharded wake-ups).
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// On Cluster, the namespace, `class` and `tags` epochs from the view, re-read first if the view is older
    /// than the bound (see [`cluster`]); `None` elsewhere (the scripts read them).
    ///
    /// # Errors
    /// As [`call`](Self::call), when the view must be re-read and that read fails.
    pub(crate) async fn group_epochs(
        &self,
        ns: &Namespace,
        class: &str,
        tags: &[&str],
    ) -> Result<Option<cluster::ViewEpochs>> {
        let Some(state) = &self.cluster else {
            return Ok(None);
        };
        if let Some(epochs) = state.epochs(class, tags) {
            return Ok(Some(epochs));
        }
        let Conn::Cluster(mut conn) = self.conn() else {
            return Ok(None);
        };
        let slot = cluster::slot_of(ns.gens_key.as_bytes());
        // One read at a time per handle: callers that find the view stale together wait for that one read
        // (all inside `call`, so the wait is bounded by the response timeout too) instead of each sending it.
        self.call("epochs", Some(slot), async {
            let _one = state.reading.lock().await;
            if state.epochs(class, tags).is_some() {
                return Ok(());
            }
            match cluster::read_epochs(state, &mut conn, &ns.gens_key, self.response_timeout).await
            {
                Ok(()) => Ok(()),
                Err(Some(e)) => Err(e),
                Err(None) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer within the response timeout",
                ))),
            }
        })
        .await?;
        // Read just now, so fresh, unless the read itself took longer than the bound: then it cannot vouch
        // for the bound, and the caller treats it like a timeout (a cache fails open).
        state
            .epochs(class, tags)
            .map(Some)
            .ok_or_else(|| self.timeout_err("epochs", Some(slot)))
    }

    /// On Cluster, record an epoch this handle just bumped (read-your-writes before its announcement arrives).
    pub(crate) fn bumped(&self, field: &str, epoch: u64) {
        if let Some(state) = &self.cluster {
            state.apply_epoch(field, epoch);
        }
    }

    /// On Cluster, record a re-base this handle just made: `dropped` deleted, `*` bumped to `ns_epoch`.
    pub(crate) fn rebased(&self, dropped: &[&str], ns_epoch: u64) {
        if let Some(state) = &self.cluster {
            state.apply_rebase(dropped, ns_epoch);
        }
    }

    /// The channel a fill or release of `key` announces itself on: the namespace's channel on one server; on
    /// Cluster a sharded channel in `key`'s slot (ending in `}`, which is how the scripts know to `SPUBLISH`).
    pub(crate) fn wake_channel(&self, ns: &Namespace, key: &str) -> String {
        if self.cluster.is_some() {
            Self::cluster_wake_channel(ns, key)
        } else {
            ns.channel.clone()
        }
    }

    /// On Cluster, the sharded channel a fill or release of `key` announces itself on.
    pub(crate) fn cluster_wake_channel(ns: &Namespace, key: &str) -> String {
        format!("{}:{{{}}}", ns.channel, cluster::hash_tag(key))
    }

    /// Start receiving wake-ups for `key`: on one server the subscription is already there; on Cluster the
    /// key's sharded channel is subscribed (once per channel, however many wait) before this returns, so a
    /// caller that asks the store again after it cannot miss the announcement. A subscription that fails
    /// leaves the caller with its bounded re-checks ([`Backend::wait_slice`](super::Backend::wait_slice)).
    pub(crate) async fn watch(&self, ns: &Namespace, key: &str) -> Option<ShardWatch> {
        let state = self.cluster.as_ref()?;
        let channel = self.wake_channel(ns, key);
        let subscribed = state.watch(&channel);
        // The guard first: a watcher cancelled while subscribing still counts itself out.
        let guard = ShardWatch {
            state: Arc::clone(state),
            conn: self.conn.clone(),
            channel,
            timeout: self.response_timeout,
        };
        let Conn::Cluster(mut conn) = self.conn() else {
            return Some(guard);
        };
        // Every watcher of the channel waits here until the subscription is answered (the first one sends
        // it; if it is cancelled, the next takes over), so none asks the store again before it could hear
        // the announcement.
        subscribed
            .get_or_init(|| async {
                let _order = state.subscribing.lock().await;
                let answered =
                    tokio::time::timeout(self.response_timeout, conn.ssubscribe(&guard.channel))
                        .await;
                if !matches!(answered, Ok(Ok(()))) {
                    tracing::debug!(
                        channel = %guard.channel,
                        "keyward: cannot subscribe to a wake-up channel; polling"
                    );
                }
            })
            .await;
        Some(guard)
    }

    /// The current connection (a clone: cheap, multiplexed).
    fn conn(&self) -> Conn {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`call`](Self::call) with the request `send` builds on the current connection; behind Sentinel, once
    /// more on the new master's connection when the first try was refused and the sentinels name another
    /// master ([`resend_within`](Self::resend_within)), within what the first try left of the response
    /// timeout. Every store call goes through here.
    ///
    /// `one_command`: the request is a single command (a script call, a publish, a one-command pipeline).
    /// Only then does a redirect answer mean that nothing ran (see below).
    async fn call_resending<T, Fut>(
        &self,
        op: &'static str,
        slot: Option<u16>,
        one_command: bool,
        send: impl Fn(Conn, bool) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = std::time::Instant::now();
        let mark = self.first_try();
        let mut answer = self.call(op, slot, send(self.conn(), false)).await;
        if self.cluster.is_some() && one_command {
            // A redirect redis-rs could not follow: the call did not run. During a reshard redis-rs sends a
            // redirected call's `ASKING` apart from the call, on the connection every call to the importing
            // node shares: calls redirected at once take each other's `ASKING` (it holds for one command), and
            // the importing node answers `MOVED` back to the source. Sent again with its own `ASKING` in front,
            // in one write (`send`'s flag): wherever redis-rs sends it, nothing comes between the two.
            // Never a pipeline of several commands: Redis decides a redirect command by command, so its first
            // commands may have run before a later one was redirected (on the importing node `ASKING` covers
            // only the command after it: the first runs, the next is answered `MOVED`), and a resend would run
            // them again (a stream publish's `XADD`: the message appended once more per resend).
            let mut resends = 0;
            while resends < REDIRECT_RESENDS && is_unfollowed_redirect(&answer) {
                let Some(left) = self.response_timeout.checked_sub(started.elapsed()) else {
                    break;
                };
                resends += 1;
                answer = self
                    .call_within(op, slot, left, false, send(self.conn(), true))
                    .await;
            }
        }
        match self.resend_within(mark, &answer).await {
            // Past the breaker: the first try's failure may just have opened it, and a call never sent is
            // sent once more in any case (to a new master, or to an address that refused it).
            Some(left) => {
                self.call_within(op, slot, left, false, send(self.conn(), false))
                    .await
            }
            None => answer,
        }
    }

    /// Behind Sentinel, before a call's first try: when it started and which connection generation it uses
    /// (see [`resend_within`](Self::resend_within)).
    fn first_try(&self) -> Option<(std::time::Instant, u64)> {
        self.follower
            .as_ref()
            .map(|f| (std::time::Instant::now(), f.generation()))
    }

    /// Behind Sentinel, after a call's first try (`mark` from [`first_try`](Self::first_try)): if the master's
    /// port refused it (it was never sent), the follower asks the sentinels at once
    /// ([`sentinel::Follower::recheck`]), and if some of the call's response timeout is left, that time — the
    /// call is then sent once more, bounded by it: to the new master when they name another one, else to the
    /// same address (the refusal may be the connection manager's last attempt, kept from while a master that
    /// restarted in place was down; the resend makes a new one). A call the breaker refused is sent again
    /// only to a new master.
    ///
    /// The second try is a second [`call`](Self::call) after the first, not a future wrapped around the
    /// request: that kept every call's state small (the recheck is boxed too, it connects to sentinels).
    async fn resend_within<T>(
        &self,
        mark: Option<(std::time::Instant, u64)>,
        answer: &Result<T>,
    ) -> Option<Duration> {
        let (follower, (started, seen)) = self.follower.as_ref().zip(mark)?;
        // Boxed: the rare path's future (asking sentinels, opening a connection) stays out of every call's.
        let mut refused = false;
        let recheck: std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> = match answer {
            // A connection that failed before the command went out (refused): never an error reply (an `OOM`
            // raised mid-script, say, is unavailable and not "may have run", but the script's first writes
            // did).
            Err(Error::Redis { source, .. })
                if source.is_connection_failure() && !source.may_have_run() =>
            {
                refused = true;
                Box::pin(follower.recheck(started, seen))
            }
            // Not sent either: the breaker opened on the old master's failures. Sent again only if the
            // resolution under way (the failures asked for one) finds another master; only in the burst
            // that opened it (within a response timeout): a breaker that stays open through an outage
            // fails calls at once, not after waiting on resolutions that may each run the connect timeout
            // (sentinels that do not answer).
            Err(Error::CircuitOpen { .. }) if self.breaker.opened_within(self.response_timeout) => {
                Box::pin(follower.settled(seen))
            }
            _ => return None,
        };
        let left = self.response_timeout.checked_sub(started.elapsed())?;
        let switched = tokio::time::timeout(left, recheck).await.unwrap_or(false);
        let left = self.response_timeout.checked_sub(started.elapsed())?;
        if switched {
            tracing::debug!(server = %self.server, "keyward: a call the old master refused is sent to the new one");
        }
        (switched || refused).then_some(left)
    }

    /// Behind Sentinel, ask the follower to look for a new master.
    fn master_suspect(&self) {
        if let Some(f) = &self.follower {
            f.trigger();
        }
        if let Some(c) = &self.cluster {
            c.suspect();
        }
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// The server's `maxmemory-policy` at connect, if it reported one.
    pub(crate) fn maxmemory_policy(&self) -> Option<&str> {
        self.maxmemory_policy.as_deref()
    }

    fn err(&self, op: &'static str, slot: Option<u16>, e: RedisError) -> Error {
        if e.is_timeout() {
            self.timeout_err(op, slot)
        } else {
            Error::Redis {
                server: self.server_for(slot),
                op,
                source: failure::failure(e),
            }
        }
    }

    /// The timeout error of a call of `op` on `key` that waited longer than the response timeout (in a
    /// batch queue, say) without getting an answer.
    pub(crate) fn queued_timeout_err(&self, op: &'static str, key: &str) -> Error {
        self.timeout_err(op, Some(cluster::slot_of(key.as_bytes())))
    }

    /// The error for an error reply `e` concerning `key` that a script returned as a value.
    /// As for a call answered with it, a `READONLY` (the server was demoted) has the master looked up again.
    pub(crate) fn reply_err(&self, op: &'static str, key: &str, e: RedisError) -> Error {
        if is_read_only(&e) {
            self.master_suspect();
        }
        self.err(op, Some(cluster::slot_of(key.as_bytes())), e)
    }

    fn timeout_err(&self, op: &'static str, slot: Option<u16>) -> Error {
        Error::Timeout {
            server: self.server_for(slot),
            op,
            timeout: self.response_timeout,
        }
    }

    /// The breaker's state.
    pub(crate) fn breaker_state(&self) -> BreakerState {
        match &self.cluster {
            Some(c) => c.breaker_state(),
            None => self.breaker.state(),
        }
    }

    /// The response timeout every call is bounded by.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Count an unavailable call. When it opens the breaker, every local waiter (a cache reader waiting for
    /// another caller's fill, a lock waiter) is woken: no wake-up can come from a server that is down, and a
    /// woken waiter looks again, which now fails at once (and a cache fails open).
    fn failure(&self, breaker: &Breaker) {
        if breaker.failure() {
            self.bus.wake_all();
        }
    }

    /// **The one place where every store call is bounded.** The breaker admits the call (or it fails at once
    /// with [`Error::CircuitOpen`], unsent); then the whole call — including any wait for a reconnect in
    /// progress, a refused port or a host that accepts TCP and never answers — is cut at the response timeout.
    /// Unavailability (a timeout, a refused or dropped connection) counts as a breaker failure; a reply,
    /// even an error reply, counts as a success.
    fn call<T>(
        &self,
        op: &'static str,
        slot: Option<u16>,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> impl Future<Output = Result<T>> {
        self.call_within(op, slot, self.response_timeout, true, fut)
    }

    /// [`call`](Self::call), cut at `limit` instead of the whole response timeout (a second try behind
    /// Sentinel gets what the first left), and asking the breaker only with `admit` (a second try does not:
    /// see [`call_resending`](Self::call_resending)).
    async fn call_within<T>(
        &self,
        op: &'static str,
        slot: Option<u16>,
        limit: Duration,
        admit: bool,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let breaker = self.breaker_for(slot);
        if admit && breaker.admit() == Admit::Skip {
            // Behind Sentinel the master may have moved: the breaker closes once the follower switches.
            self.master_suspect();
            return Err(Error::CircuitOpen {
                server: self.server_for(slot),
                op,
                retry_in: breaker.retry_in(),
            });
        }
        // Behind Sentinel, the connection this call goes out on: a failure on a connection the follower has
        // replaced since (the old master's) says nothing of the new master, so it does not count towards
        // the breaker (which closed when the follower switched).
        let generation = self.follower.as_ref().map(|f| f.generation());
        let failure = |breaker: &Breaker| {
            if generation == self.follower.as_ref().map(|f| f.generation()) {
                self.failure(breaker);
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Err(_) => {
                failure(&breaker);
                self.master_suspect();
                Err(self.timeout_err(op, slot))
            }
            Ok(Ok(v)) => {
                breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                if is_unavailable(&e) {
                    failure(&breaker);
                    self.master_suspect();
                } else {
                    breaker.success();
                    if is_read_only(&e) {
                        self.master_suspect();
                    }
                }
                Err(self.err(op, slot, e))
            }
        }
    }

    /// The breaker admitting a call to `slot`: on Cluster the one of the primary serving it, else the handle's.
    fn breaker_for(&self, slot: Option<u16>) -> Arc<Breaker> {
        self.cluster
            .as_ref()
            .zip(slot)
            .and_then(|(c, slot)| c.breaker_for(slot))
            .unwrap_or_else(|| Arc::clone(&self.breaker))
    }

    /// The server a call to `slot` goes to, for messages: on Cluster the primary serving it.
    fn server_for(&self, slot: Option<u16>) -> String {
        self.cluster
            .as_ref()
            .zip(slot)
            .and_then(|(c, slot)| c.primary_of(slot))
            .map_or_else(|| self.server.clone(), |(h, p)| format!("{h}:{p}"))
    }

    /// Run one script call through [`call`](Self::call). A call with an [`Undo`] that gets no answer (a
    /// timeout, a dropped connection, or the caller's future dropped mid-call) sends its undo after it on the
    /// same multiplexed connection. Redis runs one connection's commands in order, so when a hung server
    /// resumes it runs the late call and then its undo: nothing the timed-out call left outlives the outage.
    /// The undo is retried (with backoff, bypassing the breaker) until the server answers it or
    /// `undo.within` has passed. See docs/resilience.md.
    pub(crate) async fn run(&self, call: Call) -> Result<Reply> {
        let Call {
            op,
            script,
            keys,
            args,
            undo,
            must_land,
            slot,
            ..
        } = call;
        let guard = UndoGuard {
            backend: self,
            op,
            undo: undo.map(|u| move || u),
            must_land,
        };
        let (script, keys, args) = (&script, &keys, &args);
        let send = |mut conn: Conn, asking: bool| async move {
            match query_cmd::<Value>(&mut conn, &script.command(false, keys, args), asking).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    query_cmd(&mut conn, &script.command(true, keys, args), asking).await
                }
                answer => answer,
            }
        };
        let answer = self.call_resending(op, slot, true, send).await;
        guard.settle(&answer);
        answer.map(Reply::from)
    }

    /// Run a pipeline of plain commands through [`call`](Self::call), with the same undo as [`run`](Self::run).
    pub(crate) async fn run_pipeline(
        &self,
        pipeline: Pipeline,
        undo: impl FnOnce() -> Undo,
    ) -> Result<Vec<Reply>> {
        let Pipeline { op, pipe, slot, .. } = pipeline;
        let guard = UndoGuard {
            backend: self,
            op,
            undo: Some(undo),
            must_land: false,
        };
        let pipe = &pipe;
        let send =
            |mut conn: Conn, asking: bool| async move { query_pipe(&mut conn, pipe, asking).await };
        let answer = self.call_resending(op, slot, pipe.len() == 1, send).await;
        guard.settle(&answer);
        answer.map(|v| v.into_iter().map(Reply::from).collect())
    }

    /// Run a pipeline of plain commands that leave nothing behind through [`call`](Self::call): no undo.
    pub(crate) async fn run_commands(&self, pipeline: Pipeline) -> Result<Vec<Reply>> {
        let Pipeline { op, pipe, slot, .. } = pipeline;
        let pipe = &pipe;
        let send =
            |mut conn: Conn, asking: bool| async move { query_pipe(&mut conn, pipe, asking).await };
        self.call_resending(op, slot, pipe.len() == 1, send)
            .await
            .map(|v| v.into_iter().map(Reply::from).collect())
    }

    /// Send `undo` now and retry it in the background until the server answers it (see [`run`](Self::run)).
    fn spawn_undo(&self, op: &'static str, undo: Undo) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        metrics::counter!("keyward_cleanups_total", "op" => op).increment(1);
        tracing::debug!(op, "keyward: undoing a call that got no answer");
        // The slot, not one connection: an undo retried across a failover goes to the new master.
        let slot = Arc::clone(&self.conn);
        let timeout = self.response_timeout;
        rt.spawn(async move {
            let deadline = tokio::time::Instant::now() + undo.within;
            let mut delay = Duration::from_millis(50);
            loop {
                let mut eval = redis::cmd("EVAL");
                eval.arg(undo.script.source()).arg(undo.keys.len());
                for k in &undo.keys {
                    eval.arg(k);
                }
                for a in &undo.args {
                    eval.arg(&a[..]);
                }
                let mut conn = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
                let sent =
                    tokio::time::timeout(timeout, eval.query_async::<Value>(&mut conn)).await;
                match sent {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) if !is_unavailable(&e) => {
                        tracing::warn!(op, error = %e, "keyward: undo refused by the server");
                        return;
                    }
                    _ => {}
                }
                if tokio::time::Instant::now() + delay >= deadline {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        });
    }

    /// Publish on the backplane channel (see [`publish`](Self::publish)).
    pub(crate) async fn publish_backplane(&self, channel: &str, message: &[u8]) -> Result<()> {
        self.publish("backplane", channel, message).await.map(drop)
    }

    /// Publish a typed channel's message (see [`publish`](Self::publish)).
    pub(crate) async fn publish_channel(&self, channel: &str, message: &[u8]) -> Result<u64> {
        self.publish("publish", channel, message).await
    }

    /// `PUBLISH`, or `SPUBLISH` on Cluster (the channel's shard), through [`call`](Self::call) as operation
    /// `op`. Returns how many subscribers received it (on Cluster: on that shard).
    async fn publish(&self, op: &'static str, channel: &str, message: &[u8]) -> Result<u64> {
        let cmd = if self.cluster.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let slot = self
            .cluster
            .as_ref()
            .map(|_| crate::key::cluster_slot(channel.as_bytes()));
        let send = |mut conn: Conn, asking: bool| async move {
            let mut publish = redis::cmd(cmd);
            publish.arg(channel).arg(message);
            query_cmd(&mut conn, &publish, asking).await
        };
        self.call_resending(op, slot, true, send).await
    }

    /// Use `hub` for this handle's typed channels (a lazy handle's, made before the connection), unless one
    /// was made already.
    pub(crate) fn adopt_channel_hub(&self, hub: Arc<super::channels::RedisHub>) {
        let _ = self.channels.set(hub);
    }

    /// How this handle opens connections of its own.
    pub(crate) fn dial(&self) -> Arc<dedicated::Dial> {
        Arc::clone(&self.dial)
    }

    /// The typed channels' hub of this handle (its dedicated connection is opened by the first subscription).
    pub(crate) fn channel_hub(&self) -> Arc<super::channels::RedisHub> {
        Arc::clone(
            self.channels
                .get_or_init(|| super::channels::RedisHub::start(Arc::clone(&self.dial))),
        )
    }

    /// Subscribe to the backplane channel again (`SUBSCRIBE`, `SSUBSCRIBE` on Cluster), bounded by the response
    /// timeout; a failure is left to the next attempt.
    pub(crate) async fn resubscribe_backplane(&self, channel: &str) {
        let answered = match self.conn() {
            Conn::Cluster(mut c) => {
                tokio::time::timeout(self.response_timeout, c.ssubscribe(channel)).await
            }
            Conn::Single(mut c) => {
                tokio::time::timeout(self.response_timeout, c.subscribe(channel)).await
            }
        };
        if !matches!(answered, Ok(Ok(()))) {
            tracing::debug!(
                channel,
                "keyward: cannot subscribe to the backplane channel yet"
            );
        }
    }

    /// `PING`, through [`call`](Self::call) like any other call: bounded by the response timeout, answered at
    /// once while the breaker is open, and the breaker's probe after its cooldown (a success closes it), so a
    /// health check polled during an outage neither pays the timeout nor keeps the breaker from recovering.
    pub(crate) async fn ping(&self) -> Result<()> {
        // No slot: never redirected.
        let send = |mut conn: Conn, _asking: bool| async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        self.call_resending("ping", None, true, send)
            .await
            .map(drop)
    }

    /// A typed error for a script reply of the wrong shape.
    pub(crate) fn protocol_err(&self, op: &'static str, what: &str) -> Error {
        self.err(
            op,
            None,
            RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected script reply",
                what.to_owned(),
            )),
        )
    }

    /// Walk the keyspace with `SCAN` (each primary with its own cursor on Cluster) and `PTTL` each match.
    pub(crate) async fn scan(&self, pattern: &str, batch: usize) -> Result<Vec<KeyTtl>> {
        let mut conn = self.conn();
        if let (Some(state), Conn::Cluster(c)) = (&self.cluster, &conn) {
            let primaries = state.primaries();
            return cluster::scan(c, &primaries, pattern, batch, self.response_timeout)
                .await
                .map_err(|e| self.err("scan", None, e));
        }
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(batch.max(1));
            let (next, keys): (u64, Vec<String>) =
                self.call("scan", None, scan.query_async(&mut conn)).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("PTTL").arg(k);
                }
                let ttls: Vec<i64> = self.call("scan", None, pipe.query_async(&mut conn)).await?;
                push_ttls(&mut out, keys, ttls);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(sorted(out))
    }
}

/// A live interest in one sharded wake-up channel (Cluster); the last one dropped unsubscribes.
pub(crate) struct ShardWatch {
    state: Arc<cluster::ClusterState>,
    conn: Arc<Slot>,
    channel: String,
    timeout: Duration,
}

impl Drop for ShardWatch {
    fn drop(&mut self) {
        if !self.state.unwatch(&self.channel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = Arc::clone(&self.state);
        let channel = std::mem::take(&mut self.channel);
        let conn = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone();
        let timeout = self.timeout;
        rt.spawn(async move {
            let _order = state.subscribing.lock().await;
            // A watcher that came back meanwhile keeps the subscription (it subscribed again, or will, after
            // this lock).
            if state.is_watched(&channel) {
                return;
            }
            if let Conn::Cluster(mut conn) = conn {
                let _ = tokio::time::timeout(timeout, conn.sunsubscribe(&channel)).await;
            }
        });
    }
}

/// Settled when the call got an answer; dropped unsettled (a timeout, a dropped connection, or the caller's
/// future dropped mid-call), it sends its undo.
struct UndoGuard<'a, U: FnOnce() -> Undo> {
    backend: &'a RedisBackend,
    op: &'static str,
    /// Built only when it is sent.
    undo: Option<U>,
    must_land: bool,
}

impl<U: FnOnce() -> Undo> UndoGuard<'_, U> {
    /// Keep the undo only if the call may have run without its answer reaching us, or (for a call that must
    /// land) if it did not get through at all.
    fn settle<T>(mut self, answer: &Result<T>) {
        let keep = match answer {
            Ok(_) => false,
            Err(Error::Timeout { .. }) => true,
            Err(err) if self.must_land => err.is_unavailable(),
            Err(Error::Redis { source, .. }) => source.may_have_run(),
            Err(_) => false,
        };
        if !keep {
            self.undo = None;
        }
    }
}

impl<U: FnOnce() -> Undo> Drop for UndoGuard<'_, U> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            self.backend.spawn_undo(self.op, undo());
        }
    }
}

/// Add each of `keys` with its `PTTL` reply to `out`, skipping keys that expired between `SCAN` and `PTTL`
/// (`-2`); `-1` (no TTL, which keyward never writes) is `None`.
pub(super) fn push_ttls(
    out: &mut Vec<KeyTtl>,
    keys: Vec<String>,
    ttls: impl IntoIterator<Item = i64>,
) {
    for (key, ttl) in keys.into_iter().zip(ttls) {
        if ttl == -2 {
            continue;
        }
        let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
        out.push(KeyTtl { key, ttl });
    }
}

/// A walk's keys sorted, each once (SCAN may return a key twice).
pub(super) fn sorted(mut out: Vec<KeyTtl>) -> Vec<KeyTtl> {
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out.dedup_by(|a, b| a.key == b.key);
    out
}

/// `cmd`'s reply; with `asking`, `cmd` goes behind an `ASKING` of its own, in one write (see
/// [`RedisBackend::call_resending`]).
async fn query_cmd<T: redis::FromRedisValue>(
    conn: &mut Conn,
    cmd: &redis::Cmd,
    asking: bool,
) -> redis::RedisResult<T> {
    if !asking {
        return cmd.query_async(conn).await;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("ASKING").ignore().add_command(cmd.clone());
    let (reply,): (T,) = pipe.query_async(conn).await?;
    Ok(reply)
}

/// `pipe`'s replies; with `asking` (a pipeline of one command: see [`RedisBackend::call_resending`]), behind an
/// `ASKING` of its own, in one write. keyward's pipelines ignore no reply, so each command's reply comes back.
async fn query_pipe(
    conn: &mut Conn,
    pipe: &redis::Pipeline,
    asking: bool,
) -> redis::RedisResult<Vec<Value>> {
    if !asking {
        return pipe.query_async(conn).await;
    }
    let mut asked = redis::pipe();
    asked.cmd("ASKING").ignore();
    for cmd in pipe.cmd_iter() {
        asked.add_command(cmd.clone());
    }
    asked.query_async(conn).await
}

/// How many times a Cluster call that came back with a redirect redis-rs could not follow is sent again (see
/// [`RedisBackend::call_resending`]).
const REDIRECT_RESENDS: usize = 3;

/// Whether a call's answer is a Cluster redirect (`MOVED`, `ASK`) that reached keyward: redis-rs follows
/// redirects itself, so this one it could not (the call did not run).
fn is_unfollowed_redirect<T>(answer: &Result<T>) -> bool {
    matches!(answer, Err(Error::Redis { source, .. }) if matches!(source.code(), Some("MOVED" | "ASK")))
}

/// A `READONLY` error reply: the server was demoted to a replica (a failover); behind Sentinel the master
/// is looked up again.
fn is_read_only(e: &RedisError) -> bool {
    e.code() == Some("READONLY") || e.to_string().contains("READONLY")
}

/// The value of `field:` in an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

fn check_version(info: &str) -> std::result::Result<(), String> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .ok_or_else(|| "the server did not report redis_version".to_owned())?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("unreadable redis_version `{version}`"))?;
    if major < MIN_REDIS_MAJOR {
        return Err(format!(
            "keyward needs Redis {MIN_REDIS_MAJOR}.0 or newer (for SET … NX GET); this server is {version}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("rediss://:pw@h/"), "rediss://***@h/");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("garbage"), "garbage");
        // The four shapes: an unencoded `/` in the password, no scheme, a query password, mem://.
        for (url, secret) in [
            ("redis://app:s3cretPW9/x@127.0.0.1:6379", "s3cretPW9/x"),
            ("app:pw-s3cret@host", "pw-s3cret"),
            ("redis+unix:///tmp/r.sock?pass=s3cretPW9", "s3cretPW9"),
            ("mem://user:s3cretPW9@host", "s3cretPW9"),
            ("redis://u:p@ss:w/o?rd@host:1/0", "p@ss:w/o?rd"),
            (
                "redis+sentinel://h:1/m?sentinel_password=s3cret@nelPw",
                "nelPw",
            ),
        ] {
            let r = redact(url);
            assert!(!r.contains(secret), "{url} -> {r}");
            assert!(!r.contains("s3cret"), "{url} -> {r}");
        }
    }

    proptest::proptest! {
        /// For arbitrary URL-ish strings holding a password, neither the redacted URL nor the scrubbed
        /// message of a real parse error ever contains the password.
        #[test]
        fn no_password_survives(
            scheme in proptest::sample::select(vec!["redis", "rediss", "redis+unix", "unix", "mem", ""]),
            user in "[a-z]{0,6}",
            password in "[A-Za-z0-9/:@?#%&=+._~-]{8,24}",
            host in "[a-z0-9.:/\\[\\]-]{0,20}",
            tail in "[a-z0-9/?=&#]{0,12}",
        ) {
            let url = if scheme.is_empty() {
                format!("{user}:{password}@{host}{tail}")
            } else {
                format!("{scheme}://{user}:{password}@{host}{tail}")
            };
            let redacted = redact(&url);
            proptest::prop_assert!(!redacted.contains(&password), "{} -> {}", url, redacted);
            if let Err(e) = Client::open(url.as_str()) {
                let message = scrub(&url, &format!("{}: {}", redacted, e));
                proptest::prop_assert!(!message.contains(&password), "{} -> {}", url, message);
            }
        }
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(
            describe(&ConnectionAddr::Tcp("::1".into(), 7000)),
            "[::1]:7000"
        );
        assert_eq!(
            describe(&ConnectionAddr::Tcp("10.0.0.1".into(), 7000)),
            "10.0.0.1:7000"
        );
    }

    #[test]
    fn version_gate() {
        assert!(check_version("# Server\r\nredis_version:7.0.15\r\n").is_ok());
        assert!(check_version("redis_version:8.2.1").is_ok());
        let e = check_version("redis_version:6.2.14").unwrap_err();
        assert!(e.contains("7.0"), "{e}");
        assert!(check_version("nothing").is_err());
    }
}
