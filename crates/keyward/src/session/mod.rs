//! Server-side sessions: opaque tokens, timeouts enforced on the server, versioned saves, per-user listing.
//!
//! **The guarantee.** A token is 32 bytes (base64url, 43 characters): 242 random bits from the operating
//! system's CSPRNG plus the 14-bit hash slot its session lives in (see *Cluster* below), and Redis never
//! stores it: a session's key holds HMAC-SHA256 of the token under a server secret, so a leaked
//! dump or `MONITOR` output yields no usable session. A session is gone, for every reader at once, when it has
//! been idle for `idle` since its last extension or alive for `absolute` since creation — both checked by
//! one script on the server's clock, which also pushes the idle expiry back (at most once per `extend_after`).
//! [`Sessions::save`] applies only on top of the version it read, so two concurrent requests cannot silently
//! overwrite each other: the second is told [`Saved::Conflict`]. [`Sessions::regenerate`] moves a session to
//! a new token and kills the old one in the same step (call it at login and on privilege changes, against
//! session fixation). A per-user index, kept by the same scripts, lists and ends exactly a user's live
//! sessions.
//!
//! Secrets rotate: [`SessionSecrets`] holds the current secret and any previous ones; reads accept a token
//! keyed under any of them, new sessions use the current one. Remove an old secret once `absolute` has
//! passed since it stopped being current.
//!
//! ```
//! # async fn demo() -> keyward::Result<()> {
//! use std::time::Duration;
//! use keyward::{Keyward, policy::{Policy, SessionClass}, session::{Saved, SessionSecrets}};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
//! struct Cart { items: Vec<u32> }
//!
//! let policy = Policy::builder("dev", "shop")
//!     .session("web", SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)))
//!     .build()?;
//! let kw = Keyward::embedded(policy);
//! let secrets = SessionSecrets::new(*b"a 32-byte secret from your vault")?;
//! let sessions = kw.sessions::<Cart>("web", secrets)?;
//!
//! let (token, _) = sessions.create("user-7", &Cart { items: vec![] }).await?;
//! let mut session = sessions.get(token.as_str()).await?.expect("just created");
//! session.data.items.push(42);
//! assert!(matches!(sessions.save(&mut session).await?, Saved::Saved));
//!
//! let token = sessions.regenerate(token.as_str()).await?.expect("still alive"); // e.g. after login
//! assert_eq!(sessions.list_for_user("user-7").await?.len(), 1);
//! assert!(sessions.destroy(token.as_str()).await?);
//! # Ok(()) }
//! ```
//!
//! **Cluster.** Every session script touches keys of one hash slot only: the user's. A token carries its
//! session's *home slot* (the slot of the user's index key) in 14 of its 256 bits, and the session's key is
//! `{env}:{app}:{class}:v{n}:{<slot tag>}:<id>`, whose hash tag hashes to that slot. So the session, its
//! user's index and every candidate key of a token (one per secret) share a slot; the other 242 bits of
//! the token stay random. See `docs/sessions.md`.

pub(crate) mod store;
#[cfg(feature = "tower-sessions")]
pub mod tower;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

use crate::client::Keyward;
use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::key::{CLUSTER_SLOTS, KeySpace, cluster_slot, slot_tag};
use crate::policy::{ClassKind, SessionClass};
use store::{Regenerated, SaveReply, Timeouts};

/// Length of a token in characters (32 bytes, base64url without padding).
pub const TOKEN_LEN: usize = 43;

/// Length of a token in bytes, decoded.
const TOKEN_BYTES: usize = 32;

/// The server secrets that key session ids: the current one first, then previous ones still accepted.
///
/// Each secret must be at least [`SessionSecrets::MIN_LEN`] bytes; use random bytes from a vault, not a
/// password. `Debug` never prints them.
#[derive(Clone)]
pub struct SessionSecrets {
    keys: Vec<Vec<u8>>,
}

impl SessionSecrets {
    /// The shortest secret accepted: 32 bytes (the HMAC-SHA256 output size).
    pub const MIN_LEN: usize = 32;

    /// Secrets with `current` as the one new sessions use.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if it is shorter than [`MIN_LEN`](Self::MIN_LEN).
    pub fn new(current: impl AsRef<[u8]>) -> Result<Self> {
        let current = current.as_ref();
        check_secret(current, "the current session secret")?;
        Ok(SessionSecrets {
            keys: vec![current.to_vec()],
        })
    }

    /// Also accept tokens keyed under `older` (a secret being rotated out).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if it is too short or repeats a secret already held.
    pub fn previous(mut self, older: impl AsRef<[u8]>) -> Result<Self> {
        let older = older.as_ref();
        check_secret(older, "a previous session secret")?;
        if self.keys.iter().any(|k| k == older) {
            return Err(Error::InvalidArgument {
                what: "a previous session secret repeats one already given".into(),
            });
        }
        self.keys.push(older.to_vec());
        Ok(self)
    }

    /// Parse a comma-separated list of base64 (standard or URL-safe, padding optional) secrets, current
    /// first — the shape of an environment variable such as `SESSION_SECRETS`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the position of a secret that is empty, not base64, or too short.
    pub fn from_base64_list(list: &str) -> Result<Self> {
        let mut secrets: Option<SessionSecrets> = None;
        for (i, part) in list.split(',').enumerate() {
            let part = part.trim();
            let decoded = decode_any_base64(part).ok_or_else(|| Error::InvalidArgument {
                what: format!("session secret #{} is not base64", i + 1),
            })?;
            secrets = Some(match secrets {
                None => SessionSecrets::new(&decoded)?,
                Some(s) => s.previous(&decoded)?,
            });
        }
        secrets.ok_or_else(|| Error::InvalidArgument {
            what: "no session secret given".into(),
        })
    }

    /// How many secrets are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: there is at least the current secret.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The session id of `token` under each secret, current first.
    fn ids(&self, token: &str) -> Vec<SessionId> {
        self.keys
            .iter()
            .map(|k| {
                let mut mac = Hmac::<Sha256>::new_from_slice(k).expect("HMAC takes any key length");
                mac.update(token.as_bytes());
                SessionId(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
            })
            .collect()
    }
}

fn check_secret(secret: &[u8], what: &str) -> Result<()> {
    if secret.len() < SessionSecrets::MIN_LEN {
        return Err(Error::InvalidArgument {
            what: format!(
                "{what} is {} bytes; it must be at least {} random bytes",
                secret.len(),
                SessionSecrets::MIN_LEN
            ),
        });
    }
    Ok(())
}

fn decode_any_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
    if text.is_empty() {
        return None;
    }
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(text).ok())
}

impl fmt::Debug for SessionSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionSecrets({} secrets, redacted)", self.keys.len())
    }
}

/// A session token: what the client holds (in a cookie). `Debug` and `Display` never print it; use
/// [`as_str`](Self::as_str) to put it in the cookie.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// A fresh token whose home slot is `slot`: 32 bytes from the OS CSPRNG, of which the low 6 bits of the
    /// first byte and all of the second are then set to the slot (14 bits, `slot < 16384`); the other 242
    /// bits stay random.
    fn generate(slot: u16) -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random number generator failed");
        SessionToken(URL_SAFE_NO_PAD.encode(with_slot(bytes, slot)))
    }

    /// The token text, for the cookie value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(redacted)")
    }
}

/// `bytes` with `slot` (mod 16384) written into its first 14 bits: the low 6 bits of byte 0 are the slot's
/// high 6 bits, byte 1 its low 8; the top 2 bits of byte 0 and bytes 2.. are kept.
fn with_slot(mut bytes: [u8; TOKEN_BYTES], slot: u16) -> [u8; TOKEN_BYTES] {
    let [high, low] = (slot % CLUSTER_SLOTS).to_be_bytes();
    bytes[0] = (bytes[0] & 0xC0) | high;
    bytes[1] = low;
    bytes
}

/// The home slot carried by `token`; `None` unless it is 43 base64url characters that decode canonically
/// to 32 bytes (anything else names no session).
fn token_slot(token: &str) -> Option<u16> {
    if !is_well_formed(token) {
        return None;
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    match URL_SAFE_NO_PAD.decode_slice(token, &mut bytes) {
        Ok(TOKEN_BYTES) => Some(u16::from_be_bytes([bytes[0] & 0x3F, bytes[1]])),
        _ => None,
    }
}

/// Whether `token` has the shape of a keyward token (anything else cannot name a session).
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The stored id of a session: HMAC-SHA256 of its token. Safe to show (it cannot be turned back into the
/// token), e.g. in a "your devices" page, and usable with [`Sessions::destroy_by_id`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// The id text (base64url).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse an id shown to a user earlier (e.g. posted back by a "log out that device" form).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless it is 43 base64url characters, the shape of every id.
    pub fn parse(text: &str) -> Result<SessionId> {
        if is_well_formed(text) {
            Ok(SessionId(text.to_owned()))
        } else {
            Err(Error::InvalidArgument {
                what: "a session id is 43 base64url characters".into(),
            })
        }
    }
}

impl std::str::FromStr for SessionId {
    type Err = Error;

    fn from_str(s: &str) -> Result<SessionId> {
        SessionId::parse(s)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A live session, read by [`Sessions::get`]: typed data plus what the server knows about it.
#[derive(Clone, Debug)]
pub struct Session<T> {
    /// The session data; change it and call [`Sessions::save`].
    pub data: T,
    id: SessionId,
    key: String,
    user_id: String,
    version: u64,
    created_at: SystemTime,
    last_extended_at: SystemTime,
    expires_at: SystemTime,
}

impl<T> Session<T> {
    /// The session's stored id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The user the session belongs to.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The version read (it increases with every successful save).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the session was created (server clock).
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// When the idle expiry was last pushed back.
    pub fn last_extended_at(&self) -> SystemTime {
        self.last_extended_at
    }

    /// When the session ends if it is not used again (idle or absolute, whichever is first).
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

/// What [`Sessions::save`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Saved {
    /// Stored; the session's version was advanced.
    Saved,
    /// Someone saved this session since it was read: nothing was written. Re-read, re-apply, save again.
    Conflict {
        /// The version now stored.
        current_version: u64,
    },
    /// The session has ended (timed out, destroyed or regenerated): nothing was written.
    Gone,
}

/// One live session of a user, from [`Sessions::list_for_user`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The stored id (not the token).
    pub id: SessionId,
    /// When it was created.
    pub created_at: SystemTime,
    /// When its idle expiry was last pushed back (roughly its last use, within `extend_after`).
    pub last_extended_at: SystemTime,
    /// When it ends if not used again.
    pub expires_at: SystemTime,
}

/// Typed sessions of one `session` class. Cheap to clone.
///
/// The token goes to the client (a cookie); Redis stores only its HMAC. Reads slide the idle expiry, saves
/// are versioned, and `regenerate` (at login) ends the old token.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keyward::Keyward;
/// use keyward::policy::{Policy, SessionClass};
/// use keyward::session::{Saved, SessionSecrets};
///
/// let policy = Policy::builder("dev", "shop")
///     .session("web", SessionClass::new(Duration::from_secs(30 * 60), Duration::from_secs(12 * 3600)))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// // In production: SessionSecrets::from_base64_list(&std::env::var("SESSION_SECRETS")?)
/// let sessions = kw.sessions::<Vec<u32>>("web", SessionSecrets::new([7u8; 32])?)?;
///
/// let (token, _) = sessions.create("user-7", &vec![]).await?; // token.as_str() goes in the cookie
/// let mut s = sessions.get(token.as_str()).await?.expect("alive");
/// s.data.push(42);
/// assert!(matches!(sessions.save(&mut s).await?, Saved::Saved));
///
/// // At login: a new token, the old one dead. `None` if the session had ended meanwhile.
/// let Some(fresh) = sessions.regenerate(token.as_str()).await? else {
///     return Ok(()); // log in again
/// };
/// assert!(sessions.get(token.as_str()).await?.is_none());
/// assert_eq!(sessions.get(fresh.as_str()).await?.expect("alive").data, vec![42]);
/// assert!(sessions.destroy(fresh.as_str()).await?); // log out
/// # Ok(()) }
/// ```
pub struct Sessions<T, C = Json> {
    kw: Keyward,
    inner: Arc<Shared>,
    _types: PhantomData<fn() -> (T, C)>,
}

struct Shared {
    class: String,
    settings: SessionClass,
    keys: KeySpace,
    secrets: SessionSecrets,
    timeouts: Timeouts,
}

impl<T, C> Clone for Sessions<T, C> {
    fn clone(&self) -> Self {
        Sessions {
            kw: self.kw.clone(),
            inner: Arc::clone(&self.inner),
            _types: PhantomData,
        }
    }
}

impl<T, C> fmt::Debug for Sessions<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("class", &self.inner.class)
            .field("secrets", &self.inner.secrets)
            .finish()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Keyward {
    /// Typed sessions (JSON-encoded data) for a `session` class of the policy.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`].
    pub fn sessions<T>(&self, class: &str, secrets: SessionSecrets) -> Result<Sessions<T>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.sessions_with_codec::<T, Json>(class, secrets)
    }

    /// Typed sessions with another codec.
    ///
    /// # Errors
    /// As [`sessions`](Self::sessions).
    pub fn sessions_with_codec<T, C>(
        &self,
        class: &str,
        secrets: SessionSecrets,
    ) -> Result<Sessions<T, C>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let (declared, keys) = self.declared(class)?;
        let settings = match declared.kind() {
            ClassKind::Session(s) => s.clone(),
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "session",
                    found: other.name(),
                });
            }
        };
        let timeouts = Timeouts {
            idle: ms(settings.idle_value()),
            absolute: ms(settings.absolute_value()),
            extend_after: ms(settings.extend_after_value()),
        };
        Ok(Sessions {
            kw: self.clone(),
            inner: Arc::new(Shared {
                class: class.to_owned(),
                settings,
                keys,
                secrets,
                timeouts,
            }),
            _types: PhantomData,
        })
    }
}

impl<T, C> Sessions<T, C>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// The class name.
    pub fn class(&self) -> &str {
        &self.inner.class
    }

    /// The class settings (timeouts, cookie).
    pub fn settings(&self) -> &SessionClass {
        &self.inner.settings
    }

    /// The key of session `id` whose home slot is `slot`: `…:v{n}:{<slot tag>}:<id>`, in that slot.
    fn session_key(&self, slot: u16, id: &SessionId) -> Result<String> {
        Ok(self.inner.keys.tagged_key(slot_tag(slot), id.as_str())?)
    }

    /// The user's index key (`…:v{n}:{u:<user>}`) and its slot, the home slot of the user's sessions.
    fn index_key(&self, user_id: &str) -> Result<(String, u16)> {
        let index = self.inner.keys.key(&["u", user_id])?;
        let slot = cluster_slot(index.as_bytes());
        Ok((index, slot))
    }

    /// A fresh token in `slot` and its session id and key under the current secret.
    fn fresh(&self, slot: u16) -> Result<(SessionToken, SessionId, String)> {
        let token = SessionToken::generate(slot);
        let id = self.inner.secrets.ids(token.as_str()).swap_remove(0);
        let key = self.session_key(slot, &id)?;
        Ok((token, id, key))
    }

    /// The keys `token` may live under: one per secret, current first. Empty for a malformed token.
    fn candidate_keys(&self, token: &str) -> Result<Vec<String>> {
        Ok(self
            .candidates(token)?
            .into_iter()
            .map(|(_, key)| key)
            .collect())
    }

    /// The ids and keys `token` may live under: one per secret, current first, all in the token's home
    /// slot. Empty for a malformed token.
    fn candidates(&self, token: &str) -> Result<Vec<(SessionId, String)>> {
        let Some(slot) = token_slot(token) else {
            return Ok(Vec::new());
        };
        self.inner
            .secrets
            .ids(token)
            .into_iter()
            .map(|id| {
                let key = self.session_key(slot, &id)?;
                Ok((id, key))
            })
            .collect()
    }

    fn encode(&self, data: &T) -> Result<Vec<u8>> {
        let bytes = C::encode(data).map_err(|e| Error::Encode {
            class: self.inner.class.clone(),
            source: Arc::new(e),
        })?;
        let max = self.inner.settings.max_data_bytes_value();
        if bytes.len() > max {
            return Err(Error::ValueTooLarge {
                class: self.inner.class.clone(),
                field: "max_data_bytes",
                size: bytes.len(),
                max,
            });
        }
        Ok(bytes)
    }

    fn check_user(&self, user_id: &str) -> Result<()> {
        if user_id.is_empty() {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: a session's user id cannot be empty",
                    self.inner.class
                ),
            });
        }
        Ok(())
    }

    /// Start a session for `user_id` with `data`; returns the token for the client and the session.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty user id, [`Error::Encode`], [`Error::ValueTooLarge`] (over
    /// `max_data_bytes`), key errors for an unusable user id, and backend failures.
    pub async fn create(&self, user_id: &str, data: &T) -> Result<(SessionToken, Session<T>)>
    where
        T: Clone,
    {
        self.check_user(user_id)?;
        let bytes = self.encode(data)?;
        let (index, slot) = self.index_key(user_id)?;
        // A collision of 242 random bits does not happen; the loop only makes "never overwrite" explicit.
        for _ in 0..3 {
            let (token, id, key) = self.fresh(slot)?;
            if let Some((now, exp)) = store::create(
                &self.kw.inner.backend,
                &key,
                &index,
                user_id,
                &bytes,
                self.inner.timeouts,
            )
            .await?
            {
                metrics::counter!("keyward_session_created_total", "class" => self.inner.class.clone())
                    .increment(1);
                let session = Session {
                    data: data.clone(),
                    id,
                    key,
                    user_id: user_id.to_owned(),
                    version: 1,
                    created_at: at(now),
                    last_extended_at: at(now),
                    expires_at: at(exp),
                };
                return Ok((token, session));
            }
        }
        Err(Error::InvalidArgument {
            what: "three fresh session tokens collided; the random number generator is broken"
                .into(),
        })
    }

    /// The live session of `token`, or `None` if it has ended, never existed, or the token is malformed (all
    /// look the same to the caller, on purpose). Extends the idle expiry when the last extension is at
    /// least `extend_after` old.
    ///
    /// # Errors
    /// [`Error::Decode`] if the stored data is not a valid `T` (it is left in place), and backend failures.
    pub async fn get(&self, token: &str) -> Result<Option<Session<T>>> {
        let mut candidates = self.candidates(token)?;
        if candidates.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = candidates.iter().map(|(_, key)| key.clone()).collect();
        let Some(found) = store::get(&self.kw.inner.backend, &keys, self.inner.timeouts).await?
        else {
            metrics::counter!("keyward_session_misses_total", "class" => self.inner.class.clone())
                .increment(1);
            return Ok(None);
        };
        metrics::counter!("keyward_session_hits_total", "class" => self.inner.class.clone())
            .increment(1);
        let data = C::decode(&found.data).map_err(|e| Error::Decode {
            class: self.inner.class.clone(),
            source: Arc::new(e),
        })?;
        if found.which >= candidates.len() {
            return Err(Error::InvalidArgument {
                what: "the store named a key that was not asked for".into(),
            });
        }
        let (id, key) = candidates.swap_remove(found.which);
        Ok(Some(Session {
            data,
            id,
            key,
            user_id: found.user,
            version: found.version,
            created_at: at(found.created_ms),
            last_extended_at: at(found.extended_ms),
            expires_at: at(found.expires_ms),
        }))
    }

    /// Store `session.data` if nobody saved the session since it was read. On success the session's version
    /// is advanced, so it can be saved again.
    ///
    /// # Errors
    /// [`Error::Encode`], [`Error::ValueTooLarge`], and backend failures. A conflict or an ended session is
    /// a [`Saved`] value, not an error.
    pub async fn save(&self, session: &mut Session<T>) -> Result<Saved> {
        let bytes = self.encode(&session.data)?;
        let reply = store::save(
            &self.kw.inner.backend,
            &session.key,
            session.version,
            &bytes,
        )
        .await?;
        Ok(match reply {
            SaveReply::Saved(v) => {
                session.version = v;
                Saved::Saved
            }
            SaveReply::Conflict(v) => {
                metrics::counter!("keyward_session_conflicts_total", "class" => self.inner.class.clone())
                    .increment(1);
                Saved::Conflict { current_version: v }
            }
            SaveReply::Gone => Saved::Gone,
        })
    }

    /// Move the session of `token` to a new token (same data, user and timeouts) and end the old token in the
    /// same step. Call it when the user logs in or gains privileges, so a token planted before (session
    /// fixation) or leaked before is worthless after. `None` if the session has ended.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn regenerate(&self, token: &str) -> Result<Option<SessionToken>> {
        let Some(slot) = token_slot(token) else {
            return Ok(None);
        };
        let old = self.candidate_keys(token)?;
        for _ in 0..3 {
            // The new token keeps the old one's home slot: the session stays next to its user's index.
            let (new, _, new_key) = self.fresh(slot)?;
            match store::regenerate(&self.kw.inner.backend, &old, &new_key).await? {
                Regenerated::Moved => return Ok(Some(new)),
                Regenerated::Missing => return Ok(None),
                Regenerated::Collision => continue,
            }
        }
        Err(Error::InvalidArgument {
            what: "three fresh session tokens collided; the random number generator is broken"
                .into(),
        })
    }

    /// End the session of `token` (log out). Returns whether there was one.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn destroy(&self, token: &str) -> Result<bool> {
        let keys = self.candidate_keys(token)?;
        if keys.is_empty() {
            return Ok(false);
        }
        Ok(store::destroy(&self.kw.inner.backend, &keys, None).await? > 0)
    }

    /// End one of `user_id`'s sessions by its id (from [`list_for_user`](Self::list_for_user)); a session of
    /// another user is left alone. Returns whether one ended.
    ///
    /// # Errors
    /// Backend failures, and key errors for an unusable id.
    pub async fn destroy_by_id(&self, user_id: &str, id: &SessionId) -> Result<bool> {
        self.check_user(user_id)?;
        let (index, slot) = self.index_key(user_id)?;
        // A session of this user is in the user's slot; an id of anyone else's names no key there that is
        // indexed under this user.
        let key = self.session_key(slot, id)?;
        Ok(store::destroy(&self.kw.inner.backend, &[key], Some(&index)).await? > 0)
    }

    /// End every session of `user_id` (password change, "log out everywhere"). Returns how many ended.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn destroy_all_for_user(&self, user_id: &str) -> Result<u64> {
        self.check_user(user_id)?;
        let (index, _) = self.index_key(user_id)?;
        store::destroy_all(&self.kw.inner.backend, &index).await
    }

    /// The live sessions of `user_id`, oldest first. Ended sessions are never listed.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn list_for_user(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        self.check_user(user_id)?;
        let (index, _) = self.index_key(user_id)?;
        let mut out: Vec<SessionInfo> = store::list(&self.kw.inner.backend, &index)
            .await?
            .into_iter()
            .filter_map(|l| {
                // Ids are base64url, never escaped; a key of another layout is not listed.
                let id = self
                    .inner
                    .keys
                    .tagged_id(&l.key)
                    .filter(|id| is_well_formed(id))?;
                Some(SessionInfo {
                    id: SessionId(id.to_owned()),
                    created_at: at(l.created_ms),
                    last_extended_at: at(l.extended_ms),
                    expires_at: at(l.expires_ms),
                })
            })
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_slot_survives_encoding_and_decoding() {
        for slot in 0..CLUSTER_SLOTS {
            let token = SessionToken::generate(slot);
            assert_eq!(token.as_str().len(), TOKEN_LEN);
            assert!(is_well_formed(token.as_str()));
            assert_eq!(token_slot(token.as_str()), Some(slot), "slot {slot}");
        }
        // The top two bits of the first byte stay random: over 64 tokens of one slot they take all four
        // values (failing by chance: under 1 in 10^7).
        let top_bits: std::collections::HashSet<u8> = (0..64)
            .map(|_| {
                let bytes = URL_SAFE_NO_PAD
                    .decode(SessionToken::generate(9000).as_str())
                    .unwrap();
                bytes[0] >> 6
            })
            .collect();
        assert_eq!(top_bits.len(), 4, "{top_bits:?}");
        // Slots beyond the range wrap, as `slot_tag` does.
        let wrapped = SessionToken::generate(CLUSTER_SLOTS + 5);
        assert_eq!(token_slot(wrapped.as_str()), Some(5));
    }

    #[test]
    fn slot_bits_leave_the_rest_untouched() {
        let random = [0xFFu8; TOKEN_BYTES];
        let set = with_slot(random, 0);
        assert_eq!(set[0], 0xC0, "only the low 6 bits of byte 0 are the slot's");
        assert_eq!(set[1], 0);
        assert_eq!(&set[2..], &random[2..]);
        let set = with_slot([0u8; TOKEN_BYTES], 16383);
        assert_eq!((set[0], set[1]), (0x3F, 0xFF));
        assert!(set[2..].iter().all(|&b| b == 0));
        // Two tokens for one slot differ (242 random bits).
        assert_ne!(SessionToken::generate(7), SessionToken::generate(7));
    }

    #[test]
    fn malformed_tokens_carry_no_slot() {
        let token = SessionToken::generate(1234);
        let text = token.as_str();
        assert_eq!(token_slot(text), Some(1234));
        // The last character holds 4 bits and 2 zero bits; one with those set is not a canonical token.
        let last = text.as_bytes()[42];
        let tweaked = if last == b'B' { "C" } else { "B" };
        let noncanonical = format!("{}{tweaked}", &text[..42]);
        let bad_chars = format!("{}+", &text[..42]);
        for bad in [
            "",
            "abc",
            &text[..42],
            &format!("{text}A"),
            noncanonical.as_str(),
            bad_chars.as_str(),
        ] {
            assert_eq!(token_slot(bad), None, "{bad:?}");
        }
    }
}
