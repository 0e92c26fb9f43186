//! `KeywardSessionStore` (feature `tower-sessions`) on both backends, which must agree: the round trip,
//! create never overwriting, expiry, secret rotation, and ids never reaching the store.
//!
//! `cargo test -p keyward --features tower-sessions --test tests tower_sessions::`

#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::Harness;
use keyward::policy::{CacheClass, Policy, SessionClass};
use keyward::session::SessionSecrets;
use keyward::session::tower::KeywardSessionStore;
use keyward::{Error, Keyward};
use serde_json::json;
use time::OffsetDateTime;
use tower_sessions_core::SessionStore;
use tower_sessions_core::session::{Id, Record};

const ABSOLUTE: Duration = Duration::from_secs(3600);
const SECRET_A: &[u8; 32] = b"tower-sessions test secret A....";
const SECRET_B: &[u8; 32] = b"tower-sessions test secret B....";

static NEXT_APP: AtomicUsize = AtomicUsize::new(0);

/// A policy with the session class `web` (absolute 1 h) and a cache class `product`.
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .session(
            "web",
            SessionClass::new(Duration::from_secs(600), ABSOLUTE).max_data_bytes(1024),
        )
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "tests, after each write"),
        )
        .build()
        .expect("valid policy")
}

async fn keyward(h: &Harness) -> Keyward {
    let app = format!(
        "tower{}-{}",
        std::process::id(),
        NEXT_APP.fetch_add(1, Ordering::Relaxed)
    );
    match h.url() {
        Some(s) => Keyward::connect(&s, policy(&app))
            .await
            .expect("connect to test redis"),
        None => Keyward::embedded(policy(&app)),
    }
}

fn secrets(current: &[u8; 32]) -> SessionSecrets {
    SessionSecrets::new(current).unwrap()
}

fn new_store(kw: &Keyward, s: SessionSecrets) -> KeywardSessionStore {
    KeywardSessionStore::new(kw, "web", s).unwrap()
}

fn record(value: serde_json::Value, lifetime: Duration) -> Record {
    Record {
        id: Id::default(),
        data: [("v".to_owned(), value)].into(),
        expiry_date: OffsetDateTime::now_utc() + lifetime,
    }
}

conformance!(
    create_save_load_delete_round_trip,
    create_never_overwrites_an_existing_id,
    save_never_brings_back_a_deleted_record,
    expiry_date_is_honoured_and_capped_at_absolute,
    the_id_is_in_no_key_and_no_value,
    loads_accept_a_previous_secret_and_saves_move_to_the_current_one,
    only_a_session_class_is_accepted,
);

mod cases {
    use super::*;

    pub async fn create_save_load_delete_round_trip(h: Harness) {
        let kw = keyward(&h).await;
        let store = new_store(&kw, secrets(SECRET_A));
        let mut rec = record(json!({"cart": [1, 2]}), Duration::from_secs(600));
        let id = rec.id;
        store.create(&mut rec).await.unwrap();
        assert_eq!(rec.id, id, "a free id is kept");
        assert_eq!(store.load(&id).await.unwrap(), Some(rec.clone()));

        rec.data.insert("user".into(), json!("u-7"));
        rec.expiry_date = OffsetDateTime::now_utc() + Duration::from_secs(900);
        store.save(&rec).await.unwrap();
        assert_eq!(store.load(&id).await.unwrap(), Some(rec.clone()));

        store.delete(&id).await.unwrap();
        assert_eq!(store.load(&id).await.unwrap(), None);
        store.delete(&id).await.unwrap(); // deleting what is gone is fine
        assert!(
            h.all_keys(&kw).await.is_empty(),
            "a deleted record leaves no key"
        );

        // Over the class's max_data_bytes (1 KiB): an encode error, nothing stored.
        let mut big = record(json!("x".repeat(2000)), Duration::from_secs(600));
        let err = store.create(&mut big).await.unwrap_err();
        assert!(
            matches!(err, tower_sessions_core::session_store::Error::Encode(_)),
            "{err:?}"
        );
        assert_eq!(store.load(&big.id).await.unwrap(), None);
    }

    pub async fn create_never_overwrites_an_existing_id(h: Harness) {
        let kw = keyward(&h).await;
        let store = new_store(&kw, secrets(SECRET_A));
        let mut first = record(json!("first"), Duration::from_secs(600));
        store.create(&mut first).await.unwrap();

        let mut second = record(json!("second"), Duration::from_secs(600));
        second.id = first.id;
        store.create(&mut second).await.unwrap();
        assert_ne!(second.id, first.id, "a taken id is replaced by a fresh one");
        assert_eq!(store.load(&first.id).await.unwrap(), Some(first.clone()));
        assert_eq!(store.load(&second.id).await.unwrap(), Some(second.clone()));

        // The id is taken under a previous secret too: still never overwritten.
        let rotated = new_store(&kw, secrets(SECRET_B).previous(SECRET_A).unwrap());
        let mut third = record(json!("third"), Duration::from_secs(600));
        third.id = first.id;
        rotated.create(&mut third).await.unwrap();
        assert_ne!(third.id, first.id);
        assert_eq!(rotated.load(&first.id).await.unwrap(), Some(first));
        assert_eq!(rotated.load(&third.id).await.unwrap(), Some(third));
    }

    pub async fn save_never_brings_back_a_deleted_record(h: Harness) {
        let kw = keyward(&h).await;
        let store = new_store(&kw, secrets(SECRET_A));
        let mut rec = record(json!(1), Duration::from_secs(600));
        store.create(&mut rec).await.unwrap();
        // Request 1 logs out while request 2, which loaded the session before, saves it.
        store.delete(&rec.id).await.unwrap();
        rec.data.insert("late".into(), json!(true));
        store.save(&rec).await.unwrap();
        assert_eq!(store.load(&rec.id).await.unwrap(), None);
        // Saving a record that was never created stores nothing either.
        let never = record(json!(2), Duration::from_secs(600));
        store.save(&never).await.unwrap();
        assert_eq!(store.load(&never.id).await.unwrap(), None);
        assert!(h.all_keys(&kw).await.is_empty());
    }

    pub async fn expiry_date_is_honoured_and_capped_at_absolute(h: Harness) {
        let kw = keyward(&h).await;
        let store = new_store(&kw, secrets(SECRET_A));

        // A short expiry: loadable now, gone (key and all) once it has passed.
        let mut short = record(json!("short"), Duration::from_millis(700));
        store.create(&mut short).await.unwrap();
        assert!(store.load(&short.id).await.unwrap().is_some());
        let keys = h.all_keys(&kw).await;
        assert_eq!(keys.len(), 1);
        let ttl = keys[0].ttl.expect("every key has a TTL");
        assert!(ttl <= Duration::from_millis(700), "{ttl:?}");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(store.load(&short.id).await.unwrap(), None);
        assert!(h.all_keys(&kw).await.is_empty(), "the key expired with it");

        // Already expired: create stores nothing; save deletes what was there.
        let mut stale = record(json!("stale"), Duration::ZERO);
        stale.expiry_date -= Duration::from_secs(1);
        store.create(&mut stale).await.unwrap();
        assert_eq!(store.load(&stale.id).await.unwrap(), None);
        assert!(h.all_keys(&kw).await.is_empty());
        let mut live = record(json!("live"), Duration::from_secs(600));
        store.create(&mut live).await.unwrap();
        live.expiry_date = OffsetDateTime::now_utc() - Duration::from_secs(1);
        store.save(&live).await.unwrap();
        assert_eq!(store.load(&live.id).await.unwrap(), None);
        assert!(h.all_keys(&kw).await.is_empty());

        // A year away: the key lives at most the class's absolute (1 h); the record keeps its date.
        let mut long = record(json!("long"), Duration::from_secs(365 * 24 * 3600));
        store.create(&mut long).await.unwrap();
        let keys = h.all_keys(&kw).await;
        assert_eq!(keys.len(), 1);
        let ttl = keys[0].ttl.expect("every key has a TTL");
        assert!(
            ttl <= ABSOLUTE && ttl > ABSOLUTE - Duration::from_secs(60),
            "{ttl:?}"
        );
        assert_eq!(store.load(&long.id).await.unwrap(), Some(long));
    }

    pub async fn the_id_is_in_no_key_and_no_value(h: Harness) {
        let kw = keyward(&h).await;
        let store = new_store(&kw, secrets(SECRET_A));
        let mut ids = Vec::new();
        for n in 0..5 {
            let mut rec = record(json!(n), Duration::from_secs(600));
            store.create(&mut rec).await.unwrap();
            ids.push(rec.id);
        }
        let keys = h.all_keys(&kw).await;
        assert_eq!(keys.len(), 5);
        let needles = |id: &Id| [id.to_string(), id.0.to_string()];
        for key in &keys {
            assert!(
                key.key.contains(":web:v1:{s:") && key.key.contains("}:t:"),
                "stored in the class's key space: {}",
                key.key
            );
            for id in &ids {
                for needle in needles(id) {
                    assert!(!key.key.contains(&needle), "key {} holds an id", key.key);
                }
            }
        }
        if let Some(mut con) = h.raw() {
            for key in &keys {
                let value: Vec<u8> = ::redis::cmd("GET").arg(&key.key).query(&mut *con).unwrap();
                let value = String::from_utf8(value).unwrap();
                for id in &ids {
                    for needle in needles(id) {
                        assert!(!value.contains(&needle), "value {value} holds an id");
                    }
                }
            }
        }
    }

    pub async fn loads_accept_a_previous_secret_and_saves_move_to_the_current_one(h: Harness) {
        let kw = keyward(&h).await;
        let old = new_store(&kw, secrets(SECRET_A));
        let mut rec = record(json!("before rotation"), Duration::from_secs(600));
        old.create(&mut rec).await.unwrap();
        let before = h.all_keys(&kw).await;
        assert_eq!(before.len(), 1);

        let rotated = new_store(&kw, secrets(SECRET_B).previous(SECRET_A).unwrap());
        assert_eq!(rotated.load(&rec.id).await.unwrap(), Some(rec.clone()));
        rec.data.insert("after".into(), json!("rotation"));
        rotated.save(&rec).await.unwrap();
        let after = h.all_keys(&kw).await;
        assert_eq!(after.len(), 1, "moved, not copied");
        assert_ne!(
            after[0].key, before[0].key,
            "now keyed under the new secret"
        );

        // Only the new secret is needed from now on; the old one alone finds nothing.
        let new_only = new_store(&kw, secrets(SECRET_B));
        assert_eq!(new_only.load(&rec.id).await.unwrap(), Some(rec.clone()));
        assert_eq!(old.load(&rec.id).await.unwrap(), None);
        rotated.delete(&rec.id).await.unwrap();
        assert!(h.all_keys(&kw).await.is_empty());
    }

    pub async fn only_a_session_class_is_accepted(h: Harness) {
        let kw = keyward(&h).await;
        let err = KeywardSessionStore::new(&kw, "product", secrets(SECRET_A)).unwrap_err();
        assert!(matches!(err, Error::WrongKind { .. }), "{err:?}");
        let err = KeywardSessionStore::new(&kw, "nope", secrets(SECRET_A)).unwrap_err();
        assert!(matches!(err, Error::UnknownClass { .. }), "{err:?}");
        let store = new_store(&kw, secrets(SECRET_A));
        assert_eq!(store.class(), "web");
        assert!(!format!("{store:?}").contains("secret A"));
    }
}
