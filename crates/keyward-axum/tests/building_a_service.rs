//! docs/building-a-service.md's service (`examples/building_a_service.rs`, compiled into this test as a
//! module) does what the page says, on the embedded backend and on Redis; and every Rust excerpt on the page
//! (and the policy's TOML) is a verbatim part of the example, so the page cannot drift from the code the tests run.

#[allow(dead_code)]
#[path = "../examples/building_a_service.rs"]
mod service;

use std::time::Duration;

use axum::Router;
use http::{Request, StatusCode, header};
use keyward::policy::Policy;
use keyward::session::SessionSecrets;
use keyward::{ConnectOptions, Keyward};
use keyward_testkit::RedisServer;

use service::{Db, send};

fn policy() -> Policy {
    Policy::from_toml_str(service::POLICY).unwrap()
}

fn app(kw: &Keyward) -> (Router, Db) {
    let db = Db::with_articles(&[(1, "Notes on the analytical engine")]);
    let app = service::app(kw, db.clone(), SessionSecrets::new([9u8; 32]).unwrap()).unwrap();
    (app, db)
}

async fn login(app: &Router, user: &str, password: &str) -> (StatusCode, Option<String>) {
    let body = format!(r#"{{"user":"{user}","password":"{password}"}}"#);
    let request = Request::post("/login").header(header::CONTENT_TYPE, "application/json");
    let (status, cookie, _) = send(app, request, &body).await.unwrap();
    (status, cookie)
}

async fn get(app: &Router, uri: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = Request::get(uri);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let (status, _, body) = send(app, request, "").await.unwrap();
    (status, body)
}

async fn order(
    app: &Router,
    cookie: Option<&str>,
    key: Option<&str>,
    sku: &str,
) -> (StatusCode, String) {
    let mut request = Request::post("/orders");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", format!("\"{key}\""));
    }
    let (status, _, body) = send(app, request, sku).await.unwrap();
    (status, body)
}

/// Articles are cached, invalidated right after the write, and a database "not found" is a 404 with an
/// empty body; sessions log in and out; orders run once per key and user.
async fn the_service_end_to_end(kw: Keyward) {
    let (app, db) = app(&kw);
    let reads = || *db.article_reads.lock().unwrap();
    assert_eq!(get(&app, "/healthz", None).await.0, StatusCode::OK);

    // Cached articles.
    let first = get(&app, "/articles/1", None).await;
    assert_eq!(
        first,
        (
            StatusCode::OK,
            r#"{"id":1,"title":"Notes on the analytical engine"}"#.to_owned()
        )
    );
    assert_eq!(get(&app, "/articles/1", None).await, first);
    assert_eq!(reads(), 1, "the second read is a cache hit");
    assert_eq!(
        get(&app, "/articles/9", None).await,
        (StatusCode::NOT_FOUND, String::new())
    );
    assert_eq!(
        get(&app, "/articles/9", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(reads(), 3, "a \"not found\" is never cached");

    // Sessions.
    assert_eq!(get(&app, "/me", None).await.0, StatusCode::UNAUTHORIZED);
    let (status, cookie) = login(&app, "ada", "lovelace").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let cookie = cookie.expect("login sets the session cookie");
    assert!(cookie.starts_with("__Host-session="), "{cookie}");
    assert_eq!(
        get(&app, "/me", Some(&cookie)).await,
        (StatusCode::OK, "ada".to_owned())
    );

    // The write, then the invalidation: the next read loads the new title.
    let put = |cookie: Option<&str>| {
        let mut r = Request::put("/articles/1");
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, c);
        }
        r
    };
    assert_eq!(
        send(&app, put(None), "x").await.unwrap().0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, put(Some(&cookie)), "Notes on the engine")
            .await
            .unwrap()
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(&app, "/articles/1", None).await.1,
        r#"{"id":1,"title":"Notes on the engine"}"#
    );
    assert_eq!(reads(), 4);
    let missing = Request::put("/articles/9").header(header::COOKIE, &cookie);
    assert_eq!(
        send(&app, missing, "x").await.unwrap().0,
        StatusCode::NOT_FOUND
    );

    // Idempotent orders, scoped to the logged-in user.
    assert_eq!(
        order(&app, None, Some("k1"), "A-1").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        order(&app, Some(&cookie), None, "A-1").await.0,
        StatusCode::BAD_REQUEST
    );
    let placed = order(&app, Some(&cookie), Some("k1"), "A-1").await;
    assert_eq!(
        placed,
        (StatusCode::CREATED, "order 1: A-1 for ada".to_owned())
    );
    assert_eq!(
        order(&app, Some(&cookie), Some("k1"), "A-1").await,
        placed,
        "replayed"
    );
    assert_eq!(
        order(&app, Some(&cookie), Some("k1"), "B-2").await.0,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the key reused for another order"
    );
    let (_, alan) = login(&app, "alan", "turing").await;
    let alan = alan.expect("a cookie");
    assert_eq!(
        order(&app, Some(&alan), Some("k1"), "A-1").await,
        (StatusCode::CREATED, "order 2: A-1 for alan".to_owned()),
        "another user's k1 is another key"
    );
    let (_, ada_phone) = login(&app, "ada", "lovelace").await;
    let ada_phone = ada_phone.expect("a cookie");
    assert_ne!(ada_phone, cookie);
    assert_eq!(
        order(&app, Some(&ada_phone), Some("k1"), "A-1").await,
        placed,
        "the scope is the user, not the cookie: Ada's retry from another device is replayed"
    );
    assert_eq!(db.orders.lock().unwrap().len(), 2, "each order ran once");

    // Log out.
    let out = Request::post("/logout").header(header::COOKIE, &cookie);
    assert_eq!(send(&app, out, "").await.unwrap().0, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&app, "/me", Some(&cookie)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Five logins a minute per client IP: the sixth is refused before the handler runs, right password or
/// not.
async fn the_login_is_rate_limited(kw: Keyward) {
    let (app, _) = app(&kw);
    for _ in 0..5 {
        assert_eq!(
            login(&app, "ada", "wrong").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let request = Request::post("/login").header(header::CONTENT_TYPE, "application/json");
    let (status, cookie, _) = send(&app, request, r#"{"user":"ada","password":"lovelace"}"#)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(cookie.is_none(), "no session for a refused login");
}

#[tokio::test]
async fn the_service_end_to_end_embedded() {
    the_service_end_to_end(Keyward::embedded(policy())).await;
}

#[tokio::test]
async fn the_service_end_to_end_on_redis() {
    let server = RedisServer::spawn();
    the_service_end_to_end(Keyward::connect(&server.url(), policy()).await.unwrap()).await;
}

#[tokio::test]
async fn the_login_is_rate_limited_embedded() {
    the_login_is_rate_limited(Keyward::embedded(policy())).await;
}

#[tokio::test]
async fn the_login_is_rate_limited_on_redis() {
    let server = RedisServer::spawn();
    the_login_is_rate_limited(Keyward::connect(&server.url(), policy()).await.unwrap()).await;
}

/// The page's "When Redis fails": articles come from the database (the cache fails open), the login
/// limit falls back to its `on_error` (the handler still runs), routes that need the session answer
/// `503` problem+json with `Retry-After` and no internals, and `/healthz` answers `503`.
#[tokio::test]
async fn the_service_when_redis_fails() {
    let mut server = RedisServer::spawn();
    let options = ConnectOptions::default()
        .response_timeout(Duration::from_millis(300))
        .reconnect_retries(0);
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    let (app, db) = app(&kw);
    let (_, cookie) = login(&app, "ada", "lovelace").await;
    let cookie = cookie.expect("a cookie");
    server.kill();

    let article = (
        StatusCode::OK,
        r#"{"id":1,"title":"Notes on the analytical engine"}"#.to_owned(),
    );
    assert_eq!(get(&app, "/articles/1", None).await, article);
    assert_eq!(get(&app, "/articles/1", None).await, article);
    assert_eq!(
        *db.article_reads.lock().unwrap(),
        2,
        "each read from the database"
    );
    assert_eq!(
        get(&app, "/articles/9", None).await.0,
        StatusCode::NOT_FOUND,
        "the database's own answer still comes through"
    );
    assert_eq!(
        login(&app, "ada", "wrong").await.0,
        StatusCode::UNAUTHORIZED,
        "the in-process limiter let the login through to the password check"
    );

    let unavailable = |(status, cookie, body): (StatusCode, Option<String>, String), what: &str| {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert!(cookie.is_none(), "{what}: the cookie is left alone");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], 503, "{what}");
        assert_eq!(body["retry_after"], 1, "{what}");
        for leak in ["127.0.0.1", "redis", "::", "web"] {
            assert!(!body.to_string().contains(leak), "{what}: {body}");
        }
    };
    let me = Request::get("/me").header(header::COOKIE, &cookie);
    unavailable(send(&app, me, "").await.unwrap(), "GET /me");
    let order = Request::post("/orders")
        .header(header::COOKIE, &cookie)
        .header("idempotency-key", "\"k1\"");
    unavailable(send(&app, order, "A-1").await.unwrap(), "POST /orders");
    assert!(db.orders.lock().unwrap().is_empty(), "no order ran");
    assert_eq!(
        get(&app, "/healthz", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn every_rust_excerpt_of_the_page_is_in_the_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("../../docs/building-a-service.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/building_a_service.rs")).unwrap();
    // Compared line by line, trimmed, blank lines left out: indentation may differ, words may not.
    let significant = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let example = significant(&example);
    let mut excerpts = 0;
    let mut rest = page.as_str();
    // The Rust and TOML blocks (```sh blocks are commands, not code of the example).
    while let Some(start) = [rest.find("```rust"), rest.find("```toml")]
        .into_iter()
        .flatten()
        .min()
    {
        let body = &rest[start..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let end = body.find("```").unwrap();
        let excerpt = significant(&body[..end]);
        assert!(
            !excerpt.is_empty()
                && example
                    .windows(excerpt.len())
                    .any(|w| w == excerpt.as_slice()),
            "this excerpt of the page is not verbatim in the example:\n{}",
            &body[..end]
        );
        excerpts += 1;
        rest = &body[end + 3..];
    }
    assert!(
        excerpts >= 4,
        "the page quotes the example ({excerpts} excerpts)"
    );
}
