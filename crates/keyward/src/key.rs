//! Redis keys, built only from a validated [`Policy`]: never hand-formatted.
//!
//! Every entry key has the layout `{env}:{app}:{class}:v{version}:{<id parts joined by ':'>}`, for example
//! `prod:shop:product_list:v1:{acme:42}`. The braces are a Redis Cluster hash tag, so every key of one
//! entry lands in the same slot. keyward's own bookkeeping keys live under `{env}:{app}:_kw:` (see
//! [`internal_key`]); class names cannot start with `_`, so no class pattern ever matches them.
//!
//! Keys that must share a Redis Cluster slot with another key (a session and its user's index) put a
//! *slot tag* (a short string that hashes to the wanted slot) in the braces and the id after them:
//! `{env}:{app}:{class}:v{version}:{<slot tag>}:<id>`. They match the class's patterns all the same.
//!
//! **The one decision to know:** id parts are percent-escaped (see [`escape_part`]) so that no part can
//! contain the separator `:`, a glob character (`*`, `?`, `[`, `]`, `\`) or a hash-tag brace. Escaping is
//! injective, so distinct ids always get distinct keys, and a key of one class never matches the SCAN
//! pattern of another ([`KeySpace::scan_pattern`]), whatever the user-supplied ids contain.
//!
//! The other way round, [`classify`] maps any raw key (as `SCAN` returns it) to what the policy says about it:
//! its class, version and role (entry, lock fence, stream dead letters, …), keyward's own key, or outside every
//! class. It recognises only what keyward could have written, so `keyward audit` can trust it.
//!
//! ```
//! # use keyward::{key::KeySpace, policy::{CacheClass, Policy}};
//! # use std::time::Duration;
//! let policy = Policy::builder("prod", "shop")
//!     .cache("product_list", CacheClass::new(Duration::from_secs(600), "catalog service"))
//!     .build()?;
//! let keys = KeySpace::new(&policy, "product_list").expect("declared class");
//! assert_eq!(keys.key(&("acme", 42))?, "prod:shop:product_list:v1:{acme:42}");
//! assert_eq!(keys.key("a:b")?, "prod:shop:product_list:v1:{a%3Ab}");
//! assert_eq!(keys.scan_pattern(), "prod:shop:product_list:v1:{*");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

use crate::policy::{Class, Policy};

/// The longest key keyward builds, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key could not be built. Every message names the class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// One id part was the empty string.
    #[error("class `{class}`: id part {index} is empty")]
    EmptyPart {
        /// The class whose key was being built.
        class: String,
        /// Zero-based position of the empty part.
        index: usize,
    },
    /// The key would exceed [`MAX_KEY_BYTES`].
    #[error("class `{class}`: key is {len} bytes, longer than the maximum of {max}")]
    TooLong {
        /// The class whose key was being built.
        class: String,
        /// Length the key would have had, in bytes.
        len: usize,
        /// The maximum, [`MAX_KEY_BYTES`].
        max: usize,
    },
    /// The id had no parts at all (an empty slice or `Vec`).
    #[error("class `{class}`: the id has no parts")]
    NoParts {
        /// The class whose key was being built.
        class: String,
    },
}

/// Something usable as the id of an entry: one or more parts.
///
/// Implemented for strings, integers, `char`, `bool`, tuples of up to four ids, and slices, arrays and
/// `Vec`s of ids; each element contributes its own parts in order.
pub trait IdParts {
    /// Pushes the raw (unescaped) parts of this id onto `out`.
    fn push_parts(&self, out: &mut Vec<String>);

    /// Calls `visit` with each raw (unescaped) part of this id, in order: the same parts as
    /// [`push_parts`](Self::push_parts), without collecting them. Keys are built through it, so an id type
    /// that can lend its parts (or format them on the stack) builds its key with one allocation, the key's
    /// own. The provided implementation collects the parts with `push_parts`; override it for speed, never
    /// to yield other parts.
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        let mut parts = Vec::new();
        self.push_parts(&mut parts);
        for part in &parts {
            visit(part);
        }
    }
}

impl<T: IdParts + ?Sized> IdParts for &T {
    fn push_parts(&self, out: &mut Vec<String>) {
        (**self).push_parts(out);
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        (**self).visit_parts(visit);
    }
}

impl IdParts for str {
    fn push_parts(&self, out: &mut Vec<String>) {
        out.push(self.to_owned());
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        visit(self);
    }
}

impl IdParts for String {
    fn push_parts(&self, out: &mut Vec<String>) {
        out.push(self.clone());
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        visit(self);
    }
}

impl IdParts for Cow<'_, str> {
    fn push_parts(&self, out: &mut Vec<String>) {
        out.push(self.as_ref().to_owned());
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        visit(self);
    }
}

macro_rules! id_parts_for_integers {
    ($($t:ty),* $(,)?) => {
        $(
            impl IdParts for $t {
                fn push_parts(&self, out: &mut Vec<String>) {
                    out.push(self.to_string());
                }
                fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
                    // The same digits as `to_string`, formatted on the stack.
                    visit(itoa::Buffer::new().format(*self));
                }
            }
        )*
    };
}

id_parts_for_integers!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

impl IdParts for char {
    fn push_parts(&self, out: &mut Vec<String>) {
        out.push(self.to_string());
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        visit(self.encode_utf8(&mut [0; 4]));
    }
}

impl IdParts for bool {
    fn push_parts(&self, out: &mut Vec<String>) {
        out.push(self.to_string());
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        visit(if *self { "true" } else { "false" });
    }
}

macro_rules! id_parts_for_tuple {
    ($($name:ident),+) => {
        impl<$($name: IdParts),+> IdParts for ($($name,)+) {
            fn push_parts(&self, out: &mut Vec<String>) {
                #[allow(non_snake_case)]
                let ($($name,)+) = self;
                $($name.push_parts(out);)+
            }
            fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
                #[allow(non_snake_case)]
                let ($($name,)+) = self;
                $($name.visit_parts(visit);)+
            }
        }
    };
}

id_parts_for_tuple!(A);
id_parts_for_tuple!(A, B);
id_parts_for_tuple!(A, B, C);
id_parts_for_tuple!(A, B, C, D);

impl<T: IdParts> IdParts for [T] {
    fn push_parts(&self, out: &mut Vec<String>) {
        for item in self {
            item.push_parts(out);
        }
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        for item in self {
            item.visit_parts(visit);
        }
    }
}

impl<T: IdParts, const N: usize> IdParts for [T; N] {
    fn push_parts(&self, out: &mut Vec<String>) {
        self.as_slice().push_parts(out);
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        self.as_slice().visit_parts(visit);
    }
}

impl<T: IdParts> IdParts for Vec<T> {
    fn push_parts(&self, out: &mut Vec<String>) {
        self.as_slice().push_parts(out);
    }
    fn visit_parts(&self, visit: &mut dyn FnMut(&str)) {
        self.as_slice().visit_parts(visit);
    }
}

/// Whether `c` is percent-encoded by [`escape_part`].
fn needs_escape(c: char) -> bool {
    matches!(c, ':' | '*' | '?' | '[' | ']' | '{' | '}' | '%' | '\\')
        || c.is_whitespace()
        || c.is_control()
}

/// Escapes one raw id part: `:` `*` `?` `[` `]` `{` `}` `%` `\`, whitespace and control characters become
/// `%XX` (uppercase hex, one per UTF-8 byte); everything else, non-ASCII letters included, is kept as is.
/// Borrows when nothing needs escaping.
pub fn escape_part(raw: &str) -> Cow<'_, str> {
    if plain(raw) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    push_escaped(&mut out, raw);
    Cow::Owned(out)
}

/// Whether `raw` is printable ASCII with nothing to escape (the common id), checked byte by byte. Every
/// ASCII byte outside `!`..=`~` is whitespace or a control character, so this agrees with [`needs_escape`].
fn plain(raw: &str) -> bool {
    raw.bytes().all(|b| {
        b.is_ascii_graphic()
            && !matches!(
                b,
                b':' | b'*' | b'?' | b'[' | b']' | b'{' | b'}' | b'%' | b'\\'
            )
    })
}

/// Appends `raw`, escaped as by [`escape_part`], to `out`.
fn push_escaped(out: &mut String, raw: &str) {
    if plain(raw) {
        out.push_str(raw);
        return;
    }
    let mut buf = [0u8; 4];
    for c in raw.chars() {
        if needs_escape(c) {
            for b in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

/// Appends the escaped parts of `id` to `key`, each preceded by `:` unless it is the first and `first_bare`;
/// `Err(index)` of the first empty part, `Ok(count)` of the parts otherwise.
fn push_parts_escaped(
    key: &mut String,
    id: &(impl IdParts + ?Sized),
    first_bare: bool,
) -> Result<usize, usize> {
    let mut count = 0;
    let mut empty = None;
    id.visit_parts(&mut |part| {
        if empty.is_some() {
            return;
        }
        if part.is_empty() {
            empty = Some(count);
            return;
        }
        if count > 0 || !first_bare {
            key.push(':');
        }
        push_escaped(key, part);
        count += 1;
    });
    empty.map_or(Ok(count), Err)
}

/// The keys of one class of a policy: builds entry keys and SCAN patterns.
#[derive(Clone, Debug)]
pub struct KeySpace {
    class: String,
    /// `{env}:{app}:{class}:v{version}:`
    prefix: String,
    /// `{env}:{app}:{class}:`
    class_prefix: String,
}

impl KeySpace {
    /// The key space of `class` in `policy`; `None` if the policy declares no such class.
    pub fn new(policy: &Policy, class: &str) -> Option<KeySpace> {
        let declared = policy.class(class)?;
        let version = declared.kind().version();
        let class_prefix = format!("{}:{}:{}:", policy.env(), policy.app(), declared.name());
        let prefix = format!("{class_prefix}v{version}:");
        Some(KeySpace {
            class: declared.name().to_owned(),
            prefix,
            class_prefix,
        })
    }

    /// The class name.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// The key of the entry with this id: `{env}:{app}:{class}:v{version}:{part:part…}`, each part escaped
    /// (the braces are literal: the id is the key's Redis Cluster hash tag).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyward::key::{KeyError, KeySpace};
    /// use keyward::policy::{CacheClass, Policy};
    ///
    /// let policy = Policy::builder("prod", "shop")
    ///     .cache("product", CacheClass::new(Duration::from_secs(60), "catalog, after each write"))
    ///     .build()?;
    /// let keys = KeySpace::new(&policy, "product").expect("declared");
    /// assert_eq!(keys.key(&("eu", 42))?, "prod:shop:product:v1:{eu:42}");
    /// assert_ne!(keys.key("a:b")?, keys.key(&("a", "b"))?); // user input cannot forge a separator
    /// assert!(matches!(keys.key(&("eu", "")), Err(KeyError::EmptyPart { index: 1, .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`KeyError`] naming the class: [`EmptyPart`](KeyError::EmptyPart) for an empty id part,
    /// [`NoParts`](KeyError::NoParts) for an id with no part (an empty slice), and
    /// [`TooLong`](KeyError::TooLong) when the key would exceed [`MAX_KEY_BYTES`].
    pub fn key(&self, id: &(impl IdParts + ?Sized)) -> Result<String, KeyError> {
        // Room for a few short parts: one allocation for the common id.
        let mut key = String::with_capacity(self.prefix.len() + 48);
        key.push_str(&self.prefix);
        key.push('{');
        self.push_id(&mut key, id, true)?;
        key.push('}');
        self.check_len(key)
    }

    /// Appends the escaped parts of `id` (see [`key`](Self::key)), refusing an id with no part or an empty
    /// one.
    fn push_id(
        &self,
        key: &mut String,
        id: &(impl IdParts + ?Sized),
        first_bare: bool,
    ) -> Result<(), KeyError> {
        match push_parts_escaped(key, id, first_bare) {
            Ok(0) => Err(KeyError::NoParts {
                class: self.class.clone(),
            }),
            Ok(_) => Ok(()),
            Err(index) => Err(KeyError::EmptyPart {
                class: self.class.clone(),
                index,
            }),
        }
    }

    fn check_len(&self, key: String) -> Result<String, KeyError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong {
                class: self.class.clone(),
                len: key.len(),
                max: MAX_KEY_BYTES,
            });
        }
        Ok(key)
    }

    /// A key whose hash tag is `tag` (keyward's own, e.g. a [`slot_tag`]; not user input, used as is) and
    /// whose id follows the tag: `{env}:{app}:{class}:v{version}:{<tag>}:<part:part…>`, each part escaped.
    /// It matches this class's [`scan_pattern`](Self::scan_pattern) like any key of the class, and Redis
    /// Cluster hashes only `tag`, so every such key with one tag is in one slot.
    pub(crate) fn tagged_key(
        &self,
        tag: &str,
        id: &(impl IdParts + ?Sized),
    ) -> Result<String, KeyError> {
        debug_assert!(
            !tag.is_empty() && !tag.contains(['{', '}']),
            "a hash tag is non-empty and brace-free"
        );
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 48);
        key.push_str(&self.prefix);
        key.push('{');
        key.push_str(tag);
        key.push('}');
        self.push_id(&mut key, id, false)?;
        self.check_len(key)
    }

    /// The id parts (still escaped) of a key built by [`tagged_key`](Self::tagged_key) of this key space,
    /// after its `{tag}:`; `None` for any other key.
    pub(crate) fn tagged_id<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix('{')?;
        let (tag, id) = rest.split_once("}:")?;
        (!tag.is_empty() && !tag.contains('{')).then_some(id)
    }

    /// SCAN MATCH pattern covering exactly this class and version: `prod:shop:product_list:v1:{*`.
    pub fn scan_pattern(&self) -> String {
        format!("{}{{*", self.prefix)
    }

    /// SCAN MATCH pattern covering every version of this class: `prod:shop:product_list:v*`. The `:` after
    /// the class name keeps it from matching classes that merely start with this name.
    pub fn all_versions_pattern(&self) -> String {
        format!("{}v*", self.class_prefix)
    }
}

/// An internal key of the namespace: `{env}:{app}:_kw:{name}`. Class names cannot start with `_`, so no
/// class pattern matches it. `name` is keyward's own, not user input, and is used as is.
pub fn internal_key(policy: &Policy, name: &str) -> String {
    format!("{}:{}:_kw:{name}", policy.env(), policy.app())
}

/// SCAN MATCH pattern for everything keyward writes in a namespace: `{env}:{app}:*`.
pub fn namespace_pattern(policy: &Policy) -> String {
    format!("{}:{}:*", policy.env(), policy.app())
}

/// What a key is for within its class (see [`classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KeyRole {
    /// An entry: a cache value (or fill lease), rate-limit state, a session record, a lock, an idempotency
    /// record (`…:v{n}:{<id>}`, or `…:v{n}:{<slot tag>}:<id>` for a session record).
    Entry,
    /// A lock's fencing counter: `…:v{n}:{<name>}:f`.
    LockFence,
    /// A lock's fenced value: `…:v{n}:{<name>}:w`.
    LockValue,
    /// A user's index of sessions (a sorted set): `…:v{n}:{u:<user>}`.
    SessionIndex,
    /// The stream itself: `…:v{n}:{<class>}`. It has no TTL; its retention bounds it.
    Stream,
    /// A stream's dead letters: `…:v{n}:{<class>}:dead`. No TTL; its own retention bounds it.
    DeadLetters,
    /// A stream's wake-up marker: `…:v{n}:{<class>}:wake` (short-lived).
    StreamWake,
    /// A cache entry's write-behind version marker: `…:v{n}:{<id>}:wv` (the newest write-behind write the
    /// entry took, `ms-seq`; the entry's TTL).
    WriteVersion,
}

impl KeyRole {
    /// A stable lower-case name: `entry`, `lock_fence`, `lock_value`, `session_index`, `stream`,
    /// `dead_letters`, `stream_wake`, `write_version`.
    pub fn name(self) -> &'static str {
        match self {
            KeyRole::Entry => "entry",
            KeyRole::LockFence => "lock_fence",
            KeyRole::LockValue => "lock_value",
            KeyRole::SessionIndex => "session_index",
            KeyRole::Stream => "stream",
            KeyRole::DeadLetters => "dead_letters",
            KeyRole::StreamWake => "stream_wake",
            KeyRole::WriteVersion => "write_version",
        }
    }
}

/// A key that has the layout of a declared class (see [`classify`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassKey<'p> {
    class: &'p Class,
    version: u32,
    role: KeyRole,
    id: String,
}

impl<'p> ClassKey<'p> {
    /// The declared class.
    pub fn class(&self) -> &'p Class {
        self.class
    }

    /// The version in the key (`v{n}`).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The version the policy declares for the class now.
    pub fn current_version(&self) -> u32 {
        self.class.kind().version()
    }

    /// Whether the key's version is the class's current one.
    pub fn is_current(&self) -> bool {
        self.version == self.current_version()
    }

    /// Whether the key belongs to an older version than the current one: code no longer reads it, and a
    /// purge of that version may delete it. (A *newer* version is neither current nor old: code not yet
    /// described by this policy wrote it.)
    pub fn is_old(&self) -> bool {
        self.version < self.current_version()
    }

    /// What the key is for within its class.
    pub fn role(&self) -> KeyRole {
        self.role
    }

    /// The id as it is in the key, still escaped: the hash tag's content for most keys, the text after
    /// `{<slot tag>}:` for a session record, the user part of a session index. Unescape each `:`-separated
    /// part with [`unescape_part`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The longest TTL the policy lets a key of this class and role carry; `None` for a key that carries no
    /// TTL by design (a stream and its dead letters, bounded by their retention instead). Bounds: cache —
    /// `ttl` + max jitter + `lease_ttl` (+ `stale_grace` + `fail_safe_throttle` + `refresh_ahead` with a
    /// grace); rate limit — `window × max(2, ⌈capacity / limit⌉)`; session — `absolute`; lock — `ttl`, its
    /// fence and fenced value `fence_ttl`; idempotency — `ttl`; stream wake-up marker — one hour; channel — none
    /// is stored, `Some(0)`.
    pub fn max_ttl(&self) -> Option<Duration> {
        let kind = self.class.kind();
        if let Some(c) = self.class.as_cache() {
            let grace = c.stale_grace_value().map_or(Duration::ZERO, |g| {
                g.saturating_add(c.fail_safe_throttle_value())
                    .saturating_add(c.refresh_ahead_value().unwrap_or_default())
            });
            return Some(
                c.ttl_value()
                    .saturating_add(c.max_jitter())
                    .saturating_add(c.lease_ttl_value())
                    .saturating_add(grace),
            );
        }
        if let Some(c) = self.class.as_rate_limit() {
            let windows = c.capacity().div_ceil(c.limit_value().max(1)).max(2);
            return Some(
                c.window_value()
                    .saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX)),
            );
        }
        if let Some(c) = self.class.as_session() {
            return Some(c.absolute_value());
        }
        if let Some(c) = self.class.as_lock() {
            return Some(match self.role {
                KeyRole::LockFence | KeyRole::LockValue => c.fence_ttl_value(),
                _ => c.ttl_value(),
            });
        }
        if let Some(c) = self.class.as_idempotency() {
            return Some(c.ttl_value().max(c.lease_value()));
        }
        if kind.name() == "stream" {
            return match self.role {
                KeyRole::StreamWake => Some(Duration::from_secs(3600)),
                _ => None,
            };
        }
        Some(Duration::ZERO)
    }
}

/// What the policy says about one raw key (see [`classify`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum KeyClass<'p> {
    /// A key with the layout of a declared class, of the current version or another.
    Class(ClassKey<'p>),
    /// One of keyward's own bookkeeping keys: `{env}:{app}:_kw:…` (e.g. the epochs hash `_kw:gens`).
    Internal,
    /// Inside the namespace (`{env}:{app}:…`) but not a key keyward writes: an undeclared class, a malformed
    /// version or id (badly escaped, not UTF-8), or an unknown suffix.
    Unknown,
    /// Outside the namespace: another application, environment, or hand-made key.
    Foreign,
}

/// Maps a raw key, as SCAN returns it (any bytes), to what `policy` says about it: which class and version
/// it belongs to and its role there ([`KeyClass::Class`]), keyward's own key ([`KeyClass::Internal`]), or
/// outside every class ([`KeyClass::Unknown`] inside the namespace, [`KeyClass::Foreign`] outside it).
///
/// A key is recognised only if keyward could have built it: the id must be escaped exactly as
/// [`escape_part`] escapes (canonical `%XX`, no empty part), so a hand-formatted key that merely starts
/// like a class's (`prod:shop:product_list:v1:en`, `prod:shop:product_list:v1:{a b}`) is `Unknown`. The
/// suffixes keyward adds are recognised per kind: `:f`/`:w` for locks, `:wv` for caches (write-behind),
/// `:dead`/`:wake` for streams, the
/// slot-tagged `{s:…}:<id>` records and `{u:<user>}` indexes for sessions. Never fails: an unexpected key is a
/// value, not an error.
///
/// ```
/// # use keyward::{key::{classify, KeyClass, KeyRole, KeySpace}, policy::{CacheClass, Policy}};
/// # use std::time::Duration;
/// let policy = Policy::builder("prod", "shop")
///     .cache("product_list", CacheClass::new(Duration::from_secs(600), "catalog service").version(2))
///     .build()?;
/// let KeyClass::Class(k) = classify(&policy, b"prod:shop:product_list:v1:{en:caf\xc3\xa9}") else { panic!() };
/// assert_eq!((k.class().name(), k.version(), k.is_old(), k.role()), ("product_list", 1, true, KeyRole::Entry));
/// assert_eq!(classify(&policy, b"prod:shop:_kw:gens"), KeyClass::Internal);
/// assert_eq!(classify(&policy, b"prod:shop:product_list:v2:en"), KeyClass::Unknown);
/// assert_eq!(classify(&policy, b"app:v1:products:list:en"), KeyClass::Foreign);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn classify<'p>(policy: &'p Policy, key: &[u8]) -> KeyClass<'p> {
    let Some(rest) = key
        .strip_prefix(policy.env().as_bytes())
        .and_then(|k| k.strip_prefix(b":"))
        .and_then(|k| k.strip_prefix(policy.app().as_bytes()))
        .and_then(|k| k.strip_prefix(b":"))
    else {
        return KeyClass::Foreign;
    };
    if rest.starts_with(b"_kw:") {
        return KeyClass::Internal;
    }
    match std::str::from_utf8(rest)
        .ok()
        .and_then(|rest| class_key(policy, rest))
    {
        Some(k) => KeyClass::Class(k),
        None => KeyClass::Unknown,
    }
}

/// `rest` is the key after `{env}:{app}:`.
fn class_key<'p>(policy: &'p Policy, rest: &str) -> Option<ClassKey<'p>> {
    let (name, rest) = rest.split_once(':')?;
    let class = policy.class(name)?;
    let (version, rest) = rest.strip_prefix('v')?.split_once(':')?;
    if version.is_empty()
        || version.starts_with('0')
        || !version.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let version: u32 = version.parse().ok()?;
    let (tag, suffix) = rest.strip_prefix('{')?.split_once('}')?;
    if tag.is_empty() {
        return None;
    }
    let kind = class.kind().name();
    let is_stream = kind == "stream" && tag == class.name();
    let (role, id) = match (kind, suffix) {
        ("stream", "") if is_stream => (KeyRole::Stream, tag),
        ("stream", ":dead") if is_stream => (KeyRole::DeadLetters, tag),
        ("stream", ":wake") if is_stream => (KeyRole::StreamWake, tag),
        ("stream", _) => return None,
        ("session", "") => (KeyRole::SessionIndex, tag.strip_prefix("u:")?),
        ("session", id) => {
            let id = id.strip_prefix(':')?;
            let slot = tag.strip_prefix(SLOT_TAG_PREFIX)?;
            if slot.is_empty() || !slot.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            (KeyRole::Entry, id)
        }
        ("lock", ":f") => (KeyRole::LockFence, tag),
        ("lock", ":w") => (KeyRole::LockValue, tag),
        ("cache", ":wv") => (KeyRole::WriteVersion, tag),
        (_, "") => (KeyRole::Entry, tag),
        _ => return None,
    };
    if !id.split(':').all(|part| unescape_part(part).is_some()) {
        return None;
    }
    Some(ClassKey {
        class,
        version,
        role,
        id: id.to_owned(),
    })
}

/// The raw id part that [`escape_part`] turned into `escaped`; `None` if `escaped` is not exactly what
/// `escape_part` produces for any input (empty, a character that should have been escaped, a `%` not
/// followed by two uppercase hex digits, an escape of a character that needs none, or bytes that are not
/// UTF-8 once decoded).
pub fn unescape_part(escaped: &str) -> Option<String> {
    if escaped.is_empty() {
        return None;
    }
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'A'..=b'F' => Some(b - b'A' + 10),
                _ => None,
            };
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let raw = String::from_utf8(out).ok()?;
    (escape_part(&raw) == escaped).then_some(raw)
}

/// The number of hash slots of a Redis Cluster.
pub(crate) const CLUSTER_SLOTS: u16 = 16384;

/// The Redis Cluster hash slot of `key`, by Cluster's own rule: if the key has a `{` and, after it, a `}`
/// with at least one byte between them, only the bytes between that first `{` and the first `}` after it
/// are hashed (the hash tag); otherwise the whole key is. Slot = CRC16-XMODEM(hashed bytes) mod 16384.
pub(crate) fn cluster_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let after = &key[open + 1..];
            let close = after.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &after[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % CLUSTER_SLOTS
}

/// One short hash tag per slot, index = slot (see [`slot_tag`]).
static SLOT_TAGS: LazyLock<Vec<Box<str>>> = LazyLock::new(build_slot_tags);

/// Prefix of every [`slot_tag`]: `s` for slot.
const SLOT_TAG_PREFIX: &str = "s:";

/// A short ASCII hash tag whose slot is `slot` (taken mod 16384): `s:` followed by base36 digits, at most 6
/// bytes, so `cluster_slot(format!("{{{tag}}}"))` is `slot`. The table is built once per process (about
/// 150 000 CRC16s over a few bytes, a few milliseconds) by a fixed search: the tag of a slot is the first of
/// `s:0`, `s:1`, … `s:a`, … `s:10`, … that hashes to it. **Stored keys depend on these tags: never change
/// the search.**
pub(crate) fn slot_tag(slot: u16) -> &'static str {
    &SLOT_TAGS[usize::from(slot % CLUSTER_SLOTS)]
}

fn build_slot_tags() -> Vec<Box<str>> {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tags: Vec<Option<Box<str>>> = vec![None; usize::from(CLUSTER_SLOTS)];
    let mut missing = tags.len();
    let mut buf = [0u8; 16];
    let prefix = SLOT_TAG_PREFIX.as_bytes();
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut n: u64 = 0;
    while missing > 0 {
        // base36 of n, most significant digit first, after the prefix.
        let mut digits = [0u8; 13];
        let mut len = 0;
        let mut rest = n;
        loop {
            digits[len] = DIGITS[(rest % 36) as usize];
            len += 1;
            rest /= 36;
            if rest == 0 {
                break;
            }
        }
        for (i, d) in digits[..len].iter().rev().enumerate() {
            buf[prefix.len() + i] = *d;
        }
        let tag = &buf[..prefix.len() + len];
        let slot = usize::from(crc16::State::<crc16::XMODEM>::calculate(tag) % CLUSTER_SLOTS);
        if tags[slot].is_none() {
            // The buffer holds only ASCII.
            tags[slot] = Some(String::from_utf8_lossy(tag).into());
            missing -= 1;
        }
        n += 1;
    }
    tags.into_iter().flatten().collect()
}

/// Redis glob matching, byte-based: the subset SCAN MATCH uses (`*`, `?`, `[...]` with ranges and `^`
/// negation, `\` escape), with Redis's edge cases (an unclosed `[` runs to the end of the pattern, a
/// trailing `\` matches itself). Runs in O(pattern × text) time at worst.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // After a `*`: where the pattern resumes and the text position the star has consumed up to.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() && pattern[p] == b'*' {
            while p < pattern.len() && pattern[p] == b'*' {
                p += 1;
            }
            star = Some((p, t));
            continue;
        }
        if t == text.len() {
            return p == pattern.len();
        }
        if p < pattern.len() {
            let (ok, next) = match_one(pattern, p, text[t]);
            if ok {
                p = next;
                t += 1;
                continue;
            }
        }
        // Mismatch, or pattern exhausted with text left: let the last star swallow one more byte.
        match star {
            Some((resume, consumed)) => {
                star = Some((resume, consumed + 1));
                p = resume;
                t = consumed + 1;
            }
            None => return false,
        }
    }
}

/// Matches the single-byte token at `pattern[p]` (not `*`) against `c`; returns whether it matched and
/// where the next token starts.
fn match_one(pattern: &[u8], p: usize, c: u8) -> (bool, usize) {
    match pattern[p] {
        b'?' => (true, p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c, p + 2),
        b'[' => {
            let mut i = p + 1;
            let negate = i < pattern.len() && pattern[i] == b'^';
            if negate {
                i += 1;
            }
            let mut matched = false;
            while i < pattern.len() {
                if pattern[i] == b'\\' && i + 1 < pattern.len() {
                    matched |= pattern[i + 1] == c;
                    i += 2;
                } else if pattern[i] == b']' {
                    i += 1;
                    break;
                } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' {
                    let (lo, hi) = (
                        pattern[i].min(pattern[i + 2]),
                        pattern[i].max(pattern[i + 2]),
                    );
                    matched |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    matched |= pattern[i] == c;
                    i += 1;
                }
            }
            (matched != negate, i)
        }
        other => (other == c, p + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CacheClass;
    use proptest::prelude::*;
    use std::time::Duration;

    fn class() -> CacheClass {
        CacheClass::new(Duration::from_secs(600), "tests")
    }

    fn policy() -> Policy {
        Policy::builder("prod", "shop")
            .cache("product_list", class())
            .cache("product", class().version(3))
            .build()
            .unwrap()
    }

    fn space() -> KeySpace {
        KeySpace::new(&policy(), "product_list").unwrap()
    }

    fn audit_policy() -> Policy {
        use crate::policy::{
            Algorithm, IdempotencyClass, LockClass, RateLimitClass, Retention, SessionClass,
            StreamClass,
        };
        Policy::builder("prod", "shop")
            .cache("product_list", class().version(2))
            .lock("invoice_run", LockClass::new(Duration::from_secs(30)))
            .session(
                "web_session",
                SessionClass::new(Duration::from_secs(1800), Duration::from_secs(43200)),
            )
            .stream("order_events", StreamClass::new(Retention::maxlen(1000)))
            .rate_limit(
                "api",
                RateLimitClass::new(Algorithm::Gcra, 100, Duration::from_secs(60)),
            )
            .idempotency("charge", IdempotencyClass::new())
            .build()
            .unwrap()
    }

    fn class_key<'p>(policy: &'p Policy, key: &[u8]) -> ClassKey<'p> {
        match classify(policy, key) {
            KeyClass::Class(k) => k,
            other => panic!("{:?} classified as {other:?}", String::from_utf8_lossy(key)),
        }
    }

    #[test]
    fn classify_recognises_every_key_keyward_builds() {
        let p = audit_policy();
        let cache = KeySpace::new(&p, "product_list").unwrap();
        for id in [
            "a:b",
            "caf\u{e9} \u{1F600}",
            "{x}*?[]%\\",
            "tab\there",
            "\u{7f}\u{0}",
        ] {
            let key = cache.key(&("en", id)).unwrap();
            let k = class_key(&p, key.as_bytes());
            assert_eq!(k.class().name(), "product_list");
            assert_eq!((k.version(), k.current_version()), (2, 2));
            assert!(k.is_current() && !k.is_old());
            assert_eq!(k.role(), KeyRole::Entry);
            let parts: Vec<String> = k
                .id()
                .split(':')
                .map(|part| unescape_part(part).unwrap())
                .collect();
            assert_eq!(parts, ["en", id], "{key}");
            let marker = format!("{key}:wv");
            let m = class_key(&p, marker.as_bytes());
            assert_eq!((m.role(), m.id()), (KeyRole::WriteVersion, k.id()));
        }
        let lock = KeySpace::new(&p, "invoice_run")
            .unwrap()
            .key("nightly")
            .unwrap();
        assert_eq!(class_key(&p, lock.as_bytes()).role(), KeyRole::Entry);
        let fence = format!("{lock}:f");
        let value = format!("{lock}:w");
        assert_eq!(class_key(&p, fence.as_bytes()).role(), KeyRole::LockFence);
        assert_eq!(class_key(&p, value.as_bytes()).role(), KeyRole::LockValue);
        let stream = KeySpace::new(&p, "order_events").unwrap();
        let skey = stream.key("order_events").unwrap();
        assert_eq!(class_key(&p, skey.as_bytes()).role(), KeyRole::Stream);
        assert_eq!(class_key(&p, skey.as_bytes()).max_ttl(), None);
        let dead = format!("{skey}:dead");
        let wake = format!("{skey}:wake");
        assert_eq!(class_key(&p, dead.as_bytes()).role(), KeyRole::DeadLetters);
        assert_eq!(class_key(&p, wake.as_bytes()).role(), KeyRole::StreamWake);
        let sessions = KeySpace::new(&p, "web_session").unwrap();
        let record = sessions.tagged_key(slot_tag(4242), "Ab-9_x").unwrap();
        let k = class_key(&p, record.as_bytes());
        assert_eq!((k.role(), k.id()), (KeyRole::Entry, "Ab-9_x"));
        let index = sessions.key(&["u", "al:ice"]).unwrap();
        let k = class_key(&p, index.as_bytes());
        assert_eq!((k.role(), k.id()), (KeyRole::SessionIndex, "al%3Aice"));
        let rl = KeySpace::new(&p, "api").unwrap().key("tenant-7").unwrap();
        assert_eq!(class_key(&p, rl.as_bytes()).class().name(), "api");
        let charge = KeySpace::new(&p, "charge")
            .unwrap()
            .key(&("t", "k"))
            .unwrap();
        assert_eq!(class_key(&p, charge.as_bytes()).class().name(), "charge");
        assert_eq!(classify(&p, b"prod:shop:_kw:gens"), KeyClass::Internal);
        assert_eq!(classify(&p, b"prod:shop:_kw:probe:x"), KeyClass::Internal);
    }

    #[test]
    fn classify_tells_old_and_newer_versions() {
        let p = audit_policy();
        let old = class_key(&p, b"prod:shop:product_list:v1:{en}");
        assert!(old.is_old() && !old.is_current());
        let newer = class_key(&p, b"prod:shop:product_list:v3:{en}");
        assert!(!newer.is_old() && !newer.is_current());
        assert_eq!(newer.version(), 3);
    }

    #[test]
    fn classify_refuses_what_keyward_never_writes() {
        let p = audit_policy();
        for key in [
            &b"app:v1:products:list:en"[..],
            b"prod:user:session:42",
            b"staging:shop:product_list:v2:{en}",
            b"prodx:shop:product_list:v2:{en}",
            b"prod",
            b"",
        ] {
            assert_eq!(classify(&p, key), KeyClass::Foreign, "{key:?}");
        }
        for key in [
            &b"prod:shop:product_list:v2:en"[..],
            b"prod:shop:product_list:v2:{}",
            b"prod:shop:product_list:v2:{a b}",
            b"prod:shop:product_list:v2:{a*}",
            b"prod:shop:product_list:v2:{a%3a}",
            b"prod:shop:product_list:v2:{%41}",
            b"prod:shop:product_list:v2:{a%3}",
            b"prod:shop:product_list:v2:{a::b}",
            b"prod:shop:product_list:v2:{a}:f",
            b"prod:shop:product_list:v02:{a}",
            b"prod:shop:product_list:v:{a}",
            b"prod:shop:product_list:vx:{a}",
            b"prod:shop:product_list:v99999999999:{a}",
            b"prod:shop:product_list:v2:{\xff\xfe}",
            b"prod:shop:product_list:v2:{%FF}",
            b"prod:shop:undeclared:v1:{a}",
            b"prod:shop:invoice_run:v1:{a}:x",
            b"prod:shop:order_events:v1:{other}",
            b"prod:shop:order_events:v1:{order_events}:tail",
            b"prod:shop:web_session:v1:{x:1}:abc",
            b"prod:shop:web_session:v1:{s:1}:",
            b"prod:shop:web_session:v1:{s:1}",
            b"prod:shop:\xc3",
            b"prod:shop:",
        ] {
            assert_eq!(
                classify(&p, key),
                KeyClass::Unknown,
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn max_ttl_follows_the_class() {
        let p = audit_policy();
        let cache = class_key(&p, b"prod:shop:product_list:v2:{en}");
        // 600 s + 10 % jitter + the default 10 s lease.
        assert_eq!(cache.max_ttl(), Some(Duration::from_secs(670)));
        let lock = class_key(&p, b"prod:shop:invoice_run:v1:{a}");
        assert_eq!(lock.max_ttl(), Some(Duration::from_secs(30)));
        let fence = class_key(&p, b"prod:shop:invoice_run:v1:{a}:f");
        assert_eq!(fence.max_ttl(), Some(Duration::from_secs(7 * 86400)));
        let index = class_key(&p, b"prod:shop:web_session:v1:{u:bob}");
        assert_eq!(index.max_ttl(), Some(Duration::from_secs(43200)));
        let rl = class_key(&p, b"prod:shop:api:v1:{t}");
        assert_eq!(rl.max_ttl(), Some(Duration::from_secs(120)));
        let dead = class_key(&p, b"prod:shop:order_events:v1:{order_events}:dead");
        assert_eq!(dead.max_ttl(), None);
    }

    #[test]
    fn unescape_inverts_escape() {
        for raw in ["plain", "a:b", "caf\u{e9}", "%41", "\u{1F600} *?", "\n\r\t"] {
            assert_eq!(unescape_part(&escape_part(raw)).as_deref(), Some(raw));
        }
        assert_eq!(unescape_part(""), None);
        assert_eq!(unescape_part("%4"), None);
    }

    proptest! {
        #[test]
        fn classify_finds_any_escaped_id(parts in proptest::collection::vec("\\PC{1,12}", 1..4)) {
            let p = audit_policy();
            let key = KeySpace::new(&p, "product_list").unwrap().key(&parts).unwrap();
            let k = class_key(&p, key.as_bytes());
            let back: Vec<String> = k.id().split(':').map(|s| unescape_part(s).unwrap()).collect();
            prop_assert_eq!(back, parts);
        }
    }

    #[test]
    fn exact_layout() {
        let ks = space();
        assert_eq!(ks.class(), "product_list");
        assert_eq!(
            ks.key(&("acme", 42)).unwrap(),
            "prod:shop:product_list:v1:{acme:42}"
        );
        assert_eq!(ks.key("acme").unwrap(), "prod:shop:product_list:v1:{acme}");
        assert_eq!(ks.key(&42u64).unwrap(), "prod:shop:product_list:v1:{42}");
        let v3 = KeySpace::new(&policy(), "product").unwrap();
        assert_eq!(v3.key(&-7i32).unwrap(), "prod:shop:product:v3:{-7}");
        assert_eq!(v3.scan_pattern(), "prod:shop:product:v3:{*");
        assert_eq!(ks.scan_pattern(), "prod:shop:product_list:v1:{*");
        assert_eq!(ks.all_versions_pattern(), "prod:shop:product_list:v*");
        assert!(KeySpace::new(&policy(), "nope").is_none());
    }

    #[test]
    fn escapes_each_special_char() {
        for (raw, escaped) in [
            (":", "%3A"),
            ("*", "%2A"),
            ("?", "%3F"),
            ("[", "%5B"),
            ("]", "%5D"),
            ("{", "%7B"),
            ("}", "%7D"),
            ("%", "%25"),
            ("\\", "%5C"),
            (" ", "%20"),
            ("\t", "%09"),
            ("\n", "%0A"),
            ("\r", "%0D"),
            ("\0", "%00"),
            ("\u{7f}", "%7F"),
            ("\u{85}", "%C2%85"),
            ("\u{a0}", "%C2%A0"),
            ("\u{3000}", "%E3%80%80"),
            ("\u{2028}", "%E2%80%A8"),
            ("a:b c", "a%3Ab%20c"),
        ] {
            assert_eq!(escape_part(raw), escaped, "{raw:?}");
        }
        assert!(matches!(
            escape_part("plain-id_1.x"),
            Cow::Borrowed("plain-id_1.x")
        ));
    }

    #[test]
    fn case_and_unicode_preserved() {
        let ks = space();
        assert_eq!(ks.key("AcMe").unwrap(), "prod:shop:product_list:v1:{AcMe}");
        assert_eq!(
            ks.key("Zürich-東京-😀").unwrap(),
            "prod:shop:product_list:v1:{Zürich-東京-😀}"
        );
        assert_eq!(escape_part("Ünïcödé"), "Ünïcödé");
    }

    #[test]
    fn empty_and_missing_parts_are_errors() {
        let ks = space();
        assert_eq!(
            ks.key(""),
            Err(KeyError::EmptyPart {
                class: "product_list".into(),
                index: 0
            })
        );
        assert_eq!(
            ks.key(&("a", "")),
            Err(KeyError::EmptyPart {
                class: "product_list".into(),
                index: 1
            })
        );
        let none: Vec<String> = Vec::new();
        assert_eq!(
            ks.key(&none),
            Err(KeyError::NoParts {
                class: "product_list".into()
            })
        );
        let err = ks.key(&("a", "", "c")).unwrap_err();
        assert!(err.to_string().contains("product_list"), "{err}");
    }

    #[test]
    fn too_long_is_an_error() {
        let ks = space();
        let overhead = "prod:shop:product_list:v1:{}".len();
        let fits = "x".repeat(MAX_KEY_BYTES - overhead);
        assert_eq!(ks.key(fits.as_str()).unwrap().len(), MAX_KEY_BYTES);
        let over = "x".repeat(MAX_KEY_BYTES - overhead + 1);
        assert_eq!(
            ks.key(over.as_str()),
            Err(KeyError::TooLong {
                class: "product_list".into(),
                len: MAX_KEY_BYTES + 1,
                max: MAX_KEY_BYTES
            })
        );
        // Escaping counts towards the length.
        let escaped = ":".repeat(400);
        let err = ks.key(escaped.as_str()).unwrap_err();
        assert!(
            matches!(err, KeyError::TooLong { len, .. } if len == overhead + 1200),
            "{err}"
        );
        assert!(err.to_string().contains("product_list"));
    }

    #[test]
    fn tuples_slices_and_other_ids() {
        let ks = space();
        let p = "prod:shop:product_list:v1:";
        assert_eq!(ks.key(&("a",)).unwrap(), format!("{p}{{a}}"));
        assert_eq!(ks.key(&("a", 1u8, 'c')).unwrap(), format!("{p}{{a:1:c}}"));
        assert_eq!(
            ks.key(&("a", 1i128, true, String::from("d"))).unwrap(),
            format!("{p}{{a:1:true:d}}")
        );
        assert_eq!(ks.key(&vec!["x", "y"]).unwrap(), format!("{p}{{x:y}}"));
        assert_eq!(ks.key(&["x", "y"][..]).unwrap(), format!("{p}{{x:y}}"));
        assert_eq!(ks.key(&[1usize, 2, 3]).unwrap(), format!("{p}{{1:2:3}}"));
        let owned = String::from("o");
        assert_eq!(ks.key(&&owned).unwrap(), format!("{p}{{o}}"));
        assert_eq!(
            ks.key(&(("a", "b"), vec![1u16])).unwrap(),
            format!("{p}{{a:b:1}}")
        );
        // A part holding a ':' is not two parts.
        assert_ne!(ks.key("a:b").unwrap(), ks.key(&("a", "b")).unwrap());
    }

    /// The parts `visit_parts` yields.
    fn visited(id: &(impl IdParts + ?Sized)) -> Vec<String> {
        let mut parts = Vec::new();
        id.visit_parts(&mut |p| parts.push(p.to_owned()));
        parts
    }

    fn pushed(id: &(impl IdParts + ?Sized)) -> Vec<String> {
        let mut parts = Vec::new();
        id.push_parts(&mut parts);
        parts
    }

    #[test]
    fn visit_parts_yields_what_push_parts_pushes() {
        macro_rules! same {
            ($($id:expr),* $(,)?) => {
                $(assert_eq!(visited(&$id), pushed(&$id), "{:?}", $id);)*
            };
        }
        same!(
            u8::MAX,
            u16::MAX,
            u32::MAX,
            u64::MAX,
            u128::MAX,
            usize::MAX,
            0u64,
            i8::MIN,
            i16::MIN,
            i32::MIN,
            i64::MIN,
            i128::MIN,
            isize::MIN,
            -1i64,
            7i32,
            'x',
            'é',
            '😀',
            ':',
            true,
            false,
            "a:b",
            String::from("S"),
            Cow::Borrowed("c"),
            ("a", 1u8, 'c', -4i16),
            vec![("x", 2u64), ("y", 3)],
            [1u32, 2],
            vec!["", "e"],
            &&("nested", [true])
        );
        let empty: Vec<u8> = Vec::new();
        assert_eq!(visited(&empty), pushed(&empty));
    }

    /// An id type from outside keyward: only `push_parts`, so keys go through the provided `visit_parts`.
    struct Foreign(Vec<String>);

    impl IdParts for Foreign {
        fn push_parts(&self, out: &mut Vec<String>) {
            out.extend(self.0.iter().cloned());
        }
    }

    #[test]
    fn an_id_with_only_push_parts_gets_the_same_key() {
        let ks = space();
        let parts = vec!["a b".to_owned(), "42".to_owned()];
        assert_eq!(
            ks.key(&Foreign(parts.clone())).unwrap(),
            ks.key(&parts).unwrap()
        );
        assert_eq!(
            ks.key(&Foreign(vec!["x".into(), String::new()])),
            Err(KeyError::EmptyPart {
                class: "product_list".into(),
                index: 1
            })
        );
        assert_eq!(
            ks.key(&Foreign(Vec::new())),
            Err(KeyError::NoParts {
                class: "product_list".into()
            })
        );
    }

    #[test]
    fn internal_and_namespace_keys() {
        let p = policy();
        assert_eq!(internal_key(&p, "epoch"), "prod:shop:_kw:epoch");
        assert_eq!(namespace_pattern(&p), "prod:shop:*");
        let internal = internal_key(&p, "epoch:product_list");
        for class in p.classes() {
            let ks = KeySpace::new(&p, class.name()).unwrap();
            assert!(!glob_match(
                ks.scan_pattern().as_bytes(),
                internal.as_bytes()
            ));
            assert!(!glob_match(
                ks.all_versions_pattern().as_bytes(),
                internal.as_bytes()
            ));
        }
        assert!(glob_match(
            namespace_pattern(&p).as_bytes(),
            internal.as_bytes()
        ));
        assert!(glob_match(
            namespace_pattern(&p).as_bytes(),
            space().key("x").unwrap().as_bytes()
        ));
    }

    #[test]
    fn all_versions_pattern_does_not_match_longer_class_names() {
        let p = Policy::builder("prod", "shop")
            .cache("product_list", class())
            .cache("product_list2", class())
            .build()
            .unwrap();
        let a = KeySpace::new(&p, "product_list").unwrap();
        let b = KeySpace::new(&p, "product_list2").unwrap();
        let bk = b.key("x").unwrap();
        assert!(!glob_match(
            a.all_versions_pattern().as_bytes(),
            bk.as_bytes()
        ));
        assert!(!glob_match(a.scan_pattern().as_bytes(), bk.as_bytes()));
        let v7 = KeySpace::new(
            &Policy::builder("prod", "shop")
                .cache("product_list", class().version(7))
                .build()
                .unwrap(),
            "product_list",
        )
        .unwrap();
        let old = v7.key("x").unwrap();
        assert!(glob_match(
            a.all_versions_pattern().as_bytes(),
            old.as_bytes()
        ));
        assert!(!glob_match(a.scan_pattern().as_bytes(), old.as_bytes()));
    }

    #[test]
    fn cluster_slot_follows_the_hash_tag_rule() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT` on redis-server 7.0.
        assert_eq!(cluster_slot(b"foo"), 12182);
        assert_eq!(cluster_slot(b"bar"), 5061);
        assert_eq!(cluster_slot(b"123456789"), 0x31C3); // the CRC16 check value, under 16384
        assert_eq!(cluster_slot(b""), 0);
        let following = cluster_slot(b"{user1000}.following");
        assert_eq!(following, cluster_slot(b"{user1000}.followers"));
        assert_eq!(following, cluster_slot(b"user1000"));
        // The first `{` and the first `}` after it; an empty tag hashes the whole key.
        assert_eq!(cluster_slot(b"foo{}{bar}"), crc(b"foo{}{bar}"));
        assert_eq!(cluster_slot(b"foo{}{bar}"), 8363);
        assert_eq!(cluster_slot(b"foo{{bar}}zap"), crc(b"{bar"));
        assert_eq!(cluster_slot(b"foo{{bar}}zap"), 4015);
        assert_eq!(cluster_slot(b"foo{bar}{zap}"), crc(b"bar"));
        assert_eq!(cluster_slot(b"{bar"), crc(b"{bar"));
        assert_eq!(cluster_slot(b"}bar{"), crc(b"}bar{"));
        assert_eq!(cluster_slot(b"a}{b}"), crc(b"b"));
        assert_eq!(cluster_slot(b"a}{b}"), 3300);
        // keyward's entry keys: the braces around the id are the tag.
        let ks = space();
        assert_eq!(
            cluster_slot(ks.key(&("acme", 42)).unwrap().as_bytes()),
            crc(b"acme:42")
        );
    }

    fn crc(bytes: &[u8]) -> u16 {
        crc16::State::<crc16::XMODEM>::calculate(bytes) % 16384
    }

    #[test]
    fn every_slot_has_a_short_tag_of_its_own() {
        let started = std::time::Instant::now();
        let tags = build_slot_tags();
        eprintln!(
            "slot tag table: {} tags built in {:?}, longest {} bytes",
            tags.len(),
            started.elapsed(),
            tags.iter().map(|t| t.len()).max().unwrap_or(0)
        );
        assert_eq!(tags.len(), usize::from(CLUSTER_SLOTS));
        let mut distinct = std::collections::HashSet::new();
        for slot in 0..CLUSTER_SLOTS {
            let tag = slot_tag(slot);
            assert_eq!(&*tags[usize::from(slot)], tag, "the table is deterministic");
            assert!(tag.starts_with("s:") && tag.len() <= 6, "{tag}");
            assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':'));
            assert_eq!(cluster_slot(format!("{{{tag}}}").as_bytes()), slot, "{tag}");
            assert!(distinct.insert(tag));
        }
        // Pinned: stored session keys depend on these tags.
        assert_eq!(slot_tag(12182), slot_tag(12182 + CLUSTER_SLOTS));
        // Checked with `CLUSTER KEYSLOT {s:3m6}` etc. on a cluster-enabled redis-server 7.0.
        for (slot, tag) in [(0, "s:3m6"), (1, "s:2hv"), (8000, "s:29"), (16383, "s:7ee")] {
            assert_eq!(slot_tag(slot), tag);
        }
    }

    #[test]
    fn tagged_keys_stay_in_their_class_and_slot() {
        let p = policy();
        let ks = space();
        let tag = slot_tag(77);
        let key = ks.tagged_key(tag, "id-1").unwrap();
        assert_eq!(key, format!("prod:shop:product_list:v1:{{{tag}}}:id-1"));
        assert_eq!(cluster_slot(key.as_bytes()), 77);
        assert_eq!(ks.tagged_id(&key), Some("id-1"));
        assert_eq!(
            ks.tagged_key(tag, &("a:b", 2)).unwrap(),
            format!("prod:shop:product_list:v1:{{{tag}}}:a%3Ab:2")
        );
        assert!(glob_match(ks.scan_pattern().as_bytes(), key.as_bytes()));
        assert!(glob_match(
            ks.all_versions_pattern().as_bytes(),
            key.as_bytes()
        ));
        assert!(glob_match(namespace_pattern(&p).as_bytes(), key.as_bytes()));
        let other = KeySpace::new(&p, "product").unwrap();
        assert!(!glob_match(other.scan_pattern().as_bytes(), key.as_bytes()));
        assert_eq!(other.tagged_id(&key), None);
        assert_eq!(ks.tagged_id(&ks.key("x").unwrap()), None);
        assert!(matches!(
            ks.tagged_key(tag, ""),
            Err(KeyError::EmptyPart { index: 0, .. })
        ));
        let long = "x".repeat(MAX_KEY_BYTES);
        assert!(matches!(
            ks.tagged_key(tag, long.as_str()),
            Err(KeyError::TooLong { .. })
        ));
    }

    #[test]
    fn glob_match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "x", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*c", "abc", true),
            ("*c", "abd", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            (
                "a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
            ("?", "a", true),
            ("?", "", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("h[ae]llo", "hello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-c]llo", "hbllo", true),
            ("h[a-c]llo", "hdllo", false),
            ("h[c-a]llo", "hbllo", true),
            ("[\\]]", "]", true),
            ("[\\-]", "-", true),
            ("[]", "a", false),
            ("[abc", "b", true),
            ("[abc", "d", false),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("\\?x", "?x", true),
            ("a\\", "a\\", true),
            (
                "prod:shop:product_list:v1:{*",
                "prod:shop:product_list:v1:{acme:42}",
                true,
            ),
            (
                "prod:shop:product_list:v1:{*",
                "prod:shop:product_list:v10:{acme}",
                false,
            ),
            (
                "prod:shop:product_list:v*",
                "prod:shop:product_list2:v1:{acme}",
                false,
            ),
            ("prod:shop:*", "prod:shop:_kw:epoch", true),
            ("prod:shop:*", "prod:shopping:x", false),
        ];
        for &(pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern:?} vs {text:?}"
            );
        }
        // Bytes, not chars: `?` matches one byte of a multi-byte character.
        assert!(glob_match(b"??", "é".as_bytes()));
        assert!(!glob_match(b"?", "é".as_bytes()));
    }

    /// Random id parts, biased towards the characters escaping has to handle.
    fn part() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]{1,6}",
            "[:*?\\[\\]{}%\\\\ \t\nA-Za-z0-9]{1,8}",
            "[%0-9A-F:]{1,6}",
            any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        ]
    }

    fn class_pair() -> impl Strategy<Value = (String, String)> {
        let name = "[a-z][a-z0-9_]{0,6}";
        prop_oneof![
            (name, name),
            (name, "[a-z0-9_]{1,4}").prop_map(|(a, suffix)| (a.clone(), format!("{a}{suffix}"))),
            (name, "[a-z0-9_]{1,4}").prop_map(|(a, suffix)| (format!("{a}{suffix}"), a)),
            name.prop_map(|a| (a.clone(), a)),
        ]
    }

    proptest! {
        #[test]
        fn escaping_matches_its_definition(raw in part()) {
            // The definition, one char at a time (the byte-wise fast path must agree with it).
            let mut expected = String::new();
            for c in raw.chars() {
                if needs_escape(c) {
                    for b in c.encode_utf8(&mut [0; 4]).bytes() {
                        expected.push_str(&format!("%{b:02X}"));
                    }
                } else {
                    expected.push(c);
                }
            }
            prop_assert_eq!(escape_part(&raw), expected.as_str());
            // The fast path may pass over a part only if it has nothing to escape.
            prop_assert!(!plain(&raw) || expected == raw);
        }

        #[test]
        fn distinct_ids_give_distinct_keys(
            a in prop::collection::vec(part(), 1..=4),
            b in prop::collection::vec(part(), 1..=4),
        ) {
            let ks = space();
            let (ka, kb) = (ks.key(&a).unwrap(), ks.key(&b).unwrap());
            prop_assert_eq!(a == b, ka == kb, "{:?} / {:?} -> {} / {}", a, b, ka, kb);
            // The hash tag is the whole id: one `{` and one `}`, the last byte.
            let (opens, closes) = (ka.matches('{').count(), ka.matches('}').count());
            let closes_last = ka.ends_with('}');
            prop_assert_eq!((opens, closes, closes_last), (1, 1, true));
        }

        #[test]
        fn keys_match_only_their_own_class_pattern(
            (name_a, name_b) in class_pair(),
            version_a in 1u32..=12,
            version_b in 1u32..=12,
            id in prop::collection::vec(part(), 1..=3),
        ) {
            prop_assume!(name_a != name_b || version_a != version_b);
            let pa = Policy::builder("prod", "shop").cache(&name_a, class().version(version_a)).build().unwrap();
            let pb = Policy::builder("prod", "shop").cache(&name_b, class().version(version_b)).build().unwrap();
            let a = KeySpace::new(&pa, &name_a).unwrap();
            let b = KeySpace::new(&pb, &name_b).unwrap();
            let ka = a.key(&id).unwrap();
            let kb = b.key(&id).unwrap();
            prop_assert!(glob_match(a.scan_pattern().as_bytes(), ka.as_bytes()));
            prop_assert!(glob_match(b.scan_pattern().as_bytes(), kb.as_bytes()));
            prop_assert!(!glob_match(b.scan_pattern().as_bytes(), ka.as_bytes()), "{} matched {}", ka, b.scan_pattern());
            prop_assert!(!glob_match(a.scan_pattern().as_bytes(), kb.as_bytes()), "{} matched {}", kb, a.scan_pattern());
            prop_assert!(glob_match(a.all_versions_pattern().as_bytes(), ka.as_bytes()));
            prop_assert_eq!(glob_match(b.all_versions_pattern().as_bytes(), ka.as_bytes()), name_a == name_b);
            prop_assert!(glob_match(namespace_pattern(&pa).as_bytes(), ka.as_bytes()));
        }
    }
}
