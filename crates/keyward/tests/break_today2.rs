//! Adversarial review of three changes: a batch (`get_or_set_many`) serving the stale value another caller's
//! lease keeps at the class's soft timeout (stale, absent and fresh ids mixed with duplicates; an invalidation
//! while the batch waits); and, behind Sentinel, a call refused by the open breaker waiting for the
//! resolution under way, and the connection manager trying the master's address only once.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::Harness;
use keyward::{Cache, ConnectOptions, Keyward};
use tokio::sync::Notify;

conformance!(
    a_batch_of_waited_absent_fresh_and_duplicate_ids_answers_each_once,
    a_batch_never_serves_a_stale_value_invalidated_while_it_waits,
    a_failed_untagged_refill_does_not_bring_back_a_tag_invalidated_value,
    a_failed_refill_naming_another_tag_does_not_bring_back_a_value_a_removed_tag_carried,
    a_failed_batch_refill_does_not_bring_back_a_tag_invalidated_value,
);

const SOON: Duration = Duration::from_secs(20);

fn ok(v: &str) -> Result<String, std::io::Error> {
    Ok(v.to_owned())
}

/// Make `id` of the `soft` class (stale values kept, 50 ms soft timeout) hold `v1` (tagged `tags`), and have
/// `c` hold its lease with a refill whose loader runs until the returned `Notify` is notified, once `v1` is
/// stale ([`hold_a_refill`](crate::cache_failsafe::hold_a_refill)). Returns when that loader runs, with the
/// flag set when it ends.
async fn hold_a_stale_lease(
    c: &Cache<String>,
    id: u64,
    tags: &[&str],
) -> (Arc<Notify>, Arc<AtomicBool>) {
    c.get_or_set_tagged(&id, tags, || async { ok("v1") })
        .await
        .unwrap();
    crate::cache_failsafe::hold_a_refill(c, id).await
}

/// A loader that lets its test know it runs, then fails once released (also `break_throttle`'s).
#[derive(Default)]
pub(crate) struct Gate {
    pub(crate) entered: Notify,
    pub(crate) release: Notify,
}

impl Gate {
    pub(crate) async fn fail_when_released(&self) -> Result<String, std::io::Error> {
        self.entered.notify_one();
        self.release.notified().await;
        Err(std::io::Error::other("the source is down"))
    }
}

/// Run `refill` (a call on `c` for `id` whose loader is the gate's) until its loader runs (the entry went
/// stale: the refill holds the lease over the kept value); then invalidate `tag`, let the loader fail, and
/// check for a while that the removed value (`v1`) is never read again, although the failed refill stored
/// it again for `fail_safe_throttle`.
async fn remove_a_tag_while_a_refill_fails<F, Fut>(c: &Cache<String>, id: u64, tag: &str, refill: F)
where
    F: Fn(Arc<Gate>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let deadline = Instant::now() + SOON;
    loop {
        let gate = Arc::new(Gate::default());
        let mut task = tokio::spawn(refill(Arc::clone(&gate)));
        tokio::select! {
            () = gate.entered.notified() => {
                c.invalidate_tag(tag).await.unwrap();
                gate.release.notify_one();
                tokio::time::timeout(SOON, task)
                    .await
                    .expect("the refill never answered")
                    .unwrap();
                break;
            }
            done = &mut task => {
                // A hit: the value is not stale yet.
                done.unwrap();
                assert!(Instant::now() < deadline, "never stale");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let until = Instant::now() + Duration::from_millis(500);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < until {
        pace.tick().await;
        assert_ne!(
            c.get(&id).await.unwrap().as_deref(),
            Some("v1"),
            "the value tag `{tag}`'s removal removed is served again"
        );
    }
}

mod cases {
    use super::*;

    /// One batch with an id whose lease another handle holds (stale value kept), an absent id (the batch's
    /// own fill), a fresh id, and duplicates of the waited and the absent one: each is answered in place,
    /// the waited one with the stale value at the soft timeout (while the holder's load still runs), and
    /// the loader is asked only for the absent one, once.
    pub async fn a_batch_of_waited_absent_fresh_and_duplicate_ids_answers_each_once(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<String>("soft").unwrap();
        let b = hs[1].cache::<String>("soft").unwrap();
        let base = rand::random::<u32>() as u64 * 10;
        let (held, absent, fresh) = (base + 1, base + 2, base + 3);
        let (release, ended) = hold_a_stale_lease(&a, held, &[]).await;
        b.set(&fresh, &"fresh".to_owned()).await.unwrap();
        let asked: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::default();
        let ids = [held, absent, fresh, held, absent];
        let got = tokio::time::timeout(
            SOON,
            b.get_or_set_many(&ids, |missing| {
                asked.lock().unwrap().extend(missing.iter().map(|id| **id));
                let out: Vec<(u64, String)> = missing
                    .iter()
                    .map(|id| (**id, format!("loaded-{id}")))
                    .collect();
                async move { Ok::<_, std::io::Error>(out) }
            }),
        )
        .await
        .expect("the batch never answered")
        .unwrap();
        assert!(
            !ended.load(Ordering::SeqCst),
            "the batch answered only after the holder's load ended"
        );
        let loaded = format!("loaded-{absent}");
        assert_eq!(got, ["v1", &loaded, "fresh", "v1", &loaded]);
        assert_eq!(*asked.lock().unwrap(), [absent], "the loader's calls");
        // The stale answer stored nothing: the holder's refill still lands.
        release.notify_one();
        let deadline = Instant::now() + SOON;
        loop {
            let now = a.get(&held).await.unwrap();
            if now.as_deref() == Some("v2") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the holder's refill never landed: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A batch waiting on another handle's lease while the id (or a tag of its stale value) is invalidated:
    /// the value the lease kept was
    /// removed by the invalidation and must not be served at the soft timeout (nor afterwards). Whether the
    /// invalidation lands before the batch's first look or while it waits varies; neither may serve `v1`.
    pub async fn a_batch_never_serves_a_stale_value_invalidated_while_it_waits(h: Harness) {
        let hs = h.handles(2).await;
        let a = hs[0].cache::<String>("soft").unwrap();
        let b = hs[1].cache::<String>("soft").unwrap();
        for round in 0..6u64 {
            let id = rand::random::<u32>() as u64 * 10 + round;
            // Even rounds invalidate the id, odd ones a tag the stale value carries.
            let tag = format!("t{id}");
            let (release, _ended) = hold_a_stale_lease(&a, id, &[tag.as_str()]).await;
            let batch = {
                let b = b.clone();
                tokio::spawn(async move {
                    b.get_or_set_many(&[id], |missing| {
                        let out: Vec<(u64, String)> = missing
                            .iter()
                            .map(|id| (**id, "from the batch".to_owned()))
                            .collect();
                        async move { Ok::<_, std::io::Error>(out) }
                    })
                    .await
                })
            };
            // Rounds 0 and 1 invalidate at once; later rounds give the batch its first look first.
            if round > 1 {
                tokio::task::yield_now().await;
            }
            if round % 2 == 0 {
                a.invalidate(&id).await.unwrap();
            } else {
                a.invalidate_tag(&tag).await.unwrap();
            }
            // The batch answers at its soft timeout (it must not be with `v1`), or it waits for the holder,
            // whose refill then lands (`v2`).
            let mut batch = batch;
            let got = match tokio::time::timeout(Duration::from_secs(1), &mut batch).await {
                Ok(got) => got.unwrap(),
                Err(_) => {
                    release.notify_one();
                    tokio::time::timeout(SOON, batch)
                        .await
                        .expect("the batch never answered")
                        .unwrap()
                }
            };
            release.notify_one();
            let got = got.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_ne!(
                got,
                ["v1"],
                "round {round}: an invalidated stale value was served"
            );
        }
    }

    /// An untagged refill (a batch, or a `get_or_set` without tags) of a tagged entry whose value is stale;
    /// the tag is invalidated while its loader runs, and the loader then times out. The refill's fail-safe
    /// stores the stale value again as current for `fail_safe_throttle`. It used to do so under the lease's
    /// stamp alone, which carries no tags (the caller named none), so the value the tag invalidation removed
    /// was served again as a plain hit, to every reader, for the throttle (failed on all four backends; found
    /// by the batch case above, whose first version let the holder's load time out).
    pub async fn a_failed_untagged_refill_does_not_bring_back_a_tag_invalidated_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        let id = rand::random::<u32>() as u64;
        let tag = format!("t{id}");
        // Held until the loader timeout (3 s): never released.
        let (_release, ended) = hold_a_stale_lease(&c, id, &[tag.as_str()]).await;
        c.invalidate_tag(&tag).await.unwrap();
        let deadline = Instant::now() + SOON;
        while !ended.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the holder's load never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // For a while after the load ended (its fail-safe write lands within it): never `v1`.
        let until = Instant::now() + Duration::from_millis(500);
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        while Instant::now() < until {
            pace.tick().await;
            let now = c.get(&id).await.unwrap();
            assert_ne!(
                now.as_deref(),
                Some("v1"),
                "the value tag `{tag}`'s invalidation removed is served again"
            );
        }
    }

    /// The same with a caller that names a tag (`b`) the value carries besides the removed one (`a`): the
    /// throttle records the caller's tags and, since this fix, the value's own.
    pub async fn a_failed_refill_naming_another_tag_does_not_bring_back_a_value_a_removed_tag_carried(
        h: Harness,
    ) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        let id = rand::random::<u32>() as u64;
        let (a, b) = (format!("a{id}"), format!("b{id}"));
        c.get_or_set_tagged(&id, &[a.as_str(), b.as_str()], || async { ok("v1") })
            .await
            .unwrap();
        let refill = {
            let (c, b) = (c.clone(), b.clone());
            move |gate: Arc<Gate>| {
                let (c, b) = (c.clone(), b.clone());
                async move {
                    let _ = c
                        .get_or_set_tagged(&id, &[b.as_str()], || gate.fail_when_released())
                        .await;
                }
            }
        };
        remove_a_tag_while_a_refill_fails(&c, id, &a, refill).await;
    }

    /// The same through `get_or_set_many`, whose failed load throttles each kept value the same way.
    pub async fn a_failed_batch_refill_does_not_bring_back_a_tag_invalidated_value(h: Harness) {
        let kw = h.keyward().await;
        let c = kw.cache::<String>("soft").unwrap();
        let id = rand::random::<u32>() as u64;
        let tag = format!("t{id}");
        c.get_or_set_tagged(&id, &[tag.as_str()], || async { ok("v1") })
            .await
            .unwrap();
        let refill = {
            let c = c.clone();
            move |gate: Arc<Gate>| {
                let c = c.clone();
                async move {
                    let _ = c
                        .get_or_set_many(&[id], |_| {
                            let gate = Arc::clone(&gate);
                            async move { gate.fail_when_released().await.map(|v| vec![(id, v)]) }
                        })
                        .await;
                }
            }
        };
        remove_a_tag_while_a_refill_fails(&c, id, &tag, refill).await;
    }
}

/// Behind Sentinel, with the sentinels black-holed (they accept TCP and never answer, so each resolution
/// runs until its connect timeout) and the master dead: once the breaker is open, a call it refuses fails
/// at once with `CircuitOpen`, as the breaker's contract says ("fails at once, unsent") — at least once the
/// breaker has been open for a response timeout: calls refused in the burst that opened it may wait for the
/// resolution their failures asked for (that is what lets a burst after an unheard failover reach the new
/// master, `break_today::a_burst_of_first_calls_after_an_unheard_failover_reaches_the_new_master`).
///
/// Since 0311133 every refused call waited on the follower's `resolving` mutex for the resolution under way;
/// the resolver loop, woken by every refused call, holds it most of the time (each resolution runs until
/// the sentinels' connect timeout), so calls the open breaker refused kept waiting up to their whole response
/// timeout for as long as the outage lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_open_breaker_refuses_fails_at_once_while_the_sentinels_do_not_answer() {
    let mut set = tokio::task::spawn_blocking(keyward_testkit::SentinelSet::spawn)
        .await
        .unwrap();
    let proxies: Vec<keyward_testkit::TcpProxy> = set
        .sentinel_ports()
        .into_iter()
        .map(|port| keyward_testkit::TcpProxy::start(([127, 0, 0, 1], port).into()))
        .collect();
    let hosts: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let url = format!(
        "redis+sentinel://{}/{}",
        hosts.join(","),
        keyward_testkit::SENTINEL_MASTER_NAME
    );
    let timeout = Duration::from_secs(1);
    let kw = Keyward::connect_with(
        &url,
        crate::common::Harness::embedded().policy(),
        ConnectOptions::default()
            .response_timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            // Open for the whole test: no half-open probe reaches the dead port.
            .breaker(3, Duration::from_secs(60)),
    )
    .await
    .unwrap();
    kw.ping().await.unwrap();
    for p in &proxies {
        p.blackhole();
    }
    let _ = set.kill_master();
    // Calls, paced, for a few resolutions' time: the first ones are refused by the dead port (and open the
    // breaker), then the breaker refuses them; each it refuses must come back at once.
    let mut first_refused: Option<Instant> = None;
    let mut refused = 0;
    let mut slow = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        pace.tick().await;
        let started = Instant::now();
        let r = kw.ping().await;
        let took = started.elapsed();
        match r {
            Err(keyward::Error::CircuitOpen { .. }) => {
                let first = *first_refused.get_or_insert(started);
                if started < first + timeout {
                    continue; // the burst that opened the breaker (see above)
                }
                refused += 1;
                // Half the response timeout: a refusal waiting on a resolution waits the whole timeout
                // (~1 s), one that comes back at once takes microseconds; the margin absorbs a loaded CI.
                if took > timeout / 2 {
                    slow.push(took);
                }
            }
            Err(_) => {}
            Ok(()) => panic!("a dead master answered"),
        }
    }
    assert!(refused > 0, "the breaker never opened");
    assert!(
        slow.is_empty(),
        "{} of {refused} calls the open breaker refused waited (response timeout {timeout:?}): {slow:?}",
        slow.len()
    );
}

/// A sentinel set, a handle on it (2 s response timeout) and a cache of it that has written once.
async fn warm_sentinel_handle() -> (keyward_testkit::SentinelSet, Keyward, Cache<String>) {
    let set = tokio::task::spawn_blocking(keyward_testkit::SentinelSet::spawn)
        .await
        .unwrap();
    let kw = Keyward::connect_with(
        &set.url(),
        crate::common::Harness::embedded().policy(),
        ConnectOptions::default().response_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    cache.set(&"warm", &"v".to_owned()).await.unwrap();
    (set, kw, cache)
}

/// Behind Sentinel, the master restarts in place (same address, no failover) while the handle is idle: the
/// first call once it answers again succeeds, as with a standalone server.
///
/// Since 0311133 the connection manager behind Sentinel tried the old address once when the connection
/// dropped: that one attempt ran while the server was still down, and the manager kept its error for the next
/// call (the sentinels name the same master, so it was not resent). Failed 2 of 2 runs (`Connection
/// refused`, once `Connection reset by peer`: the attempt met the killed server's closing socket, which reads
/// as "may have run"). Fixed by one retry behind Sentinel (so the kept error is a refusal), and by sending a
/// refused call once more to the same address when the sentinels name no other master (so a restart longer
/// than the retry window does not cost the first call either: see the next case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_the_master_restarted_in_place_succeeds() {
    let (set, _kw, cache) = warm_sentinel_handle().await;
    let set = tokio::task::spawn_blocking(move || {
        let mut set = set;
        set.restart_master();
        set
    })
    .await
    .unwrap();
    let r = cache.set(&"after", &"v".to_owned()).await;
    assert!(
        r.is_ok(),
        "the first call after the master came back at its address failed: {r:?}"
    );
    drop(set);
}

/// Behind Sentinel, the master is down long enough for a call to fail and for its connection manager to
/// give up on the address, then restarts in place, without a failover: the next call succeeds. It finds the
/// manager's last refusal, kept from while the server was down; a refused call was never sent, so it is sent
/// once more to the same address (the sentinels name no other master), which makes a new connection. Before,
/// only a call the sentinels could redirect to a new master was resent, and this one failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_the_master_came_back_from_an_outage_succeeds() {
    let (mut set, _kw, cache) = warm_sentinel_handle().await;
    let (old, _) = set.kill_master();
    let down = cache.set(&"down", &"v".to_owned()).await;
    assert!(down.is_err(), "a killed master answered");
    // The outage lasts 400 ms more: past the manager's one retry (250 ms after the call's attempt), within
    // the sentinels' `down-after-milliseconds` (1 s). This is the fault's length, not a wait for an event.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let set = tokio::task::spawn_blocking(move || {
        set.restart_master();
        set
    })
    .await
    .unwrap();
    assert_eq!(
        set.master_port(),
        old,
        "the sentinels failed over meanwhile"
    );
    let r = cache.set(&"after", &"v".to_owned()).await;
    assert!(
        r.is_ok(),
        "the first call after the master came back at its address failed: {r:?}"
    );
}
