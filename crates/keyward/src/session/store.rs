//! The session operations on both backends: each one Lua script on Redis (the `session_*.lua` files here) and
//! its line-for-line mirror over the embedded store, one critical section each.
//!
//! A session is a hash `{u: user, d: data, v: version, c: created ms, e: last extension ms, i: index key}`
//! whose key expires at `min(e + idle, c + absolute)`. The user's index is a sorted set of session keys
//! scored by their expiry; it drops dead members whenever it is touched and expires with its longest-lived
//! member, so it never outlives, or lists, a dead session.
//!
//! **Cluster:** a session's key is in its user's index's slot (the caller builds it so, see the
//! [module](super)), so every script here touches one slot. Where the caller knows the index it is passed in
//! `KEYS`; `get`, `regenerate` and `destroy` by token do not know the user and reach the index through the
//! session's `i` field, and `list`/`destroy_all` reach sessions through the index's members — keys not
//! declared in `KEYS` but in the same slot, which Redis Cluster allows (it refuses only other slots).

use std::collections::HashMap;

use bytes::Bytes;

use crate::backend::{Backend, Kv, Reply, Val, scripts};
use crate::error::Result;

scripts! {
    create: "session_create.lua";
    get: "session_get.lua";
    save: "session_save.lua";
    regenerate: "session_regenerate.lua";
    destroy: "session_destroy.lua";
    destroy_all: "session_destroy_all.lua";
    list: "session_list.lua";
}

/// The timeouts of a class, in ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) idle: i64,
    pub(crate) absolute: i64,
    pub(crate) extend_after: i64,
}

/// A session found by `get`.
#[derive(Debug)]
pub(crate) struct Found {
    /// Index (0-based) of the candidate key that matched.
    pub(crate) which: usize,
    pub(crate) user: String,
    pub(crate) data: Bytes,
    pub(crate) version: u64,
    pub(crate) created_ms: i64,
    pub(crate) extended_ms: i64,
    pub(crate) expires_ms: i64,
}

/// What `save` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SaveReply {
    Saved(u64),
    Conflict(u64),
    Gone,
}

/// What `regenerate` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Regenerated {
    Moved,
    Missing,
    Collision,
}

/// One live session in a user's index.
#[derive(Debug)]
pub(crate) struct Listed {
    pub(crate) key: String,
    pub(crate) created_ms: i64,
    pub(crate) extended_ms: i64,
    pub(crate) expires_ms: i64,
}

fn num(b: Option<&Bytes>) -> i64 {
    b.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn bytes_of(s: impl std::fmt::Display) -> Bytes {
    Bytes::from(s.to_string())
}

/// Drop dead members of an index; it then lives exactly as long as its longest-lived member.
fn index_trim(kv: &mut Kv, index: &str) {
    let now = kv.now_ms();
    let Some(z) = kv.zset_mut(index) else {
        return;
    };
    z.retain(|_, exp| *exp > now);
    match z.values().max().copied() {
        Some(last) => {
            kv.pexpire(index, last - now);
        }
        None => {
            kv.del(index);
        }
    }
}

/// `ZADD`; true if it created the set (which then has no expiry of its own yet, like `PTTL` -1 on Redis).
fn zadd(kv: &mut Kv, index: &str, member: &str, score: i64) -> bool {
    match kv.zset_mut(index) {
        Some(z) => {
            z.insert(member.to_owned(), score);
            false
        }
        None => {
            let z = HashMap::from([(member.to_owned(), score)]);
            kv.set(index, Val::ZSet(z), i64::MAX / 4);
            true
        }
    }
}

fn zrem(kv: &mut Kv, index: &str, member: &str) {
    if let Some(z) = kv.zset_mut(index) {
        z.remove(member);
        if z.is_empty() {
            kv.del(index);
        }
    }
}

pub(crate) async fn create(
    b: &Backend,
    key: &str,
    index: &str,
    user: &str,
    data: &[u8],
    t: Timeouts,
) -> Result<Option<(i64, i64)>> {
    let call = SCRIPTS
        .create
        .call("session_create")
        .key(key)
        .key(index)
        .arg(user)
        .arg(data)
        .arg(t.idle)
        .arg(t.absolute);
    b.atomic(
        call,
        |kv| {
            let now = kv.now_ms();
            if kv.exists(key) {
                return None;
            }
            let exp = now + t.idle.min(t.absolute);
            kv.set(
                key,
                Val::Hash(HashMap::new()),
                exp - now, // the PEXPIRE below
            );
            kv.hset(
                key,
                &[
                    ("u", Bytes::copy_from_slice(user.as_bytes())),
                    ("d", Bytes::copy_from_slice(data)),
                    ("v", bytes_of(1)),
                    ("c", bytes_of(now)),
                    ("e", bytes_of(now)),
                    ("i", Bytes::copy_from_slice(index.as_bytes())),
                ],
                exp - now,
            );
            let _ = zadd(kv, index, key, exp);
            index_trim(kv, index);
            Some((now, exp))
        },
        |reply| match reply.ints()?.as_slice() {
            [1, now, exp] => Some(Some((*now, *exp))),
            [0] => Some(None),
            _ => None,
        },
    )
    .await
}

pub(crate) async fn get(b: &Backend, keys: &[String], t: Timeouts) -> Result<Option<Found>> {
    let mut call = SCRIPTS.get.call("session_get");
    for k in keys {
        call = call.key(k);
    }
    let call = call.arg(t.idle).arg(t.absolute).arg(t.extend_after);
    b.atomic(
        call,
        |kv| {
            let now = kv.now_ms();
            for (which, s) in keys.iter().enumerate() {
                let Some(h) = kv.get_hash(s) else { continue };
                let user = h.get("u").cloned().unwrap_or_default();
                let data = h.get("d").cloned().unwrap_or_default();
                let version = u64::try_from(num(h.get("v"))).unwrap_or(0);
                let index =
                    String::from_utf8_lossy(h.get("i").map_or(&b""[..], |b| b)).into_owned();
                let c = num(h.get("c"));
                let mut e = num(h.get("e"));
                let mut exp = (e + t.idle).min(c + t.absolute);
                if exp <= now {
                    kv.del(s);
                    zrem(kv, &index, s);
                    return None;
                }
                if now - e >= t.extend_after {
                    e = now;
                    exp = (now + t.idle).min(c + t.absolute);
                    kv.hset(s, &[("e", bytes_of(now))], 1);
                    kv.pexpire(s, exp - now);
                    let created = zadd(kv, &index, s, exp);
                    if created || kv.pttl(&index) < exp - now {
                        kv.pexpire(&index, exp - now);
                    }
                }
                return Some(Found {
                    which,
                    user: String::from_utf8_lossy(&user).into_owned(),
                    data,
                    version,
                    created_ms: c,
                    extended_ms: e,
                    expires_ms: exp,
                });
            }
            None
        },
        |reply| {
            if reply.is_nil() {
                return Some(None);
            }
            let [which, user, data, version, c, e, exp] = reply.array()? else {
                return None;
            };
            Some(Some(Found {
                which: usize::try_from(which.int()?).ok()?.checked_sub(1)?,
                user: String::from_utf8(user.bytes()?.to_vec()).ok()?,
                data: data.bytes()?,
                version: u64::try_from(version.int()?).ok()?,
                created_ms: c.int()?,
                extended_ms: e.int()?,
                expires_ms: exp.int()?,
            }))
        },
    )
    .await
}

pub(crate) async fn save(b: &Backend, key: &str, expected: u64, data: &[u8]) -> Result<SaveReply> {
    let call = SCRIPTS
        .save
        .call("session_save")
        .key(key)
        .arg(expected)
        .arg(data);
    b.atomic(
        call,
        |kv| {
            let Some(h) = kv.get_hash(key) else {
                return SaveReply::Gone;
            };
            let v = u64::try_from(num(h.get("v"))).unwrap_or(0);
            if v != expected {
                return SaveReply::Conflict(v);
            }
            kv.hset(
                key,
                &[("d", Bytes::copy_from_slice(data)), ("v", bytes_of(v + 1))],
                1,
            );
            SaveReply::Saved(v + 1)
        },
        |reply| {
            let v = |n: i64| u64::try_from(n).unwrap_or(0);
            match reply.ints()?.as_slice() {
                [1, n] => Some(SaveReply::Saved(v(*n))),
                [2, n] => Some(SaveReply::Conflict(v(*n))),
                [0] => Some(SaveReply::Gone),
                _ => None,
            }
        },
    )
    .await
}

pub(crate) async fn regenerate(b: &Backend, old: &[String], new: &str) -> Result<Regenerated> {
    let mut call = SCRIPTS.regenerate.call("session_regenerate");
    for k in old {
        call = call.key(k);
    }
    let call = call.key(new);
    b.atomic(
        call,
        |kv| {
            if kv.exists(new) {
                return Regenerated::Collision;
            }
            for s in old {
                let Some(idx) = kv.get_hash(s).and_then(|h| h.get("i").cloned()) else {
                    continue;
                };
                let idx = String::from_utf8_lossy(&idx).into_owned();
                let now = kv.now_ms();
                let pttl = kv.pttl(s);
                kv.rename(s, new);
                zrem(kv, &idx, s);
                let created = zadd(kv, &idx, new, now + pttl);
                if created || kv.pttl(&idx) < pttl {
                    kv.pexpire(&idx, pttl);
                }
                return Regenerated::Moved;
            }
            Regenerated::Missing
        },
        |reply| match reply.ints()?.as_slice() {
            [1] => Some(Regenerated::Moved),
            [0] => Some(Regenerated::Missing),
            [2] => Some(Regenerated::Collision),
            _ => None,
        },
    )
    .await
}

/// Delete sessions by key; with `only_index`, only those indexed under it (which must be in the keys'
/// slot). Returns how many.
pub(crate) async fn destroy(b: &Backend, keys: &[String], only_index: Option<&str>) -> Result<u64> {
    let mut call = SCRIPTS.destroy.call("session_destroy");
    for k in keys {
        call = call.key(k);
    }
    let call = match only_index {
        Some(index) => call.key(index).arg(1),
        None => call.arg(0),
    };
    b.atomic(
        call,
        |kv| {
            let mut n = 0;
            for s in keys {
                let Some(idx) = kv.get_hash(s).and_then(|h| h.get("i").cloned()) else {
                    continue;
                };
                let idx = String::from_utf8_lossy(&idx).into_owned();
                if only_index.is_none_or(|o| o == idx) {
                    zrem(kv, &idx, s);
                    n += u64::from(kv.del(s));
                }
            }
            n
        },
        count,
    )
    .await
}

fn count(reply: &Reply) -> Option<u64> {
    u64::try_from(reply.int()?).ok()
}

pub(crate) async fn destroy_all(b: &Backend, index: &str) -> Result<u64> {
    let call = SCRIPTS.destroy_all.call("session_destroy_all").key(index);
    b.atomic(
        call,
        |kv| {
            let members: Vec<String> = kv
                .zset_mut(index)
                .map(|z| z.keys().cloned().collect())
                .unwrap_or_default();
            let mut n = 0;
            for s in members {
                n += u64::from(kv.del(&s));
            }
            kv.del(index);
            n
        },
        count,
    )
    .await
}

pub(crate) async fn list(b: &Backend, index: &str) -> Result<Vec<Listed>> {
    let call = SCRIPTS.list.call("session_list").key(index);
    b.atomic(
        call,
        |kv| {
            let now = kv.now_ms();
            index_trim(kv, index);
            let members: Vec<String> = kv
                .zset_mut(index)
                .map(|z| z.keys().cloned().collect())
                .unwrap_or_default();
            let mut out = Vec::new();
            for s in members {
                let pttl = kv.pttl(&s);
                match kv.get_hash(&s) {
                    Some(h) if pttl > 0 => out.push(Listed {
                        created_ms: num(h.get("c")),
                        extended_ms: num(h.get("e")),
                        expires_ms: now + pttl,
                        key: s,
                    }),
                    _ => zrem(kv, index, &s),
                }
            }
            out
        },
        |reply| {
            let items = reply.array()?;
            let mut out = Vec::with_capacity(items.len() / 4);
            for c in items.chunks(4) {
                let [k, created, ext, exp] = c else {
                    return None;
                };
                out.push(Listed {
                    key: String::from_utf8_lossy(&k.bytes()?).into_owned(),
                    created_ms: created.int()?,
                    extended_ms: ext.int()?,
                    expires_ms: exp.int()?,
                });
            }
            Some(out)
        },
    )
    .await
}
