//! The in-process limiter of `on_error = "local"`: the script's mirror ([`store::mirror`]) over a keyspace
//! of its own (the same type as the embedded backend's), used while Redis is unreachable.
//!
//! **The one decision to know:** each rate-limit class has its own budget here too (`capacity` identities and
//! 32 MiB per class), and state is never evicted; a check whose write does not fit in its class's budget is decided
//! on the state already held, without being recorded (counted in `keyward_memory_full_total`) — a fallback under memory
//! pressure errs towards allowing rather than towards refusing everyone.

use super::algo::Group;
use super::store;
use crate::backend::{Budget, Budgets, Keyspace};

// The Redis backend still imports them from here; they live with the check they describe.
pub(crate) use super::store::{RateCall, RateReply};

/// Bytes of rate-limit state each class may hold in the fallback.
const CLASS_BYTES: usize = 32 * 1024 * 1024;

/// Rate-limit state held in process.
pub(crate) struct LocalRates {
    keyspace: Keyspace,
}

impl LocalRates {
    /// A fallback keeping up to `capacity` identities per class.
    pub(crate) fn new(capacity: usize) -> Self {
        LocalRates {
            keyspace: Keyspace::new(Budgets::uniform(Budget {
                bytes: CLASS_BYTES,
                entries: capacity.max(1),
            })),
        }
    }

    pub(crate) fn check(&self, call: &RateCall<'_>) -> RateReply {
        match self.keyspace.with(|kv| store::mirror(kv, call)) {
            Ok(reply) => reply,
            // The class is full: decide without recording (the section was rolled back whole).
            Err(_) => {
                let peek = RateCall {
                    keys: call.keys,
                    group: Group {
                        specs: call.group.specs,
                        shadow: call.group.shadow,
                    },
                    cost: call.cost,
                    consume: false,
                };
                self.keyspace.with_evicting(|kv| store::mirror(kv, &peek))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Algorithm;
    use crate::rate_limit::algo::Spec;

    const SPEC: [Spec; 1] = [Spec {
        algorithm: Algorithm::FixedWindow,
        limit: 1,
        window: 3_600_000_000,
        capacity: 1,
        interval: 3_600_000_000,
    }];

    fn check(rates: &LocalRates, key: &str) -> bool {
        let keys = [key.to_owned()];
        let call = RateCall {
            keys: &keys,
            group: Group {
                specs: &SPEC,
                shadow: &[false],
            },
            cost: 1,
            consume: true,
        };
        rates.check(&call).allowed
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_class_never_evicts_state_nor_takes_another_class_room() {
        let rates = LocalRates::new(2);
        assert!(check(&rates, "t:a:per_ip:v1:{a}"));
        assert!(check(&rates, "t:a:per_ip:v1:{b}"));
        // Full: a third identity is decided on what is held (nothing) and not recorded...
        assert!(check(&rates, "t:a:per_ip:v1:{c}"));
        assert!(check(&rates, "t:a:per_ip:v1:{c}"));
        // ...while the identities already held keep their state (nothing was evicted to make room),
        assert!(!check(&rates, "t:a:per_ip:v1:{a}"));
        assert!(!check(&rates, "t:a:per_ip:v1:{b}"));
        // and another class has its own room.
        assert!(check(&rates, "t:a:per_user:v1:{a}"));
        assert!(!check(&rates, "t:a:per_user:v1:{a}"));
    }
}
