//! `/dashboard` (the embedded page) and `/dashboard/data` (its JSON): the shape, and numbers that move
//! with traffic.

use http::{StatusCode, header};
use keyward_testkit::RedisServer;
use serde_json::Value;

use crate::util::{Client, DbDir, Shop};

const CLASSES: [&str; 3] = [
    "catalog_categories",
    "catalog_product_list",
    "catalog_product",
];

fn class<'a>(data: &'a Value, name: &str) -> &'a Value {
    data["caches"]
        .as_array()
        .expect("caches is an array")
        .iter()
        .find(|c| c["class"] == name)
        .unwrap_or_else(|| panic!("no class {name} in {data}"))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test]
async fn the_page_is_self_contained_html_that_polls_the_data() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let answer = Client::at("192.0.2.70").get(&shop, "/dashboard").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let Value::String(html) = answer.body else {
        panic!("not text")
    };
    assert!(html.contains("/dashboard/data"), "the page polls the data");
    assert!(html.contains("<svg"), "charts are inline SVG");
    // No build step, no CDN: nothing is loaded from elsewhere.
    for external in ["http://", "https://", "<script src", "<link "] {
        assert!(!html.contains(external), "the page loads {external}");
    }
}

#[tokio::test]
async fn the_data_has_its_shape_and_moves_with_traffic() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;

    let before = shop.get_ok("/dashboard/data").await;
    assert_eq!(before["backend"], "Embedded", "{before}");
    assert_eq!(before["breaker"], "closed");
    for name in CLASSES {
        let c = class(&before, name);
        for field in ["hits", "l1_hits", "misses", "loader_calls"] {
            assert_eq!(num(&c[field]), 0, "{name}.{field} before traffic: {before}");
        }
        assert!(c["hit_ratio"].is_null() && c["l1_hit_ratio"].is_null());
    }
    assert_eq!(num(&before["db"]["queries_saved"]), 0);
    let queries_before = num(&before["db"]["queries"]);
    for field in ["allowed", "limited", "unavailable"] {
        assert_eq!(num(&before["login_limits"][field]), 0);
    }
    let stream = &before["stream"];
    assert_eq!(stream["available"], true, "{before}");
    assert_eq!(stream["class"], "order_events");
    assert_eq!(stream["group"], "notifier");
    assert_eq!(num(&stream["dead_letters"]), 0);

    // Traffic: one product read four times (one load, then hits from L1), one list page, logins until
    // the per-account limit refuses.
    for _ in 0..4 {
        shop.get_ok("/products/1").await;
    }
    shop.get_ok("/categories/1/products").await;
    let mut client = Client::at("192.0.2.71");
    let mut refused = 0;
    for _ in 0..6 {
        let answer = client.login_with(&shop, "ALFKI", "wrong password").await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert!(refused >= 1, "login_per_account allows 5 per window");

    let after = shop.get_ok("/dashboard/data").await;
    let product = class(&after, "catalog_product");
    assert_eq!(num(&product["misses"]), 1, "{after}");
    assert_eq!(num(&product["loader_calls"]), 1);
    assert_eq!(num(&product["hits"]), 3);
    assert_eq!(num(&product["l1_hits"]), 3, "the class has an L1 tier");
    assert_eq!(product["hit_ratio"].as_f64(), Some(0.75));
    assert_eq!(product["l1_hit_ratio"].as_f64(), Some(0.75));
    assert_eq!(num(&class(&after, "catalog_product_list")["misses"]), 1);
    assert_eq!(num(&after["db"]["queries_saved"]), 3);
    assert!(num(&after["db"]["queries"]) > queries_before);
    assert_eq!(num(&after["login_limits"]["allowed"]), 6 - refused);
    assert_eq!(num(&after["login_limits"]["limited"]), refused);
    assert_eq!(num(&after["login_limits"]["unavailable"]), 0);
}

#[tokio::test]
async fn the_data_answers_while_redis_is_down() {
    let mut redis = RedisServer::spawn();
    let dir = DbDir::new();
    let shop = Shop::on_redis(&dir, &redis.url()).await;
    let up = shop.get_ok("/dashboard/data").await;
    assert_eq!(up["backend"], "Redis", "{up}");
    assert_eq!(up["stream"]["available"], true, "{up}");

    redis.kill();
    let down = shop.get_ok("/dashboard/data").await;
    assert_eq!(down["stream"]["available"], false, "{down}");
    assert!(down["stream"]["pending"].is_null() && down["stream"]["dead_letters"].is_null());
    // The in-process figures are still there.
    assert!(
        down["caches"].as_array().is_some_and(|c| c.len() == 3),
        "{down}"
    );
    assert!(down["db"]["queries"].is_u64());
}
