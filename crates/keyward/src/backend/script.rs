//! The one way capabilities reach storage: an atomic operation is a Lua script (with its keys and arguments)
//! for Redis and a *mirror* closure for the embedded keyspace, run by [`Backend::atomic`](super::Backend::atomic).
//!
//! Capabilities declare their scripts with [`scripts!`] (each `.lua` file sits next to the capability's
//! `store.rs`, is loaded once and called by `EVALSHA` with a `NOSCRIPT` fallback), build a [`Call`], and decode
//! the script's answer from a [`Reply`], keyward's own reply type. No capability names a `redis::` type or
//! matches on the backend: the decision a reader must know is that both halves of an operation live side by
//! side in the capability's `store.rs`, so they cannot drift apart unnoticed.

use std::time::Duration;

use bytes::Bytes;
use redis::ToRedisArgs;

/// A Lua script, called by `EVALSHA`; on `NOSCRIPT` (a server that has not seen it yet, a restart, `SCRIPT
/// FLUSH`) by `EVAL` with its text, which also caches it on that server. Not `SCRIPT LOAD`: on Cluster that goes
/// to every primary, so a first call would wait for (and fail with) any primary that hangs.
pub(crate) struct Script {
    inner: redis::Script,
    source: &'static str,
}

impl Script {
    /// A script from its source text.
    pub(crate) fn new(source: &'static str) -> Self {
        Script {
            inner: redis::Script::new(source),
            source,
        }
    }

    /// Start a call of this script for the semantic operation `op` (named in errors and metrics).
    pub(crate) fn call(&'static self, op: &'static str) -> Call {
        Call {
            op,
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
            undo: None,
            must_land: false,
            evicting: false,
            slot: None,
        }
    }

    /// `EVALSHA` of this script with `keys` and `args`, or (`by_source`) `EVAL` of its text.
    pub(super) fn command(
        &self,
        by_source: bool,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> redis::Cmd {
        let mut cmd = if by_source {
            let mut c = redis::cmd("EVAL");
            c.arg(self.source);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.inner.get_hash());
            c
        };
        cmd.arg(keys.len());
        for k in keys {
            cmd.arg(&k[..]);
        }
        for a in args {
            cmd.arg(&a[..]);
        }
        cmd
    }

    /// The script's text, for `EVAL` (undos are sent as `EVAL`: they often run on a server whose script cache
    /// never saw them, or lost them in a restart, and a `NOSCRIPT` while the server was hung cannot be retried).
    pub(super) fn source(&self) -> &'static str {
        self.source
    }
}

/// Declares a capability's scripts: `scripts! { acquire: "lock_acquire.lua"; … }` gives a private `SCRIPTS`
/// static with one [`Script`] per field. Several files for one field are concatenated (shared Lua prelude
/// first). Paths are relative to the file that invokes the macro.
macro_rules! scripts {
    ($($field:ident: $($file:literal),+;)*) => {
        struct Scripts {
            $($field: $crate::backend::Script,)*
        }

        static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
            $($field: $crate::backend::Script::new(concat!($(include_str!($file)),+)),)*
        });
    };
}
pub(crate) use scripts;

/// One script call: keys, arguments and, for calls that leave something behind, an undo.
pub(crate) struct Call {
    pub(super) op: &'static str,
    pub(super) script: &'static Script,
    pub(super) keys: Vec<Vec<u8>>,
    pub(super) args: Vec<Vec<u8>>,
    pub(super) undo: Option<Undo>,
    /// Keep the undo also when the call was not sent (the breaker was open) or failed for unavailability.
    pub(super) must_land: bool,
    pub(super) evicting: bool,
    /// The Cluster slot of the first key (the node the call goes to, and whose breaker admits it).
    pub(super) slot: Option<u16>,
}

impl Call {
    /// Add a key (`KEYS[n]`). Every key of one call must hash to one Cluster slot.
    #[must_use]
    pub(crate) fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        let key = key.as_ref();
        if self.slot.is_none() {
            self.slot = Some(super::redis::cluster::slot_of(key));
        }
        self.keys.push(key.to_vec());
        self
    }

    /// Add an argument (`ARGV[n]`).
    #[must_use]
    pub(crate) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The call leaves state that would block others if the caller never learns it got it (a lease, an
    /// in-progress marker, a lock): if no answer comes back, `undo` is sent after it on the same connection
    /// (see `RedisBackend::run` and docs/resilience.md).
    #[must_use]
    pub(crate) fn undo(mut self, undo: Undo) -> Self {
        self.undo = Some(undo);
        self
    }

    /// A call that gives something back (a lease, a lock, an in-progress marker) and must reach the server
    /// even if this attempt cannot: when it is refused by the open breaker, times out or finds the server
    /// unavailable, it is handed to the background undo (`undo`, usually the same script), which bypasses the
    /// breaker and retries until the server answers. Otherwise what it gives back would block others until
    /// its TTL, although Redis is back.
    #[must_use]
    pub(crate) fn must_land(mut self, undo: Undo) -> Self {
        self.undo = Some(undo);
        self.must_land = true;
        self
    }

    /// The embedded mirror may evict entries of the same class to make room (cache entries only).
    #[must_use]
    pub(crate) fn evicting(mut self) -> Self {
        self.evicting = true;
        self
    }
}

/// What undoes a call that got no answer: a conditional, idempotent script touching only what that very call
/// wrote, and how long whatever it left can live by itself.
pub(crate) struct Undo {
    pub(crate) script: &'static Script,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
    pub(crate) within: Duration,
}

/// A script's answer, in keyward's terms. Lua `false` and a nil bulk are [`Reply::Nil`]; Lua `true` is `1`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// No value.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk or simple string.
    Bytes(Bytes),
    /// A table.
    Array(Vec<Reply>),
    /// Anything else (doubles, …), for error messages only.
    Other(String),
}

impl Reply {
    /// An integer, or a bulk string holding one.
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The bytes of a string reply.
    pub(crate) fn bytes(&self) -> Option<Bytes> {
        match self {
            Reply::Bytes(b) => Some(b.clone()),
            _ => None,
        }
    }

    /// The items of a table.
    pub(crate) fn array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A table of integers.
    pub(crate) fn ints(&self) -> Option<Vec<i64>> {
        self.array()?.iter().map(Reply::int).collect()
    }

    /// Whether this is no value.
    pub(crate) fn is_nil(&self) -> bool {
        matches!(self, Reply::Nil)
    }
}

impl From<redis::Value> for Reply {
    fn from(v: redis::Value) -> Self {
        use redis::Value;
        match v {
            Value::Nil | Value::Boolean(false) => Reply::Nil,
            Value::Boolean(true) => Reply::Int(1),
            Value::Int(n) => Reply::Int(n),
            Value::BulkString(b) => Reply::Bytes(Bytes::from(b)),
            Value::SimpleString(s) => Reply::Bytes(Bytes::from(s)),
            Value::Okay => Reply::Bytes(Bytes::from_static(b"OK")),
            Value::Array(items) | Value::Set(items) => {
                Reply::Array(items.into_iter().map(Reply::from).collect())
            }
            // RESP3 maps (`XREADGROUP`'s streams, on the fast read path) as RESP2 gives them: key, value, ….
            Value::Map(pairs) => Reply::Array(
                pairs
                    .into_iter()
                    .flat_map(|(k, v)| [Reply::from(k), Reply::from(v)])
                    .collect(),
            ),
            other => Reply::Other(format!("{other:?}")),
        }
    }
}

/// Two strings sent as one argument ([`Pipeline::arg_joined`]).
struct Joined<'a>(&'a str, &'a str);

impl ToRedisArgs for Joined<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's buffer cannot fail.
        let _ = w.write_all(self.0.as_bytes());
        let _ = w.write_all(self.1.as_bytes());
    }
}

/// A pipeline of plain commands (one round trip), for the few hot paths where plain commands cost the server
/// a fraction of a script call (the cache's fetch fast path).
pub(crate) struct Pipeline {
    pub(super) op: &'static str,
    pub(super) pipe: redis::Pipeline,
    pub(super) evicting: bool,
    /// As [`Call`]'s: the slot of the first key given with [`key`](Self::key).
    pub(super) slot: Option<u16>,
}

impl Pipeline {
    /// An empty pipeline for the semantic operation `op`.
    pub(crate) fn new(op: &'static str) -> Self {
        Pipeline {
            op,
            // The cache's fetch sends two or three commands; room for them costs nothing.
            pipe: redis::Pipeline::with_capacity(3),
            evicting: false,
            slot: None,
        }
    }

    /// Start the next command.
    #[must_use]
    pub(crate) fn cmd(mut self, name: &'static str) -> Self {
        self.pipe.cmd(name);
        self
    }

    /// Start the next command with room for `args` arguments of `bytes` bytes in all (the name included),
    /// so that a command carrying a large value is built without growing its buffer step by step.
    #[must_use]
    pub(crate) fn cmd_sized(mut self, name: &'static str, args: usize, bytes: usize) -> Self {
        let mut cmd = redis::Cmd::with_capacity(args + 1, bytes + name.len());
        cmd.arg(name);
        self.pipe.add_command(cmd);
        self
    }

    /// Add an argument to the current command.
    #[must_use]
    pub(crate) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.pipe.arg(arg);
        self
    }

    /// Add `head` followed by `tail` as one argument of the current command, written straight into the
    /// command's buffer (no `String` built for it).
    #[must_use]
    pub(crate) fn arg_joined(mut self, head: &str, tail: &str) -> Self {
        self.pipe.arg(Joined(head, tail));
        self
    }

    /// Add a key argument to the current command. On Cluster every key of one pipeline must hash to one slot.
    #[must_use]
    pub(crate) fn key(mut self, key: &str) -> Self {
        if self.slot.is_none() {
            self.slot = Some(super::redis::cluster::slot_of(key.as_bytes()));
        }
        self.pipe.arg(key);
        self
    }

    /// As [`Call::evicting`].
    #[must_use]
    pub(crate) fn evicting(mut self) -> Self {
        self.evicting = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_argument_is_the_string_it_stands_for() {
        let joined = Pipeline::new("t")
            .cmd("HMGET")
            .arg_joined("t:", "product:42")
            .arg_joined("x:", "");
        let plain = Pipeline::new("t")
            .cmd("HMGET")
            .arg("t:product:42")
            .arg("x:");
        assert_eq!(
            joined.pipe.get_packed_pipeline(),
            plain.pipe.get_packed_pipeline()
        );
    }
}
