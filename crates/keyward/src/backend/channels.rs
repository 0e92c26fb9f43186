//! The transport of typed channels (`crate::channel`): publish, and subscriptions that deliver each message
//! or a [`Delivery::Gap`] when messages may have been missed.
//!
//! On Redis, every subscription of a handle rides one **dedicated** connection (a [`RedisHub`]), opened at the
//! first `subscribe` and never shared with the calls requests make: a flood of messages cannot delay their
//! replies. A background task keeps it: it reconnects with backoff (to the master the sentinels name now,
//! behind Sentinel), subscribes every live channel again (`SSUBSCRIBE` on Cluster), and `PING`s it every
//! second, so a server that vanished without closing the socket is noticed within about a second plus the
//! response timeout. Each subscriber gets a `Gap` as soon as the connection is found lost, and again if it
//! fell more than its buffer behind, because Redis pub/sub keeps nothing for an absent subscriber.
//!
//! The embedded backend uses one `tokio::sync::broadcast` channel per name: the same messages, and a `Gap`
//! when a subscriber lagged — there the *oldest* undelivered messages are the ones dropped, and the `Gap`
//! comes where they were (a broadcast channel keeps the newest), where on Redis the newest are dropped and
//! the `Gap` follows the last message delivered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, broadcast, mpsc};

use super::redis::dedicated::{Dedicated, Dial};

/// How many undelivered messages a subscriber may hold before later ones are dropped (and a `Gap` follows).
pub(crate) const BUFFER: usize = 1024;

/// How often the dedicated connection is checked with `PING`.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What a subscription delivers.
#[derive(Debug)]
pub(crate) enum Delivery {
    Message(Bytes),
    /// Messages may have been missed (a disconnect, or the subscriber fell behind).
    Gap,
}

/// One subscriber's queue: [`BUFFER`] messages and one more slot that only a `Gap` may take. So a gap is
/// queued the moment a message is dropped (right after the last message delivered before it), even if the
/// publisher then goes quiet; and a full queue (capacity 0) always ends with a `Gap` already.
struct Subscriber {
    tx: mpsc::Sender<Delivery>,
}

impl Subscriber {
    fn deliver(&self, message: Bytes) {
        if self.tx.capacity() > 1 {
            let _ = self.tx.try_send(Delivery::Message(message));
        } else {
            // This message is dropped: the reserved slot says so (a no-op if a gap already took it).
            let _ = self.tx.try_send(Delivery::Gap);
        }
    }

    fn gap(&self) {
        // Full means the last queued item is a gap already (messages never take the reserved slot).
        let _ = self.tx.try_send(Delivery::Gap);
    }
}

#[derive(Default)]
struct Registry {
    next: u64,
    by_channel: HashMap<String, Vec<(u64, Arc<Subscriber>)>>,
}

/// A handle's typed-channel subscriptions on Redis, over one dedicated connection.
pub(crate) struct RedisHub {
    dial: Arc<Dial>,
    registry: Mutex<Registry>,
    /// The live connection, `None` while (re)connecting.
    conn: tokio::sync::Mutex<Option<Dedicated>>,
    /// Woken when the connection is found lost (a `Disconnection` push, a failed `PING` or subscribe).
    lost: Notify,
    /// Woken when the first subscriber arrives (the task connects only while someone listens).
    wanted: Notify,
    /// Woken (all waiters) each time a connection is made and every channel subscribed on it.
    connected: Notify,
    /// Bumped at each new connection: a `Disconnection` of an older one is ignored.
    generation: AtomicU64,
}

impl RedisHub {
    /// The hub, with its connection task (which ends once the hub is dropped).
    pub(crate) fn start(dial: Arc<Dial>) -> Arc<Self> {
        let hub = Arc::new(RedisHub {
            dial,
            registry: Mutex::new(Registry::default()),
            conn: tokio::sync::Mutex::new(None),
            lost: Notify::new(),
            wanted: Notify::new(),
            connected: Notify::new(),
            generation: AtomicU64::new(0),
        });
        tokio::spawn(run(Arc::downgrade(&hub)));
        hub
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channels(&self) -> Vec<String> {
        self.registry().by_channel.keys().cloned().collect()
    }

    /// Dispatch a push of the connection of `generation`.
    fn on_push(&self, generation: u64, push: PushInfo) {
        match push.kind {
            PushKind::Disconnection if self.generation.load(Ordering::Acquire) == generation => {
                self.lost.notify_one();
            }
            PushKind::Message | PushKind::SMessage => {
                if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (push.data.first(), push.data.get(1))
                {
                    let Ok(channel) = std::str::from_utf8(channel) else {
                        return;
                    };
                    let subscribers: Vec<Arc<Subscriber>> = self
                        .registry()
                        .by_channel
                        .get(channel)
                        .map(|v| v.iter().map(|(_, s)| Arc::clone(s)).collect())
                        .unwrap_or_default();
                    let payload = Bytes::copy_from_slice(payload);
                    for s in subscribers {
                        s.deliver(payload.clone());
                    }
                }
            }
            _ => {}
        }
    }

    fn gap_all(&self) {
        for list in self.registry().by_channel.values() {
            for (_, s) in list {
                s.gap();
            }
        }
    }

    /// Subscribe to `channel`, waiting up to the connect timeout for the dedicated connection if it is being
    /// made. The subscription is live when this returns `true`; otherwise it starts with a `Gap` and becomes
    /// live when the connection is (re)made.
    pub(crate) async fn subscribe(self: &Arc<Self>, channel: &str) -> (RedisSubscription, bool) {
        let (tx, rx) = mpsc::channel(BUFFER + 1);
        let subscriber = Arc::new(Subscriber { tx });
        let id = {
            let mut r = self.registry();
            r.next += 1;
            let id = r.next;
            r.by_channel
                .entry(channel.to_owned())
                .or_default()
                .push((id, Arc::clone(&subscriber)));
            id
        };
        self.wanted.notify_one();
        let timeout = self.dial.response_timeout();
        let deadline = tokio::time::Instant::now() + self.dial.connect_timeout();
        let live = loop {
            let connected = self.connected.notified();
            tokio::pin!(connected);
            connected.as_mut().enable();
            {
                let mut conn = self.conn.lock().await;
                if let Some(c) = conn.as_mut() {
                    break matches!(
                        tokio::time::timeout(timeout, c.subscribe(channel)).await,
                        Ok(Ok(()))
                    );
                }
            }
            if tokio::time::timeout_at(deadline, connected).await.is_err() {
                break false;
            }
        };
        if !live {
            subscriber.gap();
        }
        let sub = RedisSubscription {
            rx,
            hub: Arc::clone(self),
            channel: channel.to_owned(),
            id,
        };
        (sub, live)
    }

    /// Remove subscriber `id`; unsubscribe the channel when it was the last one.
    fn leave(self: &Arc<Self>, channel: &str, id: u64) {
        let last = {
            let mut r = self.registry();
            let Some(list) = r.by_channel.get_mut(channel) else {
                return;
            };
            list.retain(|(i, _)| *i != id);
            let empty = list.is_empty();
            if empty {
                r.by_channel.remove(channel);
            }
            empty
        };
        if last && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (hub, channel) = (Arc::clone(self), channel.to_owned());
            rt.spawn(async move {
                let mut conn = hub.conn.lock().await;
                // A subscriber that arrived meanwhile keeps the subscription.
                if hub.registry().by_channel.contains_key(&channel) {
                    return;
                }
                if let Some(c) = conn.as_mut() {
                    let _ =
                        tokio::time::timeout(hub.dial.response_timeout(), c.unsubscribe(&channel))
                            .await;
                }
            });
        }
    }
}

/// The hub's connection task: connect while someone listens, subscribe every channel, watch the connection,
/// and on loss tell every subscriber and start again.
async fn run(hub: Weak<RedisHub>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(h) = hub.upgrade() else { return };
        if h.registry().by_channel.is_empty() {
            if Arc::strong_count(&h) == 1 {
                return;
            }
            // Re-checked at least every heartbeat, so a dropped hub ends the task.
            let _ = tokio::time::timeout(HEARTBEAT, h.wanted.notified()).await;
            continue;
        }
        let generation = h.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let weak = Weak::clone(&hub);
        let push = move |p: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
            if let Some(h) = weak.upgrade() {
                h.on_push(generation, p);
            }
            Ok(())
        };
        let opened = h.dial.open(push).await;
        let timeout = h.dial.response_timeout();
        let mut conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "keyward: channel connection failed; retrying");
                drop(h);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // Subscribe every channel with the connection held, so a concurrent `subscribe` waits for it.
        let ok = {
            let mut slot = h.conn.lock().await;
            let mut ok = true;
            for channel in h.channels() {
                if !matches!(
                    tokio::time::timeout(timeout, conn.subscribe(&channel)).await,
                    Ok(Ok(()))
                ) {
                    ok = false;
                    break;
                }
            }
            if ok {
                *slot = Some(conn.clone());
            }
            ok
        };
        if ok {
            h.connected.notify_waiters();
        }
        if !ok {
            drop(h);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        backoff = Duration::from_millis(50);
        // Watch it: a Disconnection push, or a PING that gets no answer.
        loop {
            let lost = h.lost.notified();
            tokio::select! {
                () = lost => break,
                () = tokio::time::sleep(HEARTBEAT) => {}
            }
            if !matches!(tokio::time::timeout(timeout, conn.ping()).await, Ok(Ok(()))) {
                break;
            }
            if Arc::strong_count(&h) == 1 {
                // Nobody holds the hub but this task: the handle and every subscription are gone.
                return;
            }
            if h.registry().by_channel.is_empty() {
                // Nobody listens any more: close the connection until someone does.
                break;
            }
        }
        *h.conn.lock().await = None;
        h.generation.fetch_add(1, Ordering::AcqRel);
        if !h.registry().by_channel.is_empty() {
            h.gap_all();
            tracing::debug!("keyward: channel connection lost; reconnecting");
        }
    }
}

/// A subscription on the Redis hub; dropping it unsubscribes (the channel, once its last one is gone).
pub(crate) struct RedisSubscription {
    rx: mpsc::Receiver<Delivery>,
    hub: Arc<RedisHub>,
    channel: String,
    id: u64,
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.hub.leave(&self.channel, self.id);
    }
}

/// The embedded backend's channels: one broadcast channel per name.
#[derive(Default)]
pub(crate) struct LocalHub {
    channels: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
}

impl LocalHub {
    fn sender(&self, channel: &str) -> broadcast::Sender<Bytes> {
        let mut c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        // Channels nobody listens to any more are forgotten (bounded by the live subscriptions).
        c.retain(|_, s| s.receiver_count() > 0);
        c.entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(BUFFER).0)
            .clone()
    }

    /// Deliver `message` to every subscriber of `channel`; how many there were.
    pub(crate) fn publish(&self, channel: &str, message: Bytes) -> u64 {
        let c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        c.get(channel)
            .and_then(|s| s.send(message).ok())
            .map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX))
    }

    pub(crate) fn subscribe(&self, channel: &str) -> broadcast::Receiver<Bytes> {
        self.sender(channel).subscribe()
    }
}

/// A subscription on either backend.
pub(crate) enum Subscription {
    Redis(RedisSubscription),
    Local(broadcast::Receiver<Bytes>),
}

impl Subscription {
    /// The next delivery; `None` only when the subscription can deliver nothing more.
    pub(crate) async fn recv(&mut self) -> Option<Delivery> {
        match self {
            Subscription::Redis(s) => s.rx.recv().await,
            Subscription::Local(rx) => match rx.recv().await {
                Ok(m) => Some(Delivery::Message(m)),
                Err(broadcast::error::RecvError::Lagged(_)) => Some(Delivery::Gap),
                Err(broadcast::error::RecvError::Closed) => None,
            },
        }
    }
}
