//! In-process single-flight: one fetch per key per process; everyone else waits for its outcome.
//!
//! The leader runs the fetch in its own task (no `'static` loader needed). If the leader is dropped before it
//! finishes (its caller was cancelled), its followers see the channel close and one of them leads a new flight,
//! with its own loader. Outcomes carry encoded bytes, so followers of any `Cache<V>` type can share one flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::error::Error;

/// What a flight hands to its followers.
#[derive(Debug, Clone)]
pub(crate) enum Shared {
    /// An encoded value.
    Value(Bytes),
    /// A cached "absent".
    Negative,
    /// The leader's fill was refused (an invalidation voided its lease): followers must fetch again, so that a
    /// caller who joined after the invalidation never receives data loaded before it.
    Retry,
}

pub(crate) type Outcome = Result<Shared, Error>;
type Slot = watch::Receiver<Option<Outcome>>;

/// The flights' table hasher: foldhash (randomly seeded), as the in-process tier's; a miss pays a lookup here
/// when it joins and when it completes.
type Hasher = foldhash::fast::RandomState;

/// A flight in the table: its id, its outcome's slot, and when it started.
type Flight = (u64, Slot, tokio::time::Instant);

#[derive(Default)]
pub(crate) struct Flights {
    // A std mutex: held only for a map operation, never across an await. The key is shared with the flight's
    // leader (one allocation per flight).
    map: Mutex<HashMap<Arc<str>, Flight, Hasher>>,
    next_id: std::sync::atomic::AtomicU64,
}

pub(crate) enum Role {
    Leader(Leader),
    Follower(Slot),
}

pub(crate) struct Leader {
    flights: Arc<Flights>,
    key: Arc<str>,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
    /// Set by [`Leader::complete`], which has retired the flight already: dropping it then has nothing to do.
    retired: bool,
}

impl Flights {
    #[cfg(test)]
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Role {
        self.join_younger_than(key, None)
    }

    /// [`join`](Self::join), but a flight that started `max_age` ago or earlier is not joined: this caller
    /// leads a new one (the old leader still answers its own followers). On Redis Cluster, where group
    /// invalidations reach a handle within a bound, this keeps a caller from receiving the outcome of a
    /// fetch made before an invalidation it must see.
    pub(crate) fn join_younger_than(
        self: &Arc<Self>,
        key: &str,
        max_age: Option<std::time::Duration>,
    ) -> Role {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx, started)) = map.get(key) {
            // A closed slot belongs to a leader that was dropped; replace it. So is one too old to join.
            if rx.has_changed().is_ok() && max_age.is_none_or(|age| started.elapsed() < age) {
                return Role::Follower(rx.clone());
            }
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let key: Arc<str> = Arc::from(key);
        map.insert(Arc::clone(&key), (id, rx, tokio::time::Instant::now()));
        Role::Leader(Leader {
            flights: Arc::clone(self),
            key,
            id,
            tx,
            retired: false,
        })
    }

    /// Detach the current flight for `key`: callers arriving from now on start a new one.
    pub(crate) fn detach(&self, key: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Detach every flight whose key starts with `prefix` (a class invalidation).
    pub(crate) fn detach_prefix(&self, prefix: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !k.starts_with(prefix));
    }

    /// Detach every flight (a namespace invalidation).
    pub(crate) fn detach_all(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn remove_if(&self, key: &str, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(i, ..)| *i == id) {
            map.remove(key);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Leader {
    /// Publish the outcome to every follower and retire the flight.
    pub(crate) fn complete(mut self, outcome: Outcome) {
        // Remove first: a caller arriving after this point starts a fresh fetch rather than reusing a result.
        self.flights.remove_if(&self.key, self.id);
        self.retired = true;
        let _ = self.tx.send(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Completed leaders already removed themselves; a dropped (cancelled) one must too, and its followers
        // see the sender close.
        if !self.retired {
            self.flights.remove_if(&self.key, self.id);
        }
    }
}

/// Wait for a leader's outcome. `None` means the leader went away without one: fetch again.
pub(crate) async fn follow(mut rx: Slot) -> Option<Outcome> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers() {
        let f = Arc::new(Flights::default());
        let Role::Leader(l) = f.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(rx) = f.join("k") else {
            panic!("second caller follows")
        };
        let Role::Follower(rx2) = f.join("k") else {
            panic!("third caller follows")
        };
        l.complete(Ok(Shared::Negative));
        assert!(matches!(follow(rx).await, Some(Ok(Shared::Negative))));
        assert!(matches!(follow(rx2).await, Some(Ok(Shared::Negative))));
        assert_eq!(f.len(), 0);
        assert!(matches!(f.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers() {
        let f = Arc::new(Flights::default());
        let l = f.join("k");
        let Role::Follower(rx) = f.join("k") else {
            panic!()
        };
        drop(l);
        assert!(follow(rx).await.is_none());
        assert!(matches!(f.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn detach_starts_a_new_flight() {
        let f = Arc::new(Flights::default());
        let Role::Leader(old) = f.join("k") else {
            panic!()
        };
        f.detach("k");
        let Role::Leader(new) = f.join("k") else {
            panic!("a caller after detach leads")
        };
        old.complete(Ok(Shared::Retry));
        // the old leader must not remove the new flight
        assert!(matches!(f.join("k"), Role::Follower(_)));
        drop(new);
    }
}
