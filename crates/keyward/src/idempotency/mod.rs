//! Idempotency keys: a request retried under the same key runs once, and its response is replayed.
//!
//! **The guarantee.** For one key, exactly one [`Idempotency::begin`] at a time gets [`Begin::New`] and runs
//! the request; while it runs, others get [`Begin::InProgress`]; once it [`complete`](Idempotency::complete)s,
//! every later `begin` with the same request fingerprint gets [`Begin::Completed`] with the stored response
//! (status, the headers you chose, body — byte for byte) until the class `ttl` ends, and a `begin` with a
//! different fingerprint gets [`Begin::Mismatch`]. The decision is one script on the server, so racing
//! requests across processes cannot both run. The in-progress marker is a lease (`lease` in the class): if
//! the handler dies, it expires and a retry runs; a handler that outlives its lease loses it, and its
//! `complete` reports [`Completion::LeaseLost`] rather than overwriting the retry's outcome.
//!
//! ```
//! # async fn demo() -> keyward::Result<()> {
//! use keyward::{Keyward, policy::{IdempotencyClass, Policy}};
//! use keyward::idempotency::{fingerprint, Begin, StoredResponse};
//!
//! let policy = Policy::builder("dev", "payments").idempotency("charge", IdempotencyClass::new()).build()?;
//! let kw = Keyward::embedded(policy);
//! let idem = kw.idempotency("charge")?;
//! let fp = fingerprint(&[b"POST", b"/charges", br#"{"amount":100}"#]);
//!
//! let Begin::New(lease) = idem.begin(&("client-1", "key-123"), &fp).await? else { unreachable!() };
//! let response = StoredResponse::new(201, br#"{"id":"ch_1"}"#.to_vec()).header("content-type", "application/json");
//! idem.complete(&lease, &response).await?;
//!
//! match idem.begin(&("client-1", "key-123"), &fp).await? {
//!     Begin::Completed(stored) => assert_eq!(stored, response),
//!     other => panic!("expected a replay, got {other:?}"),
//! }
//! # Ok(()) }
//! ```

pub(crate) mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

use crate::client::Keyward;
use crate::error::{Error, Result};
use crate::key::{IdParts, KeySpace};
use crate::policy::{ClassKind, IdempotencyClass};
use store::Began;

/// A request fingerprint: SHA-256 over the parts, each length-prefixed (so `["ab", "c"]` and `["a", "bc"]`
/// differ). Typical parts: method, path and query, body — whatever makes two requests "the same request".
pub fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// A response as stored and replayed: status, selected headers, body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Headers to replay, in order (names as given; values as bytes).
    pub headers: Vec<(String, Bytes)>,
    /// The body, byte for byte.
    pub body: Bytes,
}

const MAGIC: &[u8; 3] = b"KR1";

impl StoredResponse {
    /// A response with no headers.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        StoredResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Add a header to replay.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The size of the stored form, which `max_response_bytes` limits: the body, the header names and
    /// values, and 7 bytes plus 6 per header of framing.
    pub fn encoded_len(&self) -> usize {
        7 + self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| 6 + n.len() + v.len())
                .sum::<usize>()
    }

    /// The stored form: `KR1`, status (u16), header count (u16), each header as name length (u16), name,
    /// value length (u32), value; then the body.
    pub(crate) fn encode(&self) -> std::result::Result<Vec<u8>, String> {
        let count = u16::try_from(self.headers.len()).map_err(|_| "more than 65535 headers")?;
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for (name, value) in &self.headers {
            let n = u16::try_from(name.len()).map_err(|_| "a header name is over 65535 bytes")?;
            let v = u32::try_from(value.len()).map_err(|_| "a header value is over 4 GiB")?;
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&v.to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    pub(crate) fn decode(mut raw: Bytes) -> std::result::Result<Self, String> {
        fn take(raw: &mut Bytes, n: usize) -> std::result::Result<Bytes, String> {
            if raw.remaining() < n {
                return Err("truncated stored response".into());
            }
            Ok(raw.split_to(n))
        }
        if take(&mut raw, 3)? != MAGIC[..] {
            return Err("not a stored response (bad magic)".into());
        }
        let status = take(&mut raw, 2)?.get_u16();
        let count = take(&mut raw, 2)?.get_u16();
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = usize::from(take(&mut raw, 2)?.get_u16());
            let name = String::from_utf8(take(&mut raw, n)?.to_vec())
                .map_err(|_| "a header name is not UTF-8")?;
            let v = take(&mut raw, 4)?.get_u32() as usize;
            headers.push((name, take(&mut raw, v)?));
        }
        Ok(StoredResponse {
            status,
            headers,
            body: raw,
        })
    }
}

/// The right to run a request: returned by [`Begin::New`], given back by [`Idempotency::complete`] or
/// [`Idempotency::abandon`]. `Debug` does not print its secret token.
#[must_use = "complete or abandon the lease; otherwise retries wait until it expires"]
pub struct Lease {
    key: String,
    token: String,
    expires_in: Duration,
    /// When the `begin` that granted it was sent: the lease is surely gone `expires_in` after this.
    sent: tokio::time::Instant,
}

impl Lease {
    /// The lease's lifetime when granted; after it a retry may run.
    pub fn expires_in(&self) -> Duration {
        self.expires_in
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// What [`Idempotency::begin`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Begin {
    /// First time (or the previous attempt's lease expired): run the request, then complete the lease.
    New(Lease),
    /// Another request with this key is running. HTTP: `409 Conflict`.
    InProgress {
        /// When its lease ends at the latest.
        retry_after: Duration,
    },
    /// Done before: replay this. HTTP: the stored response.
    Completed(StoredResponse),
    /// The key was used with a different request. HTTP: `422 Unprocessable Content`.
    Mismatch,
}

/// Renews a lease in the background while it lives: see [`Idempotency::keep_alive`]. Dropping it stops the
/// renewals.
#[must_use = "the renewals stop when this is dropped"]
#[derive(Debug)]
pub struct KeepAlive {
    task: tokio::task::AbortHandle,
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// The lease is surely gone after this: the last successful renewal's send time plus the lease. While
    /// renewals cannot reach Redis (a hang, an outage), this passes and `is_lost` says so, before any renewal
    /// can report it — a retry elsewhere may already run.
    valid_until: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl KeepAlive {
    /// Whether the lease may be gone: a renewal found it gone (it had expired; a retry may have taken over),
    /// or no renewal has succeeded within the lease's length (on the local clock, conservatively), so it
    /// may have expired while Redis could not be reached. Check it before a side effect.
    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
            || tokio::time::Instant::now()
                >= *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`Idempotency::complete`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Completion {
    /// The response is stored and will be replayed.
    Stored,
    /// The lease had expired (and a retry may have taken over): nothing was stored.
    LeaseLost,
}

/// Idempotency keys of one `idempotency` class. Cheap to clone.
///
/// One run per key: the first [`begin`](Self::begin) gets a lease and runs the request; duplicates are told
/// it is in progress, then get the stored response replayed; the same key with a different request is a
/// mismatch.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> keyward::Result<()> {
/// use keyward::Keyward;
/// use keyward::idempotency::{Begin, StoredResponse, fingerprint};
/// use keyward::policy::{IdempotencyClass, Policy};
///
/// let policy = Policy::builder("dev", "shop").idempotency("order", IdempotencyClass::new()).build()?;
/// let kw = Keyward::embedded(policy);
/// let orders = kw.idempotency("order")?;
/// let key = ("user-7", "key-123"); // scope keys by the caller: another user's key is another key
/// let request = fingerprint(&[b"POST", b"/orders", br#"{"sku":"A-1"}"#]);
///
/// let Begin::New(lease) = orders.begin(&key, &request).await? else { unreachable!() };
/// assert!(matches!(orders.begin(&key, &request).await?, Begin::InProgress { .. })); // 409
/// let _ = orders.complete(&lease, &StoredResponse::new(201, "order 1")).await?;
///
/// match orders.begin(&key, &request).await? {
///     Begin::Completed(stored) => assert_eq!((stored.status, &stored.body[..]), (201, &b"order 1"[..])),
///     other => panic!("{other:?}"),
/// }
/// let other = fingerprint(&[b"POST", b"/orders", br#"{"sku":"B-2"}"#]);
/// assert!(matches!(orders.begin(&key, &other).await?, Begin::Mismatch)); // 422
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Idempotency {
    kw: Keyward,
    inner: Arc<Shared>,
}

struct Shared {
    class: String,
    settings: IdempotencyClass,
    keys: KeySpace,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("class", &self.inner.class)
            .finish()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Keyward {
    /// Idempotency keys for an `idempotency` class of the policy.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`].
    pub fn idempotency(&self, class: &str) -> Result<Idempotency> {
        let (declared, keys) = self.declared(class)?;
        let settings = match declared.kind() {
            ClassKind::Idempotency(i) => i.clone(),
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "idempotency",
                    found: other.name(),
                });
            }
        };
        Ok(Idempotency {
            kw: self.clone(),
            inner: Arc::new(Shared {
                class: class.to_owned(),
                settings,
                keys,
            }),
        })
    }
}

impl Idempotency {
    /// The class name.
    pub fn class(&self) -> &str {
        &self.inner.class
    }

    /// The class settings.
    pub fn settings(&self) -> &IdempotencyClass {
        &self.inner.settings
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("keyward_idempotency_total", "class" => self.inner.class.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// Start a request under `key` (scope it to the client, e.g. `("tenant-7", header_value)`: keys are
    /// unique per client, not globally) with the request's `fingerprint` (see [`fingerprint`]).
    ///
    /// # Errors
    /// Key errors for an unusable key, [`Error::Decode`] for a stored response that cannot be read, and
    /// backend failures.
    pub async fn begin(&self, key: &(impl IdParts + ?Sized), fingerprint: &[u8]) -> Result<Begin> {
        let key = self.inner.keys.key(key)?;
        let mut token = [0u8; 16];
        OsRng
            .try_fill_bytes(&mut token)
            .expect("the operating system's random number generator failed");
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let lease = self.inner.settings.lease_value();
        let sent = tokio::time::Instant::now();
        let began =
            store::begin(&self.kw.inner.backend, &key, fingerprint, &token, ms(lease)).await?;
        Ok(match began {
            Began::New => {
                self.count("new");
                Begin::New(Lease {
                    key,
                    token,
                    expires_in: lease,
                    sent,
                })
            }
            Began::InProgress(pttl) => {
                self.count("in_progress");
                Begin::InProgress {
                    retry_after: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
                }
            }
            Began::Completed(raw) => {
                self.count("replayed");
                Begin::Completed(StoredResponse::decode(raw).map_err(|e| Error::Decode {
                    class: self.inner.class.clone(),
                    source: Arc::new(e.into()),
                })?)
            }
            Began::Mismatch => {
                self.count("mismatch");
                Begin::Mismatch
            }
        })
    }

    /// Store `response` for replay (for the class `ttl`), if `lease` is still held. The lease is borrowed, so
    /// after an error the caller still has it to [`abandon`](Self::abandon) (or to retry the store call); once
    /// a response is stored, the lease no longer holds anything and a second `complete` is `LeaseLost`.
    ///
    /// # Errors
    /// [`Error::ValueTooLarge`] over `max_response_bytes` (checked before any store call; see
    /// [`StoredResponse::encoded_len`]), [`Error::InvalidArgument`] for a response that cannot be encoded, and
    /// backend failures.
    pub async fn complete(&self, lease: &Lease, response: &StoredResponse) -> Result<Completion> {
        let max = self.inner.settings.max_response_bytes_value();
        if response.encoded_len() > max {
            return Err(Error::ValueTooLarge {
                class: self.inner.class.clone(),
                field: "max_response_bytes",
                size: response.encoded_len(),
                max,
            });
        }
        let raw = response.encode().map_err(|what| Error::InvalidArgument {
            what: format!("class `{}`: {what}", self.inner.class),
        })?;
        let ttl = ms(self.inner.settings.ttl_value());
        let stored =
            store::complete(&self.kw.inner.backend, &lease.key, &lease.token, &raw, ttl).await?;
        if stored {
            Ok(Completion::Stored)
        } else {
            self.count("lease_lost");
            Ok(Completion::LeaseLost)
        }
    }

    /// Push the lease's expiry back by the class's `lease` (a heartbeat for a request that runs long), if it is
    /// still held. `false` means it was lost: it expired, and a retry may have taken over. With a heartbeat
    /// every `lease / 3`, `lease` only decides how soon a retry runs after the process running the request
    /// died, not how long a request may take.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn extend(&self, lease: &Lease) -> Result<bool> {
        let ms = ms(self.inner.settings.lease_value());
        store::extend(&self.kw.inner.backend, &lease.key, &lease.token, ms).await
    }

    /// Renew `lease` every third of the class's `lease` in a background task until the returned guard is
    /// dropped (keep it alive until after [`complete`](Self::complete) or [`abandon`](Self::abandon)).
    /// Renewal failures are logged and retried; a renewal that finds the lease gone marks the guard
    /// [`is_lost`](KeepAlive::is_lost) and stops. Needs a tokio runtime.
    pub fn keep_alive(&self, lease: &Lease) -> KeepAlive {
        let every = (self.inner.settings.lease_value() / 3).max(Duration::from_millis(5));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let valid_until = Arc::new(std::sync::Mutex::new(lease.sent + lease.expires_in));
        let (idem, key, token, flag, until) = (
            self.clone(),
            lease.key.clone(),
            lease.token.clone(),
            Arc::clone(&lost),
            Arc::clone(&valid_until),
        );
        let task = tokio::spawn(async move {
            let ms = ms(idem.inner.settings.lease_value());
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                let sent = tokio::time::Instant::now();
                match store::extend(&idem.kw.inner.backend, &key, &token, ms).await {
                    Ok(true) => {
                        let lease = idem.inner.settings.lease_value();
                        let mut until = until.lock().unwrap_or_else(|p| p.into_inner());
                        *until = (*until).max(sent + lease);
                    }
                    Ok(false) => {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        idem.count("lease_lost");
                        tracing::warn!(class = %idem.inner.class, "an idempotency lease was lost while its request ran; a retry may run concurrently");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(class = %idem.inner.class, %error, "cannot renew an idempotency lease; retrying");
                    }
                }
            }
        });
        KeepAlive {
            task: task.abort_handle(),
            lost,
            valid_until,
        }
    }

    /// Give the lease back without storing anything (the request failed in a way a retry may fix), so a
    /// retry can run now rather than when the lease expires. Returns whether it was still held.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn abandon(&self, lease: Lease) -> Result<bool> {
        let lease_ms = ms(self.inner.settings.lease_value());
        store::abandon(&self.kw.inner.backend, &lease.key, &lease.token, lease_ms).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_response_round_trips_and_rejects_garbage() {
        let r = StoredResponse::new(201, Bytes::from_static(b"\x00body\xff"))
            .header("content-type", "application/json")
            .header("x-empty", Bytes::new());
        let raw = Bytes::from(r.encode().unwrap());
        assert_eq!(raw.len(), r.encoded_len());
        assert_eq!(StoredResponse::decode(raw.clone()).unwrap(), r);
        for cut in 0..(raw.len() - r.body.len()) {
            assert!(
                StoredResponse::decode(raw.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"XYZ\x00\xc8\x00\x00")).is_err());
    }

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(fingerprint(&[b"a"]), fingerprint(&[b"a"]));
    }
}
