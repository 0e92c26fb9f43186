//! keyward-axum — tower/axum layers on [keyward]: rate limits, sessions and idempotency keys.
//!
//! - [`RateLimitLayer`] — one atomic check per request on Redis (or the embedded backend), per client IP,
//!   API key, user or route, with the IETF `RateLimit-Policy` / `RateLimit` response fields and `429`
//!   problem+json refusals.
//! - [`SessionLayer`] and the [`CurrentSession`] extractor — keyward sessions behind a cookie with safe
//!   defaults (`__Host-session`, `Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/`, no `Domain`), loaded
//!   only by routes that use them.
//! - [`IdempotencyLayer`] — the `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header): the
//!   first request runs, a concurrent duplicate gets `409`, a different request under the same key `422`,
//!   and a completed key's response is replayed byte for byte.
//! - [`ApiError`] — the error a handler returns from keyward calls: `?` on any of them gives a `503`
//!   (with `Retry-After`) when the store is down and a `500` otherwise, as problem+json that never shows
//!   internals; [`ApiError::app_error`] hands your own loader or write error back (a `404`).
//!
//! The rate-limit layer, in full:
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::time::Duration;
//!
//! use axum::{Router, routing::get};
//! use keyward::Keyward;
//! use keyward::policy::{Algorithm, Policy, RateLimitClass};
//! use keyward_axum::{KeyExtractor, RateLimitLayer, TrustedProxies};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let policy = Policy::builder("dev", "api")
//!         .rate_limit("per_ip", RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60)))
//!         .build()?;
//!     let kw = Keyward::from_env(policy).await?; // REDIS_URL, or the embedded backend
//!
//!     let app = Router::new()
//!         .route("/", get(|| async { "hello" }))
//!         .layer(RateLimitLayer::new(
//!             kw.rate_limiter("per_ip")?,
//!             KeyExtractor::client_ip(TrustedProxies::none()),
//!         ));
//!
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     // The client-IP extractor needs the peer address: serve with connection info.
//!     axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//!     Ok(())
//! }
//! ```
//!
//! `examples/rate_limited_api.rs` is the same as a program you can run and `curl`.
//!
//! # Identity
//! A [`KeyExtractor`] decides which bucket a request is counted in: the client IP, a header, a value an
//! authentication layer put in the extensions (the user), the matched route, your own function, or
//! combinations (`route().and(client_ip(..))`, `header(..).or(client_ip(..))`). A request without the
//! identity is refused with `400` by default ([`OnMissing`]); a client cannot get out of its limit by
//! leaving its key out.
//!
//! **Client IP behind proxies.** `X-Forwarded-For` and `Forwarded` are ignored unless you declare the
//! proxies you trust ([`TrustedProxies`]): anyone can send them. With trusted proxies, the chain is
//! walked from the right and the first address that is not a trusted proxy is the client.
//!
//! # Responses
//! The limiter is checked before the inner service is called; a refused request never reaches it.
//!
//! | situation | response |
//! | --- | --- |
//! | allowed (also when only a shadow-mode class would refuse) | the inner service's, plus `RateLimit-Policy` and `RateLimit` |
//! | refused by an enforced class | `429`, `Retry-After`, both fields, problem+json of type `…#quota-exceeded` |
//! | the store is down and the class says `on_error = "deny"` | `503`, `Retry-After`, `RateLimit-Policy`, problem+json of type `…#temporary-reduced-capacity` |
//! | no identity in the request | [`OnMissing::Reject`] (default): `400` problem+json; [`OnMissing::SharedBucket`]: counted in one shared bucket |
//! | no connection info for a client-IP extractor (a server setup error) | `500` problem+json, logged at `error` |
//! | keyward rejects the id (an empty id from a `from_fn` extractor, a key over 1 KiB) | `500` problem+json, logged at `error` |
//!
//! Why `500` rather than `503` for a failed check: store failures never fail a check — each class's
//! `on_error` turns them into a decision (allow, deny, or an in-process limiter). A check that fails is
//! deterministic (the same request fails the same way): a bug to fix, not a condition to retry. Header
//! values a client sends cannot cause it: the header extractor treats unusable values as missing.
//!
//! # Header fields
//! As in draft-ietf-httpapi-ratelimit-headers (revisions -09 to -11), Structured Field Lists with one
//! member per enforced limit, named after its class:
//!
//! ```text
//! RateLimit-Policy: "per_second";q=10;w=1, "per_day";q=1000;w=86400
//! RateLimit: "per_second";r=9;t=1, "per_day";r=997;t=86400
//! Retry-After: 1                                          (refusals only)
//! ```
//!
//! `q` is the class's `limit` and `w` its window in seconds; `r` is what remains and `t` the seconds
//! (rounded up) until the limit is fully replenished — or, for a limit that refused the request, until a
//! retry can succeed. `Retry-After` is the longest wait among the refusing limits, rounded up, at least 1.
//! Shadow-mode classes never appear and never refuse. After a store failure (`on_error` allow or deny)
//! `RateLimit` is left out, having no measurement to report. Fields are appended, so stacked layers add
//! their members to the same lists.
//!
//! # Errors in handlers
//! Return [`ApiError`] (or your own error that wraps it) from handlers that call keyward: it is
//! `From<keyward::Error>`, so `?` works on every call, and [`IntoResponse`](https://docs.rs/axum/0.8/axum/response/trait.IntoResponse.html).
//! A store that cannot be reached, a timeout or an open breaker is a `503` with `Retry-After`;
//! everything else is a `500`; the body is `about:blank` problem+json with a generic `detail`, and the
//! error itself goes to the log. Your own error from a loader or from `invalidate_after` /
//! `write_through` comes back as its type with [`ApiError::app_error`], whose example turns a database
//! "not found" into a `404`; where you still hold the `keyward::Error` (before `?` converts it), the
//! same lookup is [`keyward::Error::downcast_ref`]. [`SessionError`], the error of the session
//! handle, is the same type under its older name.
//!
//! # Request extensions
//! What the layers put in a request's extensions, for handlers (`Extension<…>`) and for middleware
//! inside them:
//!
//! | layer | puts in the extensions | read it with |
//! | --- | --- | --- |
//! | [`RateLimitLayer`] | the [`keyward::Decision`] of an allowed request (refused ones never reach the handler; with stacked layers, the innermost's) | `Extension<Decision>` |
//! | [`SessionLayer<T, C>`](SessionLayer) | exactly one [`LazySession<T, C>`](LazySession): the class's sessions and the cookie's token, **nothing loaded yet**. Not a [`CurrentSession`] and not the session data. | the [`CurrentSession<T, C>`](CurrentSession) extractor (loads it, once per request); in middleware, `Extension<LazySession<T, C>>` and [`LazySession::load`]; as a key, [`KeyExtractor::session_user`] |
//! | [`IdempotencyLayer`] | the request's [`IdempotencyKey`], only when the handler runs under a key | `Extension<IdempotencyKey>` |
//!
//! Every load of the same request (the extractor, `load`, the session-user key extractor) shares one
//! read of the store and its outcome.
//!
//! # Middleware order
//! In axum, the layer added last runs first (it is the outermost). The rules:
//!
//! - A rate limit that needs no session (per IP, per API key, per route) goes outermost, or on the route
//!   it protects: it refuses before anything else runs.
//! - The session layer reads nothing by itself, so it can sit outside everything that needs a session.
//! - **A refused request costs a session read when its rate limit needs the session**: a limit keyed by
//!   [`KeyExtractor::session_user`], or one behind an authentication middleware that extracts
//!   [`CurrentSession`], must load the session before it can refuse. Such a limit sits inside the session
//!   layer, and every request it refuses — a flood of failed logins included — has read a session first
//!   (which also pushes back that session's idle expiry). Limit logins per IP, which needs no session:
//!   then a refused login reads nothing, wherever the per-IP limit sits. (The tests
//!   `session_outage::a_refused_login_costs_a_session_read_only_when_the_limit_needs_the_session` count
//!   the reads on a real Redis.)
//! - Authentication and rate limits go outside the idempotency layer (added after it): their refusals
//!   are then never stored as a key's response, and a refused request never takes a key.
//! - `Router::layer` also runs for requests that match no route; `Router::route_layer` and
//!   `MethodRouter::layer` only for their routes.
//!
//! The recommended stack for a typical service, in one place — cached articles, a rate-limited login,
//! cookie sessions, idempotent orders scoped to the logged-in user, a health check:
//!
//! | runs | layer | why there |
//! | --- | --- | --- |
//! | 1st | `RateLimitLayer` per IP, `Router::layer`, added last | the cheapest refusal, before any store read but its own check |
//! | 2nd | `SessionLayer` | lazy: costs nothing until a route asks |
//! | 3rd, `/login` only | `RateLimitLayer` `login_per_ip` | a refused login reads no session: nothing has loaded it |
//! | 3rd, `/orders` only | `IdempotencyLayer` scoped by [`KeyExtractor::session_user`] | loads the session once; the handler's `CurrentSession` shares that read |
//! | last | handlers returning `Result<_, ApiError>` | `/healthz` never touches the session |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::net::SocketAddr;
//! use std::time::Duration;
//!
//! use axum::extract::{ConnectInfo, Path, State};
//! use axum::routing::{get, post};
//! use axum::{Router, body::Body};
//! use http::{Request, StatusCode, header};
//! use keyward::policy::{
//!     Algorithm, CacheClass, IdempotencyClass, Policy, RateLimitClass, SessionClass,
//! };
//! use keyward::session::SessionSecrets;
//! use keyward::{Cache, Keyward};
//! use keyward_axum::{
//!     ApiError, CurrentSession, IdempotencyLayer, KeyExtractor, RateLimitLayer, SessionLayer,
//!     TrustedProxies,
//! };
//! use tower::ServiceExt;
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct Profile { name: String }
//!
//! async fn article(State(articles): State<Cache<String>>, Path(id): Path<u32>) -> Result<String, ApiError> {
//!     let load = || async move { Ok::<_, std::io::Error>(format!("article {id}")) }; // your database
//!     Ok(articles.get_or_set(&id.to_string(), load).await?)
//! }
//!
//! async fn login(session: CurrentSession<Profile>) -> Result<&'static str, ApiError> {
//!     // ...after checking the password:
//!     session.create("ada", &Profile { name: "Ada".into() }).await?;
//!     Ok("welcome")
//! }
//!
//! async fn order(session: CurrentSession<Profile>) -> (StatusCode, String) {
//!     // The idempotency scope found a session, or the request got a 400 before reaching here.
//!     let user = session.get().map(|s| s.data.name).unwrap_or_default();
//!     (StatusCode::CREATED, format!("order placed for {user}"))
//! }
//!
//! let policy = Policy::builder("dev", "shop")
//!     .cache("article", CacheClass::new(Duration::from_secs(600), "the editor, after every save"))
//!     .rate_limit("per_ip", RateLimitClass::new(Algorithm::Gcra, 100, Duration::from_secs(1)))
//!     .rate_limit("login_per_ip", RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60)))
//!     .session("web", SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)))
//!     .idempotency("orders", IdempotencyClass::new())
//!     .build()?;
//! let kw = Keyward::embedded(policy); // a service: Keyward::from_env(policy).await?
//! let secrets = SessionSecrets::new(*b"a 32-byte secret from your vault")?;
//! let per_ip = || KeyExtractor::client_ip(TrustedProxies::none());
//!
//! let app = Router::new()
//!     .route("/articles/{id}", get(article))
//!     .route(
//!         "/login",
//!         post(login).layer(RateLimitLayer::new(kw.rate_limiter("login_per_ip")?, per_ip())),
//!     )
//!     .route(
//!         "/orders",
//!         post(order).layer(
//!             IdempotencyLayer::new(kw.idempotency("orders")?)
//!                 .scope(KeyExtractor::session_user::<Profile>()),
//!         ),
//!     )
//!     .route("/healthz", get(|| async { "ok" }))
//!     .with_state(kw.cache::<String>("article")?)
//!     .layer(SessionLayer::new(kw.sessions::<Profile>("web", secrets)?)) // runs 2nd
//!     .layer(RateLimitLayer::new(kw.rate_limiter("per_ip")?, per_ip())); // runs 1st
//! // Serve it with `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`;
//! // here, requests carry the peer address themselves.
//! let send = |request: http::request::Builder, body: &'static str| {
//!     let mut request = request.body(Body::from(body)).unwrap();
//!     request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 4000))));
//!     app.clone().oneshot(request)
//! };
//!
//! let response = send(Request::post("/login"), "").await?;
//! let cookie = response.headers()[header::SET_COOKIE].to_str()?.split(';').next().unwrap().to_owned();
//! let order = || {
//!     Request::post("/orders")
//!         .header(header::COOKIE, &cookie)
//!         .header("idempotency-key", r#""order-2f1c""#)
//! };
//! let first = send(order(), "sku=42").await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let retry = send(order(), "sku=42").await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(send(Request::get("/articles/7"), "").await?.status(), StatusCode::OK);
//! assert_eq!(send(Request::get("/healthz"), "").await?.status(), StatusCode::OK);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! One folder per capability, each plugging its per-request logic into one tower service shell.
//! - `rate_limit/` — [`RateLimitLayer`] / [`RateLimitService`] and [`OnMissing`]; `headers` builds the
//!   [`RATELIMIT_POLICY`] and [`RATELIMIT`] field values.
//! - `session/` — [`SessionLayer`] / [`SessionService`]; `handle` has the request's [`LazySession`], the
//!   [`CurrentSession`] extractor and its rejections ([`MissingSessionLayer`],
//!   [`CurrentSessionRejection`]); `cookie` finds and writes the session cookie.
//! - `idempotency/` — [`IdempotencyLayer`] / [`IdempotencyService`], with [`IdempotencyKey`] for handlers,
//!   [`KeySyntax`] and the field names (`key`), and body buffering (`body`).
//! - `identity/` — [`KeyExtractor`]: which client a request belongs to, for rate limits and as the
//!   idempotency key scope; `client_ip` has [`TrustedProxies`], [`ProxyHeader`] and [`IpNetwork`] (CIDR
//!   matching from the `ipnet` crate).
//! - `error` — [`ApiError`], keyward errors as handler errors ([`SessionError`] is its older name).
//! - `problem` — every `application/problem+json` body the crate writes: `about:blank`, or the two
//!   problem types the rate-limit draft defines ([`QUOTA_EXCEEDED`], [`TEMPORARY_REDUCED_CAPACITY`]).
//!   `docs/axum.md` in the repository lists them all.
//! - `shell` — the one tower `Service` shell behind the three services: readiness, cloning and boxing of
//!   the future ([`ResponseFuture`]), once.
//! - [`Error`] — configuration errors (an unparsable trusted network).

mod error;
mod idempotency;
mod identity;
mod problem;
mod rate_limit;
mod session;
mod shell;

pub use error::ApiError;
pub use idempotency::{
    DEFAULT_IN_PROGRESS_RETRY_AFTER, DEFAULT_MAX_REQUEST_BYTES, IDEMPOTENCY_KEY,
    IDEMPOTENT_REPLAYED, IdempotencyKey, IdempotencyLayer, IdempotencyService, KeySyntax,
    MAX_IDEMPOTENCY_KEY_BYTES,
};
pub use identity::{
    IpNetwork, KeyExtractor, MAX_HEADER_ID_BYTES, ProxyHeader, TrustedProxies, UNMATCHED_ROUTE,
};
#[allow(deprecated)]
pub use problem::{
    IDEMPOTENCY_KEY_IN_USE, IDEMPOTENCY_KEY_INVALID, IDEMPOTENCY_KEY_MISSING,
    IDEMPOTENCY_KEY_REUSED, IDEMPOTENCY_UNAVAILABLE,
};
pub use problem::{QUOTA_EXCEEDED, TEMPORARY_REDUCED_CAPACITY};
pub use rate_limit::headers::{RATELIMIT, RATELIMIT_POLICY};
pub use rate_limit::{OnMissing, RateLimitLayer, RateLimitService};
pub use session::{
    CurrentSession, CurrentSessionRejection, LazySession, MissingSessionLayer, SessionError,
    SessionLayer, SessionService,
};
pub use shell::ResponseFuture;

/// The README's Rust snippets compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// A configuration error of this crate. Request-time outcomes are responses, not errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A trusted-proxy network is not an IP address or CIDR network.
    #[error("`{input}` is not an IP network such as `10.0.0.0/8`: {reason}")]
    InvalidNetwork {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}
