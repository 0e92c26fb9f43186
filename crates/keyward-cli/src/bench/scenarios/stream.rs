//! The stream family: `stream_produce` (C loops publishing ≈1 KiB JSON events) and `stream_e2e` (one
//! producer publishes `--messages` events while a worker runtime consumes them with a no-op handler).
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

use std::convert::Infallible;
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

/// The scenarios of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Produce,
    E2e,
}

/// The family's class: [`MAXLEN`] entries (approximate trims), the class defaults otherwise (5 deliveries,
/// dead letters on, 60 s `claim_idle`, 1 MiB messages).
pub(crate) fn class() -> StreamClass {
    StreamClass::new(Retention::maxlen(MAXLEN))
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
}

/// Open the class's stream. `stream_produce` publishes one event (outside the measured phase) so that the
/// publish script is loaded; `stream_e2e` only reads the stream's length, so that nothing is in the stream
/// for its workers before the producer starts.
pub(crate) async fn prepare(kw: &Keyward, kind: Kind) -> anyhow::Result<Ready> {
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
        Kind::E2e => {
            stream
                .len()
                .await
                .context("cannot read the bench stream's length")?;
        }
    }
    Ok(Ready { stream, padding })
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
            Kind::E2e => {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let recorder: Recorder = Arc::new(Mutex::new(new_histogram()));
                let workers = tokio::spawn(consume(
                    self.stream.clone(),
                    work.concurrency,
                    Arc::clone(&recorder),
                    async move {
                        let _ = rx.await;
                    },
                ));
                // Stop the workers however the producer ends (`tx` dropped on an error, too).
                let led = self.lead(work).await;
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
            stop,
        )
        .await?;
        consumed(&recorder, &report)
    }

    /// `stream_e2e`'s producer: publish `messages` events, `batch` per call, then wait until the group has
    /// drained. Its `seconds` run from the first publish to that moment.
    ///
    /// # Errors
    /// A failed publish or `group_info`; a group that makes no progress for [`DRAIN_PATIENCE`].
    pub(crate) async fn lead(&self, work: &Workload) -> anyhow::Result<Measured> {
        let (n, batch) = (work.messages, work.batch as u64);
        let first = Instant::now();
        let mut seq = 0u64;
        let mut calls = 0u64;
        while seq < n {
            let k = batch.min(n - seq);
            let now = wall_us();
            let events: Vec<Event> = (seq..seq + k)
                .map(|s| Event::sized(s, now, &self.padding))
                .collect();
            publish(&self.stream, &events)
                .await
                .with_context(|| format!("stream_e2e: cannot publish event {seq}"))?;
            seq += k;
            calls += 1;
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

/// Run one worker of [`GROUP`] with `concurrency` no-op handlers until `stop`; each handler records its
/// event's enqueue-to-handled latency.
async fn consume(
    stream: Stream<Event>,
    concurrency: usize,
    recorder: Recorder,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<WorkerReport> {
    let handler = move |m: Message<Event>| {
        let us = wall_us().saturating_sub(m.event.published_us).max(1);
        if let Ok(mut h) = recorder.lock() {
            h.saturating_record(us);
        }
        std::future::ready(Ok::<(), Infallible>(()))
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
        lost: report.lost,
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
        maxlen: Some(MAXLEN),
        published: Some(s.published),
        publish_calls: Some(s.publish_calls),
        ..ScenarioFields::default()
    };
    match kind {
        Kind::Produce => common,
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
            .stream(CLASS, class())
            .build()
            .unwrap();
        let class = policy.class(CLASS).unwrap().as_stream().unwrap();
        assert_eq!(class.retention_value().maxlen_value(), Some(MAXLEN));
    }
}
