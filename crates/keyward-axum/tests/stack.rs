//! The layers together: idempotency keys scoped to the session's user (`KeyExtractor::session_user`),
//! on the embedded backend.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::response::Response;
use axum::routing::post;
use http::{HeaderMap, Request, StatusCode, header};
use keyward::Keyward;
use keyward::policy::{IdempotencyClass, Policy, SessionClass};
use keyward::session::SessionSecrets;
use keyward_axum::{
    ApiError, CurrentSession, IdempotencyKey, IdempotencyLayer, KeyExtractor, SessionLayer,
};
use serde::{Deserialize, Serialize};

use crate::util::{body_json, body_text, header, send};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Profile {
    name: String,
}

const KEY: &str = r#""0b5a1a4e-33c4-4c3f-a0f5-1d1c6f0e8d27""#;

fn keyward() -> Keyward {
    let policy = Policy::builder("test", "stack")
        .session(
            "web",
            SessionClass::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600)),
        )
        .idempotency("orders", IdempotencyClass::new())
        .build()
        .expect("valid policy");
    Keyward::embedded(policy)
}

/// `x-user` names who logs in.
async fn login(session: CurrentSession<Profile>, headers: HeaderMap) -> Result<String, ApiError> {
    let user = headers["x-user"].to_str().unwrap().to_owned();
    session
        .create(&user, &Profile { name: user.clone() })
        .await?;
    Ok(user)
}

/// Places an order: the body names the user, the key and a global order number.
async fn order(
    session: CurrentSession<Profile>,
    Extension(key): Extension<IdempotencyKey>,
    Extension(counter): Extension<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
) -> (StatusCode, String) {
    let user = session.get().expect("the scope found a session").data.name;
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!("order {n} for {user} under {}", key.as_str()),
    )
}

/// `/login` and `/orders`, the latter behind an idempotency layer scoped by the session's user; the
/// session layer outside both.
fn app(kw: &Keyward) -> (Router, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let counter = std::sync::Arc::default();
    let secrets = SessionSecrets::new(*b"keyward-axum stack tests secret!").unwrap();
    let orders = Router::new().route("/orders", post(order)).layer(
        IdempotencyLayer::new(kw.idempotency("orders").unwrap())
            .scope(KeyExtractor::session_user::<Profile>()),
    );
    let router = Router::new()
        .route("/login", post(login))
        .merge(orders)
        .layer(Extension(std::sync::Arc::clone(&counter)))
        .layer(SessionLayer::new(
            kw.sessions::<Profile>("web", secrets).unwrap(),
        ));
    (router, counter)
}

async fn log_in(app: &Router, user: &str) -> String {
    let request = Request::post("/login")
        .header("x-user", user)
        .body(Body::empty())
        .unwrap();
    let response = send(app, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let set_cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    set_cookie.split(';').next().unwrap().to_owned()
}

async fn place(app: &Router, cookie: Option<&str>) -> Response {
    let mut request = Request::post("/orders").header("idempotency-key", KEY);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    send(app, request.body(Body::from("sku=42")).unwrap()).await
}

#[tokio::test]
async fn two_users_with_the_same_idempotency_key_get_their_own_results() {
    let kw = keyward();
    let (app, counter) = app(&kw);
    let ada = log_in(&app, "ada").await;
    let bob = log_in(&app, "bob").await;

    let first_ada = place(&app, Some(&ada)).await;
    assert_eq!(first_ada.status(), StatusCode::CREATED);
    assert_eq!(header(&first_ada, "idempotent-replayed"), None);
    let first_ada = body_text(first_ada).await;
    let first_bob = place(&app, Some(&bob)).await;
    assert_eq!(first_bob.status(), StatusCode::CREATED);
    assert_eq!(
        header(&first_bob, "idempotent-replayed"),
        None,
        "Bob's key is his own: his order runs"
    );
    let first_bob = body_text(first_bob).await;
    assert!(first_ada.ends_with(&format!("for ada under {}", KEY.trim_matches('"'))));
    assert!(first_bob.contains("for bob"));
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Each retry replays its own user's response.
    for (cookie, first) in [(&ada, &first_ada), (&bob, &first_bob)] {
        let retry = place(&app, Some(cookie)).await;
        assert_eq!(header(&retry, "idempotent-replayed"), Some("true"));
        assert_eq!(&body_text(retry).await, first);
    }
    // The scope is the user, not the cookie: Ada on another device gets her replay.
    let ada_phone = log_in(&app, "ada").await;
    assert_ne!(ada_phone, ada);
    let retry = place(&app, Some(&ada_phone)).await;
    assert_eq!(header(&retry, "idempotent-replayed"), Some("true"));
    assert_eq!(body_text(retry).await, first_ada);
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_a_session_there_is_no_scope() {
    let kw = keyward();
    let (app, counter) = app(&kw);
    for cookie in [
        None,
        Some("__Host-session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ] {
        let response = place(&app, cookie).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = body_json(response).await;
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("logged-in user")),
            "{body}"
        );
    }
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_session_user_scope_without_a_session_layer_is_a_plain_500() {
    let kw = keyward();
    let app = Router::new()
        .route("/orders", post(|| async { "never" }))
        .layer(
            IdempotencyLayer::new(kw.idempotency("orders").unwrap())
                .scope(KeyExtractor::session_user::<Profile>()),
        );
    let response = place(&app, None).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = body_json(response).await;
    assert!(!body.to_string().contains("SessionLayer"), "{body}");
    assert_eq!(
        format!("{:?}", KeyExtractor::session_user::<Profile>()),
        format!("SessionUser({:?})", std::any::type_name::<Profile>())
    );
}
