//! Write-behind: write the cache now, the database later. [`WriteBehind::write`] appends the write to a stream
//! (durable, at least once) and then sets the cache, so readers see the new value at once; a drain
//! ([`WriteBehind::drain`]) persists the writes through the application's sink in batches, coalescing writes
//! to the same id, retrying with the stream class's backoff and dead-lettering after its `max_deliveries`.
//!
//! **The decision a reader must know: the write is queued before the cache is set, in two steps, not one
//! script.** A cache entry and a stream live in different Cluster slots, so one script cannot hold both on
//! every topology keyward supports; the order is chosen so that a failure between the two steps never
//! shows a value that will not be persisted: if the append fails, nothing happened (the call returns the
//! error); if the cache set fails after the append, the call returns that error but the write *will* be
//! persisted (retrying it appends it again, which the drain coalesces or the sink's version check ignores).
//!
//! **What can be lost** (the seeds ask for it in writing) is what Redis loses: a write is safe once
//! `write` returned `Ok` only as far as the stream survives. With `appendonly yes` + `appendfsync always`,
//! nothing acknowledged is lost; with `appendfsync everysec` (Redis's default for AOF), up to about one
//! second of writes; with RDB snapshots only, every write since the last snapshot; with no persistence, every
//! write not yet drained when Redis restarts (the drain's worker then reports `group_recreated`). A drain that
//! dies loses nothing: its entries stay pending and another drain takes them over after `claim_idle`. The
//! stream's retention never trims a queued write no drain has read, not even before the first drain created
//! its group ([`Keyward::write_behind`] marks the stream so); its hard cap (`retention.hard_maxlen`) is the
//! bound that remains: past `hard_maxlen` unpersisted writes the oldest are dropped and counted
//! (`keyward_stream_dropped_unacked_total`).
//!
//! **Ordering.** Each [`Write`] carries its `version` (the stream entry id `write` queued it under: strictly
//! increasing per stream; a write replayed from the dead letters keeps its first one). Within a batch only
//! the newest write per id reaches the sink. Across batches, a write that failed and is retried later can
//! reach the sink *after* a newer write to the same id: make the sink keep the highest version
//! (`UPDATE … SET value = $v, version = $ver WHERE id = $id AND version < $ver`), or accept
//! last-delivery-wins. The cache set is version-conditional: the entry remembers the newest write-behind
//! version it took (a marker key `<entry>:wv` in its slot, with its TTL) and refuses an older one, so writes
//! to one id from any number of tasks and processes leave the cache at the newest write, the one a
//! version-checking sink keeps (docs/streams.md, Write-behind, lists the remaining holes).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::Cache;
use crate::Keyward;
use crate::codec::{Codec, Json};
use crate::error::Result;
use crate::key::IdParts;
use crate::stream::{EntryId, Message, Stream, WorkerReport};

/// One queued write, as the write-behind stream holds it (an event of [`WriteBehind::stream`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record<I, V> {
    /// The id written.
    pub id: I,
    /// The value written.
    pub value: V,
}

/// A write handed to the sink: the id, the value, and its version (the stream entry id the write was queued
/// under, increasing with every write to the stream; a replayed dead letter keeps its first one).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Write<I, V> {
    /// The id the value was written under.
    pub id: I,
    /// The value written.
    pub value: V,
    /// The write's version: later writes have higher versions. The id of the stream entry the write was
    /// queued under by [`WriteBehind::write`]; a write replayed from the dead letters
    /// ([`Stream::replay_dead_letters`]) keeps that first id (its [`Message::first_id`]), so it never
    /// passes for newer than a write made after it. Persist a write only if its version is above the one
    /// stored for its id.
    pub version: EntryId,
}

/// Write-behind: a cache class paired with a stream class. [`write`](Self::write) queues the write on the
/// stream (durable, at least once) and then sets the cache; a [`drain`](Self::drain) persists the writes
/// through the application's sink in batches, newest write per id, with the stream's retries and dead
/// letters. The two steps of `write` are ordered, not one script (a cache entry and the stream live in
/// different Cluster slots): a failure between them never shows readers a value that will not be
/// persisted. What a Redis crash can lose under each persistence setting, and why a sink should keep the
/// highest [`Write::version`], is in `docs/streams.md` (Write-behind). Cheap to clone.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keyward::policy::{CacheClass, Policy, Retention, StreamClass};
/// use keyward::{Keyward, Write};
///
/// let policy = Policy::builder("dev", "shop")
///     .cache("stock", CacheClass::new(Duration::from_secs(600), "the stock drain, after each batch"))
///     .stream("stock_writes", StreamClass::new(Retention::maxlen(100_000)))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let stock = kw.write_behind::<u32, i64>("stock", "stock_writes")?;
/// stock.write(7, 41).await?;
/// stock.write(7, 40).await?; // both queued; the cache has 40 at once
/// assert_eq!(stock.cache().get(&7u32).await?, Some(40));
///
/// // The drain (usually its own task or process): persist in batches, newest write per id.
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let drain = stock.drain("db", move |batch: Vec<Write<u32, i64>>| {
///     let tx = tx.clone();
///     async move {
///         for w in batch { tx.send((w.id, w.value)).unwrap(); } // e.g. one UPDATE … WHERE version < $ver
///         Ok::<(), std::io::Error>(())
///     }
/// });
/// let stop = tokio::sync::Notify::new();
/// let (report, last) = tokio::join!(drain.run(stop.notified()), async {
///     let mut last = None;
///     while let Some(w) = rx.recv().await { if w.1 == 40 { last = Some(w); break; } }
///     stop.notify_one();
///     last
/// });
/// assert_eq!(last, Some((7, 40)));
/// assert!(report?.handled >= 1);
/// # Ok(()) }
/// ```
pub struct WriteBehind<I, V, C = Json> {
    cache: Cache<V, C>,
    stream: Stream<Record<I, V>, C>,
}

impl<I, V, C> Clone for WriteBehind<I, V, C> {
    fn clone(&self) -> Self {
        WriteBehind {
            cache: self.cache.clone(),
            stream: self.stream.clone(),
        }
    }
}

impl<I, V, C> fmt::Debug for WriteBehind<I, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehind")
            .field("cache", &self.cache)
            .field("stream", &self.stream)
            .finish()
    }
}

impl Keyward {
    /// Write-behind for `cache_class` (a `cache` class) through `stream_class` (a `stream` class: its
    /// retention, `max_deliveries`, backoff, `claim_idle` and dead letters govern the queued writes).
    /// From this call on, this `Keyward`'s publishes to the stream keep entries no consumer group has read
    /// while the stream has no group (only the hard cap trims them), so writes made before the first drain
    /// ran are not lost to retention.
    ///
    /// # Errors
    /// [`Error::UnknownClass`](crate::Error::UnknownClass), or
    /// [`Error::WrongKind`](crate::Error::WrongKind) when either class is of another kind.
    pub fn write_behind<I, V>(
        &self,
        cache_class: &str,
        stream_class: &str,
    ) -> Result<WriteBehind<I, V>>
    where
        I: IdParts + Serialize + DeserializeOwned + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let cache = self.cache::<V>(cache_class)?;
        let stream = self.stream::<Record<I, V>>(stream_class)?;
        // Queued writes are kept until a drain's group has read them, even before that group exists.
        crate::stream::store::keep_unread(&stream);
        Ok(WriteBehind { cache, stream })
    }
}

impl<I, V, C> WriteBehind<I, V, C>
where
    I: IdParts + Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// The cache the writes go to (read through it as usual).
    pub fn cache(&self) -> &Cache<V, C> {
        &self.cache
    }

    /// The stream that queues the writes (its dead letters, `group_info`, `replay_dead_letters`).
    pub fn stream(&self) -> &Stream<Record<I, V>, C> {
        &self.stream
    }

    /// Queue the write of `value` under `id` (one stream append, with the stream's retention) and then set the
    /// cache (which also voids any fill in progress for the entry) — unless the entry already took a newer
    /// write-behind write, from this process or another: the cache ends at the newest write whatever order
    /// the sets arrive in. Returns the write's version.
    ///
    /// # Errors
    /// [`Error::Key`](crate::Error::Key) for an unusable id (nothing is queued);
    /// [`Error::ValueTooLarge`](crate::Error::ValueTooLarge) for a write over the stream's
    /// `max_message_bytes` or the cache's `max_value_bytes` (checked before anything is queued); the append's
    /// backend failure (nothing queued). A backend failure of the cache set comes *after* the append: the
    /// write is queued and will be persisted, but readers may not see it until the drain ran.
    pub async fn write(&self, id: I, value: V) -> Result<EntryId> {
        // Refuse what the cache would refuse before anything is queued.
        let key = self.cache.key(&id)?;
        let payload = self.cache.encode(&value)?;
        let record = Record { id, value };
        let version = self.stream.publish(&record).await?;
        self.cache
            .set_written_behind(key, &payload, version)
            .await?;
        Ok(version)
    }

    /// A drain for consumer group `group`: persists the queued writes through `sink`, a batch at a time (up
    /// to [`batch`](Drain::batch) writes; only the newest per id, in version order). The sink's `Ok`
    /// acknowledges every write of the batch (the superseded ones too); an `Err` retries all of them with
    /// the stream class's backoff, and dead-letters them after its `max_deliveries`.
    pub fn drain<S, Fut, Er>(&self, group: &str, sink: S) -> Drain<I, V, C, S>
    where
        S: Fn(Vec<Write<I, V>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
        Er: fmt::Display + Send + 'static,
    {
        Drain {
            wb: self.clone(),
            group: group.to_owned(),
            sink: Arc::new(sink),
            batch: 100,
            linger: Duration::from_millis(5),
            grace: Duration::from_secs(30),
        }
    }
}

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// Set `key` to the encoded `payload` of the write-behind write `version`, unless the entry took a newer
    /// write-behind write already (from any process): the sets of writes to one id land in version order
    /// whatever order they arrive in, so the cache ends at the newest write, as a version-checking sink does.
    /// Announced to the in-process tiers as any set.
    async fn set_written_behind(
        &self,
        key: String,
        payload: &[u8],
        version: EntryId,
    ) -> Result<()> {
        let write = super::Write::SetIfNewer {
            body: crate::envelope::body(Some(payload)),
            ttl: self.class.policy.stored_ttl(),
            version: (version.millis(), version.seq()),
        };
        self.write_and_announce(key, write).await
    }
}

/// A write-behind drain; built by [`WriteBehind::drain`], started with [`run`](Self::run).
#[must_use = "a drain does nothing until `run` is awaited"]
pub struct Drain<I, V, C, S> {
    wb: WriteBehind<I, V, C>,
    group: String,
    sink: Arc<S>,
    batch: usize,
    linger: Duration,
    grace: Duration,
}

impl<I, V, C, S> fmt::Debug for Drain<I, V, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("group", &self.group)
            .field("batch", &self.batch)
            .field("linger", &self.linger)
            .finish_non_exhaustive()
    }
}

/// A delivered write waiting for its batch's outcome.
type Pending<I, V> = (
    Message<Record<I, V>>,
    oneshot::Sender<std::result::Result<(), String>>,
);

impl<I, V, C, S, Fut, Er> Drain<I, V, C, S>
where
    I: IdParts + Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
    S: Fn(Vec<Write<I, V>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
    Er: fmt::Display + Send + 'static,
{
    /// The most writes one sink call gets (default 100, at least 1); also how many writes the drain holds
    /// at once.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How long a batch waits for more writes once it has one (default 5 ms).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// At shutdown, how long the batch in progress gets to be persisted (default 30 s; keep it below the
    /// stream class's `claim_idle`).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// Drain until `shutdown` resolves, then finish the batch in progress within the grace and return what
    /// the underlying stream worker did ([`WorkerReport`]: `handled` counts writes, superseded ones
    /// included).
    ///
    /// # Errors
    /// As [`Worker::run`](crate::stream::Worker::run).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<WorkerReport> {
        let (tx, rx) = mpsc::channel::<Pending<I, V>>(self.batch);
        let batcher = tokio::spawn(batches(
            rx,
            self.wb.cache.clone(),
            Arc::clone(&self.sink),
            self.batch,
            self.linger,
        ));
        let worker = self
            .wb
            .stream
            .worker(&self.group, move |m: Message<Record<I, V>>| {
                let tx = tx.clone();
                async move {
                    let (done, outcome) = oneshot::channel();
                    tx.send((m, done))
                        .await
                        .map_err(|_| "the drain stopped".to_owned())?;
                    outcome
                        .await
                        .unwrap_or_else(|_| Err("the drain stopped".to_owned()))
                }
            })
            .concurrency(self.batch)
            .shutdown_grace(self.grace);
        let report = worker.run(shutdown).await;
        batcher.abort();
        report
    }
}

/// Collect delivered writes into batches (the first one, then whatever arrives within `linger`, up to
/// `max`), coalesce them per id, persist each batch through `sink`, and answer every write of it.
async fn batches<I, V, C, S, Fut, Er>(
    mut rx: mpsc::Receiver<Pending<I, V>>,
    cache: Cache<V, C>,
    sink: Arc<S>,
    max: usize,
    linger: Duration,
) where
    I: IdParts + Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
    S: Fn(Vec<Write<I, V>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
    Er: fmt::Display + Send + 'static,
{
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        // The newest write per id (by the cache key it maps to, by version: a replayed dead letter keeps
        // its first id); the others are answered with its outcome.
        let mut newest: HashMap<String, usize> = HashMap::with_capacity(batch.len());
        for (i, (m, _)) in batch.iter().enumerate() {
            let key = cache.key(&m.event.id).unwrap_or_default();
            match newest.get(&key) {
                Some(&j) if batch[j].0.first_id() > m.first_id() => {}
                _ => {
                    newest.insert(key, i);
                }
            }
        }
        let mut keep: Vec<usize> = newest.into_values().collect();
        keep.sort_by_key(|&i| batch[i].0.first_id());
        let mut answers = Vec::with_capacity(batch.len());
        let mut writes = Vec::with_capacity(keep.len());
        let mut slots: Vec<Option<Pending<I, V>>> = batch.into_iter().map(Some).collect();
        for i in keep {
            if let Some((m, done)) = slots[i].take() {
                answers.push(done);
                writes.push(Write {
                    version: m.first_id(),
                    id: m.event.id,
                    value: m.event.value,
                });
            }
        }
        answers.extend(slots.into_iter().flatten().map(|(_, done)| done));
        // A panicking sink is a failed batch (retried, then dead-lettered), not the end of this task: every
        // later write would otherwise fail with "the drain stopped" and be dead-lettered.
        let outcome = match std::panic::AssertUnwindSafe(async { sink(writes).await })
            .catch_unwind()
            .await
        {
            Ok(done) => done.map_err(|e| e.to_string()),
            Err(_) => Err("the sink panicked".to_owned()),
        };
        for done in answers {
            let _ = done.send(outcome.clone());
        }
    }
}
