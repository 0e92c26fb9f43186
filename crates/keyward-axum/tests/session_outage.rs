//! Sessions while Redis fails: `SessionLayer` loads the session only when a handler extracts
//! `CurrentSession`, so routes that never use it (`/healthz`, `/metrics`) never touch the store and keep
//! answering while it is down, even for a logged-in user. On a real redis-server (keyward-testkit): the
//! store calls are counted with `INFO commandstats`, then the server is killed.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use keyward::policy::{Policy, SessionClass};
use keyward::session::SessionSecrets;
use keyward::{ConnectOptions, Keyward};
use keyward_axum::{CurrentSession, SessionError, SessionLayer};
use keyward_testkit::RedisServer;
use serde::{Deserialize, Serialize};

use crate::util::{body_json, send};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
}

const SECRET: &[u8; 32] = b"keyward-axum session test secret";

async fn on_redis(server: &RedisServer) -> Keyward {
    let policy = Policy::builder("test", "axum-sessions")
        .session(
            "web",
            SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)),
        )
        .build()
        .expect("valid policy");
    Keyward::connect_with(
        &server.url(),
        policy,
        ConnectOptions::default()
            .response_timeout(Duration::from_millis(300))
            .reconnect_retries(0),
    )
    .await
    .expect("connect to the test redis-server")
}

async fn login(session: CurrentSession<Profile>) -> Result<&'static str, SessionError> {
    session
        .create("ada", &Profile { name: "Ada".into() })
        .await?;
    Ok("welcome")
}

async fn me(session: CurrentSession<Profile>) -> Response {
    match session.get() {
        Some(s) => s.data.name.into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// Two extractors of the session in one request: it is loaded once, and both see the same session.
async fn twice(one: CurrentSession<Profile>, two: CurrentSession<Profile>) -> Response {
    let (a, b) = (one.get(), two.get());
    assert_eq!(a.as_ref().map(|s| s.id()), b.as_ref().map(|s| s.id()));
    match a {
        Some(s) => s.data.name.into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

fn app(kw: &Keyward) -> Router {
    let secrets = SessionSecrets::new(SECRET).unwrap();
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/twice", get(twice))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(|| async { "# no metrics\n" }))
        .layer(SessionLayer::new(
            kw.sessions::<Profile>("web", secrets).unwrap(),
        ))
}

fn request(method: &str, path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie);
    }
    builder.body(Body::empty()).unwrap()
}

async fn logged_in(app: &Router) -> String {
    let response = send(app, request("POST", "/login", None)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let set_cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    set_cookie.split(';').next().unwrap().to_owned()
}

/// Commands the server has run since its statistics were last reset, other than the `INFO` and
/// `CONFIG` calls of this test itself.
fn commands_run(server: &RedisServer) -> u64 {
    let mut con = server.connection();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter(|line| !line.starts_with("info:") && !line.starts_with("config|"))
        .filter_map(|line| {
            let calls = line.split_once(":calls=")?.1;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

fn reset_stats(server: &RedisServer) {
    let mut con = server.connection();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .expect("CONFIG RESETSTAT");
}

#[tokio::test]
async fn routes_that_never_use_the_session_never_call_the_store() {
    let server = RedisServer::spawn();
    let kw = on_redis(&server).await;
    let app = app(&kw);
    let cookie = logged_in(&app).await;

    reset_stats(&server);
    for path in ["/healthz", "/metrics"] {
        let response = send(&app, request("GET", path, Some(&cookie))).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            response.headers().get(header::SET_COOKIE).is_none(),
            "{path}: an unused session leaves the cookie alone"
        );
    }
    assert_eq!(
        commands_run(&server),
        0,
        "a request with a valid session cookie to a route without `CurrentSession` calls no command"
    );

    // The count does see a load: a route that uses the session reads it...
    let response = send(&app, request("GET", "/me", Some(&cookie))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(commands_run(&server) >= 1, "the session was loaded");
    // ...(the first read of a script also loads it: measure one read once warm)...
    reset_stats(&server);
    let response = send(&app, request("GET", "/me", Some(&cookie))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let one_load = commands_run(&server);
    assert!(one_load >= 1, "the session was loaded");

    // ...and one that extracts it twice reads it no more often.
    reset_stats(&server);
    let response = send(&app, request("GET", "/twice", Some(&cookie))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        commands_run(&server),
        one_load,
        "loaded at most once per request"
    );
}

#[tokio::test]
async fn with_redis_down_a_logged_in_user_still_gets_routes_without_the_session() {
    let mut server = RedisServer::spawn();
    let kw = on_redis(&server).await;
    let app = app(&kw);
    let cookie = logged_in(&app).await;
    assert_eq!(
        send(&app, request("GET", "/me", Some(&cookie)))
            .await
            .status(),
        StatusCode::OK
    );

    server.kill();
    for path in ["/healthz", "/metrics"] {
        let response = send(&app, request("GET", path, Some(&cookie))).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{path} does not use the session, so it does not depend on the store"
        );
    }

    // A route that uses the session keeps its documented outage answer: 503 problem+json, no cookie change.
    let response = send(&app, request("GET", "/me", Some(&cookie))).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let body = body_json(response).await;
    assert_eq!(body["status"], 503);
    assert_eq!(body["retry_after"], 1);
    assert_eq!(
        body["detail"],
        "Sessions are unavailable right now; retry shortly."
    );

    // Without a cookie there is nothing to load: the route runs, with no session.
    let response = send(&app, request("GET", "/me", None)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// Middleware order, as the crate docs state it: the session layer reads nothing by itself, so a login
/// refused by a per-IP limit costs no session read, whether that limit sits outside or inside the session
/// layer; a limit keyed by the session's user must read the session first, so its refusals do cost one.
/// Rate limits here run on an embedded handle: every command the redis-server counts is a session read.
#[tokio::test]
async fn a_refused_login_costs_a_session_read_only_when_the_limit_needs_the_session() {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use keyward::policy::{Algorithm, RateLimitClass};
    use keyward_axum::{KeyExtractor, RateLimitLayer, TrustedProxies};

    let server = RedisServer::spawn();
    let kw = on_redis(&server).await;
    let sessions = || {
        SessionLayer::new(
            kw.sessions::<Profile>("web", SessionSecrets::new(SECRET).unwrap())
                .unwrap(),
        )
    };
    let cookie = logged_in(&app(&kw)).await;
    let limits = Keyward::embedded(
        Policy::builder("test", "axum-order")
            .rate_limit(
                "login",
                RateLimitClass::new(Algorithm::FixedWindow, 1, Duration::from_secs(3600)),
            )
            .build()
            .unwrap(),
    );
    let limit = |by: KeyExtractor| RateLimitLayer::new(limits.rate_limiter("login").unwrap(), by);
    let per_ip = || KeyExtractor::client_ip(TrustedProxies::none());
    let route = || Router::new().route("/login", post(|| async { "checked the password" }));
    let stacks = [
        // Recommended: the per-IP limit outermost (added last).
        (
            "per-IP limit outside",
            route().layer(sessions()).layer(limit(per_ip())),
            0,
        ),
        (
            "per-IP limit inside",
            route().layer(limit(per_ip())).layer(sessions()),
            0,
        ),
        (
            "per-user limit inside",
            route()
                .layer(limit(KeyExtractor::session_user::<Profile>()))
                .layer(sessions()),
            1,
        ),
    ];
    for (i, (name, app, expected_reads)) in stacks.into_iter().enumerate() {
        let from_peer = || {
            let mut request = request("POST", "/login", Some(&cookie));
            let peer: SocketAddr = format!("192.0.2.{}:4000", i + 1).parse().unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        };
        assert_eq!(
            send(&app, from_peer()).await.status(),
            StatusCode::OK,
            "{name}"
        );
        reset_stats(&server);
        let refused = send(&app, from_peer()).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{name}");
        let reads = commands_run(&server);
        assert_eq!(
            reads.min(1),
            expected_reads,
            "{name}: {reads} commands for a refused login"
        );
    }
}
