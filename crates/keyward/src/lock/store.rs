//! The five lock operations. Each is one Lua script on Redis (the `lock_*.lua` files next to this one) and one
//! critical section of the embedded keyspace that mirrors the script line for line, side by side, so both
//! backends agree by construction; `tests/lock.rs` checks that they do.

use std::time::Duration;

use bytes::Bytes;

use super::FencedWrite;
use crate::Keyward;
use crate::backend::{Kv, Reply, Undo, Val, scripts};
use crate::error::Result;

scripts! {
    acquire: "lock_acquire.lua";
    release: "lock_release.lua";
    extend: "lock_extend.lua";
    fenced_write: "lock_fenced_write.lua";
    fenced_read: "lock_fenced_read.lua";
}

/// The three keys of one lock. They share the lock key's hash tag (`{id}`), so one Cluster slot holds them.
#[derive(Debug, Clone)]
pub(super) struct LockKeys {
    /// `L`: the lease, holding the holder's token.
    pub(super) lock: String,
    /// `F`: the last fencing token issued.
    pub(super) fence: String,
    /// `W`: the fenced value, a hash `{t: token, v: value}`.
    pub(super) value: String,
}

impl LockKeys {
    pub(super) fn new(lock: String) -> Self {
        LockKeys {
            fence: format!("{lock}:f"),
            value: format!("{lock}:w"),
            lock,
        }
    }
}

/// What one acquisition attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    /// Taken, with this fencing token.
    Acquired(u64),
    /// Held by someone else; its lease ends within this long (`None`: the key has no TTL, which keyward
    /// never writes).
    Held(Option<Duration>),
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Lua's `tonumber(x) or 0` for a stored decimal.
fn number(b: Option<&Bytes>) -> i64 {
    b.and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
        .unwrap_or(0)
}

/// A stored fencing counter as `lock_acquire.lua` reads it: anything but an integer in `0..2^53` is corrupt
/// and counts as 0 (the clock floor then takes over).
fn fence_counter(b: Option<&Bytes>) -> i64 {
    Some(number(b))
        .filter(|n| (0..1 << 53).contains(n))
        .unwrap_or(0)
}

fn string(v: impl ToString) -> Val {
    Val::Str(Bytes::from(v.to_string()))
}

fn pttl(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// `lock_acquire.lua`.
pub(super) async fn acquire(
    kw: &Keyward,
    keys: &LockKeys,
    token: &str,
    ttl: Duration,
    fence_ttl: Duration,
) -> Result<Attempt> {
    let (ttl_ms, fence_ttl_ms) = (millis(ttl), millis(fence_ttl));
    // An acquire that gets no answer may still take the lock when the server resumes: its undo (a
    // compare-and-delete release, sent after it on the same connection) gives it back.
    let call = SCRIPTS
        .acquire
        .call("lock_acquire")
        .key(&keys.lock)
        .key(&keys.fence)
        .arg(token)
        .arg(ttl_ms)
        .arg(fence_ttl_ms)
        .undo(release_undo(kw, keys, token, ttl));
    kw.inner
        .backend
        .atomic(
            call,
            |kv: &mut Kv| {
                let left = kv.pttl(&keys.lock);
                if left != -2 {
                    return Attempt::Held(pttl(left));
                }
                let now_us = kv.now_us();
                let prev = fence_counter(kv.get_str(&keys.fence));
                let fence = (prev + 1).max(now_us);
                kv.set(&keys.fence, string(fence), fence_ttl_ms);
                kv.set(&keys.lock, string(token), ttl_ms);
                Attempt::Acquired(u64::try_from(fence).unwrap_or(0))
            },
            |reply| match reply.ints()?.as_slice() {
                [1, fence] if *fence > 0 => Some(Attempt::Acquired(fence.unsigned_abs())),
                [0, left] => Some(Attempt::Held(pttl(*left))),
                _ => None,
            },
        )
        .await
}

/// A compare-and-delete release of the lock held under `token` (`lock_release.lua`), for at most `within`:
/// the undo of an acquire that got no answer, and a release that must land.
fn release_undo(kw: &Keyward, keys: &LockKeys, token: &str, within: Duration) -> Undo {
    Undo {
        script: &SCRIPTS.release,
        keys: vec![keys.lock.clone()],
        args: vec![
            token.as_bytes().to_vec(),
            kw.inner
                .backend
                .wake_channel(&kw.inner.ns, &keys.lock)
                .as_bytes()
                .to_vec(),
        ],
        within,
    }
}

fn one(reply: &Reply) -> Option<bool> {
    Some(reply.int()? == 1)
}

/// `lock_release.lua`. The embedded backend has no pub/sub: local waiters are woken here (on Redis the script
/// published too; a second wake-up only makes a waiter look again).
///
/// The release must land: if the breaker is open or Redis does not answer, it is retried in the background
/// (bypassing the breaker) until the server answers, for at most `ttl` (the lease's length).
pub(super) async fn release(
    kw: &Keyward,
    keys: &LockKeys,
    token: &str,
    ttl: Duration,
) -> Result<bool> {
    let call = SCRIPTS
        .release
        .call("lock_release")
        .key(&keys.lock)
        .arg(token)
        .arg(&*kw.inner.backend.wake_channel(&kw.inner.ns, &keys.lock))
        .must_land(release_undo(kw, keys, token, ttl));
    let released = kw
        .inner
        .backend
        .atomic(
            call,
            |kv| {
                if kv.get_str(&keys.lock).map(|b| &b[..]) != Some(token.as_bytes()) {
                    return false;
                }
                kv.del(&keys.lock);
                true
            },
            one,
        )
        .await?;
    if released {
        kw.inner.bus.wake(&keys.lock);
    }
    Ok(released)
}

/// `lock_extend.lua`.
pub(super) async fn extend(
    kw: &Keyward,
    keys: &LockKeys,
    token: &str,
    ttl: Duration,
    fence: u64,
    fence_ttl: Duration,
) -> Result<bool> {
    let (ttl_ms, fence_ttl_ms) = (millis(ttl), millis(fence_ttl));
    let call = SCRIPTS
        .extend
        .call("lock_extend")
        .key(&keys.lock)
        .key(&keys.fence)
        .arg(token)
        .arg(ttl_ms)
        .arg(fence_ttl_ms)
        .arg(fence);
    kw.inner
        .backend
        .atomic(
            call,
            |kv| {
                if kv.get_str(&keys.lock).map(|b| &b[..]) != Some(token.as_bytes()) {
                    return false;
                }
                kv.pexpire(&keys.lock, ttl_ms);
                if !kv.exists(&keys.fence) {
                    kv.set(
                        &keys.fence,
                        Val::Str(Bytes::from(fence.to_string())),
                        fence_ttl_ms,
                    );
                } else if kv.pttl(&keys.fence) >= 0 && kv.pttl(&keys.fence) < fence_ttl_ms {
                    kv.pexpire(&keys.fence, fence_ttl_ms);
                }
                true
            },
            one,
        )
        .await
}

/// `lock_fenced_write.lua`. `fence` is at most 2^53 - 1 (checked by the caller), so Lua holds it exactly.
pub(super) async fn fenced_write(
    kw: &Keyward,
    keys: &LockKeys,
    fence: u64,
    value: &[u8],
    fence_ttl: Duration,
) -> Result<FencedWrite> {
    let fence_ttl_ms = millis(fence_ttl);
    let fence_i = i64::try_from(fence).unwrap_or(i64::MAX);
    let call = SCRIPTS
        .fenced_write
        .call("lock_fenced_write")
        .key(&keys.value)
        .key(&keys.fence)
        .arg(fence)
        .arg(value)
        .arg(fence_ttl_ms);
    kw.inner
        .backend
        .atomic(
            call,
            |kv| {
                let now_us = kv.now_ms().saturating_mul(1000).saturating_add(999);
                let counter = fence_counter(kv.get_str(&keys.fence));
                if fence_i > counter.max(now_us) {
                    return Err(never_issued(keys, fence));
                }
                let written = fence_counter(kv.get_hash(&keys.value).and_then(|h| h.get("t")));
                let highest = written.max(counter);
                if fence_i < highest {
                    return Ok(FencedWrite::Stale {
                        highest: highest.unsigned_abs(),
                    });
                }
                let fields = [
                    ("t", Bytes::from(fence.to_string())),
                    ("v", Bytes::copy_from_slice(value)),
                ];
                kv.hset(&keys.value, &fields, fence_ttl_ms);
                kv.pexpire(&keys.value, fence_ttl_ms);
                if kv.pttl(&keys.fence) >= 0 && kv.pttl(&keys.fence) < fence_ttl_ms {
                    kv.pexpire(&keys.fence, fence_ttl_ms);
                }
                Ok(FencedWrite::Applied)
            },
            |reply| match reply.ints()?.as_slice() {
                [1] => Some(Ok(FencedWrite::Applied)),
                [0, highest] => Some(Ok(FencedWrite::Stale {
                    highest: highest.unsigned_abs(),
                })),
                [2] => Some(Err(never_issued(keys, fence))),
                _ => None,
            },
        )
        .await?
}

fn never_issued(keys: &LockKeys, fence: u64) -> crate::error::Error {
    crate::error::Error::InvalidArgument {
        what: format!(
            "fencing token {fence} was never issued for lock `{}`",
            keys.lock
        ),
    }
}

/// `lock_fenced_read.lua`.
pub(super) async fn fenced_read(kw: &Keyward, keys: &LockKeys) -> Result<Option<(u64, Bytes)>> {
    let call = SCRIPTS
        .fenced_read
        .call("lock_fenced_read")
        .key(&keys.value);
    kw.inner
        .backend
        .atomic(
            call,
            |kv| {
                let h = kv.get_hash(&keys.value)?;
                let (t, v) = (h.get("t")?, h.get("v")?);
                Some((number(Some(t)).unsigned_abs(), v.clone()))
            },
            |reply| {
                if reply.is_nil() {
                    return Some(None);
                }
                match reply.array()? {
                    [t, v] => Some(Some((u64::try_from(t.int()?).ok()?, v.bytes()?))),
                    _ => None,
                }
            },
        )
        .await
}
