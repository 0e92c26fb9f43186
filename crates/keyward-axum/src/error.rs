//! [`ApiError`]: a keyward error as a handler's error, so that handlers can `?` any keyward call and get
//! an honest `application/problem+json` response.
//!
//! **The one decision to know:** the status says *whether to retry*, and the body says nothing else. A
//! store that cannot be reached (unreachable, timed out, the breaker open, a server that is loading,
//! busy or out of memory) is a `503` with `Retry-After`; anything else is a `500`. The body is the same
//! generic problem for every error of a class: Redis messages, server addresses, keys, class names and
//! Rust type paths go to the log (at `error`), never to the client.

use std::error::Error as StdError;
use std::fmt;

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

/// `Retry-After` of a `503` when the error does not say when the store may be back (a timeout, a lost
/// connection): 1 s, short enough that a client retries about when the next call would reach a
/// recovered server, long enough not to spin.
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// A keyward error returned by a handler: `From<keyward::Error>`, so `?` works on every keyward call,
/// and [`IntoResponse`], so axum can send it.
///
/// | the error | response |
/// | --- | --- |
/// | the store is unavailable ([`keyward::Error::is_unavailable`]) or the call may succeed when retried ([`keyward::Error::is_retryable`]: a timeout, the breaker open, a lost connection, a loader timeout, an embedded store at its budget) | `503`, `Retry-After` (the breaker's cooldown when it is open, else 1 s; whole seconds, at least 1) |
/// | [`keyward::Error::CacheAfterSource`] (your write happened, the cache update did not) | `500` without `Retry-After`, its detail saying the change was saved: the write must not be repeated blindly |
/// | anything else (an error reply, bad input, your loader's or write's error) | `500` |
///
/// The body is `application/problem+json` of type `about:blank` with a generic `detail`; a `503` also
/// carries a `retry_after` member in seconds. The error itself (its `Display`, which names the class, the
/// server and the operation) is logged at `error` when the response is made, never sent.
///
/// Your own errors from a loader or a source write come back inside it: [`app_error`](Self::app_error)
/// returns them as their own type, so a "not found" from the database can still be a `404`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use axum::{Router, body::Body, extract::{Path, State}, routing::get};
/// use http::{Request, StatusCode};
/// use keyward::{Cache, Keyward};
/// use keyward::policy::{CacheClass, Policy};
/// use keyward_axum::ApiError;
/// use tower::ServiceExt;
///
/// async fn article(State(articles): State<Cache<String>>, Path(id): Path<u32>) -> Result<String, ApiError> {
///     // `?` turns any keyward error into a 503 or a 500 problem+json.
///     Ok(articles.get_or_set(&id.to_string(), || async move {
///         Ok::<_, std::io::Error>(format!("article {id}")) // your database here
///     }).await?)
/// }
///
/// let policy = Policy::builder("dev", "blog")
///     .cache("article", CacheClass::new(Duration::from_secs(600), "the editor, after every save"))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let app = Router::new().route("/articles/{id}", get(article)).with_state(kw.cache::<String>("article")?);
/// let response = app.oneshot(Request::get("/articles/7").body(Body::empty())?).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// # Ok(()) }
/// ```
pub struct ApiError {
    source: keyward::Error,
    /// What failed, for the log line and the response's wording; `None` for a plain keyward call.
    context: Option<Context>,
}

/// What the failed call was part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// A session operation of the session layer or [`CurrentSession`](crate::CurrentSession): `load`,
    /// `create`, `save`, ….
    Session(&'static str),
}

impl ApiError {
    /// An error of a session operation (`op`: `load`, `create`, `save`, …).
    pub(crate) fn session(source: keyward::Error, op: &'static str) -> Self {
        ApiError {
            source,
            context: Some(Context::Session(op)),
        }
    }

    /// The keyward error.
    pub fn error(&self) -> &keyward::Error {
        &self.source
    }

    /// The keyward error, owned.
    pub fn into_error(self) -> keyward::Error {
        self.source
    }

    /// Your own error, as its type `E`, when the failure was a loader's error
    /// ([`keyward::Error::Loader`]) or a source write's error ([`keyward::Error::Source`], from
    /// `invalidate_after` or `write_through`) of type `E`, or one wrapping an `E` along its
    /// [`source`](StdError::source) chain. `None` for every other failure (a store error, a timeout, …)
    /// and for an error of another type.
    ///
    /// It is [`keyward::Error::downcast_ref`] on the error inside: call that where you still hold the
    /// `keyward::Error` (your own `From<keyward::Error>`), and this where you hold an `ApiError` (what
    /// the session handle's methods and `?` into `ApiError` give you), as below.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// use axum::{Router, body::Body, extract::{Path, State}, routing::{get, put}};
    /// use axum::response::{IntoResponse, Response};
    /// use http::{Request, StatusCode};
    /// use keyward::{Cache, Keyward};
    /// use keyward::policy::{CacheClass, Policy};
    /// use keyward_axum::ApiError;
    /// use tower::ServiceExt;
    ///
    /// /// Your database's error.
    /// #[derive(Debug, thiserror::Error)]
    /// enum DbError {
    ///     #[error("no article {0}")]
    ///     NotFound(u32),
    ///     #[error("the database is down")]
    ///     Down,
    /// }
    ///
    /// async fn load(id: u32) -> Result<String, DbError> {
    ///     if id == 7 { Ok("hello".into()) } else { Err(DbError::NotFound(id)) }
    /// }
    /// async fn rename(id: u32, _title: String) -> Result<(), DbError> {
    ///     if id == 7 { Ok(()) } else { Err(DbError::NotFound(id)) }
    /// }
    ///
    /// /// The application's error: its own cases, and everything else as keyward-axum answers it.
    /// enum AppError {
    ///     NotFound,
    ///     Other(ApiError),
    /// }
    ///
    /// // One mapping for every error a handler meets: keyward calls and the session handle's methods.
    /// impl From<ApiError> for AppError {
    ///     fn from(error: ApiError) -> Self {
    ///         match error.app_error::<DbError>() {
    ///             Some(DbError::NotFound(_)) => AppError::NotFound,
    ///             _ => AppError::Other(error), // DbError::Down, store failures: 500 / 503
    ///         }
    ///     }
    /// }
    ///
    /// impl From<keyward::Error> for AppError {
    ///     fn from(error: keyward::Error) -> Self {
    ///         ApiError::from(error).into()
    ///     }
    /// }
    ///
    /// impl IntoResponse for AppError {
    ///     fn into_response(self) -> Response {
    ///         match self {
    ///             AppError::NotFound => (StatusCode::NOT_FOUND, "no such article").into_response(),
    ///             AppError::Other(error) => error.into_response(),
    ///         }
    ///     }
    /// }
    ///
    /// async fn show(State(c): State<Cache<String>>, Path(id): Path<u32>) -> Result<String, AppError> {
    ///     Ok(c.get_or_set(&id.to_string(), || load(id)).await?) // a loader error is never cached
    /// }
    ///
    /// async fn edit(State(c): State<Cache<String>>, Path(id): Path<u32>, title: String) -> Result<(), AppError> {
    ///     Ok(c.invalidate_after(&id.to_string(), rename(id, title)).await?)
    /// }
    ///
    /// let policy = Policy::builder("dev", "blog")
    ///     .cache("article", CacheClass::new(Duration::from_secs(600), "edit, after the rename"))
    ///     .build()?;
    /// let kw = Keyward::embedded(policy);
    /// let app = Router::new()
    ///     .route("/articles/{id}", get(show).put(edit))
    ///     .with_state(kw.cache::<String>("article")?);
    ///
    /// let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    /// let put = |path: &str| Request::put(path).body(Body::from("new title")).unwrap();
    /// assert_eq!(app.clone().oneshot(get("/articles/7")).await?.status(), StatusCode::OK);
    /// assert_eq!(app.clone().oneshot(get("/articles/8")).await?.status(), StatusCode::NOT_FOUND);
    /// assert_eq!(app.clone().oneshot(put("/articles/8")).await?.status(), StatusCode::NOT_FOUND);
    /// # Ok(()) }
    /// ```
    pub fn app_error<E: StdError + 'static>(&self) -> Option<&E> {
        self.source.downcast_ref::<E>()
    }

    /// The status this error answers with: `503` or `500` (see the table above).
    pub fn status(&self) -> StatusCode {
        if self.retry_after().is_some() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }

    /// The `Retry-After`, in whole seconds, of the `503` this error answers as; `None` when it answers
    /// `500`. For a handler that builds its own body (a health check naming what is down).
    pub fn retry_after(&self) -> Option<u64> {
        let error = &self.source;
        if matches!(error, keyward::Error::CacheAfterSource { .. })
            || !(error.is_unavailable() || error.is_retryable())
        {
            return None;
        }
        Some(match error {
            keyward::Error::CircuitOpen { retry_in, .. } => {
                crate::rate_limit::headers::retry_after_secs(Some(*retry_in))
            }
            _ => DEFAULT_RETRY_AFTER_SECS,
        })
    }
}

impl From<keyward::Error> for ApiError {
    fn from(source: keyward::Error) -> Self {
        ApiError {
            source,
            context: None,
        }
    }
}

impl From<ApiError> for keyward::Error {
    fn from(error: ApiError) -> Self {
        error.source
    }
}

/// The keyward error's message, after what failed (`session load failed: …`); for logs, never for
/// response bodies.
impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.context {
            Some(Context::Session(op)) => write!(f, "session {op} failed: {}", self.source),
            None => fmt::Display::fmt(&self.source, f),
        }
    }
}

impl fmt::Debug for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiError")
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

impl StdError for ApiError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self, "keyward-axum: request failed");
        let session = matches!(self.context, Some(Context::Session(_)));
        match self.retry_after() {
            Some(secs) => Problem::blank(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                if session {
                    "Sessions are unavailable right now; retry shortly."
                } else {
                    "A service this request needs is unavailable right now; retry shortly."
                },
            )
            .retry_after(secs)
            .into_response(),
            None if matches!(self.source, keyward::Error::CacheAfterSource { .. }) => {
                crate::problem::internal(
                    "The change was saved, but cached copies could not be updated; they expire on \
                     their own. Do not repeat the request.",
                )
            }
            None => crate::problem::internal(if session {
                "The session could not be processed."
            } else {
                "The request could not be processed."
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::header;
    use serde_json::Value;

    use super::*;

    async fn answer(error: keyward::Error) -> (StatusCode, Option<String>, Value) {
        let response = ApiError::from(error).into_response();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    /// No internals in a body: no server, class, operation, key or Rust path.
    fn assert_plain(body: &Value) {
        let text = body.to_string();
        for leak in [
            "10.0.0.9",
            "secret_class",
            "fill_lease",
            "::",
            "Redis",
            "constraint",
            "row 42",
        ] {
            assert!(!text.contains(leak), "the body leaks `{leak}`: {text}");
        }
        assert_eq!(body["type"], "about:blank");
    }

    #[tokio::test]
    async fn outages_are_503_with_retry_after() {
        let timeout = keyward::Error::Timeout {
            server: "10.0.0.9:6379".into(),
            op: "fill_lease",
            timeout: Duration::from_millis(250),
        };
        let (status, retry_after, body) = answer(timeout).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["retry_after"], 1);
        assert_eq!(body["status"], 503);
        assert_plain(&body);

        let open = keyward::Error::CircuitOpen {
            server: "10.0.0.9:6379".into(),
            op: "fill_lease",
            retry_in: Duration::from_millis(4200),
        };
        let (status, retry_after, body) = answer(open).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            retry_after.as_deref(),
            Some("5"),
            "the cooldown, rounded up"
        );
        assert_plain(&body);
    }

    #[tokio::test]
    async fn other_failures_are_500_without_retry_after() {
        #[derive(Debug, thiserror::Error)]
        #[error("row 42 of secret_class: {{constraint}} violated")]
        struct Db;
        for error in [
            keyward::Error::Loader {
                class: "secret_class".into(),
                source: Arc::new(Box::new(Db) as keyward::BoxError),
            },
            keyward::Error::ValueTooLarge {
                class: "secret_class".into(),
                field: "max_value_bytes",
                size: 10,
                max: 1,
            },
            // The write happened: no invitation to repeat it, although the cache failure was an outage.
            keyward::Error::CacheAfterSource {
                class: "secret_class".into(),
                cause: Box::new(keyward::Error::Timeout {
                    server: "10.0.0.9:6379".into(),
                    op: "fill_lease",
                    timeout: Duration::from_millis(250),
                }),
            },
        ] {
            let after_source = matches!(error, keyward::Error::CacheAfterSource { .. });
            let (status, retry_after, body) = answer(error).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(retry_after, None);
            assert!(body.get("retry_after").is_none());
            assert_plain(&body);
            // The client is told its write happened (a plain 500 read as "nothing was saved").
            let saved = body["detail"]
                .as_str()
                .unwrap()
                .contains("The change was saved");
            assert_eq!(saved, after_source, "{body}");
        }
    }

    #[test]
    fn app_errors_come_back_typed_through_wrappers() {
        #[derive(Debug, thiserror::Error)]
        #[error("not found")]
        struct NotFound;
        #[derive(Debug, thiserror::Error)]
        #[error("query failed")]
        struct Query(#[source] NotFound);

        let loader = ApiError::from(keyward::Error::Loader {
            class: "c".into(),
            source: Arc::new(Box::new(NotFound) as keyward::BoxError),
        });
        assert!(loader.app_error::<NotFound>().is_some());
        assert!(loader.app_error::<std::io::Error>().is_none());

        let wrapped = ApiError::from(keyward::Error::Source {
            class: "c".into(),
            source: Arc::new(Box::new(Query(NotFound)) as keyward::BoxError),
        });
        assert!(wrapped.app_error::<Query>().is_some());
        assert!(wrapped.app_error::<NotFound>().is_some());

        let store = ApiError::from(keyward::Error::MissingRedisUrl);
        assert!(store.app_error::<NotFound>().is_none());
    }
}
