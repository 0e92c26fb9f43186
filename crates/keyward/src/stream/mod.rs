//! Durable event streams (Redis Streams): publishing, and consuming through consumer groups with
//! [`Stream::worker`] (at least once: see [`Worker::run`] and `docs/streams.md`).
//!
//! **The guarantee.** [`Stream::publish`] appends a serde-typed event to the class's stream and applies the
//! class's retention in the **same** script, so the stream is bounded from its first entry on. Trimming never
//! drops an entry that a consumer group has not acknowledged yet (pending with a consumer, or not delivered
//! to it yet): the trim point is the lower of the retention floor and every group's oldest unacknowledged
//! id. Only the class's hard cap (`retention.hard_maxlen`) overrides that, so the policy's "nothing is
//! unbounded" rule holds even for a group that stopped reading; entries lost that way are counted
//! (`keyward_stream_dropped_unacked_total`) and logged. `docs/streams.md` gives the reasoning and the cost
//! per publish.
//!
//! **Concurrent publishes are batched.** Publishes to one stream that wait at the same moment (from any
//! handle of one [`Keyward`]) go to the server as one round trip (one pipeline of plain `XADD`s and one
//! retention script): while one is in flight, the next queue up, and all of them leave together when it
//! returns. A lone publish is sent at
//! once (nothing waits for company), each caller still gets its own ids in its call order and its own
//! error, and a failed call fails every publish it carried. See `batch.rs` for the mechanism.
//!
//! ```
//! # async fn demo() -> keyward::Result<()> {
//! use keyward::{Keyward, policy::{Policy, Retention, StreamClass}};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct OrderPlaced { order: u64, email: String }
//!
//! let policy = Policy::builder("dev", "shop")
//!     .stream("order_events", StreamClass::new(Retention::maxlen(100_000)))
//!     .build()?;
//! let kw = Keyward::embedded(policy);
//! let events = kw.stream::<OrderPlaced>("order_events")?;
//!
//! let first = events.publish(&OrderPlaced { order: 1, email: "a@example.com".into() }).await?;
//! let more = events
//!     .publish_many(&[
//!         OrderPlaced { order: 2, email: "b@example.com".into() },
//!         OrderPlaced { order: 3, email: "c@example.com".into() },
//!     ])
//!     .await?;
//! assert!(first < more[0] && more[0] < more[1]);
//! assert_eq!(events.len().await?, 3);
//! # Ok(()) }
//! ```
//!
//! # Storage
//! One stream per class: `{env}:{app}:{class}:v{n}:{<class>}`, each entry one field `m` holding the encoded
//! event; its dead letters at `…:{<class>}:dead`. Both share the hash tag `{<class>}`, so one Cluster slot
//! holds them and one script can move an entry between them. Streams have no TTL: their retention bounds
//! them (every helper key gets a TTL).
//!
//! # Metrics
//! Labelled by `class`: `keyward_stream_published_total` (entries appended), `keyward_stream_dropped_unacked_total`
//! (entries the hard cap removed before every group acknowledged them). Workers add theirs, labelled by
//! `class` and `group` (see [`Worker`]).

pub(crate) mod store;
mod worker;

pub use worker::{DeadLetter, GroupInfo, Message, Worker, WorkerReport};

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batch::{Batcher, Unanswered};
use crate::client::Keyward;
use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::policy::{ClassKind, StreamClass};
use store::StreamKeys;

/// The id of a stream entry: the server's clock in ms when it was added, and a sequence number within that
/// millisecond. Ids of one stream strictly increase in the order entries were added. Displays and parses as
/// Redis writes it, `1718000000000-0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    /// The id `ms-seq`.
    pub fn new(ms: u64, seq: u64) -> Self {
        EntryId { ms, seq }
    }

    /// Unix time in ms when the entry was added (the server's clock).
    pub fn millis(&self) -> u64 {
        self.ms
    }

    /// The sequence number within [`millis`](Self::millis).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = Error;

    /// `ms-seq`, or `ms` alone (sequence 0).
    fn from_str(s: &str) -> Result<Self> {
        crate::backend::memory::stream::StreamId::parse(s)
            .map(|id| EntryId::new(id.ms, id.seq))
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("invalid stream entry id {s:?}: expected `<ms>-<seq>`"),
            })
    }
}

/// A typed handle on one stream class; cheap to clone. Get one with [`Keyward::stream`].
pub struct Stream<E, C = Json> {
    kw: Keyward,
    inner: Arc<Shared>,
    _types: PhantomData<fn(E) -> C>,
}

impl<E, C> Clone for Stream<E, C> {
    fn clone(&self) -> Self {
        Stream {
            kw: self.kw.clone(),
            inner: Arc::clone(&self.inner),
            _types: PhantomData,
        }
    }
}

impl<E, C> fmt::Debug for Stream<E, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("class", &self.inner.class)
            .field("key", &self.inner.keys.stream)
            .finish_non_exhaustive()
    }
}

struct Shared {
    class: String,
    settings: StreamClass,
    keys: StreamKeys,
    published: metrics::Counter,
    dropped: metrics::Counter,
    /// The stream's publish batcher, shared by every handle of this stream made from one [`Keyward`].
    batcher: Arc<PublishBatcher>,
}

/// The most messages one publish round trip carries when concurrent publishes are batched (a single
/// `publish_many` larger than this still goes whole, in one call). Bounds the per-message cost (measured with the former all-in-one script, 3.5–4 µs per 1 KiB message), which grows past a few hundred
/// messages per call (BENCHMARKS.md: 256 vs 1,024 measured 3.4 vs 3.8–4.3 µs per message, p99 lower).
const MAX_BATCH_MESSAGES: usize = 256;

/// How many publish round trips of one stream may be in flight at once: one. Each call carries the
/// publishes queued when the previous one returned, so the server runs them in the order they were called.
/// Two in flight (the client preparing one batch while the server runs the other) measured no faster on
/// 2 cores (105,000 vs 108,000–116,000 events/s, `stream_produce` C = 64, BENCHMARKS.md): the batches only
/// got smaller (29 vs 48 events per call), and a `NOSCRIPT` retry could reorder concurrent calls.
const PUBLISH_CALLS_IN_FLIGHT: usize = 1;

/// Batches the publishes of one stream: each item is one call's encoded messages, each output its ids.
type PublishBatcher = Batcher<Vec<Vec<u8>>, Result<Vec<EntryId>>>;

/// The publish batchers of one [`Keyward`], by stream key (one per stream class: the policy bounds them).
#[derive(Default)]
struct Batchers(Mutex<HashMap<String, Arc<PublishBatcher>>>);

impl Batchers {
    fn of(&self, stream: &str) -> Arc<PublishBatcher> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry(stream.to_owned()).or_insert_with(|| {
                Arc::new(Batcher::new(MAX_BATCH_MESSAGES, PUBLISH_CALLS_IN_FLIGHT))
            }),
        )
    }
}

impl Keyward {
    /// The stream of `class` (a `stream` class of the policy), carrying events of type `E` encoded as JSON.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], [`Error::WrongKind`].
    pub fn stream<E>(&self, class: &str) -> Result<Stream<E>>
    where
        E: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.stream_with_codec::<E, Json>(class)
    }

    /// A stream whose events are encoded with another codec, e.g. `MsgPack` (feature `msgpack`).
    ///
    /// # Errors
    /// As [`stream`](Self::stream).
    pub fn stream_with_codec<E, C>(&self, class: &str) -> Result<Stream<E, C>>
    where
        E: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let (declared, space) = self.declared(class)?;
        let settings = match declared.kind() {
            ClassKind::Stream(s) => s.clone(),
            other => {
                return Err(Error::WrongKind {
                    class: class.to_owned(),
                    expected: "stream",
                    found: other.name(),
                });
            }
        };
        let keys = StreamKeys::new(space.key(class)?);
        let batcher = self.shared::<Batchers>().of(&keys.stream);
        let label = class.to_owned();
        Ok(Stream {
            kw: self.clone(),
            inner: Arc::new(Shared {
                published: metrics::counter!("keyward_stream_published_total", "class" => label.clone()),
                dropped: metrics::counter!("keyward_stream_dropped_unacked_total", "class" => label),
                class: class.to_owned(),
                settings,
                keys,
                batcher,
            }),
            _types: PhantomData,
        })
    }
}

impl<E, C> Stream<E, C>
where
    E: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// The class name.
    pub fn class(&self) -> &str {
        &self.inner.class
    }

    /// Append one event (a plain `XADD`, then the retention script, in one round trip) and return its id.
    ///
    /// Publishes to this stream that wait at the same moment share one round trip (see the module docs):
    /// ids still increase in the order the calls were made.
    ///
    /// # Errors
    /// [`Error::Encode`]; [`Error::ValueTooLarge`] naming the class and `max_message_bytes` when the encoded
    /// event is larger; backend failures ([`Error::Timeout`], [`Error::CircuitOpen`], [`Error::Redis`],
    /// [`Error::StoreFull`] on the embedded backend). After [`Error::Timeout`] or [`Error::Redis`] the event may
    /// still have been appended (the server ran the `XADD`, then the answer was lost): delivery is at least
    /// once, so publish events a consumer can recognise as duplicates (see `docs/streams.md`).
    pub async fn publish(&self, event: &E) -> Result<EntryId> {
        let ids = self.append(vec![self.encode(event)?]).await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::InvalidArgument {
                what: format!(
                    "class `{}`: the store returned no entry id",
                    self.inner.class
                ),
            })
    }

    /// Append `events` in order, in one round trip, and return their ids. An empty slice does nothing.
    /// Concurrent calls may share that round trip; `events` stay in order in it (on Redis, another client's
    /// entries may fall between them). Not atomic on Redis: when the call fails after it was sent (a timeout,
    /// a lost connection), any prefix of `events`, possibly all, may have been appended; the embedded
    /// backend appends all or none.
    ///
    /// # Errors
    /// As [`publish`](Self::publish); a single oversized event refuses the whole batch before anything is
    /// sent.
    pub async fn publish_many(&self, events: &[E]) -> Result<Vec<EntryId>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let payloads = events
            .iter()
            .map(|e| self.encode(e))
            .collect::<Result<Vec<_>>>()?;
        self.append(payloads).await
    }

    /// The number of entries in the stream now (`XLEN`).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn len(&self) -> Result<u64> {
        store::len(&self.kw, &self.inner.keys).await
    }

    /// Whether the stream holds no entries.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Up to `count` entries (at most 10,000) with ids above `after` (`None`: from the oldest), oldest
    /// first, decoded. For inspection and tests; consumers read through consumer groups.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `count` above 10,000; [`Error::Decode`] for an entry that does not
    /// decode as `E`; backend failures.
    pub async fn range(&self, after: Option<EntryId>, count: usize) -> Result<Vec<(EntryId, E)>> {
        if count > 10_000 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: range count {count} is above 10000",
                    self.inner.class
                ),
            });
        }
        let raw = store::range(&self.kw, &self.inner.keys, after, count).await?;
        raw.into_iter()
            .map(|(id, payload)| {
                C::decode(&payload)
                    .map(|e| (id, e))
                    .map_err(|e| Error::Decode {
                        class: self.inner.class.clone(),
                        source: Arc::new(e),
                    })
            })
            .collect()
    }

    fn encode(&self, event: &E) -> Result<Vec<u8>> {
        let payload = C::encode(event).map_err(|e| Error::Encode {
            class: self.inner.class.clone(),
            source: Arc::new(e),
        })?;
        let max = self.inner.settings.max_message_bytes_value();
        if payload.len() > max {
            return Err(Error::ValueTooLarge {
                class: self.inner.class.clone(),
                field: "max_message_bytes",
                size: payload.len(),
                max,
            });
        }
        Ok(payload)
    }

    /// Queue `payloads` (one call's, already size-checked) on the stream's batcher and wait for their ids.
    async fn append(&self, payloads: Vec<Vec<u8>>) -> Result<Vec<EntryId>> {
        let count = payloads.len();
        let (kw, shared) = (self.kw.clone(), Arc::clone(&self.inner));
        let backend = &self.kw.inner.backend;
        // The whole wait is bounded by the response timeout, not only the call (a publish given up on may
        // still be appended, as after any timeout).
        let answer = self.inner.batcher.submit_within(
            payloads,
            count,
            move |calls| flush(kw.clone(), Arc::clone(&shared), calls),
            backend.response_timeout(),
        );
        match answer.await {
            Ok(answer) => answer,
            Err(Unanswered::TimedOut) => {
                Err(backend.timeout_error("publish", &self.inner.keys.stream))
            }
            Err(Unanswered::Abandoned) => Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: the publish was abandoned before an answer (the runtime is shutting \
                     down, or the publish task panicked); it may or may not have been appended",
                    self.inner.class
                ),
            }),
        }
    }
}

/// One publish round trip for the publishes `calls` (each one call's messages, in queue order): their ids split
/// back per call, or the call's error for each.
async fn flush(
    kw: Keyward,
    shared: Arc<Shared>,
    calls: Vec<Vec<Vec<u8>>>,
) -> Vec<Result<Vec<EntryId>>> {
    let counts: Vec<usize> = calls.iter().map(Vec::len).collect();
    let payloads: Vec<Vec<u8>> = calls.into_iter().flatten().collect();
    let retention = shared.settings.retention_value();
    let out = match store::publish(&kw, &shared.keys, &retention, &payloads).await {
        Ok(out) => out,
        Err(e) => return counts.iter().map(|_| Err(e.clone())).collect(),
    };
    // Idle workers of this process look at once (on Redis the script also woke those elsewhere, if any
    // waited; a second wake-up only makes a worker read again).
    kw.inner.bus.wake(&shared.keys.stream);
    shared.published.increment(out.ids.len() as u64);
    if out.dropped > 0 {
        shared.dropped.increment(out.dropped);
        tracing::warn!(
            class = %shared.class,
            dropped = out.dropped,
            hard_maxlen = retention.hard_maxlen_value(),
            "keyward: a consumer group lags past the stream's hard cap; entries it had not acknowledged were trimmed"
        );
    }
    // `store::publish` checked that there is one id per message.
    let mut ids = out.ids.into_iter();
    counts
        .iter()
        .map(|&n| Ok(ids.by_ref().take(n).collect()))
        .collect()
}
