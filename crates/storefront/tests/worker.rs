//! The order worker: an order leads to exactly one notification row and one popularity count, also when
//! the event is delivered again; a handler that keeps failing dead-letters the event after the class's
//! `max_deliveries`, and a replay once the fault is gone writes the notification.

use std::time::Duration;

use http::StatusCode;
use keyward::policy::Policy;
use keyward_testkit::RedisServer;
use storefront::orders::{ORDER_EVENTS_CLASS, OrderEvent};
use storefront::worker::NOTIFIER_GROUP;
use tokio::sync::oneshot;

use crate::util::{Client, DbDir, Shop, config, eventually};

/// The worker of `shop`, running until the returned sender is dropped or fired.
fn spawn_worker(
    shop: &Shop,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<keyward::Result<keyward::stream::WorkerReport>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let (kw, db) = (shop.state.kw.clone(), shop.state.db.clone());
    let task = tokio::spawn(async move {
        storefront::worker::run(&kw, db, async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

fn count(dir: &DbDir, sql: &str) -> i64 {
    dir.sqlite().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Place an order through the router and return its id.
async fn place(shop: &Shop, key: &str, lines: &[(i64, i64)]) -> i64 {
    let mut client = Client::at("192.0.2.50");
    client.login(shop, "ALFKI").await;
    let placed = client.order(shop, key, lines).await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.body);
    placed.body["id"].as_i64().unwrap()
}

async fn one_notification_per_order(shop: &Shop, dir: &DbDir) {
    let (stop, worker) = spawn_worker(shop);
    let order = place(shop, "w-1", &[(1, 2), (2, 1)]).await;
    let notified = format!("SELECT COUNT(*) FROM notifications WHERE order_id = {order}");
    eventually(
        Duration::from_secs(10),
        "the order's notification",
        || async { count(dir, &notified) == 1 },
    )
    .await;

    // The same event again (as after a worker died before its acknowledgement): nothing more is written.
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap();
    let (_, event) = events.range(None, 1).await.unwrap().remove(0);
    events.publish(&event).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the worker read everything",
        || async {
            events
                .group_info(NOTIFIER_GROUP)
                .await
                .unwrap()
                .is_some_and(|g| g.pending == 0 && g.lag == Some(0))
        },
    )
    .await;
    assert_eq!(count(dir, &notified), 1);
    assert_eq!(count(dir, "SELECT COUNT(*) FROM notifications"), 1);
    let body: String = dir
        .sqlite()
        .query_row(
            "SELECT body FROM notifications WHERE order_id = ?1",
            [order],
            |r| r.get(0),
        )
        .unwrap();
    assert!(body.contains(&order.to_string()), "{body}");
    // Popularity counted once.
    assert_eq!(
        count(
            dir,
            "SELECT orders * 1000 + units FROM product_popularity WHERE product_id = 1"
        ),
        1002
    );
    assert_eq!(count(dir, "SELECT COUNT(*) FROM product_popularity"), 2);

    let _ = stop.send(());
    let report = worker.await.unwrap().unwrap();
    assert_eq!(report.handled, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
}

#[tokio::test]
async fn an_order_writes_one_notification_on_the_embedded_backend() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    one_notification_per_order(&shop, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_writes_one_notification_on_redis() {
    let redis = RedisServer::spawn();
    let dir = DbDir::new();
    let shop = Shop::on_redis(&dir, &redis.url()).await;
    one_notification_per_order(&shop, &dir).await;
}

/// What the test's log subscriber wrote (tracing-subscriber's fmt layer, no colours).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The lines logged by the storefront's order worker.
    fn worker_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains("storefront: order worker"))
            .map(str::to_owned)
            .collect()
    }
}

/// Also a trial finding (issue #15): a failed delivery used to be logged only when the event was
/// dead-lettered. Each is now logged, `warn` while it will be retried and `error` on the last, with the
/// entry id, the delivery count and the error, and no personal data.
#[tokio::test]
async fn a_failing_handler_dead_letters_after_max_deliveries() {
    // This test runs on one thread (tokio's current-thread runtime), so a thread-local subscriber sees
    // the worker's handlers.
    let logs = Captured::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    // The shop's policy with a 10 ms backoff, so five deliveries take well under a second.
    let toml = storefront::POLICY_TOML.replace(
        r#"backoff = { base = "500ms", factor = 2, max = "1m", jitter = "20%" }"#,
        r#"backoff = { base = "10ms", factor = 2, max = "100ms", jitter = "20%" }"#,
    );
    assert_ne!(
        toml,
        storefront::POLICY_TOML,
        "the backoff line is in the policy"
    );
    let policy = Policy::from_toml_str(&toml).unwrap();
    let max_deliveries = policy
        .class(ORDER_EVENTS_CLASS)
        .and_then(|c| c.as_stream())
        .map(|s| u64::from(s.max_deliveries_value()))
        .unwrap();
    let dir = DbDir::new();
    let mut cfg = config(&dir);
    cfg.policy = policy;
    let shop = Shop::start(cfg).await;

    // The database refuses notifications: every delivery's handler fails.
    dir.sqlite()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON notifications \
             BEGIN SELECT RAISE(ABORT, 'notifications are down'); END;",
        )
        .unwrap();
    let (stop, worker) = spawn_worker(&shop);
    let order = place(&shop, "dl-1", &[(1, 1)]).await;
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the event is dead-lettered",
        || async { !events.dead_letters(10).await.unwrap().is_empty() },
    )
    .await;
    let dead = events.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].group, NOTIFIER_GROUP);
    assert_eq!(dead[0].deliveries, max_deliveries);
    assert!(
        dead[0].error.contains("notifications are down"),
        "{}",
        dead[0].error
    );
    let notified = format!("SELECT COUNT(*) FROM notifications WHERE order_id = {order}");
    assert_eq!(count(&dir, &notified), 0);

    // One line per failed delivery: `warn` for 1..max-1, `error` for the last, each with the entry id,
    // the order, its delivery count and the error.
    let lines = logs.worker_lines();
    assert_eq!(lines.len() as u64, max_deliveries, "{lines:#?}");
    for (n, line) in (1..=max_deliveries).zip(&lines) {
        let level = if n < max_deliveries {
            " WARN "
        } else {
            "ERROR "
        };
        assert!(line.contains(level), "delivery {n}: {line}");
        for field in [
            format!("entry={}", dead[0].id),
            format!("order={order}"),
            format!("deliveries={n}"),
            format!("max_deliveries={max_deliveries}"),
        ] {
            assert!(line.contains(&field), "delivery {n}, {field}: {line}");
        }
        assert!(line.contains("notifications are down"), "{line}");
    }
    assert!(
        lines.last().unwrap().contains("dead-lettered"),
        "{lines:#?}"
    );
    // Nothing personal: not the customer's id, company or contact name.
    let (company, contact): (String, String) = dir
        .sqlite()
        .query_row(
            "SELECT company_name, contact_name FROM customers WHERE id = 'ALFKI'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    for line in &lines {
        for personal in ["ALFKI", company.as_str(), contact.as_str()] {
            assert!(!line.contains(personal), "{personal} logged: {line}");
        }
    }

    // The fault is fixed: a replay of the dead letter writes the notification once.
    dir.sqlite().execute_batch("DROP TRIGGER refuse;").unwrap();
    let moved = events
        .replay_dead_letters(|_| true, 10, false)
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    eventually(
        Duration::from_secs(10),
        "the replayed event is handled",
        || async { count(&dir, &notified) == 1 },
    )
    .await;

    let _ = stop.send(());
    let report = worker.await.unwrap().unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.failed, max_deliveries, "{report:?}");
}

#[tokio::test]
async fn an_event_left_in_the_outbox_is_relayed_and_notified() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    // Embedded, a normal order keeps its outbox row until the worker handled its event (the stream lives
    // in this process); the handler deletes it (below).
    place(&shop, "o-1", &[(1, 1)]).await;
    assert_eq!(count(&dir, "SELECT COUNT(*) FROM order_outbox"), 1);

    // An order committed by a process that died before publishing: its row and its outbox row only.
    let conn = dir.sqlite();
    conn.execute_batch(
        "INSERT INTO orders (customer_id, order_date, freight_cents, ship_name, ship_address, ship_city, \
         ship_region, ship_postal_code, ship_country, origin) \
         VALUES ('ANATR', '2026-01-01 00:00:00.000', 0, 'n', 'a', 'c', '', 'p', 'x', 'web')",
    )
    .unwrap();
    let order = conn.last_insert_rowid();
    let event = serde_json::json!({
        "type": "order.placed", "order_id": order, "customer_id": "ANATR",
        "total_cents": 1800, "lines": [[1, 1]]
    });
    conn.execute(
        "INSERT INTO order_outbox (order_id, event, created_at) VALUES (?1, ?2, '2026-01-01 00:00:00.000')",
        rusqlite::params![order, event.to_string()],
    )
    .unwrap();

    // The worker's first relay pass (at start) publishes it; the handler notifies the customer.
    let (stop, worker) = spawn_worker(&shop);
    let notified = format!("SELECT COUNT(*) FROM notifications WHERE order_id = {order}");
    eventually(
        Duration::from_secs(10),
        "the relayed event's notification",
        || async { count(&dir, &notified) == 1 },
    )
    .await;
    // The relay deletes the row after its publish returned, which can be after the handler already ran.
    eventually(
        Duration::from_secs(10),
        "the relayed outbox row deleted",
        || async { count(&dir, "SELECT COUNT(*) FROM order_outbox") == 0 },
    )
    .await;
    // A fresh row is left alone (its request may still publish it): the relay honours the grace.
    conn.execute(
        "INSERT INTO order_outbox (order_id, event, created_at) \
         VALUES (?1, ?2, strftime('%Y-%m-%d %H:%M:%f', 'now'))",
        rusqlite::params![order, event.to_string()],
    )
    .unwrap();
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap();
    let relayed = storefront::orders::relay_outbox(
        &shop.state.db,
        &events,
        storefront::orders::OUTBOX_GRACE,
        false,
    )
    .await
    .unwrap();
    assert_eq!(relayed, 0);
    assert_eq!(count(&dir, "SELECT COUNT(*) FROM order_outbox"), 1);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

/// Trial finding (issue #15): on the embedded backend the stream lives in the process, so an order whose
/// event was published but not yet handled when the process died used to be lost for good (the outbox row
/// was deleted right after the in-memory publish). Now the row stays until the handler deletes it, and the
/// next start's worker relays it at once: one notification.
#[tokio::test]
async fn embedded_crash_before_the_worker_ran_loses_no_event() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    // No worker runs (it is behind, or retrying a failed handler): the order commits, and its event sits
    // in the in-process stream.
    let order = place(&shop, "crash-1", &[(1, 1)]).await;
    // The process dies: its embedded store, stream included, is gone.
    drop(shop);
    let notified = format!("SELECT COUNT(*) FROM notifications WHERE order_id = {order}");
    assert_eq!(count(&dir, &notified), 0);
    // The next start: its worker's first relay pass publishes the outbox row at once.
    let shop = Shop::embedded(&dir).await;
    let (stop, worker) = spawn_worker(&shop);
    eventually(
        Duration::from_secs(10),
        "the dead process's order notified after the restart",
        || async { count(&dir, &notified) == 1 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "its outbox row deleted by the handler",
        || async { count(&dir, "SELECT COUNT(*) FROM order_outbox") == 0 },
    )
    .await;
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

/// An order row and its outbox row, written as the shop's order transaction would, with the outbox row
/// created at `created_at` (SQL); returns the order id. What a failed publish (or a crash) leaves.
fn unpublished_order(dir: &DbDir, created_at: &str) -> i64 {
    let conn = dir.sqlite();
    conn.execute_batch(
        "INSERT INTO orders (customer_id, order_date, freight_cents, ship_name, ship_address, ship_city, \
         ship_region, ship_postal_code, ship_country, origin) \
         VALUES ('ANATR', '2026-01-01 00:00:00.000', 0, 'n', 'a', 'c', '', 'p', 'x', 'web')",
    )
    .unwrap();
    let order = conn.last_insert_rowid();
    let event = serde_json::json!({
        "type": "order.placed", "order_id": order, "customer_id": "ANATR",
        "total_cents": 1800, "lines": [[1, 1]]
    });
    conn.execute(
        &format!(
            "INSERT INTO order_outbox (order_id, event, created_at) VALUES (?1, ?2, {created_at})"
        ),
        rusqlite::params![order, event.to_string()],
    )
    .unwrap();
    order
}

/// Trial finding (issue #15): on the embedded backend an order whose publish failed stayed in the outbox
/// until the next start (the relay took only rows older than the process), and a previous process's row
/// was published again at every pass while its event waited in the stream. Now, while the shop runs, the
/// relay publishes a row of this process once it is older than the grace period, and each row once: never
/// one whose event is already in the stream (pending, being handled or dead-lettered).
#[tokio::test]
async fn embedded_the_relay_retries_a_failed_publish_and_never_publishes_twice() {
    use storefront::orders::{OUTBOX_GRACE, relay_outbox};
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap();
    let db = &shop.state.db;
    // No worker yet: every event published stays pending in the stream.
    // 1. An order placed normally: its event is in the stream, its row stays until handled.
    let placed = place(&shop, "r-1", &[(1, 1)]).await;
    // 2. A previous process's row (it died before its worker handled it).
    let inherited = unpublished_order(&dir, "'2026-01-01 00:00:00.000'");
    // 3. A row of this process whose publish failed (written now: after the database was opened).
    let failed = unpublished_order(&dir, "strftime('%Y-%m-%d %H:%M:%f', 'now')");
    assert_eq!(count(&dir, "SELECT COUNT(*) FROM order_outbox"), 3);
    assert_eq!(events.len().await.unwrap(), 1);

    // Within the grace period the failed row is left alone (its request may still publish it); the
    // inherited one goes at once; the placed one is in the stream already.
    assert_eq!(
        relay_outbox(db, &events, OUTBOX_GRACE, false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(events.len().await.unwrap(), 2);
    // Past the grace period (a zero grace here, instead of waiting 30 s) the failed row is published.
    assert_eq!(
        relay_outbox(db, &events, Duration::ZERO, false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(events.len().await.unwrap(), 3);
    // Every row's event is now pending in the stream: later passes publish nothing.
    for _ in 0..3 {
        assert_eq!(
            relay_outbox(db, &events, Duration::ZERO, false)
                .await
                .unwrap(),
            0
        );
    }
    assert_eq!(events.len().await.unwrap(), 3);
    let published: Vec<i64> = events
        .range(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.placed().unwrap().order_id)
        .collect();
    assert_eq!(published, [placed, inherited, failed]);

    // The worker handles the three once each; their rows go, and nothing is published again.
    let (stop, worker) = spawn_worker(&shop);
    eventually(
        Duration::from_secs(10),
        "the three orders notified and their rows deleted",
        || async {
            count(&dir, "SELECT COUNT(*) FROM notifications") == 3
                && count(&dir, "SELECT COUNT(*) FROM order_outbox") == 0
        },
    )
    .await;
    assert_eq!(
        relay_outbox(db, &events, Duration::ZERO, false)
            .await
            .unwrap(),
        0
    );
    assert_eq!(events.len().await.unwrap(), 3);
    let _ = stop.send(());
    let report = worker.await.unwrap().unwrap();
    assert_eq!((report.handled, report.failed), (3, 0), "{report:?}");
}

/// A publish that the embedded store refuses leaves the order's row unclaimed, so the relay takes it up
/// (and, while the store still refuses, reports that instead of passing over the row).
#[tokio::test]
async fn embedded_a_refused_publish_is_left_to_the_relay() {
    use storefront::orders::relay_outbox;
    let dir = DbDir::new();
    let first = Shop::embedded(&dir).await;
    // The same database behind an embedded store with no room for order events.
    let kw = keyward::Keyward::embedded_with(
        first.state.kw.policy().clone(),
        keyward::MemoryOptions::default().class_budget(ORDER_EVENTS_CLASS, 1),
    );
    let state = storefront::AppState::new(
        kw,
        first.state.db.clone(),
        first.state.admin_token.clone(),
        storefront::random_session_secrets().unwrap(),
    )
    .unwrap();
    let shop = Shop {
        app: storefront::app(state.clone()),
        state,
    };
    let order = place(&shop, "full-1", &[(1, 1)]).await;
    let row = format!("SELECT COUNT(*) FROM order_outbox WHERE order_id = {order}");
    assert_eq!(count(&dir, &row), 1, "the order committed, its event waits");
    let events = shop
        .state
        .kw
        .stream::<OrderEvent>(ORDER_EVENTS_CLASS)
        .unwrap();
    assert_eq!(events.len().await.unwrap(), 0);
    for pass in 0..2 {
        let refused = relay_outbox(&shop.state.db, &events, Duration::ZERO, false).await;
        assert!(
            refused.is_err(),
            "pass {pass}: the relay tried it: {refused:?}"
        );
    }
    assert_eq!(count(&dir, &row), 1);
}
