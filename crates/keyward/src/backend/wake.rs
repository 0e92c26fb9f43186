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
    /// The in-process cache tier's backplane, fed by the same subscription (`cache::l1`).
    pub(crate) backplane: Arc<crate::cache::l1::Hub>,
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

    pub(crate) fn wake_all(&self) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (n, _) in map.values() {
            n.notify_waiters();
        }
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
