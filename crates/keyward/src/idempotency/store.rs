//! The idempotency operations on both backends: one Lua script each on Redis (the `idempotency_*.lua` files
//! next to this one), mirrored line for line over the embedded keyspace.
//!
//! A record is a hash `{f: fingerprint, s: p (in progress) | c (completed), t: lease token, r: response}`.

use std::time::Duration;

use bytes::Bytes;

use crate::backend::{Backend, Kv, Reply, Undo, Val, scripts};
use crate::error::Result;

scripts! {
    begin: "idempotency_begin.lua";
    complete: "idempotency_complete.lua";
    abandon: "idempotency_abandon.lua";
    extend: "idempotency_extend.lua";
}

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
    // A begin that gets no answer may still write an in-progress marker when the server resumes: its undo
    // (abandon, only while the marker holds this token) removes it, so a retry gets a definite answer instead
    // of `InProgress` for the whole lease.
    let call = SCRIPTS
        .begin
        .call("idempotency_begin")
        .key(key)
        .arg(fingerprint)
        .arg(token)
        .arg(lease_ms)
        .undo(Undo {
            script: &SCRIPTS.abandon,
            keys: vec![key.to_owned()],
            args: vec![token.as_bytes().to_vec()],
            within: Duration::from_millis(lease_ms.unsigned_abs()),
        });
    b.atomic(
        call,
        |kv| {
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
        },
        |reply| match reply.array()? {
            [Reply::Int(0)] => Some(Began::New),
            [Reply::Int(1), pttl] => Some(Began::InProgress(pttl.int()?)),
            [Reply::Int(2), resp] => Some(Began::Completed(resp.bytes()?)),
            [Reply::Int(3)] => Some(Began::Mismatch),
            _ => None,
        },
    )
    .await
}

fn holds(kv: &Kv, key: &str, token: &str) -> bool {
    kv.get_hash(key).is_some_and(|h| {
        h.get("s").map(|s| &s[..]) == Some(b"p")
            && h.get("t").map(|t| &t[..]) == Some(token.as_bytes())
    })
}

fn one(reply: &Reply) -> Option<bool> {
    Some(reply.int()? == 1)
}

pub(crate) async fn complete(
    b: &Backend,
    key: &str,
    token: &str,
    response: &[u8],
    ttl_ms: i64,
) -> Result<bool> {
    let call = SCRIPTS
        .complete
        .call("idempotency_complete")
        .key(key)
        .arg(token)
        .arg(response)
        .arg(ttl_ms);
    b.atomic(
        call,
        |kv| {
            if !holds(kv, key, token) {
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
            if let Some(Val::Hash(h)) = kv.get_mut(key) {
                h.remove("t");
            }
            kv.pexpire(key, ttl_ms);
            true
        },
        one,
    )
    .await
}

/// Remove the in-progress marker held under `token`. It must land: if the breaker is open or Redis does not
/// answer, it is retried in the background (bypassing the breaker) until the server answers, for at most
/// `lease_ms`.
pub(crate) async fn abandon(b: &Backend, key: &str, token: &str, lease_ms: i64) -> Result<bool> {
    let call = SCRIPTS
        .abandon
        .call("idempotency_abandon")
        .key(key)
        .arg(token)
        .must_land(Undo {
            script: &SCRIPTS.abandon,
            keys: vec![key.to_owned()],
            args: vec![token.as_bytes().to_vec()],
            within: Duration::from_millis(lease_ms.unsigned_abs()),
        });
    b.atomic(call, |kv| holds(kv, key, token) && kv.del(key), one)
        .await
}

pub(crate) async fn extend(b: &Backend, key: &str, token: &str, lease_ms: i64) -> Result<bool> {
    let call = SCRIPTS
        .extend
        .call("idempotency_extend")
        .key(key)
        .arg(token)
        .arg(lease_ms);
    b.atomic(
        call,
        |kv| holds(kv, key, token) && kv.pexpire(key, lease_ms),
        one,
    )
    .await
}
