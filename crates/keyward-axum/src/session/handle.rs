//! The request's session: [`LazySession`], which [`SessionLayer`](crate::SessionLayer) puts in the request
//! extensions, and [`CurrentSession`], the loaded session a handler extracts, with its errors.
//!
//! **The one decision to know:** the session is read from the store only when something asks for it —
//! the [`CurrentSession`] extractor or [`LazySession::load`] — and then at most once per request: the
//! outcome (the session, no session, or the store's error) is kept and shared by every later extractor of
//! the same request. A route that never asks never touches the store, so `/healthz` keeps answering while
//! Redis is down.

use std::any::type_name;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use keyward::codec::{Codec, Json};
use keyward::session::{Saved, Session, Sessions};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

use crate::ApiError;
use crate::problem;

/// A token, kept away from `Debug` and logs.
struct Token(String);

/// What the response must do with the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieChange {
    /// Nothing changed: no `Set-Cookie`.
    Keep,
    /// Set it to the current token (login, regenerate).
    Set,
    /// Remove it (logout, or the session turned out to be gone).
    Clear,
}

struct State<T> {
    /// The token of the live session, if there is one (none until the session is loaded).
    token: Option<Token>,
    /// The session as loaded, or as left by the last operation of this request.
    loaded: Option<Session<T>>,
    cookie: CookieChange,
}

struct Shared<T, C> {
    sessions: Sessions<T, C>,
    /// The well-formed token the request's cookie carried, read by the one load.
    cookie_token: Option<Token>,
    /// The outcome of the one load of this request: set by the first extractor, shared by the later ones
    /// (an error too, so a second extractor does not pay the timeout again).
    load: OnceCell<Result<(), keyward::Error>>,
    state: Mutex<State<T>>,
    /// Serializes the operations of one request, which await the store between reading and updating the
    /// state (a std lock is never held across an await).
    op: tokio::sync::Mutex<()>,
}

/// The request's session, not yet read from the store: what [`SessionLayer`](crate::SessionLayer) puts in
/// the request extensions (one per request, as `LazySession<T, C>`). Cheap to clone; clones share the
/// request's one load.
///
/// Handlers use [`CurrentSession`], which loads through it. Middleware that has the request rather than
/// extractors can take it from the extensions and call [`load`](Self::load).
pub struct LazySession<T, C = Json> {
    shared: Arc<Shared<T, C>>,
}

impl<T, C> Clone for LazySession<T, C> {
    fn clone(&self) -> Self {
        LazySession {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T, C> fmt::Debug for LazySession<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match self.shared.load.get() {
            None if self.shared.cookie_token.is_none() => "no cookie",
            None => "not loaded",
            Some(Ok(())) => "loaded",
            Some(Err(_)) => "failed",
        };
        f.debug_struct("LazySession")
            .field("class", &self.shared.sessions)
            .field("load", &load)
            .finish()
    }
}

impl<T, C> LazySession<T, C> {
    /// The handle of a request whose cookie carried `cookie_token` (well-formed), or none.
    pub(crate) fn new(sessions: Sessions<T, C>, cookie_token: Option<String>) -> Self {
        LazySession {
            shared: Arc::new(Shared {
                sessions,
                cookie_token: cookie_token.map(Token),
                load: OnceCell::new(),
                state: Mutex::new(State {
                    token: None,
                    loaded: None,
                    cookie: CookieChange::Keep,
                }),
                op: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Whether the session was loaded (successfully or not) during this request.
    pub fn is_loaded(&self) -> bool {
        self.shared.load.initialized()
    }

    /// What the response must do with the cookie, and the token to set; `Keep` when the session was never
    /// loaded (nothing can have changed it).
    pub(crate) fn cookie_change(&self) -> (CookieChange, Option<String>) {
        if !self.is_loaded() {
            return (CookieChange::Keep, None);
        }
        let state = lock(&self.shared.state);
        (state.cookie, state.token.as_ref().map(|t| t.0.clone()))
    }
}

impl<T, C> LazySession<T, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    /// The request's session, read from the store on the first call of the request (with
    /// [`Sessions::get`], which also pushes back its idle expiry); later calls, and every
    /// [`CurrentSession`] extractor of the request, share that outcome without calling the store again.
    /// A request without a usable cookie never calls the store.
    ///
    /// # Errors
    /// [`ApiError`] if the store fails (unreachable or timed out: a `503` as a response; otherwise a
    /// `500`); later calls of the same request return the same error. Stored data that is not a valid `T`
    /// is not an error: the request has no session (logged at `error`).
    pub async fn load(&self) -> Result<CurrentSession<T, C>, ApiError> {
        let shared = &self.shared;
        let outcome = shared
            .load
            .get_or_init(|| async {
                let Some(token) = &shared.cookie_token else {
                    return Ok(());
                };
                let loaded = match shared.sessions.get(&token.0).await {
                    Ok(loaded) => loaded,
                    // Data that is not a valid `T` (a shape change without a `version` bump) would fail every
                    // request of that user until the session times out: treat it as no session, loudly.
                    Err(error @ keyward::Error::Decode { .. }) => {
                        tracing::error!(%error, "keyward-axum: a stored session is unreadable; the request has no session");
                        None
                    }
                    Err(error) => return Err(error),
                };
                // A token without a live session is forgotten: nothing to destroy, regenerate or save.
                if let Some(session) = loaded {
                    let mut state = lock(&shared.state);
                    state.token = Some(Token(token.0.clone()));
                    state.loaded = Some(session);
                }
                Ok(())
            })
            .await;
        match outcome {
            Ok(()) => Ok(CurrentSession {
                shared: Arc::clone(shared),
            }),
            Err(error) => Err(ApiError::session(error.clone(), "load")),
        }
    }
}

/// The session of the current request: an axum extractor, valid on routes behind a
/// [`SessionLayer`](crate::SessionLayer) of the same data type. Extracting it loads the session (once per
/// request, see [`LazySession::load`]); if that fails, the extractor rejects the request with `503` (store
/// unreachable or timed out) or `500` problem+json and the handler does not run. Cheap to clone; clones
/// share the request's session and its cookie.
///
/// | method | effect on the store | cookie |
/// | --- | --- | --- |
/// | [`get`](Self::get) | none (the extractor loaded it) | unchanged |
/// | [`create`](Self::create) | ends the current session, if any, and starts a new one | set |
/// | [`save`](Self::save) | versioned save of the data | unchanged (cleared if the session is gone) |
/// | [`reload`](Self::reload) | reads the session again (after a [`Saved::Conflict`]) | cleared if gone |
/// | [`regenerate`](Self::regenerate) | moves the session to a new token, ending the old one | set (cleared if gone) |
/// | [`destroy`](Self::destroy) | ends the session (log out) | cleared |
///
/// For other users' sessions, a user's devices or "log out everywhere", use [`sessions`](Self::sessions).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use axum::{Router, body::Body, http::{Request, StatusCode, header}, routing::{get, post}};
/// use keyward::{Keyward, policy::{Policy, SessionClass}, session::SessionSecrets};
/// use keyward_axum::{ApiError, CurrentSession, SessionLayer};
/// use serde::{Deserialize, Serialize};
/// use tower::ServiceExt;
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Profile { name: String }
///
/// /// Log in: a new session (any previous one of this browser ends), and its cookie.
/// async fn login(session: CurrentSession<Profile>) -> Result<StatusCode, ApiError> {
///     session.create("user-7", &Profile { name: "Ada".into() }).await?;
///     Ok(StatusCode::NO_CONTENT)
/// }
///
/// /// Who is logged in: the session the extractor loaded, if any.
/// async fn me(session: CurrentSession<Profile>) -> Result<String, StatusCode> {
///     session.get().map(|s| s.data.name).ok_or(StatusCode::UNAUTHORIZED)
/// }
///
/// let policy = Policy::builder("dev", "shop")
///     .session("web", SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let secrets = SessionSecrets::new(*b"a 32-byte secret from your vault")?;
/// let app = Router::new()
///     .route("/login", post(login))
///     .route("/me", get(me))
///     .layer(SessionLayer::new(kw.sessions::<Profile>("web", secrets)?));
///
/// let logged_in = app.clone().oneshot(Request::post("/login").body(Body::empty())?).await?;
/// let cookie = logged_in.headers()[header::SET_COOKIE].to_str()?.split(';').next().unwrap().to_owned();
/// let me = app.oneshot(Request::get("/me").header(header::COOKIE, cookie).body(Body::empty())?).await?;
/// assert_eq!(me.status(), StatusCode::OK);
/// # Ok(()) }
/// ```
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
    /// The request's session: as the extractor loaded it, or as the last call on this handle left it. `None`
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
    pub async fn create(&self, user_id: &str, data: &T) -> Result<Session<T>, ApiError> {
        let _op = self.shared.op.lock().await;
        let old = self.state().token.as_ref().map(|t| t.0.clone());
        if let Some(old) = old {
            self.shared
                .sessions
                .destroy(&old)
                .await
                .map_err(|e| ApiError::session(e, "destroy"))?;
            self.forget();
        }
        let (token, session) = self
            .shared
            .sessions
            .create(user_id, data)
            .await
            .map_err(|e| ApiError::session(e, "create"))?;
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
    pub async fn save(&self, session: &mut Session<T>) -> Result<Saved, ApiError> {
        let _op = self.shared.op.lock().await;
        let saved = self
            .shared
            .sessions
            .save(session)
            .await
            .map_err(|e| ApiError::session(e, "save"))?;
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
    pub async fn reload(&self) -> Result<Option<Session<T>>, ApiError> {
        let _op = self.shared.op.lock().await;
        let Some(token) = self.state().token.as_ref().map(|t| t.0.clone()) else {
            return Ok(None);
        };
        let loaded = self
            .shared
            .sessions
            .get(&token)
            .await
            .map_err(|e| ApiError::session(e, "load"))?;
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
    pub async fn regenerate(&self) -> Result<Option<Session<T>>, ApiError> {
        let _op = self.shared.op.lock().await;
        let Some(old) = self.state().token.as_ref().map(|t| t.0.clone()) else {
            return Ok(None);
        };
        let moved = self
            .shared
            .sessions
            .regenerate(&old)
            .await
            .map_err(|e| ApiError::session(e, "regenerate"))?;
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
            .map_err(|e| ApiError::session(e, "load"))?;
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
    pub async fn destroy(&self) -> Result<bool, ApiError> {
        let _op = self.shared.op.lock().await;
        let token = self.state().token.as_ref().map(|t| t.0.clone());
        let ended = match token {
            Some(token) => self
                .shared
                .sessions
                .destroy(&token)
                .await
                .map_err(|e| ApiError::session(e, "destroy"))?,
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
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    type Rejection = CurrentSessionRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let lazy =
            parts
                .extensions
                .get::<LazySession<T, C>>()
                .cloned()
                .ok_or(MissingSessionLayer {
                    data_type: type_name::<T>(),
                    codec: type_name::<C>(),
                })?;
        Ok(lazy.load().await?)
    }
}

/// The rejection of the [`CurrentSession`] extractor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CurrentSessionRejection {
    /// No [`SessionLayer`](crate::SessionLayer) of the same data type around the route: `500`.
    #[error(transparent)]
    MissingLayer(#[from] MissingSessionLayer),
    /// Loading the session failed: `503` when the store is unreachable or timed out, else `500`.
    #[error(transparent)]
    Load(#[from] ApiError),
}

impl IntoResponse for CurrentSessionRejection {
    fn into_response(self) -> Response {
        match self {
            CurrentSessionRejection::MissingLayer(e) => e.into_response(),
            CurrentSessionRejection::Load(e) => e.into_response(),
        }
    }
}

/// The rejection of [`CurrentSession<T>`] on a route without a
/// [`SessionLayer<T>`](crate::SessionLayer) of the same data type (and codec): a setup error. The
/// response is a plain `500` problem+json (`"The request could not be processed."`); the log line (at
/// `error`) names both types and the fix, which is what its `Display` says.
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
        // Type paths and setup advice are for the operator's log, not for the client.
        problem::internal("The request could not be processed.")
    }
}

/// The error of the session handle's methods ([`CurrentSession::create`], [`LazySession::load`], …): the
/// crate's general [`ApiError`](crate::ApiError), under the name earlier versions gave it.
///
/// A session operation fails when the store does (unreachable, timed out, an error reply) or the data does
/// (not encodable, over `max_data_bytes`). As a response (so handlers can use `?`): `503` problem+json with
/// `Retry-After` when the store is unreachable or timed out, `500` otherwise; the error is logged at
/// `error` and never in the body. Its `Display` names the operation (`session load failed: …`).
///
/// It was a separate type that answered any keyward error the same way; it is now an alias, so existing
/// code keeps compiling and a handler can mix session calls and other keyward calls under one error type.
/// Prefer [`ApiError`](crate::ApiError) in new code.
pub type SessionError = ApiError;
