//! The `channel` class kind: a typed pub/sub channel for broadcasts that may be lost (a cache-warming hint, a
//! "catalog changed" notice). Anything that drives a side effect belongs on a stream, not here.
//!
//! A channel stores nothing, so it has no TTL; its name follows the key layout (`{env}:{app}:{class}:v{n}`),
//! so ACL channel rules (`&{env}:{app}:*`) cover it.

use std::fmt;

use serde::Deserialize;

use super::ClassSpec;
use super::FieldError;
use super::fields::Int;

/// Default `max_message_bytes`: 64 KiB.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest allowed `max_message_bytes`: 8 MiB, the default soft limit of a Redis pub/sub client's output
/// buffer (`client-output-buffer-limit pubsub 32mb 8mb 60`); a larger message gets subscribers disconnected.
const MAX_MESSAGE_BYTES_LIMIT: usize = 8 * 1024 * 1024;

/// A channel class: typed, fire-and-forget broadcasts on Redis pub/sub (sharded on Cluster).
///
/// ```
/// use keyward::policy::{ChannelClass, Policy};
///
/// let policy = Policy::builder("prod", "shop")
///     .channel("catalog_changes", ChannelClass::new().max_message_bytes(4096))
///     .build()?;
/// assert_eq!(policy.class("catalog_changes").unwrap().kind().name(), "channel");
/// # Ok::<(), keyward::policy::PolicyError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelClass {
    max_message_bytes: usize,
    version: u32,
}

impl Default for ChannelClass {
    fn default() -> Self {
        Self::new()
    }
}

impl ChannelClass {
    /// A channel class with messages of at most 64 KiB (encoded), version 1.
    pub fn new() -> Self {
        ChannelClass {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            version: 1,
        }
    }

    /// The largest encoded message, in bytes (default 64 KiB, at most 8 MiB). A larger one is refused by
    /// `publish` with an error naming the class and the size.
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// The version, part of the channel name (default 1): bump it when the message type changes
    /// incompatibly, and old and new instances stop hearing each other.
    #[must_use]
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// The largest encoded message, in bytes.
    pub fn max_message_bytes_value(&self) -> usize {
        self.max_message_bytes
    }

    /// The version that is part of the channel name.
    pub fn version_value(&self) -> u32 {
        self.version
    }
}

impl ClassSpec for ChannelClass {
    type Raw = RawChannel;
    const EVICTABLE: bool = false;

    fn from_raw(raw: RawChannel) -> Result<Self, FieldError> {
        let mut class = ChannelClass::new();
        if let Some(n) = raw.max_message_bytes {
            class.max_message_bytes = n.to(
                "max_message_bytes",
                &format!("an integer from 1 to {MAX_MESSAGE_BYTES_LIMIT}"),
            )?;
        }
        if let Some(v) = raw.version {
            class.version = v.to("version", "an integer from 1 to 4294967295")?;
        }
        Ok(class)
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return Err((
                "max_message_bytes",
                format!(
                    "must be from 1 to {MAX_MESSAGE_BYTES_LIMIT} (8 MiB, the default pub/sub output buffer \
                     soft limit), got {}",
                    self.max_message_bytes
                ),
            ));
        }
        if self.version < 1 {
            return Err(("version", "must be at least 1".into()));
        }
        Ok(())
    }

    fn key_version(&self) -> u32 {
        self.version
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  max_message_bytes: {}", self.max_message_bytes)?;
        writeln!(f, "  version:           {}", self.version)
    }
}

/// The TOML form of a channel class (`kind` is read before this). Nothing is required.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannel {
    max_message_bytes: Option<Int>,
    version: Option<Int>,
}

#[cfg(test)]
mod tests {
    use crate::policy::{Policy, PolicyError};

    fn channel(body: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml_str(&format!(
            "[namespace]\nenv = \"a\"\napp = \"b\"\n[classes.news]\nkind = \"channel\"\n{body}\n"
        ))
    }

    #[test]
    fn defaults_and_bounds_name_the_field() {
        let p = channel("").unwrap();
        let c = p.class("news").unwrap().as_channel().unwrap();
        assert_eq!(
            (c.max_message_bytes_value(), c.version_value()),
            (64 * 1024, 1)
        );
        for bad in [
            "max_message_bytes = 0",
            "max_message_bytes = 8388609",
            "max_message_bytes = -1",
            "version = 0",
        ] {
            let err = channel(bad).unwrap_err().to_string();
            let field = bad.split(' ').next().unwrap();
            assert!(err.contains("news") && err.contains(field), "{bad}: {err}");
        }
        let err = channel("ttl = \"1m\"").unwrap_err().to_string();
        assert!(err.contains("ttl"), "unknown fields are refused: {err}");
        assert!(channel("max_message_bytes = 8388608\nversion = 3").is_ok());
    }
}
