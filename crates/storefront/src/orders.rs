//! Orders: `POST /orders` (idempotent per customer), the `order.placed` event, and `/me/orders`.
//!
//! **The one decision to know: once the order's transaction has committed, nothing after it may turn
//! the answer into a `5xx`, and nothing after it may be lost.** The route sits behind keyward-axum's
//! `IdempotencyLayer` (class `order_request`, keys scoped to the logged-in customer): a `2xx`/`4xx` is
//! stored and replayed to every retry with the same `Idempotency-Key`, but a `5xx` is not stored, and the
//! retry would run the handler — and place the order — again. So:
//!
//! 1. one `BEGIN IMMEDIATE` transaction ([`Db::write`](crate::Db::write)): for each line, `UPDATE
//!    products SET stock = stock - q WHERE id = ? AND stock >= q` and check that one row changed (else
//!    `409`, and nothing of the order is written); the `orders` and `order_lines` rows; and the event in
//!    the `order_outbox` table;
//! 2. [`Catalog::stock_changed`](crate::Catalog::stock_changed) per product: the detail by key; the
//!    category's pages (tag) only when the stock reached 0 (pages show only `in_stock`);
//! 3. publish [`OrderEvent::Placed`] to the `order_events` stream, then delete its outbox row (on Redis,
//!    where the stream is durable; on the embedded backend the stream dies with the process, so the row
//!    stays until the worker's handler deletes it in its own transaction).
//!
//! Failures in 2 and 3 are logged and counted, and the order still answers `201`. A failed invalidation
//! leaves the detail's old stock visible until its TTL (10–12 min;
//! `storefront_order_invalidations_failed_total`). A failed publish, or a crash after the commit, leaves
//! the outbox row: [`relay_outbox`] (run by the worker every [`OUTBOX_RELAY_EVERY`]) publishes rows older
//! than [`OUTBOX_GRACE`] and deletes them. An event can so be published twice (published, then the
//! delete failed); the worker's effects are keyed by the order id, so that is harmless. On the embedded
//! backend, where a row stays until its event is handled, the relay must not publish a row whose event
//! is already in this process's stream: the process remembers which ones it put there (`InStream`),
//! and the relay publishes the others — a dead process's rows at once, a row whose publish failed here
//! (the embedded store full) once it is older than [`OUTBOX_GRACE`] — each once (see [`relay_outbox`]).
//!
//! `/me/orders` is personal data: read from SQLite on every request, never cached in the shared store
//! (`my_orders` in `policy.toml` is `personal = true`, so `Keyward::cache("my_orders")` is refused), and
//! answered with `Cache-Control: private, no-store`.

use std::collections::HashSet;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::account::CustomerSession;
use crate::db::DbError;
use crate::error::AppError;

/// The idempotency class of `POST /orders`.
pub const ORDER_REQUEST_CLASS: &str = "order_request";
/// The stream class of order events.
pub const ORDER_EVENTS_CLASS: &str = "order_events";

/// Most lines one order may have.
pub const MAX_LINES: usize = 50;
/// Most units of one product per order.
pub const MAX_QUANTITY: i64 = 10_000;
/// Most orders `/me/orders` lists (the newest).
pub const MY_ORDERS_LIMIT: i64 = 50;

/// How old an outbox row must be before [`relay_outbox`] publishes it: long enough that the request that
/// wrote it has published it itself (or failed to).
pub const OUTBOX_GRACE: Duration = Duration::from_secs(30);
/// How often the worker runs [`relay_outbox`].
pub const OUTBOX_RELAY_EVERY: Duration = Duration::from_secs(15);
/// Most outbox rows one relay pass publishes.
pub const OUTBOX_BATCH: i64 = 256;

/// The body of `POST /orders`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// What to buy: 1 to [`MAX_LINES`] lines, each product at most once.
    pub lines: Vec<LineRequest>,
}

/// One line of an [`OrderRequest`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    /// The product's id.
    pub product_id: i64,
    /// Units, 1 to [`MAX_QUANTITY`].
    pub quantity: i64,
}

/// A placed order, as `POST /orders` answers it and `/me/orders` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Order {
    /// Its id.
    pub id: i64,
    /// Who placed it.
    pub customer_id: String,
    /// When (UTC, `YYYY-MM-DD HH:MM:SS.mmm`, as Northwind's dates).
    pub order_date: String,
    /// `northwind` (imported history) or `web`.
    pub origin: String,
    /// The sum of the lines, in cents, after discounts.
    pub total_cents: i64,
    /// Its lines, by product id.
    pub lines: Vec<OrderLine>,
}

/// One line of an [`Order`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct OrderLine {
    /// The product's id.
    pub product_id: i64,
    /// The product's name.
    pub name: String,
    /// Units.
    pub quantity: i64,
    /// The price per unit when ordered, in cents.
    pub unit_price_cents: i64,
    /// The discount, in basis points (1/100 %).
    pub discount_bp: i64,
}

/// What goes to the `order_events` stream. Tagged by `type` (`"order.placed"`), so that new kinds can
/// join the stream without breaking old workers' decoding of the ones they know.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum OrderEvent {
    /// An order was committed.
    #[serde(rename = "order.placed")]
    Placed(OrderPlaced),
}

impl OrderEvent {
    /// The `order.placed` event, if this is one.
    pub fn placed(&self) -> Option<&OrderPlaced> {
        match self {
            OrderEvent::Placed(placed) => Some(placed),
        }
    }
}

/// The `order.placed` event: enough for the worker to write the confirmation without reading the order.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct OrderPlaced {
    /// The order's id: the event's identity (the worker's effects are keyed by it).
    pub order_id: i64,
    /// Who placed it.
    pub customer_id: String,
    /// The order's total, in cents.
    pub total_cents: i64,
    /// `(product id, units)` per line.
    pub lines: Vec<(i64, i64)>,
}

/// What changed for one product when an order committed: what the cache invalidation needs.
#[derive(Clone, Copy, Debug)]
struct StockChange {
    product_id: i64,
    category_id: i64,
    stock_after: i64,
}

/// Why an order's transaction was rolled back.
#[derive(Debug, thiserror::Error)]
enum PlaceError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("product {product_id}: {available} in stock, {wanted} ordered")]
    OutOfStock {
        product_id: i64,
        available: i64,
        wanted: i64,
    },
}

impl From<PlaceError> for AppError {
    fn from(error: PlaceError) -> Self {
        match error {
            PlaceError::Db(db) => AppError::from(db),
            out_of_stock @ PlaceError::OutOfStock { .. } => {
                AppError::Conflict(format!("Not enough stock: {out_of_stock}."))
            }
        }
    }
}

impl OrderRequest {
    fn check(&self) -> Result<(), AppError> {
        if self.lines.is_empty() || self.lines.len() > MAX_LINES {
            return Err(AppError::BadRequest(format!(
                "lines: 1 to {MAX_LINES} lines"
            )));
        }
        let mut seen = HashSet::new();
        for line in &self.lines {
            if !(1..=MAX_QUANTITY).contains(&line.quantity) {
                return Err(AppError::BadRequest(format!(
                    "quantity of product {}: 1 to {MAX_QUANTITY}",
                    line.product_id
                )));
            }
            if !seen.insert(line.product_id) {
                return Err(AppError::BadRequest(format!(
                    "product {} is on two lines; put its units on one",
                    line.product_id
                )));
            }
        }
        Ok(())
    }
}

/// Place `request` for `customer_id`: check and decrement the stock and write the order in one SQLite
/// transaction, then invalidate the catalog entries that showed the old stock and publish
/// `order.placed` (see the module docs for why failures after the commit do not fail the order).
///
/// # Errors
/// [`AppError::BadRequest`] for a malformed request, [`AppError::NotFound`] for an unknown or
/// unpublished product, [`AppError::Conflict`] when a product has too little stock (nothing written),
/// [`AppError::Db`] if the transaction failed (nothing written).
pub async fn place_order(
    state: &AppState,
    customer_id: &str,
    request: OrderRequest,
) -> Result<Order, AppError> {
    request.check()?;
    let customer = customer_id.to_owned();
    let (order, changes, event) = state
        .db
        .write(move |tx| write_order(tx, &customer, &request))
        .await?;
    // Embedded: claim the event for this request at once (see `InStream`): the relay leaves a claimed
    // row alone, and a row the relay claimed first (only possible if this request stalled past the grace
    // period) is not published again here.
    let embedded = state.kw.backend() == keyward::BackendKind::Embedded;
    let ours = !embedded || state.db.in_stream().claim(order.id);
    for change in &changes {
        if let Err(error) = state
            .catalog
            .stock_changed(change.product_id, change.category_id, change.stock_after)
            .await
        {
            metrics::counter!("storefront_order_invalidations_failed_total").increment(1);
            tracing::error!(order = order.id, product = change.product_id, %error,
                "storefront: a product's cache entry was not invalidated after an order; it shows the old stock until its TTL");
        }
    }
    if !ours {
        return Ok(order);
    }
    match state.events.publish(&event).await {
        // The embedded backend's stream lives in this process's memory: a published event dies with the
        // process, so its outbox row stays until the worker has handled it (the handler deletes it).
        Ok(_) if embedded => {}
        Ok(_) => {
            let id = order.id;
            let deleted = state
                .db
                .write(move |tx| {
                    tx.execute("DELETE FROM order_outbox WHERE order_id = ?1", [id])
                        .map_err(DbError::query("delete a published outbox row"))
                })
                .await;
            if let Err(error) = deleted {
                // The relay publishes it again later; the worker ignores the duplicate.
                tracing::warn!(order = order.id, %error, "storefront: an outbox row was not deleted");
            }
        }
        Err(error) => {
            if embedded {
                // Not in the stream (the embedded backend appends all or nothing): the relay may take it.
                state.db.in_stream().release(order.id);
            }
            metrics::counter!("storefront_order_events_deferred_total").increment(1);
            tracing::warn!(order = order.id, %error,
                "storefront: order.placed not published now; the outbox relay will publish it");
        }
    }
    Ok(order)
}

/// The orders whose `order.placed` event this process has put in its own stream (the embedded
/// backend's, which lives and dies with the process), and whose outbox row may still exist.
///
/// **Why the relay needs it.** On the embedded backend an outbox row is kept until the worker's handler
/// deletes it (in its own transaction), so "the row exists" does not mean "the event is not in the
/// stream": a row may be waiting for its event to be read, or its handler may be running or retrying
/// with backoff, or the event may be dead-lettered. Publishing such a row again would put a second copy
/// in the stream while the first is pending — harmless for the data (the handler is keyed by the order
/// id) but a second delivery, second retries and a second dead letter. The database cannot tell these
/// rows from one whose publish failed (nothing is in the stream then); only this process knows which
/// events it put in its stream. So:
///
/// - whoever publishes an event first **claims** its order id here ([`claim`](Self::claim) is a set
///   insert under a lock, true for exactly one caller): `place_order` right after its commit, the relay
///   before each publish. Only the claimant publishes; a failed publish **releases** the claim (the
///   embedded backend appends all or nothing, so the event is not in the stream) and the relay takes the
///   row up again after the grace period.
/// - a claimed id stays claimed while its row exists: pending, being handled, retried or dead-lettered,
///   the event is in this stream and is never published again by this process (a dead letter is put
///   back by `replay`, not by the relay). The next process starts with no claims, so it relays every
///   row left at once: their events died with the old process's stream.
/// - a claim is dropped once its row is gone (the handler deleted it): the relay [`forget`](Self::forget)s
///   the ids that were claimed **before** it read the outbox and are missing from what it read. An id
///   claimed after that snapshot is kept even if the read missed its row (its transaction committed
///   after the read), and a deleted row never comes back (an order's row is written once, in the order's
///   transaction), so a forgotten id can never be a pending event.
///
/// Only one process's stream is known here: two embedded processes on one database (not a supported
/// set-up: each has its own stream, and its worker must run in it) would relay each other's rows older
/// than the grace period, a duplicate delivery the handler absorbs. On Redis the stream is shared and
/// durable, a row is deleted right after its publish, and none of this is used.
#[derive(Debug, Default)]
pub(crate) struct InStream {
    ids: std::sync::Mutex<HashSet<i64>>,
}

impl InStream {
    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        // Plain set operations: a panic elsewhere cannot leave it half-changed.
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claim `order`'s event for publishing; `false` if it is claimed already (in the stream, or being
    /// published by someone else).
    pub(crate) fn claim(&self, order: i64) -> bool {
        self.ids().insert(order)
    }

    /// Give up a claim whose publish failed (the event is not in the stream).
    pub(crate) fn release(&self, order: i64) {
        self.ids().remove(&order);
    }

    /// Whether `order`'s event is claimed.
    pub(crate) fn contains(&self, order: i64) -> bool {
        self.ids().contains(&order)
    }

    /// The claimed ids now.
    pub(crate) fn snapshot(&self) -> HashSet<i64> {
        self.ids().clone()
    }

    /// Drop the claims in `before` (a [`snapshot`](Self::snapshot) taken before reading the outbox)
    /// whose rows are not in `present` (the outbox as read after it): their events were handled.
    pub(crate) fn forget(&self, before: &HashSet<i64>, present: &HashSet<i64>) {
        let mut ids = self.ids();
        for gone in before.difference(present) {
            ids.remove(gone);
        }
    }
}

/// Publish outbox rows (at most [`OUTBOX_BATCH`] per call, oldest first) to `events`; returns how many
/// were published.
///
/// When the stream is `durable` (Redis): the rows older than `grace`, each deleted once published.
///
/// On the embedded backend (`durable = false`) the stream lives in this process and a row stays until
/// the worker's handler deletes it. Published: the rows whose event this process has not put in its
/// stream already (it keeps their order ids with the `Db` handle; `orders::InStream` says why, and why
/// that is safe) that were written before `db` was opened (their
/// process died before its worker handled them) or are older than `grace` (their publish failed here).
/// Each is claimed before its publish and stays claimed while its row exists, so no pass publishes it
/// again while its event is pending, being handled or dead-lettered.
///
/// # Errors
/// [`AppError::Db`] if the outbox cannot be read; a publish failure stops the pass (its rows stay for
/// the next one) and is returned as [`AppError::Store`].
pub async fn relay_outbox(
    db: &crate::Db,
    events: &keyward::stream::Stream<OrderEvent>,
    grace: Duration,
    durable: bool,
) -> Result<usize, AppError> {
    let modifier = format!("-{:.3} seconds", grace.as_secs_f64());
    let opened = db.opened_at().to_owned();
    // Claims taken before the outbox is read (see `InStream::forget`).
    let claimed_before = db.in_stream().snapshot();
    let rows: Vec<(i64, String, bool)> = db
        .read(move |conn| {
            let what = "read the order outbox";
            // Durable: the due rows only, at most a batch. Embedded: every row (the outbox holds only
            // unhandled events), each with whether it is due, so that the claims of handled ones can be
            // dropped and claimed rows do not take the batch's room.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT order_id, event, \
                            (created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', ?1) \
                             OR (NOT ?3 AND created_at < ?4)) AS due \
                     FROM order_outbox \
                     WHERE NOT ?3 OR created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', ?1) \
                     ORDER BY order_id LIMIT CASE WHEN ?3 THEN ?2 ELSE -1 END",
                )
                .map_err(DbError::query(what))?;
            stmt.query_map(params![modifier, OUTBOX_BATCH, durable, opened], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(DbError::query(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(DbError::query(what))
        })
        .await?;
    let in_stream = db.in_stream();
    if !durable {
        let present: HashSet<i64> = rows.iter().map(|(id, _, _)| *id).collect();
        in_stream.forget(&claimed_before, &present);
    }
    let mut published = 0;
    let due = rows
        .into_iter()
        .filter(|(order_id, _, due)| *due && (durable || !in_stream.contains(*order_id)))
        .take(usize::try_from(OUTBOX_BATCH).unwrap_or(usize::MAX));
    for (order_id, json, _) in due {
        let event: OrderEvent = match serde_json::from_str(&json) {
            Ok(event) => event,
            Err(error) => {
                // Written by this crate, so a bug or a hand edit: keep the row for an operator.
                tracing::error!(order = order_id, %error, "storefront: an outbox row does not decode");
                continue;
            }
        };
        if !durable && !in_stream.claim(order_id) {
            // Its request (or another pass) published it meanwhile.
            continue;
        }
        if let Err(error) = events.publish(&event).await {
            if !durable {
                in_stream.release(order_id);
            }
            return Err(error.into());
        }
        if durable {
            db.write(move |tx| {
                tx.execute("DELETE FROM order_outbox WHERE order_id = ?1", [order_id])
                    .map_err(DbError::query("delete a relayed outbox row"))
            })
            .await?;
        }
        published += 1;
    }
    Ok(published)
}

fn write_order(
    tx: &rusqlite::Transaction<'_>,
    customer_id: &str,
    request: &OrderRequest,
) -> Result<(Order, Vec<StockChange>, OrderEvent), PlaceError> {
    let ship = tx
        .query_row(
            "SELECT company_name, address, city, region, postal_code, country FROM customers WHERE id = ?1",
            [customer_id],
            |r| {
                Ok([
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ])
            },
        )
        .optional()
        .map_err(DbError::query("read the customer of an order"))?
        .ok_or_else(|| DbError::NotFound {
            what: "customer",
            id: customer_id.to_owned(),
        })?;
    let mut lines = Vec::with_capacity(request.lines.len());
    let mut changes = Vec::with_capacity(request.lines.len());
    for line in &request.lines {
        let found: Option<(String, i64, i64, i64)> = tx
            .query_row(
                "SELECT name, category_id, price_cents, stock FROM products WHERE id = ?1 AND published = 1",
                [line.product_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(DbError::query("read an ordered product"))?;
        let Some((name, category_id, price, stock)) = found else {
            return Err(DbError::NotFound {
                what: "product",
                id: line.product_id.to_string(),
            }
            .into());
        };
        // The check and the decrement are one statement, inside the write transaction.
        let changed = tx
            .execute(
                "UPDATE products SET stock = stock - ?2 WHERE id = ?1 AND stock >= ?2",
                params![line.product_id, line.quantity],
            )
            .map_err(DbError::query("take an ordered product's stock"))?;
        if changed != 1 {
            return Err(PlaceError::OutOfStock {
                product_id: line.product_id,
                available: stock,
                wanted: line.quantity,
            });
        }
        changes.push(StockChange {
            product_id: line.product_id,
            category_id,
            stock_after: stock - line.quantity,
        });
        lines.push(OrderLine {
            product_id: line.product_id,
            name,
            quantity: line.quantity,
            unit_price_cents: price,
            discount_bp: 0,
        });
    }
    let [ship_name, address, city, region, postal_code, country] = ship;
    tx.execute(
        "INSERT INTO orders (customer_id, employee_id, order_date, freight_cents, ship_name, ship_address, \
         ship_city, ship_region, ship_postal_code, ship_country, origin) \
         VALUES (?1, NULL, strftime('%Y-%m-%d %H:%M:%f', 'now'), 0, ?2, ?3, ?4, ?5, ?6, ?7, 'web')",
        params![customer_id, ship_name, address, city, region, postal_code, country],
    )
    .map_err(DbError::query("insert an order"))?;
    let order_id = tx.last_insert_rowid();
    for line in &lines {
        tx.execute(
            "INSERT INTO order_lines (order_id, product_id, unit_price_cents, quantity, discount_bp) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                order_id,
                line.product_id,
                line.unit_price_cents,
                line.quantity,
                line.discount_bp
            ],
        )
        .map_err(DbError::query("insert an order line"))?;
    }
    lines.sort_by_key(|l| l.product_id);
    let order_date: String = tx
        .query_row(
            "SELECT order_date FROM orders WHERE id = ?1",
            [order_id],
            |r| r.get(0),
        )
        .map_err(DbError::query("read a new order's date"))?;
    let order = Order {
        id: order_id,
        customer_id: customer_id.to_owned(),
        order_date,
        origin: "web".to_owned(),
        total_cents: lines.iter().map(line_total).sum(),
        lines,
    };
    let event = OrderEvent::Placed(OrderPlaced {
        order_id,
        customer_id: order.customer_id.clone(),
        total_cents: order.total_cents,
        lines: order
            .lines
            .iter()
            .map(|l| (l.product_id, l.quantity))
            .collect(),
    });
    let json = serde_json::to_string(&event).map_err(|e| DbError::Invalid {
        what: "order event",
        reason: e.to_string(),
    })?;
    tx.execute(
        "INSERT INTO order_outbox (order_id, event, created_at) \
         VALUES (?1, ?2, strftime('%Y-%m-%d %H:%M:%f', 'now'))",
        params![order_id, json],
    )
    .map_err(DbError::query("write an order's event to the outbox"))?;
    Ok((order, changes, event))
}

/// A line's total in cents, after its discount (rounded to the nearest cent, halves up).
fn line_total(line: &OrderLine) -> i64 {
    let gross = line.unit_price_cents * line.quantity;
    gross - (gross * line.discount_bp + 5_000) / 10_000
}

/// `POST /orders` with an [`OrderRequest`]: `201` with the [`Order`]. Behind `require_login` and the
/// idempotency layer (see [`crate::app`]).
pub(crate) async fn post_order(
    State(state): State<AppState>,
    session: CustomerSession,
    body: Result<Json<OrderRequest>, JsonRejection>,
) -> Result<Response, AppError> {
    let Some(current) = session.get() else {
        return Err(AppError::LoginRequired);
    };
    let Json(request) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let order = place_order(&state, current.user_id(), request).await?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

/// What `GET /me/orders` answers.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MyOrders {
    /// The logged-in customer.
    pub customer_id: String,
    /// Their newest orders (at most [`MY_ORDERS_LIMIT`]), newest first.
    pub orders: Vec<Order>,
}

/// The newest [`MY_ORDERS_LIMIT`] orders of `customer_id`, newest first, read from SQLite (never a cache).
///
/// # Errors
/// [`DbError`] if the read failed.
pub async fn my_orders(state: &AppState, customer_id: &str) -> Result<MyOrders, DbError> {
    let customer = customer_id.to_owned();
    state
        .db
        .read(move |conn| {
            let what = "list a customer's orders";
            let mut orders_stmt = conn
                .prepare_cached(
                    "SELECT id, order_date, origin FROM orders WHERE customer_id = ?1 \
                     ORDER BY order_date DESC, id DESC LIMIT ?2",
                )
                .map_err(DbError::query(what))?;
            let mut lines_stmt = conn
                .prepare_cached(
                    "SELECT l.product_id, p.name, l.quantity, l.unit_price_cents, l.discount_bp \
                     FROM order_lines l JOIN products p ON p.id = l.product_id \
                     WHERE l.order_id = ?1 ORDER BY l.product_id",
                )
                .map_err(DbError::query(what))?;
            let heads = orders_stmt
                .query_map(params![customer, MY_ORDERS_LIMIT], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(DbError::query(what))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(DbError::query(what))?;
            let mut orders = Vec::with_capacity(heads.len());
            for (id, order_date, origin) in heads {
                let lines = lines_stmt
                    .query_map([id], |r| {
                        Ok(OrderLine {
                            product_id: r.get(0)?,
                            name: r.get(1)?,
                            quantity: r.get(2)?,
                            unit_price_cents: r.get(3)?,
                            discount_bp: r.get(4)?,
                        })
                    })
                    .map_err(DbError::query(what))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DbError::query(what))?;
                orders.push(Order {
                    id,
                    customer_id: customer.clone(),
                    order_date,
                    origin,
                    total_cents: lines.iter().map(line_total).sum(),
                    lines,
                });
            }
            Ok(MyOrders {
                customer_id: customer,
                orders,
            })
        })
        .await
}

/// `GET /me/orders`: the logged-in customer's newest orders, from SQLite, `Cache-Control: private,
/// no-store`. Behind `require_login`.
pub(crate) async fn get_my_orders(
    State(state): State<AppState>,
    session: CustomerSession,
) -> Result<Response, AppError> {
    let Some(current) = session.get() else {
        return Err(AppError::LoginRequired);
    };
    let orders = my_orders(&state, current.user_id()).await?;
    Ok(([(header::CACHE_CONTROL, "private, no-store")], Json(orders)).into_response())
}
