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

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ProtocolVersion, PushInfo, PushKind, RedisError,
    Script, Value,
};

use super::{Entry, Fetched, KeyTtl, Namespace};
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
    fetch: Script::new(include_str!("fetch.lua")),
    read: Script::new(include_str!("read.lua")),
    commit: Script::new(include_str!("commit.lua")),
    release: Script::new(include_str!("release.lua")),
    set: Script::new(include_str!("set.lua")),
    invalidate: Script::new(include_str!("invalidate.lua")),
    bump: Script::new(include_str!("bump.lua")),
    heal: Script::new(include_str!("heal.lua")),
    ratelimit: Script::new(include_str!("ratelimit.lua")),
});

/// The oldest server keyward runs on: `SET … NX GET` (get-or-lease in one command) arrived in 7.0.
const MIN_REDIS_MAJOR: u32 = 7;

pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    server: String,
    response_timeout: Duration,
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

/// A URL with any `user:password@` removed, for messages.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            match rest[..auth_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

impl RedisBackend {
    pub(crate) async fn connect(
        url: &str,
        options: &ConnectOptions,
        ns: &Namespace,
        bus: Arc<WakeBus>,
    ) -> Result<Self> {
        let client = Client::open(url).map_err(|e| Error::InvalidUrl {
            reason: format!(
                "{}: {}",
                redact(url),
                e.detail().unwrap_or("not a Redis URL")
            ),
        })?;
        let info = client.get_connection_info().clone();
        let server = describe(info.addr());
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            // redis-rs enables rustls without a crypto provider; install ring's unless the app chose one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client =
            Client::open(info.set_redis_settings(settings)).map_err(|e| Error::InvalidUrl {
                reason: e.to_string(),
            })?;
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
            .set_max_delay(Duration::from_secs(2))
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

    /// Run one script invocation on the shared connection, mapping failures to a typed error for `op`.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|err| self.err(op, err))
    }

    /// Run one script invocation, bounded as a whole (including any wait for a reconnect in progress) by the
    /// response timeout. Sessions, locks and idempotency keys use this: a request should fail fast, not hang.
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        tokio::time::timeout(self.response_timeout, self.invoke(op, invocation))
            .await
            .map_err(|_| Error::Timeout {
                server: self.server.clone(),
                op,
                timeout: self.response_timeout,
            })?
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
        let (stored, gens): (Option<Vec<u8>>, Vec<Option<u64>>) = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|err| self.err("fetch", err))?;
        let gens = match gens.as_slice() {
            [ns, class] => Gens {
                ns: ns.unwrap_or(0),
                class: class.unwrap_or(0),
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

    async fn fetch_atomic(
        &self,
        e: &Entry<'_>,
        marker: &str,
        lease_ttl: Duration,
        negative_ok: bool,
    ) -> Result<Fetched> {
        let mut reply: Vec<Value> = self
            .invoke(
                "fetch",
                SCRIPTS
                    .fetch
                    .key(e.key)
                    .key(&e.ns.gens_key)
                    .arg(e.class)
                    .arg(marker)
                    .arg(millis(lease_ttl))
                    .arg(if negative_ok { "1" } else { "0" }),
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
            .invoke(
                "read",
                SCRIPTS.read.key(e.key).key(&e.ns.gens_key).arg(e.class),
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
            .invoke(
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
            .invoke(
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
            .invoke(
                "set",
                SCRIPTS
                    .set
                    .key(e.key)
                    .key(&e.ns.gens_key)
                    .arg(e.class)
                    .arg(body)
                    .arg(millis(ttl))
                    .arg(&e.ns.channel),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn invalidate(&self, e: &Entry<'_>) -> Result<bool> {
        let n: i64 = self
            .invoke(
                "invalidate",
                SCRIPTS.invalidate.key(e.key).arg(&e.ns.channel),
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn bump(&self, ns: &Namespace, field: &str) -> Result<u64> {
        let n: u64 = self
            .invoke(
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
        let n: i64 = self.invoke("heal", SCRIPTS.heal.key(key).arg(raw)).await?;
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
        // The whole call, including any wait for a reconnect in progress, is bounded by the response timeout:
        // a rate-limit check must fail over to `on_error` quickly rather than hold the request.
        let reply: Vec<i64> = tokio::time::timeout(
            self.response_timeout,
            self.invoke("rate_limit", &invocation),
        )
        .await
        .map_err(|_| Error::Timeout {
            server: self.server.clone(),
            op: "rate_limit",
            timeout: self.response_timeout,
        })??;
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
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(batch.max(1))
                .query_async(&mut conn)
                .await
                .map_err(|err| self.err("scan", err))?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("PTTL").arg(k);
                }
                let ttls: Vec<i64> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|err| self.err("scan", err))?;
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
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
