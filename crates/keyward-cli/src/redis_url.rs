//! The one rule by which every command that talks to Redis (`audit`, `purge`, `inspect`, `streams`,
//! `invalidate`, `dead-letters`) picks its server: `--url`, else `$REDIS_URL`, else the local default.
//!
//! The one decision: **the same rule everywhere, and an empty `REDIS_URL` counts as unset** (a shell's
//! `REDIS_URL= keyward …` or a blank line in an env file means "not given", not "an invalid URL"). `keyward
//! bench` is the exception by design: without a URL it measures the embedded backend (`mem://`).

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
}
