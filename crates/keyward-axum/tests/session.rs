//! The session layer on an axum `Router`, driven with `oneshot`: the cookie's attributes, login, regenerate,
//! logout, cookies that name no session, custom cookie settings, concurrent saves, setup errors.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, Request, StatusCode, header};
use keyward::Keyward;
use keyward::policy::{Policy, SameSite, SessionClass};
use keyward::session::{Saved, SessionSecrets, TOKEN_LEN};
use keyward_axum::{CurrentSession, SessionError, SessionLayer};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;

use crate::util::{body_json, body_text, send};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    visits: u32,
}

const SECRET: &[u8; 32] = b"keyward-axum session test secret";

fn class() -> SessionClass {
    SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600))
}

fn keyward_with(class: SessionClass) -> Keyward {
    let policy = Policy::builder("test", "axum-sessions")
        .session("web", class)
        .build()
        .expect("valid policy");
    Keyward::embedded(policy)
}

fn layer(kw: &Keyward) -> SessionLayer<Profile> {
    let secrets = SessionSecrets::new(SECRET).unwrap();
    SessionLayer::new(kw.sessions::<Profile>("web", secrets).unwrap())
}

/// `x-user` names who logs in (the tests have no passwords).
async fn login(
    session: CurrentSession<Profile>,
    headers: HeaderMap,
) -> Result<String, SessionError> {
    let user = headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ada")
        .to_owned();
    let created = session
        .create(
            &user,
            &Profile {
                name: user.clone(),
                visits: 0,
            },
        )
        .await?;
    Ok(format!("hello {}", created.user_id()))
}

async fn me(session: CurrentSession<Profile>) -> Response {
    match session.get() {
        Some(s) => format!("{} ({} visits)", s.user_id(), s.data.visits).into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn regenerate(session: CurrentSession<Profile>) -> Result<StatusCode, SessionError> {
    Ok(match session.regenerate().await? {
        Some(_) => StatusCode::OK,
        None => StatusCode::UNAUTHORIZED,
    })
}

async fn logout(session: CurrentSession<Profile>) -> Result<&'static str, SessionError> {
    Ok(if session.destroy().await? {
        "bye"
    } else {
        "no session"
    })
}

async fn visit(session: CurrentSession<Profile>) -> Result<Response, SessionError> {
    let Some(mut s) = session.get() else {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    };
    s.data.visits += 1;
    Ok(format!("{:?}", session.save(&mut s).await?).into_response())
}

/// The routes, without the layer (axum's `layer` wraps only routes added before it).
fn routes() -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/regenerate", post(regenerate))
        .route("/logout", post(logout))
        .route("/visit", post(visit))
        .route(
            "/cached",
            post(|s: CurrentSession<Profile>| async move {
                s.destroy().await.unwrap();
                ([(header::CACHE_CONTROL, "private, max-age=0")], "cleared")
            }),
        )
}

fn app(layer: SessionLayer<Profile>) -> Router {
    routes().layer(layer)
}

fn request(method: &str, path: &str, cookies: &[&str]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    for c in cookies {
        builder = builder.header(header::COOKIE, *c);
    }
    builder.body(Body::empty()).unwrap()
}

/// The only `Set-Cookie` of a response, if any.
fn set_cookie(response: &Response) -> Option<String> {
    let all: Vec<_> = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .collect();
    assert!(all.len() <= 1, "more than one Set-Cookie: {all:?}");
    all.first().map(|v| v.to_str().unwrap().to_owned())
}

/// `name=value` and the attributes, each as written (`HttpOnly`, `Path=/`).
fn parse(set_cookie: &str) -> (String, BTreeSet<String>) {
    let mut parts = set_cookie.split("; ");
    let pair = parts.next().unwrap().to_owned();
    (pair, parts.map(str::to_owned).collect())
}

fn attrs(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Log in as `user`; returns the `Cookie` header a browser would send back.
async fn logged_in(app: &Router, user: &str) -> String {
    let mut r = request("POST", "/login", &[]);
    r.headers_mut().insert("x-user", user.parse().unwrap());
    let response = send(app, r).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (pair, _) = parse(&set_cookie(&response).expect("login sets the cookie"));
    pair
}

async fn whoami(app: &Router, cookies: &[&str]) -> StatusCode {
    send(app, request("GET", "/me", cookies)).await.status()
}

#[tokio::test]
async fn the_default_cookie_is_host_prefixed_http_only_secure_lax_without_domain_or_lifetime() {
    let app = app(layer(&keyward_with(class())));
    let response = send(&app, request("POST", "/login", &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (pair, attributes) = parse(&set_cookie(&response).unwrap());
    let token = pair
        .strip_prefix("__Host-session=")
        .expect("the default name");
    assert_eq!(token.len(), TOKEN_LEN);
    assert_eq!(TOKEN_LEN, 43);
    assert!(keyward::session::is_well_formed(token));
    assert_eq!(
        attributes,
        attrs(&["HttpOnly", "Secure", "SameSite=Lax", "Path=/"]),
        "no Domain, no Max-Age, no Expires"
    );
    assert_eq!(
        response.headers()[header::CACHE_CONTROL],
        "no-store",
        "a response carrying a token is never stored by a shared cache"
    );
    assert!(
        response.headers()[header::SET_COOKIE].is_sensitive(),
        "Debug hides it; HTTP/2 does not index it"
    );
    assert_eq!(body_text(response).await, "hello ada");
}

#[tokio::test]
async fn cookie_headers_are_marked_sensitive_for_what_runs_after_the_layer() {
    let kw = keyward_with(class());
    let app = routes()
        .route(
            "/headers",
            get(|headers: HeaderMap| async move {
                let cookies: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
                let all_sensitive = cookies.iter().all(|v| v.is_sensitive());
                format!("{} {all_sensitive} {:?}", cookies.len(), cookies)
            }),
        )
        .layer(layer(&kw));
    let cookie = logged_in(&app, "ada").await;
    let response = send(&app, request("GET", "/headers", &[&cookie, "theme=dark"])).await;
    assert_eq!(body_text(response).await, "2 true [Sensitive, Sensitive]");
}

#[tokio::test]
async fn login_sets_a_cookie_that_authenticates_the_next_request() {
    let app = app(layer(&keyward_with(class())));
    assert_eq!(whoami(&app, &[]).await, StatusCode::UNAUTHORIZED);
    let cookie = logged_in(&app, "grace").await;

    let response = send(&app, request("GET", "/me", &[&cookie])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        set_cookie(&response),
        None,
        "an unchanged session sets no cookie"
    );
    assert_eq!(response.headers().get(header::CACHE_CONTROL), None);
    assert_eq!(body_text(response).await, "grace (0 visits)");

    // Among other cookies, over several header lines, it still authenticates.
    assert_eq!(
        whoami(&app, &["theme=dark; lang=en", &format!("a=1; {cookie}; b")]).await,
        StatusCode::OK
    );

    // Saves are seen by the next request.
    let response = send(&app, request("POST", "/visit", &[&cookie])).await;
    assert_eq!(body_text(response).await, "Saved");
    let response = send(&app, request("GET", "/me", &[&cookie])).await;
    assert_eq!(body_text(response).await, "grace (1 visits)");
}

#[tokio::test]
async fn logging_in_again_ends_the_previous_session() {
    let app = app(layer(&keyward_with(class())));
    let first = logged_in(&app, "ada").await;
    let mut r = request("POST", "/login", &[&first]);
    r.headers_mut().insert("x-user", "bob".parse().unwrap());
    let response = send(&app, r).await;
    let (second, _) = parse(&set_cookie(&response).unwrap());
    assert_ne!(second, first);
    assert_eq!(
        whoami(&app, &[&first]).await,
        StatusCode::UNAUTHORIZED,
        "the session from before the login is over"
    );
    let response = send(&app, request("GET", "/me", &[&second])).await;
    assert_eq!(body_text(response).await, "bob (0 visits)");
}

#[tokio::test]
async fn regenerate_changes_the_token_and_the_old_one_stops_working() {
    let app = app(layer(&keyward_with(class())));
    let old = logged_in(&app, "ada").await;
    send(&app, request("POST", "/visit", &[&old])).await;

    let response = send(&app, request("POST", "/regenerate", &[&old])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (new, attributes) = parse(&set_cookie(&response).unwrap());
    assert_ne!(new, old);
    assert!(new.starts_with("__Host-session="));
    assert_eq!(
        attributes,
        attrs(&["HttpOnly", "Secure", "SameSite=Lax", "Path=/"])
    );

    assert_eq!(whoami(&app, &[&old]).await, StatusCode::UNAUTHORIZED);
    let response = send(&app, request("GET", "/me", &[&new])).await;
    assert_eq!(
        body_text(response).await,
        "ada (1 visits)",
        "same user, same data"
    );

    // Without a session there is nothing to regenerate, and no cookie is set.
    let response = send(&app, request("POST", "/regenerate", &[])).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(set_cookie(&response), None);
}

#[tokio::test]
async fn logout_clears_the_cookie_and_the_token_is_dead() {
    let app = app(layer(&keyward_with(class())));
    let cookie = logged_in(&app, "ada").await;

    let response = send(&app, request("POST", "/logout", &[&cookie])).await;
    let (pair, attributes) = parse(&set_cookie(&response).unwrap());
    assert_eq!(pair, "__Host-session=");
    assert_eq!(
        attributes,
        attrs(&["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=0"]),
        "the same attributes as when set, so the browser replaces it"
    );
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(body_text(response).await, "bye");
    assert_eq!(whoami(&app, &[&cookie]).await, StatusCode::UNAUTHORIZED);

    // Logging out again, or without a session, still clears whatever the client holds.
    let response = send(&app, request("POST", "/logout", &[&cookie])).await;
    assert!(set_cookie(&response).unwrap().contains("Max-Age=0"));
    assert_eq!(body_text(response).await, "no session");

    // A handler's own Cache-Control is kept.
    let response = send(&app, request("POST", "/cached", &[])).await;
    assert!(set_cookie(&response).unwrap().contains("Max-Age=0"));
    assert_eq!(
        response.headers()[header::CACHE_CONTROL],
        "private, max-age=0"
    );
}

#[tokio::test]
async fn tampered_unknown_or_malformed_cookies_are_no_session_not_an_error() {
    let app = app(layer(&keyward_with(class())));
    let cookie = logged_in(&app, "ada").await;
    let token = cookie.strip_prefix("__Host-session=").unwrap();
    // Flip the last character: still well-formed, names nothing.
    let last = token.chars().last().unwrap();
    let flipped = format!(
        "__Host-session={}{}",
        &token[..token.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    let unknown = format!("__Host-session={}", "x".repeat(TOKEN_LEN));
    let long = format!("{cookie}x");
    let short = format!("__Host-session={}", &token[1..]);
    let quoted = format!("__Host-session=\"{token}\"");
    let bad_chars = format!("__Host-session={}", "+".repeat(TOKEN_LEN));
    for bad in [
        flipped.as_str(),
        &unknown,
        &long,
        &short,
        &quoted,
        &bad_chars,
        "__Host-session=",
        "__Host-session",
        "=value",
        ";;;",
        "__host-session=nope",
    ] {
        let response = send(&app, request("GET", "/me", &[bad])).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "cookie {bad:?}"
        );
        assert_eq!(set_cookie(&response), None, "cookie {bad:?}");
    }
    // A header line that is not UTF-8 hides nothing else.
    let mut r = request("GET", "/me", &[&cookie]);
    r.headers_mut().append(
        header::COOKIE,
        http::HeaderValue::from_bytes(b"x=\xff").unwrap(),
    );
    assert_eq!(send(&app, r).await.status(), StatusCode::OK);
    // The real session is untouched by all that.
    assert_eq!(whoami(&app, &[&cookie]).await, StatusCode::OK);
}

#[tokio::test]
async fn a_cookie_name_sent_twice_is_no_session() {
    let app = app(layer(&keyward_with(class())));
    let ada = logged_in(&app, "ada").await;
    let bob = logged_in(&app, "bob").await;
    for cookies in [
        vec![format!("{ada}; {bob}")],
        vec![ada.clone(), bob.clone()],
        vec![format!("{ada}; {ada}")],
        vec![ada.clone(), "__Host-session=planted".to_owned()],
        vec!["__Host-session=planted".to_owned(), ada.clone()],
    ] {
        let cookies: Vec<&str> = cookies.iter().map(String::as_str).collect();
        assert_eq!(
            whoami(&app, &cookies).await,
            StatusCode::UNAUTHORIZED,
            "{cookies:?}"
        );
    }
    assert_eq!(whoami(&app, &[&ada]).await, StatusCode::OK);
    assert_eq!(whoami(&app, &[&bob]).await, StatusCode::OK);
}

#[tokio::test]
async fn custom_cookie_settings_of_the_class_are_honoured() {
    let class = class()
        .cookie_name("sid")
        .cookie_secure(false)
        .cookie_same_site(SameSite::Strict)
        .cookie_path("/app")
        .cookie_domain("example.com");
    let app = app(layer(&keyward_with(class)));
    let response = send(&app, request("POST", "/login", &[])).await;
    let (pair, attributes) = parse(&set_cookie(&response).unwrap());
    assert!(pair.starts_with("sid="), "{pair}");
    assert_eq!(pair.len(), "sid=".len() + TOKEN_LEN);
    assert_eq!(
        attributes,
        attrs(&[
            "HttpOnly",
            "SameSite=Strict",
            "Path=/app",
            "Domain=example.com"
        ]),
        "not Secure: the class turned it off"
    );
    assert_eq!(whoami(&app, &[&pair]).await, StatusCode::OK);
    assert_eq!(
        whoami(&app, &[&pair.replace("sid=", "__Host-session=")]).await,
        StatusCode::UNAUTHORIZED,
        "only the class's cookie name is read"
    );

    let response = send(&app, request("POST", "/logout", &[&pair])).await;
    let (pair, attributes) = parse(&set_cookie(&response).unwrap());
    assert_eq!(pair, "sid=");
    assert_eq!(
        attributes,
        attrs(&[
            "HttpOnly",
            "SameSite=Strict",
            "Path=/app",
            "Domain=example.com",
            "Max-Age=0"
        ])
    );

    let none = class_with_same_site_none();
    let app = app_for(none);
    let response = send(&app, request("POST", "/login", &[])).await;
    let (_, attributes) = parse(&set_cookie(&response).unwrap());
    assert_eq!(
        attributes,
        attrs(&["HttpOnly", "Secure", "SameSite=None", "Path=/"])
    );
}

fn class_with_same_site_none() -> SessionClass {
    class().cookie_same_site(SameSite::None)
}

fn app_for(class: SessionClass) -> Router {
    app(layer(&keyward_with(class)))
}

#[tokio::test]
async fn two_concurrent_saves_from_the_same_version_one_saved_one_conflict() {
    let kw = keyward_with(class());
    let barrier = Arc::new(Barrier::new(2));
    let app = routes().route(
        "/slow-visit",
        post(move |session: CurrentSession<Profile>| {
            let barrier = Arc::clone(&barrier);
            async move {
                let mut s = session.get().expect("logged in");
                // Both requests have loaded the same version before either saves.
                barrier.wait().await;
                s.data.visits += 1;
                let saved = session.save(&mut s).await.unwrap();
                if let Saved::Conflict { .. } = saved {
                    // The documented recovery: reload, re-apply, save again.
                    let mut fresh = session.reload().await.unwrap().expect("still alive");
                    fresh.data.visits += 1;
                    assert_eq!(session.save(&mut fresh).await.unwrap(), Saved::Saved);
                }
                format!("{saved:?}")
            }
        }),
    );
    let app = app.layer(layer(&kw));
    let cookie = logged_in(&app, "ada").await;
    let (a, b) = tokio::join!(
        send(&app, request("POST", "/slow-visit", &[&cookie])),
        send(&app, request("POST", "/slow-visit", &[&cookie])),
    );
    let mut outcomes = vec![body_text(a).await, body_text(b).await];
    outcomes.sort();
    assert_eq!(outcomes[1], "Saved");
    assert!(
        outcomes[0].starts_with("Conflict"),
        "one of them conflicts: {outcomes:?}"
    );
    let response = send(&app, request("GET", "/me", &[&cookie])).await;
    assert_eq!(
        body_text(response).await,
        "ada (2 visits)",
        "no update was lost"
    );
}

#[tokio::test]
/// `Gone` forgets the session but sends no `Set-Cookie`: clearing it could undo a newer cookie that a
/// concurrent request (a regenerate, a login) has just set.
async fn a_save_of_an_ended_session_is_gone_and_leaves_the_cookie_alone() {
    let kw = keyward_with(class());
    let layer = layer(&kw);
    let sessions = layer.sessions().clone();
    let app = routes().route(
        "/end-then-save",
        post(|session: CurrentSession<Profile>| async move {
            let mut s = session.get().unwrap();
            // "Log out everywhere" from another device, while this request runs.
            session
                .sessions()
                .destroy_all_for_user(s.user_id())
                .await
                .unwrap();
            let saved = session.save(&mut s).await.unwrap();
            assert!(session.get().is_none());
            format!("{saved:?}")
        }),
    );
    let app = app.layer(layer);
    let cookie = logged_in(&app, "ada").await;
    let response = send(&app, request("POST", "/end-then-save", &[&cookie])).await;
    assert_eq!(set_cookie(&response), None);
    assert_eq!(body_text(response).await, "Gone");
    assert!(sessions.list_for_user("ada").await.unwrap().is_empty());
}

#[tokio::test]
async fn data_that_is_not_a_valid_t_is_no_session_not_a_failure() {
    let kw = keyward_with(class());
    // Another type stored under the same class (a shape change without a version bump).
    let secrets = SessionSecrets::new(SECRET).unwrap();
    let other = kw.sessions::<Vec<u8>>("web", secrets).unwrap();
    let (token, _) = other.create("ada", &vec![1, 2, 3]).await.unwrap();
    let app = app(layer(&kw));
    let cookie = format!("__Host-session={}", token.as_str());
    let response = send(&app, request("GET", "/me", &[&cookie])).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(set_cookie(&response), None);
    // Logging in again works, with a new cookie.
    let response = send(&app, request("POST", "/login", &[&cookie])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (pair, _) = parse(&set_cookie(&response).unwrap());
    assert_ne!(pair, cookie);
    assert_eq!(whoami(&app, &[&pair]).await, StatusCode::OK);
}

#[tokio::test]
async fn a_handler_error_is_problem_json_without_details() {
    let kw = keyward_with(class().max_data_bytes(64));
    let app = routes()
        .route(
            "/too-big",
            post(|session: CurrentSession<Profile>| async move {
                let big = Profile {
                    name: "x".repeat(100),
                    visits: 0,
                };
                session.create("ada", &big).await.map(|_| "created")
            }),
        )
        .layer(layer(&kw));
    let response = send(&app, request("POST", "/too-big", &[])).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(set_cookie(&response), None);
    let body = body_json(response).await;
    assert_eq!(body["status"], 500);
    assert_eq!(body["detail"], "The session could not be processed.");
}

#[tokio::test]
async fn current_session_without_the_layer_is_a_plain_500() {
    let app = Router::new().route("/me", get(me));
    let response = send(&app, request("GET", "/me", &[])).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body = body_json(response).await;
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["status"], 500);
    assert_eq!(body["detail"], "The request could not be processed.");
    // The setup error's names are for the log only: no Rust path, type or layer name in the body.
    let text = body.to_string();
    for internal in [
        "::",
        "CurrentSession",
        "Profile",
        "SessionLayer",
        "Json",
        "codec",
    ] {
        assert!(
            !text.contains(internal),
            "the body shows `{internal}`: {text}"
        );
    }
    // The error itself (what is logged) names both types and the fix.
    let (mut parts, ()) = Request::get("/me").body(()).unwrap().into_parts();
    let rejection =
        <CurrentSession<Profile> as axum::extract::FromRequestParts<()>>::from_request_parts(
            &mut parts,
            &(),
        )
        .await
        .expect_err("no layer");
    let logged = rejection.to_string();
    assert!(logged.contains("CurrentSession<"), "{logged}");
    assert!(logged.contains("Profile"), "{logged}");
    assert!(logged.contains("SessionLayer"), "{logged}");

    // A layer of another data type does not count.
    let kw = keyward_with(class());
    let secrets = SessionSecrets::new(SECRET).unwrap();
    let app = Router::new().route("/me", get(me)).layer(SessionLayer::new(
        kw.sessions::<String>("web", secrets).unwrap(),
    ));
    let response = send(&app, request("GET", "/me", &[])).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn the_layer_puts_a_lazy_session_in_the_extensions_and_loads_it_only_for_current_session() {
    use axum::extract::Extension;
    use keyward_axum::LazySession;

    let kw = keyward_with(class());
    let app =
        routes()
            .route(
                "/unused",
                get(
                    |Extension(lazy): Extension<LazySession<Profile>>| async move {
                        format!("loaded={}", lazy.is_loaded())
                    },
                ),
            )
            .route(
                "/used",
                get(
                    |Extension(lazy): Extension<LazySession<Profile>>,
                     s: CurrentSession<Profile>| async move {
                        // The extractor loaded it; loading again through the handle shares that session.
                        let again = lazy.load().await.unwrap();
                        assert_eq!(
                            again.get().map(|s| s.id().to_owned()),
                            s.get().map(|s| s.id().to_owned())
                        );
                        format!(
                            "loaded={} user={:?}",
                            lazy.is_loaded(),
                            s.get().map(|s| s.user_id().to_owned())
                        )
                    },
                ),
            )
            .layer(layer(&kw));
    let cookie = logged_in(&app, "ada").await;

    let response = send(&app, request("GET", "/unused", &[&cookie])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(set_cookie(&response), None);
    assert_eq!(body_text(response).await, "loaded=false");

    let response = send(&app, request("GET", "/used", &[&cookie])).await;
    assert_eq!(
        set_cookie(&response),
        None,
        "loading alone changes no cookie"
    );
    assert_eq!(body_text(response).await, "loaded=true user=Some(\"ada\")");

    // A logout on another request is seen by the next load, not by requests that never load.
    let response = send(&app, request("POST", "/logout", &[&cookie])).await;
    assert_eq!(body_text(response).await, "bye");
    let response = send(&app, request("GET", "/unused", &[&cookie])).await;
    assert_eq!(
        set_cookie(&response),
        None,
        "an unused dead cookie is left alone"
    );
    assert_eq!(whoami(&app, &[&cookie]).await, StatusCode::UNAUTHORIZED);
}
