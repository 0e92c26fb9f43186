//! The idempotency operations on both backends: one Lua script each on Redis
//! (`backend/redis/idempotency_*.lua`), mirrored line for line over the embedded store.

use std::sync::LazyLock;

use bytes::Bytes;
use redis::{Script, Value};

use crate::backend::Backend;
use crate::backend::redis::Cleanup;
use crate::error::Result;

struct Scripts {
    begin: Script,
    complete: Script,
    abandon: Script,
    extend: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    begin: Script::new(include_str!("../backend/redis/idempotency_begin.lua")),
    complete: Script::new(include_str!("../backend/redis/idempotency_complete.lua")),
    abandon: Script::new(include_str!("../backend/redis/idempotency_abandon.lua")),
    extend: Script::new(include_str!("../backend/redis/idempotency_extend.lua")),
});

/// What `begin` found.
#[derive(Debug)]
pub(crate) enum Began {
    New,
    InProgress(i64),
    Completed(Bytes),
    Mismatch,
}

pub(crate) async fn begin(
    b: &Backend,
    key: &str,
    fingerprint: &[u8],
    token: &str,
    lease_ms: i64,
) -> Result<Began> {
    match b {
        Backend::Memory(m) => m.keyspace.with(|kv| {
            let Some(h) = kv.get_hash(key) else {
                kv.hset(
                    key,
                    &[
                        ("f", Bytes::copy_from_slice(fingerprint)),
                        ("s", Bytes::from_static(b"p")),
                        ("t", Bytes::copy_from_slice(token.as_bytes())),
                    ],
                    lease_ms,
                );
                kv.pexpire(key, lease_ms);
                return Began::New;
            };
            if h.get("f").map(|f| &f[..]) != Some(fingerprint) {
                return Began::Mismatch;
            }
            if h.get("s").map(|s| &s[..]) == Some(b"p") {
                return Began::InProgress(kv.pttl(key));
            }
            Began::Completed(h.get("r").cloned().unwrap_or_default())
        }),
        Backend::Redis(r) => {
            // A begin that gets no answer may still write an in-progress marker when the server resumes: its
            // cleanup (abandon, only while the marker holds this token) removes it, so a retry gets a
            // definite answer instead of `InProgress` for the whole lease.
            let mut reply: Vec<Value> = r
                .eval_cleaning(
                    "idempotency_begin",
                    SCRIPTS
                        .begin
                        .key(key)
                        .arg(fingerprint)
                        .arg(token)
                        .arg(lease_ms),
                    || Cleanup {
                        op: "idempotency_begin",
                        script: &SCRIPTS.abandon,
                        keys: vec![key.to_owned()],
                        args: vec![token.as_bytes().to_vec()],
                        within: std::time::Duration::from_millis(lease_ms.unsigned_abs()),
                    },
                )
                .await?;
            if let [Value::Int(2), Value::BulkString(resp)] = reply.as_mut_slice() {
                return Ok(Began::Completed(Bytes::from(std::mem::take(resp))));
            }
            match reply.as_slice() {
                [Value::Int(0)] => Ok(Began::New),
                [Value::Int(1), Value::Int(pttl)] => Ok(Began::InProgress(*pttl)),
                [Value::Int(3)] => Ok(Began::Mismatch),
                other => Err(r.protocol_err("idempotency_begin", &format!("{other:?}"))),
            }
        }
    }
}

pub(crate) async fn complete(
    b: &Backend,
    key: &str,
    token: &str,
    response: &[u8],
    ttl_ms: i64,
) -> Result<bool> {
    match b {
        Backend::Memory(m) => m.keyspace.with(|kv| {
            let held = kv.get_hash(key).is_some_and(|h| {
                h.get("s").map(|s| &s[..]) == Some(b"p")
                    && h.get("t").map(|t| &t[..]) == Some(token.as_bytes())
            });
            if !held {
                return false;
            }
            kv.hset(
                key,
                &[
                    ("s", Bytes::from_static(b"c")),
                    ("r", Bytes::copy_from_slice(response)),
                ],
                ttl_ms,
            );
            if let Some(crate::backend::memory::keyspace::Val::Hash(h)) = kv.get_mut(key) {
                h.remove("t");
            }
            kv.pexpire(key, ttl_ms);
            true
        }),
        Backend::Redis(r) => {
            let n: i64 = r
                .eval(
                    "idempotency_complete",
                    SCRIPTS
                        .complete
                        .key(key)
                        .arg(token)
                        .arg(response)
                        .arg(ttl_ms),
                )
                .await?;
            Ok(n == 1)
        }
    }
}

pub(crate) async fn abandon(b: &Backend, key: &str, token: &str) -> Result<bool> {
    match b {
        Backend::Memory(m) => m.keyspace.with(|kv| {
            let held = kv.get_hash(key).is_some_and(|h| {
                h.get("s").map(|s| &s[..]) == Some(b"p")
                    && h.get("t").map(|t| &t[..]) == Some(token.as_bytes())
            });
            held && kv.del(key)
        }),
        Backend::Redis(r) => {
            let n: i64 = r
                .eval("idempotency_abandon", SCRIPTS.abandon.key(key).arg(token))
                .await?;
            Ok(n == 1)
        }
    }
}

fn holds(kv: &crate::backend::memory::keyspace::Kv, key: &str, token: &str) -> bool {
    kv.get_hash(key).is_some_and(|h| {
        h.get("s").map(|s| &s[..]) == Some(b"p")
            && h.get("t").map(|t| &t[..]) == Some(token.as_bytes())
    })
}

pub(crate) async fn extend(b: &Backend, key: &str, token: &str, lease_ms: i64) -> Result<bool> {
    match b {
        Backend::Memory(m) => m
            .keyspace
            .with(|kv| holds(kv, key, token) && kv.pexpire(key, lease_ms)),
        Backend::Redis(r) => {
            let n: i64 = r
                .eval(
                    "idempotency_extend",
                    SCRIPTS.extend.key(key).arg(token).arg(lease_ms),
                )
                .await?;
            Ok(n == 1)
        }
    }
}
