//! Reading a live stream's state, shared by `audit` (its stream checks) and `streams`: consumer groups
//! (`XINFO GROUPS`), their consumers (`XINFO CONSUMERS`), pending entries (`XPENDING`), the age of the first
//! entry (`XRANGE … COUNT 1`).
//!
//! The one decision: **only read-only, bounded commands**: no entry bodies beyond one, pending entries read
//! one page at a time (a count at the page size means "at least"). Replies are read in RESP2 and RESP3
//! shapes alike, and a field Redis does not report (`lag` before Redis 7) is `None`, not an error.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use redis::Value;
use redis::aio::MultiplexedConnection;

/// One consumer group, as `XINFO GROUPS` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupInfo {
    /// The group's name (raw bytes).
    pub(crate) name: Vec<u8>,
    pub(crate) consumers: u64,
    /// Entries delivered and not acknowledged (the PEL).
    pub(crate) pending: u64,
    /// Entries not yet delivered to the group (Redis 7+; `None` when unknown).
    pub(crate) lag: Option<u64>,
    pub(crate) last_delivered_id: String,
}

/// One consumer of a group, as `XINFO CONSUMERS` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConsumerInfo {
    pub(crate) name: Vec<u8>,
    pub(crate) pending: u64,
    /// Milliseconds since the consumer's last attempted interaction.
    pub(crate) idle_ms: u64,
}

/// The consumer groups of the stream at `key`.
pub(crate) async fn groups(
    conn: &mut MultiplexedConnection,
    key: &[u8],
) -> anyhow::Result<Vec<GroupInfo>> {
    let groups: Vec<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO GROUPS {}", String::from_utf8_lossy(key)))?;
    Ok(groups
        .iter()
        .map(|g| {
            let f = pairs(g);
            GroupInfo {
                name: field(&f, "name").and_then(as_bytes).unwrap_or_default(),
                consumers: field(&f, "consumers").and_then(as_u64).unwrap_or(0),
                pending: field(&f, "pending").and_then(as_u64).unwrap_or(0),
                lag: field(&f, "lag").and_then(as_u64),
                last_delivered_id: field(&f, "last-delivered-id")
                    .and_then(as_bytes)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            }
        })
        .collect())
}

/// The consumers of `group` on the stream at `key`.
pub(crate) async fn consumers(
    conn: &mut MultiplexedConnection,
    key: &[u8],
    group: &[u8],
) -> anyhow::Result<Vec<ConsumerInfo>> {
    let list: Vec<Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(key)
        .arg(group)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO CONSUMERS {}", String::from_utf8_lossy(key)))?;
    Ok(list
        .iter()
        .map(|c| {
            let f = pairs(c);
            ConsumerInfo {
                name: field(&f, "name").and_then(as_bytes).unwrap_or_default(),
                pending: field(&f, "pending").and_then(as_u64).unwrap_or(0),
                idle_ms: field(&f, "idle").and_then(as_u64).unwrap_or(0),
            }
        })
        .collect())
}

/// How many of `group`'s pending entries have been idle at least `idle_ms`, reading at most `page` of them
/// (`page` means "`page` or more").
pub(crate) async fn pending_idle(
    conn: &mut MultiplexedConnection,
    key: &[u8],
    group: &[u8],
    idle_ms: u64,
    page: usize,
) -> anyhow::Result<u64> {
    let idle: Vec<Value> = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg("IDLE")
        .arg(idle_ms)
        .arg("-")
        .arg("+")
        .arg(page)
        .query_async(conn)
        .await
        .with_context(|| format!("XPENDING {}", String::from_utf8_lossy(key)))?;
    Ok(idle.len() as u64)
}

/// `group`'s oldest pending entry, if it has one (`XPENDING key group - + 1`): its age by its id and how
/// long it has been idle since its last delivery, both in ms.
pub(crate) async fn oldest_pending(
    conn: &mut MultiplexedConnection,
    key: &[u8],
    group: &[u8],
) -> anyhow::Result<Option<(u64, u64)>> {
    let first: Vec<Value> = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1)
        .query_async(conn)
        .await
        .with_context(|| format!("XPENDING {}", String::from_utf8_lossy(key)))?;
    let Some(Value::Array(entry)) = first.first() else {
        return Ok(None);
    };
    let age = entry
        .first()
        .and_then(as_bytes)
        .and_then(|id| age_of_id(&id));
    let idle = entry.get(2).and_then(as_u64);
    Ok(age.zip(idle))
}

/// Age of the stream's first entry (by its id's milliseconds), if it has one.
pub(crate) async fn oldest_age_ms(
    conn: &mut MultiplexedConnection,
    key: &[u8],
) -> anyhow::Result<Option<u64>> {
    let first: Vec<Value> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .context("XRANGE … COUNT 1")?;
    let Some(Value::Array(entry)) = first.first() else {
        return Ok(None);
    };
    Ok(entry
        .first()
        .and_then(as_bytes)
        .and_then(|id| age_of_id(&id)))
}

/// Milliseconds between a stream id's time part and now (0 for an id from the future).
fn age_of_id(id: &[u8]) -> Option<u64> {
    let ms: u64 = std::str::from_utf8(id)
        .ok()?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    Some(now_ms().saturating_sub(ms))
}

/// The local clock, in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// A bulk or simple string's bytes.
pub(crate) fn as_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// A non-negative integer reply.
pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A RESP2 flat `[k, v, k, v…]` array or a RESP3 map, as pairs with text keys.
pub(crate) fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| {
                let k = as_bytes(kv.first()?)?;
                Some((String::from_utf8_lossy(&k).into_owned(), kv.get(1)?.clone()))
            })
            .collect(),
        Value::Map(items) => items
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    String::from_utf8_lossy(&as_bytes(k)?).into_owned(),
                    v.clone(),
                ))
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp2_and_resp3_groups_read_alike() {
        let flat = Value::Array(vec![
            Value::BulkString(b"name".to_vec()),
            Value::BulkString(b"g".to_vec()),
            Value::BulkString(b"pending".to_vec()),
            Value::Int(3),
        ]);
        let map = Value::Map(vec![
            (
                Value::SimpleString("name".into()),
                Value::BulkString(b"g".to_vec()),
            ),
            (Value::SimpleString("pending".into()), Value::Int(3)),
        ]);
        for v in [flat, map] {
            let f = pairs(&v);
            assert_eq!(field(&f, "name").and_then(as_bytes), Some(b"g".to_vec()));
            assert_eq!(field(&f, "pending").and_then(as_u64), Some(3));
            assert_eq!(field(&f, "lag").and_then(as_u64), None);
        }
    }

    #[test]
    fn ids_age_by_their_time_part() {
        assert_eq!(age_of_id(b"not-an-id"), None);
        assert!(age_of_id(b"0-1").unwrap() > 1_000_000);
        assert_eq!(age_of_id(format!("{}-0", u64::MAX).as_bytes()), Some(0));
    }
}
