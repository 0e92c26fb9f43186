//! The Redis backend: each semantic operation is one command or one Lua script (kept as a `.lua` file next to
//! this one, called with `EVALSHA` and a `NOSCRIPT` fallback by `redis::Script`). The one exception is the
//! fetch fast path, a two-command pipeline whose safety is argued on [`RedisBackend::fetch`].
//!
//! One multiplexed, auto-reconnecting connection (`ConnectionManager`) carries every command of the process;
//! concurrent calls are pipelined on it. It speaks RESP3 so that the fill wake-up subscription rides the same
//! connection as push messages, and is re-subscribed automatically after a reconnect.
//!
//! Scope: standalone Redis (TCP, TLS, unix socket), which includes a Sentinel-managed master reached directly.
//! The cache scripts read the namespace's epoch hash next to the entry, which lives in another Cluster slot,
//! so Redis Cluster is not supported by this backend yet.

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ProtocolVersion, PushInfo, PushKind, RedisError,
    Script, Value,
};

use super::breaker::{Admit, Breaker, BreakerState};
use super::{Entry, Fetched, KeyTtl, Namespace, is_unavailable};
use crate::ConnectOptions;
use crate::envelope::{self, Gens, LEASE_PREFIX};
use crate::error::{Error, Result};
use crate::rate_limit::algo::Verdict;
use crate::rate_limit::local::{RateCall, RateReply};
use crate::wake::WakeBus;

struct Scripts {
    fetch: Script,
    read: Script,
    commit: Script,
    release: Script,
    set: Script,
    invalidate: Script,
    bump: Script,
    heal: Script,
    ratelimit: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    fetch: Script::new(concat!(
        include_str!("epochs.lua"),
        include_str!("fetch.lua")
    )),
    read: Script::new(concat!(
        include_str!("epochs.lua"),
        include_str!("read.lua")
    )),
    commit: Script::new(include_str!("commit.lua")),
    release: Script::new(include_str!("release.lua")),
    set: Script::new(concat!(include_str!("epochs.lua"), include_str!("set.lua"))),
    invalidate: Script::new(include_str!("invalidate.lua")),
    bump: Script::new(concat!(
        include_str!("epochs.lua"),
        include_str!("bump.lua")
    )),
    heal: Script::new(include_str!("heal.lua")),
    ratelimit: Script::new(include_str!("ratelimit.lua")),
});

/// The oldest server keyward runs on: `SET … NX GET` (get-or-lease in one command) arrived in 7.0.
const MIN_REDIS_MAJOR: u32 = 7;

pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    server: String,
    response_timeout: Duration,
    /// One breaker for every capability of this handle (see [`RedisBackend::call`]).
    breaker: Breaker,
}

/// A script call that undoes what a call which may still run on the server would leave behind (a fill lease,
/// an in-progress marker, a lock). See [`RedisBackend::eval_cleaning`].
pub(crate) struct Cleanup {
    /// The semantic operation, for metrics and logs.
    pub(crate) op: &'static str,
    /// The undoing script; it must be conditional (touch only what the original call wrote) and idempotent.
    pub(crate) script: &'static Script,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
    /// How long whatever the call left can live by itself (its TTL): past this there is nothing to undo.
    pub(crate) within: Duration,
}

/// `host:port`, `tls://host:port` or `unix:/path` — never credentials.
pub(crate) fn describe(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("tls://{host}:{port}"),
        ConnectionAddr::Unix(path) => format!("unix:{}", path.display()),
        other => format!("{other:?}"),
    }
}

/// A URL with its credentials removed, for messages: the user-info part (everything between `://` and the
/// *last* `@`, since an unencoded password may hold `/`, `:`, `?` or `@`) becomes `***`, and any query or
/// fragment (`?password=…`) is dropped.
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            out.push_str("***@");
            &rest[at + 1..]
        }
        None => rest,
    };
    match rest.find(['?', '#']) {
        Some(q) => {
            out.push_str(&rest[..q]);
            out.push_str("?…");
        }
        None => out.push_str(rest),
    }
    out
}

/// The parts of `url` that may be secrets: the user-info (and its password half) and query values.
fn secrets(url: &str) -> Vec<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
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

impl RedisBackend {
    pub(crate) async fn connect(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: Arc<WakeBus>,
    ) -> Result<Self> {
        let invalid = |detail: &str| Error::InvalidUrl {
            reason: scrub(url, &format!("{}: {detail}", redact(url))),
        };
        let client =
            Client::open(url).map_err(|e| invalid(e.detail().unwrap_or("not a Redis URL")))?;
        let mut info = client.get_connection_info().clone();
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
        }
        let server = describe(info.addr());
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(settings))
            .map_err(|e| invalid(e.detail().unwrap_or("not a Redis URL")))?;
        let connect_err = |reason: String| Error::Connect {
            server: server.clone(),
            reason,
        };

        // One direct attempt first: it reports the real reason (refused, auth, TLS) instead of retrying, and
        // checks the server version.
        let probe_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.connect_timeout));
        let mut probe = tokio::time::timeout(
            options.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&probe_config),
        )
        .await
        .map_err(|_| connect_err(format!("no answer within {:?}", options.connect_timeout)))?
        .map_err(|e| connect_err(e.to_string()))?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut probe)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        check_version(&info).map_err(connect_err)?;
        drop(probe);

        let wake = Arc::clone(&bus);
        let on_push = move |push: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
            match push.kind {
                // Messages may have been missed while disconnected: every waiter re-checks.
                PushKind::Disconnection => wake.wake_all(),
                PushKind::Message => {
                    if let Some(Value::BulkString(key)) = push.data.get(1)
                        && let Ok(key) = std::str::from_utf8(key)
                    {
                        wake.wake(key);
                    }
                }
                _ => {}
            }
            Ok(())
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(options.reconnect_retries)
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
        conn.subscribe(&ns.channel)
            .await
            .map_err(|e| connect_err(format!("cannot subscribe to wake-ups: {e}")))?;
        Ok(Self {
            conn,
            server,
            response_timeout: options.response_timeout,
            breaker: Breaker::new(options.breaker_failures, options.breaker_cooldown),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    fn err(&self, op: &'static str, e: RedisError) -> Error {
        if e.is_timeout() {
            Error::Timeout {
                server: self.server.clone(),
                op,
                timeout: self.response_timeout,
            }
        } else {
            Error::Redis {
                server: self.server.clone(),
                op,
                source: Arc::new(e),
            }
        }
    }

    fn timeout_err(&self, op: &'static str) -> Error {
        Error::Timeout {
            server: self.server.clone(),
            op,
            timeout: self.response_timeout,
        }
    }

    /// The breaker's state.
    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// **The one place where every store call is bounded.** The breaker admits the call (or it fails at once
    /// with [`Error::CircuitOpen`], unsent); then the whole call — including any wait for a reconnect in
    /// progress, a refused port or a host that accepts TCP and never answers — is cut at the response timeout.
    /// Unavailability (a timeout, a refused or dropped connection) counts as a breaker failure; a reply,
    /// even an error reply, counts as a success.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        if self.breaker.admit() == Admit::Skip {
            return Err(Error::CircuitOpen {
                server: self.server.clone(),
                op,
                retry_in: self.breaker.retry_in(),
            });
        }
        match tokio::time::timeout(self.response_timeout, fut).await {
            Err(_) => {
                self.breaker.failure();
                Err(self.timeout_err(op))
            }
            Ok(Ok(v)) => {
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                if is_unavailable(&e) {
                    self.breaker.failure();
                } else {
                    self.breaker.success();
                }
                Err(self.err(op, e))
            }
        }
    }

    /// Run one script invocation on the shared connection, through [`call`](Self::call).
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        self.call(op, invocation.invoke_async(&mut conn)).await
    }

    /// [`eval`](Self::eval) for a call that leaves something behind (a lease, a marker, a lock) which would
    /// block others if the caller never learns it got it. If the call may have been sent without an answer
    /// coming back (a timeout, a dropped connection, or the caller's future dropped mid-call), `cleanup` is
    /// sent after it on the same multiplexed connection. Redis runs one connection's commands in order, so
    /// when a hung server resumes it runs the late call and then its cleanup: nothing the timed-out call left
    /// outlives the outage. The cleanup is retried (with backoff, bypassing the breaker) until the server
    /// answers it or `cleanup.within` has passed.
    pub(crate) async fn eval_cleaning<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
        cleanup: impl FnOnce() -> Cleanup,
    ) -> Result<T> {
        let guard = CleanupGuard {
            backend: self,
            cleanup: Some(cleanup),
        };
        let result = self.eval(op, invocation).await;
        match &result {
            Err(Error::Timeout { .. }) => {}
            Err(Error::Redis { source, .. }) if may_have_run(source) => {}
            _ => guard.disarm(),
        }
        result
    }

    /// Send `cleanup` now and retry it in the background until the server answers it (see
    /// [`eval_cleaning`](Self::eval_cleaning)).
    pub(crate) fn spawn_cleanup(&self, cleanup: Cleanup) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        metrics::counter!("keyward_cleanups_total", "op" => cleanup.op).increment(1);
        tracing::debug!(
            op = cleanup.op,
            "keyward: cleaning up after a call that got no answer"
        );
        let conn = self.conn.clone();
        let timeout = self.response_timeout;
        rt.spawn(async move {
            let deadline = tokio::time::Instant::now() + cleanup.within;
            let mut delay = Duration::from_millis(50);
            loop {
                let mut invocation = cleanup.script.prepare_invoke();
                for k in &cleanup.keys {
                    invocation.key(k);
                }
                for a in &cleanup.args {
                    invocation.arg(&a[..]);
                }
                let sent = tokio::time::timeout(
                    timeout,
                    invocation.invoke_async::<Value>(&mut conn.clone()),
                )
                .await;
                match sent {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) if !is_unavailable(&e) => {
                        tracing::warn!(op = cleanup.op, error = %e, "keyward: cleanup refused by the server");
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

    /// `PING`, bounded by the response timeout and outside the breaker (a health check must see the server,
    /// not the breaker's memory of it); a success closes an open breaker.
    pub(crate) async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let pong = tokio::time::timeout(
            self.response_timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match pong {
            Err(_) => Err(self.timeout_err("ping")),
            Ok(Err(e)) => Err(self.err("ping", e)),
            Ok(Ok(_)) => {
                self.breaker.success();
                Ok(())
            }
        }
    }

    /// A typed error for a script reply of the wrong shape.
    pub(crate) fn protocol_err(&self, op: &'static str, what: &str) -> Error {
        self.err(
            op,
            RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected script reply",
                what.to_owned(),
            )),
        )
    }

    /// The fast path is two plain commands in one pipeline: `SET key <lease> NX GET PX ttl` (in one command: the
    /// value, or our lease on an empty key) and then `HMGET` of the epochs. Plain commands cost the server a
    /// fraction of a script call, which is what a hit pays. Reading the epochs *after* the `SET` on the same
    /// connection is safe: a bump between the two makes a hit look stale (a conservative miss), and for a
    /// granted lease the loader starts only after both replies, so its data is at least as new as the epochs
    /// recorded. Everything else — a lease held by someone, a value from before a group invalidation, an absent
    /// the caller cannot use — is rare and goes through the atomic `fetch.lua`.
    pub(crate) async fn fetch(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Result<Fetched> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(e.key)
            .arg(marker)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(lease_ttl))
            .cmd("HMGET")
            .arg(&e.ns.gens_key)
            .arg("*")
            .arg(e.class);
        let guard = CleanupGuard {
            backend: self,
            cleanup: Some(|| self.lease_cleanup(e, marker, lease_ttl)),
        };
        let mut conn = self.conn.clone();
        let answer: Result<(Option<Vec<u8>>, Vec<Option<String>>)> =
            self.call("fetch", pipe.query_async(&mut conn)).await;
        match &answer {
            Err(Error::Timeout { .. }) => {}
            Err(Error::Redis { source, .. }) if may_have_run(source) => {}
            _ => guard.disarm(),
        }
        let (stored, gens) = match answer {
            Ok(answer) => answer,
            // An error reply (e.g. the epochs key is not a hash): the atomic path repairs what it can.
            Err(Error::Redis { source, .. }) if !is_unavailable(&source) => {
                return self.fetch_atomic(e, marker, lease_ttl, negative_ok).await;
            }
            Err(err) => return Err(err),
        };
        let gens = match gens.as_slice() {
            [ns, class] => match (epoch(ns.as_deref()), epoch(class.as_deref())) {
                (Some(ns), Some(class)) => Gens { ns, class },
                // A corrupt epoch field: the atomic path bumps it (always safe) and goes on.
                _ => return self.fetch_atomic(e, marker, lease_ttl, negative_ok).await,
            },
            _ => return Err(self.protocol_err("fetch", "epochs")),
        };
        let Some(stored) = stored else {
            return Ok(Fetched::Leased(gens));
        };
        if stored.starts_with(LEASE_PREFIX)
            || envelope::is_current(&stored, gens, negative_ok) == Some(false)
        {
            return self.fetch_atomic(e, marker, lease_ttl, negative_ok).await;
        }
        // A current value, or bytes the caller will decode, report and heal.
        Ok(Fetched::Hit(Bytes::from(stored)))
    }

    /// Gives back a fill lease taken by a fetch whose answer never came (`release.lua`: only while the entry
    /// still holds this very lease; it wakes the waiters the lease collected).
    fn lease_cleanup(&self, e: &Entry<'_>, marker: &str, lease_ttl: Duration) -> Cleanup {
        let prefix = marker.strip_suffix('0').unwrap_or(marker);
        Cleanup {
            op: "fetch",
            script: &SCRIPTS.release,
            keys: vec![e.key.to_owned()],
            args: vec![prefix.as_bytes().to_vec(), e.ns.channel.as_bytes().to_vec()],
            within: lease_ttl,
        }
    }

    async fn fetch_atomic(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Result<Fetched> {
        let mut reply: Vec<Value> = self
            .eval_cleaning(
                "fetch",
                SCRIPTS
                    .fetch
                    .key(e.key)
                    .key(&e.ns.gens_key)
                    .arg(e.class)
                    .arg(marker)
                    .arg(millis(lease_ttl))
                    .arg(if negative_ok { "1" } else { "0" })
                    .arg(millis(e.ns.gens_lifetime)),
                || self.lease_cleanup(e, marker, lease_ttl),
            )
            .await?;
        if let [Value::Int(0), Value::BulkString(v)] = reply.as_mut_slice() {
            return Ok(Fetched::Hit(Bytes::from(std::mem::take(v))));
        }
        match reply.as_slice() {
            [Value::Int(1), ns, class] => Ok(Fetched::Leased(Gens {
                ns: gen_of(ns).ok_or_else(|| self.protocol_err("fetch", "namespace epoch"))?,
                class: gen_of(class).ok_or_else(|| self.protocol_err("fetch", "class epoch"))?,
            })),
            [Value::Int(2), Value::Int(pttl)] => Ok(Fetched::Wait(Duration::from_millis(
                u64::try_from(*pttl).unwrap_or(0),
            ))),
            other => Err(self.protocol_err("fetch", &format!("{other:?}"))),
        }
    }

    pub(crate) async fn read(&self, e: &Entry<'_>) -> Result<Option<Bytes>> {
        let v: Option<Vec<u8>> = self
            .eval(
                "read",
                SCRIPTS
                    .read
                    .key(e.key)
                    .key(&e.ns.gens_key)
                    .arg(e.class)
                    .arg(millis(e.ns.gens_lifetime)),
            )
            .await?;
        Ok(v.map(Bytes::from))
    }

    pub(crate) async fn commit(
        &self,
        e: &Entry<'_>,
        lease_prefix: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool> {
        let n: i64 = self
            .eval(
                "commit",
                SCRIPTS
                    .commit
                    .key(e.key)
                    .arg(lease_prefix)
                    .arg(value)
                    .arg(millis(ttl))
                    .arg(&e.ns.channel),
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn release(&self, e: &Entry<'_>, lease_prefix: &str) -> Result<bool> {
        let n: i64 = self
            .eval(
                "release",
                SCRIPTS
                    .release
                    .key(e.key)
                    .arg(lease_prefix)
                    .arg(&e.ns.channel),
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn set(&self, e: &Entry<'_>, body: &[u8], ttl: Duration) -> Result<()> {
        let _: i64 = self
            .eval(
                "set",
                SCRIPTS
                    .set
                    .key(e.key)
                    .key(&e.ns.gens_key)
                    .arg(e.class)
                    .arg(body)
                    .arg(millis(ttl))
                    .arg(&e.ns.channel)
                    .arg(millis(e.ns.gens_lifetime)),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn invalidate(&self, e: &Entry<'_>) -> Result<bool> {
        let n: i64 = self
            .eval(
                "invalidate",
                SCRIPTS.invalidate.key(e.key).arg(&e.ns.channel),
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn bump(&self, ns: &Namespace, field: &str) -> Result<u64> {
        let n: u64 = self
            .eval(
                "bump",
                SCRIPTS
                    .bump
                    .key(&ns.gens_key)
                    .arg(field)
                    .arg(millis(ns.gens_lifetime)),
            )
            .await?;
        Ok(n)
    }

    pub(crate) async fn heal(&self, key: &str, raw: &[u8]) -> Result<bool> {
        let n: i64 = self.eval("heal", SCRIPTS.heal.key(key).arg(raw)).await?;
        Ok(n == 1)
    }

    /// One grouped rate-limit check: one `EVALSHA` (the script reads `TIME` itself; the client's clock is
    /// never sent).
    pub(crate) async fn rate(&self, call: &RateCall<'_>) -> Result<RateReply> {
        let mut invocation = SCRIPTS.ratelimit.prepare_invoke();
        for key in call.keys {
            invocation.key(key);
        }
        invocation
            .arg(call.cost)
            .arg(if call.consume { "1" } else { "0" })
            .arg(rand::random::<u64>());
        for (spec, shadow) in call.group.specs.iter().zip(call.group.shadow) {
            invocation
                .arg(spec.code())
                .arg(spec.limit)
                .arg(spec.window)
                .arg(spec.capacity)
                .arg(spec.interval)
                .arg(if *shadow { "1" } else { "0" });
        }
        // A check that times out may still run on the server once (it cannot be undone): the caller counts it.
        let reply: Vec<i64> = self.eval("rate_limit", &invocation).await?;
        let n = call.keys.len();
        if reply.len() != 1 + 5 * n {
            return Err(self.protocol_err("rate_limit", &format!("{reply:?}")));
        }
        let verdicts = reply[1..]
            .chunks_exact(5)
            .map(|c| Verdict {
                allowed: c[0] == 1,
                remaining: c[1],
                reset: c[2],
                retry: c[3],
                corrupt: c[4] == 1,
            })
            .collect();
        Ok(RateReply {
            allowed: reply[0] == 1,
            verdicts,
        })
    }

    pub(crate) async fn scan(&self, pattern: &str, batch: usize) -> Result<Vec<KeyTtl>> {
        let mut conn = self.conn.clone();
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
                self.call("scan", scan.query_async(&mut conn)).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("PTTL").arg(k);
                }
                let ttls: Vec<i64> = self.call("scan", pipe.query_async(&mut conn)).await?;
                for (key, ttl) in keys.into_iter().zip(ttls) {
                    // -2: expired between SCAN and PTTL.
                    if ttl == -2 {
                        continue;
                    }
                    let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
                    out.push(KeyTtl { key, ttl });
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }
}

/// Disarmed when the call got an answer; dropped armed (a timeout, a dropped connection, or the caller's
/// future dropped mid-call), it sends its cleanup.
struct CleanupGuard<'a, F: FnOnce() -> Cleanup> {
    backend: &'a RedisBackend,
    cleanup: Option<F>,
}

impl<F: FnOnce() -> Cleanup> CleanupGuard<'_, F> {
    fn disarm(mut self) {
        self.cleanup = None;
    }
}

impl<F: FnOnce() -> Cleanup> Drop for CleanupGuard<'_, F> {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            self.backend.spawn_cleanup(cleanup());
        }
    }
}

/// Whether a failed call may still have been executed by the server (it was sent, no answer came back).
fn may_have_run(e: &RedisError) -> bool {
    !e.is_connection_refusal() && (e.is_timeout() || e.is_io_error() || e.is_connection_dropped())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A stored epoch field: absent is 0; anything but a decimal integer below 2^53 is corrupt (`None`).
fn epoch(field: Option<&str>) -> Option<u64> {
    match field {
        None => Some(0),
        Some(f) => f.parse::<u64>().ok().filter(|n| *n < 1 << 53),
    }
}

fn gen_of(v: &Value) -> Option<u64> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
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
    fn version_gate() {
        assert!(check_version("# Server\r\nredis_version:7.0.15\r\n").is_ok());
        assert!(check_version("redis_version:8.2.1").is_ok());
        let e = check_version("redis_version:6.2.14").unwrap_err();
        assert!(e.contains("7.0"), "{e}");
        assert!(check_version("nothing").is_err());
    }
}
