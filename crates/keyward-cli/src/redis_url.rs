//! The one rule by which every command that talks to Redis (`audit`, `purge`, `inspect`, `streams`,
//! `invalidate`, `dead-letters`) picks its server: `--url`, else `$REDIS_URL`, else the local default.
//!
//! The one decision: **the same rule everywhere, and an empty or blank `REDIS_URL` counts as unset** (a shell's
//! `REDIS_URL= keyward …` or a blank line in an env file means "not given", not "an invalid URL"). `keyward
//! bench` is the exception by design: without a URL it measures the embedded backend (`mem://`).
//!
//! It is also where connection failures are put into words, once for every command: a server that cannot be
//! reached ([`unreachable()`], with [`HINT`]; for `rediss://` at a plain-text port, [`unanswered`] says so), and
//! one that will not let us in ([`AuthError`]: no password given, or the credentials refused). The CLI's own
//! connections come from [`connect`]; the library's errors are classified with [`AuthFailure::in_text`].

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::error::UsageError;

/// Said after every failure to reach a server, by every command: what to check.
pub(crate) const HINT: &str =
    "is it up, and is it the server meant? (--url, else $REDIS_URL, else redis://127.0.0.1:6379)";

/// The `--url` flag, the same for every command that talks to Redis (flattened into its arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct UrlArg {
    /// The Redis server [default: $REDIS_URL, else redis://127.0.0.1:6379]
    ///
    /// redis://, rediss://, redis+unix://, or redis+cluster://host:port[,host:port…] (audit and purge walk
    /// every primary; inspect and streams find the primary holding the key); invalidate and dead-letters
    /// also take redis+sentinel://. An empty $REDIS_URL counts as unset.
    #[arg(long = "url", value_name = "URL")]
    pub(crate) url: Option<String>,
}

impl UrlArg {
    /// The URL to act on, by [`resolve`].
    pub(crate) fn resolve(&self) -> String {
        resolve(self.url.as_deref())
    }
}

/// The server used when neither `--url` nor `REDIS_URL` names one.
pub(crate) const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// The Redis URL a command acts on: `flag` (its `--url`), else `$REDIS_URL` when set and not blank (trimmed,
/// as `Keyward::from_env` reads it), else
/// [`DEFAULT_URL`]. The URL is checked when the command connects, not here.
pub(crate) fn resolve(flag: Option<&str>) -> String {
    choose(flag, std::env::var("REDIS_URL").ok())
}

fn choose(flag: Option<&str>, env: Option<String>) -> String {
    flag.map(str::to_owned)
        .or_else(|| env.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// `host:port` (`tls://host:port`, `unix:/path`) of the server a plain (non-Cluster) URL names: never its
/// credentials.
///
/// # Errors
/// A [`UsageError`] saying plainly that the URL does not parse (shown without its password).
pub(crate) fn server_label(url: &str) -> Result<String, UsageError> {
    let client = redis::Client::open(url).map_err(|e| invalid(url, &e))?;
    Ok(describe(client.get_connection_info().addr()))
}

/// The error for a URL that does not parse: the URL without credentials, the accepted forms, and redis-rs's
/// reason.
pub(crate) fn invalid(url: &str, reason: &redis::RedisError) -> UsageError {
    let reason = reason.detail().unwrap_or("").trim();
    UsageError(format!(
        "the URL {} is not a Redis URL (redis://[user:password@]host[:port][/db], rediss://…, redis+unix:///path, redis+cluster://host:port[,host:port…]){}",
        redact(url),
        if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        }
    ))
}

/// The error for a server that cannot be reached: which one (never credentials), why, and [`HINT`].
pub(crate) fn unreachable(label: &str, reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot connect to Redis at {label}: {reason} — {HINT}")
}

/// Why a server would not let us in: the one classification every command uses, for its own connections
/// ([`connect`]) and for the library's ([`AuthFailure::in_text`] on `keyward::Error::Connect`'s reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// `NOAUTH`: the server requires a password and the URL gave none.
    Required,
    /// `WRONGPASS` (or redis-rs's `AuthenticationFailed`): the URL's user and password were refused.
    Refused,
}

impl AuthFailure {
    /// The failure `err` reports, if it is one.
    pub(crate) fn of(err: &redis::RedisError) -> Option<Self> {
        if err.kind() == redis::ErrorKind::AuthenticationFailed || err.code() == Some("WRONGPASS") {
            Some(Self::Refused)
        } else if err.code() == Some("NOAUTH") {
            Some(Self::Required)
        } else {
            None
        }
    }

    /// The failure a connection error's text reports (the library's `Connect` reason is a string): redis-rs
    /// shows the server's code (`"NOAUTH": …`, `"WRONGPASS": …`) or its own kind (`AuthenticationFailed`).
    pub(crate) fn in_text(text: &str) -> Option<Self> {
        if text.contains("WRONGPASS") || text.contains("AuthenticationFailed") {
            Some(Self::Refused)
        } else if text.contains("NOAUTH") {
            Some(Self::Required)
        } else {
            None
        }
    }
}

/// The error for the library's failed connect (`invalidate`, `dead-letters`, `bench`): an [`AuthError`] when
/// `keyward::Error::Connect` says the server would not let us in, else the library's text and `hint` (what to
/// check, by the command's rule for picking the server).
pub(crate) fn library_connect_failed(err: &keyward::Error, hint: &str) -> anyhow::Error {
    if let keyward::Error::Connect { server, reason } = err
        && let Some(failure) = AuthFailure::in_text(reason)
    {
        return AuthError::new(server, failure).into();
    }
    anyhow::anyhow!("{err} — {hint}")
}

/// A server that would not let us in: which one (`host:port`, never credentials) and what to put in the URL.
/// Its own type, so that callers collecting errors from several servers can pass it on as it is.
#[derive(Debug, thiserror::Error)]
pub(crate) struct AuthError {
    label: String,
    failure: AuthFailure,
}

impl AuthError {
    pub(crate) fn new(label: &str, failure: AuthFailure) -> Self {
        Self {
            label: label.to_owned(),
            failure,
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const FORMS: &str = "redis://:PASSWORD@host:port for the default user, redis://USER:PASSWORD@host:port \
                             for an ACL user (percent-encode special characters: @ as %40, : as %3A, / as %2F), \
                             in --url or $REDIS_URL";
        let label = &self.label;
        match self.failure {
            AuthFailure::Required => write!(
                f,
                "Redis at {label} requires authentication and the URL gives no password: give it in the URL, \
                 {FORMS}"
            ),
            AuthFailure::Refused => write!(
                f,
                "Redis at {label} refused the credentials (wrong password, or an unknown or disabled user): \
                 check them in the URL, {FORMS}"
            ),
        }
    }
}

/// The error for a connection attempt to `label` that failed with `err`: an [`AuthError`] when the server
/// would not let us in, else [`unreachable()`] — after, for a `rediss://` URL that timed out, one look at the
/// port ([`unanswered`]).
pub(crate) async fn connect_failed(
    client: &redis::Client,
    label: &str,
    err: &redis::RedisError,
    connect_timeout: Duration,
) -> anyhow::Error {
    if let Some(failure) = AuthFailure::of(err) {
        return AuthError::new(label, failure).into();
    }
    let reason = err.to_string();
    if err.is_timeout() {
        unreachable(
            label,
            unanswered(client.get_connection_info().addr(), reason, connect_timeout).await,
        )
    } else {
        unreachable(label, reason)
    }
}

/// A plain connection to one server (one primary of a Cluster), for the commands that talk to Redis through
/// connections of their own (`audit`, `purge`, `inspect`, `streams`, and the Cluster discovery). It is
/// `PING`ed once, so that a server requiring a password the URL does not give says so here rather than at
/// the command's first use of it.
///
/// # Errors
/// A [`UsageError`] when the URL does not parse; an [`AuthError`] when the server refuses us; otherwise an
/// error naming the server (`host:port`, never the password) with [`HINT`].
pub(crate) async fn connect(
    url: &str,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> anyhow::Result<MultiplexedConnection> {
    // redis-rs enables rustls without a crypto provider; for `rediss://` use ring's unless one is set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = redis::Client::open(url).map_err(|e| invalid(url, &e))?;
    let label = server_label(url)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    let mut conn = match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(conn) => conn,
        Err(e) => return Err(connect_failed(&client, &label, &e, connect_timeout).await),
    };
    match redis::cmd("PING").query_async::<()>(&mut conn).await {
        Err(e) => match AuthFailure::of(&e) {
            Some(failure) => Err(AuthError::new(&label, failure).into()),
            None if e.is_io_error() || e.is_timeout() => Err(unreachable(&label, e)),
            // Any other refusal (an ACL without `+ping`) is left to the command, which names what it needs.
            None => Ok(conn),
        },
        Ok(()) => Ok(conn),
    }
}

/// `reason` for a connect that got no answer in time, with what one look at the port tells when the URL is
/// `rediss://`: the library's own diagnosis (its connect says the same), one plain-text `PING` at the port,
/// at most `min(connect_timeout, 1 s)`, no credentials.
pub(crate) use keyward::__cli::unanswered;

fn describe(addr: &redis::ConnectionAddr) -> String {
    let host = |h: &str| {
        if h.contains(':') && !h.starts_with('[') {
            format!("[{h}]")
        } else {
            h.to_owned()
        }
    };
    match addr {
        redis::ConnectionAddr::Tcp(h, port) => format!("{}:{port}", host(h)),
        redis::ConnectionAddr::TcpTls { host: h, port, .. } => {
            format!("tls://{}:{port}", host(h))
        }
        redis::ConnectionAddr::Unix(path) => format!("unix:{}", path.display()),
        other => format!("{other:?}"),
    }
}

/// `url` for messages, without credentials ([`keyward::redact_url`]).
pub(crate) fn redact(url: &str) -> String {
    keyward::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_a_non_empty_env_then_the_local_default() {
        let env = || Some("redis://env:1".to_owned());
        assert_eq!(choose(Some("redis://flag:1"), env()), "redis://flag:1");
        assert_eq!(choose(None, env()), "redis://env:1");
        assert_eq!(choose(None, Some(String::new())), DEFAULT_URL);
        // Blank counts as unset, as the library's `Keyward::from_env` reads it; a set one is trimmed too.
        assert_eq!(choose(None, Some("  ".to_owned())), DEFAULT_URL);
        assert_eq!(
            choose(None, Some(" redis://env:1\n".to_owned())),
            "redis://env:1"
        );
        assert_eq!(choose(None, None), DEFAULT_URL);
    }

    #[test]
    fn labels_and_errors_never_show_the_password() {
        assert_eq!(
            server_label("redis://u:s3cret@10.0.0.1:7000/2").unwrap(),
            "10.0.0.1:7000"
        );
        assert_eq!(server_label("redis://h").unwrap(), "h:6379");
        let bad = server_label("redis://:s3cret@[nope").unwrap_err().0;
        assert!(bad.contains("is not a Redis URL"), "{bad}");
        assert!(!bad.contains("s3cret"), "{bad}");
        assert_eq!(
            redact("redis://u:p@w@h:1/0?password=x"),
            "redis://***@h:1/0?…"
        );
        // An `@` inside the query: before, the CLI's own copy of the rule showed what followed it.
        assert_eq!(
            redact("redis+sentinel://h:26379/m?password=a@b"),
            "redis+sentinel://***…"
        );
    }

    #[test]
    fn auth_failures_are_told_from_codes_and_library_texts() {
        let text = |t| AuthFailure::in_text(t);
        assert_eq!(
            text("\"NOAUTH\": HELLO must be called with the client already authenticated"),
            Some(AuthFailure::Required)
        );
        assert_eq!(
            text("\"WRONGPASS\": invalid username-password pair or user is disabled."),
            Some(AuthFailure::Refused)
        );
        assert_eq!(
            text("Password authentication failed - AuthenticationFailed"),
            Some(AuthFailure::Refused)
        );
        assert_eq!(text("Connection refused (os error 111)"), None);
        let said = AuthError::new(
            &server_label("redis://u:s3cret@h:7000").unwrap(),
            AuthFailure::Refused,
        )
        .to_string();
        assert!(
            said.starts_with("Redis at h:7000 refused the credentials"),
            "{said}"
        );
        assert!(!said.contains("s3cret"), "{said}");
    }

    /// The `rediss://` address of `port` on 127.0.0.1, as redis-rs parses it.
    fn tls_addr(port: u16) -> redis::ConnectionAddr {
        redis::Client::open(format!("rediss://:s3cret@127.0.0.1:{port}"))
            .unwrap()
            .get_connection_info()
            .addr()
            .clone()
    }

    /// One look at the port tells the three cases apart; a non-TLS address is left alone.
    #[tokio::test]
    async fn an_unanswered_tls_connect_says_what_the_port_is() {
        let wait = Duration::from_secs(1);
        let plain = keyward_testkit::RedisServer::spawn_tcp();
        let said = unanswered(
            &tls_addr(plain.tcp_port().unwrap()),
            "timed out".into(),
            wait,
        )
        .await;
        assert!(
            said.contains("the port answers plain-text Redis: does this port speak TLS?"),
            "{said}"
        );
        let silent = keyward_testkit::Blackhole::start();
        let said = unanswered(&tls_addr(silent.addr().port()), "timed out".into(), wait).await;
        assert!(
            said.contains("accepts TCP connections but answered neither"),
            "{said}"
        );
        let nobody = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let said = unanswered(&tls_addr(nobody), "timed out".into(), wait).await;
        assert!(said.contains("no TCP connection to the port"), "{said}");
        assert!(!said.contains("s3cret"), "{said}");
        let tcp = redis::ConnectionAddr::Tcp("127.0.0.1".into(), nobody);
        assert_eq!(
            unanswered(&tcp, "timed out".into(), wait).await,
            "timed out"
        );
    }
}
