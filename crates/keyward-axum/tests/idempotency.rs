//! The idempotency layer on an axum `Router`, driven with `oneshot`, on the embedded backend and (for
//! replay, races, mismatches and store failures) on a real redis-server from keyward-testkit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{Method, Request, StatusCode};
use keyward::policy::{IdempotencyClass, Policy};
use keyward::{ConnectOptions, Keyward};
use keyward_axum::{IdempotencyKey, IdempotencyLayer, KeySyntax};
use keyward_testkit::RedisServer;
use tower::ServiceExt;

use crate::util::{body_json, header};

/// Every problem of the idempotency layer is `about:blank` (RFC 9457 §4.2.1): the status says it.
const BLANK: &str = "about:blank";

const KEY: &str = r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#;
const ALICE: &str = "Bearer sk_alice";
const BOB: &str = "Bearer sk_bob";

/// `charges` (the defaults) and `small` (responses up to 512 bytes stored).
fn policy() -> Policy {
    Policy::builder("test", "idempotency")
        .idempotency("charges", IdempotencyClass::new())
        .idempotency("small", IdempotencyClass::new().max_response_bytes(512))
        .idempotency(
            "brief",
            IdempotencyClass::new().lease(Duration::from_millis(30)),
        )
        .build()
        .expect("valid policy")
}

fn embedded() -> Keyward {
    Keyward::embedded(policy())
}

async fn on_redis(server: &RedisServer) -> Keyward {
    Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .response_timeout(Duration::from_millis(300))
            .reconnect_retries(0),
    )
    .await
    .expect("connect to the test redis-server")
}

/// Handler calls, per route.
#[derive(Clone, Default)]
struct Calls(Arc<AtomicUsize>);

impl Calls {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// Every byte value, then the request body: a binary body a text round trip would break.
fn binary(request_body: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = (0..=255u8).collect();
    out.extend_from_slice(request_body);
    out
}

/// The routes under test, behind `layer`, counting calls of each.
///
/// - `POST /charges`: `201`, a binary body, `content-type`, `location`, `x-charge` (stored only if
///   configured), `x-request-id` and `set-cookie` (never stored).
/// - `POST /slow`: sleeps 100 ms, then `201 done`.
/// - `POST /flaky`: `500` on its first call, `201` after.
/// - `POST /big`: a 2000-byte body.
/// - `POST /panic`: panics on its first call, `201` after.
/// - `POST /key`: echoes the `IdempotencyKey` extension.
/// - `GET|PUT /charges`: `200 list`.
struct App {
    router: Router,
    charges: Calls,
    slow: Calls,
    flaky: Calls,
    big: Calls,
    panics: Calls,
    list: Calls,
}

fn app(layer: IdempotencyLayer) -> App {
    let (charges, slow, flaky, big, panics, list) = Default::default();
    let router = Router::new()
        .route(
            "/charges",
            post({
                let calls = Calls::clone(&charges);
                move |body: Bytes| async move {
                    let n = calls.bump();
                    (
                        StatusCode::CREATED,
                        [
                            ("content-type", "application/octet-stream".to_owned()),
                            ("location", format!("/charges/ch_{n}")),
                            ("x-charge", format!("ch_{n}")),
                            ("x-request-id", format!("req_{n}")),
                            ("set-cookie", format!("session=s{n}; HttpOnly")),
                        ],
                        binary(&body),
                    )
                }
            })
            .get({
                let calls = Calls::clone(&list);
                move || async move {
                    calls.bump();
                    "list"
                }
            })
            .put({
                let calls = Calls::clone(&list);
                move || async move {
                    calls.bump();
                    "list"
                }
            }),
        )
        .route(
            "/slow",
            post({
                let calls = Calls::clone(&slow);
                move || async move {
                    calls.bump();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .route(
            "/flaky",
            post({
                let calls = Calls::clone(&flaky);
                move || async move {
                    if calls.bump() == 1 {
                        (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response()
                    } else {
                        (StatusCode::CREATED, "charged").into_response()
                    }
                }
            }),
        )
        .route(
            "/big",
            post({
                let calls = Calls::clone(&big);
                move || async move {
                    calls.bump();
                    vec![b'x'; 2000]
                }
            }),
        )
        .route(
            "/panic",
            post({
                let calls = Calls::clone(&panics);
                move || async move {
                    assert!(calls.bump() > 1, "the handler panics on its first call");
                    (StatusCode::CREATED, "charged")
                }
            }),
        )
        .route(
            "/key",
            post(
                |Extension(key): Extension<IdempotencyKey>| async move { key.as_str().to_owned() },
            ),
        )
        .layer(layer);
    App {
        router,
        charges,
        slow,
        flaky,
        big,
        panics,
        list,
    }
}

fn layer(kw: &Keyward) -> IdempotencyLayer {
    IdempotencyLayer::new(kw.idempotency("charges").expect("an idempotency class"))
}

/// A request with an optional `Idempotency-Key` (as sent, quoted or not) and `Authorization`.
fn request(
    method: Method,
    path: &str,
    key: Option<&str>,
    auth: Option<&str>,
    body: impl Into<Body>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    builder.body(body.into()).expect("valid request")
}

/// `POST path` as Alice with `key`.
fn post_as_alice(path: &str, key: &str, body: impl Into<Body>) -> Request<Body> {
    request(Method::POST, path, Some(key), Some(ALICE), body)
}

async fn send(router: &Router, request: Request<Body>) -> Response {
    router.clone().oneshot(request).await.expect("infallible")
}

async fn bytes(response: Response) -> Bytes {
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body")
}

fn replayed(response: &Response) -> bool {
    header(response, "idempotent-replayed") == Some("true")
}

/// A problem+json response: its status, content type and `type`.
async fn assert_problem(response: Response, status: StatusCode, kind: &str) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    let body = body_json(response).await;
    assert_eq!(body["type"], kind, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    if kind == BLANK {
        // RFC 9457 §4.2.1: the title of an `about:blank` problem is the status phrase (RFC 9110's, where
        // it renamed the older ones the `http` crate still has).
        let phrase = match status {
            StatusCode::UNPROCESSABLE_ENTITY => "Unprocessable Content",
            StatusCode::PAYLOAD_TOO_LARGE => "Content Too Large",
            other => other.canonical_reason().expect("a standard status"),
        };
        assert_eq!(body["title"], phrase, "{body}");
    }
    body
}

#[tokio::test]
async fn the_first_request_runs_and_gets_the_handlers_response() {
    let app = app(layer(&embedded()));
    let response = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(!replayed(&response));
    // The first response is the handler's, every header included.
    assert_eq!(header(&response, "location"), Some("/charges/ch_1"));
    assert_eq!(header(&response, "x-request-id"), Some("req_1"));
    assert!(header(&response, "set-cookie").is_some());
    assert_eq!(bytes(response).await, binary(b"amount=100"));
    assert_eq!(app.charges.get(), 1);

    // Handlers see the key, unquoted. (Another key: `KEY` now belongs to the charge, and a key is one
    // request's, whatever the route.)
    let response = send(&app.router, post_as_alice("/key", r#""k\"2""#, "")).await;
    assert_eq!(bytes(response).await, r#"k"2"#);
}

/// The first response, then two retries that replay it exactly and never reach the handler.
async fn replays_byte_for_byte(kw: Keyward) {
    let app = app(layer(&kw).store_header("x-charge"));
    let first = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_headers = first.headers().clone();
    let first_body = bytes(first).await;

    for _ in 0..2 {
        let retry = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
        assert_eq!(retry.status(), StatusCode::CREATED);
        assert!(replayed(&retry));
        for name in ["content-type", "location", "x-charge"] {
            assert_eq!(
                retry.headers().get(name),
                first_headers.get(name),
                "{name} is replayed"
            );
        }
        // Never stored: cookies, and headers not listed.
        assert_eq!(header(&retry, "set-cookie"), None);
        assert_eq!(header(&retry, "x-request-id"), None);
        assert_eq!(bytes(retry).await, first_body);
    }
    assert_eq!(first_body, binary(b"amount=100"));
    assert_eq!(app.charges.get(), 1);

    // The same key unquoted (as Stripe-style clients send it) is the same key.
    let bare = post_as_alice(
        "/charges",
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        "amount=100",
    );
    let retry = send(&app.router, bare).await;
    assert!(replayed(&retry));
    assert_eq!(bytes(retry).await, first_body);
    assert_eq!(app.charges.get(), 1);
}

#[tokio::test]
async fn a_retry_replays_status_headers_and_binary_body_byte_for_byte() {
    replays_byte_for_byte(embedded()).await;
}

#[tokio::test]
async fn a_retry_replays_byte_for_byte_on_redis() {
    let server = RedisServer::spawn();
    replays_byte_for_byte(on_redis(&server).await).await;
}

/// `n` concurrent requests with one key on `routers` (round robin): exactly one runs the handler, the
/// others get `409` (or the replay, if they arrive after it completed).
async fn race(routers: &[Router], calls: &Calls, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let router = routers[i % routers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let response = send(&router, post_as_alice("/slow", KEY, "")).await;
            let status = response.status();
            let replay = replayed(&response);
            let retry_after = header(&response, "retry-after").map(str::to_owned);
            let body = bytes(response).await;
            (status, replay, retry_after, body)
        }));
    }
    let (mut ran, mut conflicts, mut replays) = (0, 0, 0);
    for task in tasks {
        let (status, replay, retry_after, body) = task.await.expect("request task");
        match (status, replay) {
            (StatusCode::CREATED, false) => ran += 1,
            (StatusCode::CREATED, true) => {
                assert_eq!(&body[..], b"done");
                replays += 1;
            }
            (StatusCode::CONFLICT, _) => {
                let secs: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
                assert!((1..=60).contains(&secs), "Retry-After: {secs}");
                let problem: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                assert_eq!(problem["type"], BLANK);
                conflicts += 1;
            }
            other => panic!("unexpected {other:?}: {body:?}"),
        }
    }
    assert_eq!(ran, 1, "exactly one request runs the handler");
    assert_eq!(ran + conflicts + replays, n);
    assert!(conflicts > 0, "requests racing a 100 ms handler conflict");
    assert_eq!(calls.get(), 1, "the handler never runs twice");

    // Afterwards, a retry gets the one response.
    let retry = send(&routers[0], post_as_alice("/slow", KEY, "")).await;
    assert!(replayed(&retry));
    assert_eq!(&bytes(retry).await[..], b"done");
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_run_the_handler_once() {
    let app = app(layer(&embedded()));
    race(&[app.router], &app.slow, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_run_the_handler_once_on_redis() {
    let server = RedisServer::spawn();
    let app = app(layer(&on_redis(&server).await));
    race(&[app.router], &app.slow, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_through_two_connections_run_the_handler_once_on_redis() {
    // Two handles with their own connections, like two processes behind a load balancer; one handler
    // counter, as if they ran against one database.
    let server = RedisServer::spawn();
    let one = app(layer(&on_redis(&server).await));
    let two_kw = on_redis(&server).await;
    let slow = Calls::clone(&one.slow);
    let two = Router::new()
        .route(
            "/slow",
            post(move || async move {
                slow.bump();
                tokio::time::sleep(Duration::from_millis(100)).await;
                (StatusCode::CREATED, "done")
            }),
        )
        .layer(layer(&two_kw));
    race(&[one.router, two], &one.slow, 20).await;
}

/// A duplicate of a `/slow` request sent while the first one runs: its `Retry-After` header and body;
/// then checks that the first completes and a retry replays it.
async fn duplicate_while_running(
    layer: IdempotencyLayer,
    key: &str,
) -> (String, serde_json::Value) {
    let app = app(layer);
    let router = app.router.clone();
    let first_key = key.to_owned();
    let first =
        tokio::spawn(async move { send(&router, post_as_alice("/slow", &first_key, "")).await });
    // Let the first request take the key: the handler has started.
    while app.slow.get() == 0 {
        tokio::task::yield_now().await;
    }
    let retry = send(&app.router, post_as_alice("/slow", key, "")).await;
    let retry_after = header(&retry, "retry-after")
        .expect("Retry-After")
        .to_owned();
    let problem = assert_problem(retry, StatusCode::CONFLICT, BLANK).await;

    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    let retry = send(&app.router, post_as_alice("/slow", key, "")).await;
    assert!(replayed(&retry));
    assert_eq!(app.slow.get(), 1);
    (retry_after, problem)
}

#[tokio::test]
async fn a_concurrent_retry_gets_409_with_a_short_retry_after() {
    // The lease is 60 s and kept full by the heartbeat; the duplicate is told 1 s, not 60.
    let (retry_after, problem) = duplicate_while_running(layer(&embedded()), KEY).await;
    assert_eq!(retry_after, "1");
    assert_eq!(problem["retry_after"], 1);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("retry in 1 second "))
    );
}

#[tokio::test]
async fn the_in_progress_retry_after_is_configurable_on_redis() {
    let server = RedisServer::spawn();
    let kw = on_redis(&server).await;
    let (retry_after, problem) = duplicate_while_running(layer(&kw), "default").await;
    assert_eq!(retry_after, "1", "the default, on Redis too");
    assert_eq!(problem["retry_after"], 1);

    // Whole seconds, rounded up.
    let five = layer(&kw).in_progress_retry_after(Duration::from_millis(4500));
    let (retry_after, problem) = duplicate_while_running(five, "five").await;
    assert_eq!(retry_after, "5");
    assert_eq!(problem["retry_after"], 5);

    // Never longer than the lease still held: a 30 ms lease ends before 5 s (rounded up to 1 s).
    let brief = IdempotencyLayer::new(kw.idempotency("brief").unwrap())
        .in_progress_retry_after(Duration::from_secs(5));
    let (retry_after, _) = duplicate_while_running(brief, "brief").await;
    assert_eq!(retry_after, "1");
}

/// The key with another body, path or content type: `422`; the original still replays.
async fn reuse_is_422(kw: Keyward) {
    let app = app(layer(&kw));
    let first = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert_eq!(first.status(), StatusCode::CREATED);

    let other_body = post_as_alice("/charges", KEY, "amount=999");
    let other_query = post_as_alice("/charges?currency=eur", KEY, "amount=100");
    let mut other_type = post_as_alice("/charges", KEY, "amount=100");
    other_type
        .headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    for request in [other_body, other_query, other_type] {
        let response = send(&app.router, request).await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, BLANK).await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("different request"))
        );
    }
    assert_eq!(app.charges.get(), 1);
    let retry = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert!(replayed(&retry));
    assert_eq!(bytes(retry).await, binary(b"amount=100"));
}

#[tokio::test]
async fn a_different_request_under_the_same_key_is_422() {
    reuse_is_422(embedded()).await;
}

#[tokio::test]
async fn a_different_request_under_the_same_key_is_422_on_redis() {
    let server = RedisServer::spawn();
    reuse_is_422(on_redis(&server).await).await;
}

#[tokio::test]
async fn a_missing_key_is_400_naming_the_header() {
    let kw = embedded();
    let app = app(layer(&kw));
    let response = send(
        &app.router,
        request(Method::POST, "/charges", None, Some(ALICE), "amount=100"),
    )
    .await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, BLANK).await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Idempotency-Key")),
        "{problem}"
    );
    assert_eq!(app.charges.get(), 0);

    // Optional keys: a request without one runs, unprotected, every time.
    let optional = app_optional(&kw);
    for n in 1..=2 {
        let response = send(
            &optional.router,
            request(Method::POST, "/charges", None, Some(ALICE), "amount=100"),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!replayed(&response));
        assert_eq!(optional.charges.get(), n);
    }
    // ...and one with a key is protected.
    for _ in 0..2 {
        send(
            &optional.router,
            post_as_alice("/charges", KEY, "amount=100"),
        )
        .await;
    }
    assert_eq!(optional.charges.get(), 3);
}

fn app_optional(kw: &Keyward) -> App {
    app(layer(kw).require_key(false))
}

#[tokio::test]
async fn unusable_keys_are_400() {
    let app = app(layer(&embedded()));
    let long = format!("\"{}\"", "k".repeat(256));
    for key in [r#""""#, long.as_str(), r#""unterminated"#, "two words"] {
        let response = send(&app.router, post_as_alice("/charges", key, "amount=100")).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST, BLANK).await;
        assert!(problem["detail"].as_str().is_some(), "{key}: {problem}");
    }
    // More than one field.
    let mut twice = post_as_alice("/charges", KEY, "amount=100");
    twice
        .headers_mut()
        .append("idempotency-key", r#""another""#.parse().unwrap());
    let response = send(&app.router, twice).await;
    assert_problem(response, StatusCode::BAD_REQUEST, BLANK).await;
    // 255 bytes is fine.
    let max = format!("\"{}\"", "k".repeat(255));
    let response = send(&app.router, post_as_alice("/charges", &max, "amount=100")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(app.charges.get(), 1);

    // The draft's syntax only: a bare value is refused.
    let strict = self::app(layer(&embedded()).key_syntax(KeySyntax::StringOnly));
    let bare = post_as_alice(
        "/charges",
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        "amount=100",
    );
    let response = send(&strict.router, bare).await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, BLANK).await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Structured Field String"))
    );
    let quoted = send(&strict.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert_eq!(quoted.status(), StatusCode::CREATED);
    assert_eq!(strict.charges.get(), 1);
}

#[tokio::test]
async fn get_and_other_methods_pass_through_untouched() {
    let kw = embedded();
    let app = app(layer(&kw));
    for method in [Method::GET, Method::GET, Method::PUT] {
        let response = send(
            &app.router,
            request(method, "/charges", Some(KEY), Some(ALICE), ""),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!replayed(&response));
    }
    // No key, no credentials: still untouched.
    let response = send(
        &app.router,
        request(Method::GET, "/charges", None, None, ""),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.list.get(), 4);

    // Methods are configurable.
    let puts = self::app(layer(&kw).methods([Method::PUT]));
    for _ in 0..2 {
        let response = send(
            &puts.router,
            request(Method::PUT, "/charges", Some(KEY), Some(ALICE), ""),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(puts.list.get(), 1);
    // POST is no longer covered: it runs every time, key or not.
    for _ in 0..2 {
        send(
            &puts.router,
            request(Method::POST, "/charges", None, Some(ALICE), ""),
        )
        .await;
    }
    assert_eq!(puts.charges.get(), 2);
}

#[tokio::test]
async fn a_server_error_is_not_stored_and_a_retry_runs() {
    let app = app(layer(&embedded()));
    let failed = send(&app.router, post_as_alice("/flaky", KEY, "")).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&app.router, post_as_alice("/flaky", KEY, "")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(!replayed(&retry));
    // The success is stored.
    let again = send(&app.router, post_as_alice("/flaky", KEY, "")).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(replayed(&again));
    assert_eq!(&bytes(again).await[..], b"charged");
    assert_eq!(app.flaky.get(), 2);
}

#[tokio::test]
async fn an_oversize_request_body_is_413() {
    let app = app(layer(&embedded()).max_request_bytes(16));
    // Without a Content-Length: read up to the limit.
    let response = send(&app.router, post_as_alice("/charges", KEY, "x".repeat(17))).await;
    let problem = assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "about:blank").await;
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("16")));
    // With one: refused before reading.
    let mut declared = post_as_alice("/charges", KEY, "x".repeat(17));
    declared
        .headers_mut()
        .insert("content-length", "17".parse().unwrap());
    let response = send(&app.router, declared).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.charges.get(), 0);
    // At the limit: runs.
    let response = send(&app.router, post_as_alice("/charges", KEY, "x".repeat(16))).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(app.charges.get(), 1);
}

#[tokio::test]
async fn an_oversize_response_passes_through_unstored() {
    let kw = embedded();
    let app = app(IdempotencyLayer::new(kw.idempotency("small").unwrap()));
    for n in 1..=2 {
        let response = send(&app.router, post_as_alice("/big", KEY, "")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!replayed(&response));
        assert_eq!(&bytes(response).await[..], &[b'x'; 2000][..]);
        assert_eq!(app.big.get(), n, "not stored: the retry runs again");
    }
    // A small response of the same class is stored.
    let app = self::app(IdempotencyLayer::new(kw.idempotency("small").unwrap()));
    for _ in 0..2 {
        send(&app.router, post_as_alice("/slow", KEY, "")).await;
    }
    assert_eq!(app.slow.get(), 1);
}

#[tokio::test]
async fn keys_are_per_client() {
    let app = app(layer(&embedded()));
    let as_client = |auth: &str| request(Method::POST, "/charges", Some(KEY), Some(auth), "a=1");
    let alice = send(&app.router, as_client(ALICE)).await;
    let bob = send(&app.router, as_client(BOB)).await;
    assert!(!replayed(&alice) && !replayed(&bob));
    assert_eq!(header(&alice, "location"), Some("/charges/ch_1"));
    assert_eq!(header(&bob, "location"), Some("/charges/ch_2"));
    assert_eq!(app.charges.get(), 2);
    // Each replays their own.
    let alice = send(&app.router, as_client(ALICE)).await;
    let bob = send(&app.router, as_client(BOB)).await;
    assert!(replayed(&alice) && replayed(&bob));
    assert_eq!(header(&alice, "location"), Some("/charges/ch_1"));
    assert_eq!(header(&bob, "location"), Some("/charges/ch_2"));
    assert_eq!(app.charges.get(), 2);

    // No credentials: no client to scope the key to.
    let response = send(
        &app.router,
        request(Method::POST, "/charges", Some(KEY), None, "a=1"),
    )
    .await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, "about:blank").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("client") && d.contains("Authorization")),
        "{problem}"
    );
    assert_eq!(app.charges.get(), 2);
}

#[tokio::test]
async fn a_custom_scope() {
    let kw = embedded();
    let app = app(layer(&kw).scope(keyward_axum::KeyExtractor::header("x-api-key")));
    let with_api_key = |api_key: &str| {
        let mut r = request(Method::POST, "/charges", Some(KEY), None, "a=1");
        r.headers_mut()
            .insert("x-api-key", api_key.parse().unwrap());
        r
    };
    assert!(!replayed(&send(&app.router, with_api_key("k1")).await));
    assert!(replayed(&send(&app.router, with_api_key("k1")).await));
    assert!(!replayed(&send(&app.router, with_api_key("k2")).await));
    assert_eq!(app.charges.get(), 2);
}

/// Retries `request` until it is not a `409` (the key is released or completed by a spawned task), for
/// up to 2 s.
async fn retry_until_released(router: &Router, request: impl Fn() -> Request<Body>) -> Response {
    for _ in 0..200 {
        let response = send(router, request()).await;
        if response.status() != StatusCode::CONFLICT {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the key was never released");
}

#[tokio::test]
async fn a_panicking_handler_releases_the_key() {
    let app = app(layer(&embedded()));
    let router = app.router.clone();
    let crashed =
        tokio::spawn(async move { send(&router, post_as_alice("/panic", KEY, "")).await }).await;
    assert!(crashed.expect_err("the handler panicked").is_panic());
    let retry = retry_until_released(&app.router, || post_as_alice("/panic", KEY, "")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(!replayed(&retry));
    assert_eq!(app.panics.get(), 2);
}

#[tokio::test]
async fn an_inner_service_error_releases_the_key() {
    // A plain tower service whose first call fails (axum's router never does).
    let calls = Calls::default();
    let svc = tower::service_fn({
        let calls = calls.clone();
        move |_: Request<Body>| {
            let n = calls.bump();
            async move {
                if n == 1 {
                    Err("the database is down")
                } else {
                    Ok((StatusCode::CREATED, "charged").into_response())
                }
            }
        }
    });
    let svc = tower::Layer::layer(&layer(&embedded()), svc);
    let error = svc
        .clone()
        .oneshot(post_as_alice("/charges", KEY, ""))
        .await
        .expect_err("the inner error is passed on");
    assert_eq!(error, "the database is down");
    for attempt in 0.. {
        let response = svc
            .clone()
            .oneshot(post_as_alice("/charges", KEY, ""))
            .await
            .expect("the second call succeeds");
        if response.status() == StatusCode::CONFLICT && attempt < 200 {
            // The key is released by a spawned task.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!replayed(&response));
        break;
    }
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_client_that_goes_away_does_not_cancel_the_handler() {
    let app = app(layer(&embedded()));
    // The client gives up while the handler runs: its request future is dropped.
    let gone = tokio::time::timeout(
        Duration::from_millis(20),
        send(&app.router, post_as_alice("/slow", KEY, "")),
    )
    .await;
    assert!(gone.is_err());
    // Its retry waits for the handler, which finishes and stores its response.
    let retry = retry_until_released(&app.router, || post_as_alice("/slow", KEY, "")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    assert_eq!(&bytes(retry).await[..], b"done");
    assert_eq!(app.slow.get(), 1);
}

#[tokio::test]
async fn a_store_failure_is_503_and_the_handler_does_not_run() {
    let mut server = RedisServer::spawn();
    let app = app(layer(&on_redis(&server).await));
    let ok = send(&app.router, post_as_alice("/charges", KEY, "amount=100")).await;
    assert_eq!(ok.status(), StatusCode::CREATED);

    server.kill();
    let other_key = r#""b7d3c7a1-5b5e-4f47-9e0e-6c2f0c1d9a11""#;
    let response = send(
        &app.router,
        post_as_alice("/charges", other_key, "amount=100"),
    )
    .await;
    let problem = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, BLANK).await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not processed"))
    );
    assert_eq!(app.charges.get(), 1, "never run unprotected");
}

/// A handler that runs longer than the class `lease` (100 ms against 30 ms) keeps its key: the layer's
/// heartbeat extends the lease, so a retry in the meantime gets `409`, never a second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_lease_keeps_its_key() {
    let kw = embedded();
    let app = app(IdempotencyLayer::new(kw.idempotency("brief").unwrap()));
    let router = app.router.clone();
    let first = tokio::spawn(async move { send(&router, post_as_alice("/slow", KEY, "")).await });
    while app.slow.get() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Well past the 30 ms lease, still inside the 100 ms handler.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let retry = send(&app.router, post_as_alice("/slow", KEY, "")).await;
    assert_eq!(
        retry.status(),
        StatusCode::CONFLICT,
        "the lease was kept alive"
    );
    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    assert!(replayed(
        &send(&app.router, post_as_alice("/slow", KEY, "")).await
    ));
    assert_eq!(app.slow.get(), 1);
}
