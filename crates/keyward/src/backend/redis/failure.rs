//! Turning the Redis client's error into keyward's [`RedisFailure`](crate::RedisFailure): the one place that
//! classifies a client error (unavailable, a broken connection, may have run).
//!
//! **The one decision to know:** keyward's public API never names the client library's types, so a new
//! major version of the client is not a breaking change for keyward's users; everything callers ask of a
//! failure is decided here, once, when it happens.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::error::RedisFailure;

/// keyward's failure for a client error.
pub(crate) fn failure(e: RedisError) -> RedisFailure {
    RedisFailure::new(
        e.code().map(str::to_owned),
        unavailable(&e),
        e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
        may_have_run(&e),
        e,
    )
}

/// Whether a failed call may still have been executed by the server (it was sent, no answer came back).
fn may_have_run(e: &RedisError) -> bool {
    !e.is_connection_refusal() && (e.is_timeout() || e.is_io_error() || e.is_connection_dropped())
}

/// Whether a client error means the server cannot serve us now (see [`RedisFailure::is_unavailable`]).
pub(crate) fn unavailable(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
            )
        )
        || matches!(e.code(), Some("BUSY" | "OOM"))
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn an_error_reply_keeps_its_code_and_is_not_unavailability() {
        let f = failure(redis::make_extension_error(
            "NOPERM".into(),
            Some("no".into()),
        ));
        assert_eq!(f.code(), Some("NOPERM"));
        assert!(!f.is_unavailable());
        assert!(!f.is_connection_failure());
        assert!(!f.may_have_run());
        let busy = failure(redis::make_extension_error("BUSY".into(), None));
        assert!(busy.is_unavailable());
    }

    #[test]
    fn a_broken_connection_is_unavailable_and_may_have_run_a_refused_one_did_not() {
        let broken = failure(io::Error::from(io::ErrorKind::ConnectionReset).into());
        assert_eq!(broken.code(), None);
        assert!(broken.is_unavailable() && broken.is_connection_failure() && broken.may_have_run());
        let refused = failure(io::Error::from(io::ErrorKind::ConnectionRefused).into());
        assert!(refused.is_unavailable());
        assert!(!refused.may_have_run());
    }

    #[test]
    fn the_client_error_is_the_source_and_debug_shows_code_and_message() {
        let f = failure(redis::make_extension_error(
            "WRONGTYPE".into(),
            Some("bad".into()),
        ));
        assert!(std::error::Error::source(&f).is_some());
        let debug = format!("{f:?}");
        assert!(debug.contains("WRONGTYPE"), "{debug}");
    }
}
