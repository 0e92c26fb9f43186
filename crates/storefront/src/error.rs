//! [`AppError`]: what a storefront handler returns, and how each failure answers over HTTP.
//!
//! **The one decision to know:** keyward failures answer through [`keyward_axum::ApiError`] (a `503` with
//! `Retry-After` while the store is down, a `500` otherwise, nothing internal in the body), and the
//! database's own errors come back out of keyward's type-erased loader and write errors with
//! [`ApiError::app_error`]: a [`DbError::NotFound`] is a `404` whether it came straight from SQLite or
//! through a cache loader.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyward_axum::ApiError;

use crate::db::DbError;

/// A handler's error.
#[derive(Debug)]
#[non_exhaustive]
pub enum AppError {
    /// `404`: the row does not exist or is not published.
    NotFound(String),
    /// `400`: the request cannot be served as sent.
    BadRequest(String),
    /// `401`: an admin route without the admin token.
    Unauthorized,
    /// `401`: a route for logged-in customers, without a live session.
    LoginRequired,
    /// `401`: a wrong customer id or password (one answer for both).
    LoginFailed,
    /// `409`: the request conflicts with the data (not enough stock).
    Conflict(String),
    /// `429`: a login limit refused the attempt; retry after this long (whole seconds, at least 1, in
    /// `Retry-After`).
    TooManyRequests {
        /// How long until an attempt may pass.
        retry_after: std::time::Duration,
    },
    /// `503`: a store the request needs is down (a fail-closed login limit); retry after this long.
    Unavailable {
        /// When to retry.
        retry_after: std::time::Duration,
    },
    /// `500`: a set-up error of the server (logged where it is found).
    Internal,
    /// A keyward failure: `503` or `500`, as [`ApiError`] answers it (boxed: it is the largest variant, and
    /// every handler's `Result` carries its size).
    Store(Box<ApiError>),
    /// A database failure: `500` (logged, never shown).
    Db(DbError),
}

impl From<keyward::Error> for AppError {
    fn from(error: keyward::Error) -> Self {
        let error = ApiError::from(error);
        match error.app_error::<DbError>() {
            Some(DbError::NotFound { what, id }) => AppError::NotFound(format!("No {what} {id}.")),
            Some(DbError::Invalid { what, reason }) => {
                AppError::BadRequest(format!("{what}: {reason}"))
            }
            _ => AppError::Store(Box::new(error)),
        }
    }
}

impl From<ApiError> for AppError {
    fn from(error: ApiError) -> Self {
        AppError::Store(Box::new(error))
    }
}

impl From<DbError> for AppError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::NotFound { what, id } => AppError::NotFound(format!("No {what} {id}.")),
            DbError::Invalid { what, reason } => AppError::BadRequest(format!("{what}: {reason}")),
            other => AppError::Db(other),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            AppError::NotFound(detail) => (StatusCode::NOT_FOUND, detail),
            AppError::BadRequest(detail) => (StatusCode::BAD_REQUEST, detail),
            AppError::Unauthorized => {
                let mut response = problem(
                    StatusCode::UNAUTHORIZED,
                    "This route needs the admin token (Authorization: Bearer …).",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return response;
            }
            AppError::LoginRequired => (
                StatusCode::UNAUTHORIZED,
                "Log in first (POST /login).".to_owned(),
            ),
            AppError::LoginFailed => (
                StatusCode::UNAUTHORIZED,
                "Wrong customer id or password.".to_owned(),
            ),
            AppError::Conflict(detail) => (StatusCode::CONFLICT, detail),
            AppError::TooManyRequests { retry_after } => {
                let secs = whole_seconds(retry_after);
                return with_retry_after(
                    problem(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!("Too many login attempts; retry in {secs} s."),
                    ),
                    secs,
                );
            }
            AppError::Unavailable { retry_after } => {
                let secs = whole_seconds(retry_after);
                return with_retry_after(
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "A service this request needs is unavailable right now; retry shortly.",
                    ),
                    secs,
                );
            }
            AppError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The request could not be processed.".to_owned(),
            ),
            AppError::Store(error) => return (*error).into_response(),
            AppError::Db(error) => {
                tracing::error!(error = %error, "storefront: database failure");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The request could not be processed.".to_owned(),
                )
            }
        };
        problem(status, &detail)
    }
}

/// `wait` in whole seconds, at least 1 (what `Retry-After` carries).
fn whole_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    response
}

/// An `application/problem+json` response of type `about:blank` (RFC 9457).
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    response
}
