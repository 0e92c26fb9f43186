//! Wake-ups for callers waiting on another caller's fill lease.
//!
//! A waiter registers its interest *before* it asks the backend, so a fill that commits between the answer
//! "someone holds the lease" and the wait cannot be missed. The Redis backend feeds this bus from a pub/sub
//! subscription (the commit script publishes only when the lease marker says someone waits); the embedded
//! backend calls it directly. When the subscription connection drops, every waiter is woken to re-check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct WakeBus {
    // key -> (notify, number of live listeners). A std mutex: never held across an await.
    map: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    /// Where the in-process cache tier's backplane messages go (`cache::l1`), fed by the same subscription.
    backplane: std::sync::OnceLock<Arc<dyn BackplaneSink>>,
    /// Backplane pushes received before the receiver was set (it is created on first use), replayed to it
    /// in order, so that it sees every message since the subscription began; `true` once some were dropped.
    early: Mutex<(std::collections::VecDeque<Push>, bool)>,
}

/// The most backplane pushes kept for a receiver that does not exist yet.
const EARLY_PUSHES: usize = 256;

/// A push on the backplane channel.
#[derive(Debug, Clone)]
pub(crate) enum Push {
    Message(bytes::Bytes),
    Disconnected,
}

/// The receiving end of the backplane channel (the cache's in-process tier; see `cache::l1`). Called from the
/// subscription's push callback: must not block.
pub(crate) trait BackplaneSink: Send + Sync {
    /// A message arrived on the backplane channel.
    fn message(&self, payload: bytes::Bytes);
    /// The subscription was dropped: messages may have been missed.
    fn disconnected(&self);
}

/// A registration; dropping it unregisters.
pub(crate) struct Listener {
    bus: Arc<WakeBus>,
    key: String,
    notify: Arc<Notify>,
}

impl WakeBus {
    pub(crate) fn listen(self: &Arc<Self>, key: &str) -> Listener {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Listener {
            bus: Arc::clone(self),
            key: key.to_owned(),
            notify: Arc::clone(&entry.0),
        }
    }

    pub(crate) fn wake(&self, key: &str) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = map.get(key) {
            n.notify_waiters();
        }
    }

    /// Route backplane pushes to `sink` (once per handle; later calls are ignored), first replaying those that
    /// arrived before it.
    pub(crate) fn set_backplane(&self, sink: Arc<dyn BackplaneSink>) {
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        if self.backplane.set(Arc::clone(&sink)).is_err() {
            return;
        }
        if std::mem::take(&mut early.1) {
            sink.disconnected();
        }
        for push in early.0.drain(..) {
            deliver(&*sink, push);
        }
    }

    /// A push on the backplane channel: to the receiver, or kept for it.
    pub(crate) fn backplane_push(&self, push: Push) {
        if let Some(sink) = self.backplane.get() {
            return deliver(&**sink, push);
        }
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        // Set meanwhile (under this lock, after replaying): deliver in order.
        if let Some(sink) = self.backplane.get() {
            return deliver(&**sink, push);
        }
        if early.0.len() >= EARLY_PUSHES {
            early.0.pop_front();
            early.1 = true;
        }
        early.0.push_back(push);
    }

    pub(crate) fn wake_all(&self) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (n, _) in map.values() {
            n.notify_waiters();
        }
    }
}

fn deliver(sink: &dyn BackplaneSink, push: Push) {
    match push {
        Push::Message(m) => sink.message(m),
        Push::Disconnected => sink.disconnected(),
    }
}

impl Listener {
    /// The registration's `Notify`, to create waits that do not borrow the listener.
    pub(crate) fn shared(&self) -> Arc<Notify> {
        Arc::clone(&self.notify)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut map = self.bus.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wake_before_wait_is_not_lost() {
        let bus = Arc::new(WakeBus::default());
        let l = bus.listen("k");
        {
            let notify = l.shared();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            bus.wake("k"); // arrives before we start waiting
            tokio::time::timeout(Duration::from_secs(5), notified)
                .await
                .expect("enabled listener sees an earlier wake");
        }
        drop(l);
        assert!(bus.map.lock().unwrap().is_empty());
    }
}
