//! The order worker: consumes `order.placed` from the `order_events` stream (group `notifier`), writes the
//! customer's confirmation (a `notifications` row: the shop's "email") and counts the products'
//! popularity.
//!
//! **The one decision to know: the handler's whole effect is one SQLite transaction keyed by the order
//! id, so a redelivered event changes nothing.** keyward's worker delivers at least once (an entry is
//! acknowledged only after the handler returned `Ok`; a worker that dies mid-way leaves it pending for
//! another after `claim_idle`). The handler does `INSERT OR IGNORE` into `notifications` (unique per
//! order and kind) and bumps `product_popularity` only if that insert wrote a row, in the same
//! transaction: the notification and the counts are written once, together, or not at all.
//!
//! A handler error (the database failing) is retried with the class's backoff and dead-lettered after
//! `max_deliveries` (`keyward dead-letters list order_events`; `replay` puts them back once fixed). An
//! event that does not decode is dead-lettered at once. Each failed delivery is logged: `warn` with the
//! entry id, the delivery count and the error while it will be retried, `error` on the last one (no
//! personal data in either).
//!
//! The worker runs in the shop's process by default (`storefront`), or alone (`storefront worker`) next
//! to instances started with `--no-worker`; any number of workers may run: they share the group.

use std::future::Future;

use keyward::stream::{Message, WorkerReport};
use rusqlite::params;

use crate::db::{Db, DbError};
use crate::orders::{OrderEvent, OrderPlaced};

/// The consumer group of the order worker.
pub const NOTIFIER_GROUP: &str = "notifier";

/// The `kind` of an order confirmation in `notifications`.
pub const ORDER_CONFIRMATION: &str = "order_confirmation";

/// Handlers the worker runs at once.
pub const CONCURRENCY: usize = 4;

/// Handle one event: write its confirmation and popularity counts, once (see the module docs).
///
/// # Errors
/// [`DbError`] if the transaction failed (nothing was written).
pub async fn handle(db: &Db, event: OrderEvent) -> Result<(), DbError> {
    match event {
        OrderEvent::Placed(placed) => db.write(move |tx| notify(tx, &placed)).await,
    }
}

fn notify(tx: &rusqlite::Transaction<'_>, placed: &OrderPlaced) -> Result<(), DbError> {
    let units: i64 = placed.lines.iter().map(|(_, q)| q).sum();
    let body = format!(
        "Thank you for your order {}: {} line(s), {} unit(s), {}.{:02} in total.",
        placed.order_id,
        placed.lines.len(),
        units,
        placed.total_cents / 100,
        placed.total_cents % 100
    );
    let written = tx
        .execute(
            "INSERT OR IGNORE INTO notifications (customer_id, order_id, kind, body, created_at) \
             VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%d %H:%M:%f', 'now'))",
            params![
                placed.customer_id,
                placed.order_id,
                ORDER_CONFIRMATION,
                body
            ],
        )
        .map_err(DbError::query("write an order confirmation"))?;
    // The event is handled: its outbox row (still there on the embedded backend, or after a crash between
    // the commit and the publish) must not be relayed again.
    tx.execute(
        "DELETE FROM order_outbox WHERE order_id = ?1",
        [placed.order_id],
    )
    .map_err(DbError::query("delete a handled outbox row"))?;
    if written == 0 {
        // Delivered before: the confirmation and the counts are already there.
        return Ok(());
    }
    for (product, quantity) in &placed.lines {
        tx.execute(
            "INSERT INTO product_popularity (product_id, orders, units) VALUES (?1, 1, ?2) \
             ON CONFLICT (product_id) DO UPDATE SET orders = orders + 1, units = units + excluded.units",
            params![product, quantity],
        )
        .map_err(DbError::query("count a product's popularity"))?;
    }
    Ok(())
}

/// Log one failed delivery of the event of `order` (stream entry `entry`, its `deliveries`-th delivery of
/// at most `max_deliveries`): `warn` while keyward will deliver it again, `error` on the last one (keyward
/// then dead-letters it). The line carries the entry id, the order id, the counts and the error, and
/// nothing about the customer: no name, id or address (the event's customer id is not logged, and
/// SQLite's errors name tables and columns, never bound values).
fn log_failure(
    entry: keyward::stream::EntryId,
    order: i64,
    deliveries: u64,
    max_deliveries: u64,
    error: &DbError,
) {
    if deliveries >= max_deliveries {
        tracing::error!(%entry, order, deliveries, max_deliveries, %error,
            "storefront: order worker: the event failed its last delivery and is dead-lettered \
             (keyward dead-letters list order_events; replay it once the fault is fixed)");
    } else {
        tracing::warn!(%entry, order, deliveries, max_deliveries, %error,
            "storefront: order worker: handling the event failed; it is delivered again after the backoff");
    }
}

/// Consume `order_events` as one worker of [`NOTIFIER_GROUP`] until `shutdown` resolves, and meanwhile
/// relay the order outbox ([`relay_outbox`](crate::orders::relay_outbox)) every
/// [`OUTBOX_RELAY_EVERY`](crate::orders::OUTBOX_RELAY_EVERY), starting at once.
///
/// # Errors
/// keyward errors: the policy lacks `order_events`, or the group cannot be created at start. Failures
/// while running are logged and retried (by keyward for the stream, by the next pass for the relay); they
/// do not end the run.
pub async fn run(
    kw: &keyward::Keyward,
    db: Db,
    shutdown: impl Future<Output = ()>,
) -> keyward::Result<WorkerReport> {
    let events = kw.stream::<OrderEvent>(crate::orders::ORDER_EVENTS_CLASS)?;
    let durable = kw.backend() != keyward::BackendKind::Embedded;
    let max_deliveries = kw
        .policy()
        .class(crate::orders::ORDER_EVENTS_CLASS)
        .and_then(|class| class.as_stream())
        .map_or(1, |stream| u64::from(stream.max_deliveries_value()));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let handler_db = db.clone();
    let worker = events
        .worker(NOTIFIER_GROUP, move |message: Message<OrderEvent>| {
            let db = handler_db.clone();
            async move {
                let order = match &message.event {
                    OrderEvent::Placed(placed) => placed.order_id,
                };
                let handled = handle(&db, message.event).await;
                if let Err(error) = &handled {
                    log_failure(message.id, order, message.deliveries, max_deliveries, error);
                }
                handled
            }
        })
        .concurrency(CONCURRENCY)
        .run(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
    let relay = async {
        let mut every = tokio::time::interval(crate::orders::OUTBOX_RELAY_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = every.tick() => {
                    match crate::orders::relay_outbox(&db, &events, crate::orders::OUTBOX_GRACE, durable).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(events = n, "storefront: relayed order events from the outbox"),
                        Err(error) => tracing::warn!(?error, "storefront: the outbox relay failed; the next pass retries"),
                    }
                }
            }
        }
    };
    let (report, ()) = tokio::join!(worker, relay);
    report
}
