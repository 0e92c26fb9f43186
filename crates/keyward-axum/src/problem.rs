//! `application/problem+json` bodies (RFC 9457): every response the three layers write themselves, and
//! the problem types they use.
//!
//! **The one decision to know:** bodies never carry internal details (error messages, keys, tokens,
//! Rust type paths): those go to the log. Every `type` is either a problem type a standard defines
//! (the rate-limit draft's `quota-exceeded` and `temporary-reduced-capacity`, under IANA's HTTP Problem
//! Types registry) or `about:blank` (RFC 9457 §4.2.1: nothing beyond the status code, and a `title`
//! that is the status phrase); none points at a page of ours, which this project does not host. Every
//! body has `type`, `title`, `status` and `detail`, in that order, then its extension members.
//! `docs/axum.md` lists every problem the crate sends.

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

/// `type` of a 429: the request exceeded one or more quota policies. Defined by
/// draft-ietf-httpapi-ratelimit-headers in IANA's HTTP Problem Types registry
/// (<https://www.iana.org/assignments/http-problem-types>), which lists it once the draft is published;
/// a client matches it as an identifier, it need not be fetched.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `type` of a 503 from a class with `on_error = "deny"` while the store is down. Defined by
/// draft-ietf-httpapi-ratelimit-headers, like [`QUOTA_EXCEEDED`].
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

/// Formerly the `type` of the idempotency layer's `400` for a request without an `Idempotency-Key`.
/// That response is now `about:blank` (a docs.rs page of this crate was never a page that existed):
/// match its status, `400`.
#[deprecated(
    since = "0.1.0",
    note = "the idempotency layer's problems are `about:blank` now; match the status (400)"
)]
pub const IDEMPOTENCY_KEY_MISSING: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_MISSING.html";

/// Formerly the `type` of the idempotency layer's `400` for an unusable `Idempotency-Key`. That
/// response is now `about:blank`: match its status, `400`.
#[deprecated(
    since = "0.1.0",
    note = "the idempotency layer's problems are `about:blank` now; match the status (400)"
)]
pub const IDEMPOTENCY_KEY_INVALID: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_INVALID.html";

/// Formerly the `type` of the idempotency layer's `409` (a request with this key is being processed).
/// That response is now `about:blank`: match its status, `409`.
#[deprecated(
    since = "0.1.0",
    note = "the idempotency layer's problems are `about:blank` now; match the status (409)"
)]
pub const IDEMPOTENCY_KEY_IN_USE: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_IN_USE.html";

/// Formerly the `type` of the idempotency layer's `422` (the key was used with a different request).
/// That response is now `about:blank`: match its status, `422`.
#[deprecated(
    since = "0.1.0",
    note = "the idempotency layer's problems are `about:blank` now; match the status (422)"
)]
pub const IDEMPOTENCY_KEY_REUSED: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_KEY_REUSED.html";

/// Formerly the `type` of the idempotency layer's `503` (the key's store cannot be reached). That
/// response is now `about:blank`: match its status, `503`.
#[deprecated(
    since = "0.1.0",
    note = "the idempotency layer's problems are `about:blank` now; match the status (503)"
)]
pub const IDEMPOTENCY_UNAVAILABLE: &str =
    "https://docs.rs/keyward-axum/latest/keyward_axum/constant.IDEMPOTENCY_UNAVAILABLE.html";

/// The idempotency layer's responses: all `about:blank`, the title the status phrase, the `detail`
/// saying what happened and what the client should do. The draft defines no problem types; the status
/// codes it names (`400`, `409`, `422`) are each used for one condition only, except `400`, whose
/// cases (no key, an unusable key) a client fixes the same way: by sending one well-formed key.
pub(crate) mod idempotency {
    use super::*;

    pub(crate) fn missing_key() -> Response {
        Problem::blank(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "This operation requires an Idempotency-Key header, a Structured Field String such as \
             Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\". Send a new key for each \
             operation and the same key when retrying it.",
        )
        .into_response()
    }

    pub(crate) fn invalid_key(detail: &str) -> Response {
        Problem::blank(StatusCode::BAD_REQUEST, "Bad Request", detail).into_response()
    }

    pub(crate) fn in_use(retry_after: u64) -> Response {
        Problem::blank(
            StatusCode::CONFLICT,
            "Conflict",
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
        Problem::blank(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Content",
            "This Idempotency-Key was used with a different request (method, path, query, content type \
             or body). A key must not be reused across different requests; use a new key for a new \
             operation.",
        )
        .into_response()
    }

    pub(crate) fn unavailable() -> Response {
        Problem::blank(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
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
        assert_eq!(body["type"], "about:blank");
        assert_eq!(body["title"], "Conflict");
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
