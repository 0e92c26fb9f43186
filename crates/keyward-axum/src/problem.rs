//! `application/problem+json` bodies (RFC 9457) for the responses the layer writes itself.
//!
//! Refusals use the problem types draft-ietf-httpapi-ratelimit-headers defines (`quota-exceeded`,
//! `temporary-reduced-capacity`) with their `violated-policies` member, plus `retry_after` in seconds.
//! 5xx bodies never carry internal details: those go to the log.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// `type` of a 429: the request exceeded one or more quota policies.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// `type` of a 503 from a class with `on_error = "deny"` while the store is down.
pub const TEMPORARY_REDUCED_CAPACITY: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

pub(crate) fn response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, PROBLEM_JSON);
    response
}

/// 429: over the limit.
pub(crate) fn quota_exceeded(violated: &[&str], retry_after: u64) -> Response {
    response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({
            "type": QUOTA_EXCEEDED,
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "detail": format!("Too many requests; retry in {retry_after} second{}.", plural(retry_after)),
            "violated-policies": violated,
            "retry_after": retry_after,
        }),
    )
}

/// 503: the limiter's store is down and the class refuses rather than guessing.
pub(crate) fn reduced_capacity(violated: &[&str], retry_after: u64) -> Response {
    response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "type": TEMPORARY_REDUCED_CAPACITY,
            "title": "Request cannot be satisfied due to temporary server capacity constraints",
            "status": 503,
            "detail": format!("Rate limits cannot be checked right now; retry in {retry_after} second{}.", plural(retry_after)),
            "violated-policies": violated,
            "retry_after": retry_after,
        }),
    )
}

/// 400: the request carries no identity to count it by.
pub(crate) fn unidentified(looked_for: &str) -> Response {
    response(
        StatusCode::BAD_REQUEST,
        &json!({
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": format!("This endpoint is rate limited by {looked_for}, which the request does not carry in a usable form."),
        }),
    )
}

/// 500: the layer cannot work (misconfiguration, or an id keyward rejects); details are logged.
pub(crate) fn internal() -> Response {
    response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "The request could not be checked against its rate limits.",
        }),
    )
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}
