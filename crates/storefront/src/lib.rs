//! storefront — keyward's reference service: the Northwind shop, with SQLite as the source of truth and
//! keyward as the data layer in front of it.
//!
//! `cargo run -p storefront` starts it on the embedded backend (`REDIS_URL=redis://… cargo run -p
//! storefront` for Redis) with a database file `storefront.db` that the first start fills from the
//! Northwind CSV files compiled into the binary. Everything the shop stores in keyward is declared in
//! `crates/storefront/policy.toml` ([`POLICY_TOML`]).
//!
//! # Layout
//! - [`db`] — SQLite through a small pool of `rusqlite` connections on blocking threads; every call is
//!   counted ([`db::Db::queries`]), so tests and the replay can show what the cache saved.
//! - [`embedded_lock`] — one embedded-backend instance per database file (an OS lock held for the
//!   process's life): embedded state is per process.
//! - [`import`] — the first-start import of the Northwind CSVs (one transaction, a marker row, errors that
//!   name file, line and column) and the seed step that sets every customer's password.
//! - [`catalog`] — categories, product pages and product details: cache-aside with L1 and tags.
//! - [`admin`] — price, stock and publish changes: SQLite first, then the tags.
//! - [`account`] — log in (two rate limits), log out, log out everywhere; sessions with a new token at
//!   every login.
//! - [`orders`] — `POST /orders` (idempotent per customer; stock checked and taken in one transaction;
//!   `order.placed` to a stream) and `/me/orders` (personal: SQLite only).
//! - [`worker`] — consumes `order.placed`: a notification row and popularity counts, once per order.
//! - [`restock`] — the nightly restock report, under the `nightly_restock` lock, written with its fencing
//!   token.
//! - [`dashboard`] — `/dashboard` (an embedded HTML page with inline SVG charts) and the JSON it polls.
//! - [`replay`] — `storefront replay`: the Northwind order history as HTTP traffic against a running
//!   shop, with latencies, hit ratio, database queries and checks of the final database.
//! - [`telemetry`] — `/metrics` (the recorder is installed by the binary, once) and the request counter.
//! - [`AppError`] — how each failure answers (RFC 9457 problem+json); keyward failures go through
//!   [`keyward_axum::ApiError`]. Path parameters are extracted so that a malformed one answers the same
//!   way (a `400` naming the parameter and the value), not with axum's plain-text rejection.
//! - [`app`] — the router; [`AppState`] — what handlers share; [`Config`] and [`start`] — opening the
//!   database, importing, connecting keyward.
//!
//! # Why `rusqlite` and not `sqlx`
//! The shop needs one embedded SQLite file, transactions that check and write atomically (stock), and a
//! fast build. `rusqlite` with `bundled` compiles SQLite in (nothing to install), is a thin, well-kept
//! wrapper over SQLite's own API (transactions with `BEGIN IMMEDIATE`, prepared-statement cache), and adds
//! a handful of crates; `sqlx` would bring its async driver, its macro crate and its connection machinery
//! for a database that is a local file — its async API runs SQLite on a worker thread anyway. The cost of
//! `rusqlite` is that its calls block: [`db::Db`] runs them with `spawn_blocking` on a pool of
//! connections (SQLite in WAL mode: readers never wait for the writer).
//!
//! # What is not built yet
//! The storefront is issue #15's reference service, in progress. Still to come: the browser test.
//!
//! # Routes
//! | route | what |
//! | --- | --- |
//! | `GET /` | a small index page |
//! | `GET /categories` | every category with its published-product count |
//! | `GET /categories/{id}/products?page=1&per_page=20` | a page of a category's published products (`per_page` ≤ 30) |
//! | `GET /products/{id}` | a published product |
//! | `PATCH /admin/products/{id}` | `{"price_cents": …, "stock": …, "published": …}`, with `Authorization: Bearer <admin token>` |
//! | `POST /admin/restock-report` | run the restock report now (admin token) → `{"outcome": "written" \| "skipped" \| "already_done" \| "stale", …}` |
//! | `POST /login` | `{"customer_id": "ALFKI", "password": "alfki@northwind"}` → the customer and a session cookie; `401`, `429` |
//! | `POST /logout` | ends this session (`204`) |
//! | `POST /logout/everywhere` | ends every session of the customer (`{"sessions_ended": n}`) |
//! | `GET /me` | the logged-in customer, or `401` |
//! | `POST /orders` | `{"lines": [{"product_id": 1, "quantity": 2}]}` with `Idempotency-Key`, logged in → `201` |
//! | `GET /me/orders` | the customer's newest orders, from SQLite (`Cache-Control: private, no-store`) |
//! | `GET /dashboard` | live charts: hit ratio per class (L1, L2), queries saved, login decisions, stream lag and dead letters, breaker |
//! | `GET /dashboard/data` | what the page polls (JSON; [`dashboard`]) |
//! | `GET /metrics` | Prometheus text: keyward's metrics and the shop's own; `503` when no recorder is installed ([`telemetry`]) |
//! | `GET /healthz` | `200` with `{"status": "ok", "backend": …, "database_id": …}` when SQLite and the keyward store answer; the store down: `503` (`Retry-After`) with `{"status": "unavailable", "database": "ok", "database_id": …, "store": "not answering"}`; SQLite down: `500`. `database_id` is [`Db::id`] |
//!
//! # Middleware order
//! In axum the layer added last runs first. Outside in: the request counter
//! ([`telemetry`], by matched route; it sees every answer, `401`s and `429`s included); the [`SessionLayer`] on every route (it reads
//! nothing until a handler or middleware asks); on `/orders` and `/me/orders`, `require_login` (`401`
//! without a live session; it loads the session, which the idempotency scope and the handler then share);
//! on `/orders`, the [`IdempotencyLayer`] scoped by the session's user, inside `require_login` so that a
//! refused request never takes a key. `/login`'s two limits are checked in its handler (see [`account`]):
//! a route layer could check only one identity.

pub mod account;
pub mod admin;
pub mod catalog;
pub mod dashboard;
pub mod db;
pub mod embedded_lock;
mod error;
mod extract;
pub mod import;
pub mod orders;
pub mod replay;
pub mod restock;
pub mod telemetry;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse as _, Response};
use axum::routing::{get, patch, post};
use keyward::Keyward;
use keyward::idempotency::Idempotency;
use keyward::policy::{Policy, PolicyError};
use keyward::session::{SessionSecrets, Sessions};
use keyward::stream::Stream;
use keyward_axum::{IdempotencyLayer, KeyExtractor, SessionLayer, TrustedProxies};
use metrics_exporter_prometheus::PrometheusHandle;

pub use account::{Customer, LoginLimits};
pub use admin::AdminToken;
pub use catalog::Catalog;
pub use db::{Db, DbError};
pub use error::AppError;
pub use import::{DataSource, ImportError, ImportReport, PasswordCost};

/// The shop's keyward policy, `crates/storefront/policy.toml`, as compiled in.
pub const POLICY_TOML: &str = include_str!("../policy.toml");

/// The compiled-in policy, validated.
///
/// # Errors
/// [`PolicyError`] naming the class and field (a test keeps the file valid).
pub fn policy() -> Result<Policy, PolicyError> {
    Policy::from_toml_str(POLICY_TOML)
}

/// What the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The keyward handle (one per process).
    pub kw: Keyward,
    /// The database.
    pub db: Db,
    /// The catalog's caches.
    pub catalog: Catalog,
    /// The token admin routes require; `None`: admin routes refuse everyone.
    pub admin_token: Option<AdminToken>,
    /// Customers' sessions (`web_session`).
    pub sessions: Sessions<Customer>,
    /// The two login limits.
    pub login_limits: LoginLimits,
    /// `POST /orders`' idempotency keys (`order_request`).
    pub order_requests: Idempotency,
    /// The `order_events` stream.
    pub events: Stream<orders::OrderEvent>,
    /// Whose forwarding headers name the client (login's per-IP limit); none by default.
    pub trusted_proxies: TrustedProxies,
    /// What `/metrics` renders: the process's Prometheus recorder, installed by the binary
    /// ([`telemetry::install_recorder`]); `None`: `/metrics` answers `503`.
    pub metrics: Option<PrometheusHandle>,
    /// This process's counts that keyward keeps no readable totals for (login decisions), for
    /// `/dashboard/data`.
    pub tallies: Arc<dashboard::Tallies>,
}

impl AppState {
    /// The state of one instance over `kw` and `db`; sessions are keyed with `secrets` (every instance
    /// sharing a store needs the same ones).
    ///
    /// # Errors
    /// keyward errors if `kw`'s policy lacks a class the shop uses.
    pub fn new(
        kw: Keyward,
        db: Db,
        admin_token: Option<AdminToken>,
        secrets: SessionSecrets,
    ) -> keyward::Result<AppState> {
        let catalog = Catalog::new(&kw, db.clone())?;
        Ok(AppState {
            sessions: kw.sessions(account::SESSION_CLASS, secrets)?,
            login_limits: LoginLimits::new(&kw)?,
            order_requests: kw.idempotency(orders::ORDER_REQUEST_CLASS)?,
            events: kw.stream(orders::ORDER_EVENTS_CLASS)?,
            trusted_proxies: TrustedProxies::none(),
            metrics: None,
            tallies: dashboard::Tallies::new(),
            kw,
            db,
            catalog,
            admin_token,
        })
    }
}

/// How to start an instance.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The SQLite file (created and imported into at first start).
    pub db_path: PathBuf,
    /// SQLite connections in the pool.
    pub db_pool: usize,
    /// Where the first start reads Northwind from.
    pub data: DataSource,
    /// The cost of the seeded password hashes.
    pub password_cost: PasswordCost,
    /// The keyward policy.
    pub policy: Policy,
    /// Redis (any URL keyward takes); `None`: the embedded backend.
    pub redis_url: Option<String>,
    /// The admin token; `None`: admin routes refuse everyone.
    pub admin_token: Option<AdminToken>,
    /// The secrets session ids are keyed with; `None`: a random one for this process (sessions then
    /// end with it, and other instances cannot read them).
    pub session_secrets: Option<SessionSecrets>,
    /// Whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// Whether the catalog reads through keyward (`false`: straight from SQLite, for load tests;
    /// [`Catalog::without_cache`]).
    pub catalog_cache: bool,
}

impl Config {
    /// A configuration for the database at `db_path`: the compiled-in data and policy, the embedded
    /// backend, 4 connections, recommended password cost, no admin token.
    pub fn new(db_path: impl Into<PathBuf>, policy: Policy) -> Config {
        Config {
            db_path: db_path.into(),
            db_pool: 4,
            data: DataSource::Embedded,
            password_cost: PasswordCost::Recommended,
            policy,
            redis_url: None,
            admin_token: None,
            session_secrets: None,
            trusted_proxies: TrustedProxies::none(),
            catalog_cache: true,
        }
    }

    /// Read the catalog through keyward (`true`, the default) or straight from SQLite (`false`: the
    /// binary's `--no-cache`, for load tests comparing the two).
    #[must_use]
    pub fn catalog_cache(mut self, on: bool) -> Self {
        self.catalog_cache = on;
        self
    }

    /// Key sessions with `secrets` (instances sharing a store need the same).
    #[must_use]
    pub fn session_secrets(mut self, secrets: Option<SessionSecrets>) -> Self {
        self.session_secrets = secrets;
        self
    }

    /// Read the client IP from these proxies' forwarding headers.
    #[must_use]
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Use Redis at `url` (`None`: the embedded backend).
    #[must_use]
    pub fn redis_url(mut self, url: Option<String>) -> Self {
        self.redis_url = url;
        self
    }

    /// Require `token` on admin routes.
    #[must_use]
    pub fn admin_token(mut self, token: Option<AdminToken>) -> Self {
        self.admin_token = token;
        self
    }

    /// Seed passwords at `cost`.
    #[must_use]
    pub fn password_cost(mut self, cost: PasswordCost) -> Self {
        self.password_cost = cost;
        self
    }

    /// Import from `data` at first start.
    #[must_use]
    pub fn data(mut self, data: DataSource) -> Self {
        self.data = data;
        self
    }
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The database could not be opened.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The first-start import failed (nothing was imported).
    #[error("importing Northwind")]
    Import(#[from] ImportError),
    /// keyward could not connect, or the policy lacks a class.
    #[error("keyward")]
    Keyward(#[from] keyward::Error),
}

/// Open the database (importing Northwind at first start), connect keyward, and build the state.
///
/// # Errors
/// [`StartError`] saying which step failed.
pub async fn start(config: Config) -> Result<(AppState, ImportReport), StartError> {
    let db = Db::open(&config.db_path, config.db_pool)?;
    let report = import::ensure_imported(&db, config.data, config.password_cost).await?;
    let kw = match &config.redis_url {
        Some(url) => Keyward::connect(url, config.policy).await?,
        None => Keyward::embedded(config.policy),
    };
    let secrets = match config.session_secrets {
        Some(secrets) => secrets,
        None => random_session_secrets()?,
    };
    let mut state = AppState::new(kw, db, config.admin_token, secrets)?;
    state.trusted_proxies = config.trusted_proxies;
    if !config.catalog_cache {
        state.catalog = state.catalog.without_cache();
    }
    Ok((state, report))
}

/// One random 32-byte session secret.
///
/// # Errors
/// None in practice: keyward refuses only secrets shorter than 32 bytes.
pub fn random_session_secrets() -> keyward::Result<SessionSecrets> {
    use rand::Rng as _;
    let bytes: [u8; 32] = rand::rng().random();
    SessionSecrets::new(bytes)
}

/// The storefront's router. Serve it with connection info
/// (`app(state).into_make_service_with_connect_info::<SocketAddr>()`): `/login` limits per client IP and
/// answers `500` without it.
pub fn app(state: AppState) -> Router {
    let orders = Router::new()
        .route(
            "/orders",
            post(orders::post_order).route_layer(
                IdempotencyLayer::new(state.order_requests.clone())
                    .scope(KeyExtractor::session_user::<Customer>()),
            ),
        )
        .route("/me/orders", get(orders::get_my_orders))
        .route_layer(axum::middleware::from_fn(account::require_login));
    // The catalog routes hold only the catalog: axum clones a route's state for every request, and these
    // are the hot reads.
    let catalog = Router::new()
        .route("/categories", get(catalog::list_categories))
        .route("/categories/{id}/products", get(catalog::list_products))
        .route("/products/{id}", get(catalog::show_product))
        .with_state(state.catalog.clone());
    Router::new()
        .route("/", get(index))
        .merge(catalog)
        .route("/admin/products/{id}", patch(admin::patch_product))
        .route("/admin/restock-report", post(restock::post_restock_report))
        .route("/login", post(account::login))
        .route("/logout", post(account::logout))
        .route("/logout/everywhere", post(account::logout_everywhere))
        .route("/me", get(account::me))
        .merge(orders)
        .route("/healthz", get(healthz))
        .route("/metrics", get(telemetry::get_metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/data", get(dashboard::get_data))
        .layer(SessionLayer::new(state.sessions.clone()))
        .layer(axum::middleware::from_fn(telemetry::count_requests))
        .with_state(state)
}

/// `GET /`: what the shop offers so far.
async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// `GET /healthz`: SQLite and the keyward store both answer. The body names the database the shop
/// serves (`database_id`, [`Db::id`]): `storefront replay` checks it against its `--db` file.
async fn healthz(State(state): State<AppState>) -> Result<Response, AppError> {
    state
        .db
        .read(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(DbError::query("health check"))
        })
        .await?;
    if let Err(error) = state.kw.ping().await {
        // Named for the operator reading it: the database answered, keyward's store did not.
        let error = keyward_axum::ApiError::from(error);
        tracing::warn!(error = %error, "storefront: health check: the store did not answer");
        let (status, retry) = match error.retry_after() {
            Some(secs) => (StatusCode::SERVICE_UNAVAILABLE, Some(secs)),
            None => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        let body = Json(serde_json::json!({
            "status": "unavailable",
            "backend": format!("{:?}", state.kw.backend()),
            "database": "ok",
            "database_id": state.db.id(),
            "store": "not answering",
        }));
        let mut response = (status, body).into_response();
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        return Ok(response);
    }
    Ok(Json(serde_json::json!({
        "status": "ok",
        "backend": format!("{:?}", state.kw.backend()),
        "database_id": state.db.id(),
    }))
    .into_response())
}
