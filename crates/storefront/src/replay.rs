//! `storefront replay`: the 830 Northwind orders, placed again as real HTTP traffic against a running
//! shop, in date order, then checked against the database.
//!
//! **The one decision to know: the replay is a client, not part of the shop.** Everything it does to
//! the shop is an HTTP request to `--url` (logins, pages, orders, the admin restock, the dashboard's
//! figures); it opens the shop's SQLite file **read-only**, and only before the traffic (the history,
//! the stock) and after it (the checks). So the checks see what the shop committed, not what it
//! answered: "every order exactly once" counts the rows, and a double order that the shop answered
//! as a replay would still be caught. The replay expects to be the only one ordering while it runs
//! (another client's orders would show up as extra orders and stock).
//!
//! What one historical order becomes, with its customer's session kept between their orders (the
//! per-account login limit counts every login, so each customer logs in once, and again only after a
//! `401`):
//! 1. `POST /login` (first order of the customer) with `X-Forwarded-For: 127.77.x.y`, one loopback
//!    address per customer: a shop started with `--trust-proxy 127.0.0.1` limits logins per customer
//!    address, not per replay. Against a shop that does not trust it, every login comes from one
//!    address: `429`s are waited out (`Retry-After`) and counted, the replay is slower, not wrong.
//! 2. `GET /categories`, the page of each category holding a product of the order, each product's
//!    detail, and two of the [`POPULAR_PRODUCTS`] most ordered products.
//! 3. `POST /orders` with its lines and `Idempotency-Key: "replay-<run>-<order id>"` (a new run id per
//!    run, so a second replay places new orders). A `5xx`, a network error, a `409` with `Retry-After`
//!    (the same key still in progress) and a `401` are retried with the same key, as a careful client
//!    would.
//! 4. Every [`ReplayOptions::resend_every`]-th order is re-sent as a flaky client would: after its
//!    answer (the answer was lost) or twice at once (a double click). The shop must answer the
//!    duplicate with `Idempotent-Replayed: true` and the same order, and store one.
//!
//! Before anything else the replay checks that `--db` is the shop's database: every database has a
//! random id made once, when it is created ([`crate::Db::id`]); the shop names its own in `/healthz`, the
//! replay reads the file's, and a difference stops the replay ([`ReplayError::WrongDatabase`]) before it
//! sends a single write.
//!
//! Before the traffic the replay restocks, through `PATCH /admin/products/{id}` with the admin token,
//! every product whose stock cannot cover the replayed orders: its stock is set to what they take, so
//! those products end at 0 (their pages are invalidated on the way, the path a real sell-out takes).
//!
//! The checks ([`Check`]): every order answered `201`; every order stored exactly once (the new `web`
//! orders are exactly the answered ids, each with its customer and lines); every duplicate replayed;
//! the stock of every product is what it was, plus the restock, minus what the placed orders took;
//! every browsing request answered `200`; and, unless [`ReplayOptions::worker_deadline`] is `None`,
//! every order notified once and counted once in the popularity table by the worker.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::AdminToken;
use crate::catalog::DEFAULT_PER_PAGE;
use crate::orders::{LineRequest, Order, OrderRequest};
use crate::worker::ORDER_CONFIRMATION;

/// Historical seconds replayed per real second by default: the 22 months of orders take about a minute.
pub const DEFAULT_SPEEDUP: f64 = 1_000_000.0;
/// Customers in flight at once by default.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// By default every 10th order is re-sent (alternately after its answer and as a double click).
pub const DEFAULT_RESEND_EVERY: u32 = 10;
/// How many of the most ordered products the browsing draws from.
pub const POPULAR_PRODUCTS: usize = 10;
/// How long one request may take before it counts as failed (and, for an order, is retried).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at one login (`429`s waited out) before the order fails.
const LOGIN_ATTEMPTS: u32 = 40;
/// Attempts at one order request (same key) before the order fails.
const ORDER_ATTEMPTS: u32 = 6;
/// The longest `Retry-After` the replay honours, in seconds.
const MAX_RETRY_AFTER_SECS: u64 = 60;
/// Failures quoted in a check's detail.
const QUOTED: usize = 5;

/// How to replay. Build with [`ReplayOptions::new`] and the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplayOptions {
    /// The running shop's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// The shop's SQLite file: read-only, for the history before and the checks after.
    pub db_path: PathBuf,
    /// The shop's admin token (for the restock).
    pub admin_token: AdminToken,
    /// Historical seconds per real second; `0` (or infinity): no pauses between orders.
    pub speedup: f64,
    /// Customers in flight at once (at least 1).
    pub concurrency: usize,
    /// Replay only the first `n` orders by date.
    pub limit: Option<usize>,
    /// Re-send every `n`-th order (`0`: never); see the module docs.
    pub resend_every: u32,
    /// Send `X-Forwarded-For` with one loopback address per customer.
    pub forwarded_for: bool,
    /// How long to wait for the worker to notify every order; `None`: skip that check (no worker runs).
    pub worker_deadline: Option<Duration>,
}

impl ReplayOptions {
    /// Replay against the shop at `url`, whose database is `db_path`, with its `admin_token`: every
    /// order, [`DEFAULT_SPEEDUP`], [`DEFAULT_CONCURRENCY`], [`DEFAULT_RESEND_EVERY`], `X-Forwarded-For`
    /// on, the worker checked within 30 s.
    pub fn new(
        url: impl Into<String>,
        db_path: impl Into<PathBuf>,
        admin_token: AdminToken,
    ) -> ReplayOptions {
        ReplayOptions {
            url: url.into(),
            db_path: db_path.into(),
            admin_token,
            speedup: DEFAULT_SPEEDUP,
            concurrency: DEFAULT_CONCURRENCY,
            limit: None,
            resend_every: DEFAULT_RESEND_EVERY,
            forwarded_for: true,
            worker_deadline: Some(Duration::from_secs(30)),
        }
    }

    /// Historical seconds per real second (`0`: no pauses).
    #[must_use]
    pub fn speedup(mut self, speedup: f64) -> Self {
        self.speedup = speedup;
        self
    }

    /// Customers in flight at once.
    #[must_use]
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Replay only the first `limit` orders by date (`None`: all).
    #[must_use]
    pub fn limit(mut self, limit: Option<usize>) -> Self {
        self.limit = limit;
        self
    }

    /// Re-send every `n`-th order (`0`: never).
    #[must_use]
    pub fn resend_every(mut self, n: u32) -> Self {
        self.resend_every = n;
        self
    }

    /// Send `X-Forwarded-For` per customer (on by default).
    #[must_use]
    pub fn forwarded_for(mut self, on: bool) -> Self {
        self.forwarded_for = on;
        self
    }

    /// Wait this long for the worker's notifications (`None`: skip the check).
    #[must_use]
    pub fn worker_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.worker_deadline = deadline;
        self
    }

    fn check(&self) -> Result<(), ReplayError> {
        if self.speedup.is_nan() || self.speedup < 0.0 {
            return Err(ReplayError::Option {
                option: "speedup",
                reason: format!("{} is not a number of seconds per second ≥ 0", self.speedup),
            });
        }
        if self.concurrency == 0 {
            return Err(ReplayError::Option {
                option: "concurrency",
                reason: "at least 1".into(),
            });
        }
        if self.limit == Some(0) {
            return Err(ReplayError::Option {
                option: "limit",
                reason: "at least 1 order".into(),
            });
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(ReplayError::Option {
                option: "url",
                reason: format!("{:?} is not an http:// or https:// URL", self.url),
            });
        }
        Ok(())
    }
}

/// Why the replay could not run (a failed check is not an error: see [`ReplayReport::passed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// An option is out of range.
    #[error("--{option}: {reason}")]
    Option {
        /// The option's name.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The database could not be read.
    #[error("reading {}: {source}", file.display())]
    Db {
        /// The SQLite file.
        file: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database holds no Northwind orders.
    #[error("{}: no Northwind orders (origin 'northwind'); start the shop on it once, it imports them", file.display())]
    NoHistory {
        /// The SQLite file.
        file: PathBuf,
    },
    /// A request the replay cannot do without (the dashboard's figures, a restock) failed.
    #[error("{what}: {source}")]
    Http {
        /// The request.
        what: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// A request the replay cannot do without was refused.
    #[error("{what}: the shop answered {status}: {body}")]
    Refused {
        /// The request.
        what: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// `--db` is not the database of the shop at `--url`: their identities differ (checked before any
    /// request but `GET /healthz`).
    #[error("{} is not the database of the shop at {url}: {reason}", file.display())]
    WrongDatabase {
        /// The SQLite file given.
        file: PathBuf,
        /// The shop's base URL.
        url: String,
        /// What does not match: both ids, or the file having none.
        reason: String,
    },
    /// The shop does not say which database it serves (its `/healthz` has no `database_id`), so the
    /// replay cannot check that `--db` is it.
    #[error(
        "the shop at {url} does not name its database (GET /healthz has no \"database_id\"; a storefront \
         older than this replay?): cannot check that {} is its database", file.display()
    )]
    UnknownDatabase {
        /// The SQLite file given.
        file: PathBuf,
        /// The shop's base URL.
        url: String,
    },
    /// A blocking task (a database read) panicked or was cancelled.
    #[error("a database read did not finish: {0}")]
    Task(String),
}

/// One check of the final state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// Whether it holds.
    pub passed: bool,
    /// The figures behind it, and the first failures.
    pub detail: String,
}

/// Latency of one endpoint, in microseconds.
#[derive(Clone, Debug)]
pub struct EndpointLatency {
    /// `METHOD /route` (`POST /orders (resent)` for the duplicates).
    pub endpoint: &'static str,
    /// Requests answered.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// What the replay did and found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Orders replayed.
    pub orders: usize,
    /// Orders answered `201` (once each).
    pub placed: usize,
    /// The first and last order date replayed (`YYYY-MM-DD`).
    pub span: (String, String),
    /// Wall time of the traffic (restock and checks excluded).
    pub elapsed: Duration,
    /// The options' speedup and concurrency.
    pub speedup: f64,
    /// Customers in flight at once.
    pub concurrency: usize,
    /// Requests the replay sent to the shop during the traffic (the dashboard's excluded).
    pub requests: u64,
    /// Requests that failed without an answer (timeouts, connection errors).
    pub request_errors: u64,
    /// Logins that succeeded.
    pub logins: u64,
    /// Login attempts refused by a login limit (`429`) and waited out.
    pub logins_limited: u64,
    /// Duplicates sent (lost answers and double clicks).
    pub resent: usize,
    /// Products restocked before the traffic, and the units added.
    pub restocked: (usize, i64),
    /// Catalog reads answered from the cache during the traffic, of all catalog reads (`None`: no reads
    /// counted, e.g. a shop started with `--no-cache`).
    pub hit_ratio: Option<f64>,
    /// The part of the catalog reads answered in process (L1).
    pub l1_hit_ratio: Option<f64>,
    /// Per cache class: its hit ratio during the traffic.
    pub class_hit_ratios: Vec<(String, Option<f64>)>,
    /// SQLite calls the shop made during the traffic (its `/dashboard/data` `db.queries`).
    pub db_queries: u64,
    /// Latency per endpoint, by endpoint.
    pub latencies: Vec<EndpointLatency>,
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl ReplayReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The name of each check.
pub mod checks {
    /// Every replayed order was answered `201` with an order.
    pub const ANSWERED: &str = "every order answered 201";
    /// The new `web` orders are exactly the answered ones, each with its customer and lines.
    pub const STORED_ONCE: &str = "every order stored exactly once";
    /// Every duplicate was answered `Idempotent-Replayed: true` with the same order.
    pub const REPLAYED: &str = "every duplicate replayed";
    /// Final stock = start + restock − ordered, for every product.
    pub const STOCK: &str = "stock consistent";
    /// Every page and login answered `200`.
    pub const BROWSING: &str = "every page answered 200";
    /// One notification and one popularity count per order.
    pub const WORKER: &str = "every order notified and counted once";
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pace = if self.speedup > 0.0 && self.speedup.is_finite() {
            format!("speedup {}", self.speedup)
        } else {
            "no pauses".to_owned()
        };
        writeln!(
            f,
            "replay: {} orders from {} to {} in {:.1} s ({pace}, {} customers at once)",
            self.orders,
            self.span.0,
            self.span.1,
            self.elapsed.as_secs_f64(),
            self.concurrency
        )?;
        writeln!(
            f,
            "  requests: {} ({:.0}/s), {} without an answer; logins: {} ({} refused by a login limit and retried)",
            self.requests,
            per_second(self.requests, self.elapsed),
            self.request_errors,
            self.logins,
            self.logins_limited
        )?;
        writeln!(
            f,
            "  restocked first: {} products, +{} units (PATCH /admin/products/{{id}})",
            self.restocked.0, self.restocked.1
        )?;
        let classes: Vec<String> = self
            .class_hit_ratios
            .iter()
            .map(|(class, ratio)| format!("{class} {}", percent(*ratio)))
            .collect();
        writeln!(
            f,
            "  catalog hit ratio: {} (L1 {}) — {}",
            percent(self.hit_ratio),
            percent(self.l1_hit_ratio),
            classes.join(", ")
        )?;
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let per_request = self.db_queries as f64 / self.requests.max(1) as f64;
        writeln!(
            f,
            "  database queries: {} for {} requests served ({per_request:.2} per request)",
            self.db_queries, self.requests
        )?;
        writeln!(
            f,
            "  {:<32} {:>7} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p99", "max"
        )?;
        for l in &self.latencies {
            writeln!(
                f,
                "  {:<32} {:>7} {:>9.2} {:>9.2} {:>9.2}",
                l.endpoint,
                l.count,
                millis(l.p50_us),
                millis(l.p99_us),
                millis(l.max_us)
            )?;
        }
        writeln!(f, "checks:")?;
        for check in &self.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            writeln!(f, "  {mark} {}: {}", check.name, check.detail)?;
        }
        if self.passed() {
            write!(f, "replay: all {} checks passed", self.checks.len())
        } else {
            let failed = self.checks.iter().filter(|c| !c.passed).count();
            write!(f, "replay: {failed} of {} checks FAILED", self.checks.len())
        }
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[allow(clippy::cast_precision_loss)]
fn millis(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{:.1} %", r * 100.0))
}

// ---- The history, read before the traffic ----------------------------------------------------------------

/// One historical order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HistoricOrder {
    id: i64,
    customer: String,
    /// `YYYY-MM-DD`.
    date: String,
    /// Seconds since 1970 (UTC) of its date.
    at: i64,
    /// `(product, quantity)` in the history's order.
    lines: Vec<(i64, i64)>,
}

#[derive(Debug)]
struct History {
    orders: Vec<HistoricOrder>,
    /// Product → (category, stock).
    products: HashMap<i64, (i64, i64)>,
    /// Category → its published products' ids, ascending (as its pages list them).
    categories: HashMap<i64, Vec<i64>>,
    /// The most ordered products in the whole history.
    popular: Vec<i64>,
    /// Customer → index (for its forwarded address).
    customers: HashMap<String, usize>,
    /// The highest order id before the replay: every order above it is new.
    max_order_id: i64,
    /// Product → (orders, units) in `product_popularity` before the replay.
    popularity: HashMap<i64, (i64, i64)>,
}

fn open_read_only(file: &Path) -> Result<Connection, ReplayError> {
    let db_error = |source| ReplayError::Db {
        file: file.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_error)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(db_error)?;
    Ok(conn)
}

/// The identity in `file` (`database_identity`, see [`crate::Db::id`]); `None` when the file has none
/// (no storefront that knows identities has opened it).
fn read_database_id(file: &Path) -> Result<Option<String>, ReplayError> {
    let conn = open_read_only(file)?;
    let db_error = |source| ReplayError::Db {
        file: file.to_owned(),
        source,
    };
    let has_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'database_identity')",
            [],
            |r| r.get(0),
        )
        .map_err(db_error)?;
    if !has_table {
        return Ok(None);
    }
    conn.query_row(
        "SELECT id FROM database_identity WHERE only_row = 1",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(db_error)
}

/// Whether the shop (its `/healthz` `database_id`) serves the database in `file` (`file_id`).
///
/// # Errors
/// [`ReplayError::WrongDatabase`] saying what differs; [`ReplayError::UnknownDatabase`] when the shop
/// names none.
fn same_database(
    options: &ReplayOptions,
    file_id: Option<&str>,
    shop_id: Option<&str>,
) -> Result<(), ReplayError> {
    let wrong = |reason: String| ReplayError::WrongDatabase {
        file: options.db_path.clone(),
        url: options.url.clone(),
        reason,
    };
    match (file_id, shop_id) {
        (_, None) => Err(ReplayError::UnknownDatabase {
            file: options.db_path.clone(),
            url: options.url.clone(),
        }),
        (None, Some(shop)) => Err(wrong(format!(
            "the file has no database id (no storefront of this version has opened it), the shop's \
             database id is {shop}; pass the --db the shop was started with"
        ))),
        (Some(file), Some(shop)) if file != shop => Err(wrong(format!(
            "the file's database id is {file}, the shop's (GET /healthz) is {shop}; pass the --db the \
             shop was started with"
        ))),
        (Some(_), Some(_)) => Ok(()),
    }
}

async fn blocking<T, F>(f: F) -> Result<T, ReplayError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ReplayError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?
}

fn read_history(file: &Path, limit: Option<usize>) -> Result<History, ReplayError> {
    let conn = open_read_only(file)?;
    let db_error = |source| ReplayError::Db {
        file: file.to_owned(),
        source,
    };
    let mut orders: Vec<HistoricOrder> = Vec::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT o.id, o.customer_id, o.order_date, l.product_id, l.quantity \
                 FROM orders o JOIN order_lines l ON l.order_id = o.id \
                 WHERE o.origin = 'northwind' ORDER BY o.order_date, o.id, l.rowid",
            )
            .map_err(db_error)?;
        let mut rows = stmt.query([]).map_err(db_error)?;
        while let Some(row) = rows.next().map_err(db_error)? {
            let id: i64 = row.get(0).map_err(db_error)?;
            let line = (
                row.get::<_, i64>(3).map_err(db_error)?,
                row.get::<_, i64>(4).map_err(db_error)?,
            );
            match orders.last_mut() {
                Some(last) if last.id == id => last.lines.push(line),
                _ => {
                    let date: String = row.get(2).map_err(db_error)?;
                    let Some(at) = seconds_since_epoch(&date) else {
                        return Err(ReplayError::Db {
                            file: file.to_owned(),
                            source: rusqlite::Error::InvalidColumnType(
                                2,
                                format!("order {id}'s order_date {date:?}"),
                                rusqlite::types::Type::Text,
                            ),
                        });
                    };
                    orders.push(HistoricOrder {
                        id,
                        customer: row.get(1).map_err(db_error)?,
                        date: date.get(..10).unwrap_or(&date).to_owned(),
                        at,
                        lines: vec![line],
                    });
                }
            }
        }
    }
    if orders.is_empty() {
        return Err(ReplayError::NoHistory {
            file: file.to_owned(),
        });
    }
    let popular = {
        let mut stmt = conn
            .prepare(
                "SELECT l.product_id FROM order_lines l JOIN orders o ON o.id = l.order_id \
                 WHERE o.origin = 'northwind' GROUP BY l.product_id \
                 ORDER BY COUNT(*) DESC, l.product_id LIMIT ?1",
            )
            .map_err(db_error)?;
        stmt.query_map([POPULAR_PRODUCTS as i64], |r| r.get::<_, i64>(0))
            .map_err(db_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?
    };
    if let Some(limit) = limit {
        orders.truncate(limit);
    }
    let mut products = HashMap::new();
    let mut categories: HashMap<i64, Vec<i64>> = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT id, category_id, stock, published FROM products ORDER BY id")
            .map_err(db_error)?;
        let mut rows = stmt.query([]).map_err(db_error)?;
        while let Some(row) = rows.next().map_err(db_error)? {
            let id: i64 = row.get(0).map_err(db_error)?;
            let category: i64 = row.get(1).map_err(db_error)?;
            products.insert(id, (category, row.get(2).map_err(db_error)?));
            if row.get::<_, bool>(3).map_err(db_error)? {
                categories.entry(category).or_default().push(id);
            }
        }
    }
    let mut customers: Vec<String> = orders.iter().map(|o| o.customer.clone()).collect();
    customers.sort();
    customers.dedup();
    let customers = customers
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i))
        .collect();
    let max_order_id = conn
        .query_row("SELECT COALESCE(MAX(id), 0) FROM orders", [], |r| r.get(0))
        .map_err(db_error)?;
    let popularity = read_popularity(&conn).map_err(db_error)?;
    Ok(History {
        orders,
        products,
        categories,
        popular,
        customers,
        max_order_id,
        popularity,
    })
}

fn read_popularity(conn: &Connection) -> rusqlite::Result<HashMap<i64, (i64, i64)>> {
    let mut stmt = conn.prepare("SELECT product_id, orders, units FROM product_popularity")?;
    stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
        .collect()
}

/// Seconds since 1970-01-01 UTC of `YYYY-MM-DD[ HH:MM:SS[.mmm]]` (Northwind's dates carry no zone).
fn seconds_since_epoch(date: &str) -> Option<i64> {
    let field = |range: std::ops::Range<usize>| -> Option<i64> {
        let text = date.get(range)?;
        text.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| text.parse().ok())?
    };
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    if date.get(4..5)? != "-" || date.get(7..8)? != "-" || !(1..=12).contains(&month) {
        return None;
    }
    if !(1..=31).contains(&day) {
        return None;
    }
    let clock = if date.len() >= 19 {
        field(11..13)? * 3600 + field(14..16)? * 60 + field(17..19)?
    } else {
        0
    };
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + clock)
}

// ---- The shop, over HTTP --------------------------------------------------------------------------------------

/// What the replay measures while it runs.
#[derive(Default)]
struct Recorder {
    histograms: BTreeMap<&'static str, Histogram<u64>>,
    requests: u64,
    request_errors: u64,
    logins: u64,
    logins_limited: u64,
    /// Browsing and login answers other than `200`, quoted.
    unexpected: Vec<String>,
    unexpected_count: u64,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
}

/// A response body.
struct Body(Vec<u8>);

impl Body {
    /// The start of the body as text, for messages.
    fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        let mut end = text.len().min(200);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_owned()
    }
}

#[derive(Clone)]
struct Shop {
    http: reqwest::Client,
    base: String,
    recorder: Arc<Mutex<Recorder>>,
}

impl Shop {
    fn new(url: &str) -> Result<Shop, ReplayError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("storefront-replay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ReplayError::Http {
                what: "building the HTTP client".into(),
                source,
            })?;
        Ok(Shop {
            http,
            base: url.trim_end_matches('/').to_owned(),
            recorder: Arc::new(Mutex::new(Recorder::default())),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn recorder(&self) -> std::sync::MutexGuard<'_, Recorder> {
        // A panic while holding it leaves counts, not broken invariants.
        self.recorder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Send `request`, timing it under `endpoint` (counted in the traffic's requests).
    async fn send(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, reqwest::Error> {
        let started = Instant::now();
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>(Answer {
                status,
                headers,
                body: Body(body.to_vec()),
            })
        }
        .await;
        let elapsed = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut recorder = self.recorder();
        recorder.requests += 1;
        match &result {
            Ok(_) => {
                let histogram = recorder.histograms.entry(endpoint).or_insert_with(|| {
                    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
                });
                histogram.saturating_record(elapsed.max(1));
            }
            Err(_) => recorder.request_errors += 1,
        }
        result
    }

    fn unexpected(&self, what: String) {
        let mut recorder = self.recorder();
        recorder.unexpected_count += 1;
        if recorder.unexpected.len() < QUOTED {
            recorder.unexpected.push(what);
        }
    }

    /// `/dashboard/data`'s figures (not counted in the traffic).
    async fn dashboard(&self) -> Result<DashboardFigures, ReplayError> {
        let what = || format!("GET {}", self.url("/dashboard/data"));
        let response = self
            .http
            .get(self.url("/dashboard/data"))
            .send()
            .await
            .map_err(|source| ReplayError::Http {
                what: what(),
                source,
            })?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(ReplayError::Refused {
                what: what(),
                status: status.as_u16(),
                body: Body(body.into_bytes()).excerpt(),
            });
        }
        response.json().await.map_err(|source| ReplayError::Http {
            what: what(),
            source,
        })
    }

    /// The `database_id` of the shop's `/healthz` (not counted in the traffic); `None` if it names none.
    /// A `503` (the store down) still names it.
    async fn database_id(&self) -> Result<Option<String>, ReplayError> {
        let what = || format!("GET {}", self.url("/healthz"));
        let response = self
            .http
            .get(self.url("/healthz"))
            .send()
            .await
            .map_err(|source| ReplayError::Http {
                what: what(),
                source,
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|source| ReplayError::Http {
            what: what(),
            source,
        })?;
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("database_id")?.as_str().map(str::to_owned));
        if id.is_none() && status != StatusCode::OK {
            return Err(ReplayError::Refused {
                what: what(),
                status: status.as_u16(),
                body: Body(body.to_vec()).excerpt(),
            });
        }
        Ok(id)
    }

    /// `PATCH /admin/products/{id}` setting its stock; returns the stock written.
    async fn set_stock(&self, token: &AdminToken, id: i64, stock: i64) -> Result<i64, ReplayError> {
        let what = format!("PATCH /admin/products/{id} (restock to {stock})");
        let response = self
            .http
            .patch(self.url(&format!("/admin/products/{id}")))
            .bearer_auth(token.expose())
            .json(&serde_json::json!({ "stock": stock }))
            .send()
            .await
            .map_err(|source| ReplayError::Http {
                what: what.clone(),
                source,
            })?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(ReplayError::Refused {
                what,
                status: status.as_u16(),
                body: Body(body.into_bytes()).excerpt(),
            });
        }
        #[derive(Deserialize)]
        struct Written {
            stock: i64,
        }
        let written: Written = response
            .json()
            .await
            .map_err(|source| ReplayError::Http { what, source })?;
        Ok(written.stock)
    }
}

/// The part of `/dashboard/data` the replay reads.
#[derive(Clone, Debug, Deserialize)]
struct DashboardFigures {
    caches: Vec<CacheFigures>,
    db: DbFigures,
}

#[derive(Clone, Debug, Deserialize)]
struct CacheFigures {
    class: String,
    hits: u64,
    l1_hits: u64,
    misses: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct DbFigures {
    queries: u64,
}

/// Hit ratios over the traffic: `(all, L1, per class)`.
#[allow(clippy::type_complexity, clippy::cast_precision_loss)] // counts far below 2^52
fn hit_ratios(
    before: &DashboardFigures,
    after: &DashboardFigures,
) -> (Option<f64>, Option<f64>, Vec<(String, Option<f64>)>) {
    let (mut hits, mut l1, mut reads) = (0u64, 0u64, 0u64);
    let mut classes = Vec::new();
    for class in &after.caches {
        let old = before.caches.iter().find(|c| c.class == class.class);
        let delta = |now: u64, then: fn(&CacheFigures) -> u64| now - old.map_or(0, then).min(now);
        let h = delta(class.hits, |c| c.hits);
        let l = delta(class.l1_hits, |c| c.l1_hits);
        let m = delta(class.misses, |c| c.misses);
        classes.push((
            class.class.clone(),
            (h + m > 0).then(|| h as f64 / (h + m) as f64),
        ));
        hits += h;
        l1 += l;
        reads += h + m;
    }
    let ratio = |n: u64| (reads > 0).then(|| n as f64 / reads as f64);
    (ratio(hits), ratio(l1), classes)
}

// ---- The traffic -----------------------------------------------------------------------------------------------

/// A customer's side of the traffic: its address and session cookie.
struct CustomerState {
    forwarded_for: Option<IpAddr>,
    cookie: Option<String>,
}

/// How a duplicate was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    /// The answer was lost: the same request again after it.
    AfterAnswer,
    /// Two at once.
    DoubleClick,
}

/// What became of one historical order.
#[derive(Clone, Debug)]
struct Outcome {
    order: HistoricOrder,
    /// The web order's id, if it was answered `201`.
    placed: Option<i64>,
    /// Why not.
    failure: Option<String>,
    /// The duplicate, if sent: how, and what was wrong with its answer (`None`: replayed correctly).
    resend: Option<(Resend, Option<String>)>,
}

fn resend_kind(index: usize, every: u32) -> Option<Resend> {
    if every == 0 {
        return None;
    }
    let every = every as usize;
    if index.is_multiple_of(every) {
        Some(Resend::AfterAnswer)
    } else if every >= 2 && index % every == every / 2 {
        Some(Resend::DoubleClick)
    } else {
        None
    }
}

/// The address customer number `index` logs in from (`127.77.0.1` upwards: loopback, never routed).
fn customer_address(index: usize) -> IpAddr {
    let index = u32::try_from(index).unwrap_or(u32::MAX) % (250 * 250);
    IpAddr::V4(Ipv4Addr::new(
        127,
        77,
        u8::try_from(index / 250).unwrap_or(0),
        u8::try_from(index % 250 + 1).unwrap_or(1),
    ))
}

/// The `Retry-After` of `answer` in whole seconds (1 if absent), capped.
fn retry_after(answer: &Answer) -> Duration {
    let secs = answer
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, MAX_RETRY_AFTER_SECS))
}

fn with_customer(
    request: reqwest::RequestBuilder,
    customer: &CustomerState,
) -> reqwest::RequestBuilder {
    let mut request = request;
    if let Some(ip) = customer.forwarded_for {
        request = request.header("x-forwarded-for", ip.to_string());
    }
    if let Some(cookie) = &customer.cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request
}

/// Keep the session cookie a `Set-Cookie` sets (or drop it when cleared).
fn take_cookie(answer: &Answer, customer: &mut CustomerState) {
    for set in answer.headers.get_all(header::SET_COOKIE) {
        let Ok(set) = set.to_str() else { continue };
        let pair = set.split(';').next().unwrap_or_default().trim();
        if let Some((_, value)) = pair.split_once('=') {
            customer.cookie = (!value.is_empty()).then(|| pair.to_owned());
        }
    }
}

async fn login(shop: &Shop, id: &str, customer: &mut CustomerState) -> Result<(), String> {
    let body = serde_json::json!({
        "customer_id": id,
        "password": crate::import::demo_password(id),
    });
    customer.cookie = None;
    for _ in 0..LOGIN_ATTEMPTS {
        let request = with_customer(shop.http.post(shop.url("/login")), customer).json(&body);
        let answer = match shop.send("POST /login", request).await {
            Ok(answer) => answer,
            Err(error) => return Err(format!("POST /login as {id}: {error}")),
        };
        match answer.status {
            StatusCode::OK => {
                take_cookie(&answer, customer);
                if customer.cookie.is_none() {
                    return Err(format!("POST /login as {id}: 200 without a session cookie"));
                }
                shop.recorder().logins += 1;
                return Ok(());
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                let wait = retry_after(&answer);
                let first = {
                    let mut recorder = shop.recorder();
                    recorder.logins_limited += 1;
                    recorder.logins_limited == 1
                };
                if first && answer.status == StatusCode::TOO_MANY_REQUESTS {
                    tracing::warn!(
                        wait_s = wait.as_secs(),
                        "replay: a login limit refused a login; waiting it out. The per-IP limit: start \
                         the shop with --trust-proxy 127.0.0.1, so that each customer logs in from its own \
                         address. The per-account limit (5 logins per 15 minutes per customer): replays \
                         run again within 15 minutes log the same customers in again, and wait up to that"
                    );
                }
                tokio::time::sleep(wait).await;
            }
            status => {
                let what = format!("POST /login as {id}: {status} {}", answer.body.excerpt());
                shop.unexpected(what.clone());
                return Err(what);
            }
        }
    }
    Err(format!(
        "POST /login as {id}: still refused after {LOGIN_ATTEMPTS} attempts"
    ))
}

/// `POST /orders` under `key`, retried as a careful client retries (same key): network errors, `5xx`,
/// `409` with `Retry-After` (in progress), and a `401` after logging in again.
async fn post_order(
    shop: &Shop,
    endpoint: &'static str,
    id: &str,
    customer: &mut CustomerState,
    key: &str,
    body: &[u8],
) -> Result<Answer, String> {
    let mut last = String::new();
    for attempt in 0..ORDER_ATTEMPTS {
        let request = with_customer(shop.http.post(shop.url("/orders")), customer)
            .header("idempotency-key", key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        let backoff = Duration::from_millis(100 << attempt.min(5));
        match shop.send(endpoint, request).await {
            Err(error) => {
                last = format!("{error}");
                tokio::time::sleep(backoff).await;
            }
            Ok(answer) if answer.status == StatusCode::UNAUTHORIZED => {
                last = format!("401 {}", answer.body.excerpt());
                login(shop, id, customer).await?;
            }
            Ok(answer)
                if answer.status == StatusCode::CONFLICT
                    && answer.headers.contains_key(header::RETRY_AFTER) =>
            {
                last = "409 in progress".to_owned();
                tokio::time::sleep(retry_after(&answer)).await;
            }
            Ok(answer) if answer.status.is_server_error() => {
                last = format!("{} {}", answer.status, answer.body.excerpt());
                tokio::time::sleep(backoff).await;
            }
            Ok(answer) => return Ok(answer),
        }
    }
    Err(format!(
        "POST /orders ({key}): no answer after {ORDER_ATTEMPTS} attempts; last: {last}"
    ))
}

fn is_replayed(answer: &Answer) -> bool {
    answer
        .headers
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

fn placed_order(answer: &Answer) -> Result<Order, String> {
    if answer.status != StatusCode::CREATED {
        return Err(format!(
            "POST /orders answered {}: {}",
            answer.status,
            answer.body.excerpt()
        ));
    }
    serde_json::from_slice(&answer.body.0)
        .map_err(|e| format!("POST /orders answered 201 with a body that is not an order: {e}"))
}

/// Browse what the order holds, plus two popular products.
async fn browse(shop: &Shop, history: &History, order: &HistoricOrder, customer: &CustomerState) {
    let mut gets: Vec<(&'static str, String)> = vec![("GET /categories", "/categories".into())];
    let mut pages = Vec::new();
    for (product, _) in &order.lines {
        let Some((category, _)) = history.products.get(product) else {
            continue;
        };
        let position = history
            .categories
            .get(category)
            .and_then(|ids| ids.iter().position(|id| id == product))
            .unwrap_or(0);
        let page = position / DEFAULT_PER_PAGE as usize + 1;
        if !pages.contains(&(*category, page)) {
            pages.push((*category, page));
        }
    }
    for (category, page) in pages {
        gets.push((
            "GET /categories/{id}/products",
            format!("/categories/{category}/products?page={page}"),
        ));
    }
    for (product, _) in &order.lines {
        gets.push(("GET /products/{id}", format!("/products/{product}")));
    }
    if !history.popular.is_empty() {
        let n = history.popular.len();
        let seed = usize::try_from(order.id.unsigned_abs()).unwrap_or(0);
        for pick in [seed % n, (seed / n + 1 + seed) % n] {
            gets.push((
                "GET /products/{id}",
                format!("/products/{}", history.popular[pick]),
            ));
        }
    }
    for (endpoint, path) in gets {
        let request = with_customer(shop.http.get(shop.url(&path)), customer);
        match shop.send(endpoint, request).await {
            Ok(answer) if answer.status == StatusCode::OK => {}
            Ok(answer) => shop.unexpected(format!(
                "GET {path}: {} {}",
                answer.status,
                answer.body.excerpt()
            )),
            Err(error) => shop.unexpected(format!("GET {path}: {error}")),
        }
    }
}

async fn play_order(
    shop: Shop,
    history: Arc<History>,
    order: HistoricOrder,
    customer: Arc<tokio::sync::Mutex<CustomerState>>,
    key: String,
    resend: Option<Resend>,
) -> Outcome {
    // One order of a customer at a time: a customer browses and orders in one session.
    let mut customer = customer.lock().await;
    let mut outcome = Outcome {
        order: order.clone(),
        placed: None,
        failure: None,
        resend: None,
    };
    if customer.cookie.is_none()
        && let Err(failure) = login(&shop, &order.customer, &mut customer).await
    {
        outcome.failure = Some(failure);
        return outcome;
    }
    browse(&shop, &history, &order, &customer).await;
    let request = OrderRequest {
        lines: order
            .lines
            .iter()
            .map(|&(product_id, quantity)| LineRequest {
                product_id,
                quantity,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&request).expect("an order request serializes");
    let id = order.customer.clone();
    let first = match resend {
        Some(Resend::DoubleClick) => {
            // Two requests at once, each with its own copy of the session (same cookie).
            let mut twin = CustomerState {
                forwarded_for: customer.forwarded_for,
                cookie: customer.cookie.clone(),
            };
            let (a, b) = tokio::join!(
                post_order(&shop, "POST /orders", &id, &mut customer, &key, &body),
                post_order(&shop, "POST /orders (resent)", &id, &mut twin, &key, &body),
            );
            if twin.cookie != customer.cookie && twin.cookie.is_some() {
                customer.cookie = twin.cookie;
            }
            let verdict = match (&a, &b) {
                (Ok(a), Ok(b)) => double_click_verdict(a, b),
                (Err(e), _) | (_, Err(e)) => Some(e.clone()),
            };
            outcome.resend = Some((Resend::DoubleClick, verdict));
            match (a, b) {
                (Ok(a), Ok(b)) => Ok(if is_replayed(&a) { b } else { a }),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        _ => post_order(&shop, "POST /orders", &id, &mut customer, &key, &body).await,
    };
    let placed = first.and_then(|answer| placed_order(&answer));
    match placed {
        Ok(placed) => outcome.placed = Some(placed.id),
        Err(failure) => {
            outcome.failure = Some(failure);
            return outcome;
        }
    }
    if resend == Some(Resend::AfterAnswer) {
        let again = post_order(
            &shop,
            "POST /orders (resent)",
            &id,
            &mut customer,
            &key,
            &body,
        )
        .await;
        let verdict = match again {
            Err(e) => Some(e),
            Ok(answer) => replay_verdict(&answer, outcome.placed),
        };
        outcome.resend = Some((Resend::AfterAnswer, verdict));
    }
    outcome
}

/// What is wrong with `answer` as the replay of the order `placed` (`None`: nothing).
fn replay_verdict(answer: &Answer, placed: Option<i64>) -> Option<String> {
    if !is_replayed(answer) {
        return Some(format!(
            "a duplicate answered {} without Idempotent-Replayed: true",
            answer.status
        ));
    }
    match placed_order(answer) {
        Ok(order) if Some(order.id) == placed => None,
        Ok(order) => Some(format!(
            "the duplicate replayed order {} instead of {placed:?}",
            order.id
        )),
        Err(e) => Some(e),
    }
}

/// What is wrong with two simultaneous answers to one request (`None`: one fresh, one replayed, one
/// order).
fn double_click_verdict(a: &Answer, b: &Answer) -> Option<String> {
    let (fresh, replayed) = match (is_replayed(a), is_replayed(b)) {
        (false, true) => (a, b),
        (true, false) => (b, a),
        (false, false) => return Some("both clicks ran: neither answer was replayed".into()),
        // Both replayed: the first attempt's answer was lost to a retry (a network error); fine if
        // they agree.
        (true, true) => (a, b),
    };
    let fresh = placed_order(fresh).ok().map(|o| o.id);
    replay_verdict(replayed, fresh)
}

async fn play(shop: &Shop, history: &Arc<History>, options: &ReplayOptions) -> Vec<Outcome> {
    let run: u64 = rand::random();
    let run = format!("{run:016x}");
    let sessions: HashMap<String, Arc<tokio::sync::Mutex<CustomerState>>> = history
        .customers
        .iter()
        .map(|(id, &index)| {
            let state = CustomerState {
                forwarded_for: options.forwarded_for.then(|| customer_address(index)),
                cookie: None,
            };
            (id.clone(), Arc::new(tokio::sync::Mutex::new(state)))
        })
        .collect();
    let semaphore = Arc::new(Semaphore::new(options.concurrency));
    let started = tokio::time::Instant::now();
    let t0 = history.orders.first().map_or(0, |o| o.at);
    let paced = options.speedup > 0.0 && options.speedup.is_finite();
    let mut tasks = tokio::task::JoinSet::new();
    let total = history.orders.len();
    for (index, order) in history.orders.iter().enumerate() {
        if paced {
            #[allow(clippy::cast_precision_loss)] // seconds of two years
            let due = (order.at - t0).max(0) as f64 / options.speedup;
            tokio::time::sleep_until(started + Duration::from_secs_f64(due)).await;
        }
        let permit = Arc::clone(&semaphore)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let session = Arc::clone(&sessions[&order.customer]);
        let key = format!("\"replay-{run}-{}\"", order.id);
        let (shop, history, order) = (shop.clone(), Arc::clone(history), order.clone());
        let resend = resend_kind(index, options.resend_every);
        tasks.spawn(async move {
            let outcome = play_order(shop, history, order, session, key, resend).await;
            drop(permit);
            (index, outcome)
        });
        if (index + 1) % 100 == 0 {
            tracing::info!("replay: {} of {total} orders started", index + 1);
        }
    }
    let mut outcomes = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => tracing::error!(%error, "replay: an order's task failed"),
        }
    }
    outcomes.sort_by_key(|(index, _)| *index);
    outcomes.into_iter().map(|(_, o)| o).collect()
}

// ---- The checks -------------------------------------------------------------------------------------------------

/// An order row and its lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct StoredOrder {
    customer: String,
    /// `web` or `northwind`.
    origin: String,
    /// `(product, quantity)`, by product.
    lines: Vec<(i64, i64)>,
}

/// What the database holds after the traffic.
#[derive(Clone, Debug, Default)]
struct FinalState {
    /// New orders (above the history's highest id), by id.
    orders: BTreeMap<i64, StoredOrder>,
    /// Product → stock.
    stock: HashMap<i64, i64>,
    /// New orders with a confirmation, and how many each has.
    notified: HashMap<i64, i64>,
    /// Product → (orders, units) in `product_popularity`.
    popularity: HashMap<i64, (i64, i64)>,
}

fn read_final(file: &Path, above: i64) -> Result<FinalState, ReplayError> {
    let conn = open_read_only(file)?;
    let db_error = |source| ReplayError::Db {
        file: file.to_owned(),
        source,
    };
    let mut state = FinalState::default();
    {
        let mut stmt = conn
            .prepare("SELECT id, customer_id, origin FROM orders WHERE id > ?1")
            .map_err(db_error)?;
        let rows = stmt
            .query_map([above], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
            })
            .map_err(db_error)?;
        for row in rows {
            let (id, customer, origin) = row.map_err(db_error)?;
            state.orders.insert(
                id,
                StoredOrder {
                    customer,
                    origin,
                    lines: Vec::new(),
                },
            );
        }
        let mut stmt = conn
            .prepare(
                "SELECT order_id, product_id, quantity FROM order_lines WHERE order_id > ?1 \
                 ORDER BY order_id, product_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([above], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
            })
            .map_err(db_error)?;
        for row in rows {
            let (order, product, quantity) = row.map_err(db_error)?;
            if let Some(stored) = state.orders.get_mut(&order) {
                stored.lines.push((product, quantity));
            }
        }
        let mut stmt = conn
            .prepare("SELECT id, stock FROM products")
            .map_err(db_error)?;
        state.stock = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_error)?
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
        let mut stmt = conn
            .prepare(
                "SELECT order_id, COUNT(*) FROM notifications WHERE order_id > ?1 AND kind = ?2 \
                 GROUP BY order_id",
            )
            .map_err(db_error)?;
        state.notified = stmt
            .query_map(rusqlite::params![above, ORDER_CONFIRMATION], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(db_error)?
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
    }
    state.popularity = read_popularity(&conn).map_err(db_error)?;
    Ok(state)
}

fn quote(failures: &[String]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let more = failures.len().saturating_sub(QUOTED);
    let mut text = format!(
        "; {}",
        failures
            .iter()
            .take(QUOTED)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

fn sorted(lines: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut lines = lines.to_vec();
    lines.sort_unstable();
    lines
}

/// Every order answered `201`.
fn check_answered(outcomes: &[Outcome]) -> Check {
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.failure
                .as_ref()
                .map(|f| format!("order {}: {f}", o.order.id))
        })
        .collect();
    let placed = outcomes.iter().filter(|o| o.placed.is_some()).count();
    Check {
        name: checks::ANSWERED,
        passed: placed == outcomes.len() && failures.is_empty(),
        detail: format!("{placed} of {} placed{}", outcomes.len(), quote(&failures)),
    }
}

/// The new orders are exactly the answered ones, once each, with their customer and lines.
fn check_stored_once(outcomes: &[Outcome], state: &FinalState) -> Check {
    let mut failures = Vec::new();
    let mut answered = HashSet::new();
    for outcome in outcomes {
        let Some(id) = outcome.placed else { continue };
        if !answered.insert(id) {
            failures.push(format!(
                "order {id} was the answer to two historical orders"
            ));
            continue;
        }
        match state.orders.get(&id) {
            None => failures.push(format!(
                "order {id} (Northwind {}) is not in the database",
                outcome.order.id
            )),
            Some(StoredOrder {
                customer,
                origin,
                lines,
            }) => {
                if customer != &outcome.order.customer || origin != "web" {
                    failures.push(format!(
                        "order {id} is {customer}'s ({origin}), not {}'s (web)",
                        outcome.order.customer
                    ));
                }
                if *lines != sorted(&outcome.order.lines) {
                    failures.push(format!(
                        "order {id}'s lines {lines:?} are not Northwind {}'s {:?}",
                        outcome.order.id,
                        sorted(&outcome.order.lines)
                    ));
                }
            }
        }
    }
    let extra: Vec<i64> = state
        .orders
        .keys()
        .filter(|id| !answered.contains(id))
        .copied()
        .collect();
    for id in &extra {
        let StoredOrder {
            customer, lines, ..
        } = &state.orders[id];
        failures.push(format!(
            "order {id} ({customer}, {lines:?}) was stored but never answered: a duplicate?"
        ));
    }
    Check {
        name: checks::STORED_ONCE,
        passed: failures.is_empty(),
        detail: format!(
            "{} answered, {} new orders stored, {} stored without an answer{}",
            answered.len(),
            state.orders.len(),
            extra.len(),
            quote(&failures)
        ),
    }
}

/// Every duplicate was replayed.
fn check_replayed(outcomes: &[Outcome]) -> Check {
    let sent: Vec<&Outcome> = outcomes.iter().filter(|o| o.resend.is_some()).collect();
    let after = sent
        .iter()
        .filter(|o| matches!(o.resend, Some((Resend::AfterAnswer, _))))
        .count();
    let failures: Vec<String> = sent
        .iter()
        .filter_map(|o| match &o.resend {
            Some((how, Some(wrong))) => Some(format!("order {} ({how:?}): {wrong}", o.order.id)),
            _ => None,
        })
        .collect();
    Check {
        name: checks::REPLAYED,
        passed: failures.is_empty(),
        detail: format!(
            "{} re-sent ({after} after a lost answer, {} as double clicks), {} replayed with the same order{}",
            sent.len(),
            sent.len() - after,
            sent.len() - failures.len(),
            quote(&failures)
        ),
    }
}

/// Final stock = stock after the restock − what the placed orders took, for every product; `restocked`
/// (units the restock added) only splits the figures in the detail.
fn check_stock(
    outcomes: &[Outcome],
    start: &HashMap<i64, i64>,
    restocked: i64,
    state: &FinalState,
) -> Check {
    let mut ordered: HashMap<i64, i64> = HashMap::new();
    for outcome in outcomes.iter().filter(|o| o.placed.is_some()) {
        for (product, quantity) in &outcome.order.lines {
            *ordered.entry(*product).or_default() += quantity;
        }
    }
    let mut failures = Vec::new();
    let mut ids: Vec<&i64> = start.keys().collect();
    ids.sort_unstable();
    for id in ids {
        let expected = start[id] - ordered.get(id).copied().unwrap_or(0);
        match state.stock.get(id) {
            Some(&actual) if actual == expected => {}
            actual => failures.push(format!(
                "product {id}: {} − {} ordered = {expected}, the database holds {actual:?}",
                start[id],
                ordered.get(id).copied().unwrap_or(0)
            )),
        }
    }
    let units: i64 = ordered.values().sum();
    let after_restock: i64 = start.values().sum();
    Check {
        name: checks::STOCK,
        passed: failures.is_empty(),
        detail: format!(
            "{} products: {} units at the start + {restocked} restocked − {units} ordered = {} expected, {} in the database{}",
            start.len(),
            after_restock - restocked,
            after_restock - units,
            start
                .keys()
                .filter_map(|id| state.stock.get(id))
                .sum::<i64>(),
            quote(&failures)
        ),
    }
}

/// One confirmation per placed order, and the popularity counts grown by exactly its lines.
fn check_worker(
    outcomes: &[Outcome],
    popularity_before: &HashMap<i64, (i64, i64)>,
    state: &FinalState,
) -> Check {
    let mut failures = Vec::new();
    let mut grown: HashMap<i64, (i64, i64)> = HashMap::new();
    for outcome in outcomes {
        let Some(id) = outcome.placed else { continue };
        match state.notified.get(&id) {
            Some(1) => {}
            count => failures.push(format!("order {id}: {} confirmations", count.unwrap_or(&0))),
        }
        for (product, quantity) in &outcome.order.lines {
            let entry = grown.entry(*product).or_default();
            entry.0 += 1;
            entry.1 += quantity;
        }
    }
    let mut products: Vec<i64> = grown
        .keys()
        .chain(state.popularity.keys())
        .copied()
        .collect();
    products.sort_unstable();
    products.dedup();
    for product in products {
        let before = popularity_before.get(&product).copied().unwrap_or((0, 0));
        let after = state.popularity.get(&product).copied().unwrap_or((0, 0));
        let expected = grown.get(&product).copied().unwrap_or((0, 0));
        let delta = (after.0 - before.0, after.1 - before.1);
        if delta != expected {
            failures.push(format!(
                "product {product}: popularity grew by {delta:?} (orders, units), the orders imply {expected:?}"
            ));
        }
    }
    let placed = outcomes.iter().filter(|o| o.placed.is_some()).count();
    Check {
        name: checks::WORKER,
        passed: failures.is_empty(),
        detail: format!(
            "{} of {placed} orders confirmed once, popularity of {} products{}",
            state.notified.values().filter(|&&n| n == 1).count(),
            grown.len(),
            quote(&failures)
        ),
    }
}

/// Every browsing request and login answered `200`.
fn check_browsing(recorder: &Recorder) -> Check {
    Check {
        name: checks::BROWSING,
        passed: recorder.unexpected_count == 0,
        detail: format!(
            "{} answers other than 200{}",
            recorder.unexpected_count,
            quote(&recorder.unexpected)
        ),
    }
}

// ---- The whole run ------------------------------------------------------------------------------------------------

/// Restock every product the replayed orders need more of than it holds; returns each product's stock
/// afterwards (as the database or the admin route said) and `(products restocked, units added)`.
async fn restock(
    shop: &Shop,
    options: &ReplayOptions,
    history: &History,
) -> Result<(HashMap<i64, i64>, (usize, i64)), ReplayError> {
    let mut needed: BTreeMap<i64, i64> = BTreeMap::new();
    for order in &history.orders {
        for (product, quantity) in &order.lines {
            *needed.entry(*product).or_default() += quantity;
        }
    }
    let mut stock: HashMap<i64, i64> = history
        .products
        .iter()
        .map(|(id, (_, stock))| (*id, *stock))
        .collect();
    let (mut products, mut units) = (0, 0);
    for (product, need) in needed {
        let have = stock.get(&product).copied().unwrap_or(0);
        if have >= need {
            continue;
        }
        let written = shop.set_stock(&options.admin_token, product, need).await?;
        products += 1;
        units += written - have;
        stock.insert(product, written);
    }
    Ok((stock, (products, units)))
}

/// Replay the history against the shop `options` name, then check the database (see the module docs).
///
/// # Errors
/// [`ReplayError`] when the replay cannot run: an option out of range, the database unreadable, not
/// the shop's (its id differs from the one the shop's `/healthz` names) or without history, the dashboard or the admin route unreachable or refusing (a wrong admin token). A
/// failed check is not an error: it is in the report ([`ReplayReport::passed`]).
pub async fn run(options: ReplayOptions) -> Result<ReplayReport, ReplayError> {
    options.check()?;
    let shop = Shop::new(&options.url)?;
    // First of all, that `--db` is the shop's database: the restock below writes to the shop, and the
    // checks read the file, so a replay against another database would change the shop and then fail
    // every check at the end. Each database has an id made once at its creation (`Db::id`); the shop
    // names its own in `/healthz`.
    let file = options.db_path.clone();
    let file_id = blocking(move || read_database_id(&file)).await?;
    let shop_id = shop.database_id().await?;
    same_database(&options, file_id.as_deref(), shop_id.as_deref())?;
    let file = options.db_path.clone();
    let limit = options.limit;
    let history = Arc::new(blocking(move || read_history(&file, limit)).await?);
    let (start_stock, restocked) = restock(&shop, &options, &history).await?;
    let before = shop.dashboard().await?;

    tracing::info!(
        "replay: {} orders, {} customers, against {}",
        history.orders.len(),
        history.customers.len(),
        options.url
    );
    let started = Instant::now();
    let outcomes = play(&shop, &history, &options).await;
    let elapsed = started.elapsed();
    let after = shop.dashboard().await?;

    let file = options.db_path.clone();
    let above = history.max_order_id;
    let mut state = blocking({
        let file = file.clone();
        move || read_final(&file, above)
    })
    .await?;
    if let Some(deadline) = options.worker_deadline {
        // The worker notifies asynchronously: wait (bounded) until every placed order is confirmed.
        let placed: HashSet<i64> = outcomes.iter().filter_map(|o| o.placed).collect();
        let until = Instant::now() + deadline;
        while !placed.iter().all(|id| state.notified.contains_key(id)) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let file = file.clone();
            state = blocking(move || read_final(&file, above)).await?;
        }
    }

    let recorder = shop.recorder();
    let mut checks = vec![
        check_answered(&outcomes),
        check_stored_once(&outcomes, &state),
        check_replayed(&outcomes),
        check_stock(&outcomes, &start_stock, restocked.1, &state),
        check_browsing(&recorder),
    ];
    if options.worker_deadline.is_some() {
        checks.push(check_worker(&outcomes, &history.popularity, &state));
    }
    let (hit_ratio, l1_hit_ratio, class_hit_ratios) = hit_ratios(&before, &after);
    let latencies = recorder
        .histograms
        .iter()
        .map(|(endpoint, h)| EndpointLatency {
            endpoint,
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        })
        .collect();
    Ok(ReplayReport {
        orders: outcomes.len(),
        placed: outcomes.iter().filter(|o| o.placed.is_some()).count(),
        span: (
            history
                .orders
                .first()
                .map(|o| o.date.clone())
                .unwrap_or_default(),
            history
                .orders
                .last()
                .map(|o| o.date.clone())
                .unwrap_or_default(),
        ),
        elapsed,
        speedup: options.speedup,
        concurrency: options.concurrency,
        requests: recorder.requests,
        request_errors: recorder.request_errors,
        logins: recorder.logins,
        logins_limited: recorder.logins_limited,
        resent: outcomes.iter().filter(|o| o.resend.is_some()).count(),
        restocked,
        hit_ratio,
        l1_hit_ratio,
        class_hit_ratios,
        db_queries: after.db.queries.saturating_sub(before.db.queries),
        latencies,
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: i64, customer: &str, lines: &[(i64, i64)]) -> HistoricOrder {
        HistoricOrder {
            id,
            customer: customer.into(),
            date: "1996-07-04".into(),
            at: 0,
            lines: lines.to_vec(),
        }
    }

    fn stored(customer: &str, lines: &[(i64, i64)]) -> StoredOrder {
        StoredOrder {
            customer: customer.into(),
            origin: "web".into(),
            lines: lines.to_vec(),
        }
    }

    fn placed(order: HistoricOrder, id: i64) -> Outcome {
        Outcome {
            order,
            placed: Some(id),
            failure: None,
            resend: None,
        }
    }

    /// Two orders placed as 1001 and 1002, stored as such, stock 10/5 → 7/4.
    fn consistent() -> (Vec<Outcome>, HashMap<i64, i64>, FinalState) {
        let outcomes = vec![
            placed(order(10248, "VINET", &[(2, 1), (1, 2)]), 1001),
            placed(order(10249, "TOMSP", &[(1, 1)]), 1002),
        ];
        let start = HashMap::from([(1, 10), (2, 5)]);
        let mut state = FinalState::default();
        state
            .orders
            .insert(1001, stored("VINET", &[(1, 2), (2, 1)]));
        state.orders.insert(1002, stored("TOMSP", &[(1, 1)]));
        state.stock = HashMap::from([(1, 7), (2, 4)]);
        state.notified = HashMap::from([(1001, 1), (1002, 1)]);
        state.popularity = HashMap::from([(1, (2, 3)), (2, (1, 1))]);
        (outcomes, start, state)
    }

    #[test]
    fn a_consistent_run_passes_every_check() {
        let (outcomes, start, state) = consistent();
        assert!(check_answered(&outcomes).passed);
        assert!(check_stored_once(&outcomes, &state).passed);
        assert!(check_replayed(&outcomes).passed);
        assert!(check_stock(&outcomes, &start, 0, &state).passed);
        assert!(check_worker(&outcomes, &HashMap::new(), &state).passed);
    }

    #[test]
    fn an_order_stored_twice_fails_the_once_check() {
        let (outcomes, _, mut state) = consistent();
        state.orders.insert(1003, stored("TOMSP", &[(1, 1)]));
        let check = check_stored_once(&outcomes, &state);
        assert!(!check.passed);
        assert!(check.detail.contains("order 1003"), "{}", check.detail);
    }

    #[test]
    fn a_missing_or_different_order_fails_the_once_check() {
        let (outcomes, _, mut state) = consistent();
        state.orders.remove(&1002);
        assert!(!check_stored_once(&outcomes, &state).passed);
        let (outcomes, _, mut state) = consistent();
        state.orders.get_mut(&1001).unwrap().lines = vec![(1, 2)];
        assert!(!check_stored_once(&outcomes, &state).passed);
        let (outcomes, _, mut state) = consistent();
        state.orders.get_mut(&1001).unwrap().customer = "TOMSP".into();
        assert!(!check_stored_once(&outcomes, &state).passed);
    }

    #[test]
    fn one_id_answered_for_two_orders_fails_the_once_check() {
        let (mut outcomes, _, state) = consistent();
        outcomes[1].placed = Some(1001);
        assert!(!check_stored_once(&outcomes, &state).passed);
    }

    #[test]
    fn stock_off_by_one_unit_fails_the_stock_check() {
        let (outcomes, start, mut state) = consistent();
        state.stock.insert(1, 6);
        let check = check_stock(&outcomes, &start, 0, &state);
        assert!(!check.passed);
        assert!(check.detail.contains("product 1"), "{}", check.detail);
    }

    #[test]
    fn a_failed_order_counts_nothing_against_the_stock_but_fails_the_answer_check() {
        let (mut outcomes, start, mut state) = consistent();
        outcomes[1].placed = None;
        outcomes[1].failure = Some("409".into());
        state.orders.remove(&1002);
        state.stock.insert(1, 8);
        assert!(check_stock(&outcomes, &start, 0, &state).passed);
        assert!(check_stored_once(&outcomes, &state).passed);
        assert!(!check_answered(&outcomes).passed);
    }

    #[test]
    fn a_duplicate_not_replayed_fails_the_replay_check() {
        let (mut outcomes, _, _) = consistent();
        outcomes[0].resend = Some((Resend::AfterAnswer, None));
        outcomes[1].resend = Some((Resend::DoubleClick, Some("both clicks ran".into())));
        let check = check_replayed(&outcomes);
        assert!(!check.passed);
        assert!(
            check
                .detail
                .starts_with("2 re-sent (1 after a lost answer, 1 as double clicks), 1 replayed")
        );
    }

    #[test]
    fn a_missing_confirmation_or_a_double_count_fails_the_worker_check() {
        let (outcomes, _, mut state) = consistent();
        state.notified.remove(&1002);
        assert!(!check_worker(&outcomes, &HashMap::new(), &state).passed);
        let (outcomes, _, mut state) = consistent();
        state.popularity.insert(1, (3, 4));
        assert!(!check_worker(&outcomes, &HashMap::new(), &state).passed);
        // Counts from before the replay are subtracted.
        let (outcomes, _, mut state) = consistent();
        state.popularity.insert(1, (7, 13));
        let before = HashMap::from([(1, (5, 10))]);
        assert!(check_worker(&outcomes, &before, &state).passed);
    }

    #[test]
    fn resends_alternate_after_the_answer_and_double_clicks() {
        let kinds: Vec<Option<Resend>> = (0..6).map(|i| resend_kind(i, 4)).collect();
        assert_eq!(
            kinds,
            [
                Some(Resend::AfterAnswer),
                None,
                Some(Resend::DoubleClick),
                None,
                Some(Resend::AfterAnswer),
                None
            ]
        );
        assert_eq!(resend_kind(0, 0), None);
        assert_eq!(resend_kind(1, 1), Some(Resend::AfterAnswer));
    }

    #[test]
    fn dates_become_seconds_since_1970() {
        assert_eq!(seconds_since_epoch("1970-01-01 00:00:00.000"), Some(0));
        assert_eq!(
            seconds_since_epoch("1996-07-04 00:00:00.000"),
            Some(836_438_400)
        );
        assert_eq!(seconds_since_epoch("1998-05-06"), Some(894_412_800));
        assert_eq!(
            seconds_since_epoch("2000-03-01 01:02:03"),
            Some(951_872_523)
        );
        for bad in ["", "1996-13-01", "1996/07/04", "96-07-04", "1996-07-x4"] {
            assert_eq!(seconds_since_epoch(bad), None, "{bad}");
        }
    }

    #[test]
    fn customers_get_distinct_loopback_addresses() {
        let addresses: HashSet<IpAddr> = (0..1000).map(customer_address).collect();
        assert_eq!(addresses.len(), 1000);
        assert!(addresses.iter().all(IpAddr::is_loopback));
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let token = AdminToken::new("0123456789abcdef").unwrap();
        let base = || ReplayOptions::new("http://127.0.0.1:1", "x.db", token.clone());
        for (options, name) in [
            (base().speedup(-1.0), "speedup"),
            (base().speedup(f64::NAN), "speedup"),
            (base().concurrency(0), "concurrency"),
            (base().limit(Some(0)), "limit"),
            (
                ReplayOptions::new("127.0.0.1:1", "x.db", token.clone()),
                "url",
            ),
        ] {
            match options.check() {
                Err(ReplayError::Option { option, .. }) => assert_eq!(option, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(base().speedup(0.0).check().is_ok());
    }

    #[test]
    fn another_database_is_refused_naming_the_file_and_both_ids() {
        let options = ReplayOptions::new(
            "http://127.0.0.1:8080",
            "other.db",
            AdminToken::new("0123456789abcdef").unwrap(),
        );
        assert!(same_database(&options, Some("aa"), Some("aa")).is_ok());
        let differ = same_database(&options, Some("aa"), Some("bb"))
            .unwrap_err()
            .to_string();
        assert!(
            differ.starts_with("other.db is not the database of the shop at http://127.0.0.1:8080")
                && differ.contains("the file's database id is aa")
                && differ.contains("is bb"),
            "{differ}"
        );
        let none = same_database(&options, None, Some("bb"))
            .unwrap_err()
            .to_string();
        assert!(
            none.contains("other.db") && none.contains("the file has no database id"),
            "{none}"
        );
        let silent = same_database(&options, Some("aa"), None).unwrap_err();
        assert!(
            matches!(silent, ReplayError::UnknownDatabase { .. }),
            "{silent:?}"
        );
        assert!(silent.to_string().contains("other.db"), "{silent}");
    }
}
