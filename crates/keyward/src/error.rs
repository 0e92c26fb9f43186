//! The one error type of the crate.
//!
//! Expected outcomes (a miss, a refused fill) are values elsewhere in the API; this enum is only for failures.
//! It is `Clone` so that one failure can be shared by every caller waiting on the same single-flight load.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::key::KeyError;
use crate::policy::PolicyError;

/// A boxed error from user code (a loader, a persist step).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of keyward's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in keyward.
///
/// What a handler usually needs: your own error back from a loader or a source write
/// ([`downcast_ref`](Self::downcast_ref)), and whether the store is down ([`is_unavailable`](Self::is_unavailable):
/// answer 503) or something else failed (500). Never send the error's text to a client: it names
/// servers and classes.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keyward::{Error, Keyward, policy::{CacheClass, Policy}};
///
/// #[derive(Debug)]
/// enum DbError { NotFound, Down }
/// impl std::fmt::Display for DbError {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str(match self { DbError::NotFound => "not found", DbError::Down => "database down" })
///     }
/// }
/// impl std::error::Error for DbError {}
///
/// /// The HTTP status of a failed keyward call.
/// fn status(err: &Error) -> u16 {
///     match err.downcast_ref::<DbError>() {
///         Some(DbError::NotFound) => 404,
///         Some(DbError::Down) => 503,
///         None if err.is_unavailable() => 503, // Redis down (and the class does not fail open)
///         None => 500,
///     }
/// }
///
/// let policy = Policy::builder("dev", "blog")
///     .cache("article", CacheClass::new(Duration::from_secs(600), "the article service, after each write"))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let articles = kw.cache::<String>("article")?;
///
/// let err = articles
///     .get_or_set(&7, || async { Err::<String, _>(DbError::NotFound) })
///     .await
///     .unwrap_err();
/// assert!(matches!(err, Error::Loader { .. })); // never cached
/// assert_eq!(status(&err), 404);
///
/// let err = articles.invalidate_after(&7, async { Err::<(), _>(DbError::Down) }).await.unwrap_err();
/// assert!(matches!(err, Error::Source { .. })); // the cache was not touched
/// assert_eq!(status(&err), 503);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The policy is invalid. (Boxed: a policy error carries its file, variable, class and field, and
    /// every `Result` of keyward would otherwise carry that size.)
    #[error(transparent)]
    Policy(Box<PolicyError>),
    /// A key could not be built from the given id.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The policy declares no class of that name.
    #[error("the policy declares no class `{class}`")]
    UnknownClass {
        /// The class asked for.
        class: String,
    },
    /// The class exists but is of another kind.
    #[error("class `{class}` is a {found} class, not a {expected} class")]
    WrongKind {
        /// The class asked for.
        class: String,
        /// The kind the caller needs.
        expected: &'static str,
        /// The kind the policy declares.
        found: &'static str,
    },
    /// A personal-data class was opened as a shared cache without `allow_shared = true`.
    #[error(
        "class `{class}` is declared `personal = true`: personal data stays out of the shared cache \
         unless the class also sets `allow_shared = true` (do so only if every reader may see every entry)"
    )]
    PersonalData {
        /// The class asked for.
        class: String,
    },
    /// The connection URL could not be used.
    #[error("invalid connection URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it (never contains the password).
        reason: String,
    },
    /// `REDIS_URL` is not set, and the handle was asked to refuse the embedded backend
    /// ([`Keyward::from_env_required`](crate::Keyward::from_env_required)).
    #[error(
        "REDIS_URL is not set: this service refuses to run on the embedded per-process backend \
         (set REDIS_URL, e.g. redis://host:6379)"
    )]
    MissingRedisUrl,
    /// Could not connect to the server in time, or it refused.
    #[error("cannot connect to Redis at {server}: {reason}")]
    Connect {
        /// The server address (no credentials).
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// A command did not answer within the configured timeout.
    #[error("Redis at {server} did not answer `{op}` within {timeout:?}")]
    Timeout {
        /// The server address.
        server: String,
        /// The semantic operation that timed out.
        op: &'static str,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The circuit breaker in front of Redis is open: recent calls failed or timed out, so this one was not
    /// sent (it would most likely have paid the whole response timeout). The breaker lets one probe through
    /// after its cooldown and closes when the probe succeeds.
    #[error(
        "Redis at {server} is unavailable (circuit breaker open; next probe in {retry_in:?}); `{op}` was not sent"
    )]
    CircuitOpen {
        /// The server address.
        server: String,
        /// The semantic operation that was not sent.
        op: &'static str,
        /// How long until the breaker lets a probe through.
        retry_in: Duration,
    },
    /// Redis answered with an error, or the connection failed mid-command.
    #[error("Redis at {server} failed `{op}`: {source}")]
    Redis {
        /// The server address.
        server: String,
        /// The semantic operation.
        op: &'static str,
        /// What failed: the server's error code, and whether the server is unavailable ([`RedisFailure`]).
        #[source]
        source: RedisFailure,
    },
    /// A value could not be encoded.
    #[error("class `{class}`: cannot encode value: {source}")]
    Encode {
        /// The class.
        class: String,
        /// The codec's error.
        #[source]
        source: Arc<BoxError>,
    },
    /// A value is larger than the class allows.
    #[error("class `{class}`: value of {size} bytes exceeds {field} = {max}")]
    ValueTooLarge {
        /// The class.
        class: String,
        /// The class's field that sets the limit (`max_value_bytes`, `max_data_bytes`, `max_response_bytes`).
        field: &'static str,
        /// The encoded size.
        size: usize,
        /// The class limit.
        max: usize,
    },
    /// The loader returned an error. It was not cached; every caller waiting on this load gets it.
    #[error("class `{class}`: loader failed: {source}")]
    Loader {
        /// The class.
        class: String,
        /// The loader's error (downcast it to your type).
        #[source]
        source: Arc<BoxError>,
    },
    /// The loader did not finish within the class's `loader_timeout`.
    #[error("class `{class}`: loader did not finish within {after:?}")]
    LoaderTimeout {
        /// The class.
        class: String,
        /// The class's `loader_timeout`.
        after: Duration,
    },
    /// The source-of-truth write failed; the cache was not touched.
    #[error("class `{class}`: source write failed, cache untouched: {source}")]
    Source {
        /// The class.
        class: String,
        /// The write's error.
        #[source]
        source: Arc<BoxError>,
    },
    /// Stored data (a session's payload, a stored response) could not be decoded. It is left in place: a
    /// deploy that changed the type should not silently drop users' data.
    #[error("class `{class}`: stored data cannot be decoded: {source}")]
    Decode {
        /// The class.
        class: String,
        /// The codec's error.
        #[source]
        source: Arc<BoxError>,
    },
    /// A class of the embedded backend holds its budget (bytes or entries) and the operation would add to it.
    /// Sessions, locks, idempotency records, rate-limit state and epochs are never evicted to make room (a lock
    /// or a session that silently vanished would break its guarantee), so the operation is refused, and
    /// undone whole, until entries of that class expire or are removed. Every class has its own budget: a
    /// flood of one class never causes this error for another.
    #[error(
        "class `{class}`: the embedded store holds this class's budget ({budget_bytes} bytes or {capacity} \
         entries); its entries are never evicted: raise MemoryOptions::class_budget (or max_bytes, capacity) \
         or wait for entries to expire"
    )]
    StoreFull {
        /// The class whose budget is full (`_kw` for keyward's own bookkeeping keys).
        class: String,
        /// The class's budget in approximate bytes (keys, values and a fixed overhead per entry).
        budget_bytes: usize,
        /// The class's budget in entries.
        capacity: usize,
    },
    /// An argument cannot be used (e.g. a rate-limit cost larger than the limit's capacity).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong, naming the class where there is one.
        what: String,
    },
    /// A cache tag that cannot be used (empty, too long, a control character or whitespace, too many on one
    /// entry). `tag` is shown escaped and cut to 64 characters.
    #[error(
        "{}tag {tag:?} cannot be used: {reason}",
        class.as_deref().map(|c| format!("class `{c}`: ")).unwrap_or_default()
    )]
    InvalidTag {
        /// The class whose call named the tag (`None` for [`Keyward::invalidate_tag`](crate::Keyward::invalidate_tag)).
        class: Option<String>,
        /// The tag (cut to 64 characters).
        tag: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The source-of-truth write succeeded but the cache could not be updated or invalidated afterwards.
    /// The cached entry may be stale until its TTL ends.
    #[error("class `{class}`: source written, but the cache could not be updated: {cause}")]
    CacheAfterSource {
        /// The class.
        class: String,
        /// The cache failure.
        cause: Box<Error>,
    },
}

impl From<PolicyError> for Error {
    fn from(e: PolicyError) -> Self {
        Error::Policy(Box::new(e))
    }
}

impl Error {
    /// Whether this is an outage already reported once, that every call meets until it ends: an open
    /// breaker (logged when it opened), or a lazily connecting handle that is not connected yet (its
    /// background task logs each attempt). Per-call paths count these but do not log them again, so a
    /// down store costs one log line per breaker period or connect attempt, not one per request.
    pub(crate) fn is_reported_outage(&self) -> bool {
        matches!(self, Error::CircuitOpen { .. } | Error::Connect { .. })
    }

    /// The error your own code returned, as its own type `E`: a loader's ([`Error::Loader`]) or a
    /// source-of-truth write's ([`Error::Source`], from `invalidate_after` or `write_through`), when it
    /// is an `E` or wraps one: the error is looked for first, then along its
    /// [`source`](std::error::Error::source) chain. `None` for every other variant (keyward's own
    /// failures) and when no error of the chain is an `E`.
    ///
    /// keyward keeps your error type-erased (`Arc<BoxError>`) because one load is shared by every
    /// waiting caller, whatever their error type; this is the typed way back. See the example on
    /// [`Error`]. In an axum handler that already holds a `keyward_axum::ApiError`, its `app_error`
    /// is this same lookup.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keyward::{BoxError, Error};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("no such row")]
    /// struct NotFound;
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("the query failed")]
    /// struct Query(#[source] NotFound);
    ///
    /// // What a loader returning `Err(Query(NotFound))` leaves in the error.
    /// let err = Error::Loader { class: "article".into(), source: Arc::new(Box::new(Query(NotFound)) as BoxError) };
    /// assert!(err.downcast_ref::<Query>().is_some());
    /// assert!(err.downcast_ref::<NotFound>().is_some()); // found inside the wrapper
    /// assert!(err.downcast_ref::<std::io::Error>().is_none());
    /// assert!(Error::MissingRedisUrl.downcast_ref::<NotFound>().is_none()); // keyward's own failure
    /// ```
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let (Error::Loader { source, .. } | Error::Source { source, .. }) = self else {
            return None;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&***source);
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<E>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }

    /// Whether trying the same operation again may succeed (connection trouble, timeouts).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::CircuitOpen { .. }
            | Error::LoaderTimeout { .. }
            | Error::StoreFull { .. } => true,
            Error::Redis { source, .. } => source.is_connection_failure(),
            Error::CacheAfterSource { cause, .. } => cause.is_retryable(),
            _ => false,
        }
    }

    /// Whether the store could not be reached: a connection failure, a timeout, or an open circuit breaker.
    /// This is what a cache class's `on_error = "fail_open"` and a rate limit's `on_error` react to. An error
    /// *reply* from a reachable server (a missing ACL grant, a wrong-type key) is not unavailability: it is
    /// returned as an error, because falling back would hide a bug or a misconfiguration.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::CircuitOpen { .. } => true,
            Error::Redis { source, .. } => source.is_unavailable(),
            _ => false,
        }
    }

    /// Whether the error came from the storage backend (as opposed to user code or bad input).
    pub fn is_backend(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Timeout { .. }
                | Error::CircuitOpen { .. }
                | Error::Redis { .. }
                | Error::StoreFull { .. }
        )
    }
}

/// Why a command sent to Redis failed: an error reply from the server, or a connection that failed
/// mid-command. Cheap to clone (one reference count).
///
/// keyward's public API never names the Redis client library's types (a new major version of the client is
/// then not a breaking change for users); what callers need is answered here, and the client's error stays
/// reachable as a `dyn Error` through [`source`](std::error::Error::source) for logs.
///
/// ```
/// # fn handle(err: keyward::Error) {
/// if let keyward::Error::Redis { source, .. } = &err {
///     if source.code() == Some("NOPERM") {
///         eprintln!("the ACL user lacks a grant: {err}");
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct RedisFailure(Arc<FailureInner>);

struct FailureInner {
    code: Option<String>,
    unavailable: bool,
    connection_failure: bool,
    may_have_run: bool,
    client: BoxError,
}

impl RedisFailure {
    pub(crate) fn new(
        code: Option<String>,
        unavailable: bool,
        connection_failure: bool,
        may_have_run: bool,
        client: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        RedisFailure(Arc::new(FailureInner {
            code,
            unavailable,
            connection_failure,
            may_have_run,
            client: Box::new(client),
        }))
    }

    /// The server's error code when Redis answered with an error reply: the reply's first word, such as
    /// `WRONGTYPE`, `NOPERM`, `NOSCRIPT`, `OOM` or `BUSY` (the RESP "simple error" convention,
    /// <https://redis.io/docs/latest/develop/reference/protocol-spec/#simple-errors>). `None` when the
    /// failure was not an error reply (the connection broke).
    pub fn code(&self) -> Option<&str> {
        self.0.code.as_deref()
    }

    /// Whether the connection failed (an I/O error, a dropped connection, a timeout) rather than the server
    /// refusing this one command. Trying again may succeed.
    pub fn is_connection_failure(&self) -> bool {
        self.0.connection_failure
    }

    /// Whether the server cannot serve now, as opposed to an error reply about this one call: no connection
    /// or no answer, and the replies of a server that is there but not usable — loading its data
    /// (`LOADING`), running a script past `busy-reply-threshold` (`BUSY`), demoted to a replica by a
    /// failover (`READONLY`), without a reachable master (`MASTERDOWN`), a cluster that is down or resharding
    /// (`CLUSTERDOWN`, `TRYAGAIN`), or out of memory under `noeviction` (`OOM`).
    pub fn is_unavailable(&self) -> bool {
        self.0.unavailable
    }

    /// Whether the command may have run on the server although its answer never reached us.
    pub(crate) fn may_have_run(&self) -> bool {
        self.0.may_have_run
    }
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.client, f)
    }
}

impl fmt::Debug for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFailure")
            .field("code", &self.code())
            .field("message", &self.0.client.to_string())
            .finish()
    }
}

impl std::error::Error for RedisFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `Result` of keyward (and of the services that wrap its error) carries an `Error`: it stays
    /// below clippy's `result_large_err` bound (128 bytes), so wrapping it in an application's own error
    /// does not push that over. A large variant belongs in a `Box` (as `Error::Policy`).
    #[test]
    fn the_error_stays_small() {
        let size = std::mem::size_of::<Error>();
        assert!(size <= 96, "keyward::Error is {size} bytes");
    }
}
