//! Customer accounts: log in (rate-limited per client IP and per account), log out, log out everywhere,
//! and the `require_login` middleware that routes for logged-in customers sit behind.
//!
//! **The one decision to know: the two login limits are checked in a fixed order, so that a refused
//! attempt charges nothing in all but one race.** The issue asks for "two limits, all or nothing".
//! keyward's [`Keyward::rate_limiter_group`](keyward::Keyward::rate_limiter_group) is all or nothing for
//! *one* identity checked against several classes (their keys share a hash tag and one script decides);
//! here the identities differ (the client IP for `login_per_ip`, the customer id for
//! `login_per_account`), and no keyward call checks two ids at once. So [`LoginLimits::check`] does:
//!
//! 1. `peek` the account (charges nothing): refused → `429`, nothing charged;
//! 2. `check` the IP (charges it if allowed): refused → `429`, nothing charged;
//! 3. `check` the account: refused → `429`, **the IP was charged one unit**.
//!
//! Step 3 refuses only if the account's last unit went to a concurrent attempt between steps 1 and 3
//! (the same account attacked from several IPs at once). That is the whole gap: at most one unit of the
//! IP limit per such race, never a unit of the account limit (which is the scarcer, 5 per 15 minutes;
//! charging it for an attempt that the IP limit refused would let one noisy IP lock a customer out).
//! Closing it needs a keyward call that checks a group with one id per class in one script; both keys
//! would then need one hash tag, which on Cluster puts every account's and every IP's limit in one slot.
//!
//! Only then is the password verified (Argon2id, on a blocking thread: ~15 ms of CPU at the recommended
//! cost), so refused attempts cost no hashing. Passwords are never logged, and an unknown customer id
//! is verified against a dummy hash, so both failures take as long and answer the same `401`.
//!
//! A successful login starts a **new** session ([`CurrentSession::create`] ends the one the request came
//! with, if any, and sets a fresh token): a token planted before the login (session fixation) is worthless
//! after it.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use keyward::rate_limit::Source;
use keyward::{Decision, RateLimiter};
use keyward_axum::{CurrentSession, LazySession};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::dashboard::LoginDecision;
use crate::db::DbError;
use crate::error::AppError;

/// The session class (`web_session` in `policy.toml`).
pub const SESSION_CLASS: &str = "web_session";
/// The per-client-IP login limit.
pub const LOGIN_PER_IP_CLASS: &str = "login_per_ip";
/// The per-account login limit.
pub const LOGIN_PER_ACCOUNT_CLASS: &str = "login_per_account";

/// The longest customer id accepted (Northwind's are five letters).
pub const MAX_CUSTOMER_ID_LEN: usize = 16;

/// What a session holds: who is logged in. No cart, nothing else (`max_data_bytes` is 4 KiB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    /// The customer id (`ALFKI`), also the session's user id.
    pub id: String,
    /// The contact's name, for greetings.
    pub contact_name: String,
}

/// The session handle handlers take.
pub type CustomerSession = CurrentSession<Customer>;

/// The two login limiters.
#[derive(Clone, Debug)]
pub struct LoginLimits {
    /// `login_per_ip`, keyed by the client IP.
    pub per_ip: RateLimiter,
    /// `login_per_account`, keyed by the customer id.
    pub per_account: RateLimiter,
}

impl LoginLimits {
    /// The limiters of `kw`'s login classes.
    ///
    /// # Errors
    /// [`keyward::Error::UnknownClass`] / [`keyward::Error::WrongKind`] if the policy lacks them.
    pub fn new(kw: &keyward::Keyward) -> keyward::Result<LoginLimits> {
        Ok(LoginLimits {
            per_ip: kw.rate_limiter(LOGIN_PER_IP_CLASS)?,
            per_account: kw.rate_limiter(LOGIN_PER_ACCOUNT_CLASS)?,
        })
    }

    /// Check both limits for an attempt on `account` from `ip`, in the order the module docs give.
    /// Returns the refusal, if any.
    ///
    /// # Errors
    /// keyward errors other than store failures (those answer per the classes' `on_error = "deny"`).
    pub async fn check(&self, ip: IpAddr, account: &str) -> keyward::Result<Option<Decision>> {
        let ip = ip.to_string();
        let peeked = self.per_account.peek(account).await?;
        if !peeked.is_allowed() {
            return Ok(Some(peeked));
        }
        let by_ip = self.per_ip.check(ip.as_str()).await?;
        if !by_ip.is_allowed() {
            return Ok(Some(by_ip));
        }
        let by_account = self.per_account.check(account).await?;
        if !by_account.is_allowed() {
            return Ok(Some(by_account));
        }
        Ok(None)
    }
}

/// The client's address, as the state's [`TrustedProxies`](keyward_axum::TrustedProxies) read it from
/// the connection (`ConnectInfo<SocketAddr>`, which `axum::serve` adds with
/// `into_make_service_with_connect_info`) and, behind trusted proxies, their forwarding header.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match state.trusted_proxies.client_ip(parts) {
            Some(ip) => Ok(ClientIp(ip)),
            None => {
                // A server set-up error (served without connection info), not the client's.
                tracing::error!("storefront: no client address (serve with connect info)");
                Err(AppError::Internal)
            }
        }
    }
}

/// The body of `POST /login`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginForm {
    /// The customer id (case does not matter: `alfki` is `ALFKI`).
    pub customer_id: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginForm")
            .field("customer_id", &self.customer_id)
            .finish_non_exhaustive()
    }
}

/// The canonical form of a customer id as typed: trimmed, upper case. `None` if it cannot be one (empty,
/// too long, not ASCII letters and digits). The per-account limit is keyed by this form, so `alfki`
/// and `ALFKI` share one limit.
pub fn canonical_customer_id(typed: &str) -> Option<String> {
    let id = typed.trim();
    (!id.is_empty()
        && id.len() <= MAX_CUSTOMER_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric()))
    .then(|| id.to_ascii_uppercase())
}

/// `POST /login` with `{"customer_id": …, "password": …}`: `200` with the customer and a new session
/// cookie; `401` for a wrong id or password (the same answer for both); `429` with `Retry-After` when
/// either login limit refuses (`503` with `Retry-After` when the store is down: the login classes fail
/// closed); `400` for a malformed body. The session is read only for a verified login.
pub(crate) async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Extension(session): Extension<LazySession<Customer>>,
    form: Result<Json<LoginForm>, JsonRejection>,
) -> Result<Json<Customer>, AppError> {
    let Json(form) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let Some(id) = canonical_customer_id(&form.customer_id) else {
        return Err(AppError::BadRequest(format!(
            "customer_id: 1 to {MAX_CUSTOMER_ID_LEN} letters or digits"
        )));
    };
    if let Some(refused) = state.login_limits.check(ip, &id).await? {
        let retry_after = refused.retry_after().unwrap_or(Duration::from_secs(1));
        return Err(if refused.source() == Source::FailClosed {
            // The store is down and the login classes fail closed: not the client's doing.
            state.tallies.login(LoginDecision::Unavailable);
            AppError::Unavailable { retry_after }
        } else {
            state.tallies.login(LoginDecision::Limited);
            AppError::TooManyRequests { retry_after }
        });
    }
    state.tallies.login(LoginDecision::Allowed);
    let customer = verify(&state, id, form.password).await?;
    let Some(customer) = customer else {
        return Err(AppError::LoginFailed);
    };
    // Only now is the session read (a refused or failed attempt reads none), then replaced.
    let session = session.load().await?;
    session.create(&customer.id, &customer).await?;
    Ok(Json(customer))
}

/// The customer `id` if `password` is theirs. Reads the hash, then verifies it on a blocking thread.
async fn verify(
    state: &AppState,
    id: String,
    password: String,
) -> Result<Option<Customer>, AppError> {
    let found = state
        .db
        .read(move |conn| {
            conn.query_row(
                "SELECT contact_name, password_hash FROM customers WHERE id = ?1",
                [&id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?)),
            )
            .optional()
            .map(|found| found.map(|(name, hash)| (id, name, hash)))
            .map_err(DbError::query("read a customer's password hash"))
        })
        .await?;
    let verified = tokio::task::spawn_blocking(move || {
        let (customer, hash) = match found {
            Some((id, contact_name, Some(hash))) => (Some(Customer { id, contact_name }), hash),
            // No such customer, or one who cannot log in: verify against a dummy, so the answer takes as
            // long as for a wrong password, and fail.
            _ => (None, dummy_hash().to_owned()),
        };
        let ok = PasswordHash::new(&hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        customer.filter(|_| ok)
    })
    .await
    .map_err(|e| AppError::Db(DbError::Task(e.to_string())))?;
    Ok(verified)
}

/// A hash of a random password at the default cost, made once: what unknown ids are verified against.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(b"no customer has this password", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// `POST /logout`: end this session and clear the cookie. `204` (also without a session).
pub(crate) async fn logout(session: CustomerSession) -> Result<Response, AppError> {
    session.destroy().await?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// What `POST /logout/everywhere` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoggedOut {
    /// How many sessions ended (this one included).
    pub sessions_ended: u64,
}

/// `POST /logout/everywhere`: end every session of the logged-in customer, on every device, and clear
/// this cookie. `401` without a session.
pub(crate) async fn logout_everywhere(
    session: CustomerSession,
) -> Result<Json<LoggedOut>, AppError> {
    let Some(current) = session.get() else {
        return Err(AppError::LoginRequired);
    };
    let ended = session
        .sessions()
        .destroy_all_for_user(current.user_id())
        .await
        .map_err(keyward_axum::ApiError::from)?;
    // The request's own session is gone with the others; this clears its cookie.
    session.destroy().await?;
    Ok(Json(LoggedOut {
        sessions_ended: ended,
    }))
}

/// `GET /me`: the logged-in customer, or `401`.
pub(crate) async fn me(session: CustomerSession) -> Result<Json<Customer>, AppError> {
    match session.get() {
        Some(current) => Ok(Json(current.data)),
        None => Err(AppError::LoginRequired),
    }
}

/// Middleware: `401` unless the request has a live session. It loads the session (once per request: the
/// idempotency layer's scope and the handler's [`CurrentSession`] share that read), so it sits inside the
/// session layer and outside the idempotency layer (a refusal never takes a key).
pub(crate) async fn require_login(request: Request, next: Next) -> Response {
    let Some(lazy) = request.extensions().get::<LazySession<Customer>>().cloned() else {
        tracing::error!("storefront: require_login without the session layer");
        return AppError::Internal.into_response();
    };
    match lazy.load().await {
        Ok(session) if session.get().is_some() => next.run(request).await,
        Ok(_) => AppError::LoginRequired.into_response(),
        Err(error) => error.into_response(),
    }
}
