//! The fleet as real OS processes: one `redis-server`, two `storefront` binaries serving the shop
//! (`--no-worker`) and `storefront worker` as a third process, all on one SQLite file and one Redis.
//! An admin update on one instance is served by the other within the catalog class's `l1_max_stale`; an
//! order sent to one instance and retried on the other with the same `Idempotency-Key` is stored once
//! and the retry is a replay; the worker process writes the order's notification.
//!
//! The instances share the session secret through `<db>.session-secret` (so a cookie from A is valid on
//! B); the admin token comes from `STOREFRONT_ADMIN_TOKEN`, as a fleet sets it. Every child process is
//! killed when the test ends, passing or not.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http::StatusCode;
use keyward_testkit::RedisServer;
use serde_json::{Value, json};
use storefront::catalog::PRODUCT_CLASS;

use crate::util::HttpClient;

const ADMIN_TOKEN: &str = "processes-admin-token-0123456789";

/// One `storefront` process; its stdout is read line by line on a thread. Dropping it kills and reaps it.
struct Storefront {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    printed: Vec<String>,
}

impl Storefront {
    /// `storefront ARGS --db DB` with `REDIS_URL=redis`.
    fn spawn(name: &'static str, args: &[&str], db: &Path, redis: &str) -> Storefront {
        Self::spawn_env(name, args, db, redis, &[])
    }

    /// [`spawn`](Self::spawn) with `env` set too (`KEYWARD_ENV` and `KEYWARD_APP` are removed unless given).
    fn spawn_env(
        name: &'static str,
        args: &[&str],
        db: &Path,
        redis: &str,
        env: &[(&str, &str)],
    ) -> Storefront {
        let mut child = Command::new(env!("CARGO_BIN_EXE_storefront"))
            .args(args)
            .env_remove("KEYWARD_ENV")
            .env_remove("KEYWARD_APP")
            .envs(env.iter().copied())
            .arg("--db")
            .arg(db)
            .env("REDIS_URL", redis)
            .env("STOREFRONT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("STOREFRONT_SESSION_SECRETS")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("run the storefront binary ({name}): {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Until the process exits, even once nobody listens: a closed pipe would be an EPIPE.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Storefront {
            name,
            child,
            lines,
            printed: Vec::new(),
        }
    }

    /// The first line containing `needle` (waiting at most `within`).
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => self.printed.push(line),
                Err(_) => panic!(
                    "{}: no line with {needle:?} within {within:?}; exit status {:?}; printed {:?}",
                    self.name,
                    self.child.try_wait(),
                    self.printed
                ),
            }
        }
    }

    /// Waits for the shop's URL line and returns the URL (`http://127.0.0.1:PORT`).
    fn url(&mut self) -> String {
        let line = self.wait_for("the shop is at ", Duration::from_secs(60));
        let url = line
            .split("the shop is at ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{}: {line}", self.name));
        url.trim_end_matches('/').to_owned()
    }
}

impl Drop for Storefront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on `shop` until `fresh` holds, asserting that every read that *started* more than `bound`
/// after `written` (when the write's answer arrived) sees it. Returns how long after the write it was
/// first seen.
async fn until_fresh(
    shop: &mut HttpClient,
    path: &str,
    written: Instant,
    bound: Duration,
    fresh: impl Fn(&Value) -> bool,
) -> Duration {
    let deadline = written + bound + Duration::from_secs(5);
    loop {
        let started = Instant::now();
        let body = shop.get_ok(path).await;
        if fresh(&body) {
            return started.saturating_duration_since(written);
        }
        assert!(
            started <= written + bound,
            "{path}: a read that started {:?} after the write still saw the old value (bound {bound:?}): {body}",
            started - written
        );
        assert!(Instant::now() < deadline, "{path}: never saw the write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_and_a_worker_process_share_one_redis() {
    let redis = RedisServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");

    // A imports Northwind and writes the session secret; B and the worker start on what it made.
    let mut a = Storefront::spawn(
        "instance A",
        &[
            "--addr",
            "127.0.0.1:0",
            "--no-worker",
            "--restock-every",
            "0",
        ],
        &db,
        &redis.url(),
    );
    let a_url = a.url();
    let mut b = Storefront::spawn(
        "instance B",
        &[
            "--addr",
            "127.0.0.1:0",
            "--no-worker",
            "--restock-every",
            "0",
        ],
        &db,
        &redis.url(),
    );
    let b_url = b.url();
    let mut worker = Storefront::spawn("worker", &["worker"], &db, &redis.url());
    worker.wait_for("order worker running", Duration::from_secs(60));
    assert_ne!(a_url, b_url);
    let mut on_a = HttpClient::new(&a_url);
    let mut on_b = HttpClient::new(&b_url);

    // An admin update on A is served by B within the bound (B had the product in its L1).
    let bound = storefront::policy()
        .unwrap()
        .class(PRODUCT_CLASS)
        .and_then(|c| c.as_cache())
        .map(|c| c.l1_max_stale_value())
        .unwrap();
    let detail = "/products/3";
    let page = "/categories/2/products?per_page=30";
    let price_in_page = |body: &Value| {
        body["products"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == json!(3))
            .unwrap()["price_cents"]
            .clone()
    };
    for _ in 0..3 {
        assert_eq!(on_b.get_ok(detail).await["price_cents"], json!(1000));
        assert_eq!(price_in_page(&on_b.get_ok(page).await), json!(1000));
    }
    let answer = on_a
        .patch_product(3, json!({ "price_cents": 1099 }), ADMIN_TOKEN)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let written = Instant::now();
    let seen = until_fresh(&mut on_b, detail, written, bound, |p| {
        p["price_cents"] == json!(1099)
    })
    .await;
    until_fresh(&mut on_b, page, written, bound, |p| {
        price_in_page(p) == json!(1099)
    })
    .await;
    eprintln!("processes: B saw A's update {seen:?} after it returned (bound {bound:?})");

    // One order, sent to A and retried on B with the same key and session: stored once, replayed.
    let sqlite = rusqlite::Connection::open(&db).unwrap();
    let stock = |product: i64| -> i64 {
        sqlite
            .query_row("SELECT stock FROM products WHERE id = ?1", [product], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let stock_before = stock(1);
    on_a.login("ALFKI").await;
    on_b.cookie.clone_from(&on_a.cookie);
    let first = on_a.order("processes-1", &[(1, 2)]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let retry = on_b.order("processes-1", &[(1, 2)]).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(
        retry
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..]),
        "B replayed A's answer: {:?}",
        retry.headers
    );
    assert_eq!(retry.body, first.body);
    let order_id = first.body["id"].as_i64().expect("the order's id");
    let web_orders: i64 = sqlite
        .query_row(
            "SELECT count(*) FROM orders WHERE customer_id = 'ALFKI' AND origin = 'web'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(web_orders, 1, "the order is stored once");
    assert_eq!(stock(1), stock_before - 2, "the stock is taken once");

    // The worker process (the instances run none) writes the order's confirmation.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notifications: i64 = sqlite
            .query_row(
                "SELECT count(*) FROM notifications WHERE order_id = ?1",
                [order_id],
                |r| r.get(0),
            )
            .unwrap();
        if notifications == 1 {
            break;
        }
        assert_eq!(notifications, 0);
        assert!(
            Instant::now() < deadline,
            "the worker process wrote no notification for order {order_id} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let units: i64 = sqlite
        .query_row(
            "SELECT units FROM product_popularity WHERE product_id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(units, 2, "the popularity counts the order once");
}

/// `KEYWARD_ENV` / `KEYWARD_APP` pick the shop's namespace, as they do for the `keyward` CLI: an operator's
/// `KEYWARD_ENV=stage keyward invalidate …` must act on the keys the shop running with `KEYWARD_ENV=stage`
/// writes. (The shop used to ignore them and write `dev:storefront:…` whatever they said.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyward_env_and_app_pick_the_namespace_of_every_key() {
    let redis = RedisServer::spawn();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    let mut shop = Storefront::spawn_env(
        "staged shop",
        &["--addr", "127.0.0.1:0", "--restock-every", "0"],
        &db,
        &redis.url(),
        &[("KEYWARD_ENV", "stage"), ("KEYWARD_APP", "shop-eu")],
    );
    let url = shop.url();
    let mut http = HttpClient::new(&url);
    assert_eq!(http.get_ok("/products/3").await["id"], json!(3));
    assert!(http.get_ok("/categories/2/products").await["products"].is_array());

    let mut conn = redis.connection();
    let keys: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("COUNT")
        .arg(100_000)
        .clone()
        .iter(&mut conn)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("stage:shop-eu:catalog_product:")),
        "no product entry under stage:shop-eu: {keys:?}"
    );
    let elsewhere: Vec<&String> = keys
        .iter()
        .filter(|k| !k.starts_with("stage:shop-eu:"))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "keys outside stage:shop-eu: {elsewhere:?}"
    );
}
