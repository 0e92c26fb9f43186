//! Server-side sessions for axum on keyward's [`Sessions`]: [`SessionLayer`] finds the session cookie and
//! puts a [`LazySession`] in the request extensions; the [`CurrentSession`] extractor loads the session (the
//! first time a request asks) and lets the handler read it, log in, save, regenerate and log out; after the
//! handler, the layer writes the `Set-Cookie` that follows. A route that never extracts the session never
//! touches the store (`handle`).
//!
//! **The one decision to know:** the handler never holds a token. The handle keeps it, so it cannot be logged,
//! put in a body, or set with the wrong attributes by handler code: the only way a token reaches the client
//! is the layer's own `Set-Cookie`, built from the class's cookie settings. Everything is documented on
//! [`SessionLayer`], which is what a reader of the crate docs finds.

mod cookie;
mod handle;

use std::fmt;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, COOKIE, SET_COOKIE};
use http::{HeaderValue, Request};
use keyward::codec::{Codec, Json};
use keyward::session::{Sessions, is_well_formed};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::{Layer, Service};

use crate::problem;
use crate::shell::{Capability, ResponseFuture, Shell};
use cookie::{CookieSpec, Found};
use handle::CookieChange;
pub use handle::{
    CurrentSession, CurrentSessionRejection, LazySession, MissingSessionLayer, SessionError,
};

/// A tower [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html) that gives every request its keyward session, read from the session cookie; handlers
/// reach it with the [`CurrentSession`] extractor. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use axum::{Router, body::Body, routing::{get, post}};
/// use http::{Request, StatusCode, header};
/// use keyward::Keyward;
/// use keyward::policy::{Policy, SessionClass};
/// use keyward::session::SessionSecrets;
/// use keyward_axum::{ApiError, CurrentSession, SessionLayer};
/// use tower::ServiceExt;
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Profile { name: String }
///
/// async fn login(session: CurrentSession<Profile>) -> Result<&'static str, ApiError> {
///     // ...after checking the password:
///     session.create("user-7", &Profile { name: "Ada".into() }).await?;
///     Ok("welcome")
/// }
///
/// async fn whoami(session: CurrentSession<Profile>) -> (StatusCode, String) {
///     match session.get() {
///         Some(s) => (StatusCode::OK, s.data.name),
///         None => (StatusCode::UNAUTHORIZED, "log in first".into()),
///     }
/// }
///
/// let policy = Policy::builder("dev", "web")
///     .session("web", SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)))
///     .build()?;
/// let kw = Keyward::embedded(policy); // or Keyward::from_env(policy).await? for REDIS_URL
/// let secrets = SessionSecrets::new(*b"a 32-byte secret from your vault")?;
/// let app = Router::new()
///     .route("/login", post(login))
///     .route("/me", get(whoami))
///     .layer(SessionLayer::new(kw.sessions::<Profile>("web", secrets)?));
///
/// let response = app.clone().oneshot(Request::post("/login").body(Body::empty())?).await?;
/// let set_cookie = response.headers()[header::SET_COOKIE].to_str()?;
/// assert!(set_cookie.starts_with("__Host-session="));
/// let cookie = set_cookie.split(';').next().unwrap(); // what a browser sends back
///
/// let me = app.oneshot(Request::get("/me").header(header::COOKIE, cookie).body(Body::empty())?).await?;
/// assert_eq!(me.status(), StatusCode::OK);
/// # Ok(()) }
/// ```
///
/// # The request
/// The layer reads the class's cookie (`cookie_name`, default `__Host-session`) from the request's `Cookie`
/// header lines (all of them; pairs that do not parse are skipped). It does **not** read the store: it
/// puts exactly one value in the request extensions, a [`LazySession<T, C>`](LazySession) holding the
/// class's [`Sessions`] and the cookie's token (never shown by `Debug`), and nothing else. The session is
/// loaded with [`Sessions::get`], which also pushes back the idle expiry, when the first
/// [`CurrentSession<T, C>`](CurrentSession) extractor of the request runs (or [`LazySession::load`] is
/// called), at most once per request; later extractors of the same request share that session, or that
/// error. So:
///
/// - a route that never extracts the session (`/healthz`, `/metrics`) never touches the store, and answers
///   while it is down, even for a logged-in user;
/// - only requests that use the session count as activity for the class's `idle` timeout.
///
/// No cookie, a malformed, unknown, tampered or ended token: the request simply has no session, which is
/// not an error (a cookie that is not a well-formed token is never looked up). **A cookie name sent twice**
/// also means no session: a second value means a cookie was planted (a sibling subdomain, a wider path),
/// and choosing either would let the planted one win some of the time.
///
/// # The cookie
/// Set when a handler logs in ([`CurrentSession::create`]) or regenerates, cleared when it logs out
/// ([`CurrentSession::destroy`]) or finds its session gone; otherwise the response carries no `Set-Cookie`.
///
/// ```text
/// Set-Cookie: __Host-session=<43 characters>; HttpOnly; SameSite=Lax; Secure; Path=/
/// Set-Cookie: __Host-session=; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=0        (cleared)
/// ```
///
/// - `HttpOnly` always: page scripts never read the token.
/// - `Secure` unless the class says `cookie_secure = false` (plain-http development only).
/// - `SameSite` and `Path` from the class; `Domain` only if the class sets one (without it the cookie goes
///   back only to the host that set it — which is what the `__Host-` prefix makes browsers enforce).
/// - **No `Max-Age` or `Expires`**: a browser-session cookie, forgotten when the browser closes. The server
///   enforces the class's `idle` and `absolute` timeouts whatever the client keeps, so a client-side
///   lifetime would add nothing but a second clock to keep in step.
/// - A response that sets or clears the cookie and has no `Cache-Control` gets `Cache-Control: no-store`,
///   so no shared cache keeps a token; an explicit `Cache-Control` from the handler is left alone.
///
/// # Responses the layer and the extractor write themselves
/// | situation | response |
/// | --- | --- |
/// | the [`CurrentSession`] extractor cannot load the session: the store is unreachable or times out | `503` problem+json with `Retry-After`, logged at `error`; the handler does not run |
/// | it cannot load it otherwise (a Redis error reply) | `500` problem+json, logged at `error`; the handler does not run |
/// | the stored data is not a valid `T` (its shape changed without a bump of the class's `version`) | no response of its own: the request has no session (logged at `error`), as Django does with unreadable session data, rather than failing every request of that user until the session times out; logging in again starts a fresh one |
/// | a handler uses [`CurrentSession<T>`] on a route without a `SessionLayer<T>` (same `T`) | plain `500` problem+json; the log line names both types ([`MissingSessionLayer`]) |
///
/// Routes that do not extract the session never get these. [`ApiError`](crate::ApiError), which the
/// handle's methods return ([`SessionError`] is its older name), answers the same way, so handlers can
/// use `?`.
/// Bodies never carry error details; those go to the log. Tokens are never logged, and the layer marks the
/// request's `Cookie` lines and its own `Set-Cookie` as sensitive (`http`'s flag: their `Debug` prints
/// `Sensitive`, and HTTP/2 never adds them to its header compression table).
///
/// # Middleware order
/// In axum the layer added last runs first. Add the session layer after (outside) everything that needs
/// the session: an authorization middleware extracting [`CurrentSession`] (or calling
/// [`LazySession::load`] on the handle in the extensions), a rate limit or an idempotency layer keyed by
/// [`KeyExtractor::session_user`](crate::KeyExtractor::session_user). Since the layer itself reads
/// nothing, a rate limit that needs no session (per IP) refuses without a session read wherever it sits;
/// one that needs the session reads it before every refusal, so limit logins per IP. The crate docs'
/// *Middleware order* has the recommended stack. A handle moved into a task that outlives the handler can
/// still change the session, but the response is gone by then: its cookie changes are never sent.
pub struct SessionLayer<T, C = Json> {
    config: Arc<SessionConfig<T, C>>,
}

/// The configuration of a [`SessionLayer`], shared by its services.
pub struct SessionConfig<T, C> {
    sessions: Sessions<T, C>,
    cookie: CookieSpec,
}

impl<T, C> SessionLayer<T, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    /// Sessions of `sessions`' class, with its cookie settings.
    pub fn new(sessions: Sessions<T, C>) -> Self {
        let cookie = CookieSpec::of(sessions.settings());
        SessionLayer {
            config: Arc::new(SessionConfig { sessions, cookie }),
        }
    }

    /// The sessions this layer loads.
    pub fn sessions(&self) -> &Sessions<T, C> {
        &self.config.sessions
    }
}

impl<T, C> Clone for SessionLayer<T, C> {
    fn clone(&self) -> Self {
        SessionLayer {
            config: Arc::clone(&self.config),
        }
    }
}

impl<T, C> fmt::Debug for SessionLayer<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl<T, C> fmt::Debug for SessionConfig<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("sessions", &self.sessions)
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl<S, T, C> Layer<S> for SessionLayer<T, C> {
    type Service = SessionService<S, T, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Shell::new(inner, Arc::clone(&self.config))
    }
}

/// The [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) of [`SessionLayer`], wrapping the inner service `S`. Cheap to clone; its `Debug`
/// prints the layer's configuration.
pub type SessionService<S, T, C = Json> = Shell<SessionConfig<T, C>, S>;

impl<S, T, C, B> Capability<S, B> for SessionConfig<T, C>
where
    S: Service<Request<B>> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
    B: Send + 'static,
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    type InnerRequest = Request<B>;
    type Error = S::Error;

    fn call(self: Arc<Self>, inner: S, request: Request<B>) -> ResponseFuture<S::Error> {
        Box::pin(with_session(self, inner, request))
    }
}

async fn with_session<S, B, T, C>(
    config: Arc<SessionConfig<T, C>>,
    mut inner: S,
    request: Request<B>,
) -> Result<Response, S::Error>
where
    S: Service<Request<B>>,
    S::Response: IntoResponse,
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    let (mut parts, body) = request.into_parts();
    // Tokens travel in `Cookie`: keep them out of anything downstream that prints headers with `Debug`.
    for (name, value) in parts.headers.iter_mut() {
        if name == COOKIE {
            value.set_sensitive(true);
        }
    }
    let cookie = &config.cookie;
    let token = match cookie.find(&parts.headers) {
        Found::Once(value) if is_well_formed(&value) => Some(value.into_owned()),
        Found::Once(_) | Found::Absent => None,
        Found::Duplicated => {
            tracing::debug!(
                cookie = cookie.name(),
                "keyward-axum: the session cookie was sent more than once; the request has no session"
            );
            None
        }
    };
    // Nothing is read from the store here: the first `CurrentSession` extractor (or `LazySession::load`)
    // does it, so a route that never uses the session works while the store is down.
    let lazy = LazySession::new(config.sessions.clone(), token);
    parts.extensions.insert(lazy.clone());

    let mut response = inner
        .call(Request::from_parts(parts, body))
        .await?
        .into_response();

    // Only a loaded session can have changed: an unused one leaves the response alone.
    let value = match lazy.cookie_change() {
        (CookieChange::Keep, _) => return Ok(response),
        (CookieChange::Set, Some(token)) => cookie.set(&token),
        // Set without a token cannot happen (every path that sets one stores the token); clearing is
        // the safe reading.
        (CookieChange::Set, None) | (CookieChange::Clear, _) => cookie.clear(),
    };
    let Some(value) = value else {
        tracing::error!(cookie = ?cookie, "keyward-axum: the session cookie is not a valid header value");
        return Ok(problem::internal(
            "The session cookie could not be written.",
        ));
    };
    let headers = response.headers_mut();
    headers.append(SET_COOKIE, value);
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(response)
}
