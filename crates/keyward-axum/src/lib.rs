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
//! # Middleware order
//! In axum, the layer added last runs first. Put the rate-limit layer *above* (added after) anything
//! cheap that must see every request, and *below* (added before) an authentication layer whose user it
//! reads: `.layer(rate_limit).layer(auth)` runs `auth`, then the limit, then the handler. `Router::layer`
//! also limits requests that match no route (they share one route label); `Router::route_layer` only
//! limits matched routes.
//!
//! # Sessions
//! [`SessionLayer`] reads no session by itself. It puts exactly one value in each request's extensions: a
//! [`LazySession<T, C>`](LazySession) (the class's sessions and the cookie's token, if the request carries
//! one well-formed session cookie). The [`CurrentSession`] extractor loads the session through it the
//! first time a request asks, at most once per request, and every later extractor of that request shares
//! the outcome. A route that never extracts it never calls the store: with Redis down, `/healthz` still
//! answers `200` for a logged-in user, while a route that uses the session gets `503` problem+json
//! (`CurrentSessionRejection`). After the handler, the layer writes `Set-Cookie` only if the session was
//! loaded and changed (login, regenerate, logout). See [`SessionLayer`] for the cookie and every response.
//!
//! # Idempotency keys
//! [`IdempotencyLayer`] makes `POST` and `PATCH` retry-safe (draft-ietf-httpapi-idempotency-key-header):
//! the first request under an `Idempotency-Key` runs and its response is stored in a keyward
//! `idempotency` class; retries get it back byte for byte with `Idempotent-Replayed: true`, a concurrent
//! retry gets `409`, the key reused for another request `422`. Keys are per client ([`KeyExtractor`]
//! again, by default the hashed `Authorization` header). `examples/idempotent_payments.rs` shows each case.
//!
//! # Layout
//! One folder per capability, each plugging its per-request logic into one tower service shell.
//! - `rate_limit/` — [`RateLimitLayer`] / [`RateLimitService`] and [`OnMissing`]; `headers` builds the
//!   [`RATELIMIT_POLICY`] and [`RATELIMIT`] field values.
//! - `session/` — [`SessionLayer`] / [`SessionService`]; `handle` has the request's [`LazySession`], the
//!   [`CurrentSession`] extractor and its errors ([`SessionError`], [`MissingSessionLayer`],
//!   [`CurrentSessionRejection`]); `cookie` finds and writes the session cookie.
//! - `idempotency/` — [`IdempotencyLayer`] / [`IdempotencyService`], with [`IdempotencyKey`] for handlers,
//!   [`KeySyntax`] and the field names (`key`), and body buffering (`body`).
//! - `identity/` — [`KeyExtractor`]: which client a request belongs to, for rate limits and as the
//!   idempotency key scope; `client_ip` has [`TrustedProxies`], [`ProxyHeader`] and [`IpNetwork`] (CIDR
//!   matching from the `ipnet` crate).
//! - `problem` — every `application/problem+json` body the layers write, and the problem types
//!   ([`QUOTA_EXCEEDED`], [`IDEMPOTENCY_KEY_IN_USE`], …).
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
pub use problem::{
    IDEMPOTENCY_KEY_IN_USE, IDEMPOTENCY_KEY_INVALID, IDEMPOTENCY_KEY_MISSING,
    IDEMPOTENCY_KEY_REUSED, IDEMPOTENCY_UNAVAILABLE, QUOTA_EXCEEDED, TEMPORARY_REDUCED_CAPACITY,
};
pub use rate_limit::headers::{RATELIMIT, RATELIMIT_POLICY};
pub use rate_limit::{OnMissing, RateLimitLayer, RateLimitService};
pub use session::{
    CurrentSession, CurrentSessionRejection, LazySession, MissingSessionLayer, SessionError,
    SessionLayer, SessionService,
};
pub use shell::ResponseFuture;

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
