//! The storefront on a real redis-server: two instances, each with its own L1, sharing one SQLite file and
//! one Redis, where an admin update made on one is served by the other within the catalog classes'
//! `l1_max_stale`; and an instance whose Redis is gone, which keeps serving the catalog from SQLite.

use std::time::{Duration, Instant};

use http::StatusCode;
use keyward_testkit::RedisServer;
use serde_json::{Value, json};
use storefront::catalog::PRODUCT_CLASS;

use crate::util::{DbDir, Shop};

/// Reads `path` on `shop` until `fresh` holds, asserting that every read that *started* more than `bound`
/// after `written` (when the write returned) sees it. Returns how long after the write it was first seen.
async fn until_fresh(
    shop: &Shop,
    path: &str,
    written: Instant,
    bound: Duration,
    fresh: impl Fn(&Value) -> bool,
) -> Duration {
    let deadline = written + bound + Duration::from_secs(5);
    loop {
        let started = Instant::now();
        let (status, body) = shop.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        if fresh(&body) {
            return started.saturating_duration_since(written);
        }
        assert!(
            started <= written + bound,
            "{path}: a read that started {:?} after the write still saw the old value (bound {bound:?}): {body}",
            started - written
        );
        assert!(Instant::now() < deadline, "{path}: never saw the write");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_update_on_one_instance_is_seen_on_the_other_within_l1_max_stale() {
    let redis = RedisServer::spawn();
    let dir = DbDir::new();
    let a = Shop::on_redis(&dir, &redis.url()).await;
    let b = Shop::on_redis(&dir, &redis.url()).await;
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

    // B serves both from its L1.
    for _ in 0..3 {
        assert_eq!(b.get_ok(detail).await["price_cents"], json!(1000));
        assert_eq!(price_in_page(&b.get_ok(page).await), json!(1000));
    }
    let l1_hits = b.state.catalog.products_cache().stats().l1_hits;
    assert!(
        l1_hits >= 1,
        "B's reads were L1 hits: {:?}",
        b.state.catalog.products_cache().stats()
    );
    let b_queries = b.state.db.queries();

    // A changes the price (SQLite, then the tags), and B shows it within the bound.
    let (status, _) = a.patch_product(3, json!({ "price_cents": 1099 })).await;
    assert_eq!(status, StatusCode::OK);
    let written = Instant::now();
    let seen = until_fresh(&b, detail, written, bound, |p| {
        p["price_cents"] == json!(1099)
    })
    .await;
    until_fresh(&b, page, written, bound, |p| {
        price_in_page(p) == json!(1099)
    })
    .await;
    assert!(b.state.db.queries() > b_queries, "B reloaded from SQLite");
    eprintln!("two instances: B saw A's update {seen:?} after it returned (bound {bound:?})");

    // And back the other way: B unpublishes, A stops showing the product.
    let (status, _) = b.patch_product(3, json!({ "published": false })).await;
    assert_eq!(status, StatusCode::OK);
    let written = Instant::now();
    let deadline = written + bound + Duration::from_secs(5);
    loop {
        let started = Instant::now();
        let (status, _) = a.get(detail).await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            started <= written + bound,
            "A still served an unpublished product past the bound"
        );
        assert!(Instant::now() < deadline, "A never saw the unpublish");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn with_redis_gone_the_catalog_is_served_from_sqlite_and_health_says_503() {
    let mut redis = RedisServer::spawn();
    let dir = DbDir::new();
    let shop = Shop::on_redis(&dir, &redis.url()).await;
    assert_eq!(shop.get_ok("/products/4").await["price_cents"], json!(2200));
    assert_eq!(shop.get_ok("/healthz").await["status"], json!("ok"));

    redis.kill();
    // The catalog classes fail open: the loader answers from SQLite and nothing is stored. L1 stops
    // serving within l1_max_stale, so the answer is the database's, with a price written meanwhile.
    dir.sqlite()
        .execute("UPDATE products SET price_cents = 2300 WHERE id = 4", [])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = shop.get("/products/4").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["price_cents"] == json!(2300) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never answered from SQLite: {body}"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(shop.get("/categories/1/products").await.0, StatusCode::OK);

    // Health is honest about the store: 503 with Retry-After (keyward-axum's ApiError decides both).
    let request = http::Request::get("/healthz")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(shop.app.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key(http::header::RETRY_AFTER));
    // It says what is down: the store, not the database.
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["status"], json!("unavailable"), "{body}");
    assert_eq!(body["database"], json!("ok"), "{body}");
    assert_eq!(body["store"], json!("not answering"), "{body}");
    assert_eq!(body["database_id"], json!(shop.state.db.id()), "{body}");
    assert_eq!(body["backend"], json!("Redis"), "{body}");
}
