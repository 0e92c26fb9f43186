//! `POST /orders` and `/me/orders` through the router: one order per key and customer, stock checked and
//! taken in one transaction, the catalog invalidated after the write (the detail by key, the category's
//! pages only at stock 0), `order.placed` published, and personal data never in the shared cache.

use http::{Method, StatusCode, header};
use keyward_testkit::RedisServer;
use serde_json::{Value, json};
use storefront::orders::{ORDER_EVENTS_CLASS, OrderEvent};

use crate::util::{Client, DbDir, Shop};

fn stock(dir: &DbDir, product: i64) -> i64 {
    dir.sqlite()
        .query_row("SELECT stock FROM products WHERE id = ?1", [product], |r| {
            r.get(0)
        })
        .unwrap()
}

fn web_orders(dir: &DbDir) -> i64 {
    dir.sqlite()
        .query_row(
            "SELECT COUNT(*) FROM orders WHERE origin = 'web'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn an_order_runs_once_per_key_and_customer() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let before = stock(&dir, 1);

    let mut anonymous = Client::at("192.0.2.10");
    let refused = anonymous.order(&shop, "k-1", &[(1, 2)]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);

    let mut alfki = Client::at("192.0.2.11");
    alfki.login(&shop, "ALFKI").await;
    let no_key = alfki
        .send(
            &shop,
            Method::POST,
            "/orders",
            json!({"lines": [{"product_id": 1, "quantity": 2}]}),
            &[],
        )
        .await;
    assert_eq!(no_key.status, StatusCode::BAD_REQUEST);

    let first = alfki.order(&shop, "k-1", &[(1, 2)]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["customer_id"], json!("ALFKI"));
    assert_eq!(first.body["origin"], json!("web"));
    let price: i64 = dir
        .sqlite()
        .query_row("SELECT price_cents FROM products WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(first.body["total_cents"], json!(2 * price));
    assert_eq!(stock(&dir, 1), before - 2);

    // The retry gets the stored answer; nothing is written again.
    let retry = alfki.order(&shop, "k-1", &[(1, 2)]).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.body, first.body);
    assert_eq!((stock(&dir, 1), web_orders(&dir)), (before - 2, 1));

    // The same key for another order is refused; another key is another order.
    let reused = alfki.order(&shop, "k-1", &[(1, 3)]).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let second = alfki.order(&shop, "k-2", &[(1, 1)]).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_ne!(second.body["id"], first.body["id"]);

    // Keys are per customer: ANATR's k-1 is ANATR's own order, from a new login.
    let mut anatr = Client::at("192.0.2.12");
    anatr.login(&shop, "ANATR").await;
    let theirs = anatr.order(&shop, "k-1", &[(1, 2)]).await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert!(theirs.headers.get("idempotent-replayed").is_none());
    assert_eq!(theirs.body["customer_id"], json!("ANATR"));
    // And ALFKI's retry from another device (a new session) still gets the replay.
    let mut tablet = Client::at("192.0.2.13");
    tablet.login(&shop, "ALFKI").await;
    let replay = tablet.order(&shop, "k-1", &[(1, 2)]).await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body, first.body);
    assert_eq!((stock(&dir, 1), web_orders(&dir)), (before - 5, 3));

    // Each committed order published one order.placed, with its lines.
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap()
        .range(None, 100)
        .await
        .unwrap();
    let ids: Vec<i64> = events
        .iter()
        .map(|(_, e)| e.placed().unwrap().order_id)
        .collect();
    let expected: Vec<i64> = [&first, &second, &theirs]
        .iter()
        .map(|a| a.body["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(events[0].1.placed().unwrap().lines, vec![(1, 2)]);
}

#[tokio::test]
async fn stock_is_checked_and_taken_in_one_transaction() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let (status, _) = shop.patch_product(4, json!({"stock": 3})).await;
    assert_eq!(status, StatusCode::OK);
    let other = stock(&dir, 6);
    let mut client = Client::at("192.0.2.20");
    client.login(&shop, "ALFKI").await;

    // Too many of product 4 after enough of product 6: nothing of the order is written.
    let refused = client.order(&shop, "too-many", &[(6, 1), (4, 5)]).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(
        (stock(&dir, 4), stock(&dir, 6), web_orders(&dir)),
        (3, other, 0)
    );

    for body in [
        json!({"lines": []}),
        json!({"lines": [{"product_id": 4, "quantity": 0}]}),
        json!({"lines": [{"product_id": 4, "quantity": 1}, {"product_id": 4, "quantity": 1}]}),
    ] {
        let key = format!("bad-{}", body.to_string().len());
        let answer = client
            .send(
                &shop,
                Method::POST,
                "/orders",
                body.clone(),
                &[("idempotency-key", &key)],
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let unknown = client.order(&shop, "unknown", &[(9999, 1)]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Racing orders for the last 3 units: exactly 3 succeed, none oversells.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut racer = client.clone();
        let app = Shop {
            state: shop.state.clone(),
            app: shop.app.clone(),
        };
        tasks.push(tokio::spawn(async move {
            racer
                .order(&app, &format!("race-{i}"), &[(4, 1)])
                .await
                .status
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("{other}"),
        }
    }
    assert_eq!((created, stock(&dir, 4), web_orders(&dir)), (3, 0, 3));
}

#[tokio::test]
async fn an_order_invalidates_the_detail_by_key_and_the_pages_only_at_stock_zero() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let (status, _) = shop.patch_product(7, json!({"stock": 4})).await;
    assert_eq!(status, StatusCode::OK);
    let category = shop.get_ok("/products/7").await["category_id"]
        .as_i64()
        .unwrap();
    let page = format!("/categories/{category}/products?per_page=30");
    let in_stock = |body: &Value| {
        body["products"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == json!(7))
            .map(|p| p["in_stock"].clone())
    };
    assert_eq!(in_stock(&shop.get_ok(&page).await), Some(json!(true)));
    assert_eq!(shop.get_ok("/products/7").await["stock"], json!(4));

    let mut client = Client::at("192.0.2.30");
    client.login(&shop, "ALFKI").await;
    assert_eq!(
        client.order(&shop, "a", &[(7, 1)]).await.status,
        StatusCode::CREATED
    );
    // The detail shows the new stock; the page was not invalidated (no database query to serve it).
    assert_eq!(shop.get_ok("/products/7").await["stock"], json!(3));
    let queries = shop.state.db.queries();
    assert_eq!(in_stock(&shop.get_ok(&page).await), Some(json!(true)));
    assert_eq!(
        shop.state.db.queries(),
        queries,
        "the page came from the cache"
    );

    // The last 3 units: the page is invalidated and shows the product out of stock.
    assert_eq!(
        client.order(&shop, "b", &[(7, 3)]).await.status,
        StatusCode::CREATED
    );
    assert_eq!(shop.get_ok("/products/7").await["stock"], json!(0));
    assert_eq!(in_stock(&shop.get_ok(&page).await), Some(json!(false)));
}

/// `/me/orders` lists the customer's orders from SQLite, and no key of the store holds them.
async fn my_orders_stay_out_of_the_cache(shop: &Shop, dir: &DbDir) {
    let mut client = Client::at("192.0.2.40");
    assert_eq!(
        client.get(shop, "/me/orders").await.status,
        StatusCode::UNAUTHORIZED
    );
    client.login(shop, "ALFKI").await;
    let placed = client.order(shop, "mine", &[(2, 1), (3, 2)]).await;
    assert_eq!(placed.status, StatusCode::CREATED);

    for _ in 0..3 {
        let mine = client.get(shop, "/me/orders").await;
        assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
        assert_eq!(mine.headers[header::CACHE_CONTROL], "private, no-store");
        let orders = mine.body["orders"].as_array().unwrap();
        let count: i64 = dir
            .sqlite()
            .query_row(
                "SELECT COUNT(*) FROM orders WHERE customer_id = 'ALFKI'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orders.len() as i64, count);
        assert!(orders.iter().all(|o| o["customer_id"] == json!("ALFKI")));
        assert_eq!(orders[0], placed.body, "the newest first");
        assert!(orders.iter().any(|o| o["origin"] == json!("northwind")));
    }
    // Each request read SQLite.
    let queries = shop.state.db.queries();
    client.get(shop, "/me/orders").await;
    assert_eq!(shop.state.db.queries(), queries + 1);

    let keys = shop.state.kw.scan_namespace().await.unwrap();
    assert!(!keys.is_empty(), "the scan sees the store's keys");
    for key in &keys {
        assert!(!key.key.contains("my_orders"), "{}", key.key);
        if key.key.contains(":catalog_") {
            assert!(!key.key.contains("ALFKI"), "{}", key.key);
        }
    }
}

#[tokio::test]
async fn my_orders_on_the_embedded_backend() {
    let dir = DbDir::new();
    my_orders_stay_out_of_the_cache(&Shop::embedded(&dir).await, &dir).await;
}

#[tokio::test]
async fn my_orders_on_redis() {
    let redis = RedisServer::spawn();
    let dir = DbDir::new();
    let shop = Shop::on_redis(&dir, &redis.url()).await;
    my_orders_stay_out_of_the_cache(&shop, &dir).await;
    // And orders replay across requests on Redis too.
    let mut client = Client::at("192.0.2.41");
    client.login(&shop, "ANATR").await;
    let first = client.order(&shop, "r-1", &[(1, 1)]).await;
    let again = client.order(&shop, "r-1", &[(1, 1)]).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(web_orders(&dir), 2);
}
