//! A small blog-and-shop service, end to end: cached articles invalidated after each write, a rate-limited
//! login, cookie sessions and idempotent orders. docs/building-a-service.md walks through it; the tests
//! (`tests/building_a_service.rs`) build it and drive every route on both backends.
//!
//! ```text
//! cargo run -p keyward-axum --example building_a_service            # plays the routes in process, prints each exchange
//! cargo run -p keyward-axum --example building_a_service -- serve   # serves on 127.0.0.1:3000 (PORT to move it)
//!
//! curl -si localhost:3000/articles/1
//! curl -si localhost:3000/login -H 'content-type: application/json' -d '{"user":"ada","password":"lovelace"}'
//! curl -si -X PUT localhost:3000/articles/1 -H 'cookie: __Host-session=…' -d 'New title'
//! curl -si localhost:3000/orders -H 'cookie: __Host-session=…' -H 'idempotency-key: "order-1"' -d 'A-1'
//! ```
//!
//! `REDIS_URL` picks Redis (else the embedded backend); `KEYWARD_ENV` / `KEYWARD_APP` override the policy's
//! namespace; `SESSION_SECRETS` (comma-separated base64, current first) signs the sessions. The database is
//! a map in memory standing in for yours.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use keyward::policy::Policy;
use keyward::session::SessionSecrets;
use keyward::{ConnectOptions, Keyward};
use keyward_axum::{
    ApiError, CurrentSession, IdempotencyLayer, KeyExtractor, RateLimitLayer, SessionLayer,
    TrustedProxies,
};
use serde::{Deserialize, Serialize};
use tower::ServiceExt as _;

// --- The allocator (section 10) ---------------------------------------------------------------------------

/// keyward's calls allocate on one thread and free on another, which glibc's malloc serialises.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// --- The policy ------------------------------------------------------------------------------------------

/// Every key the service writes, its lifetime and who invalidates it: read by the code and by `keyward
/// policy check` / `keyward audit`.
pub(crate) const POLICY: &str = r#"
[namespace]
env = "dev"                  # KEYWARD_ENV overrides it in each deployment
app = "blog"

[classes.article]
kind = "cache"
ttl = "10m"
invalidation = "PUT /articles/{id}, right after the database write"

[classes.login_per_ip]
kind = "rate_limit"
algorithm = "gcra"
limit = 5
window = "1m"

[classes.web]
kind = "session"
idle = "30m"
absolute = "12h"

[classes.order]
kind = "idempotency"
ttl = "24h"
lease = "30s"
"#;

// --- The database (yours) --------------------------------------------------------------------------------

/// An article, as the database and the cache hold it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Article {
    pub(crate) id: u64,
    pub(crate) title: String,
}

/// What the database can fail with.
#[derive(Debug)]
pub(crate) enum DbError {
    NotFound,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not found")
    }
}

impl std::error::Error for DbError {}

/// A stand-in for your database: articles, users, orders, and how often each was read or written.
#[derive(Clone, Default)]
pub(crate) struct Db {
    articles: Arc<Mutex<HashMap<u64, String>>>,
    pub(crate) article_reads: Arc<Mutex<u64>>,
    pub(crate) orders: Arc<Mutex<Vec<(String, String)>>>,
}

impl Db {
    pub(crate) fn with_articles(articles: &[(u64, &str)]) -> Db {
        let db = Db::default();
        let mut map = db.articles.lock().unwrap();
        map.extend(articles.iter().map(|(id, t)| (*id, (*t).to_owned())));
        drop(map);
        db
    }

    async fn article(&self, id: u64) -> Result<Article, DbError> {
        *self.article_reads.lock().unwrap() += 1;
        let title = self.articles.lock().unwrap().get(&id).cloned();
        title
            .map(|title| Article { id, title })
            .ok_or(DbError::NotFound)
    }

    async fn update_article(&self, id: u64, title: String) -> Result<(), DbError> {
        let mut articles = self.articles.lock().unwrap();
        let stored = articles.get_mut(&id).ok_or(DbError::NotFound)?;
        *stored = title;
        Ok(())
    }

    fn password_ok(&self, user: &str, password: &str) -> bool {
        matches!((user, password), ("ada", "lovelace") | ("alan", "turing"))
    }

    async fn insert_order(&self, user: &str, sku: &str) -> usize {
        let mut orders = self.orders.lock().unwrap();
        orders.push((user.to_owned(), sku.to_owned()));
        orders.len()
    }
}

// --- Errors in handlers ----------------------------------------------------------------------------------

/// The one error type of the handlers: your database's "not found" is a 404; every other failure is
/// keyward-axum's `ApiError`, which answers a store outage with a 503 and `Retry-After`, anything else
/// with a 500, never puts the error's text in the body (it names servers and classes) and logs it.
pub(crate) enum AppError {
    NotFound,
    Api(ApiError),
}

impl From<keyward::Error> for AppError {
    fn from(e: keyward::Error) -> Self {
        // A loader's or a write's own error comes back as its type.
        match e.downcast_ref::<DbError>() {
            Some(DbError::NotFound) => AppError::NotFound,
            None => AppError::Api(e.into()),
        }
    }
}

/// What the session handle's methods return: no database error in there.
impl From<ApiError> for AppError {
    fn from(e: ApiError) -> Self {
        AppError::Api(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::NotFound => StatusCode::NOT_FOUND.into_response(),
            AppError::Api(e) => e.into_response(), // 503 + Retry-After, or 500; problem+json
        }
    }
}

// --- Handlers --------------------------------------------------------------------------------------------

/// What a session holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Profile {
    user: String,
}

#[derive(Clone)]
struct AppState {
    kw: Keyward,
    articles: keyward::Cache<Article>,
    db: Db,
}

async fn get_article(State(s): State<AppState>, Path(id): Path<u64>) -> Result<Response, AppError> {
    // A miss loads once (fleet-wide); a database error reaches every waiting caller and is never cached.
    let article = s.articles.get_or_set(&id, || s.db.article(id)).await?;
    let json = serde_json::to_string(&article).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

async fn put_article(
    State(s): State<AppState>,
    Path(id): Path<u64>,
    session: CurrentSession<Profile>,
    title: String,
) -> Result<StatusCode, AppError> {
    if session.get().is_none() {
        return Ok(StatusCode::UNAUTHORIZED);
    }
    // The database write first, then the invalidation; a fill that raced it never lands.
    s.articles
        .invalidate_after(&id, s.db.update_article(id, title))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct Login {
    user: String,
    password: String,
}

async fn login(
    State(s): State<AppState>,
    session: CurrentSession<Profile>,
    body: String,
) -> Result<StatusCode, AppError> {
    let Ok(form) = serde_json::from_str::<Login>(&body) else {
        return Ok(StatusCode::BAD_REQUEST);
    };
    if !s.db.password_ok(&form.user, &form.password) {
        return Ok(StatusCode::UNAUTHORIZED);
    }
    // A new session (and token) at every login; the one the request came with, if any, ends.
    session
        .create(
            &form.user,
            &Profile {
                user: form.user.clone(),
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(session: CurrentSession<Profile>) -> Response {
    match session.get() {
        Some(s) => s.data.user.into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn logout(session: CurrentSession<Profile>) -> Result<StatusCode, AppError> {
    session.destroy().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Orders need a login: 401 without one. The session it loads is the request's one read: the
/// idempotency scope and the handler below share it.
async fn require_login(session: CurrentSession<Profile>, req: Request, next: Next) -> Response {
    if session.get().is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(req).await
}

async fn place_order(
    State(s): State<AppState>,
    session: CurrentSession<Profile>,
    sku: String,
) -> Response {
    let Some(current) = session.get() else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let user = current.user_id();
    let n = s.db.insert_order(user, &sku).await;
    (StatusCode::CREATED, format!("order {n}: {sku} for {user}")).into_response()
}

async fn healthz(State(s): State<AppState>) -> StatusCode {
    match s.kw.ping().await {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

// --- The app ---------------------------------------------------------------------------------------------

/// The service's routes and layers.
pub(crate) fn app(kw: &Keyward, db: Db, secrets: SessionSecrets) -> keyward::Result<Router> {
    let state = AppState {
        kw: kw.clone(),
        articles: kw.cache::<Article>("article")?,
        db,
    };
    // Layers run outside in: the one added last runs first.
    let orders = Router::new()
        .route("/orders", post(place_order))
        .route_layer(
            IdempotencyLayer::new(kw.idempotency("order")?)
                .scope(KeyExtractor::session_user::<Profile>()),
        )
        .route_layer(middleware::from_fn(require_login));
    let login = Router::new()
        .route("/login", post(login))
        .route_layer(RateLimitLayer::new(
            kw.rate_limiter("login_per_ip")?,
            KeyExtractor::client_ip(TrustedProxies::none()),
        ));
    Ok(Router::new()
        .route("/articles/{id}", get(get_article).put(put_article))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .route("/healthz", get(healthz))
        .merge(orders)
        .merge(login)
        .with_state(state)
        .layer(SessionLayer::new(kw.sessions::<Profile>("web", secrets)?)))
}

/// The policy, with `KEYWARD_ENV` / `KEYWARD_APP` applied.
pub(crate) fn policy() -> anyhow::Result<Policy> {
    Ok(Policy::from_toml_str(POLICY)?.with_env_overrides()?)
}

// --- Running it ------------------------------------------------------------------------------------------

/// Sends one request as a client at 203.0.113.7 would (with connection info, as `serve` gives it) and
/// returns the status, the `Set-Cookie` pair if any, and the body.
pub(crate) async fn send(
    app: &Router,
    request: http::request::Builder,
    body: &str,
) -> anyhow::Result<(StatusCode, Option<String>, String)> {
    let mut request = request.body(Body::from(body.to_owned()))?;
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 40000))));
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
    Ok((status, cookie, String::from_utf8_lossy(&body).into_owned()))
}

async fn play(app: &Router) -> anyhow::Result<()> {
    let get = |uri: &str| http::Request::get(uri);
    let show = |what: &str, r: &(StatusCode, Option<String>, String)| {
        println!("{what:<44} -> {} {}", r.0, r.2);
    };
    show(
        "GET /articles/1 (a miss: loads)",
        &send(app, get("/articles/1"), "").await?,
    );
    show(
        "GET /articles/1 (a hit)",
        &send(app, get("/articles/1"), "").await?,
    );
    show(
        "GET /articles/9 (not in the database)",
        &send(app, get("/articles/9"), "").await?,
    );
    let login = http::Request::post("/login").header(header::CONTENT_TYPE, "application/json");
    let r = send(app, login, r#"{"user":"ada","password":"lovelace"}"#).await?;
    show("POST /login", &r);
    let cookie = r.1.context("login sets the session cookie")?;
    let put = http::Request::put("/articles/1").header(header::COOKIE, &cookie);
    show(
        "PUT /articles/1 (then invalidates)",
        &send(app, put, "Notes on the engine").await?,
    );
    show(
        "GET /articles/1 (the new title)",
        &send(app, get("/articles/1"), "").await?,
    );
    for attempt in 1..=2 {
        let order = http::Request::post("/orders")
            .header(header::COOKIE, &cookie)
            .header("idempotency-key", "\"order-1\"");
        show(
            &format!("POST /orders, key order-1 (#{attempt})"),
            &send(app, order, "A-1").await?,
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Connects in the background when REDIS_URL is set: the service starts even if Redis is not up yet.
    let kw = Keyward::from_env_with(policy()?, ConnectOptions::default().lazy_connect()).await?;
    let secrets = match std::env::var("SESSION_SECRETS") {
        Ok(list) => SessionSecrets::from_base64_list(&list).context("SESSION_SECRETS")?,
        Err(_) => {
            tracing::warn!("SESSION_SECRETS is not set: using a development secret");
            SessionSecrets::new(*b"development only; not a secret!!")?
        }
    };
    let db = Db::with_articles(&[
        (1, "Notes on the analytical engine"),
        (2, "On computable numbers"),
    ]);
    let app = app(&kw, db, secrets)?;
    match std::env::args().nth(1).as_deref() {
        None => return play(&app).await,
        Some("serve") => {}
        Some(other) => {
            anyhow::bail!("unknown argument {other:?}; usage: building_a_service [serve]")
        }
    }
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    // The login limit counts per client IP: serve with the connection's address.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
