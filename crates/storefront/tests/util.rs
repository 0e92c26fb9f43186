//! Helpers: a fresh shop on its own database, and requests through `tower::ServiceExt::oneshot`.

use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::Value;
use storefront::{AdminToken, AppState, Config, PasswordCost};
use tempfile::TempDir;
use tower::ServiceExt as _;

/// The admin token every test shop requires.
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// One storefront instance over its own (or a shared) database.
pub(crate) struct Shop {
    pub(crate) state: AppState,
    pub(crate) app: Router,
}

/// A temporary directory for a database that one or more shops open.
pub(crate) struct DbDir {
    dir: TempDir,
}

impl DbDir {
    pub(crate) fn new() -> DbDir {
        DbDir {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub(crate) fn db_file(&self) -> PathBuf {
        self.dir.path().join("shop.db")
    }

    /// A read-only look at the database, for checking what the shop answered.
    pub(crate) fn sqlite(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.db_file()).expect("open the test database")
    }
}

/// The configuration tests use: the database in `dir`, cheap password hashes, the test admin token.
pub(crate) fn config(dir: &DbDir) -> Config {
    Config::new(
        dir.db_file(),
        storefront::policy().expect("the policy is valid"),
    )
    .password_cost(PasswordCost::Minimal)
    .admin_token(AdminToken::new(ADMIN_TOKEN))
}

impl Shop {
    /// A shop on the embedded backend over the database in `dir` (imported at first start).
    pub(crate) async fn embedded(dir: &DbDir) -> Shop {
        Shop::start(config(dir)).await
    }

    /// A shop on Redis at `url` over the database in `dir`.
    pub(crate) async fn on_redis(dir: &DbDir, url: &str) -> Shop {
        Shop::start(config(dir).redis_url(Some(url.to_owned()))).await
    }

    pub(crate) async fn start(config: Config) -> Shop {
        let (state, _) = storefront::start(config).await.expect("the shop starts");
        let app = storefront::app(state.clone());
        Shop { state, app }
    }

    /// `GET path`: the status and the body as JSON (`Value::Null` for an empty body).
    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        let request = Request::get(path).body(Body::empty()).expect("a request");
        send(&self.app, request).await
    }

    /// `GET path`, which must answer `200`.
    pub(crate) async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// `PATCH /admin/products/{id}` with `body` and the admin token.
    pub(crate) async fn patch_product(&self, id: i64, body: Value) -> (StatusCode, Value) {
        self.patch_product_as(id, body, Some(ADMIN_TOKEN)).await
    }

    /// `PATCH /admin/products/{id}` with `body`, sending `token` if any.
    pub(crate) async fn patch_product_as(
        &self,
        id: i64,
        body: Value,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::patch(format!("/admin/products/{id}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Body::from(body.to_string()))
            .expect("a request");
        send(&self.app, request).await
    }
}

pub(crate) async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, body)
}
