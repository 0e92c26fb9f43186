//! The one rule by which every command that talks to Redis (`audit`, `purge`, `inspect`, `streams`,
//! `invalidate`, `dead-letters`) picks its server: `--url`, else `$REDIS_URL`, else the local default.
//!
//! The one decision: **the same rule everywhere, and an empty `REDIS_URL` counts as unset** (a shell's
//! `REDIS_URL= keyward …` or a blank line in an env file means "not given", not "an invalid URL"). `keyward
//! bench` is the exception by design: without a URL it measures the embedded backend (`mem://`).

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

/// The Redis URL a command acts on: `flag` (its `--url`), else `$REDIS_URL` when set and not empty, else
/// [`DEFAULT_URL`]. The URL is checked when the command connects, not here.
pub(crate) fn resolve(flag: Option<&str>) -> String {
    choose(flag, std::env::var("REDIS_URL").ok())
}

fn choose(flag: Option<&str>, env: Option<String>) -> String {
    flag.map(str::to_owned)
        .or_else(|| env.filter(|u| !u.is_empty()))
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
}
