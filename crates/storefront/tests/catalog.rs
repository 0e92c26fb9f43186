//! The catalog through the router: answers match SQLite, repeated reads are served without SQLite, and
//! admin writes are visible on the next read.

use http::StatusCode;
use serde_json::{Value, json};

use crate::util::{DbDir, Shop};

/// `(id, name, price_cents, stock)` of category `category`'s published products, by id, from SQLite.
fn published_in(conn: &rusqlite::Connection, category: i64) -> Vec<(i64, String, i64, i64)> {
    conn.prepare("SELECT id, name, price_cents, stock FROM products WHERE category_id = ?1 AND published = 1 ORDER BY id")
        .unwrap()
        .query_map([category], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn catalog_responses_match_sqlite() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let conn = dir.sqlite();

    let categories = shop.get_ok("/categories").await;
    let categories = categories.as_array().expect("a list");
    let expected: Vec<(i64, String, String)> = conn
        .prepare("SELECT id, name, description FROM categories ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(categories.len(), expected.len());
    for (got, (id, name, description)) in categories.iter().zip(&expected) {
        assert_eq!(got["id"], json!(id));
        assert_eq!(got["name"], json!(name));
        assert_eq!(got["description"], json!(description));
        assert_eq!(got["product_count"], json!(published_in(&conn, *id).len()));
    }

    // Every category, paged 5 at a time: the pages put together are exactly its published products.
    for (category, name, _) in &expected {
        let rows = published_in(&conn, *category);
        let mut seen = Vec::new();
        for page in 1.. {
            let body = shop
                .get_ok(&format!(
                    "/categories/{category}/products?page={page}&per_page=5"
                ))
                .await;
            assert_eq!(body["category_name"], json!(name));
            assert_eq!(body["total"], json!(rows.len()));
            let products = body["products"].as_array().unwrap();
            assert!(products.len() <= 5);
            seen.extend(products.iter().cloned());
            if seen.len() >= rows.len() {
                let (status, _) = shop
                    .get(&format!(
                        "/categories/{category}/products?page={}&per_page=5",
                        page + 1
                    ))
                    .await;
                assert_eq!(status, StatusCode::NOT_FOUND, "a page past the last");
                break;
            }
        }
        assert_eq!(seen.len(), rows.len(), "category {category}");
        for (got, (id, name, price, stock)) in seen.iter().zip(&rows) {
            assert_eq!(got["id"], json!(id));
            assert_eq!(got["name"], json!(name));
            assert_eq!(got["price_cents"], json!(price));
            assert_eq!(got["in_stock"], json!(*stock > 0));
        }
    }

    // Every product's detail.
    let products: Vec<(i64, String, i64, i64, String, String)> = conn
        .prepare(
            "SELECT p.id, p.name, p.price_cents, p.stock, c.name, s.company_name FROM products p \
             JOIN categories c ON c.id = p.category_id JOIN suppliers s ON s.id = p.supplier_id ORDER BY p.id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(products.len(), 77);
    for (id, name, price, stock, category, supplier) in &products {
        let got = shop.get_ok(&format!("/products/{id}")).await;
        assert_eq!(
            (
                &got["name"],
                &got["price_cents"],
                &got["stock"],
                &got["category_name"],
                &got["supplier_name"]
            ),
            (
                &json!(name),
                &json!(price),
                &json!(stock),
                &json!(category),
                &json!(supplier)
            ),
            "product {id}"
        );
    }
    assert_eq!(shop.get("/products/78").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        shop.get("/categories/9/products").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_repeated_product_list_request_does_not_query_sqlite_again() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let db = &shop.state.db;
    let lists = shop.state.catalog.lists_cache();

    let before = db.queries();
    let first = shop
        .get_ok("/categories/2/products?page=1&per_page=10")
        .await;
    let after_first = db.queries();
    assert_eq!(
        after_first,
        before + 1,
        "the first request loads the page from SQLite"
    );

    for _ in 0..20 {
        let again = shop
            .get_ok("/categories/2/products?page=1&per_page=10")
            .await;
        assert_eq!(again, first);
    }
    assert_eq!(
        db.queries(),
        after_first,
        "repeated requests never reach SQLite"
    );
    let stats = lists.stats();
    assert_eq!(stats.loader_calls, 1);
    assert!(
        stats.l1_hits >= 20,
        "served from the in-process tier: {stats:?}"
    );

    // The same for a product's detail and the categories list.
    shop.get_ok("/products/7").await;
    shop.get_ok("/categories").await;
    let warm = db.queries();
    for _ in 0..10 {
        shop.get_ok("/products/7").await;
        shop.get_ok("/categories").await;
    }
    assert_eq!(db.queries(), warm);
}

#[tokio::test]
async fn an_admin_update_is_visible_on_the_next_read() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let conn = dir.sqlite();
    let page = "/categories/1/products?per_page=30";
    let in_page = |body: &Value, id: i64| -> Option<Value> {
        body["products"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == json!(id))
            .cloned()
    };

    // Warm every cache, twice, so the next reads would be hits.
    for _ in 0..2 {
        shop.get_ok("/products/1").await;
        shop.get_ok(page).await;
        shop.get_ok("/categories").await;
    }

    // Price: SQLite first, then the tags; the detail and the page show it at once.
    let (status, written) = shop.patch_product(1, json!({ "price_cents": 2150 })).await;
    assert_eq!(status, StatusCode::OK, "{written}");
    assert_eq!(written["price_cents"], json!(2150));
    let stored: i64 = conn
        .query_row("SELECT price_cents FROM products WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, 2150);
    assert_eq!(shop.get_ok("/products/1").await["price_cents"], json!(2150));
    assert_eq!(
        in_page(&shop.get_ok(page).await, 1).unwrap()["price_cents"],
        json!(2150)
    );

    // Stock to zero: out of stock in the list, 0 in the detail.
    let (status, _) = shop.patch_product(1, json!({ "stock": 0 })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shop.get_ok("/products/1").await["stock"], json!(0));
    assert_eq!(
        in_page(&shop.get_ok(page).await, 1).unwrap()["in_stock"],
        json!(false)
    );

    // Unpublish: gone from the detail, the page and the category's count; publish brings it back.
    let count = |body: &Value| body.as_array().unwrap()[0]["product_count"].clone();
    let before = count(&shop.get_ok("/categories").await);
    let (status, _) = shop.patch_product(1, json!({ "published": false })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shop.get("/products/1").await.0, StatusCode::NOT_FOUND);
    let listed = shop.get_ok(page).await;
    assert!(in_page(&listed, 1).is_none(), "{listed}");
    assert_eq!(listed["total"], json!(before.as_i64().unwrap() - 1));
    assert_eq!(
        count(&shop.get_ok("/categories").await),
        json!(before.as_i64().unwrap() - 1)
    );

    let (status, _) = shop
        .patch_product(1, json!({ "published": true, "stock": 12 }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let product = shop.get_ok("/products/1").await;
    assert_eq!(
        (&product["stock"], &product["published"]),
        (&json!(12), &json!(true))
    );
    assert_eq!(count(&shop.get_ok("/categories").await), before);
    assert_eq!(
        in_page(&shop.get_ok(page).await, 1).unwrap()["in_stock"],
        json!(true)
    );
}

#[tokio::test]
async fn admin_writes_need_the_token_and_valid_values() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let conn = dir.sqlite();
    let price = || -> i64 {
        conn.query_row("SELECT price_cents FROM products WHERE id = 2", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let original = price();

    let body = json!({ "price_cents": 1 });
    assert_eq!(
        shop.patch_product_as(2, body.clone(), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        shop.patch_product_as(2, body.clone(), Some("not-the-admin-token-at-all"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` works as `Bearer` does.
    let lower = format!("bearer {}", crate::util::ADMIN_TOKEN);
    let answer = crate::util::Client::at("192.0.2.77")
        .send(
            &shop,
            http::Method::PATCH,
            "/admin/products/2",
            json!({ "price_cents": original }),
            &[("authorization", lower.as_str())],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    for bad in [
        json!({ "price_cents": -1 }),
        json!({ "stock": -5 }),
        json!({}),
        json!({ "price": 10 }),
        json!({ "price_cents": "ten" }),
    ] {
        let (status, problem) = shop.patch_product(2, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
    }
    assert_eq!(
        shop.patch_product(999, json!({ "stock": 1 })).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(price(), original, "nothing was written");

    // A shop without an admin token refuses everyone.
    let mut state = shop.state.clone();
    state.admin_token = None;
    let locked = Shop {
        app: storefront::app(state.clone()),
        state,
    };
    assert_eq!(
        locked.patch_product(2, body).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn bad_requests_and_health() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    for path in [
        "/categories/1/products?page=0",
        "/categories/1/products?per_page=0",
        "/categories/1/products?per_page=31",
        "/categories/1/products?page=abc",
    ] {
        let (status, problem) = shop.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {problem}");
        assert_eq!(problem["type"], json!("about:blank"));
    }
    assert_eq!(
        shop.get("/categories/1/products?page=99").await.0,
        StatusCode::NOT_FOUND
    );

    let health = shop.get_ok("/healthz").await;
    assert_eq!(health["status"], json!("ok"));
    // It names the database it serves, as the file holds it (what `storefront replay` compares).
    let id: String = dir
        .sqlite()
        .query_row("SELECT id FROM database_identity", [], |r| r.get(0))
        .unwrap();
    assert_eq!(health["database_id"], json!(id));
    assert_eq!(shop.state.db.id(), id);
    let (status, index) = shop.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(index.as_str().unwrap().contains("/categories"));
}

/// Trial finding (issue #15): a malformed path parameter answered axum's plain-text rejection. Every
/// route with a path parameter now answers problem+json like the shop's other errors: `400`, a `detail`
/// naming the parameter and quoting the value (cut when long).
#[tokio::test]
async fn malformed_path_parameters_answer_problem_json_naming_the_parameter() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let long = "x".repeat(500);
    let cases = [
        (http::Method::GET, "/products/abc".to_owned(), "\"abc\""),
        (
            http::Method::GET,
            "/categories/x/products".to_owned(),
            "\"x\"",
        ),
        (
            http::Method::GET,
            "/categories/1.5/products?page=2".to_owned(),
            "\"1.5\"",
        ),
        (
            http::Method::PATCH,
            "/admin/products/abc".to_owned(),
            "\"abc\"",
        ),
        // Too large for an id, and percent-decoded before it is quoted.
        (
            http::Method::GET,
            "/products/99999999999999999999".to_owned(),
            "\"99999999999999999999\"",
        ),
        (http::Method::GET, "/products/a%20b".to_owned(), "\"a b\""),
        (http::Method::GET, format!("/products/{long}"), "…\""),
    ];
    for (method, path, quoted) in cases {
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", crate::util::ADMIN_TOKEN),
            );
        let body = if method == http::Method::PATCH {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
            axum::body::Body::from(r#"{"stock": 1}"#)
        } else {
            axum::body::Body::empty()
        };
        let answer = crate::util::send_full(&shop.app, request.body(body).unwrap()).await;
        let what = format!("{method} {path}: {}", answer.body);
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(
            answer.headers[http::header::CONTENT_TYPE],
            "application/problem+json",
            "{what}"
        );
        assert_eq!(answer.body["type"], json!("about:blank"), "{what}");
        assert_eq!(answer.body["status"], json!(400), "{what}");
        assert_eq!(answer.body["title"], json!("Bad Request"), "{what}");
        let detail = answer.body["detail"].as_str().expect("a detail");
        assert!(
            detail.contains("`id`") && detail.contains("whole number") && detail.contains(quoted),
            "{what}"
        );
        assert!(detail.len() < 200, "a long value is cut: {what}");
    }
    // A well-formed id still reaches the handler: 404 for an unknown product, as before.
    assert_eq!(shop.get("/products/100000").await.0, StatusCode::NOT_FOUND);
    // Adversarial trial: the admin route checks who asks before the path, so without the token a
    // malformed path answers 401 like any other (it answered 400, telling an anonymous caller more).
    let request = http::Request::builder()
        .method(http::Method::PATCH)
        .uri("/admin/products/abc")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(r#"{"stock": 1}"#))
        .unwrap();
    let answer = crate::util::send_full(&shop.app, request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
}
