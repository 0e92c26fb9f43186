//! The stream family: `stream_produce` (C loops publishing ≈1 KiB JSON events), `stream_e2e` (one
//! producer publishes `--messages` events while a worker runtime consumes them with a no-op handler) and
//! `stream_chaos` (the same with the worker processes SIGKILLed and restarted while the producer publishes;
//! each handler counts its event in a Redis hash, which the producer reads at the end: lost, duplicates).
//!
//! The one decision: **`stream_e2e` ends when Redis says the group is drained, not when a worker counts its
//! last handler.** A worker cannot tell when its acknowledgement of the last entry landed (it `XACK`s after
//! the handler returns), and with `--processes` no worker knows what the others handled. So the producer,
//! once it has published every event, asks [`Stream::group_info`] every [`DRAIN_POLL`] until the group has
//! nothing pending and nothing left to deliver (`pending == 0`, `lag == 0`): the first answer that says so
//! is the run's end, an upper bound on the last acknowledgement by at most one poll interval and one round
//! trip. Those polls are the only commands of the measured phase that are not publishing or consuming; the
//! report counts them (`drain_polls`). Latency is enqueue-to-handled: each event carries the wall-clock µs
//! (`CLOCK_REALTIME`, shared by the processes of one machine) at which its publish call started, and the
//! handler records `now − that` when it runs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use keyward::Keyward;
use keyward::policy::{Retention, StreamClass};
use keyward::stream::{Message, Stream, WorkerReport};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::raw::Raw;
use super::workload::{VALUE_BYTES, Workload};
use crate::bench::measure::{
    self, Counters, Measured, Span, Stop, StreamCounts, collect_histograms, new_histogram,
};
use crate::bench::report::ScenarioFields;

/// The family's stream class (in the policy of its scenarios only).
pub(crate) const CLASS: &str = "bench_stream";
/// The consumer group `stream_e2e`'s workers share.
pub(crate) const GROUP: &str = "bench";
/// The class's retention: 10,000 entries (approximate, `~`), so that a run of a few seconds reaches the
/// steady state in which every publish also trims, as a long-lived bounded stream does.
pub(crate) const MAXLEN: u64 = 10_000;
/// How often the `stream_e2e` producer asks whether the group has drained.
const DRAIN_POLL: Duration = Duration::from_millis(1);
/// How long the group may go without any progress (pending and lag unchanged) before the run fails.
const DRAIN_PATIENCE: Duration = Duration::from_secs(30);
/// How long a stopping worker waits for its running handlers (no-op: they finish at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `stream_chaos`: the class's `claim_idle`, short so that the entries a killed worker held are taken over
/// soon.
pub(crate) const CHAOS_CLAIM_IDLE: Duration = Duration::from_secs(1);
/// `stream_chaos`: how long the hash of handled events outlives a run.
const HANDLED_TTL_MS: u64 = 600_000;

/// The scenarios of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Produce,
    E2e,
    Chaos,
}

/// The family's class: [`MAXLEN`] entries (approximate trims), the class defaults otherwise (5 deliveries,
/// dead letters on, 60 s `claim_idle`, 1 MiB messages); `stream_chaos`: `claim_idle` [`CHAOS_CLAIM_IDLE`].
pub(crate) fn class(kind: Kind) -> StreamClass {
    let class = StreamClass::new(Retention::maxlen(MAXLEN));
    match kind {
        Kind::Produce | Kind::E2e => class,
        Kind::Chaos => class.claim_idle(CHAOS_CLAIM_IDLE),
    }
}

/// The event the family publishes: its sequence number, the wall-clock µs at which its publish call
/// started, and padding to ≈1 KiB of JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Event {
    seq: u64,
    published_us: u64,
    body: String,
}

impl Event {
    /// Event `seq`, published at `published_us`, whose JSON encoding is about [`VALUE_BYTES`] long.
    fn sized(seq: u64, published_us: u64, body: &str) -> Self {
        Event {
            seq,
            published_us,
            body: body.to_owned(),
        }
    }

    /// The padding that makes an event [`VALUE_BYTES`] long (give or take the digits of its numbers).
    fn padding() -> String {
        let bare = serde_json::to_vec(&Event::sized(0, wall_us(), "")).map_or(0, |v| v.len());
        "x".repeat(VALUE_BYTES.saturating_sub(bare))
    }
}

/// The wall-clock time in µs since the Unix epoch.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A connected stream handle, with the publish (or read) path warmed up.
pub(crate) struct Ready {
    stream: Stream<Event>,
    padding: Arc<str>,
    /// `stream_chaos`: where handlers count the events they handled.
    handled: Option<Handled>,
}

/// `stream_chaos`'s record of handled events: a plain Redis hash (outside keyward's keyspace, with a TTL of
/// [`HANDLED_TTL_MS`]), event `seq` → handler calls that returned `Ok`. A handler's `HINCRBY` fails the
/// delivery when it fails, so the entry is retried: an event whose handler succeeded is in the hash.
#[derive(Clone)]
struct Handled {
    raw: Raw,
    key: Arc<str>,
}

impl Handled {
    /// Per event `seq` below `n`: how many handler calls recorded it.
    async fn counts(&self, n: u64) -> anyhow::Result<Vec<u64>> {
        let mut raw = self.raw.clone();
        let mut counts = vec![0u64; usize::try_from(n)?];
        let mut cursor = 0u64;
        loop {
            let (next, pairs): (u64, Vec<(String, u64)>) = redis::cmd("HSCAN")
                .arg(&*self.key)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut raw)
                .await
                .context("stream_chaos: cannot read the handled events")?;
            for (seq, count) in pairs {
                if let Some(slot) = seq.parse::<usize>().ok().and_then(|s| counts.get_mut(s)) {
                    *slot += count;
                }
            }
            if next == 0 {
                return Ok(counts);
            }
            cursor = next;
        }
    }
}

/// Open the class's stream. `stream_produce` publishes one event (outside the measured phase) so that the
/// publish script is loaded; `stream_e2e` and `stream_chaos` only read the stream's length, so that nothing
/// is in the stream for its workers before the producer starts. `stream_chaos` also connects to the hash of
/// handled events (the parent, the first to prepare, gives it its TTL).
pub(crate) async fn prepare(
    kw: &Keyward,
    url: &str,
    app: &str,
    kind: Kind,
    work: &Workload,
) -> anyhow::Result<Ready> {
    let stream = kw
        .stream::<Event>(CLASS)
        .context("cannot open the bench stream class")?;
    let padding: Arc<str> = Event::padding().into();
    match kind {
        Kind::Produce => {
            stream
                .publish(&Event::sized(u64::MAX, wall_us(), &padding))
                .await
                .context("cannot publish the warm-up event")?;
        }
        Kind::E2e | Kind::Chaos => {
            stream
                .len()
                .await
                .context("cannot read the bench stream's length")?;
        }
    }
    let handled = match kind {
        Kind::Chaos => {
            let mut raw = Raw::connect(url).await?;
            let key: Arc<str> = format!("bench:{{{app}:{}}}:_handled", work.key_id).into();
            // A placeholder field, so that the key exists and keeps its TTL (HINCRBY keeps it).
            let _: () = redis::pipe()
                .hset_nx(&*key, "-", 0)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&*key)
                .arg(HANDLED_TTL_MS)
                .arg("NX")
                .ignore()
                .query_async(&mut raw)
                .await
                .context("stream_chaos: cannot create the hash of handled events")?;
            Some(Handled { raw, key })
        }
        Kind::Produce | Kind::E2e => None,
    };
    Ok(Ready {
        stream,
        padding,
        handled,
    })
}

/// The handler's latency record, shared by every handler of one process.
type Recorder = Arc<Mutex<Histogram<u64>>>;

impl Ready {
    /// `stream_produce`: the timed loops. `stream_e2e`: producer and workers in this process.
    pub(crate) async fn run(
        self,
        kind: Kind,
        work: &Workload,
        stop: Stop,
    ) -> anyhow::Result<Measured> {
        match kind {
            Kind::Produce => self.produce(work, stop).await,
            Kind::Chaos => bail!("stream_chaos runs with --processes 2 or more"),
            Kind::E2e => {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let recorder: Recorder = Arc::new(Mutex::new(new_histogram()));
                let workers = tokio::spawn(consume(
                    self.stream.clone(),
                    work.concurrency,
                    Arc::clone(&recorder),
                    None,
                    async move {
                        let _ = rx.await;
                    },
                ));
                // Stop the workers however the producer ends (`tx` dropped on an error, too).
                let led = self.lead(work, None).await;
                drop(tx);
                let report = workers.await.context("the stream worker panicked")??;
                let mut measured = led?;
                measured.merge(&consumed(&recorder, &report)?)?;
                Ok(measured)
            }
        }
    }

    /// `stream_e2e` in a child of `--processes`: a worker with this process's share of the handler
    /// concurrency, until `stop` (the parent's STOP, sent once the group has drained).
    pub(crate) async fn consume_until(
        self,
        work: &Workload,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Measured> {
        let recorder: Recorder = Arc::new(Mutex::new(new_histogram()));
        let report = consume(
            self.stream.clone(),
            work.concurrency,
            Arc::clone(&recorder),
            self.handled.clone(),
            stop,
        )
        .await?;
        consumed(&recorder, &report)
    }

    /// The producer: publish `messages` events, `batch` per call with up to `inflight` calls outstanding
    /// (one task, as concurrent request handlers: the stream batches them), say so on `published`, then wait until
    /// the group has drained. Its `seconds` run from the first publish to that moment. `stream_chaos` then
    /// reads the handled events and the dead letters and counts the lost events and the duplicates.
    ///
    /// # Errors
    /// A failed publish or `group_info`; a group that makes no progress for [`DRAIN_PATIENCE`].
    pub(crate) async fn lead(
        &self,
        work: &Workload,
        published: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> anyhow::Result<Measured> {
        use futures_util::StreamExt as _;
        let (n, batch) = (work.messages, work.batch as u64);
        let first = Instant::now();
        let mut seq = 0u64;
        let mut calls = 0u64;
        let mut outstanding = futures_util::stream::FuturesUnordered::new();
        while seq < n || !outstanding.is_empty() {
            // Keep the window full, then wait for any one call to finish.
            while seq < n && outstanding.len() < work.inflight {
                let k = batch.min(n - seq);
                let now = wall_us();
                let events: Vec<Event> = (seq..seq + k)
                    .map(|s| Event::sized(s, now, &self.padding))
                    .collect();
                let first_seq = seq;
                outstanding.push(async move {
                    publish(&self.stream, &events)
                        .await
                        .with_context(|| format!("stream_e2e: cannot publish event {first_seq}"))
                });
                seq += k;
                calls += 1;
            }
            if let Some(done) = outstanding.next().await {
                done?;
            }
        }
        if let Some(published) = published {
            let _ = published.send(());
        }
        let mut polls = 0u64;
        let mut seen = None;
        let mut progress = Instant::now();
        loop {
            polls += 1;
            let info = self
                .stream
                .group_info(GROUP)
                .await
                .context("stream_e2e: cannot read the consumer group")?;
            let now = info.as_ref().map(|i| (i.pending, i.lag));
            if now == Some((0, Some(0))) {
                break;
            }
            if now != seen {
                seen = now;
                progress = Instant::now();
            } else if progress.elapsed() >= DRAIN_PATIENCE {
                bail!(
                    "stream_e2e: the group `{GROUP}` made no progress for {DRAIN_PATIENCE:?} after the last \
                     publish (pending, lag: {now:?})"
                );
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let mut measured = Measured::empty();
        measured.seconds = first.elapsed().as_secs_f64();
        measured.stream = StreamCounts {
            published: n,
            publish_calls: calls,
            drain_polls: polls,
            ..StreamCounts::default()
        };
        if let Some(handled) = &self.handled {
            let counts = handled.counts(n).await?;
            let dead: std::collections::HashSet<u64> = self
                .stream
                .dead_letters(10_000)
                .await
                .context("stream_chaos: cannot read the dead letters")?
                .iter()
                .filter_map(|d| serde_json::from_slice::<Event>(&d.payload).ok())
                .map(|e| e.seq)
                .collect();
            let s = &mut measured.stream;
            s.dead_lettered = dead.len() as u64;
            s.recorded = counts.iter().sum();
            for (seq, &count) in (0u64..).zip(&counts) {
                match count {
                    0 if !dead.contains(&seq) => s.lost += 1,
                    0 => {}
                    c => s.duplicates += c - 1,
                }
            }
        }
        Ok(measured)
    }

    /// `stream_produce`: C loops publishing `batch` events per call until `stop`. Every event counts as an
    /// op, with its call's latency.
    async fn produce(self, work: &Workload, stop: Stop) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let calls = Arc::new(AtomicU64::new(0));
        let batch = work.batch as u64;
        let mut workers = JoinSet::new();
        for w in 0..work.concurrency as u64 {
            let (stream, padding, calls) = (
                self.stream.clone(),
                Arc::clone(&self.padding),
                Arc::clone(&calls),
            );
            workers.spawn(async move {
                let mut latencies = new_histogram();
                let start = Instant::now();
                let mut seq = w << 40;
                let mut made = 0u64;
                loop {
                    let done = match stop {
                        Stop::At(deadline) => Instant::now() >= deadline,
                        Stop::After(n) => made >= n,
                    };
                    if done {
                        break;
                    }
                    let now = wall_us();
                    let events: Vec<Event> = (seq..seq + batch)
                        .map(|s| Event::sized(s, now, &padding))
                        .collect();
                    let t = Instant::now();
                    publish(&stream, &events).await?;
                    latencies.saturating_record_n(measure::micros(t.elapsed()), batch);
                    seq += batch;
                    made += 1;
                }
                calls.fetch_add(made, Ordering::Relaxed);
                anyhow::Ok((
                    latencies,
                    Span {
                        start,
                        end: Instant::now(),
                    },
                ))
            });
        }
        let mut measured = collect_histograms(workers, &counters).await?;
        measured.stream = StreamCounts {
            published: measured.ops(),
            publish_calls: calls.load(Ordering::Relaxed),
            ..StreamCounts::default()
        };
        Ok(measured)
    }
}

/// One `publish` for one event, one `publish_many` for more.
async fn publish(stream: &Stream<Event>, events: &[Event]) -> anyhow::Result<()> {
    match events {
        [one] => {
            stream
                .publish(one)
                .await
                .context("cannot publish a bench event")?;
        }
        many => {
            stream
                .publish_many(many)
                .await
                .context("cannot publish a batch of bench events")?;
        }
    }
    Ok(())
}

/// Run one worker of [`GROUP`] with `concurrency` handlers until `stop`; each handler records its event's
/// enqueue-to-handled latency, and with `handled` (`stream_chaos`) counts the event there first (a failed
/// count fails the delivery).
async fn consume(
    stream: Stream<Event>,
    concurrency: usize,
    recorder: Recorder,
    handled: Option<Handled>,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<WorkerReport> {
    let handler = move |m: Message<Event>| {
        let us = wall_us().saturating_sub(m.event.published_us).max(1);
        let (recorder, handled) = (Arc::clone(&recorder), handled.clone());
        async move {
            if let Some(h) = handled {
                let mut raw = h.raw.clone();
                let _: i64 = redis::cmd("HINCRBY")
                    .arg(&*h.key)
                    .arg(m.event.seq)
                    .arg(1)
                    .query_async(&mut raw)
                    .await?;
            }
            if let Ok(mut h) = recorder.lock() {
                h.saturating_record(us);
            }
            Ok::<(), redis::RedisError>(())
        }
    };
    stream
        .worker(GROUP, handler)
        .concurrency(concurrency)
        .shutdown_grace(SHUTDOWN_GRACE)
        .run(stop)
        .await
        .context("the stream worker failed to start")
}

/// What a worker measured: the handlers' latencies and its report's counts (no `seconds`: the producer's
/// span is the run's).
fn consumed(recorder: &Recorder, report: &WorkerReport) -> anyhow::Result<Measured> {
    let mut measured = Measured::empty();
    measured.latencies = std::mem::replace(
        &mut *recorder
            .lock()
            .map_err(|_| anyhow::anyhow!("a stream_e2e handler panicked"))?,
        new_histogram(),
    );
    measured.stream = StreamCounts {
        handled: report.handled,
        failed: report.failed,
        dead_lettered: report.dead_lettered,
        worker_lost: report.lost,
        group_recreated: report.group_recreated,
        ..StreamCounts::default()
    };
    Ok(measured)
}

/// `stream_e2e`: every published event was handled (the drain check makes anything else impossible unless
/// entries were acknowledged without their handler running).
///
/// # Errors
/// Fewer handler calls than events published.
pub(crate) fn check(kind: Kind, work: &Workload, measured: &Measured) -> anyhow::Result<()> {
    if kind == Kind::E2e && measured.ops() < work.messages {
        bail!(
            "stream_e2e: the group drained, but handlers ran only {} times for {} events",
            measured.ops(),
            work.messages
        );
    }
    Ok(())
}

/// What the family adds to the report.
pub(crate) fn fields(kind: Kind, work: &Workload, measured: &Measured) -> ScenarioFields {
    let s = &measured.stream;
    let common = ScenarioFields {
        batch: Some(work.batch as u64),
        inflight: (kind != Kind::Produce).then_some(work.inflight as u64),
        maxlen: Some(MAXLEN),
        published: Some(s.published),
        publish_calls: Some(s.publish_calls),
        ..ScenarioFields::default()
    };
    match kind {
        Kind::Produce => common,
        Kind::Chaos => ScenarioFields {
            messages: Some(work.messages),
            handled: Some(s.recorded),
            duplicates: Some(s.duplicates),
            failed: Some(s.failed),
            dead_lettered: Some(s.dead_lettered),
            drain_polls: Some(s.drain_polls),
            lost: Some(s.lost),
            kills: Some(s.kills),
            kill_every_ms: Some(u64::try_from(work.kill_every.as_millis()).unwrap_or(u64::MAX)),
            ..common
        },
        Kind::E2e => ScenarioFields {
            messages: Some(work.messages),
            handled: Some(measured.ops()),
            duplicates: Some(measured.ops().saturating_sub(work.messages)),
            failed: Some(s.failed),
            dead_lettered: Some(s.dead_lettered),
            drain_polls: Some(s.drain_polls),
            ..common
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_about_one_kib() {
        let padding = Event::padding();
        for seq in [0, 7, u64::MAX] {
            let len = serde_json::to_vec(&Event::sized(seq, wall_us(), &padding))
                .unwrap()
                .len();
            assert!((VALUE_BYTES - 8..VALUE_BYTES + 40).contains(&len), "{len}");
        }
    }

    #[test]
    fn the_class_is_bounded() {
        let policy = keyward::policy::Policy::builder("bench", "kwbench1")
            .stream(CLASS, class(Kind::Chaos))
            .build()
            .unwrap();
        let class = policy.class(CLASS).unwrap().as_stream().unwrap();
        assert_eq!(class.retention_value().maxlen_value(), Some(MAXLEN));
        assert_eq!(class.claim_idle_value(), CHAOS_CLAIM_IDLE);
    }
}
