//! A [tower-sessions](https://docs.rs/tower-sessions) store on keyward (feature `tower-sessions`):
//! [`KeywardSessionStore`] implements `tower_sessions_core::SessionStore` over a `session` class of the
//! policy, on Redis or on the embedded backend.
//!
//! **The one decision to know:** tower-sessions owns the session id (the cookie value) and the expiry; keyward
//! owns where and how long the record is kept. A record is stored under the class's key space, keyed by
//! HMAC-SHA256 of the id under the current [`SessionSecrets`] secret — never the id itself — and the stored
//! value holds the data and the expiry, not the id. So a leaked dump or `MONITOR` output names no usable
//! session, exactly as for keyward's own [`Sessions`](super::Sessions).
//!
//! | operation | what it does |
//! | --- | --- |
//! | `create` | stores the record only if its id is free under every accepted secret (one script); on a collision it draws a new id, as the trait documents |
//! | `save` | updates a record that exists (under any secret), moving it to the current secret's key; a record that is gone stays gone, so a request that saves after another one logged out cannot bring the session back |
//! | `load` | the record under any accepted secret; a record past its expiry date is `None` |
//! | `delete` | removes the record under every accepted secret |
//!
//! Each is one Lua script on Redis (`session/tower_session_*.lua`) and one critical section on the
//! embedded backend. The key lives for `expiry_date - now`, capped at the class's `absolute`; a record
//! already past its expiry date is not stored (`create`) or is deleted (`save`). The class's `absolute`,
//! `version` and `max_data_bytes` apply; its `idle`, `extend_after` and cookie settings do not (tower-sessions
//! has its own expiry and cookie configuration). Because `save` always moves a record to the current secret,
//! the rotation rule of [`SessionSecrets`] holds here too: drop an old secret once `absolute` has passed since
//! it stopped being current.
//!
//! **Cluster.** An id's keys under the different secrets are in one hash slot, taken from the id's low 14
//! bits: `{env}:{app}:{class}:v{n}:{<slot tag>}:t:<hmac>`. So every script touches one slot, also while
//! secrets rotate. A key thereby shows 14 bits of its id; the other 114 stay unknown.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use keyward::{Keyward, policy::{Policy, SessionClass}, session::SessionSecrets};
//! use keyward::session::tower::KeywardSessionStore;
//! use tower_sessions_core::{SessionStore, session::{Id, Record}};
//!
//! let policy = Policy::builder("dev", "shop")
//!     .session("web", SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)))
//!     .build()?;
//! let kw = Keyward::embedded(policy);
//! let store = KeywardSessionStore::new(&kw, "web", SessionSecrets::new(*b"a 32-byte secret from your vault")?)?;
//!
//! let mut record = Record {
//!     id: Id::default(),
//!     data: [("cart".to_owned(), serde_json::json!([42]))].into(),
//!     expiry_date: time::OffsetDateTime::now_utc() + Duration::from_secs(600),
//! };
//! store.create(&mut record).await?;
//! assert_eq!(store.load(&record.id).await?, Some(record.clone()));
//! store.delete(&record.id).await?;
//! assert_eq!(store.load(&record.id).await?, None);
//! # Ok(()) }
//! ```
//!
//! With tower-sessions itself (`tower_sessions::SessionManagerLayer`), hand it the store:
//!
//! ```text
//! let store = KeywardSessionStore::new(&kw, "web", SessionSecrets::from_base64_list(&env_secrets)?)?;
//! let app = Router::new().route("/", get(handler)).layer(SessionManagerLayer::new(store));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, SessionStore};

use super::SessionSecrets;
use crate::backend::{Backend, Call, Reply, Script, Val, scripts};
use crate::client::Keyward;
use crate::error::{Error, Result};
use crate::key::{CLUSTER_SLOTS, KeySpace, slot_tag};
use crate::policy::ClassKind;

scripts! {
    create: "tower_session_create.lua";
    save: "tower_session_save.lua";
    load: "tower_session_load.lua";
    delete: "tower_session_delete.lua";
}

/// The id part that sets these records apart from keyward's own sessions (no part after the slot tag) and
/// user indexes (`{u:…}`) in the same class.
const KEY_PART: &str = "t";

/// How many fresh ids `create` tries before giving up. Ids are 128 random bits: a second collision in a row
/// means the ids are not random (an application that sets them itself).
const CREATE_ATTEMPTS: usize = 3;

/// A tower-sessions [`SessionStore`] on a keyward `session` class. Cheap to clone; `Debug` never prints the
/// secrets. See the [module docs](self) for what each operation guarantees.
#[derive(Clone)]
pub struct KeywardSessionStore {
    kw: Keyward,
    inner: Arc<Shared>,
}

struct Shared {
    class: String,
    keys: KeySpace,
    secrets: SessionSecrets,
    /// The class's `absolute`, in ms: no record outlives it without being saved again.
    absolute_ms: i128,
    max_bytes: usize,
}

/// What is stored: the record without its id.
#[derive(Serialize)]
struct StoredRef<'a> {
    data: &'a HashMap<String, serde_json::Value>,
    /// The expiry date as Unix nanoseconds: exact, and independent of `time`'s serde format features.
    expiry_ns: i128,
}

#[derive(Deserialize)]
struct Stored {
    data: HashMap<String, serde_json::Value>,
    expiry_ns: i128,
}

impl KeywardSessionStore {
    /// A store for the `session` class `class` of `kw`'s policy, keying records with `secrets`.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`] if the class is not a `session` class.
    pub fn new(kw: &Keyward, class: &str, secrets: SessionSecrets) -> Result<Self> {
        let (declared, keys) = kw.declared(class)?;
        let settings = match declared.kind() {
            ClassKind::Session(s) => s,
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "session",
                    found: other.name(),
                });
            }
        };
        Ok(KeywardSessionStore {
            kw: kw.clone(),
            inner: Arc::new(Shared {
                class: class.to_owned(),
                keys,
                secrets,
                absolute_ms: settings
                    .absolute_value()
                    .as_millis()
                    .try_into()
                    .unwrap_or(i128::MAX),
                max_bytes: settings.max_data_bytes_value(),
            }),
        })
    }

    /// The class name.
    pub fn class(&self) -> &str {
        &self.inner.class
    }

    /// The keys `id` may live under: one per secret, current first, all in the slot named by the id's low
    /// 14 bits.
    fn keys(&self, id: &Id) -> session_store::Result<Vec<String>> {
        let [low, high, ..] = id.0.to_le_bytes();
        let tag = slot_tag(u16::from_le_bytes([low, high]) % CLUSTER_SLOTS);
        self.inner
            .secrets
            .ids(&id.to_string())
            .iter()
            .map(|hmac| {
                self.inner
                    .keys
                    .tagged_key(tag, &[KEY_PART, hmac.as_str()])
                    .map_err(|e| session_store::Error::Backend(e.to_string()))
            })
            .collect()
    }

    /// How long a record expiring at `expiry` is kept, in ms: until then, at most `absolute`; `None` if it has
    /// already expired.
    fn ttl_ms(&self, expiry: OffsetDateTime) -> Option<i64> {
        let left = (expiry - OffsetDateTime::now_utc()).whole_milliseconds();
        (left > 0).then(|| i64::try_from(left.min(self.inner.absolute_ms)).unwrap_or(i64::MAX))
    }

    fn encode(&self, record: &Record) -> session_store::Result<Vec<u8>> {
        let bytes = serde_json::to_vec(&StoredRef {
            data: &record.data,
            expiry_ns: record.expiry_date.unix_timestamp_nanos(),
        })
        .map_err(|e| session_store::Error::Encode(e.to_string()))?;
        if bytes.len() > self.inner.max_bytes {
            return Err(session_store::Error::Encode(format!(
                "class `{}`: the session record is {} bytes, over max_data_bytes ({})",
                self.inner.class,
                bytes.len(),
                self.inner.max_bytes
            )));
        }
        Ok(bytes)
    }

    fn decode(&self, id: Id, bytes: &[u8]) -> session_store::Result<Record> {
        let decode_err = |e: &dyn fmt::Display| {
            session_store::Error::Decode(format!(
                "class `{}`: a stored session record is unreadable: {e}",
                self.inner.class
            ))
        };
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| decode_err(&e))?;
        let expiry_date = OffsetDateTime::from_unix_timestamp_nanos(stored.expiry_ns)
            .map_err(|e| decode_err(&e))?;
        Ok(Record {
            id,
            data: stored.data,
            expiry_date,
        })
    }

    fn backend(&self) -> &Backend {
        &self.kw.inner.backend
    }

    /// Store under `keys[0]` unless the id exists under any key.
    async fn put_new(&self, keys: &[String], value: &[u8], ttl_ms: i64) -> Result<bool> {
        let call = with_keys(&SCRIPTS.create, "tower_session_create", keys)
            .arg(value)
            .arg(ttl_ms);
        self.backend()
            .atomic(
                call,
                |kv| {
                    if keys.iter().any(|k| kv.exists(k)) {
                        return false;
                    }
                    kv.set(&keys[0], Val::Str(Bytes::copy_from_slice(value)), ttl_ms);
                    true
                },
                one,
            )
            .await
    }

    /// Overwrite the record if it exists under any key, moving it to `keys[0]`.
    async fn put_existing(&self, keys: &[String], value: &[u8], ttl_ms: i64) -> Result<bool> {
        let call = with_keys(&SCRIPTS.save, "tower_session_save", keys)
            .arg(value)
            .arg(ttl_ms);
        self.backend()
            .atomic(
                call,
                |kv| {
                    for (i, k) in keys.iter().enumerate() {
                        if kv.exists(k) {
                            if i > 0 {
                                kv.del(k);
                            }
                            kv.set(&keys[0], Val::Str(Bytes::copy_from_slice(value)), ttl_ms);
                            return true;
                        }
                    }
                    false
                },
                one,
            )
            .await
    }

    async fn get(&self, keys: &[String]) -> Result<Option<Bytes>> {
        let call = with_keys(&SCRIPTS.load, "tower_session_load", keys);
        self.backend()
            .atomic(
                call,
                |kv| keys.iter().find_map(|k| kv.get_str(k).cloned()),
                |reply| {
                    if reply.is_nil() {
                        Some(None)
                    } else {
                        reply.bytes().map(Some)
                    }
                },
            )
            .await
    }

    async fn remove(&self, keys: &[String]) -> Result<u64> {
        let call = with_keys(&SCRIPTS.delete, "tower_session_delete", keys);
        self.backend()
            .atomic(
                call,
                |kv| {
                    let mut n = 0;
                    for k in keys {
                        n += u64::from(kv.del(k));
                    }
                    n
                },
                |reply| u64::try_from(reply.int()?).ok(),
            )
            .await
    }
}

fn with_keys(script: &'static Script, op: &'static str, keys: &[String]) -> Call {
    keys.iter().fold(script.call(op), |call, k| call.key(k))
}

fn one(reply: &Reply) -> Option<bool> {
    Some(reply.int()? == 1)
}

fn backend_err(e: Error) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

impl fmt::Debug for KeywardSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeywardSessionStore")
            .field("class", &self.inner.class)
            .field("secrets", &self.inner.secrets)
            .finish()
    }
}

#[async_trait]
impl SessionStore for KeywardSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let Some(ttl_ms) = self.ttl_ms(record.expiry_date) else {
            return Ok(()); // already expired: a load could never return it
        };
        let value = self.encode(record)?;
        for _ in 0..CREATE_ATTEMPTS {
            let keys = self.keys(&record.id)?;
            if self
                .put_new(&keys, &value, ttl_ms)
                .await
                .map_err(backend_err)?
            {
                return Ok(());
            }
            // Never the id itself in a log: it is the client's credential.
            tracing::warn!(class = %self.inner.class, "keyward: a new tower-sessions id is taken; drawing another");
            record.id = Id::default();
        }
        Err(session_store::Error::Backend(format!(
            "class `{}`: {CREATE_ATTEMPTS} session ids in a row were taken; are ids random?",
            self.inner.class
        )))
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let keys = self.keys(&record.id)?;
        let Some(ttl_ms) = self.ttl_ms(record.expiry_date) else {
            self.remove(&keys).await.map_err(backend_err)?;
            return Ok(());
        };
        let value = self.encode(record)?;
        if !self
            .put_existing(&keys, &value, ttl_ms)
            .await
            .map_err(backend_err)?
        {
            tracing::debug!(class = %self.inner.class, "keyward: not saving a tower-sessions record that is gone");
        }
        Ok(())
    }

    async fn load(&self, session_id: &Id) -> session_store::Result<Option<Record>> {
        let keys = self.keys(session_id)?;
        let Some(bytes) = self.get(&keys).await.map_err(backend_err)? else {
            return Ok(None);
        };
        let record = self.decode(*session_id, &bytes)?;
        Ok((record.expiry_date > OffsetDateTime::now_utc()).then_some(record))
    }

    async fn delete(&self, session_id: &Id) -> session_store::Result<()> {
        let keys = self.keys(session_id)?;
        self.remove(&keys).await.map_err(backend_err)?;
        Ok(())
    }
}
