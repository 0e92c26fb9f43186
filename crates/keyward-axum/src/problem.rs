//! `application/problem+json` bodies (RFC 9457): every response the three layers write themselves, and
//! the problem types they use.
//!
//! **The one decision to know:** bodies never carry internal details (error messages, keys, tokens):
//! those go to the log. A problem type of its own is used where a client can act on it (the rate-limit
//! draft's `quota-exceeded` and `temporary-reduced-capacity`, the idempotency draft's conditions); the
//! rest are `about:blank`, the status code saying it all. Every body has `type`, `title`, `status` and
//! `detail`, in that order, then its extension members.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value};

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// One problem response under construction.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    body: Map<String, Value>,
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem of type `type_` (a URI, or `about:blank`).
    pub(crate) fn new(
        status: StatusCode,
        type_: &str,
        title: &str,
        detail: impl Into<String>,
    ) -> Self {
        let mut body = Map::new();
        body.insert("type".to_owned(), type_.into());
        body.insert("title".to_owned(), title.into());
        body.insert("status".to_owned(), status.as_u16().into());
        body.insert("detail".to_owned(), detail.into().into());
        Problem {
            status,
            body,
            retry_after: None,
        }
    }

    /// An `about:blank` problem: its `title` is the status's.
    pub(crate) fn blank(status: StatusCode, title: &str, detail: impl Into<String>) -> Self {
        Problem::new(status, "about:blank", title, detail)
    }

    /// An extension member.
    pub(crate) fn member(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.body.insert(name.to_owned(), value.into());
        self
    }

    /// A `retry_after` member in seconds, and the same in a `Retry-After` header.
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self.member("retry_after", secs)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(Value::Object(self.body).to_string()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `400`, `about:blank`.
pub(crate) fn bad_request(detail: impl Into<String>) -> Response {
    Problem::blank(StatusCode::BAD_REQUEST, "Bad Request", detail).into_response()
}

/// `500`, `about:blank`: the details are in the log.
pub(crate) fn internal(detail: impl Into<String>) -> Response {
    Problem::blank(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal Server Error",
        detail,
    )
    .into_response()
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `type` of a 429: the request exceeded one or more quota policies.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `type` of a 503 from a class with `on_error = "deny"` while the store is down.
pub const TEMPORARY_REDUCED_CAPACITY: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

/// The rate-limit layer's responses: refusals use the problem types draft-ietf-httpapi-ratelimit-headers
/// defines, with their `violated-policies` member, plus `retry_after` in seconds.
pub(crate) mod rate_limit {
    use super::*;

    /// 429: over the limit.
    pub(crate) fn quota_exceeded(violated: &[&str], retry_after: u64) -> Response {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            QUOTA_EXCEEDED,
            "Request cannot be satisfied as assigned quota has been exceeded",
            format!(
                "Too many requests; retry in {retry_after} second{}.",
                plural(retry_after)
            ),
        )
        .member("violated-policies", violated)
        .retry_after(retry_after)
        .into_response()
    }

    /// 503: the limiter's store is down and the class refuses rather than guessing.
    pub(crate) fn reduced_capacity(violated: &[&str], retry_after: u64) -> Response {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            TEMPORARY_REDUCED_CAPACITY,
            "Request cannot be satisfied due to temporary server capacity constraints",
            format!(
                "Rate limits cannot be checked right now; retry in {retry_after} second{}.",
                plural(retry_after)
            ),
        )
        .member("violated-policies", violated)
        .retry_after(retry_after)
        .into_response()
    }

    /// 400: the request carries no identity to count it by.
    pub(crate) fn unidentified(looked_for: &str) -> Response {
        bad_request(format!(
            "This endpoint is rate limited by {looked_for}, which the request does not carry in a usable form."
        ))
    }

    /// 500: the layer cannot work (misconfiguration, or an id keyward rejects); details are logged.
    pub(crate) fn internal() -> Response {
        super::internal("The request could not be checked against its rate limits.")
    }
}

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

/// The idempotency layer's responses, with titles from the draft's examples. Each problem type the
/// draft describes has a stable `type` URI: the documentation page of its constant, which says what it
/// means and what a client should do.
pub(crate) mod idempotency {
    use super::*;

    pub(crate) fn missing_key() -> Response {
        Problem::new(
            StatusCode::BAD_REQUEST,
            IDEMPOTENCY_KEY_MISSING,
            "Idempotency-Key is missing",
            "This operation requires an Idempotency-Key header, a Structured Field String such as \
             Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\". Send a new key for each \
             operation and the same key when retrying it.",
        )
        .into_response()
    }

    pub(crate) fn invalid_key(detail: &str) -> Response {
        Problem::new(
            StatusCode::BAD_REQUEST,
            IDEMPOTENCY_KEY_INVALID,
            "Idempotency-Key is invalid",
            detail,
        )
        .into_response()
    }

    pub(crate) fn in_use(retry_after: u64) -> Response {
        Problem::new(
            StatusCode::CONFLICT,
            IDEMPOTENCY_KEY_IN_USE,
            "A request is outstanding for this Idempotency-Key",
            format!(
                "A request with the same Idempotency-Key is being processed; retry in {retry_after} second{} \
                 to get its response.",
                plural(retry_after)
            ),
        )
        .retry_after(retry_after)
        .into_response()
    }

    pub(crate) fn reused() -> Response {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            IDEMPOTENCY_KEY_REUSED,
            "Idempotency-Key is already used",
            "This Idempotency-Key was used with a different request (method, path, query, content type \
             or body). A key must not be reused across different requests; use a new key for a new \
             operation.",
        )
        .into_response()
    }

    pub(crate) fn unavailable() -> Response {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            IDEMPOTENCY_UNAVAILABLE,
            "Idempotency-Key cannot be checked",
            "The request was not processed: its Idempotency-Key cannot be checked right now. Retry \
             later with the same key.",
        )
        .into_response()
    }

    pub(crate) fn too_large(max: usize) -> Response {
        Problem::blank(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Content Too Large",
            format!("The request body is larger than the {max} bytes this operation accepts."),
        )
        .into_response()
    }

    pub(crate) fn unidentified(looked_for: &str) -> Response {
        bad_request(format!(
            "Idempotency keys of this operation belong to a client, identified by {looked_for}, which the \
             request does not carry in a usable form."
        ))
    }

    pub(crate) fn internal() -> Response {
        super::internal("The request could not be checked for idempotency.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_have_the_rfc_members_in_order_and_retry_after_twice() {
        let response = idempotency::in_use(1);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["type"], IDEMPOTENCY_KEY_IN_USE);
        assert_eq!(body["status"], 409);
        assert_eq!(body["retry_after"], 1);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("retry in 1 second to")
        );

        let response = rate_limit::quota_exceeded(&["per_ip"], 12);
        assert_eq!(response.headers()[header::RETRY_AFTER], "12");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["violated-policies"], serde_json::json!(["per_ip"]));
        assert_eq!(body["detail"], "Too many requests; retry in 12 seconds.");
    }
}
