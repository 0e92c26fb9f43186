//! Server-side sessions for axum on keyward's [`Sessions`]: [`SessionLayer`] finds the session cookie and
//! loads the session before the handler runs; the [`CurrentSession`] extractor lets the handler read it, log
//! in, save, regenerate and log out; after the handler, the layer writes the `Set-Cookie` that follows.
//!
//! **The one decision to know:** the handler never holds a token. The handle keeps it, so it cannot be logged,
//! put in a body, or set with the wrong attributes by handler code: the only way a token reaches the client
//! is the layer's own `Set-Cookie`, built from the class's cookie settings. Everything is documented on
//! [`SessionLayer`], which is what a reader of the crate docs finds.

mod cookie;

use std::any::type_name;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, COOKIE, SET_COOKIE};
use http::request::Parts;
use http::{HeaderValue, Request};
use keyward::codec::{Codec, Json};
use keyward::session::{Saved, Session, Sessions, is_well_formed};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::{Layer, Service};

use crate::problem::{self, session as session_problem};
use crate::shell::{Capability, ResponseFuture, Shell};
use cookie::{CookieSpec, Found};

/// A tower [`Layer`] that gives every request its keyward session, read from the session cookie; handlers
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
/// use keyward_axum::{CurrentSession, SessionError, SessionLayer};
/// use tower::ServiceExt;
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Profile { name: String }
///
/// async fn login(session: CurrentSession<Profile>) -> Result<&'static str, SessionError> {
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
/// header lines (all of them; pairs that do not parse are skipped) and loads its session with
/// [`Sessions::get`], which also pushes back the idle expiry. No cookie, a malformed, unknown, tampered or
/// ended token: the request simply has no session, which is not an error. **A cookie name sent twice** also
/// means no session: a second value means a cookie was planted (a sibling subdomain, a wider path), and
/// choosing either would let the planted one win some of the time.
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
/// # Responses the layer writes itself
/// | situation | response |
/// | --- | --- |
/// | loading the session fails: the store is unreachable or times out | `503` problem+json, logged at `error` |
/// | loading the session fails otherwise (a Redis error reply) | `500` problem+json, logged at `error` |
/// | the stored data is not a valid `T` (its shape changed without a bump of the class's `version`) | no response of its own: the request has no session (logged at `error`), as Django does with unreadable session data, rather than failing every request of that user until the session times out; logging in again starts a fresh one |
/// | a handler uses [`CurrentSession<T>`] on a route without a `SessionLayer<T>` (same `T`) | `500` problem+json naming both types ([`MissingSessionLayer`]) |
///
/// [`SessionError`], which the handle's methods return, answers the same way, so handlers can use `?`.
/// Bodies never carry error details; those go to the log. Tokens are never logged, and the layer marks the
/// request's `Cookie` lines and its own `Set-Cookie` as sensitive (`http`'s flag: their `Debug` prints
/// `Sensitive`, and HTTP/2 never adds them to its header compression table).
///
/// # Middleware order
/// In axum the layer added last runs first. Add the session layer after (outside) anything that needs the
/// session, such as an authorization layer reading [`CurrentSession`] from the extensions, and before a
/// rate-limit layer keyed on the user. A handle moved into a task that outlives the handler can still change
/// the session, but the response is gone by then: its cookie changes are never sent.
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

/// The [`Service`] of [`SessionLayer`], wrapping the inner service `S`. Cheap to clone; its `Debug`
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
    let sessions = config.sessions.clone();
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
    let loaded = match &token {
        Some(token) => match sessions.get(token).await {
            Ok(loaded) => loaded,
            // Data that is not a valid `T` (a shape change without a `version` bump) would fail every
            // request of that user until the session times out: treat it as no session, loudly.
            Err(error @ keyward::Error::Decode { .. }) => {
                tracing::error!(%error, "keyward-axum: a stored session is unreadable; the request has no session");
                None
            }
            Err(error) => return Ok(SessionError::new(error, "load").into_response()),
        },
        None => None,
    };
    // A token without a live session is forgotten: nothing to destroy, regenerate or save.
    let token = token.filter(|_| loaded.is_some()).map(Token);
    let handle = CurrentSession {
        shared: Arc::new(Shared {
            sessions,
            state: Mutex::new(State {
                token,
                loaded,
                cookie: CookieChange::Keep,
            }),
            op: tokio::sync::Mutex::new(()),
        }),
    };
    parts.extensions.insert(handle.clone());

    let mut response = inner
        .call(Request::from_parts(parts, body))
        .await?
        .into_response();

    let value = {
        let state = handle.state();
        match (&state.cookie, &state.token) {
            (CookieChange::Keep, _) => return Ok(response),
            (CookieChange::Set, Some(token)) => cookie.set(&token.0),
            // Set without a token cannot happen (every path that sets one stores the token); clearing is
            // the safe reading.
            (CookieChange::Set, None) | (CookieChange::Clear, _) => cookie.clear(),
        }
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

/// A token, kept away from `Debug` and logs.
struct Token(String);

/// What the response must do with the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CookieChange {
    /// Nothing changed: no `Set-Cookie`.
    Keep,
    /// Set it to the current token (login, regenerate).
    Set,
    /// Remove it (logout, or the session turned out to be gone).
    Clear,
}

struct State<T> {
    /// The token of the live session, if there is one.
    token: Option<Token>,
    /// The session as loaded, or as left by the last operation of this request.
    loaded: Option<Session<T>>,
    cookie: CookieChange,
}

struct Shared<T, C> {
    sessions: Sessions<T, C>,
    state: Mutex<State<T>>,
    /// Serializes the operations of one request, which await the store between reading and updating the
    /// state (a std lock is never held across an await).
    op: tokio::sync::Mutex<()>,
}

/// The session of the current request: an axum extractor, valid on routes behind a [`SessionLayer`] of the
/// same data type. Cheap to clone; clones share the request's session and its cookie.
///
/// | method | effect on the store | cookie |
/// | --- | --- | --- |
/// | [`get`](Self::get) | none (the layer loaded it) | unchanged |
/// | [`create`](Self::create) | ends the current session, if any, and starts a new one | set |
/// | [`save`](Self::save) | versioned save of the data | unchanged (cleared if the session is gone) |
/// | [`reload`](Self::reload) | reads the session again (after a [`Saved::Conflict`]) | cleared if gone |
/// | [`regenerate`](Self::regenerate) | moves the session to a new token, ending the old one | set (cleared if gone) |
/// | [`destroy`](Self::destroy) | ends the session (log out) | cleared |
///
/// For other users' sessions, a user's devices or "log out everywhere", use [`sessions`](Self::sessions).
pub struct CurrentSession<T, C = Json> {
    shared: Arc<Shared<T, C>>,
}

impl<T, C> Clone for CurrentSession<T, C> {
    fn clone(&self) -> Self {
        CurrentSession {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T, C> fmt::Debug for CurrentSession<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.shared.state);
        f.debug_struct("CurrentSession")
            .field("class", &self.shared.sessions)
            .field("session", &state.loaded.as_ref().map(Session::id))
            .field("cookie", &state.cookie)
            .finish()
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    // The state is a few plain fields updated in one step each: a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T, C> CurrentSession<T, C> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        lock(&self.shared.state)
    }

    /// Forget the session and clear the cookie.
    fn forget(&self) {
        let mut state = self.state();
        state.token = None;
        state.loaded = None;
        state.cookie = CookieChange::Clear;
    }

    /// Forget a session found to have ended, leaving the cookie alone: it names nothing, and clearing it
    /// could undo a newer cookie that a concurrent request (a `regenerate`, a login) has just set.
    fn forget_quietly(&self) {
        let mut state = self.state();
        state.token = None;
        state.loaded = None;
    }
}

impl<T, C> CurrentSession<T, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    /// The request's session: as the layer loaded it, or as the last call on this handle left it. `None`
    /// when the request has none (no cookie, or one that names no live session).
    pub fn get(&self) -> Option<Session<T>> {
        self.state().loaded.clone()
    }

    /// Log in: end the request's current session, if any, start a new one for `user_id` with `data`, and set
    /// the cookie to its token.
    ///
    /// The old session is destroyed rather than regenerated, so nothing of it carries over implicitly — not
    /// another user's data on a shared computer, not a session an attacker planted (session fixation). To
    /// keep something from it (an anonymous cart), read it with [`get`](Self::get) first and put it in
    /// `data`.
    ///
    /// # Errors
    /// As [`Sessions::create`] and [`Sessions::destroy`]. If starting the new session fails after the old one
    /// ended, the cookie is cleared.
    pub async fn create(&self, user_id: &str, data: &T) -> Result<Session<T>, SessionError> {
        let _op = self.shared.op.lock().await;
        let old = self.state().token.as_ref().map(|t| t.0.clone());
        if let Some(old) = old {
            self.shared
                .sessions
                .destroy(&old)
                .await
                .map_err(|e| SessionError::new(e, "destroy"))?;
            self.forget();
        }
        let (token, session) = self
            .shared
            .sessions
            .create(user_id, data)
            .await
            .map_err(|e| SessionError::new(e, "create"))?;
        let mut state = self.state();
        state.token = Some(Token(token.as_str().to_owned()));
        state.loaded = Some(session.clone());
        state.cookie = CookieChange::Set;
        Ok(session)
    }

    /// Save `session.data` (a session from [`get`](Self::get), [`create`](Self::create) or
    /// [`reload`](Self::reload)) if nobody saved it since it was read; see [`Sessions::save`]. On
    /// [`Saved::Saved`], [`get`](Self::get) returns the saved session. On [`Saved::Conflict`], call
    /// [`reload`](Self::reload), re-apply the change and save again. On [`Saved::Gone`] the request's session
    /// is forgotten; the cookie is left alone (it names no session, and clearing it could undo a newer cookie
    /// that a concurrent request has just set).
    ///
    /// # Errors
    /// As [`Sessions::save`].
    pub async fn save(&self, session: &mut Session<T>) -> Result<Saved, SessionError> {
        let _op = self.shared.op.lock().await;
        let saved = self
            .shared
            .sessions
            .save(session)
            .await
            .map_err(|e| SessionError::new(e, "save"))?;
        let is_current = self
            .state()
            .loaded
            .as_ref()
            .is_some_and(|s| s.id() == session.id());
        if is_current {
            match saved {
                Saved::Saved => self.state().loaded = Some(session.clone()),
                Saved::Gone => self.forget_quietly(),
                _ => {}
            }
        }
        Ok(saved)
    }

    /// Read the request's session from the store again (after a [`Saved::Conflict`]). `None` if it has
    /// ended (the cookie is left alone, as for [`Saved::Gone`]).
    ///
    /// # Errors
    /// As [`Sessions::get`].
    pub async fn reload(&self) -> Result<Option<Session<T>>, SessionError> {
        let _op = self.shared.op.lock().await;
        let Some(token) = self.state().token.as_ref().map(|t| t.0.clone()) else {
            return Ok(None);
        };
        let loaded = self
            .shared
            .sessions
            .get(&token)
            .await
            .map_err(|e| SessionError::new(e, "load"))?;
        match &loaded {
            Some(session) => self.state().loaded = Some(session.clone()),
            None => self.forget_quietly(),
        }
        Ok(loaded)
    }

    /// Move the request's session to a new token (same data and user) and set the cookie to it; the old
    /// token stops working at once. Call it when the user's privileges change (sudo mode, a second factor).
    /// Returns the session under its new token, or `None` (cookie cleared) if there was no live session.
    ///
    /// # Errors
    /// As [`Sessions::regenerate`] and [`Sessions::get`]. If reading the moved session fails, the cookie is
    /// still set to the new token.
    pub async fn regenerate(&self) -> Result<Option<Session<T>>, SessionError> {
        let _op = self.shared.op.lock().await;
        let Some(old) = self.state().token.as_ref().map(|t| t.0.clone()) else {
            return Ok(None);
        };
        let moved = self
            .shared
            .sessions
            .regenerate(&old)
            .await
            .map_err(|e| SessionError::new(e, "regenerate"))?;
        let Some(token) = moved else {
            self.forget();
            return Ok(None);
        };
        {
            let mut state = self.state();
            state.token = Some(Token(token.as_str().to_owned()));
            state.cookie = CookieChange::Set;
        }
        // The moved session has a new key: read it, so that `get` and `save` use the new one.
        let loaded = self
            .shared
            .sessions
            .get(token.as_str())
            .await
            .map_err(|e| SessionError::new(e, "load"))?;
        match &loaded {
            Some(session) => self.state().loaded = Some(session.clone()),
            None => self.forget(),
        }
        Ok(loaded)
    }

    /// Log out: end the request's session, if any, and clear the cookie (always, so a client holding a dead
    /// or foreign cookie is cleaned up too). Returns whether a session ended.
    ///
    /// # Errors
    /// As [`Sessions::destroy`]; the session and the cookie are then left as they were, so the client can
    /// retry.
    pub async fn destroy(&self) -> Result<bool, SessionError> {
        let _op = self.shared.op.lock().await;
        let token = self.state().token.as_ref().map(|t| t.0.clone());
        let ended = match token {
            Some(token) => self
                .shared
                .sessions
                .destroy(&token)
                .await
                .map_err(|e| SessionError::new(e, "destroy"))?,
            None => false,
        };
        self.forget();
        Ok(ended)
    }

    /// The class's sessions: every user's, for listing a user's devices ([`Sessions::list_for_user`]),
    /// ending one of them ([`Sessions::destroy_by_id`]) or all of them ([`Sessions::destroy_all_for_user`]).
    /// Ending the request's own session through it does not clear the cookie; follow with
    /// [`destroy`](Self::destroy) for that.
    pub fn sessions(&self) -> &Sessions<T, C> {
        &self.shared.sessions
    }
}

impl<S, T, C> FromRequestParts<S> for CurrentSession<T, C>
where
    S: Send + Sync,
    T: Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    type Rejection = MissingSessionLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<CurrentSession<T, C>>()
            .cloned()
            .ok_or(MissingSessionLayer {
                data_type: type_name::<T>(),
                codec: type_name::<C>(),
            })
    }
}

/// The rejection of [`CurrentSession<T>`] on a route without a [`SessionLayer<T>`] of the same data type
/// (and codec): a setup error, answered with `500` problem+json that names the types, and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "CurrentSession<{data_type}> needs a SessionLayer<{data_type}> (codec {codec}) around this route; add `.layer(SessionLayer::new(sessions))` to the router"
)]
pub struct MissingSessionLayer {
    data_type: &'static str,
    codec: &'static str,
}

impl IntoResponse for MissingSessionLayer {
    fn into_response(self) -> Response {
        tracing::error!("keyward-axum: {self}");
        problem::internal(self.to_string())
    }
}

/// A session operation failed: the store (unreachable, timed out, an error) or the data (not encodable,
/// over `max_data_bytes`, or stored data that is not a valid `T`).
///
/// As a response (so handlers can use `?`): `503` problem+json when the store is unreachable or timed out
/// ([`keyward::Error::is_retryable`]), `500` otherwise; the error is logged at `error` and never in the body.
#[derive(Debug, thiserror::Error)]
#[error("session {op} failed: {source}")]
pub struct SessionError {
    op: &'static str,
    #[source]
    source: keyward::Error,
}

impl SessionError {
    fn new(source: keyward::Error, op: &'static str) -> Self {
        SessionError { op, source }
    }

    /// The keyward error.
    pub fn error(&self) -> &keyward::Error {
        &self.source
    }

    /// The keyward error, owned.
    pub fn into_error(self) -> keyward::Error {
        self.source
    }
}

/// For the [`Sessions`] calls a handler makes itself (through [`CurrentSession::sessions`]), so they can
/// use `?` and answer like the handle's own methods.
impl From<keyward::Error> for SessionError {
    fn from(source: keyward::Error) -> Self {
        SessionError::new(source, "store call")
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self, "keyward-axum: session operation failed");
        if self.source.is_retryable() {
            session_problem::unavailable()
        } else {
            problem::internal("The session could not be processed.")
        }
    }
}
