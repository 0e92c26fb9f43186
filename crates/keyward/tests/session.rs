//! Session conformance: every case runs on the embedded backend and on a real redis-server. Timeouts are
//! real (seconds), on both backends, so the server's own expiry is what is tested.

#![allow(unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Harness, slot_of};
use base64::Engine as _;
use keyward::key::KeySpace;
use keyward::policy::{CacheClass, Policy, SessionClass};
use keyward::session::{Saved, SessionSecrets, Sessions};
use keyward::{Error, Keyward};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
struct Cart {
    items: Vec<u32>,
}

const S1: &[u8; 32] = b"first secret, 32 bytes long!!!!!";
const S2: &[u8; 32] = b"second secret, also 32 bytes....";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// `web` (30 min / 12 h), `brief` (idle 1 s, absolute 2 s, extend every 100 ms), `lazy` (idle 2 s, extend
/// after 1 s), `tiny` (32-byte data), `eager` (extends on any read at least 1 ms after the last), and a cache
/// class.
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .session("web", SessionClass::new(secs(1800.0), secs(43200.0)))
        .session(
            "brief",
            SessionClass::new(secs(1.0), secs(2.0)).extend_after(secs(0.1)),
        )
        .session(
            "lazy",
            SessionClass::new(secs(2.0), secs(60.0)).extend_after(secs(1.0)),
        )
        .session(
            "tiny",
            SessionClass::new(secs(60.0), secs(60.0)).max_data_bytes(32),
        )
        .session(
            "eager",
            SessionClass::new(secs(60.0), secs(600.0)).extend_after(secs(0.001)),
        )
        .cache("product", CacheClass::new(secs(60.0), "tests"))
        .build()
        .unwrap()
}

/// The test's own namespace (tests may share the cluster).
fn app(h: &Harness) -> String {
    format!("sess-{}", h.app())
}

async fn connect(h: &Harness) -> Keyward {
    let app = app(h);
    match h.url() {
        Some(s) => Keyward::connect(&s, policy(&app)).await.unwrap(),
        None => Keyward::embedded(policy(&app)),
    }
}

/// The slot a token says its session lives in: its first 14 bits.
fn token_slot(token: &str) -> u16 {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap();
    u16::from_be_bytes([bytes[0] & 0x3F, bytes[1]])
}

fn sessions(kw: &Keyward, class: &str) -> Sessions<Cart> {
    kw.sessions(class, SessionSecrets::new(S1).unwrap())
        .unwrap()
}

conformance!(
    tokens_are_random_and_never_stored,
    reads_extend_only_after_extend_after,
    idle_timeout_ends_a_session,
    absolute_timeout_ends_a_busy_session,
    save_is_versioned_and_loses_no_update_under_races,
    regenerate_moves_the_session_and_kills_the_old_token,
    destroy_list_and_destroy_all,
    secrets_rotate,
    malformed_tokens_name_no_session,
    every_key_expires,
    bad_input_is_a_typed_error,
    every_session_key_is_in_its_users_index_slot,
);

mod cases {
    use super::*;

    pub async fn tokens_are_random_and_never_stored(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "web");
        let mut tokens = HashSet::new();
        for i in 0..50 {
            let (t, session) = s.create(&format!("u{i}"), &Cart::default()).await.unwrap();
            assert_eq!(t.as_str().len(), keyward::session::TOKEN_LEN);
            assert!(keyward::session::is_well_formed(t.as_str()));
            assert!(
                !format!("{t:?}").contains(t.as_str()),
                "Debug redacts the token"
            );
            assert_ne!(session.id().as_str(), t.as_str());
            assert!(tokens.insert(t.as_str().to_owned()), "tokens never repeat");
        }
        // Neither a key nor a stored value contains any token.
        let keys = h.all_keys(&kw).await;
        assert!(keys.len() >= 100, "50 sessions and 50 user indexes");
        let mut dump = String::new();
        for k in &keys {
            dump.push_str(&k.key);
            dump.push('\n');
        }
        if let Some(mut con) = h.raw() {
            for k in &keys {
                let kind: String = ::redis::cmd("TYPE").arg(&k.key).query(&mut *con).unwrap();
                let values: Vec<Vec<u8>> = match kind.as_str() {
                    "hash" => ::redis::cmd("HGETALL")
                        .arg(&k.key)
                        .query(&mut *con)
                        .unwrap(),
                    "zset" => ::redis::cmd("ZRANGE")
                        .arg(&k.key)
                        .arg(0)
                        .arg(-1)
                        .query(&mut *con)
                        .unwrap(),
                    _ => Vec::new(),
                };
                for v in values {
                    dump.push_str(&String::from_utf8_lossy(&v));
                    dump.push('\n');
                }
            }
        }
        for t in &tokens {
            assert!(!dump.contains(t.as_str()), "a token is stored in the clear");
        }
    }

    pub async fn reads_extend_only_after_extend_after(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "lazy");
        let (t, created) = s.create("u", &Cart::default()).await.unwrap();
        let first = s.get(t.as_str()).await.unwrap().unwrap();
        assert_eq!(
            first.last_extended_at(),
            created.last_extended_at(),
            "a read within extend_after writes nothing"
        );
        assert_eq!(first.expires_at(), created.expires_at());
        tokio::time::sleep(secs(1.2)).await;
        let second = s.get(t.as_str()).await.unwrap().unwrap();
        assert!(second.last_extended_at() > created.last_extended_at());
        assert!(second.expires_at() >= created.expires_at() + secs(1.1));
        // Extended past the original idle deadline: still alive 2.5 s after creation.
        tokio::time::sleep(secs(1.3)).await;
        assert!(s.get(t.as_str()).await.unwrap().is_some());
    }

    pub async fn idle_timeout_ends_a_session(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "brief");
        let (t, _) = s.create("idler", &Cart::default()).await.unwrap();
        assert!(s.get(t.as_str()).await.unwrap().is_some());
        tokio::time::sleep(secs(1.3)).await;
        assert!(s.get(t.as_str()).await.unwrap().is_none(), "idle past 1 s");
        assert!(s.list_for_user("idler").await.unwrap().is_empty());
    }

    pub async fn absolute_timeout_ends_a_busy_session(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "brief");
        let (t, created) = s.create("busy", &Cart::default()).await.unwrap();
        let mut alive_until = created.created_at();
        // Used every 200 ms: never idle for 1 s, so only the absolute 2 s can end it.
        for _ in 0..20 {
            tokio::time::sleep(secs(0.2)).await;
            match s.get(t.as_str()).await.unwrap() {
                Some(session) => {
                    assert!(session.expires_at() <= created.created_at() + secs(2.0));
                    alive_until = std::time::SystemTime::now();
                }
                None => break,
            }
        }
        let lived = alive_until
            .duration_since(created.created_at())
            .unwrap_or_default();
        assert!(lived > secs(1.2), "kept alive past idle by use ({lived:?})");
        tokio::time::sleep(secs(0.3)).await;
        assert!(s.get(t.as_str()).await.unwrap().is_none(), "past absolute");
    }

    pub async fn save_is_versioned_and_loses_no_update_under_races(h: Harness) {
        let handles = {
            let first = connect(&h).await;
            let mut v = vec![first.clone()];
            for _ in 1..4 {
                v.push(if h.is_redis() {
                    connect(&h).await
                } else {
                    first.clone()
                });
            }
            v
        };
        let s = sessions(&handles[0], "web");
        let (t, _) = s.create("saver", &Cart::default()).await.unwrap();
        let mut a = s.get(t.as_str()).await.unwrap().unwrap();
        let mut b = s.get(t.as_str()).await.unwrap().unwrap();
        a.data.items.push(1);
        b.data.items.push(2);
        assert_eq!(s.save(&mut a).await.unwrap(), Saved::Saved);
        assert_eq!(a.version(), 2);
        assert_eq!(
            s.save(&mut b).await.unwrap(),
            Saved::Conflict { current_version: 2 },
            "the second writer is told, not silently overwritten"
        );
        assert_eq!(
            s.save(&mut a).await.unwrap(),
            Saved::Saved,
            "a saved session can be saved again"
        );

        // 40 racing read-modify-save loops, each retrying on conflict: every update lands.
        let token = Arc::new(t.as_str().to_owned());
        let mut tasks = Vec::new();
        for i in 0..40u32 {
            let s = sessions(&handles[i as usize % 4], "web");
            let token = Arc::clone(&token);
            tasks.push(tokio::spawn(async move {
                let mut conflicts = 0;
                loop {
                    let mut session = s.get(&token).await.unwrap().unwrap();
                    session.data.items.push(100 + i);
                    match s.save(&mut session).await.unwrap() {
                        Saved::Saved => return conflicts,
                        Saved::Conflict { .. } => conflicts += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
        let mut conflicts = 0;
        for t in tasks {
            conflicts += t.await.unwrap();
        }
        let last = s.get(&token).await.unwrap().unwrap();
        let mut got: Vec<u32> = last
            .data
            .items
            .iter()
            .copied()
            .filter(|x| *x >= 100)
            .collect();
        got.sort_unstable();
        assert_eq!(got, (100..140).collect::<Vec<_>>(), "no update lost");
        assert_eq!(last.version(), 3 + 40);
        eprintln!("{conflicts} conflicts were reported and retried");
    }

    pub async fn regenerate_moves_the_session_and_kills_the_old_token(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "web");
        let (old, _) = s.create("mover", &Cart { items: vec![7] }).await.unwrap();
        let new = s.regenerate(old.as_str()).await.unwrap().expect("alive");
        assert_ne!(new, old);
        assert!(
            s.get(old.as_str()).await.unwrap().is_none(),
            "the old token is dead"
        );
        let session = s.get(new.as_str()).await.unwrap().unwrap();
        assert_eq!(session.data, Cart { items: vec![7] });
        assert_eq!(session.user_id(), "mover");
        let listed = s.list_for_user("mover").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(&listed[0].id, session.id());
        assert!(s.regenerate(old.as_str()).await.unwrap().is_none());
        // A save from a copy read before regenerating cannot write to the moved session's old key.
        let (t2, _) = s.create("mover", &Cart::default()).await.unwrap();
        let mut stale = s.get(t2.as_str()).await.unwrap().unwrap();
        s.regenerate(t2.as_str()).await.unwrap().unwrap();
        assert_eq!(s.save(&mut stale).await.unwrap(), Saved::Gone);
    }

    pub async fn destroy_list_and_destroy_all(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "web");
        let mut a_tokens = Vec::new();
        for _ in 0..3 {
            a_tokens.push(s.create("alice", &Cart::default()).await.unwrap().0);
        }
        let (b_token, _) = s.create("bob", &Cart::default()).await.unwrap();
        let listed = s.list_for_user("alice").await.unwrap();
        assert_eq!(listed.len(), 3);
        assert!(
            listed
                .windows(2)
                .all(|w| w[0].created_at <= w[1].created_at)
        );
        assert!(s.destroy(a_tokens[0].as_str()).await.unwrap());
        assert!(
            !s.destroy(a_tokens[0].as_str()).await.unwrap(),
            "already gone"
        );
        assert_eq!(s.list_for_user("alice").await.unwrap().len(), 2);
        // Bob cannot end Alice's session by id.
        let alice_id = s.list_for_user("alice").await.unwrap()[0].id.clone();
        let parsed: keyward::session::SessionId = alice_id.as_str().parse().unwrap();
        assert_eq!(parsed, alice_id, "an id shown to the user parses back");
        assert!(keyward::session::SessionId::parse("../etc").is_err());
        assert!(!s.destroy_by_id("bob", &alice_id).await.unwrap());
        assert!(s.destroy_by_id("alice", &alice_id).await.unwrap());
        assert_eq!(s.list_for_user("alice").await.unwrap().len(), 1);
        assert_eq!(s.destroy_all_for_user("alice").await.unwrap(), 1);
        assert!(s.list_for_user("alice").await.unwrap().is_empty());
        for t in &a_tokens {
            assert!(s.get(t.as_str()).await.unwrap().is_none());
        }
        assert!(
            s.get(b_token.as_str()).await.unwrap().is_some(),
            "bob untouched"
        );
        assert_eq!(s.destroy_all_for_user("nobody").await.unwrap(), 0);
    }

    pub async fn secrets_rotate(h: Harness) {
        let kw = connect(&h).await;
        let only_s1 = sessions(&kw, "web");
        let (old, _) = only_s1.create("rot", &Cart::default()).await.unwrap();
        let rotated: Sessions<Cart> = kw
            .sessions(
                "web",
                SessionSecrets::new(S2).unwrap().previous(S1).unwrap(),
            )
            .unwrap();
        assert!(
            rotated.get(old.as_str()).await.unwrap().is_some(),
            "reads accept a previous secret"
        );
        let (new, _) = rotated.create("rot", &Cart::default()).await.unwrap();
        assert!(
            only_s1.get(new.as_str()).await.unwrap().is_none(),
            "writes use the newest secret"
        );
        let only_s2: Sessions<Cart> = kw
            .sessions("web", SessionSecrets::new(S2).unwrap())
            .unwrap();
        assert!(only_s2.get(new.as_str()).await.unwrap().is_some());
        assert!(
            only_s2.get(old.as_str()).await.unwrap().is_none(),
            "a retired secret's tokens stop working"
        );
        // A session found under the old secret can still be saved and destroyed through the rotated handle.
        let mut s = rotated.get(old.as_str()).await.unwrap().unwrap();
        s.data.items.push(1);
        assert_eq!(rotated.save(&mut s).await.unwrap(), Saved::Saved);
        assert!(rotated.destroy(old.as_str()).await.unwrap());
        let b64 = "Zmlyc3Qgc2VjcmV0LCAzMiBieXRlcyBsb25nISEhISE=, c2Vjb25kIHNlY3JldCwgYWxzbyAzMiBieXRlcy4uLi4";
        assert_eq!(SessionSecrets::from_base64_list(b64).unwrap().len(), 2);
    }

    pub async fn malformed_tokens_name_no_session(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "web");
        let (t, _) = s.create("m", &Cart::default()).await.unwrap();
        let mut tampered = t.as_str().to_owned();
        let last = if tampered.ends_with('A') { "B" } else { "A" };
        tampered.replace_range(42..43, last);
        for bad in [
            "",
            "abc",
            "!".repeat(43).as_str(),
            &tampered,
            &format!("{}x", t.as_str()),
        ] {
            assert!(s.get(bad).await.unwrap().is_none(), "{bad:?}");
            assert!(!s.destroy(bad).await.unwrap());
            assert!(s.regenerate(bad).await.unwrap().is_none());
        }
        assert!(s.get(t.as_str()).await.unwrap().is_some());
    }

    pub async fn every_key_expires(h: Harness) {
        let kw = connect(&h).await;
        let s = sessions(&kw, "web");
        for i in 0..5 {
            let (t, _) = s
                .create(&format!("k{}", i % 2), &Cart::default())
                .await
                .unwrap();
            s.get(t.as_str()).await.unwrap();
        }
        let keys = h.all_keys(&kw).await;
        assert!(!keys.is_empty());
        for k in keys {
            let ttl = k.ttl.unwrap_or_else(|| panic!("{} has no TTL", k.key));
            assert!(ttl <= secs(1800.0), "{} lives {ttl:?}, beyond idle", k.key);
        }
    }

    pub async fn bad_input_is_a_typed_error(h: Harness) {
        let kw = connect(&h).await;
        assert!(matches!(
            kw.sessions::<Cart>("product", SessionSecrets::new(S1).unwrap()),
            Err(Error::WrongKind {
                expected: "session",
                ..
            })
        ));
        assert!(matches!(
            kw.sessions::<Cart>("nope", SessionSecrets::new(S1).unwrap()),
            Err(Error::UnknownClass { .. })
        ));
        assert!(matches!(
            SessionSecrets::new(b"short"),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            SessionSecrets::new(S1).unwrap().previous(S1),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(SessionSecrets::from_base64_list("not base64!").is_err());
        let s = sessions(&kw, "web");
        assert!(matches!(
            s.create("", &Cart::default()).await,
            Err(Error::InvalidArgument { .. })
        ));
        let tiny = sessions(&kw, "tiny");
        assert!(matches!(
            tiny.create(
                "u",
                &Cart {
                    items: (0..100).collect()
                }
            )
            .await,
            Err(Error::ValueTooLarge {
                field: "max_data_bytes",
                max: 32,
                ..
            })
        ));
        // Data written as one type and read as another: a typed error, and the data stays.
        let (t, _) = s.create("dec", &Cart { items: vec![1] }).await.unwrap();
        let as_number: Sessions<u64> = kw
            .sessions("web", SessionSecrets::new(S1).unwrap())
            .unwrap();
        assert!(matches!(
            as_number.get(t.as_str()).await,
            Err(Error::Decode { .. })
        ));
        assert!(s.get(t.as_str()).await.unwrap().is_some());
    }
    /// Cluster safety on every backend: 200 users × 3 sessions, then a secret rotation (reads, regenerations
    /// and new sessions under the new secret), then ends by id: every session key written is in the slot of
    /// its user's index, and the token names that slot.
    pub async fn every_session_key_is_in_its_users_index_slot(h: Harness) {
        let kw = connect(&h).await;
        let only_s1 = sessions(&kw, "web");
        let rotated: Sessions<Cart> = kw
            .sessions(
                "web",
                SessionSecrets::new(S2).unwrap().previous(S1).unwrap(),
            )
            .unwrap();
        let ks = KeySpace::new(&policy(&app(&h)), "web").unwrap();
        // Some ids need escaping, some contain braces: the index key's own hash tag decides the slot.
        let users: Vec<String> = (0..200)
            .map(|i| match i % 4 {
                0 => format!("user-{i}"),
                1 => format!("{i}@example.com"),
                2 => format!("Üser {{{i}}}: x"),
                _ => format!("{i}"),
            })
            .collect();
        let index_slot = |user: &str| slot_of(&ks.key(&["u", user]).unwrap());
        let mut tokens: Vec<(usize, String)> = Vec::new();
        for (u, user) in users.iter().enumerate() {
            for _ in 0..3 {
                let (t, _) = only_s1.create(user, &Cart::default()).await.unwrap();
                tokens.push((u, t.as_str().to_owned()));
            }
        }
        for (n, (u, token)) in tokens.iter_mut().enumerate() {
            let slot = index_slot(&users[*u]);
            assert_eq!(token_slot(token), slot, "a token names its user's slot");
            if n % 3 == 0 {
                let new = rotated.regenerate(token).await.unwrap().expect("alive");
                assert_eq!(token_slot(new.as_str()), slot, "regenerate keeps the slot");
                *token = new.as_str().to_owned();
            } else {
                assert!(rotated.get(token).await.unwrap().is_some());
            }
        }
        for (u, user) in users.iter().enumerate() {
            let (t, _) = rotated.create(user, &Cart::default()).await.unwrap();
            tokens.push((u, t.as_str().to_owned()));
        }
        // One session per user ends by id (a script given the index and a session key).
        for user in users.iter().step_by(2) {
            let id = rotated.list_for_user(user).await.unwrap()[0].id.clone();
            assert!(rotated.destroy_by_id(user, &id).await.unwrap());
        }

        let keys: Vec<String> = h.all_keys(&kw).await.into_iter().map(|k| k.key).collect();
        let class_prefix = format!("test:{}:web:v1:", app(&h));
        let session_keys: HashMap<&str, &str> = keys
            .iter()
            .filter(|k| k.starts_with(&class_prefix) && !k.contains(":{u:"))
            .map(|k| (k.rsplit(':').next().unwrap(), k.as_str()))
            .collect();
        let mut checked = 0;
        for (u, user) in users.iter().enumerate() {
            let index = ks.key(&["u", user]).unwrap();
            assert!(keys.contains(&index), "{index} exists");
            let slot = slot_of(&index);
            let listed = rotated.list_for_user(user).await.unwrap();
            assert_eq!(listed.len(), if u % 2 == 0 { 3 } else { 4 }, "{user}");
            for info in listed {
                let key = session_keys
                    .get(info.id.as_str())
                    .unwrap_or_else(|| panic!("no key for a session of {user}"));
                assert_eq!(slot_of(key), slot, "{key} is not in {index}'s slot");
                if let Some(server) = h.server() {
                    let stored: String = ::redis::cmd("HGET")
                        .arg(*key)
                        .arg("i")
                        .query(&mut server.connection())
                        .unwrap();
                    assert_eq!(stored, index, "the session names its index");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 700);
        assert_eq!(
            session_keys.len(),
            checked,
            "no session key outside an index"
        );
        for (u, token) in &tokens {
            if let Some(session) = rotated.get(token).await.unwrap() {
                assert_eq!(session.user_id(), users[*u]);
                let key = session_keys[session.id().as_str()];
                assert_eq!(slot_of(key), token_slot(token));
            }
        }
    }
}

/// A one-node Redis Cluster that serves every slot. keyward reaches it through its standalone connection
/// (no redirections happen), but the server applies Cluster's rules to every script: declared keys in two
/// slots are refused (`CROSSSLOT`), and so is an undeclared key in another slot than the script's.
fn one_node_cluster() -> keyward_testkit::RedisServer {
    let server = keyward_testkit::RedisServer::spawn_with(
        keyward_testkit::ServerOptions::default()
            .tcp(true)
            .args(["--cluster-enabled", "yes"]),
    );
    let mut con = server.connection();
    let () = ::redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query(&mut con)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = ::redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
        if info.contains("cluster_state:ok") {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "the one-node cluster is not ok after 10 s: {info}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every session operation, on a server that enforces Cluster's one-slot rule for scripts: none is refused.
#[tokio::test]
async fn every_session_script_keeps_to_one_slot_on_a_cluster_node() {
    let server = one_node_cluster();
    let kw = Keyward::connect(
        &server.url().replacen("redis://", "redis+cluster://", 1),
        policy(&format!("sess{}", std::process::id())),
    )
    .await
    .unwrap();
    let s = sessions(&kw, "web");
    let rotated: Sessions<Cart> = kw
        .sessions(
            "web",
            SessionSecrets::new(S2).unwrap().previous(S1).unwrap(),
        )
        .unwrap();
    for i in 0..40 {
        let user = format!("user-{i}");
        let (t1, _) = s.create(&user, &Cart::default()).await.unwrap();
        let (t2, _) = s.create(&user, &Cart::default()).await.unwrap();
        let mut session = s.get(t1.as_str()).await.unwrap().unwrap();
        session.data.items.push(i);
        assert_eq!(s.save(&mut session).await.unwrap(), Saved::Saved);
        let t1 = rotated.regenerate(t1.as_str()).await.unwrap().unwrap();
        assert!(rotated.get(t2.as_str()).await.unwrap().is_some());
        let (t3, _) = rotated.create(&user, &Cart::default()).await.unwrap();
        let listed = rotated.list_for_user(&user).await.unwrap();
        assert_eq!(listed.len(), 3);
        assert!(rotated.destroy_by_id(&user, &listed[0].id).await.unwrap());
        assert!(
            !rotated
                .destroy_by_id("someone else", &listed[1].id)
                .await
                .unwrap()
        );
        // One of the two older sessions ended by id above; the other ends by token, t3 stays.
        let mut destroyed = 0;
        for t in [t1.as_str(), t2.as_str()] {
            destroyed += u64::from(rotated.destroy(t).await.unwrap());
        }
        assert_eq!(destroyed, 1);
        if i % 2 == 0 {
            rotated.create(&user, &Cart::default()).await.unwrap();
            assert_eq!(rotated.destroy_all_for_user(&user).await.unwrap(), 2);
        } else {
            assert!(rotated.get(t3.as_str()).await.unwrap().is_some());
        }
    }
    // A read that extends a session also moves its index entry (the index reached through field `i`).
    let eager = sessions(&kw, "eager");
    let (t, created) = eager.create("reader", &Cart::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let read = eager.get(t.as_str()).await.unwrap().unwrap();
        if read.last_extended_at() > created.last_extended_at() {
            break;
        }
        assert!(Instant::now() < deadline, "no read extended the session");
    }
    assert!(eager.destroy(t.as_str()).await.unwrap());

    // The test's own slot function agrees with the server on every key written.
    let mut con = server.connection();
    let keys: Vec<String> = ::redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut con)
        .unwrap()
        .map(|k: ::redis::RedisResult<String>| k.unwrap())
        .collect();
    assert_eq!(keys.len(), 40, "20 users with a session and an index left");
    for key in keys {
        let slot: u16 = ::redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query(&mut con)
            .unwrap();
        assert_eq!(slot_of(&key), slot, "{key}");
    }
}

/// The tower-sessions store during a secret rotation (each script then names one id under two secrets) on a
/// server that enforces Cluster's one-slot rule: nothing is refused, and each record's keys share a slot.
#[cfg(feature = "tower-sessions")]
#[tokio::test]
async fn the_tower_store_keeps_to_one_slot_while_secrets_rotate() {
    use keyward::session::tower::KeywardSessionStore;
    use tower_sessions_core::SessionStore;
    use tower_sessions_core::session::{Id, Record};

    let server = one_node_cluster();
    let kw = Keyward::connect(
        &server.url().replacen("redis://", "redis+cluster://", 1),
        policy(&format!("sess{}", std::process::id())),
    )
    .await
    .unwrap();
    let old = KeywardSessionStore::new(&kw, "web", SessionSecrets::new(S1).unwrap()).unwrap();
    let rotated = KeywardSessionStore::new(
        &kw,
        "web",
        SessionSecrets::new(S2).unwrap().previous(S1).unwrap(),
    )
    .unwrap();
    let expiry = time::OffsetDateTime::now_utc() + Duration::from_secs(600);
    let mut ids = Vec::new();
    for n in 0..40 {
        let mut record = Record {
            id: Id::default(),
            data: [("n".to_owned(), serde_json::json!(n))].into(),
            expiry_date: expiry,
        };
        old.create(&mut record).await.unwrap();
        assert_eq!(
            rotated.load(&record.id).await.unwrap(),
            Some(record.clone())
        );
        rotated.save(&record).await.unwrap(); // moves it to the current secret's key
        let mut fresh = Record {
            id: Id::default(),
            ..record.clone()
        };
        rotated.create(&mut fresh).await.unwrap();
        rotated.delete(&fresh.id).await.unwrap();
        ids.push(record.id);
    }
    let mut con = server.connection();
    let keys: Vec<String> = ::redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut con)
        .unwrap()
        .map(|k: ::redis::RedisResult<String>| k.unwrap())
        .collect();
    assert_eq!(
        keys.len(),
        40,
        "one key per record, under the current secret"
    );
    for id in ids {
        let [low, high, ..] = id.0.to_le_bytes();
        let slot = u16::from_le_bytes([low, high]) % 16384;
        assert!(
            keys.iter().any(|k| slot_of(k) == slot),
            "no key in the slot of {id:?}"
        );
        rotated.delete(&id).await.unwrap();
    }
}
