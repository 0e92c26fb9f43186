//! Helpers: a fresh shop on its own database, and requests through `tower::ServiceExt::oneshot`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{HeaderMap, Method, Request, StatusCode, header};
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

/// One client of a shop: its address (as the connection gives it) and its session cookie, if any.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pub(crate) ip: SocketAddr,
    pub(crate) cookie: Option<String>,
}

/// An answer: status, headers, body as JSON.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
}

impl Client {
    /// A client at `ip` (port 4000), without a cookie.
    pub(crate) fn at(ip: &str) -> Client {
        Client {
            ip: SocketAddr::new(ip.parse().expect("an IP address"), 4000),
            cookie: None,
        }
    }

    /// `method path` with `body` (JSON if not null) and `extra` headers, from this client; a
    /// `Set-Cookie` in the answer replaces (or, when cleared, removes) the client's cookie.
    pub(crate) async fn send(
        &mut self,
        shop: &Shop,
        method: Method,
        path: &str,
        body: Value,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        };
        let mut request = request.body(body).expect("a request");
        request.extensions_mut().insert(ConnectInfo(self.ip));
        let answer = send_full(&shop.app, request).await;
        if let Some(set) = answer.headers.get(header::SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
            self.cookie = pair
                .split_once('=')
                .filter(|(_, v)| !v.is_empty())
                .map(|_| pair.clone());
        }
        answer
    }

    /// `POST /login` as `customer` with `password`.
    pub(crate) async fn login_with(
        &mut self,
        shop: &Shop,
        customer: &str,
        password: &str,
    ) -> Answer {
        let body = serde_json::json!({"customer_id": customer, "password": password});
        self.send(shop, Method::POST, "/login", body, &[]).await
    }

    /// `POST /login` as `customer` with the seeded password, which must succeed.
    pub(crate) async fn login(&mut self, shop: &Shop, customer: &str) {
        let answer = self
            .login_with(shop, customer, &storefront::import::demo_password(customer))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "login {customer}: {}",
            answer.body
        );
    }

    /// `GET path` from this client.
    pub(crate) async fn get(&mut self, shop: &Shop, path: &str) -> Answer {
        self.send(shop, Method::GET, path, Value::Null, &[]).await
    }

    /// `POST /orders` with `lines` (`(product, quantity)`) under `key`.
    pub(crate) async fn order(&mut self, shop: &Shop, key: &str, lines: &[(i64, i64)]) -> Answer {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
            .collect();
        let body = serde_json::json!({ "lines": lines });
        self.send(
            shop,
            Method::POST,
            "/orders",
            body,
            &[("idempotency-key", key)],
        )
        .await
    }
}

/// Waits until `done` holds, checking every few milliseconds, for at most `within`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if done().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let answer = send_full(app, request).await;
    (answer.status, answer.body)
}

pub(crate) async fn send_full(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
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
    Answer {
        status,
        headers,
        body,
    }
}

/// A client over real TCP connections (hyper), for a shop served on a listener or the `storefront`
/// binary; like [`Client`], it keeps the session cookie the shop sets.
#[derive(Clone)]
pub(crate) struct HttpClient {
    base: String,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<axum::body::Bytes>,
    >,
    pub(crate) cookie: Option<String>,
}

impl HttpClient {
    /// A client of the shop at `base` (`http://host:port`, with or without the trailing `/`).
    pub(crate) fn new(base: &str) -> HttpClient {
        HttpClient {
            base: base.trim_end_matches('/').to_owned(),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
            cookie: None,
        }
    }

    /// `method path` with `body` (JSON if not null) and `extra` headers; a `Set-Cookie` in the answer
    /// replaces (or, when cleared, removes) the cookie. Panics if no answer comes within 30 s.
    pub(crate) async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Value,
        extra: &[(&str, &str)],
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method.clone()).uri(&url);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let body = if body.is_null() {
            axum::body::Bytes::new()
        } else {
            request = request.header(header::CONTENT_TYPE, "application/json");
            axum::body::Bytes::from(body.to_string())
        };
        let request = request
            .body(http_body_util::Full::new(body))
            .expect("a request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.http.request(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {url}: no answer within 30 s"))
            .unwrap_or_else(|error| panic!("{method} {url}: {error}"));
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|error| panic!("{method} {url}: reading the body: {error}"))
            .to_bytes();
        if let Some(set) = headers.get(header::SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
            self.cookie = pair
                .split_once('=')
                .filter(|(_, v)| !v.is_empty())
                .map(|_| pair.clone());
        }
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `GET path`.
    pub(crate) async fn get(&mut self, path: &str) -> Answer {
        self.send(Method::GET, path, Value::Null, &[]).await
    }

    /// `GET path`, which must answer `200`; the body.
    pub(crate) async fn get_ok(&mut self, path: &str) -> Value {
        let answer = self.get(path).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "GET {}{path}: {}",
            self.base,
            answer.body
        );
        answer.body
    }

    /// `POST /login` as `customer` with the seeded password, which must succeed.
    pub(crate) async fn login(&mut self, customer: &str) {
        let password = storefront::import::demo_password(customer);
        let body = serde_json::json!({"customer_id": customer, "password": password});
        let answer = self.send(Method::POST, "/login", body, &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "login {customer} at {}: {}",
            self.base,
            answer.body
        );
    }

    /// `POST /orders` with `lines` (`(product, quantity)`) under `key`.
    pub(crate) async fn order(&mut self, key: &str, lines: &[(i64, i64)]) -> Answer {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
            .collect();
        let body = serde_json::json!({ "lines": lines });
        self.send(Method::POST, "/orders", body, &[("idempotency-key", key)])
            .await
    }

    /// `PATCH /admin/products/{id}` with `body` and the admin `token`.
    pub(crate) async fn patch_product(&mut self, id: i64, body: Value, token: &str) -> Answer {
        let bearer = format!("Bearer {token}");
        self.send(
            Method::PATCH,
            &format!("/admin/products/{id}"),
            body,
            &[("authorization", &bearer)],
        )
        .await
    }
}
