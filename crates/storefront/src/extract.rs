//! [`PathParam`]: axum's `Path` extractor, answering a malformed path parameter the way the shop answers
//! every other bad request.
//!
//! **The one decision to know:** every route with a path parameter (`/products/{id}`,
//! `/categories/{id}/products`, `/admin/products/{id}`) extracts it with [`PathParam`], never with
//! `Path` directly: axum's own rejection is a plain-text body, where the shop's clients expect RFC 9457
//! `application/problem+json` ([`AppError`]). A value that does not parse is a `400` whose `detail` names
//! the parameter and quotes the value sent (at most [`SHOWN_CHARS`] characters of it); a mismatch between
//! the route and the extractor (a bug of ours, not the client's) stays a `500`, logged.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, RawPathParams};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::AppError;

/// Most characters of a bad value quoted in a `detail`; a longer value is cut there and ends in `…`.
pub(crate) const SHOWN_CHARS: usize = 64;

/// The path parameters of a route, as `T` (e.g. `PathParam(id): PathParam<i64>`); a value that does not
/// parse answers a problem+json `400` ([`path_error`]).
#[derive(Debug)]
pub(crate) struct PathParam<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParam(value)),
            Err(rejection) => {
                // A lone primitive (`PathParam<i64>`) fails without its key: the route's raw parameters
                // name it.
                let names: Vec<(String, String)> = RawPathParams::from_request_parts(parts, state)
                    .await
                    .map(|raw| {
                        raw.iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Err(path_error(&rejection, &names))
            }
        }
    }
}

/// How the shop answers axum's path rejection: a `400` naming the parameter and the value for a value
/// that does not parse; [`AppError::Internal`] (logged) for a route that does not fit its extractor.
/// `params` are the route's `(name, value)` pairs (percent-decoded), to name a parameter axum's error
/// does not.
pub(crate) fn path_error(rejection: &PathRejection, params: &[(String, String)]) -> AppError {
    use axum::extract::path::ErrorKind;
    if rejection.status() != StatusCode::BAD_REQUEST {
        tracing::error!(error = %rejection.body_text(), "storefront: a route's path does not fit its extractor");
        return AppError::Internal;
    }
    let PathRejection::FailedToDeserializePathParams(failed) = rejection else {
        return AppError::BadRequest(format!(
            "The path is not valid: {}.",
            shown(&rejection.body_text())
        ));
    };
    let detail = match failed.kind() {
        ErrorKind::ParseErrorAtKey {
            key,
            value,
            expected_type,
        } => format!(
            "The path parameter `{key}` must be {}; got {}.",
            expected(expected_type),
            shown(value)
        ),
        ErrorKind::ParseErrorAtIndex {
            index,
            value,
            expected_type,
        } => format!(
            "Path parameter {} must be {}; got {}.",
            index + 1,
            expected(expected_type),
            shown(value)
        ),
        ErrorKind::ParseError {
            value,
            expected_type,
        } => {
            // The parameter holding this value; the only one if none does (should not happen).
            let key = params
                .iter()
                .find(|(_, v)| v == value)
                .or(match params {
                    [only] => Some(only),
                    _ => None,
                })
                .map_or_else(String::new, |(k, _)| format!(" `{k}`"));
            format!(
                "The path parameter{key} must be {}; got {}.",
                expected(expected_type),
                shown(value)
            )
        }
        ErrorKind::InvalidUtf8InPathParam { key } => {
            format!("The path parameter `{key}` is not UTF-8 once percent-decoded.")
        }
        ErrorKind::DeserializeError {
            key,
            value,
            message,
        } => format!(
            "The path parameter `{key}` is not valid ({}); got {}.",
            truncated(message),
            shown(value)
        ),
        other => format!("The path is not valid: {}.", shown(&other.to_string())),
    };
    AppError::BadRequest(detail)
}

/// What a value of `expected_type` (a Rust type name, as axum reports it) is, in words.
fn expected(expected_type: &str) -> String {
    match expected_type {
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".to_owned(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number ≥ 0".to_owned(),
        other => format!("a value of type {other}"),
    }
}

/// `value` quoted (control characters escaped), cut after [`SHOWN_CHARS`] characters.
fn shown(value: &str) -> String {
    format!("{:?}", truncated(value))
}

/// `text`, cut after [`SHOWN_CHARS`] characters with `…` appended.
fn truncated(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_on_a_character_boundary_and_quoted() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = "é".repeat(SHOWN_CHARS + 10);
        let cut = shown(&long);
        assert_eq!(cut, format!("\"{}…\"", "é".repeat(SHOWN_CHARS)));
        assert_eq!(shown("a\nb"), "\"a\\nb\"", "control characters escaped");
        assert_eq!(expected("i64"), "a whole number");
        assert_eq!(expected("u32"), "a whole number ≥ 0");
        assert_eq!(expected("bool"), "a value of type bool");
    }
}
