//! The consumer-group worker runtime: reads a stream as one consumer of a group, runs a handler on each
//! entry, acknowledges only after the handler succeeded, retries failures with backoff, dead-letters entries
//! that failed `max_deliveries` times, and takes over entries abandoned by workers that died.
//!
//! **The one decision to know: idle workers are woken, not blocked.** A worker that finds nothing to read
//! leaves a marker key (with a TTL) in the stream's hash tag, in the same script as its read; the next publish
//! deletes the marker and sends one wake-up on the namespace's pub/sub channel (sharded on Cluster), which
//! the handle's existing subscription delivers. So no read ever blocks a connection (`XREADGROUP BLOCK` would
//! stall the shared multiplexed connection, or need one more connection per worker on every node), a
//! wake-up cannot be missed (the marker is set atomically with the empty read), and publishes pay for a
//! `PUBLISH` only when some worker is idle. A lost wake-up (a dropped subscription) only delays a worker
//! until its next re-check, at most `claim_idle / 3` (between 100 ms and 5 s) later.
//!
//! Acknowledgements are batched: a handler that returned `Ok` queues its entry for one acknowledgement task,
//! which sends everything queued in one `XACK` each time its previous call returned (it never waits for more
//! work). An entry stays held (its claim renewed) until that call ended; a failed call leaves its entries
//! pending, to be delivered again; `run` sends what is queued before it returns. While reads come back full,
//! the worker reads with a plain `XREADGROUP` and uses the read script (which leaves the marker) only once a
//! read finds less than it asked for.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::Instrument;

use super::store::{self, Claimed};
use super::{EntryId, Stream};
use crate::codec::Codec;
use crate::error::{Error, Result};

/// The most entries one read or reclaim asks for.
const READ_BATCH: usize = 64;
/// The most entries one acknowledgement call carries.
const ACK_BATCH: usize = 1024;
/// The longest error text kept with a dead letter.
const MAX_ERROR_BYTES: usize = 1024;

/// One delivery of an entry to a handler.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message<E> {
    /// The entry's id.
    pub id: EntryId,
    /// The decoded event.
    pub event: E,
    /// How many times the entry has been delivered, this delivery included (1 the first time).
    pub deliveries: u64,
    /// For an entry moved back from the dead letters ([`Stream::replay_dead_letters`]): the id its event was
    /// first published under (kept through any number of dead-letterings and replays); `None` otherwise.
    pub origin: Option<EntryId>,
}

impl<E> Message<E> {
    /// The event's place in publish order: [`origin`](Self::origin) for a replayed dead letter, else
    /// [`id`](Self::id). A replay does not make an old event new: order by this (e.g. write-behind's
    /// [`Write::version`](crate::Write::version)), not by `id`.
    pub fn first_id(&self) -> EntryId {
        self.origin.unwrap_or(self.id)
    }
}

/// What a worker did between `run` and its return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Entries whose handler succeeded (each acknowledged, unless its acknowledgement call failed: then it
    /// stays pending and is delivered again).
    pub handled: u64,
    /// Handler failures (each retried later, or dead-lettered).
    pub failed: u64,
    /// Entries moved to the dead letters (or, with dead letters off, dropped) after `max_deliveries`.
    pub dead_lettered: u64,
    /// Entries that were pending but no longer in the stream (trimmed past the hard cap): lost, and counted.
    pub lost: u64,
    /// Handlers still running at the shutdown deadline: stopped, not acknowledged, left pending for others.
    pub unfinished: u64,
    /// Times the group had to be created again because the server had lost it (e.g. restarted empty).
    pub group_recreated: u64,
}

#[derive(Default)]
struct Counts {
    handled: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    lost: AtomicU64,
}

/// A worker for one consumer group; built by [`Stream::worker`], started with [`run`](Self::run).
#[must_use = "a worker does nothing until `run` is awaited"]
pub struct Worker<E, C, F> {
    stream: Stream<E, C>,
    group: String,
    handler: Arc<F>,
    concurrency: usize,
    grace: Duration,
    from_oldest: bool,
}

impl<E, C, F> fmt::Debug for Worker<E, C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("class", &self.stream.inner.class)
            .field("group", &self.group)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<E, C> Stream<E, C>
where
    E: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// A worker that consumes this stream as one consumer of `group`, running `handler` on each entry. The
    /// handler's `Ok` acknowledges the entry; an `Err` (its `Display` is kept as the last error) retries it
    /// after the class's backoff, until `max_deliveries`, then dead-letters it.
    ///
    /// Defaults: 1 handler at a time, 30 s of grace at shutdown, a new group starts at the oldest entry kept.
    pub fn worker<F, Fut, Er>(&self, group: &str, handler: F) -> Worker<E, C, F>
    where
        F: Fn(Message<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
        Er: fmt::Display + Send + 'static,
    {
        Worker {
            stream: self.clone(),
            group: group.to_owned(),
            handler: Arc::new(handler),
            concurrency: 1,
            grace: Duration::from_secs(30),
            from_oldest: true,
        }
    }

    /// The dead letters (oldest first, at most `count`, up to 10,000): the original entry id, the group, the
    /// last error, the delivery count and the event.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `count` above 10,000; backend failures.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        if count > 10_000 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{}`: dead_letters count {count} is above 10000",
                    self.inner.class
                ),
            });
        }
        store::dead_letters(&self.kw, &self.inner.keys, count).await
    }

    /// What `group` holds now: its consumers, pending entries, lag and oldest pending entry. `None` if there
    /// is no such group.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn group_info(&self, group: &str) -> Result<Option<GroupInfo>> {
        store::group_info(&self.kw, &self.inner.keys, group).await
    }

    /// Move dead letters back into the stream for another round of deliveries: of the oldest `max` dead letters
    /// (up to 10,000), those `filter` accepts are appended to the stream again (new entries, new ids, delivered
    /// afresh to every group) and removed from the dead letters, each in one script, so none is ever in both
    /// places or lost between them. With `dry_run` nothing changes and the selection is returned. Returns the
    /// dead letters moved (or that would be), with the new entry id (`None` in a dry run). The stream's
    /// retention is applied by the next publish. Each new entry remembers the id its event was first
    /// published under ([`Message::origin`], [`Message::first_id`]), so a consumer that orders events (a
    /// write-behind drain: [`Write::version`](crate::Write::version)) does not take a replay for a newer event.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `max` above 10,000; backend failures.
    pub async fn replay_dead_letters(
        &self,
        filter: impl Fn(&DeadLetter) -> bool,
        max: usize,
        dry_run: bool,
    ) -> Result<Vec<(DeadLetter, Option<EntryId>)>> {
        let chosen: Vec<DeadLetter> = self
            .dead_letters(max)
            .await?
            .into_iter()
            .filter(|d| filter(d))
            .collect();
        if dry_run {
            return Ok(chosen.into_iter().map(|d| (d, None)).collect());
        }
        let ids: Vec<EntryId> = chosen.iter().map(|d| d.dead_id).collect();
        let moved = store::replay(&self.kw, &self.inner.keys, &ids).await?;
        Ok(chosen
            .into_iter()
            .filter_map(|d| {
                let new = moved.iter().find(|(dead, _)| *dead == d.dead_id)?.1;
                Some((d, Some(new)))
            })
            .collect())
    }
}

/// What a consumer group holds now ([`Stream::group_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// Consumers the group knows (workers, live or recently gone).
    pub consumers: u64,
    /// Entries delivered and not acknowledged yet.
    pub pending: u64,
    /// Entries not delivered to the group yet (`None` when Redis cannot count it, e.g. after deletions in the
    /// stream's middle).
    pub lag: Option<u64>,
    /// The oldest pending entry.
    pub oldest_pending: Option<EntryId>,
    /// How long ago the oldest pending entry was published (by the server's clock).
    pub oldest_pending_age: Option<Duration>,
}

/// An entry moved to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The dead letter's own id (in the dead-letter stream).
    pub dead_id: EntryId,
    /// The entry's id in the stream.
    pub id: EntryId,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The last handler error (at most 1 KiB).
    pub error: String,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// The encoded event, as published.
    pub payload: bytes::Bytes,
    /// When the entry was itself a replayed dead letter: the id its event was first published under (a
    /// replay of this dead letter keeps it; else a replay's origin is [`id`](Self::id)).
    pub origin: Option<EntryId>,
}

impl<E, C, F, Fut, Er> Worker<E, C, F>
where
    E: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
    F: Fn(Message<E>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
    Er: fmt::Display + Send + 'static,
{
    /// Run up to `n` handlers at once (default 1; clamped to at least 1 and at most
    /// [`Semaphore::MAX_PERMITS`](https://docs.rs/tokio/1/tokio/sync/struct.Semaphore.html#associatedconstant.MAX_PERMITS), so an absurd `n` cannot panic when the worker starts).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// At shutdown, wait this long for running handlers to finish (and be acknowledged); the rest are stopped
    /// and left pending for other workers (default 30 s). Their claims are renewed through the grace, so
    /// another worker does not take over an entry whose handler is still running; what is stopped at the
    /// deadline is taken over `claim_idle` later.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// Where a group this worker creates starts: the oldest entry kept (`true`, the default: nothing
    /// published before the first worker ran is skipped) or only entries published from now on.
    pub fn from_oldest(mut self, yes: bool) -> Self {
        self.from_oldest = yes;
        self
    }

    /// Consume until `shutdown` resolves; then stop reading, give running handlers the shutdown grace, and
    /// return what the worker did. Entries are acknowledged only after their handler returned `Ok`; an entry
    /// whose handler is stopped or whose worker dies stays pending and is taken over by another worker after
    /// the class's `claim_idle`. Store failures while running are logged and retried; they do not end the run.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty group name or one over 128 bytes; the first group creation's
    /// backend failure.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<WorkerReport> {
        let class = self.stream.inner.class.clone();
        if self.group.is_empty()
            || self.group.len() > 128
            || self.group.chars().any(char::is_control)
        {
            return Err(Error::InvalidArgument {
                what: format!(
                    "class `{class}`: a consumer group name must be 1 to 128 bytes without control characters"
                ),
            });
        }
        let kw = self.stream.kw.clone();
        let keys = self.stream.inner.keys.clone();
        let settings = self.stream.inner.settings.clone();
        store::create_group(&kw, &keys, &self.group, self.from_oldest).await?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: consumer_name(),
            handler: Arc::clone(&self.handler),
            sem: Arc::new(Semaphore::new(self.concurrency)),
            held: Mutex::new(HashSet::new()),
            stop: stop_rx,
            counts: Counts::default(),
            metrics: Metrics::new(&class, &self.group),
        });
        let claim_idle = settings.claim_idle_value();
        let claim_idle_ms = u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX);
        let recheck = (claim_idle / 3).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let marker_ttl_ms = u64::try_from((recheck * 2).as_millis()).unwrap_or(u64::MAX);
        // Claims on held entries are renewed three times per claim_idle (at most every 5 s).
        let touch_every = (claim_idle / 3).min(Duration::from_secs(5));
        let consumer_idle_ms = claim_idle_ms.saturating_mul(10);
        let mut tasks = JoinSet::new();
        // The entries whose handlers succeeded go to one task that acknowledges them in batches (see
        // `Ctx::acknowledge`). Aborted if this future is dropped: what it had not sent yet stays pending.
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let mut acker = JoinSet::new();
        acker.spawn(Arc::clone(&ctx).acknowledge(acks_rx));
        let mut report = WorkerReport::default();
        // Registered before the first read, so a publish between an empty read and the wait wakes it.
        let watch = kw
            .inner
            .backend
            .watch(&kw.inner.bus, &kw.inner.ns, &keys.stream)
            .await;
        let notify = watch.shared();
        let mut next_touch = Instant::now() + touch_every;
        let mut next_reclaim = Instant::now();
        let mut cursor: Option<EntryId> = None;
        // The previous read returned all it asked for, so more are likely waiting: read with the plain
        // command, which costs the server far less than the script (see `store::read_plain`).
        let mut busy = false;
        tokio::pin!(shutdown);
        tracing::info!(class = %class, group = %self.group, consumer = %ctx.consumer, "keyward: stream worker started");
        'run: loop {
            while tasks.try_join_next().is_some() {}
            // Every handler slot may be busy for long: the claims on held entries are renewed on time anyway.
            let first = tokio::select! {
                biased;
                () = &mut shutdown => break 'run,
                () = sleep_until(next_touch) => {
                    ctx.touch().await;
                    next_touch = Instant::now() + touch_every;
                    continue 'run;
                }
                p = Arc::clone(&ctx.sem).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'run,
                },
            };
            // The shutdown may have resolved while the permit was being handed over (a handler that resolves
            // it, then frees its slot): no read or claim after it.
            if (&mut shutdown).now_or_never().is_some() {
                break 'run;
            }
            let mut permits = vec![first];
            while permits.len() < READ_BATCH {
                match Arc::clone(&ctx.sem).try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_touch {
                ctx.touch().await;
                next_touch = now + touch_every;
            }
            if now >= next_reclaim {
                next_reclaim = now + claim_idle / 2;
                ctx.gauges().await;
                match store::reclaim(
                    &kw,
                    &keys,
                    &ctx.group,
                    &ctx.consumer,
                    claim_idle_ms,
                    cursor,
                    permits.len(),
                    consumer_idle_ms,
                )
                .await
                {
                    Ok(Some(r)) => {
                        cursor = r.cursor;
                        if cursor.is_some() {
                            next_reclaim = now; // more to look at: go on at the next free slot
                        }
                        if r.deleted > 0 {
                            ctx.lost(r.deleted);
                        }
                        for c in r.claimed {
                            let Some(p) = permits.pop() else { break };
                            tasks.spawn(Arc::clone(&ctx).process(c, p, acks.clone()));
                        }
                    }
                    Ok(None) => {
                        self.recreate(&kw, &keys, &mut report).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(class = %class, group = %self.group, error = %e, "keyward: stream reclaim failed; retrying later");
                    }
                }
            }
            if permits.is_empty() {
                continue;
            }
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let asked = permits.len();
            let fast = if busy {
                store::read_plain(&kw, &keys, &ctx.group, &ctx.consumer, asked)
                    .await
                    .ok()
                    .flatten()
            } else {
                None
            };
            // Nothing new on the plain path (or it failed): the script reads again, leaves the wake-up
            // marker if there is still nothing, and tells a missing group apart.
            let read = match fast {
                Some(entries) => Ok(Some(entries)),
                None => {
                    store::read(&kw, &keys, &ctx.group, &ctx.consumer, asked, marker_ttl_ms).await
                }
            };
            busy = matches!(&read, Ok(Some(entries)) if entries.len() == asked);
            match read {
                Ok(Some(entries)) if !entries.is_empty() => {
                    for (id, payload, origin) in entries {
                        let Some(p) = permits.pop() else { break };
                        let c = Claimed {
                            id,
                            deliveries: 1,
                            payload: Some(payload),
                            origin,
                        };
                        tasks.spawn(Arc::clone(&ctx).process(c, p, acks.clone()));
                    }
                }
                Ok(Some(_)) => {
                    drop(permits);
                    let until = (now + recheck).min(next_touch).min(next_reclaim);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break 'run,
                        () = &mut woken => {}
                        () = sleep_until(until) => {}
                    }
                }
                Ok(None) => self.recreate(&kw, &keys, &mut report).await,
                Err(e) => {
                    drop(permits);
                    tracing::warn!(class = %class, group = %self.group, error = %e, "keyward: stream read failed; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break 'run,
                        () = sleep(recheck) => {}
                    }
                }
            }
        }

        // Shutdown: no more reads or claims; retries waiting for their backoff give their entries up (they stay
        // pending); running handlers get the grace, then are stopped without an acknowledgement. The claims on
        // the entries still running are renewed through the grace as before it: otherwise a handler that
        // finishes in the grace may already have been taken over by another worker (a duplicate).
        let _ = stop_tx.send(true);
        let deadline = Instant::now() + self.grace;
        loop {
            tokio::select! {
                biased;
                done = tasks.join_next() => if done.is_none() { break },
                () = sleep_until(next_touch) => {
                    ctx.touch().await;
                    next_touch = Instant::now() + touch_every;
                }
                () = sleep_until(deadline) => {
                    report.unfinished = tasks.len() as u64;
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        // Every handler has ended: the acknowledgements of those that succeeded are sent before returning
        // (each call bounded by the backend's response timeout).
        drop(acks);
        while acker.join_next().await.is_some() {}
        drop(watch);
        report.handled = ctx.counts.handled.load(Ordering::Relaxed);
        report.failed = ctx.counts.failed.load(Ordering::Relaxed);
        report.dead_lettered = ctx.counts.dead_lettered.load(Ordering::Relaxed);
        report.lost = ctx.counts.lost.load(Ordering::Relaxed);
        tracing::info!(class = %class, group = %self.group, consumer = %ctx.consumer, ?report, "keyward: stream worker stopped");
        Ok(report)
    }

    /// The server no longer has the group (it restarted empty, or someone destroyed it): create it again,
    /// from the oldest entry kept, and say so. What the server lost cannot be recovered; the report counts
    /// the recreations.
    async fn recreate(
        &self,
        kw: &crate::Keyward,
        keys: &store::StreamKeys,
        report: &mut WorkerReport,
    ) {
        match store::create_group(kw, keys, &self.group, true).await {
            Ok(_) => {
                report.group_recreated += 1;
                tracing::warn!(class = %self.stream.inner.class, group = %self.group, "keyward: the consumer group was missing on the server and was created again; entries and pending state the server lost are not recoverable");
            }
            Err(e) => {
                tracing::warn!(class = %self.stream.inner.class, group = %self.group, error = %e, "keyward: cannot create the consumer group again; retrying");
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

struct Metrics {
    handled: metrics::Counter,
    failed: metrics::Counter,
    dead_lettered: metrics::Counter,
    lost: metrics::Counter,
    latency: metrics::Histogram,
    pending: metrics::Gauge,
    lag: metrics::Gauge,
    oldest_age: metrics::Gauge,
}

impl Metrics {
    fn new(class: &str, group: &str) -> Self {
        let labels = [("class", class.to_owned()), ("group", group.to_owned())];
        Metrics {
            handled: metrics::counter!("keyward_stream_handled_total", &labels),
            failed: metrics::counter!("keyward_stream_failed_total", &labels),
            dead_lettered: metrics::counter!("keyward_stream_dead_lettered_total", &labels),
            lost: metrics::counter!("keyward_stream_lost_total", &labels),
            latency: metrics::histogram!("keyward_stream_handler_seconds", &labels),
            pending: metrics::gauge!("keyward_stream_pending", &labels),
            lag: metrics::gauge!("keyward_stream_lag", &labels),
            oldest_age: metrics::gauge!("keyward_stream_oldest_pending_age_seconds", &labels),
        }
    }
}

struct Ctx<E, C, F> {
    stream: Stream<E, C>,
    group: String,
    consumer: String,
    handler: Arc<F>,
    sem: Arc<Semaphore>,
    /// Entries this worker holds (running, or waiting for a retry): their claim is renewed by `touch`.
    held: Mutex<HashSet<EntryId>>,
    stop: watch::Receiver<bool>,
    counts: Counts,
    metrics: Metrics,
}

/// An entry in [`Ctx::held`] for as long as this lives, unless handed over to the acknowledgements (which
/// remove it once its acknowledgement call has ended).
struct Held<'a> {
    held: &'a Mutex<HashSet<EntryId>>,
    id: EntryId,
    armed: bool,
}

impl<'a> Held<'a> {
    fn new<E, C, F>(ctx: &'a Ctx<E, C, F>, id: EntryId) -> Self {
        ctx.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Held {
            held: &ctx.held,
            id,
            armed: true,
        }
    }

    /// Keep the entry held (its claim renewed) after this guard is gone: the acknowledgement task releases it.
    fn hand_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// How one delivery ended.
enum Outcome {
    Ok,
    /// Failed with this error; `permanent`: no retry can succeed (the event does not decode).
    Failed {
        error: String,
        permanent: bool,
    },
}

impl<E, C, F, Fut, Er> Ctx<E, C, F>
where
    E: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
    F: Fn(Message<E>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), Er>> + Send + 'static,
    Er: fmt::Display + Send + 'static,
{
    fn lost(&self, n: u64) {
        self.counts.lost.fetch_add(n, Ordering::Relaxed);
        self.metrics.lost.increment(n);
        tracing::warn!(class = %self.stream.inner.class, group = %self.group, lost = n, "keyward: pending entries were trimmed from the stream before being handled (a group lagged past the hard cap)");
    }

    fn held_ids(&self) -> Vec<EntryId> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Set the group's gauges (pending, lag, oldest pending age), once per reclaim period.
    async fn gauges(&self) {
        let s = &self.stream;
        if let Ok(Some(info)) = store::group_info(&s.kw, &s.inner.keys, &self.group).await {
            self.metrics.pending.set(info.pending as f64);
            if let Some(lag) = info.lag {
                self.metrics.lag.set(lag as f64);
            }
            self.metrics
                .oldest_age
                .set(info.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
        }
    }

    /// Renew the claim on every entry held, so that live workers do not reclaim them.
    async fn touch(&self) {
        let ids = self.held_ids();
        let s = &self.stream;
        if let Err(e) = store::touch(&s.kw, &s.inner.keys, &self.group, &self.consumer, &ids).await
        {
            tracing::warn!(class = %s.inner.class, group = %self.group, error = %e, "keyward: cannot renew the claim on held stream entries");
        }
    }

    /// Acknowledge, in one call each time, every entry whose handler succeeded since the previous call
    /// ended: the call takes what is queued when the previous one returns and never waits for more, so an
    /// entry waits at most one call's round trip behind others. Only `process` queues entries, and only after
    /// their handler returned `Ok`. A failed call is logged; its entries stay pending with this consumer and
    /// are delivered again after `claim_idle` (at least once). Ends when every sender is gone (the worker's
    /// run and all its handler tasks) and the queue is empty.
    async fn acknowledge(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<EntryId>) {
        let s = &self.stream;
        let mut batch = Vec::with_capacity(READ_BATCH);
        while queue.recv_many(&mut batch, ACK_BATCH).await > 0 {
            if let Err(e) = store::ack(&s.kw, &s.inner.keys, &self.group, &batch).await {
                tracing::warn!(class = %s.inner.class, group = %self.group, entries = batch.len(), first = %batch[0], error = %e, "keyward: handled but not acknowledged; they will be delivered again");
            }
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for id in &batch {
                held.remove(id);
            }
            drop(held);
            batch.clear();
        }
    }

    /// Handle one entry to its end: acknowledged, dead-lettered, given up at shutdown, or taken over by
    /// another worker.
    ///
    /// The store calls of the rare paths (lost, dead letter, retry) are boxed: each is a whole backend call's
    /// state, and unboxed they made every spawned task (one per entry) three times larger, which every
    /// entry paid for in its spawn.
    async fn process(
        self: Arc<Self>,
        mut c: Claimed,
        permit: OwnedSemaphorePermit,
        acks: mpsc::UnboundedSender<EntryId>,
    ) {
        let mut permit = Some(permit);
        let s = &self.stream;
        let settings = &s.inner.settings;
        let max = u64::from(settings.max_deliveries_value());
        // Held (its claim renewed) until this task ends, however it ends: returned, stopped at shutdown.
        let held = Held::new(&self, c.id);
        loop {
            let Some(payload) = c.payload.take() else {
                // Trimmed past the hard cap while pending: nothing to run; clear it from the pending list.
                self.lost(1);
                let _ = Box::pin(store::ack(&s.kw, &s.inner.keys, &self.group, &[c.id])).await;
                break;
            };
            let outcome = if c.deliveries > max {
                Outcome::Failed {
                    error: format!(
                        "delivered {} times without an acknowledgement (its workers stopped or died while handling it)",
                        c.deliveries - 1
                    ),
                    permanent: true,
                }
            } else {
                self.run_handler(c.id, c.origin, c.deliveries, &payload)
                    .await
            };
            match outcome {
                Outcome::Ok => {
                    self.counts.handled.fetch_add(1, Ordering::Relaxed);
                    self.metrics.handled.increment(1);
                    // Acknowledged by the next acknowledgement call, together with the entries whose
                    // handlers finished meanwhile; held (its claim renewed) until that call has ended. The
                    // handler slot is free at once. The receiver outlives every task (`run` drops its last
                    // sender only after all tasks ended), so the send cannot fail while this task runs.
                    if acks.send(c.id).is_ok() {
                        held.hand_over();
                    }
                    return;
                }
                Outcome::Failed { error, permanent } => {
                    self.counts.failed.fetch_add(1, Ordering::Relaxed);
                    self.metrics.failed.increment(1);
                    if permanent || c.deliveries >= max {
                        let error = truncate(&error, MAX_ERROR_BYTES);
                        let dead = settings.dead_letter_value();
                        match Box::pin(store::dead_letter(
                            &s.kw,
                            &s.inner.keys,
                            &self.group,
                            &self.consumer,
                            c.id,
                            error,
                            c.deliveries,
                            dead.as_ref(),
                        ))
                        .await
                        {
                            Ok(true) => {
                                self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                self.metrics.dead_lettered.increment(1);
                                tracing::warn!(class = %s.inner.class, group = %self.group, id = %c.id, deliveries = c.deliveries, error, "keyward: stream entry dead-lettered");
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(class = %s.inner.class, group = %self.group, id = %c.id, error = %e, "keyward: cannot dead-letter; it stays pending and will be taken over");
                            }
                        }
                        break;
                    }
                    // Wait the backoff without holding a handler slot, then take it again for the next delivery.
                    drop(permit.take());
                    let delay = settings.backoff_value().jittered(
                        u32::try_from(c.deliveries).unwrap_or(u32::MAX),
                        rand::random::<f64>(),
                    );
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        () = sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    let p = tokio::select! {
                        p = Arc::clone(&self.sem).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    permit = Some(p);
                    match Box::pin(store::redeliver(
                        &s.kw,
                        &s.inner.keys,
                        &self.group,
                        &self.consumer,
                        c.id,
                    ))
                    .await
                    {
                        Ok(Some(next)) => c = next,
                        Ok(None) => break, // another worker took it over, or it is gone
                        Err(e) => {
                            tracing::warn!(class = %s.inner.class, group = %self.group, id = %c.id, error = %e, "keyward: cannot take the entry back for its retry; it will be taken over after claim_idle");
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn run_handler(
        &self,
        id: EntryId,
        origin: Option<EntryId>,
        deliveries: u64,
        payload: &[u8],
    ) -> Outcome {
        let s = &self.stream;
        let event = match C::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                return Outcome::Failed {
                    error: format!("cannot decode the event: {e}"),
                    permanent: true,
                };
            }
        };
        let span = tracing::info_span!("keyward.stream.handle", class = %s.inner.class, group = %self.group, id = %id, deliveries);
        let started = Instant::now();
        let out = std::panic::AssertUnwindSafe(
            (self.handler)(Message {
                id,
                event,
                deliveries,
                origin,
            })
            .instrument(span),
        )
        .catch_unwind()
        .await;
        self.metrics.latency.record(started.elapsed().as_secs_f64());
        match out {
            Ok(Ok(())) => Outcome::Ok,
            Ok(Err(e)) => Outcome::Failed {
                error: e.to_string(),
                permanent: false,
            },
            // A panicking handler is a failed delivery like any other: retried, then dead-lettered.
            Err(_) => Outcome::Failed {
                error: "the handler panicked".to_owned(),
                permanent: false,
            },
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A consumer name unique to this worker: host, process and a random part (`host-1234-9f2c…`).
fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "keyward".to_owned());
    format!(
        "{host}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}
