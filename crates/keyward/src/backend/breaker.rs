//! A circuit breaker in front of the store, so that while Redis is down each request pays the fallback, not a
//! timeout. Closed → (N consecutive failures) → Open → (cooldown) → one probe → Closed or Open again.
//!
//! One breaker per [`Keyward`](crate::Keyward) handle covers every capability: it sits in the Redis backend,
//! where every call passes. Only *unavailability* counts as a failure (a timeout, a refused or dropped
//! connection); an error reply proves the server is there and counts as a success. The pattern is the one
//! described in Nygard, *Release It!* (2nd ed., ch. 5, "Circuit Breaker").

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's state, as reported by [`Keyward::breaker_state`](crate::Keyward::breaker_state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go to the store.
    Closed,
    /// The store failed repeatedly: calls use their class's `on_error` without trying it.
    Open,
    /// The cooldown is over and one probe call is trying the store.
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// Whether a call may go to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Yes (closed).
    Call,
    /// Yes, as the one probe after the cooldown.
    Probe,
    /// No: use the fallback.
    Skip,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<Inner>,
    /// `true` exactly when the state is `Closed { failures: 0 }`: the hot path (every successful call) reads
    /// this instead of taking the lock.
    clean: AtomicBool,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: Mutex::new(Inner::Closed { failures: 0 }),
            clean: AtomicBool::new(true),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn admit(&self) -> Admit {
        if self.clean.load(Ordering::Acquire) {
            return Admit::Call;
        }
        let mut s = self.lock();
        let now = Instant::now();
        match *s {
            Inner::Closed { .. } => Admit::Call,
            Inner::Open { until } if now < until => Admit::Skip,
            // A probe that never reported (its caller was cancelled) does not keep the breaker half-open.
            Inner::HalfOpen { since } if now < since + self.cooldown => Admit::Skip,
            _ => {
                *s = Inner::HalfOpen { since: now };
                Admit::Probe
            }
        }
    }

    pub(crate) fn success(&self) {
        if self.clean.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if !matches!(*s, Inner::Closed { failures: 0 }) {
            if !matches!(*s, Inner::Closed { .. }) {
                tracing::info!("keyward: the store answers again; circuit breaker closed");
                metrics::gauge!("keyward_breaker_open").set(0.0);
            }
            *s = Inner::Closed { failures: 0 };
        }
        self.clean.store(true, Ordering::Release);
    }

    /// Record an unavailable call; true if this opened the breaker.
    pub(crate) fn failure(&self) -> bool {
        let mut s = self.lock();
        self.clean.store(false, Ordering::Release);
        let open = match *s {
            Inner::Closed { failures } if failures + 1 < self.threshold => {
                *s = Inner::Closed {
                    failures: failures + 1,
                };
                false
            }
            // Another caller's call failed while open: keep the current cooldown.
            Inner::Open { .. } => false,
            _ => true,
        };
        if open {
            *s = Inner::Open {
                until: Instant::now() + self.cooldown,
            };
            tracing::warn!(cooldown = ?self.cooldown, "keyward: the store is failing; circuit breaker open");
            metrics::gauge!("keyward_breaker_open").set(1.0);
        }
        open
    }

    pub(crate) fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } => BreakerState::HalfOpen,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether the breaker is open and opened less than `d` ago (the failures that opened it are that recent).
    pub(crate) fn opened_within(&self, d: Duration) -> bool {
        match *self.lock() {
            Inner::Open { until } => until
                .checked_sub(self.cooldown)
                .is_some_and(|opened| opened.elapsed() < d),
            _ => false,
        }
    }

    /// How long until the breaker lets a probe through (zero unless open).
    pub(crate) fn retry_in(&self) -> Duration {
        match *self.lock() {
            Inner::Open { until } => until.saturating_duration_since(Instant::now()),
            Inner::HalfOpen { since } => {
                (since + self.cooldown).saturating_duration_since(Instant::now())
            }
            Inner::Closed { .. } => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(3, Duration::from_secs(1));
        b.failure();
        b.failure();
        assert_eq!(b.admit(), Admit::Call);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), Admit::Skip);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::Skip, "only one probe at a time");
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(), Admit::Probe);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admit::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_does_not_wedge_it() {
        let b = Breaker::new(1, Duration::from_secs(1));
        b.failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(), Admit::Probe);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(), Admit::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn opened_within_is_only_the_moments_after_it_opened() {
        let b = Breaker::new(1, Duration::from_secs(30));
        assert!(!b.opened_within(Duration::from_secs(1)), "closed");
        b.failure();
        assert!(b.opened_within(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!b.opened_within(Duration::from_secs(1)), "open for longer");
        // Another failure while open keeps the cooldown: still open since then.
        b.failure();
        assert!(!b.opened_within(Duration::from_secs(1)));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
