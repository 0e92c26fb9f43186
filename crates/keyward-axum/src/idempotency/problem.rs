//! The problem+json (RFC 9457) bodies of the idempotency layer, with titles from the draft's examples.
//!
//! Each problem type the draft describes has a stable `type` URI: the documentation page of its constant,
//! which says what it means and what a client should do. The other refusals (`413`, `500`, and the
//! `400`s for an unidentified client or an unreadable body) are `about:blank`: their status codes say it
//! all.

use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::problem::response;

/// `type` of a `400`: the operation requires an `Idempotency-Key` and the request has none. Send one
/// (a fresh UUID per operation, the same one on every retry of that operation).
pub const IDEMPOTENCY_KEY_MISSING: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_MISSING.html";

/// `type` of a `400`: the `Idempotency-Key` cannot be used — not a Structured Field String (or, with
/// [`KeySyntax::StringOrBare`](crate::KeySyntax::StringOrBare), a bare visible-ASCII value), empty,
/// longer than [`MAX_IDEMPOTENCY_KEY_BYTES`](crate::MAX_IDEMPOTENCY_KEY_BYTES), or sent twice. The
/// `detail` says which. Nothing was run or recorded.
pub const IDEMPOTENCY_KEY_INVALID: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_INVALID.html";

/// `type` of a `409 Conflict`: a request with this key is being processed. Retry the same request with
/// the same key after `Retry-After` seconds: it then gets the first request's response.
pub const IDEMPOTENCY_KEY_IN_USE: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_IN_USE.html";

/// `type` of a `422 Unprocessable Content`: the key was already used with a different request (method,
/// path and query, content type or body). Do not change a request while retrying it; use a new key for a
/// new operation.
pub const IDEMPOTENCY_KEY_REUSED: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_REUSED.html";

/// `type` of a `503`: the key's store cannot be reached, so the request was refused rather than run
/// unprotected. Nothing was run; retry later with the same key.
pub const IDEMPOTENCY_UNAVAILABLE: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_UNAVAILABLE.html";

pub(crate) fn missing_key() -> Response {
    response(
        StatusCode::BAD_REQUEST,
        &json!({
            "type": IDEMPOTENCY_KEY_MISSING,
            "title": "Idempotency-Key is missing",
            "status": 400,
            "detail": "This operation requires an Idempotency-Key header, a Structured Field String such as \
                       Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\". Send a new key for each \
                       operation and the same key when retrying it.",
        }),
    )
}

pub(crate) fn invalid_key(detail: &str) -> Response {
    response(
        StatusCode::BAD_REQUEST,
        &json!({
            "type": IDEMPOTENCY_KEY_INVALID,
            "title": "Idempotency-Key is invalid",
            "status": 400,
            "detail": detail,
        }),
    )
}

pub(crate) fn in_use(retry_after: u64) -> Response {
    let mut r = response(
        StatusCode::CONFLICT,
        &json!({
            "type": IDEMPOTENCY_KEY_IN_USE,
            "title": "A request is outstanding for this Idempotency-Key",
            "status": 409,
            "detail": format!(
                "A request with the same Idempotency-Key is being processed; retry in {retry_after} second{} \
                 to get its response.",
                if retry_after == 1 { "" } else { "s" }
            ),
            "retry_after": retry_after,
        }),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

pub(crate) fn reused() -> Response {
    response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({
            "type": IDEMPOTENCY_KEY_REUSED,
            "title": "Idempotency-Key is already used",
            "status": 422,
            "detail": "This Idempotency-Key was used with a different request (method, path, query, content type \
                       or body). A key must not be reused across different requests; use a new key for a new \
                       operation.",
        }),
    )
}

pub(crate) fn unavailable() -> Response {
    response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "type": IDEMPOTENCY_UNAVAILABLE,
            "title": "Idempotency-Key cannot be checked",
            "status": 503,
            "detail": "The request was not processed: its Idempotency-Key cannot be checked right now. Retry \
                       later with the same key.",
        }),
    )
}

pub(crate) fn too_large(max: usize) -> Response {
    response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &json!({
            "type": "about:blank",
            "title": "Content Too Large",
            "status": 413,
            "detail": format!("The request body is larger than the {max} bytes this operation accepts."),
        }),
    )
}

pub(crate) fn unidentified(looked_for: &str) -> Response {
    response(
        StatusCode::BAD_REQUEST,
        &json!({
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": format!(
                "Idempotency keys of this operation belong to a client, identified by {looked_for}, which the \
                 request does not carry in a usable form."
            ),
        }),
    )
}

pub(crate) fn bad_request(detail: &str) -> Response {
    response(
        StatusCode::BAD_REQUEST,
        &json!({
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": detail,
        }),
    )
}

pub(crate) fn internal() -> Response {
    response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "The request could not be checked for idempotency.",
        }),
    )
}
