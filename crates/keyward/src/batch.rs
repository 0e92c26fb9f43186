//! Auto-batching of concurrent calls to one resource: calls that are waiting at the same moment go to the
//! server as **one** request (one script call, one pipeline), and each caller gets its own answer back.
//! Streams use it for `publish` (one `publish` round trip carries every message queued for a stream), rate
//! limits for checks (one script call decides every check queued on a handle).
//!
//! **The one decision: never wait for more work.** A [`Batcher`] has at most `max_in_flight` requests in
//! flight (one, unless its user chose more). A call that finds fewer in flight starts one at once with what
//! is queued (usually just itself), so a lone caller's latency does not grow by a timer or a batch size.
//! Calls that arrive while the requests are in flight queue up; when one finishes, everything queued then
//! (up to `max_weight`) becomes the next request. With two in flight, the client prepares and sends one
//! batch while the server runs the other, instead of the two taking turns. Under
//! load, batches grow by themselves to what arrives during one round trip. Between two requests the drive
//! yields once to the scheduler, so that callers it just answered, who are runnable already, can queue
//! their next call into the next request rather than the one after (without it, concurrent callers split
//! into two cohorts that take turns); a yield is not a timer, and nothing waits for calls not yet made.
//!
//! How it is built, and why it cannot lose a caller:
//! - The queue and the count of running drives sit under one `std` mutex (held for a few pointer moves,
//!   never across an `.await`). A drive that ends leaves the count under the same lock in which it found
//!   the queue empty, and a call that queues looks at the count (and starts a drive below the limit) under
//!   the lock in which it pushed; so there is no moment at which a call is queued and no drive will take
//!   it (no lost wake-up).
//! - The requests are made by a spawned drive task, not by a caller's future: a caller whose future is
//!   dropped (a timeout, a `select!`) never takes its batch-mates down with it. A caller dropped before its
//!   batch was taken is skipped (its item is not sent); one dropped later may have been sent (as any request
//!   whose answer nobody waited for), and its answer is discarded.
//! - If the flush panics (a bug) or the runtime shuts down mid-request, a guard clears the flag and drops
//!   the queued callers' reply channels: every waiting caller gets [`Abandoned`], none waits forever.
//!
//! Order: items are flushed in the order their calls queued, and one flush receives them in that order;
//! the flush returns one output per item, in the same order.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::backend::slot_of;

/// A [`Batcher`] with the lone caller's shortcut: the only call in flight is made by its caller, without the
/// hop to a drive task, so that a lone caller's latency is one plain round trip; a call that meets others goes
/// through the batcher. Rate-limit checks use one per handle.
pub(crate) struct Lane<I, O> {
    batcher: Arc<Batcher<I, O>>,
    /// Set while a call runs alone (outside the batcher), so that a second concurrent call batches.
    alone: AtomicBool,
}

/// Held by the caller that runs alone ([`Lane::alone`]); clears the flag when its call ends (or its future is
/// dropped).
pub(crate) struct Alone<'a>(&'a AtomicBool);

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<I, O> Lane<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// A lane whose batches are as [`Batcher::new`]'s.
    pub(crate) fn new(max_weight: usize, max_in_flight: usize) -> Self {
        Lane {
            batcher: Arc::new(Batcher::new(max_weight, max_in_flight)),
            alone: AtomicBool::new(false),
        }
    }

    /// `Some` when nothing else is in flight: the caller makes its call itself, holding the guard.
    pub(crate) fn alone(&self) -> Option<Alone<'_>> {
        (self.batcher.is_idle() && !self.alone.swap(true, Ordering::AcqRel))
            .then_some(Alone(&self.alone))
    }

    /// The batcher, for a call that meets others.
    pub(crate) fn batcher(&self) -> &Arc<Batcher<I, O>> {
        &self.batcher
    }
}

impl<I, O> std::fmt::Debug for Lane<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("batcher", &self.batcher)
            .field("alone", &self.alone.load(Ordering::Relaxed))
            .finish()
    }
}

/// An item's answer that comes after its batch's flush returned: [`per_slot`] answers each item when the call
/// that carries it ends. A batcher whose outputs are `Pending` is waited on with
/// [`Batcher::submit_pending_within`].
pub(crate) type Pending<O> = oneshot::Receiver<O>;

/// One batch's calls on Redis, each answering its own items when it ends. On a single server (`cluster`
/// false) one call, awaited: the batch's drive makes it, so a batcher keeps at most `max_in_flight` calls in
/// flight. On Cluster one call per slot of `key(item)` (a script's keys must share a slot), keeping the
/// queue's order within a slot, each in a task of its own: the drive goes on with the next batch at once,
/// and a stalled master holds back only the items of its own slots, never those of another master (as a lone
/// call never did). `call` must answer each item of its group, in order; an item it leaves unanswered (and
/// those after it in its group) gets [`Abandoned`], so that no caller ever gets another's answer. Returns one
/// [`Pending`] per item, in the items' order.
///
/// Needs a tokio runtime on Cluster (the calls are spawned tasks).
pub(crate) async fn per_slot<I, O, K, F, Fut>(
    cluster: bool,
    items: Vec<I>,
    key: K,
    call: F,
) -> Vec<Pending<O>>
where
    O: Send + 'static,
    K: Fn(&I) -> &[u8],
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Vec<O>> + Send + 'static,
{
    let (answers, pending): (Vec<_>, Vec<_>) = items.iter().map(|_| oneshot::channel()).unzip();
    if !cluster {
        answer(call(items).await, answers);
        return pending;
    }
    let mut slots: Vec<(u16, Vec<I>, Vec<oneshot::Sender<O>>)> = Vec::new();
    for (item, to) in items.into_iter().zip(answers) {
        let slot = slot_of(key(&item));
        match slots.iter_mut().find(|(s, ..)| *s == slot) {
            Some((_, group, tos)) => {
                group.push(item);
                tos.push(to);
            }
            None => slots.push((slot, vec![item], vec![to])),
        }
    }
    for (_, group, to) in slots {
        let made = call(group);
        tokio::spawn(async move { answer(made.await, to) });
    }
    pending
}

/// Send each caller its answer, in order; a caller left without one gets [`Abandoned`] (its sender dropped).
fn answer<O>(answers: Vec<O>, to: Vec<oneshot::Sender<O>>) {
    for (to, a) in to.into_iter().zip(answers) {
        // The caller may have gone (its future dropped): its answer is discarded.
        let _ = to.send(a);
    }
}

/// A caller's item that was queued but never answered: its batch's flush panicked, returned fewer outputs
/// than items, or the runtime shut down while the batch was in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Abandoned;

/// Why [`Batcher::submit_within`] (or [`Batcher::submit_pending_within`]) ended without an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// As [`Abandoned`].
    Abandoned,
    /// The limit passed first (the item may still be sent, as after any timeout).
    TimedOut,
}

/// Batches concurrent calls for one resource (one stream, one key): see the module docs. Share it behind an
/// `Arc`; one per resource whose calls are worth merging.
pub(crate) struct Batcher<I, O> {
    state: Mutex<State<I, O>>,
    /// The most weight (e.g. messages) one flush takes; a single heavier item still goes alone.
    max_weight: usize,
    /// The most flushes in flight at once (each made by its own drive task).
    max_in_flight: usize,
}

struct State<I, O> {
    queue: VecDeque<Job<I, O>>,
    /// Drive tasks running (each looks at the queue again before it ends); at most `max_in_flight`.
    drives: usize,
}

struct Job<I, O> {
    item: I,
    weight: usize,
    reply: oneshot::Sender<O>,
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Batcher")
            .field("queued", &st.queue.len())
            .field("drives", &st.drives)
            .field("max_weight", &self.max_weight)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl<I, O> Batcher<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// A batcher whose flushes take at most `max_weight` (at least 1) of queued weight each, with at most
    /// `max_in_flight` (at least 1) flushes in flight at once.
    pub(crate) fn new(max_weight: usize, max_in_flight: usize) -> Self {
        Batcher {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                drives: 0,
            }),
            max_weight: max_weight.max(1),
            max_in_flight: max_in_flight.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<I, O>> {
        // The lock guards plain data that no code path leaves half-updated; a panic elsewhere while it
        // was held cannot make it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no flush is in flight and nothing is queued at this moment (a hint: a caller that finds the
    /// batcher idle may do its one request itself, saving the hop to a drive task).
    pub(crate) fn is_idle(&self) -> bool {
        let st = self.lock();
        st.drives == 0 && st.queue.is_empty()
    }

    /// Queue `item` (counting `weight` against `max_weight`) and wait for its output. If fewer than
    /// `max_in_flight` flushes are in flight, one starts at once with `flush`; otherwise the item goes with
    /// the next batch. `flush` gets
    /// the batch's items in queue order and must return one output per item, in that order; the flush of
    /// the call that started a drive serves every batch of that drive, so all callers of one batcher must
    /// pass equivalent flushes.
    ///
    /// Needs a tokio runtime (the drive is a spawned task).
    ///
    /// # Errors
    /// [`Abandoned`] if the item's batch never answered it (see [`Abandoned`]).
    pub(crate) async fn submit<F, Fut>(
        self: &Arc<Self>,
        item: I,
        weight: usize,
        flush: F,
    ) -> Result<O, Abandoned>
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut st = self.lock();
            st.queue.push_back(Job {
                item,
                weight,
                reply,
            });
            let start = st.drives < self.max_in_flight;
            if start {
                st.drives += 1;
            }
            start
        };
        if start {
            tokio::spawn(Arc::clone(self).drive(flush));
        }
        answer.await.map_err(|_| Abandoned)
    }

    /// [`submit`](Self::submit), the whole wait bounded by `limit` (none: unbounded): an item queued behind
    /// calls to a hung server does not wait for them *and* its own call. An item given up on may still be
    /// sent with its batch.
    ///
    /// # Errors
    /// [`Unanswered::TimedOut`] when `limit` passed first; [`Unanswered::Abandoned`] as `submit`'s error.
    pub(crate) async fn submit_within<F, Fut>(
        self: &Arc<Self>,
        item: I,
        weight: usize,
        flush: F,
        limit: Option<std::time::Duration>,
    ) -> Result<O, Unanswered>
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        within(limit, async {
            self.submit(item, weight, flush)
                .await
                .map_err(|Abandoned| Unanswered::Abandoned)
        })
        .await
    }

    /// Flush batches until the queue is empty, then leave `drives` (in the same critical section).
    ///
    /// The guard that leaves `drives` if the drive ends otherwise is made here, when the task is spawned, not
    /// at its first poll: a task dropped before it ever ran (its runtime shut down first, say a second
    /// runtime the handle was used from) must leave `drives` too, or the batcher would count it in flight
    /// for ever, and once `max_in_flight` had gone so, no drive would ever take a queued item again.
    fn drive<F, Fut>(self: Arc<Self>, mut flush: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let mut guard = Unwind {
            batcher: self,
            armed: true,
            in_flight: Vec::new(),
        };
        async move {
            let this = Arc::clone(&guard.batcher);
            loop {
                let batch = {
                    let mut st = this.lock();
                    let batch = this.take(&mut st);
                    if batch.is_empty() {
                        st.drives -= 1;
                        guard.disarm();
                        return;
                    }
                    batch
                };
                let items: Vec<I>;
                (items, guard.in_flight) = batch.into_iter().map(|j| (j.item, j.reply)).unzip();
                let outputs = flush(items).await;
                // A missing output drops its reply channel: that caller gets `Abandoned`.
                for (reply, output) in std::mem::take(&mut guard.in_flight)
                    .into_iter()
                    .zip(outputs)
                {
                    // The caller may have gone (its future dropped): its output is discarded.
                    let _ = reply.send(output);
                }
                // Let the callers just answered (runnable now) queue their next call before the next batch is
                // taken: one cooperative yield, no timer, so nothing waits for calls not yet made.
                tokio::task::yield_now().await;
            }
        }
    }

    /// The next batch: queued jobs in order, skipping those whose caller has gone, up to `max_weight`
    /// (at least one job).
    fn take(&self, st: &mut State<I, O>) -> Vec<Job<I, O>> {
        let mut batch = Vec::new();
        let mut weight = 0usize;
        while let Some(job) = st.queue.front() {
            if job.reply.is_closed() {
                st.queue.pop_front();
                continue;
            }
            if !batch.is_empty() && weight.saturating_add(job.weight) > self.max_weight {
                break;
            }
            weight = weight.saturating_add(job.weight);
            batch.extend(st.queue.pop_front());
        }
        batch
    }
}

impl<I, O> Batcher<I, Pending<O>>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// [`submit_within`](Self::submit_within) for a batcher whose flush answers through [`Pending`]s (see
    /// [`per_slot`]): waits for the item's batch, then for the call that carries it, the whole wait bounded
    /// by `limit` (none: unbounded).
    ///
    /// # Errors
    /// As `submit_within`'s; [`Unanswered::Abandoned`] also when the item's call never answered it.
    pub(crate) async fn submit_pending_within<F, Fut>(
        self: &Arc<Self>,
        item: I,
        weight: usize,
        flush: F,
        limit: Option<std::time::Duration>,
    ) -> Result<O, Unanswered>
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Pending<O>>> + Send + 'static,
    {
        within(limit, async {
            let pending = self
                .submit(item, weight, flush)
                .await
                .map_err(|Abandoned| Unanswered::Abandoned)?;
            pending.await.map_err(|_| Unanswered::Abandoned)
        })
        .await
    }
}

/// `answer`, given up as [`Unanswered::TimedOut`] once `limit` passes (none: unbounded).
async fn within<T>(
    limit: Option<std::time::Duration>,
    answer: impl Future<Output = Result<T, Unanswered>>,
) -> Result<T, Unanswered> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, answer)
            .await
            .unwrap_or(Err(Unanswered::TimedOut)),
        None => answer.await,
    }
}

/// Armed while a drive runs, and holding the reply channels of the batch in flight: if the drive is dropped
/// before it ends normally (its flush panicked, or the runtime shut down, also before the drive's first poll),
/// it leaves `drives` (and, if it
/// was the last drive, takes the queue: no drive is left to serve it) first, then the in-flight and those
/// queued callers' channels are dropped (each gets [`Abandoned`]). In that order, so that a caller who
/// retries at once starts a new drive instead of queueing behind one that will never come.
struct Unwind<I, O> {
    batcher: Arc<Batcher<I, O>>,
    armed: bool,
    in_flight: Vec<oneshot::Sender<O>>,
}

impl<I, O> Unwind<I, O> {
    /// The drive ended normally (it left `drives` itself).
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<I, O> Drop for Unwind<I, O> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let queued = {
            let mut st = self.batcher.state.lock().unwrap_or_else(|p| p.into_inner());
            st.drives -= 1;
            if st.drives == 0 {
                std::mem::take(&mut st.queue)
            } else {
                VecDeque::new()
            }
        };
        drop(queued);
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A flush that records each batch and answers every item with itself times ten.
    fn recording(
        log: Arc<Mutex<Vec<Vec<u32>>>>,
    ) -> impl FnMut(Vec<u32>) -> std::future::Ready<Vec<u32>> + Send + 'static {
        move |items: Vec<u32>| {
            log.lock().unwrap().push(items.clone());
            std::future::ready(items.into_iter().map(|i| i * 10).collect())
        }
    }

    /// The whole wait is bounded: an item queued behind a flush that never ends times out at the limit,
    /// and without a limit the same item is answered once the flush does end.
    #[tokio::test(start_paused = true)]
    async fn a_bounded_wait_ends_at_its_limit() {
        let b = Arc::new(Batcher::new(100, 1));
        let release = Arc::new(Notify::new());
        let stuck = {
            let (b, release) = (Arc::clone(&b), Arc::clone(&release));
            let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
            tokio::spawn(async move {
                // Only the first batch hangs; the drive serves the next ones with this flush too.
                b.submit(1, 1, move |items: Vec<u32>| {
                    let (release, first) = (Arc::clone(&release), Arc::clone(&first));
                    async move {
                        if first.swap(false, Ordering::SeqCst) {
                            release.notified().await;
                        }
                        items
                    }
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let queued = b
            .submit_within(
                2,
                1,
                recording(Arc::default()),
                Some(Duration::from_millis(50)),
            )
            .await;
        assert_eq!(queued, Err(Unanswered::TimedOut));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let unbounded = {
            let b = Arc::clone(&b);
            tokio::spawn(
                async move { b.submit_within(3, 1, recording(Arc::default()), None).await },
            )
        };
        tokio::task::yield_now().await;
        release.notify_one();
        assert_eq!(stuck.await.unwrap(), Ok(1));
        // The drive that started with the stuck flush serves the next batch with that flush (items as is).
        assert_eq!(unbounded.await.unwrap(), Ok(3));
    }

    #[tokio::test]
    async fn a_lone_call_is_flushed_at_once_and_alone() {
        let b = Arc::new(Batcher::new(100, 1));
        let log = Arc::new(Mutex::new(Vec::new()));
        assert_eq!(b.submit(7, 1, recording(Arc::clone(&log))).await, Ok(70));
        assert_eq!(b.submit(8, 1, recording(Arc::clone(&log))).await, Ok(80));
        assert_eq!(*log.lock().unwrap(), [vec![7], vec![8]]);
    }

    /// A flush that blocks until `gate` is notified, then answers like `recording`.
    fn gated(
        log: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<Notify>,
    ) -> impl FnMut(Vec<u32>) -> std::pin::Pin<Box<dyn Future<Output = Vec<u32>> + Send>> + Send + 'static
    {
        move |items: Vec<u32>| {
            let (log, gate) = (Arc::clone(&log), Arc::clone(&gate));
            Box::pin(async move {
                log.lock().unwrap().push(items.clone());
                gate.notified().await;
                items.into_iter().map(|i| i * 10).collect()
            })
        }
    }

    /// On one server, `per_slot` makes one call with the whole batch and returns once it ended, every item
    /// answered (so a batcher's drive keeps its calls in flight bounded).
    #[tokio::test]
    async fn per_slot_on_one_server_is_one_awaited_call() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&calls);
        let pending = per_slot(
            false,
            vec!["{a}1", "{b}1", "{a}2"],
            |k: &&str| k.as_bytes(),
            move |group: Vec<&'static str>| {
                log.lock().unwrap().push(group.clone());
                std::future::ready(group.into_iter().map(str::len).collect::<Vec<_>>())
            },
        )
        .await;
        assert_eq!(*calls.lock().unwrap(), [vec!["{a}1", "{b}1", "{a}2"]]);
        let answers: Vec<_> = pending.into_iter().map(|mut p| p.try_recv()).collect();
        assert_eq!(answers, [Ok(4), Ok(4), Ok(4)]);
    }

    /// On Cluster, `per_slot` returns at once with one call per slot (in queue order within a slot) under
    /// way, and each call answers its own items when it ends: a hung slot holds back no other slot's items.
    /// An item its call leaves unanswered is abandoned, not given another's answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_slot_on_cluster_answers_each_slot_when_its_call_ends() {
        assert_ne!(slot_of(b"{a}"), slot_of(b"{b}"));
        let gate = Arc::new(Notify::new());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (log, hang) = (Arc::clone(&calls), Arc::clone(&gate));
        let pending = per_slot(
            true,
            vec!["{a}1", "{b}1", "{a}2", "{c}1"],
            |k: &&str| k.as_bytes(),
            move |group: Vec<&'static str>| {
                log.lock().unwrap().push(group.clone());
                let hang = Arc::clone(&hang);
                Box::pin(async move {
                    if group[0].starts_with("{a}") {
                        hang.notified().await;
                    }
                    if group[0].starts_with("{c}") {
                        return Vec::new(); // a short answer
                    }
                    group.into_iter().map(str::to_owned).collect()
                }) as std::pin::Pin<Box<dyn Future<Output = Vec<String>> + Send>>
            },
        )
        .await;
        assert_eq!(
            *calls.lock().unwrap(),
            [vec!["{a}1", "{a}2"], vec!["{b}1"], vec!["{c}1"]]
        );
        let mut pending = pending.into_iter();
        let (a1, b1, a2, c1) = (
            pending.next().unwrap(),
            pending.next().unwrap(),
            pending.next().unwrap(),
            pending.next().unwrap(),
        );
        assert_eq!(b1.await.as_deref(), Ok("{b}1"));
        assert!(c1.await.is_err(), "an unanswered item is abandoned");
        gate.notify_one();
        assert_eq!(a1.await.as_deref(), Ok("{a}1"));
        assert_eq!(a2.await.as_deref(), Ok("{a}2"));
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_queued_during_a_flush_go_as_one_batch_in_order() {
        let b = Arc::new(Batcher::new(100, 1));
        let log = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let first = tokio::spawn({
            let (b, f) = (Arc::clone(&b), gated(Arc::clone(&log), Arc::clone(&gate)));
            async move { b.submit(0, 1, f).await }
        });
        until("the first flush", || log.lock().unwrap().len() == 1).await;
        // Queued one by one while the first flush is in flight.
        let mut rest = Vec::new();
        for i in 1..=5u32 {
            let (b2, f) = (Arc::clone(&b), gated(Arc::clone(&log), Arc::clone(&gate)));
            rest.push(tokio::spawn(async move { b2.submit(i, 1, f).await }));
            until("the call to queue", || b.lock().queue.len() == i as usize).await;
        }
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Ok(0));
        until("the second flush", || log.lock().unwrap().len() == 2).await;
        gate.notify_one();
        for (i, h) in (1u32..).zip(rest) {
            assert_eq!(h.await.unwrap(), Ok(i * 10));
        }
        assert_eq!(*log.lock().unwrap(), [vec![0], vec![1, 2, 3, 4, 5]]);
        until("the drive to end", || b.lock().drives == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_weight_splits_batches_but_a_heavy_item_still_goes() {
        let b = Arc::new(Batcher::new(3, 1));
        let log = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let mut calls = Vec::new();
        let spawn = |i: u32, w: usize| {
            let (b, f) = (Arc::clone(&b), gated(Arc::clone(&log), Arc::clone(&gate)));
            tokio::spawn(async move { b.submit(i, w, f).await })
        };
        calls.push(spawn(0, 1));
        until("the first flush", || log.lock().unwrap().len() == 1).await;
        for (n, (i, w)) in [(1, 2), (2, 1), (3, 5), (4, 1)].into_iter().enumerate() {
            calls.push(spawn(i, w));
            until("the call to queue", || b.lock().queue.len() == n + 1).await;
        }
        for flushes in 1..=4 {
            until("a flush", || log.lock().unwrap().len() == flushes).await;
            gate.notify_one();
        }
        for (i, h) in (0u32..).zip(calls) {
            assert_eq!(h.await.unwrap(), Ok(i * 10));
        }
        assert_eq!(
            *log.lock().unwrap(),
            [vec![0], vec![1, 2], vec![3], vec![4]]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_caller_neither_blocks_nor_loses_the_others() {
        let b = Arc::new(Batcher::new(100, 1));
        let log = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let spawn = |i: u32| {
            let (b, f) = (Arc::clone(&b), gated(Arc::clone(&log), Arc::clone(&gate)));
            tokio::spawn(async move { b.submit(i, 1, f).await })
        };
        // The caller that started the drive is dropped mid-flush: its batch-mates are still answered.
        let first = spawn(0);
        until("the first flush", || log.lock().unwrap().len() == 1).await;
        let queued_then_dropped = spawn(1);
        until("the call to queue", || b.lock().queue.len() == 1).await;
        let kept = spawn(2);
        until("the call to queue", || b.lock().queue.len() == 2).await;
        first.abort();
        queued_then_dropped.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert!(queued_then_dropped.await.unwrap_err().is_cancelled());
        gate.notify_one();
        // The dropped, still-queued caller is skipped: the next batch is [2] alone.
        until("the second flush", || log.lock().unwrap().len() == 2).await;
        gate.notify_one();
        assert_eq!(kept.await.unwrap(), Ok(20));
        assert_eq!(*log.lock().unwrap(), [vec![0], vec![2]]);
        // And the batcher still works.
        let again = spawn(3);
        until("the third flush", || log.lock().unwrap().len() == 3).await;
        gate.notify_one();
        assert_eq!(again.await.unwrap(), Ok(30));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_two_in_flight_a_second_caller_does_not_wait_for_the_first() {
        let b = Arc::new(Batcher::new(100, 2));
        let log = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let spawn = |i: u32| {
            let (b, f) = (Arc::clone(&b), gated(Arc::clone(&log), Arc::clone(&gate)));
            tokio::spawn(async move { b.submit(i, 1, f).await })
        };
        let first = spawn(0);
        until("the first flush", || log.lock().unwrap().len() == 1).await;
        let second = spawn(1);
        until("the second flush, while the first is held", || {
            log.lock().unwrap().len() == 2
        })
        .await;
        let third = spawn(2);
        until("the third call to queue", || b.lock().queue.len() == 1).await;
        assert_eq!(b.lock().drives, 2);
        gate.notify_one();
        gate.notify_one();
        until("the third flush", || log.lock().unwrap().len() == 3).await;
        gate.notify_one();
        for (i, h) in (0u32..).zip([first, second, third]) {
            assert_eq!(h.await.unwrap(), Ok(i * 10));
        }
        until("the drives to end", || b.lock().drives == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_flush_abandons_its_callers_and_the_next_call_starts_afresh() {
        let b = Arc::new(Batcher::<u32, u32>::new(100, 1));
        let err = b
            .submit(1, 1, |_items: Vec<u32>| async { panic!("flush bug") })
            .await;
        assert_eq!(err, Err(Abandoned));
        assert_eq!(b.lock().drives, 0);
        let log = Arc::new(Mutex::new(Vec::new()));
        assert_eq!(b.submit(2, 1, recording(Arc::clone(&log))).await, Ok(20));
    }

    #[tokio::test]
    async fn a_short_answer_abandons_only_the_unanswered() {
        let b = Arc::new(Batcher::<u32, u32>::new(100, 1));
        let answered = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&answered);
        let got = b
            .submit(1, 1, move |_items: Vec<u32>| {
                a.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Vec::new())
            })
            .await;
        assert_eq!(got, Err(Abandoned));
        assert_eq!(answered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_callers_each_get_their_own_answer() {
        let b = Arc::new(Batcher::new(16, 2));
        let flushes = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..32u32 {
            let (b, flushes) = (Arc::clone(&b), Arc::clone(&flushes));
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let item = t * 1000 + i;
                    let f = Arc::clone(&flushes);
                    let out = b
                        .submit(item, 1, move |items: Vec<u32>| {
                            f.fetch_add(1, Ordering::SeqCst);
                            async move {
                                tokio::task::yield_now().await;
                                items.into_iter().map(|i| i + 1).collect::<Vec<_>>()
                            }
                        })
                        .await;
                    assert_eq!(out, Ok(item + 1));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let flushes = flushes.load(Ordering::SeqCst);
        assert!(flushes <= 32 * 200, "{flushes}");
        // A drive leaves after its last answer (it yields, then finds the queue empty).
        until("the drives to end", || b.lock().drives == 0).await;
        assert!(b.lock().queue.is_empty());
    }
}
