//! Identities through the layer: headers, users, routes, closures, and requests that carry none.

use axum::extract::connect_info::MockConnectInfo;
use http::{Request, StatusCode};
use keyward_axum::{KeyExtractor, OnMissing, RateLimitLayer, TrustedProxies};
use tower::util::MapRequestLayer;

use crate::util::*;

fn layer(limit: u64, extractor: KeyExtractor) -> RateLimitLayer {
    let kw = keyward(&[("api", per_minute(limit))]);
    RateLimitLayer::new(kw.rate_limiter("api").unwrap(), extractor)
}

#[tokio::test]
async fn header_identity_and_the_default_400_when_missing() {
    let (app, calls) = counting_app(layer(1, KeyExtractor::header("x-api-key")));
    let keyed = |key: &str| request_from("192.0.2.1:1", "/", &[("x-api-key", key)]);
    assert_eq!(status(&app, keyed("k1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, keyed("k1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, keyed("k2")).await, StatusCode::OK);

    let response = send(&app, get_from("192.0.2.1:1")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    let body = body_json(response).await;
    assert_eq!(body["status"], 400);
    assert!(
        body["detail"].as_str().unwrap().contains("`x-api-key`"),
        "{body}"
    );
    // Unusable values are missing values, never a server error.
    let long = "k".repeat(keyward_axum::MAX_HEADER_ID_BYTES + 1);
    assert_eq!(status(&app, keyed(&long)).await, StatusCode::BAD_REQUEST);
    assert_eq!(status(&app, keyed("  ")).await, StatusCode::BAD_REQUEST);
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn header_with_client_ip_fallback() {
    let extractor =
        KeyExtractor::header("x-api-key").or(KeyExtractor::client_ip(TrustedProxies::none()));
    let (app, calls) = counting_app(layer(1, extractor));
    assert_eq!(status(&app, get_from("192.0.2.1:1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, get_from("192.0.2.1:1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A key equal to the address text is still a different bucket.
    let keyed = request_from("192.0.2.1:1", "/", &[("x-api-key", "192.0.2.1")]);
    assert_eq!(status(&app, keyed).await, StatusCode::OK);
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn shared_bucket_for_unidentified_requests() {
    let (app, calls) = counting_app(
        layer(2, KeyExtractor::header("x-api-key")).on_missing(OnMissing::SharedBucket),
    );
    assert_eq!(status(&app, get_from("192.0.2.1:1")).await, StatusCode::OK);
    assert_eq!(status(&app, get_from("192.0.2.2:1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, get_from("192.0.2.3:1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let keyed = request_from("192.0.2.1:1", "/", &[("x-api-key", "k")]);
    assert_eq!(status(&app, keyed).await, StatusCode::OK);
    assert_eq!(calls.get(), 3);
}

#[derive(Clone)]
struct User {
    id: u64,
}

#[tokio::test]
async fn authenticated_user_from_extensions() {
    let (app, calls) = counting_app(layer(
        1,
        KeyExtractor::extension(|u: &User| u.id.to_string()),
    ));
    // A stand-in authentication layer, added after (so it runs before) the rate-limit layer.
    let app = app.layer(MapRequestLayer::new(
        |mut request: Request<axum::body::Body>| {
            let user = request
                .headers()
                .get("x-user")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            if let Some(id) = user {
                request.extensions_mut().insert(User { id });
            }
            request
        },
    ));
    let as_user = |id: &str| request_from("192.0.2.1:1", "/", &[("x-user", id)]);
    assert_eq!(status(&app, as_user("1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, as_user("1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, as_user("2")).await, StatusCode::OK);
    // Anonymous: rejected by default.
    assert_eq!(
        status(&app, get_from("192.0.2.1:1")).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn per_route_per_ip() {
    let extractor = KeyExtractor::route().and(KeyExtractor::client_ip(TrustedProxies::none()));
    let (app, calls) = counting_app(layer(1, extractor));
    assert_eq!(status(&app, get_from("192.0.2.1:1")).await, StatusCode::OK);
    let item = |id: &str, peer: &str| request_from(peer, &format!("/items/{id}"), &[]);
    assert_eq!(status(&app, item("1", "192.0.2.1:1")).await, StatusCode::OK);
    // The template counts, not the concrete path.
    assert_eq!(
        status(&app, item("2", "192.0.2.1:1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, item("2", "192.0.2.2:1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, get_from("192.0.2.1:1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Unmatched paths share one label: still counted, still a 404 when allowed.
    assert_eq!(
        status(&app, request_from("192.0.2.1:1", "/nope", &[])).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(&app, request_from("192.0.2.1:1", "/other", &[])).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn closure_identity() {
    let extractor = KeyExtractor::from_fn(|parts| {
        parts
            .uri
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix("tenant="))
            .map(str::to_owned)
    });
    let (app, calls) = counting_app(layer(1, extractor));
    let tenant = |t: &str| request_from("", &format!("/?tenant={t}"), &[]);
    assert_eq!(status(&app, tenant("a")).await, StatusCode::OK);
    assert_eq!(
        status(&app, tenant("a")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, tenant("b")).await, StatusCode::OK);
    assert_eq!(
        status(&app, request_from("", "/", &[])).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn client_ip_without_connect_info_is_a_500() {
    let (app, calls) = counting_app(layer(5, KeyExtractor::client_ip(TrustedProxies::none())));
    let response = send(
        &app,
        request_from("", "/", &[("x-forwarded-for", "1.2.3.4")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body_json(response).await["status"], 500);
    assert_eq!(calls.get(), 0);

    // axum's `MockConnectInfo` (for tests) is a peer address too.
    let (app, calls) = counting_app(layer(5, KeyExtractor::client_ip(TrustedProxies::none())));
    let app = app.layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 9],
        1,
    ))));
    assert_eq!(
        status(&app, request_from("", "/", &[])).await,
        StatusCode::OK
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn ipv6_clients_grouped_by_network() {
    let extractor = KeyExtractor::client_network(TrustedProxies::none(), 32, 64);
    let (app, _) = counting_app(layer(1, extractor));
    assert_eq!(
        status(&app, get_from("[2001:db8:1:2::1]:1")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, get_from("[2001:db8:1:2:ffff::9]:1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status(&app, get_from("[2001:db8:1:3::1]:1")).await,
        StatusCode::OK
    );
}
