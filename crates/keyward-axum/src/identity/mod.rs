//! Client identity: which bucket a request is counted in ([`KeyExtractor`]), used by the rate-limit layer
//! and as the idempotency layer's key scope; `client_ip` finds the client's address behind proxies.
//!
//! **The one decision to know:** every extractor prefixes what it finds with its kind (`ip`, `header`,
//! `user`, `route`, `fn`), and the parts stay separate id parts of the keyward key. So an API key that
//! happens to read `203.0.113.7` never shares a bucket with that IP address, and combinations
//! ([`KeyExtractor::and`], [`KeyExtractor::or`]) cannot collide with one another.
//!
//! An extractor finds an identity, finds none (the request does not carry it: the layer's
//! [`OnMissing`](crate::OnMissing) decides), finds the server misconfigured (no connection info for a
//! client-IP extractor, no session layer for a session-user extractor: a 500, logged), or, for the
//! session user only, cannot load the session (the store's `503` or `500`, as [`ApiError`] answers).
//! Only the session user makes extraction wait for the store; every other kind is answered from the
//! request head.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::MatchedPath;
use http::HeaderName;
use http::request::Parts;
use keyward::codec::{Codec, Json};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ApiError;
use crate::session::LazySession;

pub(crate) mod client_ip;

pub use client_ip::{IpNetwork, ProxyHeader, TrustedProxies};

/// Longest header value used as an identity, in bytes; a longer one counts as missing.
pub const MAX_HEADER_ID_BYTES: usize = 256;

/// The route label of requests that matched no route (the fallback): one shared label, so unmatched
/// requests are still counted. Route templates always start with `/`, so it cannot collide with one.
pub const UNMATCHED_ROUTE: &str = "(unmatched)";

type PartsFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Starts loading the request's session and returns its user id: `None` when the request has no
/// [`LazySession`] of the extractor's type (no session layer: a setup error).
type SessionUserFn =
    dyn Fn(&Parts) -> Option<BoxFuture<'static, Result<Option<String>, ApiError>>> + Send + Sync;

const NO_SESSION_LAYER: &str = "the session-user key extractor needs a SessionLayer of the same data type \
     and codec outside this layer (added after it with `.layer(..)`)";

/// Decides the identity (the rate-limit bucket) of a request. Cheap to clone.
///
/// | constructor | identity | when it cannot find one |
/// | --- | --- | --- |
/// | [`client_ip`](Self::client_ip) | the client's IP address | the server lacks connection info: 500 |
/// | [`client_network`](Self::client_network) | the client's network (e.g. its IPv6 /64) | as above |
/// | [`header`](Self::header) | a request header (`x-api-key`) | missing, empty, not visible ASCII, or longer than [`MAX_HEADER_ID_BYTES`]: [`OnMissing`](crate::OnMissing) |
/// | [`extension`](Self::extension) | a value in the request extensions (an authenticated user) | not there: [`OnMissing`](crate::OnMissing) |
/// | [`session_user`](Self::session_user) | the user id of the request's keyward session ([`SessionLayer`](crate::SessionLayer)) | no live session: [`OnMissing`](crate::OnMissing); no session layer: 500; the store fails: 503 / 500 |
/// | [`route`](Self::route) | the matched route template (`/users/{id}`) | never: unmatched requests share [`UNMATCHED_ROUTE`] |
/// | [`from_fn`](Self::from_fn) | whatever your function returns | `None`: [`OnMissing`](crate::OnMissing) |
///
/// Combine them: `route().and(client_ip(..))` counts per route per client; `header("x-api-key")
/// .or(client_ip(..))` counts keyed clients by key and anonymous ones by address.
///
/// ```
/// use keyward_axum::{KeyExtractor, TrustedProxies};
///
/// #[derive(Clone)]
/// struct User { id: u64 }
///
/// let per_user_or_ip = KeyExtractor::extension(|u: &User| u.id.to_string())
///     .or(KeyExtractor::client_ip(TrustedProxies::none()));
/// let per_route_per_ip = KeyExtractor::route().and(KeyExtractor::client_ip(TrustedProxies::none()));
/// let by_tenant = KeyExtractor::from_fn(|parts| {
///     parts.uri.path().strip_prefix("/tenants/")?.split('/').next().map(str::to_owned)
/// });
/// ```
#[derive(Clone)]
pub struct KeyExtractor {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    ClientIp {
        trusted: TrustedProxies,
        v4_prefix: u8,
        v6_prefix: u8,
    },
    Header(HeaderName),
    Extension {
        type_name: &'static str,
        get: Arc<PartsFn>,
    },
    Route,
    Fn(Arc<PartsFn>),
    SessionUser {
        type_name: &'static str,
        load: Arc<SessionUserFn>,
    },
    And(Arc<KeyExtractor>, Arc<KeyExtractor>),
    Or(Arc<KeyExtractor>, Arc<KeyExtractor>),
}

/// What an extractor found.
#[derive(Debug)]
pub(crate) enum Extracted {
    /// The id parts of the identity.
    Id(Vec<String>),
    /// The request carries no usable identity.
    Missing,
    /// The server is set up so that no identity can ever be found; says what is wrong.
    Misconfigured(&'static str),
    /// The identity is in the store and could not be read (the session user): answer with the error.
    Failed(ApiError),
}

impl Extracted {
    fn of(found: Result<bool, Failure>, id: Vec<String>) -> Extracted {
        match found {
            Ok(true) => Extracted::Id(id),
            Ok(false) => Extracted::Missing,
            Err(Failure::Misconfigured(why)) => Extracted::Misconfigured(why),
            Err(Failure::Load(error)) => Extracted::Failed(*error),
        }
    }
}

/// Why an extractor found no answer.
enum Failure {
    Misconfigured(&'static str),
    /// Boxed: a keyward error is large, and this is the rare path of every extraction's `Result`.
    Load(Box<ApiError>),
}

#[cfg(test)]
impl PartialEq for Extracted {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Extracted::Id(a), Extracted::Id(b)) => a == b,
            (Extracted::Missing, Extracted::Missing) => true,
            (Extracted::Misconfigured(a), Extracted::Misconfigured(b)) => a == b,
            _ => false,
        }
    }
}

impl KeyExtractor {
    /// The client's IP address: the TCP peer, or with trusted proxies the address they forwarded (see
    /// [`TrustedProxies`]). Needs axum's connection info: serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`.
    pub fn client_ip(trusted: TrustedProxies) -> KeyExtractor {
        KeyExtractor::client_network(trusted, 32, 128)
    }

    /// The client's network: its IP address with only the first `v4_prefix` (IPv4) or `v6_prefix` (IPv6)
    /// bits kept. One IPv6 subscriber usually holds a whole /64, so per-address limits are easy to dodge
    /// over IPv6; `client_network(trusted, 32, 64)` counts each /64 as one client. Prefixes are capped at
    /// 32 and 128; full-length prefixes give the same keys as [`client_ip`](Self::client_ip).
    pub fn client_network(trusted: TrustedProxies, v4_prefix: u8, v6_prefix: u8) -> KeyExtractor {
        KeyExtractor {
            kind: Kind::ClientIp {
                trusted,
                v4_prefix: v4_prefix.min(32),
                v6_prefix: v6_prefix.min(128),
            },
        }
    }

    /// The value of a request header, such as an API key. A missing, empty, non-ASCII or overlong
    /// (more than [`MAX_HEADER_ID_BYTES`]) value counts as missing, so a client cannot provoke a server
    /// error through it.
    ///
    /// The value becomes part of the Redis key as it is. For a secret (an API key), prefer
    /// [`from_fn`](Self::from_fn) with a hash or an account id you look up.
    ///
    /// # Panics
    /// If `name` is not a valid header name (names are case-insensitive).
    pub fn header(name: impl AsRef<str>) -> KeyExtractor {
        let name = name.as_ref();
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|_| panic!("`{name}` is not a valid HTTP header name"));
        KeyExtractor {
            kind: Kind::Header(name),
        }
    }

    /// A value of type `T` in the request extensions, mapped to an id by `id` — typically the user that
    /// an authentication layer inserted. That layer must run before this one: in axum, add it with
    /// `.layer(..)` *after* (below) the rate-limit layer.
    pub fn extension<T, F>(id: F) -> KeyExtractor
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(&T) -> String + Send + Sync + 'static,
    {
        KeyExtractor {
            kind: Kind::Extension {
                type_name: std::any::type_name::<T>(),
                get: Arc::new(move |parts: &Parts| parts.extensions.get::<T>().map(&id)),
            },
        }
    }

    /// The user id of the request's keyward session (`Session::user_id`, what
    /// [`CurrentSession::create`](crate::CurrentSession::create) logged in with), for sessions of data
    /// type `T` stored as JSON (the default codec; [`session_user_in`](Self::session_user_in) names
    /// another). Scopes idempotency keys, or counts rate limits, per logged-in user:
    /// `IdempotencyLayer::new(..).scope(KeyExtractor::session_user::<Profile>())`.
    ///
    /// It loads the session through the [`LazySession`] the [`SessionLayer`](crate::SessionLayer) put in
    /// the request, so that layer must run first: add it with `.layer(..)` *after* this one. The load
    /// is the request's one load: a handler extracting [`CurrentSession`](crate::CurrentSession) later
    /// shares it and reads nothing more. A request without a live session (no cookie, an ended one)
    /// has no identity ([`OnMissing`](crate::OnMissing), or the idempotency layer's `400`). If the
    /// store cannot be read, the request gets the [`ApiError`] answer (`503` with `Retry-After` when it
    /// is unreachable) and goes no further; without a session layer of the same `T`, a `500` (logged).
    ///
    /// Ids are prefixed `session_user`, apart from [`extension`](Self::extension)'s `user` ids.
    pub fn session_user<T>() -> KeyExtractor
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        KeyExtractor::session_user_in::<T, Json>()
    }

    /// [`session_user`](Self::session_user) for sessions stored with the codec `C`
    /// (a `SessionLayer<T, C>`).
    pub fn session_user_in<T, C>() -> KeyExtractor
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        C: Codec,
    {
        let load =
            move |parts: &Parts| -> Option<BoxFuture<'static, Result<Option<String>, ApiError>>> {
                let lazy = parts.extensions.get::<LazySession<T, C>>()?.clone();
                Some(Box::pin(async move {
                    let session = lazy.load().await?;
                    Ok(session.get().map(|s| s.user_id().to_owned()))
                }))
            };
        KeyExtractor {
            kind: Kind::SessionUser {
                type_name: std::any::type_name::<T>(),
                load: Arc::new(load),
            },
        }
    }

    /// The matched route template (`/users/{id}`, not `/users/42`), from axum's `MatchedPath`; requests
    /// that matched no route share the label [`UNMATCHED_ROUTE`]. Alone it gives each route one bucket
    /// for all clients; combine it with [`and`](Self::and) for per-route-per-client limits.
    pub fn route() -> KeyExtractor {
        KeyExtractor { kind: Kind::Route }
    }

    /// Your own function of the request head. `None` counts as missing. An empty string is a bug in the
    /// function: the key cannot be built and the request gets a 500 (logged).
    pub fn from_fn<F>(f: F) -> KeyExtractor
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        KeyExtractor {
            kind: Kind::Fn(Arc::new(f)),
        }
    }

    /// Both identities together (one bucket per pair); missing if either is.
    #[must_use]
    pub fn and(self, other: KeyExtractor) -> KeyExtractor {
        KeyExtractor {
            kind: Kind::And(Arc::new(self), Arc::new(other)),
        }
    }

    /// This identity, or when it is missing, `other`'s. A misconfiguration of this one is not hidden by
    /// the fallback.
    #[must_use]
    pub fn or(self, other: KeyExtractor) -> KeyExtractor {
        KeyExtractor {
            kind: Kind::Or(Arc::new(self), Arc::new(other)),
        }
    }

    pub(crate) async fn extract(&self, parts: &Parts) -> Extracted {
        let mut id = Vec::new();
        let found = if self.reads_the_store() {
            self.extract_async(parts, &mut id).await
        } else {
            self.extract_into(parts, &mut id)
        };
        Extracted::of(found, id)
    }

    /// [`extract`](Self::extract) for extractors that never read the store.
    #[cfg(test)]
    fn extract_now(&self, parts: &Parts) -> Extracted {
        let mut id = Vec::new();
        let found = self.extract_into(parts, &mut id);
        Extracted::of(found, id)
    }

    /// Whether finding the identity may wait for the store (a session user somewhere in the tree).
    fn reads_the_store(&self) -> bool {
        match &self.kind {
            Kind::SessionUser { .. } => true,
            Kind::And(a, b) | Kind::Or(a, b) => a.reads_the_store() || b.reads_the_store(),
            _ => false,
        }
    }

    /// [`extract_into`](Self::extract_into) for trees that read the store: in the same order, loading
    /// the session only when the walk reaches it (so `header(..).or(session_user())` reads no session
    /// for a request that has the header).
    fn extract_async<'a>(
        &'a self,
        parts: &'a Parts,
        id: &'a mut Vec<String>,
    ) -> BoxFuture<'a, Result<bool, Failure>> {
        Box::pin(async move {
            match &self.kind {
                Kind::SessionUser { load, .. } => {
                    let load = load(parts).ok_or(Failure::Misconfigured(NO_SESSION_LAYER))?;
                    match load.await {
                        Ok(Some(user)) => {
                            id.extend(["session_user".to_owned(), user]);
                            Ok(true)
                        }
                        Ok(None) => Ok(false),
                        Err(error) => Err(Failure::Load(Box::new(error))),
                    }
                }
                Kind::And(a, b) => {
                    Ok(a.extract_async(parts, id).await? && b.extract_async(parts, id).await?)
                }
                Kind::Or(a, b) => {
                    let start = id.len();
                    if a.extract_async(parts, id).await? {
                        return Ok(true);
                    }
                    id.truncate(start);
                    b.extract_async(parts, id).await
                }
                _ => self.extract_into(parts, id),
            }
        })
    }

    /// Appends this extractor's parts to `id`: `Ok(true)` when found, `Ok(false)` when missing (`id` may
    /// then hold partial parts).
    /// Never reads the store: a session user met here (only [`extract_async`](Self::extract_async)
    /// walks trees that have one) is a bug, answered as a misconfiguration.
    fn extract_into(&self, parts: &Parts, id: &mut Vec<String>) -> Result<bool, Failure> {
        match &self.kind {
            Kind::ClientIp {
                trusted,
                v4_prefix,
                v6_prefix,
            } => {
                let ip = trusted.client_ip(parts).ok_or(Failure::Misconfigured(
                    "the client-IP key extractor needs the peer address: serve the app with \
                     `into_make_service_with_connect_info::<SocketAddr>()`",
                ))?;
                id.push("ip".to_owned());
                id.push(client_ip::key_of(ip, *v4_prefix, *v6_prefix));
                Ok(true)
            }
            Kind::Header(name) => {
                let value = parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= MAX_HEADER_ID_BYTES);
                Ok(value.is_some_and(|value| {
                    id.extend([
                        "header".to_owned(),
                        name.as_str().to_owned(),
                        value.to_owned(),
                    ]);
                    true
                }))
            }
            Kind::Extension { get, .. } => Ok(get(parts).is_some_and(|value| {
                id.extend(["user".to_owned(), value]);
                true
            })),
            Kind::Route => {
                let route = parts
                    .extensions
                    .get::<MatchedPath>()
                    .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
                id.extend(["route".to_owned(), route.to_owned()]);
                Ok(true)
            }
            Kind::Fn(f) => Ok(f(parts).is_some_and(|value| {
                id.extend(["fn".to_owned(), value]);
                true
            })),
            Kind::SessionUser { .. } => Err(Failure::Misconfigured(
                "a session-user key extractor was walked without reading the store",
            )),
            Kind::And(a, b) => Ok(a.extract_into(parts, id)? && b.extract_into(parts, id)?),
            Kind::Or(a, b) => {
                let start = id.len();
                if a.extract_into(parts, id)? {
                    return Ok(true);
                }
                id.truncate(start);
                b.extract_into(parts, id)
            }
        }
    }

    /// What the extractor looks for, for the 400 response when it finds nothing.
    pub(crate) fn describe(&self) -> String {
        match &self.kind {
            Kind::ClientIp { trusted, .. } => trusted.describe(),
            Kind::Header(name) => format!("the `{name}` header"),
            Kind::Extension { .. } => "an authenticated client".to_owned(),
            Kind::Route => "the route".to_owned(),
            Kind::Fn(_) => "a client identity".to_owned(),
            Kind::SessionUser { .. } => "a logged-in user (a session)".to_owned(),
            Kind::And(a, b) => format!("{} and {}", a.describe(), b.describe()),
            Kind::Or(a, b) => format!("{} or {}", a.describe(), b.describe()),
        }
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::ClientIp {
                trusted,
                v4_prefix,
                v6_prefix,
            } => f
                .debug_struct("ClientIp")
                .field("trusted", trusted)
                .field("v4_prefix", v4_prefix)
                .field("v6_prefix", v6_prefix)
                .finish(),
            Kind::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Kind::Extension { type_name, .. } => {
                f.debug_tuple("Extension").field(type_name).finish()
            }
            Kind::Route => f.write_str("Route"),
            Kind::Fn(_) => f.write_str("Fn"),
            Kind::SessionUser { type_name, .. } => {
                f.debug_tuple("SessionUser").field(type_name).finish()
            }
            Kind::And(a, b) => f.debug_tuple("And").field(a).field(b).finish(),
            Kind::Or(a, b) => f.debug_tuple("Or").field(a).field(b).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;

    use super::*;

    fn parts(headers: &[(&str, &str)], peer: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().uri("/x");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        if let Some(peer) = peer {
            parts
                .extensions
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        }
        parts
    }

    fn id(parts: &[&str]) -> Extracted {
        Extracted::Id(parts.iter().map(|s| (*s).to_owned()).collect())
    }

    #[derive(Clone)]
    struct User(u32);

    #[test]
    fn each_kind_is_prefixed() {
        let p = parts(&[("x-api-key", " k1 ")], Some("192.0.2.1:9"));
        let ip = KeyExtractor::client_ip(TrustedProxies::none());
        assert_eq!(ip.extract_now(&p), id(&["ip", "192.0.2.1"]));
        assert_eq!(
            KeyExtractor::header("X-Api-Key").extract_now(&p),
            id(&["header", "x-api-key", "k1"])
        );
        assert_eq!(
            KeyExtractor::route().extract_now(&p),
            id(&["route", UNMATCHED_ROUTE])
        );
        assert_eq!(
            KeyExtractor::from_fn(|p| Some(p.uri.path().to_owned())).extract_now(&p),
            id(&["fn", "/x"])
        );
        let mut with_user = parts(&[], None);
        with_user.extensions.insert(User(7));
        let user = KeyExtractor::extension(|u: &User| u.0.to_string());
        assert_eq!(user.extract_now(&with_user), id(&["user", "7"]));
        assert_eq!(user.extract_now(&p), Extracted::Missing);
    }

    #[test]
    fn header_values_clients_control_never_break_the_key() {
        let h = KeyExtractor::header("x-api-key");
        assert_eq!(h.extract_now(&parts(&[], None)), Extracted::Missing);
        assert_eq!(
            h.extract_now(&parts(&[("x-api-key", "")], None)),
            Extracted::Missing
        );
        assert_eq!(
            h.extract_now(&parts(&[("x-api-key", "   ")], None)),
            Extracted::Missing
        );
        let long = "k".repeat(MAX_HEADER_ID_BYTES + 1);
        assert_eq!(
            h.extract_now(&parts(&[("x-api-key", &long)], None)),
            Extracted::Missing
        );
        let max = "k".repeat(MAX_HEADER_ID_BYTES);
        assert!(matches!(
            h.extract_now(&parts(&[("x-api-key", &max)], None)),
            Extracted::Id(_)
        ));
        let mut p = parts(&[], None);
        p.headers.insert(
            "x-api-key",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        assert_eq!(h.extract_now(&p), Extracted::Missing);
    }

    #[test]
    fn missing_connect_info_is_a_misconfiguration() {
        let ip = KeyExtractor::client_ip(TrustedProxies::none());
        assert!(matches!(
            ip.extract_now(&parts(&[], None)),
            Extracted::Misconfigured(_)
        ));
        // A fallback does not hide it.
        let either = KeyExtractor::header("x-api-key").or(ip.clone());
        assert!(matches!(
            either.extract_now(&parts(&[], None)),
            Extracted::Misconfigured(_)
        ));
        assert_eq!(
            either.extract_now(&parts(&[("x-api-key", "k")], None)),
            id(&["header", "x-api-key", "k"])
        );
    }

    #[test]
    fn combinators() {
        let ip = KeyExtractor::client_ip(TrustedProxies::none());
        let key = KeyExtractor::header("x-api-key");
        let p = parts(&[], Some("192.0.2.1:9"));
        let keyed = parts(&[("x-api-key", "192.0.2.1")], Some("192.0.2.1:9"));

        let or = key.clone().or(ip.clone());
        assert_eq!(or.extract_now(&p), id(&["ip", "192.0.2.1"]));
        assert_eq!(
            or.extract_now(&keyed),
            id(&["header", "x-api-key", "192.0.2.1"])
        );

        let and = KeyExtractor::route().and(ip.clone());
        assert_eq!(
            and.extract_now(&p),
            id(&["route", UNMATCHED_ROUTE, "ip", "192.0.2.1"])
        );
        assert_eq!(
            key.clone().and(ip.clone()).extract_now(&p),
            Extracted::Missing
        );
        // A missing left side of `or` leaves nothing behind in the id.
        let nested = key.clone().and(ip.clone()).or(KeyExtractor::route());
        assert_eq!(nested.extract_now(&p), id(&["route", UNMATCHED_ROUTE]));
        assert_eq!(
            format!("{:?}", key.or(ip)),
            "Or(Header(\"x-api-key\"), ClientIp { trusted: TrustedProxies { trust: None, header: XForwardedFor }, v4_prefix: 32, v6_prefix: 128 })"
        );
    }

    #[test]
    fn client_network_groups_ipv6() {
        let net = KeyExtractor::client_network(TrustedProxies::none(), 32, 64);
        assert_eq!(
            net.extract_now(&parts(&[], Some("[2001:db8:1:2:aaaa::1]:9"))),
            id(&["ip", "2001:db8:1:2::/64"])
        );
        assert_eq!(
            net.extract_now(&parts(&[], Some("192.0.2.1:9"))),
            id(&["ip", "192.0.2.1"])
        );
    }

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Profile;

    #[tokio::test]
    async fn a_session_user_is_only_looked_for_when_the_walk_reaches_it() {
        let either = KeyExtractor::header("x-api-key").or(KeyExtractor::session_user::<Profile>());
        // The header answers: the session side is never reached (no session layer is not noticed).
        assert_eq!(
            either.extract(&parts(&[("x-api-key", "k")], None)).await,
            id(&["header", "x-api-key", "k"])
        );
        // Without it the session side is asked, and without a session layer that is a setup error.
        assert!(matches!(
            either.extract(&parts(&[], None)).await,
            Extracted::Misconfigured(why) if why.contains("SessionLayer")
        ));
        assert_eq!(
            KeyExtractor::session_user::<Profile>().describe(),
            "a logged-in user (a session)"
        );
    }

    #[test]
    #[should_panic(expected = "not a valid HTTP header name")]
    fn invalid_header_name_panics() {
        let _ = KeyExtractor::header("bad header");
    }
}
