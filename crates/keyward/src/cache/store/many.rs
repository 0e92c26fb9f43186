//! The batch fetch behind `Cache::get_or_set_many`: many entries of one class answered in one round trip.
//!
//! The decision a reader must know: **a batch is the single-entry fast path, many times, in one pipeline per
//! Cluster slot** (one pipeline on a single server). Each entry gets exactly the `SET key <lease> NX GET PX`
//! of [`fetch`](super::fetch), with the epochs read once for the batch (`HMGET` at the end of the pipeline on
//! one server, the handle's view on Cluster), so every safety argument made there holds per entry. Keys of
//! different slots never share a pipeline: redis-rs refuses a cluster pipeline across slots (`CrossSlot`),
//! even when one node serves both. As every entry has its own hash tag, a batch on Cluster is mostly one
//! `SET` per slot; those requests are sent concurrently and share each node's multiplexed connection, so
//! the batch costs about one round trip to each node, in parallel.
//! The rare answers the fast path leaves to `fetch.lua` (a lease held elsewhere, a value from before a group
//! invalidation, unreadable epochs, an error reply) go through [`fetch`](super::fetch) itself, one entry each.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;

use super::Known;
use super::{Entry, Fast, Fetched, classify, decode_fast, fetch, fetch_mirror, millis};
use crate::backend::{Backend, Pipeline, Undo, scripts};
use crate::error::{Error, Result};

scripts! {
    release_many: "../release_many.lua";
}

/// Fetch every entry of `entries` (one namespace, one class, distinct keys) as [`fetch`](super::fetch) does
/// one: its value, or the fill lease `marker` (`L1:{token}:0`, one token for the whole batch), or who waits.
/// Answers are in the order of `entries`; an entry whose pipeline failed gets that pipeline's error.
pub(crate) async fn fetch_many(
    b: &Backend,
    entries: &[Entry<'_>],
    marker: &str,
    lease_ttl: Duration,
    negative_ok: bool,
) -> Vec<Result<Fetched>> {
    let Some(first) = entries.first() else {
        return Vec::new();
    };
    if first.needs_pttl() {
        // Fail-safe and eager refresh need each value's remaining TTL and keep values under leases: the
        // single-entry path, concurrently.
        return join_all(
            entries
                .iter()
                .map(|e| fetch(b, e, marker, lease_ttl, negative_ok)),
        )
        .await;
    }
    // Redis Cluster: the group epochs from the handle's view, once for the whole batch.
    let view = match super::view_epochs(b, first, &[]).await {
        Ok(view) => view,
        Err(err) => return entries.iter().map(|_| Err(err.clone())).collect(),
    };
    let groups = by_slot(entries, view.is_some());
    let answers = join_all(groups.iter().map(|group| {
        fetch_group(
            b,
            entries,
            group,
            marker,
            lease_ttl,
            negative_ok,
            view.as_ref(),
        )
    }))
    .await;
    let mut out: Vec<Option<Result<Fetched>>> = entries.iter().map(|_| None).collect();
    let mut atomic = Vec::new();
    for (group, answer) in groups.iter().zip(answers) {
        match answer {
            Ok(fasts) => {
                for (&i, fast) in group.iter().zip(fasts) {
                    match fast {
                        Fast::Done(fetched) => out[i] = Some(Ok(fetched)),
                        // Stale, leased elsewhere, or (Cluster) carrying tags the batch has no epochs for.
                        Fast::Atomic | Fast::Judge(..) => atomic.push(i),
                    }
                }
            }
            // An error reply (e.g. the epochs key is not a hash): the single-entry path repairs what it can.
            Err(err @ Error::Redis { .. }) if !err.is_unavailable() => atomic.extend(group),
            Err(err) => {
                for &i in group {
                    out[i] = Some(Err(err.clone()));
                }
            }
        }
    }
    // The rare cases, each through the single-entry fetch (its fast path, then `fetch.lua`), concurrently.
    let slow = join_all(
        atomic
            .iter()
            .map(|&i| fetch(b, &entries[i], marker, lease_ttl, negative_ok)),
    )
    .await;
    for (&i, fetched) in atomic.iter().zip(slow) {
        out[i] = Some(fetched);
    }
    out.into_iter()
        .map(|answer| {
            answer.unwrap_or_else(|| {
                Err(Error::InvalidArgument {
                    what: "a batch fetch left an entry unanswered (please report this bug)"
                        .to_owned(),
                })
            })
        })
        .collect()
}

/// The indexes of `entries`, grouped by Cluster slot (`by_slot`), in ascending slot order and in their
/// original order within a slot; one group of all of them otherwise.
pub(crate) fn by_slot(entries: &[Entry<'_>], by_slot: bool) -> Vec<Vec<usize>> {
    if !by_slot {
        return vec![(0..entries.len()).collect()];
    }
    let mut slots: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        slots
            .entry(crate::key::cluster_slot(e.key.as_bytes()))
            .or_default()
            .push(i);
    }
    slots.into_values().collect()
}

/// One pipeline: `SET … NX GET PX` per entry of `group`, then (on one server) `HMGET` of the epochs; embedded,
/// `fetch_mirror` per entry in one critical section.
async fn fetch_group(
    b: &Backend,
    entries: &[Entry<'_>],
    group: &[usize],
    marker: &str,
    lease_ttl: Duration,
    negative_ok: bool,
    view: Option<&Known>,
) -> Result<Vec<Fast>> {
    let mut pipe = Pipeline::new("fetch_many");
    for &i in group {
        pipe = pipe
            .cmd("SET")
            .key(entries[i].key)
            .arg(marker)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(lease_ttl));
    }
    if view.is_none() {
        let e = &entries[group[0]];
        pipe = pipe.cmd("HMGET").arg(&e.ns.gens_key).arg("*").arg(e.class);
    }
    b.pipeline(
        pipe.evicting(),
        || release_undo(entries, group, marker, lease_ttl),
        |kv| {
            group
                .iter()
                .map(|&i| {
                    Fast::Done(fetch_mirror(
                        kv,
                        &entries[i],
                        marker,
                        lease_ttl,
                        negative_ok,
                    ))
                })
                .collect()
        },
        |replies| match view {
            Some(known) if replies.len() == group.len() => replies
                .iter()
                .map(|stored| classify(stored, known, &[], negative_ok, true))
                .collect(),
            Some(_) => None,
            None => {
                let (gens, stored) = replies.split_last()?;
                if stored.len() != group.len() {
                    return None;
                }
                stored
                    .iter()
                    .map(|s| decode_fast(&[s.clone(), gens.clone()], &[], negative_ok))
                    .collect()
            }
        },
    )
    .await
}

/// The undo of a group's pipeline that got no answer: give back every lease it may have taken
/// (`release_many.lua`; the group's keys share one slot).
fn release_undo(entries: &[Entry<'_>], group: &[usize], marker: &str, lease_ttl: Duration) -> Undo {
    let prefix = marker.strip_suffix('0').unwrap_or(marker);
    let mut args = vec![prefix.as_bytes().to_vec()];
    args.extend(group.iter().map(|&i| entries[i].wake.as_bytes().to_vec()));
    Undo {
        script: &SCRIPTS.release_many,
        keys: group.iter().map(|&i| entries[i].key.to_owned()).collect(),
        args,
        within: lease_ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{MemoryOptions, Namespace};

    fn ns() -> Namespace {
        Namespace {
            gens_key: "t:a:_kw:gens".into(),
            channel: "t:a:_kw:fills".into(),
            backplane: "t:a:_kw:l1".into(),
            gens_lifetime: Duration::from_secs(60),
        }
    }

    #[test]
    fn groups_follow_the_slots_and_keep_the_order_within_one() {
        let b = Backend::embedded(&MemoryOptions::default(), &[("c", true)]);
        let ns = ns();
        let keys: Vec<String> = (0..64).map(|i| format!("t:a:c:v1:{{{i}}}")).collect();
        let mut keys_and_twins = keys.clone();
        // Two keys with one hash tag share a slot.
        keys_and_twins.push("t:a:c:v1:{7}:twin".to_owned());
        let entries: Vec<Entry<'_>> = keys_and_twins
            .iter()
            .map(|k| Entry::new(&b, &ns, "c", k))
            .collect();
        assert_eq!(by_slot(&entries, false), vec![(0..65).collect::<Vec<_>>()]);
        let groups = by_slot(&entries, true);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..65).collect::<Vec<_>>(), "every entry once");
        for group in &groups {
            let slot = crate::key::cluster_slot(entries[group[0]].key.as_bytes());
            assert!(
                group
                    .iter()
                    .all(|&i| crate::key::cluster_slot(entries[i].key.as_bytes()) == slot),
                "one slot per group"
            );
            assert!(group.windows(2).all(|w| w[0] < w[1]), "original order");
        }
        assert!(groups.iter().any(|g| g == &vec![7, 64]), "{groups:?}");
        assert!(groups.len() > 32, "64 tags spread over many slots");
    }

    #[tokio::test(start_paused = true)]
    async fn the_embedded_batch_answers_like_one_fetch_per_entry() {
        let b = Backend::embedded(&MemoryOptions::default(), &[("c", true)]);
        let ns = ns();
        let keys = ["t:a:c:v1:a", "t:a:c:v1:b", "t:a:c:v1:c"];
        let entries: Vec<Entry<'_>> = keys.iter().map(|k| Entry::new(&b, &ns, "c", k)).collect();
        let ttl = Duration::from_secs(5);
        // Another caller holds `b`'s lease.
        assert!(matches!(
            fetch(&b, &entries[1], "L1:other:0", ttl, false).await,
            Ok(Fetched::Leased(..))
        ));
        let got = fetch_many(&b, &entries, "L1:mine:0", ttl, false).await;
        assert!(matches!(got[0], Ok(Fetched::Leased(..))), "{got:?}");
        assert!(matches!(got[1], Ok(Fetched::Wait(..))), "{got:?}");
        assert!(matches!(got[2], Ok(Fetched::Leased(..))), "{got:?}");
        assert!(
            fetch_many(&b, &[], "L1:mine:0", ttl, false)
                .await
                .is_empty()
        );
    }
}
