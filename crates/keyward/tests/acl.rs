//! keyward under the ACL rule of `docs/operations.md`: a user created with exactly that rule (read from the
//! doc, so the two cannot drift) can use every capability in its namespace and nothing outside it, and a
//! user missing one grant gets an error naming the command instead of a silent fallback.
//!
//! The conformance suites also run every case as such a user (`redis_acl::*` in each suite); here the
//! namespace is a concrete `{env}:{app}`, as in production.

#![allow(unreachable_pub)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::idempotency::{Begin, Completion, StoredResponse, fingerprint};
use keyward::policy::{
    Algorithm, CacheClass, IdempotencyClass, LockClass, OnError, Policy, RateLimitClass,
    SessionClass,
};
use keyward::rate_limit::BreakerState;
use keyward::session::SessionSecrets;
use keyward::{ConnectOptions, Keyward};
use keyward_testkit::RedisServer;

const ENV: &str = "prod";
const APP: &str = "shop";
const SECRET: &[u8; 32] = b"acl test secret, 32 bytes long!!";

fn policy() -> Policy {
    let hour = Duration::from_secs(3600);
    let mut builder = Policy::builder(ENV, APP)
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .session(
            "web",
            SessionClass::new(Duration::from_secs(1800), Duration::from_secs(43200)),
        )
        .lock("job", LockClass::new(Duration::from_secs(30)))
        .idempotency("charge", IdempotencyClass::new());
    for (name, algorithm) in [
        ("fixed", Algorithm::FixedWindow),
        ("log", Algorithm::SlidingLog),
        ("counter", Algorithm::SlidingCounter),
        ("bucket", Algorithm::TokenBucket),
        ("gcra", Algorithm::Gcra),
    ] {
        builder = builder.rate_limit(
            name,
            RateLimitClass::new(algorithm, 5, hour).on_error(OnError::Local),
        );
    }
    builder.build().expect("acl test policy is valid")
}

/// A server with a user `keyward` made from the documented rule for `prod:shop`, plus `extra` words
/// appended to the rule (e.g. `-evalsha` to take one grant away).
fn restricted_server(extra: &[&str]) -> RedisServer {
    let mut server = RedisServer::spawn();
    let password = "acl-test-password";
    let words = common::documented_acl_rule("keyward", password, ENV, APP);
    let mut cmd = redis::cmd(&words[0]);
    for word in words[1..]
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        cmd.arg(word);
    }
    let () = cmd
        .query(&mut server.connection())
        .unwrap_or_else(|e| panic!("ACL SETUSER refused: {e}: {words:?} {extra:?}"));
    server.set_url_credentials(Some(("keyward", password)));
    server
}

fn options() -> ConnectOptions {
    ConnectOptions::default().response_timeout(Duration::from_millis(500))
}

#[test]
fn the_doc_holds_one_acl_setuser_command_with_the_namespace_patterns() {
    let words = common::documented_acl_rule("u", "p", "e", "a");
    let text = words.join(" ");
    assert!(text.starts_with("ACL SETUSER u on >p "), "{text}");
    for required in ["resetkeys", "~e:a:*", "resetchannels", "&e:a:*", "-@all"] {
        assert!(
            words.iter().any(|w| w == required),
            "missing {required}: {text}"
        );
    }
    // Grants only: no category other than the leading `-@all`, no key or channel wildcard beyond the
    // namespace, and never a forbidden command. (`+eval` is no escalation: every command a script calls,
    // and every key it touches, is checked against this same rule.)
    for word in &words[2..] {
        assert!(
            !word.starts_with("+@") && word != "allkeys" && word != "allchannels" && word != "~*",
            "the rule grants more than commands in the namespace: {word}"
        );
        for forbidden in ["+keys", "+flushdb", "+flushall", "+config", "+debug"] {
            assert_ne!(word, forbidden, "the rule grants {forbidden}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_capability_works_under_the_documented_rule_and_stays_in_its_namespace() {
    let server = restricted_server(&[]);
    let kw = Keyward::connect_with(&server.url(), policy(), options())
        .await
        .expect("connect as the restricted user");
    exercise_every_capability(&kw).await;
    let log = common::acl_log(&server);
    assert!(log.is_empty(), "ACL denials:\n{}", log.join("\n"));
    // The rule confines the user: another app's keys and channels are refused by the server.
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let other: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("prod:other:x")
        .query_async(&mut con)
        .await;
    let err = other.expect_err("another app's key was readable");
    assert!(err.to_string().to_lowercase().contains("noperm"), "{err}");
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg("prod:other:_kw:fills")
        .arg("x")
        .query_async(&mut con)
        .await;
    assert!(published.is_err(), "another app's channel was writable");
    let flushed: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut con).await;
    assert!(flushed.is_err(), "FLUSHALL was allowed");
}

/// Every capability once, as the documented user would use them.
async fn exercise_every_capability(kw: &Keyward) {
    // Cache: miss, fill, hit, set, invalidate one and all, a waiter woken by the fill.
    let cache = kw.cache::<String>("product").unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let load = |v: &'static str| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(v.to_owned())
        }
    };
    assert_eq!(cache.get(&1).await.unwrap(), None);
    let (a, b) = tokio::join!(
        cache.get_or_set(&1, load("a")),
        cache.get_or_set(&1, load("a"))
    );
    assert_eq!((a.unwrap(), b.unwrap()), ("a".to_owned(), "a".to_owned()));
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("a"));
    cache.set(&2, &"b".to_owned()).await.unwrap();
    cache.invalidate(&2).await.unwrap();
    cache.invalidate_all().await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    kw.invalidate_namespace().await.unwrap();

    // Rate limits: all five algorithms, check and peek.
    for class in ["fixed", "log", "counter", "bucket", "gcra"] {
        let limiter = kw.rate_limiter(class).unwrap();
        for _ in 0..5 {
            let d = limiter.check("client").await.unwrap();
            assert!(d.is_allowed(), "{class}");
            assert_eq!(d.source(), keyward::rate_limit::Source::Store, "{class}");
        }
        assert!(
            limiter.check("client").await.unwrap().is_limited(),
            "{class}"
        );
        limiter.peek("client").await.unwrap();
    }

    // Sessions: create, read, save, regenerate, list, destroy.
    let sessions = kw
        .sessions::<Vec<u32>>("web", SessionSecrets::new(SECRET).unwrap())
        .unwrap();
    let (token, mut session) = sessions.create("alice", &vec![1]).await.unwrap();
    assert!(sessions.get(token.as_str()).await.unwrap().is_some());
    let _saved = sessions.save(&mut session).await.unwrap();
    let token = sessions
        .regenerate(token.as_str())
        .await
        .unwrap()
        .expect("regenerated");
    assert_eq!(sessions.list_for_user("alice").await.unwrap().len(), 1);
    assert!(sessions.destroy(token.as_str()).await.unwrap());
    sessions.create("alice", &vec![2]).await.unwrap();
    assert_eq!(sessions.destroy_all_for_user("alice").await.unwrap(), 1);

    // Locks: acquire, contend, extend, fenced write and read, release.
    let locks = kw.locks("job").unwrap();
    let guard = locks.try_lock("nightly").await.unwrap().expect("free lock");
    assert!(locks.try_lock("nightly").await.unwrap().is_none());
    assert!(guard.extend(Duration::from_secs(30)).await.unwrap());
    assert!(guard.fenced_write(b"v1").await.unwrap().is_applied());
    assert_eq!(
        guard.fenced_read().await.unwrap().map(|(_, v)| v.to_vec()),
        Some(b"v1".to_vec())
    );
    assert!(guard.release().await.unwrap());

    // Idempotency: begin, in progress, complete, replay, abandon.
    let idem = kw.idempotency("charge").unwrap();
    let fp = fingerprint(&[b"POST", b"/charges"]);
    let Begin::New(lease) = idem.begin("k1", &fp).await.unwrap() else {
        panic!("first begin runs");
    };
    assert!(matches!(
        idem.begin("k1", &fp).await.unwrap(),
        Begin::InProgress { .. }
    ));
    assert_eq!(
        idem.complete(&lease, &StoredResponse::new(201, "ok"))
            .await
            .unwrap(),
        Completion::Stored
    );
    assert!(matches!(
        idem.begin("k1", &fp).await.unwrap(),
        Begin::Completed(_)
    ));
    let Begin::New(lease) = idem.begin("k2", &fp).await.unwrap() else {
        panic!("first begin runs");
    };
    assert!(idem.abandon(lease).await.unwrap());

    // Walks.
    assert!(!kw.scan_namespace().await.unwrap().is_empty());
}

/// The same user on a master behind Sentinel (created on the master: ACLs are not replicated, so a real
/// deployment creates it on every data node), with the credentials in the `redis+sentinel://` URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_capability_works_under_the_documented_rule_behind_sentinel() {
    let set = keyward_testkit::SentinelSet::spawn();
    let password = "acl-test-password";
    let words = common::documented_acl_rule("keyward", password, ENV, APP);
    for port in [set.master_port()] {
        let mut cmd = redis::cmd(&words[0]);
        for word in &words[1..] {
            cmd.arg(word);
        }
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .unwrap();
        let () = cmd.query(&mut con).unwrap();
    }
    let url = set.url().replacen(
        "redis+sentinel://",
        &format!("redis+sentinel://keyward:{password}@"),
        1,
    );
    let kw = Keyward::connect_with(&url, policy(), options())
        .await
        .expect("connect as the restricted user behind Sentinel");
    exercise_every_capability(&kw).await;
    let mut master = set.master_client().get_connection().unwrap();
    let log = common::acl_log_of(&mut master);
    assert!(log.is_empty(), "ACL denials:\n{}", log.join("\n"));
}

/// The same user on a 3-master Redis Cluster (created on every node), with the credentials in the
/// `redis+cluster://` URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_capability_works_under_the_documented_rule_on_cluster() {
    let cluster = keyward_testkit::RedisCluster::spawn();
    let password = "acl-test-password";
    let words = common::documented_acl_rule("keyward", password, ENV, APP);
    for url in cluster.urls() {
        let mut cmd = redis::cmd(&words[0]);
        for word in &words[1..] {
            cmd.arg(word);
        }
        let mut con = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .unwrap();
        let () = cmd.query(&mut con).unwrap();
    }
    let url = cluster.seed_url().replacen(
        "redis+cluster://",
        &format!("redis+cluster://keyward:{password}@"),
        1,
    );
    let kw = Keyward::connect_with(&url, policy(), options())
        .await
        .expect("connect as the restricted user on the cluster");
    exercise_every_capability(&kw).await;
    for url in cluster.urls() {
        let mut con = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .unwrap();
        let log = common::acl_log_of(&mut con);
        assert!(log.is_empty(), "ACL denials:\n{}", log.join("\n"));
    }
}

/// The one grant `-evalsha` takes away is named in the error a caller sees, for a cache read (even with the
/// default `on_error = "fail_open"`) and for a rate-limit check whose class falls back locally on
/// unavailability: a refusal is not unavailability, so neither falls back, the loader is not called, and
/// the breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_grant_is_an_error_naming_the_command_not_a_fallback() {
    let server = restricted_server(&["-evalsha"]);
    let kw = Keyward::connect_with(
        &server.url(),
        policy(),
        options().breaker(2, Duration::from_secs(60)),
    )
    .await
    .expect("connecting needs no script");

    let names_evalsha = |err: &keyward::Error| {
        let text = err.to_string().to_lowercase();
        assert!(
            text.contains("evalsha") && text.contains("noperm"),
            "the error does not name the refused command: {err}"
        );
        assert!(
            !text.contains("acl-test-password"),
            "the password leaked: {err}"
        );
    };

    let cache = kw.cache::<String>("product").unwrap();
    let err = cache
        .get(&1)
        .await
        .expect_err("a refused read is not a miss");
    names_evalsha(&err);
    let loads = AtomicUsize::new(0);
    let err = cache
        .get_or_set(&1, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("from the loader".to_owned())
        })
        .await
        .expect_err("a refused fetch is not served from the loader");
    names_evalsha(&err);
    // The hit path is plain commands, which the user may run: it grants the fill lease, so the loader runs
    // once; the refused commit is then the caller's error, not a value served as if all were well.
    assert!(
        loads.load(Ordering::SeqCst) <= 1,
        "fail_open fell back to the loader on NOPERM"
    );

    let limiter = kw.rate_limiter("gcra").unwrap();
    for _ in 0..4 {
        match limiter.check("client").await {
            Err(err) => names_evalsha(&err),
            Ok(decision) => panic!(
                "a refused check fell back ({:?}) instead of naming the command",
                decision.source()
            ),
        }
    }
    assert_eq!(
        kw.breaker_state(),
        BreakerState::Closed,
        "error replies must not open the breaker"
    );
    assert!(
        common::acl_log(&server)
            .iter()
            .any(|line| line.contains("evalsha")),
        "the server logged no evalsha denial"
    );
}
