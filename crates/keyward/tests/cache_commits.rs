//! Commits of concurrent fills: each entry keeps its own fence and its own answer. An invalidation during the
//! load refuses exactly the entries it touched, an entry whose key went bad fails alone, and nothing else
//! changes — on the embedded backend, Redis, Redis as the documented ACL user and Redis Cluster alike. The
//! loaders are held at a barrier so that every fill commits at the same moment (nothing sleeps). (Written for
//! batched commits, which were measured and taken out; the guarantees stand for one commit per fill.)

#![allow(unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::Harness;
use keyward::{Cache, Error};
use tokio::sync::Barrier;

conformance!(
    concurrent_fills_each_keep_their_fence,
    an_entry_whose_key_went_bad_fails_alone,
);

/// How many fills commit at once.
pub(crate) const FILLS: u32 = 32;

/// `INFO commandstats` calls of `command` summed over every primary (0 when embedded).
fn calls(h: &Harness, command: &str) -> u64 {
    let mut total = 0;
    for mut con in h.node_connections() {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut con)
            .expect("INFO");
        let prefix = format!("cmdstat_{command}:calls=");
        total += info
            .lines()
            .filter_map(|l| {
                l.strip_prefix(&prefix)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum::<u64>();
    }
    total
}

/// Starts `FILLS` callers of `get_or_set` on ids `0..FILLS`, each loading `id * 10` once every loader is
/// running and `between` (run by the test while all are held) has returned; returns each caller's answer
/// by id.
pub(crate) async fn fill_all_at_once<F, Fut>(
    c: &Cache<u64>,
    between: F,
) -> BTreeMap<u32, Result<u64, Error>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (loading, release) = (
        Arc::new(Barrier::new(FILLS as usize + 1)),
        Arc::new(Barrier::new(FILLS as usize + 1)),
    );
    let mut callers = tokio::task::JoinSet::new();
    for id in 0..FILLS {
        let (c, loading, release) = (c.clone(), loading.clone(), release.clone());
        callers.spawn(async move {
            let got = c
                .get_or_set(&id, || async move {
                    loading.wait().await;
                    release.wait().await;
                    Ok::<_, std::io::Error>(u64::from(id) * 10)
                })
                .await;
            (id, got)
        });
    }
    loading.wait().await;
    between().await;
    release.wait().await;
    let mut answers = BTreeMap::new();
    while let Some(joined) = callers.join_next().await {
        let (id, got) = joined.expect("a caller panicked");
        answers.insert(id, got);
    }
    answers
}

mod cases {
    use super::*;

    pub async fn concurrent_fills_each_keep_their_fence(h: Harness) {
        // Fails if concurrent commits were decided together (one voided lease refusing them all, or one
        // held lease storing them all), or if a commit were not one script call of its own on one server.
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let voided = |id: u32| id % 4 == 1;
        let scripts_before = calls(&h, "evalsha");
        let answers = fill_all_at_once(&c, || async {
            for id in (0..FILLS).filter(|&id| voided(id)) {
                c.invalidate(&id).await.unwrap();
            }
        })
        .await;
        let scripts = calls(&h, "evalsha") - scripts_before;
        for (id, got) in &answers {
            assert_eq!(
                got.as_ref().ok(),
                Some(&(u64::from(*id) * 10)),
                "id {id}: each caller gets its load"
            );
        }
        let refused = (0..FILLS).filter(|&id| voided(id)).count() as u64;
        assert_eq!(c.stats().fills_refused, refused, "{:?}", c.stats());
        for id in 0..FILLS {
            let stored = c.get(&id).await.unwrap();
            if voided(id) {
                assert_eq!(
                    stored, None,
                    "id {id}: a fill leased before its invalidation never lands"
                );
            } else {
                assert_eq!(
                    stored,
                    Some(u64::from(id) * 10),
                    "id {id}: a held lease's fill is stored"
                );
            }
        }
        if h.is_redis() && !h.is_cluster() {
            // One invalidation script per voided id, and one commit script per fill.
            assert_eq!(
                scripts - refused,
                u64::from(FILLS),
                "one commit call per fill"
            );
        }
        h.assert_no_acl_denials();
    }

    pub async fn an_entry_whose_key_went_bad_fails_alone(h: Harness) {
        // Fails if one entry's error reply failed other callers' commits, or if the error went unreported.
        let Some(mut raw) = h.raw() else {
            return; // Embedded: no way to put a hash under a cache key behind keyward's back.
        };
        let kw = h.keyward().await;
        let c = kw.cache::<u64>("product").unwrap();
        let bad = 7u32;
        let bad_key = c.key(&bad).unwrap();
        let answers = fill_all_at_once(&c, || async {
            // The lease under `bad`'s key becomes a hash (another tool, a bug elsewhere).
            // One command each: a cluster connection does not pipeline (the loaders are held meanwhile).
            for cmd in [
                ::redis::cmd("DEL").arg(&bad_key).clone(),
                ::redis::cmd("HSET").arg(&bad_key).arg("f").arg("v").clone(),
                ::redis::cmd("PEXPIRE").arg(&bad_key).arg(60_000).clone(),
            ] {
                cmd.query::<()>(&mut *raw)
                    .expect("replace the lease with a hash");
            }
        })
        .await;
        for (id, got) in &answers {
            if *id == bad {
                let err = got.as_ref().expect_err("the bad entry's commit fails");
                let Error::Redis { source, .. } = err else {
                    panic!("an error reply, not {err:?}");
                };
                assert_eq!(source.code(), Some("WRONGTYPE"), "{err}");
            } else {
                assert_eq!(got.as_ref().ok(), Some(&(u64::from(*id) * 10)), "id {id}");
                assert_eq!(
                    c.get(id).await.unwrap(),
                    Some(u64::from(*id) * 10),
                    "id {id} stored"
                );
            }
        }
        h.assert_no_acl_denials();
    }
}
