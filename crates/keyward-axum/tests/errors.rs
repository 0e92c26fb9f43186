//! `ApiError` from handlers: the application's own error back from a loader or `invalidate_after`
//! (embedded backend), and outages and error replies of a real redis-server (keyward-testkit).

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Request, StatusCode, header};
use keyward::policy::{CacheClass, Policy};
use keyward::{Cache, ConnectOptions, Keyward};
use keyward_axum::ApiError;
use keyward_testkit::RedisServer;

use crate::util::{body_json, send};

#[derive(Debug, thiserror::Error)]
enum DbError {
    #[error("no article {0}")]
    NotFound(u32),
    #[error("connection to db.internal:5432 refused")]
    Down,
}

/// The database: article 7 exists, 13 is down, the rest do not exist.
async fn load(id: u32) -> Result<String, DbError> {
    match id {
        7 => Ok("seven".to_owned()),
        13 => Err(DbError::Down),
        _ => Err(DbError::NotFound(id)),
    }
}

/// Every error of the app: its own `NotFound`, and the rest as keyward-axum answers them.
enum AppError {
    NotFound,
    Other(ApiError),
}

impl From<keyward::Error> for AppError {
    fn from(error: keyward::Error) -> Self {
        let error = ApiError::from(error);
        match error.app_error::<DbError>() {
            Some(DbError::NotFound(_)) => AppError::NotFound,
            _ => AppError::Other(error),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::NotFound => (StatusCode::NOT_FOUND, "no such article").into_response(),
            AppError::Other(error) => error.into_response(),
        }
    }
}

async fn show(State(cache): State<Cache<String>>, Path(id): Path<u32>) -> Result<String, AppError> {
    Ok(cache.get_or_set(&id.to_string(), || load(id)).await?)
}

async fn edit(State(cache): State<Cache<String>>, Path(id): Path<u32>) -> Result<(), AppError> {
    Ok(cache
        .invalidate_after(&id.to_string(), async move { load(id).await.map(drop) })
        .await?)
}

/// Plain `ApiError`: `?` on the cache call.
async fn plain(
    State(cache): State<Cache<String>>,
    Path(id): Path<u32>,
) -> Result<String, ApiError> {
    Ok(cache.get_or_set(&id.to_string(), || load(id)).await?)
}

fn policy() -> Policy {
    Policy::builder("test", "errors")
        .cache(
            "article",
            CacheClass::new(Duration::from_secs(600), "edit, after the write"),
        )
        .build()
        .expect("valid policy")
}

fn app(kw: &Keyward) -> Router {
    Router::new()
        .route("/articles/{id}", get(show).put(edit))
        .route("/plain/{id}", get(plain))
        .with_state(kw.cache::<String>("article").unwrap())
}

fn get_(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn put_(path: &str) -> Request<Body> {
    Request::put(path).body(Body::empty()).unwrap()
}

/// A problem+json body that shows none of the internals.
async fn plain_problem(response: Response, status: StatusCode) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body = body_json(response).await;
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["status"], status.as_u16());
    let text = body.to_string();
    for internal in [
        "::",
        "db.internal",
        "article",
        "127.0.0.1",
        "Redis",
        "WRONGTYPE",
        "test:errors",
        "loader",
    ] {
        assert!(
            !text.contains(internal),
            "the body shows `{internal}`: {text}"
        );
    }
    body
}

#[tokio::test]
async fn the_apps_own_error_comes_back_from_a_loader_and_from_invalidate_after() {
    let kw = Keyward::embedded(policy());
    let app = app(&kw);
    assert_eq!(
        send(&app, get_("/articles/7")).await.status(),
        StatusCode::OK
    );
    // A loader's NotFound: the handler's 404.
    let response = send(&app, get_("/articles/8")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // A source write's NotFound, through `invalidate_after`: the handler's 404 as well.
    let response = send(&app, put_("/articles/8")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        send(&app, put_("/articles/7")).await.status(),
        StatusCode::OK
    );
    // Another DbError is left to ApiError: a plain 500, the database's message only in the log.
    plain_problem(
        send(&app, get_("/articles/13")).await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    plain_problem(
        send(&app, put_("/articles/13")).await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    // Without the mapping, a loader's error is a 500.
    plain_problem(
        send(&app, get_("/plain/8")).await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
}

async fn on_redis(server: &RedisServer, options: ConnectOptions) -> Keyward {
    Keyward::connect_with(
        &server.url(),
        policy(),
        options
            .response_timeout(Duration::from_millis(300))
            .reconnect_retries(0),
    )
    .await
    .expect("connect to the test redis-server")
}

#[tokio::test]
async fn a_redis_outage_is_503_with_retry_after_and_the_breakers_cooldown() {
    let mut server = RedisServer::spawn();
    let kw = on_redis(
        &server,
        ConnectOptions::default().breaker(1, Duration::from_millis(4500)),
    )
    .await;
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(kw): State<Keyward>| async move {
                kw.ping().await?;
                Ok::<_, ApiError>("ok")
            }),
        )
        .with_state(kw);
    assert_eq!(send(&app, get_("/healthz")).await.status(), StatusCode::OK);

    server.kill();
    // The first failure trips the breaker (one failure is enough here)...
    let response = send(&app, get_("/healthz")).await;
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let body = plain_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["retry_after"], 1);
    // ...and while it is open, clients are told when it will probe again (4.5 s, rounded up).
    let response = send(&app, get_("/healthz")).await;
    assert_eq!(response.headers()[header::RETRY_AFTER], "5");
    let body = plain_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["retry_after"], 5);
}

#[tokio::test]
async fn a_redis_error_reply_is_a_plain_500() {
    let server = RedisServer::spawn();
    let kw = on_redis(&server, ConnectOptions::default()).await;
    let cache = kw.cache::<String>("article").unwrap();
    // The entry's key holds a list: every command on it is refused with WRONGTYPE.
    let key = cache.key("7").unwrap();
    let mut con = server.connection();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("not a cache entry")
        .query(&mut con)
        .unwrap();
    let app = app(&kw);
    let response = send(&app, get_("/plain/7")).await;
    assert!(response.headers().get(header::RETRY_AFTER).is_none());
    plain_problem(response, StatusCode::INTERNAL_SERVER_ERROR).await;
}
