//! The nightly restock report: one report per night however runs interleave, a held lock skips the run,
//! and a write with an older fencing token than the newest stored is refused.

use axum::body::Body;
use http::{Request, StatusCode, header};
use keyward_testkit::RedisServer;
use serde_json::Value;
use storefront::restock::{self, RESTOCK_LOCK_CLASS, RESTOCK_LOCK_NAME, ReportWrite};

use crate::util::{ADMIN_TOKEN, DbDir, Shop, send};

/// `POST /admin/restock-report` with the admin token.
async fn run_report(shop: &Shop) -> (StatusCode, Value) {
    let request = Request::post("/admin/restock-report")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
        .body(Body::empty())
        .expect("a request");
    send(&shop.app, request).await
}

/// The rows of `restock_reports`: (night, fencing token, body).
fn reports(dir: &DbDir) -> Vec<(String, i64, String)> {
    let conn = dir.sqlite();
    let mut statement = conn
        .prepare("SELECT night, fencing_token, body FROM restock_reports ORDER BY night")
        .unwrap();
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Products the report must list: not discontinued, stock at or below the reorder level.
fn low_stock_ids(dir: &DbDir) -> Vec<i64> {
    let conn = dir.sqlite();
    let mut statement = conn
        .prepare(
            "SELECT id FROM products WHERE discontinued = 0 AND stock <= reorder_level ORDER BY id",
        )
        .unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Two concurrent runs (one per shop; the shops share the database and the store) leave exactly one
/// report, written by exactly one run, with that run's fencing token and the low-stock products.
async fn two_runs_write_one_report(a: &Shop, b: &Shop, dir: &DbDir) {
    let ((status_a, body_a), (status_b, body_b)) = tokio::join!(run_report(a), run_report(b));
    assert_eq!(status_a, StatusCode::OK, "{body_a}");
    assert_eq!(status_b, StatusCode::OK, "{body_b}");
    let written: Vec<&Value> = [&body_a, &body_b]
        .into_iter()
        .filter(|b| b["outcome"] == "written")
        .collect();
    assert_eq!(written.len(), 1, "one run writes: {body_a} / {body_b}");
    for body in [&body_a, &body_b] {
        let outcome = body["outcome"].as_str().unwrap();
        assert!(
            ["written", "skipped", "already_done"].contains(&outcome),
            "{body}"
        );
    }
    let rows = reports(dir);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (night, token, body) = &rows[0];
    assert_eq!(written[0]["night"], night.as_str());
    assert_eq!(written[0]["fencing_token"].as_i64(), Some(*token));
    let lines: Vec<Value> = serde_json::from_str(body).unwrap();
    let ids: Vec<i64> = lines
        .iter()
        .map(|l| l["product_id"].as_i64().unwrap())
        .collect();
    let expected = low_stock_ids(dir);
    assert!(!expected.is_empty(), "Northwind has products to reorder");
    assert_eq!(ids, expected);
    assert_eq!(written[0]["lines"].as_u64(), Some(expected.len() as u64));

    // A later run the same night writes nothing.
    let (_, again) = run_report(a).await;
    assert_eq!(again["outcome"], "already_done", "{again}");
    assert_eq!(reports(dir).len(), 1);
}

#[tokio::test]
async fn two_concurrent_runs_on_the_embedded_backend_write_one_report() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    two_runs_write_one_report(&shop, &shop, &dir).await;
}

#[tokio::test]
async fn two_instances_on_one_redis_write_one_report() {
    let redis = RedisServer::spawn();
    let dir = DbDir::new();
    let a = Shop::on_redis(&dir, &redis.url()).await;
    let b = Shop::on_redis(&dir, &redis.url()).await;
    two_runs_write_one_report(&a, &b, &dir).await;
}

#[tokio::test]
async fn a_held_lock_skips_the_run() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let locks = shop.state.kw.locks(RESTOCK_LOCK_CLASS).unwrap();
    let guard = locks
        .try_lock(RESTOCK_LOCK_NAME)
        .await
        .unwrap()
        .expect("the lock is free");
    let (status, body) = run_report(&shop).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"], "skipped", "{body}");
    assert!(reports(&dir).is_empty());

    assert!(guard.release().await.unwrap());
    let (_, body) = run_report(&shop).await;
    assert_eq!(body["outcome"], "written", "{body}");
}

#[tokio::test]
async fn a_stale_fencing_token_is_refused() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    // A holder that got its token first, then stalled past its lease …
    let locks = shop.state.kw.locks(RESTOCK_LOCK_CLASS).unwrap();
    let stalled = locks.try_lock(RESTOCK_LOCK_NAME).await.unwrap().unwrap();
    let old_token = stalled.fence();
    assert!(stalled.release().await.unwrap());
    // … while a newer holder ran the job.
    let (_, body) = run_report(&shop).await;
    assert_eq!(body["outcome"], "written", "{body}");
    let newest = body["fencing_token"].as_u64().unwrap();
    assert!(newest > old_token);

    // The stalled holder's late write is refused, for tonight and for any other night.
    for night in ["2026-01-01", body["night"].as_str().unwrap(), "2099-12-31"] {
        let outcome = restock::write_report(&shop.state.db, night, old_token, "[]")
            .await
            .unwrap();
        assert_eq!(outcome, ReportWrite::Stale { newest }, "{night}");
    }
    let rows = reports(&dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, newest as i64);
    // A newer token for another night is written.
    let outcome = restock::write_report(&shop.state.db, "2099-12-31", newest + 1, "[]")
        .await
        .unwrap();
    assert_eq!(outcome, ReportWrite::Written);
    assert_eq!(reports(&dir).len(), 2);
}

#[tokio::test]
async fn the_route_needs_the_admin_token() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let request = Request::post("/admin/restock-report")
        .body(Body::empty())
        .unwrap();
    let (status, _) = send(&shop.app, request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(reports(&dir).is_empty());
}
