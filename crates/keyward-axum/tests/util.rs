//! Helpers: a counting app, requests from a given peer, and readers for the structured fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::get;
use http::{Request, StatusCode};
use keyward::Keyward;
use keyward::policy::{Algorithm, Policy, RateLimitClass};
use keyward_axum::RateLimitLayer;
use tower::ServiceExt;

/// An embedded keyward with these rate-limit classes.
pub(crate) fn keyward(classes: &[(&str, RateLimitClass)]) -> Keyward {
    let mut builder = Policy::builder("test", "axum");
    for (name, class) in classes {
        builder = builder.rate_limit(*name, class.clone());
    }
    Keyward::embedded(builder.build().expect("valid policy"))
}

/// GCRA, `limit` per minute.
pub(crate) fn per_minute(limit: u64) -> RateLimitClass {
    RateLimitClass::new(Algorithm::Gcra, limit, Duration::from_secs(60))
}

/// Counts handler calls.
#[derive(Clone, Default)]
pub(crate) struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A router with `/` and `/items/{id}` answering `ok`, counting calls, behind `layer`.
pub(crate) fn counting_app(layer: RateLimitLayer) -> (Router, Calls) {
    let calls = Calls::default();
    let c1 = calls.clone();
    let c2 = calls.clone();
    let router = Router::new()
        .route(
            "/",
            get(move || async move {
                c1.0.fetch_add(1, Ordering::SeqCst);
                "ok"
            }),
        )
        .route(
            "/items/{id}",
            get(move || async move {
                c2.0.fetch_add(1, Ordering::SeqCst);
                "item"
            }),
        )
        .layer(layer);
    (router, calls)
}

/// `GET path` from TCP peer `peer` (`ip:port`), with extra headers.
pub(crate) fn request_from(peer: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut request = builder.body(Body::empty()).expect("valid request");
    if !peer.is_empty() {
        let addr: SocketAddr = peer.parse().expect("peer address");
        request.extensions_mut().insert(ConnectInfo(addr));
    }
    request
}

/// `GET /` from `peer`.
pub(crate) fn get_from(peer: &str) -> Request<Body> {
    request_from(peer, "/", &[])
}

pub(crate) async fn send(router: &Router, request: Request<Body>) -> Response {
    router.clone().oneshot(request).await.expect("infallible")
}

pub(crate) async fn status(router: &Router, request: Request<Body>) -> StatusCode {
    send(router, request).await.status()
}

pub(crate) async fn body_json(response: Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

pub(crate) async fn body_text(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    String::from_utf8(bytes.to_vec()).expect("UTF-8 body")
}

/// One member of a structured-field list: the policy name and its integer parameters, in order.
pub(crate) type Member = (String, Vec<(String, i64)>);

/// Parses every `name` field line of `response` as one Structured Field List (lines combine in order),
/// checking each member is a String with Integer parameters, as the draft requires.
pub(crate) fn sf_list(response: &Response, name: &str) -> Vec<Member> {
    let mut list: sfv::List = Vec::new();
    for line in response.headers().get_all(name) {
        sfv::Parser::new(line.as_bytes())
            .parse_list_with_visitor(&mut list)
            .unwrap_or_else(|e| panic!("`{name}: {line:?}` is not a structured-field list: {e}"));
    }
    list.iter()
        .map(|entry| {
            let sfv::ListEntry::Item(item) = entry else {
                panic!("`{name}` holds an inner list")
            };
            let policy = item
                .bare_item
                .as_string()
                .unwrap_or_else(|| panic!("`{name}` member is not a String"))
                .as_str()
                .to_owned();
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let v = v.as_integer().unwrap_or_else(|| {
                        panic!("`{name}` parameter {} is not an Integer", k.as_str())
                    });
                    (k.as_str().to_owned(), i64::from(v))
                })
                .collect();
            (policy, params)
        })
        .collect()
}

/// A member as written in the tests: `("per_ip", &[("q", 3), ("w", 60)])`.
pub(crate) fn member(name: &str, params: &[(&str, i64)]) -> Member {
    (
        name.to_owned(),
        params.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    )
}

pub(crate) fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}
