//! `/metrics`: `503` without a recorder; with one, keyward's series and the shop's own after traffic.
//!
//! No test installs a global recorder (many apps share this process): the recorder is the thread's
//! default while the shop is built and used (`#[tokio::test]` runs everything on one thread).

use http::{StatusCode, header};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;

use crate::util::{Client, DbDir, Shop, config};

/// `GET /metrics`: status and text.
async fn scrape(shop: &Shop) -> (StatusCode, String, String) {
    let mut client = Client::at("192.0.2.90");
    let answer = client.get(shop, "/metrics").await;
    let text = match answer.body {
        Value::String(text) => text,
        other => panic!("not text: {other}"),
    };
    let content_type = answer.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    (answer.status, content_type, text)
}

/// The value of the series `line_start` (name and labels as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn without_a_recorder_metrics_answer_503() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let (status, content_type, text) = scrape(&shop).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(text.contains("no metrics recorder"), "{text}");
}

#[tokio::test]
async fn metrics_show_keyward_and_storefront_series_after_traffic() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);

    let dir = DbDir::new();
    let (mut state, _) = storefront::start(config(&dir))
        .await
        .expect("the shop starts");
    state.metrics = Some(handle);
    let shop = Shop {
        app: storefront::app(state.clone()),
        state,
    };

    let (status, content_type, before) = scrape(&shop).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    // keyward registers its counters with its handles: present, at 0, before any traffic.
    assert_eq!(
        value(
            &before,
            r#"keyward_cache_misses_total{class="catalog_product"}"#
        ),
        Some(0.0),
        "{before}"
    );

    // Traffic: a product twice (a miss, then a hit), the categories, a login.
    for _ in 0..2 {
        shop.get_ok("/products/1").await;
    }
    shop.get_ok("/categories").await;
    let mut client = Client::at("192.0.2.91");
    client.login(&shop, "ALFKI").await;
    let queries_before = value(&before, "storefront_db_queries_total").unwrap_or(0.0);

    let (status, _, text) = scrape(&shop).await;
    assert_eq!(status, StatusCode::OK);
    let series = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
    assert_eq!(
        series(r#"keyward_cache_misses_total{class="catalog_product"}"#),
        1.0
    );
    assert!(series(r#"keyward_cache_hits_total{class="catalog_product"}"#) >= 1.0);
    assert_eq!(
        series(r#"keyward_cache_loader_calls_total{class="catalog_product"}"#),
        1.0
    );
    assert!(series(r#"keyward_ratelimit_allowed_total{class="login_per_ip"}"#) >= 1.0);
    assert_eq!(
        series(r#"keyward_session_created_total{class="web_session"}"#),
        1.0
    );
    assert_eq!(
        series(r#"storefront_requests_total{route="/products/{id}",method="GET",status="200"}"#),
        2.0
    );
    assert_eq!(
        series(r#"storefront_requests_total{route="/login",method="POST",status="200"}"#),
        1.0
    );
    // The product's second read came from the cache: the loads, not the requests, hit SQLite.
    assert!(series("storefront_db_queries_total") > queries_before);
    // A made-up method is counted as `other`: a client cannot add series at will.
    let foo = http::Method::from_bytes(b"FOO1").unwrap();
    client
        .send(&shop, foo, "/categories", Value::Null, &[])
        .await;
    let (_, _, text) = scrape(&shop).await;
    assert!(!text.contains("FOO1"), "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
    // The scrape that rendered `before` was counted too.
    assert!(
        series(r#"storefront_requests_total{route="/metrics",method="GET",status="200"}"#) >= 1.0
    );
}
