//! Idempotency-key conformance: every case runs on the embedded backend and on a real redis-server.

#![allow(unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::Harness;
use bytes::Bytes;
use keyward::idempotency::{Begin, Completion, StoredResponse, fingerprint};
use keyward::policy::{CacheClass, IdempotencyClass, Policy};
use keyward::{Error, Keyward};
use tokio::sync::Barrier;

/// `charge` (defaults: 24 h, 60 s lease), `quick` (300 ms lease), `small` (64-byte responses), a cache class.
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .idempotency("charge", IdempotencyClass::new())
        .idempotency(
            "quick",
            IdempotencyClass::new().lease(Duration::from_millis(300)),
        )
        .idempotency("small", IdempotencyClass::new().max_response_bytes(64))
        .cache("product", CacheClass::new(Duration::from_secs(60), "tests"))
        .build()
        .unwrap()
}

async fn connect(h: &Harness) -> Keyward {
    let app = format!("idem-{}", h.app());
    match h.url() {
        Some(s) => Keyward::connect(&s, policy(&app)).await.unwrap(),
        None => Keyward::embedded(policy(&app)),
    }
}

fn response() -> StoredResponse {
    StoredResponse::new(201, Bytes::from_static(b"{\"id\":1}\x00\xff binary tail"))
        .header("content-type", "application/json")
        .header("location", "/charges/1")
}

conformance!(
    first_runs_then_replays_byte_for_byte,
    racing_begins_grant_exactly_one_lease,
    a_different_request_is_a_mismatch,
    an_expired_lease_lets_a_retry_run_and_the_late_completion_is_refused,
    a_heartbeat_keeps_a_long_request_s_lease,
    abandon_frees_the_key_now,
    keys_are_scoped_and_expire,
    bad_input_is_a_typed_error,
);

mod cases {
    use super::*;

    pub async fn first_runs_then_replays_byte_for_byte(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("charge").unwrap();
        let fp = fingerprint(&[b"POST", b"/charges", b"{\"amount\":100}"]);
        let Begin::New(lease) = idem.begin(&("c1", "k1"), &fp).await.unwrap() else {
            panic!("first begin runs");
        };
        assert!(matches!(
            idem.begin(&("c1", "k1"), &fp).await.unwrap(),
            Begin::InProgress { retry_after } if retry_after <= Duration::from_secs(60) && retry_after > Duration::ZERO
        ));
        assert_eq!(
            idem.complete(&lease, &response()).await.unwrap(),
            Completion::Stored
        );
        for _ in 0..3 {
            match idem.begin(&("c1", "k1"), &fp).await.unwrap() {
                Begin::Completed(stored) => assert_eq!(stored, response()),
                other => panic!("expected a replay, got {other:?}"),
            }
        }
    }

    pub async fn racing_begins_grant_exactly_one_lease(h: Harness) {
        let first = connect(&h).await;
        let mut handles = vec![first.clone()];
        for _ in 1..4 {
            handles.push(if h.is_redis() {
                connect(&h).await
            } else {
                first.clone()
            });
        }
        let fp = fingerprint(&[b"same request"]);
        for round in 0..5 {
            let barrier = Arc::new(Barrier::new(100));
            let mut tasks = Vec::new();
            for i in 0..100 {
                let idem = handles[i % 4].idempotency("charge").unwrap();
                let barrier = Arc::clone(&barrier);
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    idem.begin(&("racer", round), &fp).await.unwrap()
                }));
            }
            let mut new = 0;
            let mut in_progress = 0;
            let mut leases = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Begin::New(lease) => {
                        new += 1;
                        leases.push(lease);
                    }
                    Begin::InProgress { .. } => in_progress += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!((new, in_progress), (1, 99), "round {round}");
            let idem = handles[0].idempotency("charge").unwrap();
            for lease in leases {
                assert_eq!(
                    idem.complete(&lease, &response()).await.unwrap(),
                    Completion::Stored
                );
            }
        }
    }

    pub async fn a_different_request_is_a_mismatch(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("charge").unwrap();
        let a = fingerprint(&[b"POST", b"/charges", b"{\"amount\":100}"]);
        let b = fingerprint(&[b"POST", b"/charges", b"{\"amount\":999}"]);
        let Begin::New(lease) = idem.begin("k", &a).await.unwrap() else {
            panic!()
        };
        assert!(
            matches!(idem.begin("k", &b).await.unwrap(), Begin::Mismatch),
            "while in progress"
        );
        let _ = idem.complete(&lease, &response()).await.unwrap();
        assert!(
            matches!(idem.begin("k", &b).await.unwrap(), Begin::Mismatch),
            "after completion"
        );
        assert!(matches!(
            idem.begin("k", &a).await.unwrap(),
            Begin::Completed(_)
        ));
    }

    pub async fn an_expired_lease_lets_a_retry_run_and_the_late_completion_is_refused(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("quick").unwrap();
        let fp = fingerprint(&[b"r"]);
        let Begin::New(dead) = idem.begin("k", &fp).await.unwrap() else {
            panic!()
        };
        assert_eq!(dead.expires_in(), Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(450)).await;
        let Begin::New(retry) = idem.begin("k", &fp).await.unwrap() else {
            panic!("the handler died; its lease expired; a retry runs")
        };
        assert_eq!(
            idem.complete(&dead, &response()).await.unwrap(),
            Completion::LeaseLost,
            "the first handler finished late and must not overwrite the retry"
        );
        let retried = StoredResponse::new(200, "retry's");
        assert_eq!(
            idem.complete(&retry, &retried).await.unwrap(),
            Completion::Stored
        );
        assert!(matches!(idem.begin("k", &fp).await.unwrap(), Begin::Completed(r) if r == retried));
    }

    pub async fn a_heartbeat_keeps_a_long_request_s_lease(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("quick").unwrap();
        let fp = fingerprint(&[b"slow"]);
        let Begin::New(lease) = idem.begin("slow", &fp).await.unwrap() else {
            panic!()
        };
        // 900 ms of work under a 300 ms lease, with a heartbeat every 100 ms: no retry can start.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(idem.extend(&lease).await.unwrap());
            assert!(matches!(
                idem.begin("slow", &fp).await.unwrap(),
                Begin::InProgress { .. }
            ));
        }
        assert_eq!(
            idem.complete(&lease, &response()).await.unwrap(),
            Completion::Stored
        );
        assert!(
            !idem.extend(&lease).await.unwrap(),
            "a completed lease holds nothing"
        );
        // The same from a background task: `keep_alive` renews until dropped.
        let Begin::New(lease) = idem.begin("kept", &fp).await.unwrap() else {
            panic!()
        };
        let keep = idem.keep_alive(&lease);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(matches!(
            idem.begin("kept", &fp).await.unwrap(),
            Begin::InProgress { .. }
        ));
        assert!(!keep.is_lost());
        drop(keep);
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(
            matches!(idem.begin("kept", &fp).await.unwrap(), Begin::New(_)),
            "renewals stopped with the guard"
        );
        // Without the heartbeat the lease runs out and a retry runs.
        let Begin::New(dead) = idem.begin("slow2", &fp).await.unwrap() else {
            panic!()
        };
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(!idem.extend(&dead).await.unwrap(), "too late: expired");
        assert!(matches!(
            idem.begin("slow2", &fp).await.unwrap(),
            Begin::New(_)
        ));
    }

    pub async fn abandon_frees_the_key_now(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("charge").unwrap();
        let fp = fingerprint(&[b"r"]);
        let Begin::New(lease) = idem.begin("k", &fp).await.unwrap() else {
            panic!()
        };
        assert!(idem.abandon(lease).await.unwrap());
        let Begin::New(lease) = idem.begin("k", &fp).await.unwrap() else {
            panic!("abandoned: the next attempt runs at once")
        };
        // A different request may use the key after an abandon: nothing was stored under it.
        let _ = idem.abandon(lease).await.unwrap();
        assert!(matches!(
            idem.begin("k", &fingerprint(&[b"other"])).await.unwrap(),
            Begin::New(_)
        ));
    }

    pub async fn keys_are_scoped_and_expire(h: Harness) {
        let kw = connect(&h).await;
        let idem = kw.idempotency("charge").unwrap();
        let fp = fingerprint(&[b"r"]);
        assert!(matches!(
            idem.begin(&("alice", "k"), &fp).await.unwrap(),
            Begin::New(_)
        ));
        let Begin::New(bob) = idem.begin(&("bob", "k"), &fp).await.unwrap() else {
            panic!("same key, another client: independent")
        };
        let _ = idem.complete(&bob, &response()).await.unwrap();
        let keys = h.all_keys(&kw).await;
        assert_eq!(keys.len(), 2);
        for k in keys {
            let ttl = k.ttl.expect("every key has a TTL");
            if k.key.contains("alice") {
                assert!(ttl <= Duration::from_secs(60), "in progress: the lease");
            } else {
                assert!(
                    ttl > Duration::from_secs(23 * 3600) && ttl <= Duration::from_secs(24 * 3600)
                );
            }
        }
    }

    pub async fn bad_input_is_a_typed_error(h: Harness) {
        let kw = connect(&h).await;
        assert!(matches!(
            kw.idempotency("product"),
            Err(Error::WrongKind {
                expected: "idempotency",
                ..
            })
        ));
        let small = kw.idempotency("small").unwrap();
        let fp = fingerprint(&[b"r"]);
        let Begin::New(lease) = small.begin("k", &fp).await.unwrap() else {
            panic!()
        };
        let big = StoredResponse::new(200, vec![b'x'; 100]);
        assert!(matches!(
            small.complete(&lease, &big).await,
            Err(Error::ValueTooLarge {
                field: "max_response_bytes",
                max: 64,
                ..
            })
        ));
        assert!(matches!(small.begin("", &fp).await, Err(Error::Key(_))));
        // A stored record that is not a response: a typed decode error, not a panic.
        if let Some(mut con) = h.raw() {
            let key = format!("test:idem-{}:charge:v1:{{bad}}", h.app());
            let _: () = ::redis::cmd("HSET")
                .arg(&key)
                .arg("f")
                .arg(&fp[..])
                .arg("s")
                .arg("c")
                .arg("r")
                .arg("garbage")
                .query(&mut *con)
                .unwrap();
            let _: () = ::redis::cmd("PEXPIRE")
                .arg(&key)
                .arg(60_000)
                .query(&mut *con)
                .unwrap();
            let idem = kw.idempotency("charge").unwrap();
            assert!(matches!(
                idem.begin("bad", &fp).await,
                Err(Error::Decode { .. })
            ));
        }
    }
}

/// The embedded store never evicts a lock, a session or an in-progress marker to make room, and every class
/// has its own budget: a flood of new idempotency keys past that class's share of the capacity is refused
/// with a typed error naming the class, while the lock held before stays held and new locks can still be
/// taken.
#[tokio::test]
async fn a_full_embedded_store_refuses_rather_than_evicting() {
    let policy = Policy::builder("test", "full")
        .idempotency("charge", IdempotencyClass::new())
        .lock(
            "job",
            keyward::policy::LockClass::new(Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    // 10 entries: 1 reserved for keyward's own keys, 4 for each of the two classes.
    let kw = Keyward::embedded_with(policy, keyward::MemoryOptions::default().capacity(10));
    let locks = kw.locks("job").unwrap();
    let held = locks.try_lock("nightly").await.unwrap().expect("free");
    let idem = kw.idempotency("charge").unwrap();
    let mut refused = 0;
    for i in 0..20 {
        match idem.begin(&("flood", i), &fingerprint(&[b"x"])).await {
            Ok(Begin::New(_)) => {}
            Err(Error::StoreFull {
                class, capacity: 4, ..
            }) if class == "charge" => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 16);
    assert!(
        matches!(locks.try_lock("nightly").await, Ok(None)),
        "the held lock was not evicted"
    );
    let other = locks.try_lock("weekly").await.unwrap();
    assert!(
        other.is_some(),
        "the flood did not take the lock class's room"
    );
    let full = Error::StoreFull {
        class: "charge".into(),
        budget_bytes: 1,
        capacity: 4,
    };
    assert!(full.is_backend());
    assert!(full.to_string().contains("class `charge`"));
    drop(held);
}
