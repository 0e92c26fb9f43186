//! The nightly restock report: every product at or below its reorder level, written as one row per
//! night in `restock_reports`, by at most one instance at a time.
//!
//! **The one decision to know: the lock keeps two instances from running the job at once, and the
//! fencing token keeps a stalled one from writing late.** The job takes the `nightly_restock` lock
//! (`wait = "0s"`: an instance that finds it held skips the run) and writes the report row with the
//! guard's fencing token, in one transaction that refuses the write when the table already holds a newer
//! token ([`write_report`]): a holder that stalled past its lease while a newer one ran cannot overwrite
//! the newer report (docs/locks.md, "Why a lock is not enough"). A night that already has its report is
//! not written again, so two runs on one night leave one report however they interleave.
//!
//! It runs as `storefront restock-report`, or on a timer inside the server (`--restock-every`).
//! The report only reads the stock; it changes no product, so no cache is invalidated.

use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use keyward::Keyward;
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};
use crate::{AppError, AppState};

/// The lock class that guards the job (`crates/storefront/policy.toml`).
pub const RESTOCK_LOCK_CLASS: &str = "nightly_restock";

/// The lock's name within its class (one job).
pub const RESTOCK_LOCK_NAME: &str = "report";

/// One product at or below its reorder level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestockLine {
    /// The product id.
    pub product_id: i64,
    /// The product's name.
    pub name: String,
    /// Units in stock.
    pub stock: i64,
    /// Units already ordered from the supplier.
    pub units_on_order: i64,
    /// The stock level at or below which the product is reordered.
    pub reorder_level: i64,
}

/// What one run did (as JSON: `{"outcome": "written", …}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RestockOutcome {
    /// This run wrote the night's report.
    Written {
        /// The night (`YYYY-MM-DD`, UTC).
        night: String,
        /// The lock's fencing token, stored with the row.
        fencing_token: u64,
        /// The products in the report.
        lines: usize,
    },
    /// Another run holds the lock; this one did nothing.
    Skipped,
    /// The night already has its report; this run wrote nothing.
    AlreadyDone {
        /// The night (`YYYY-MM-DD`, UTC).
        night: String,
    },
    /// The table holds a newer fencing token than this run's: the write was refused.
    Stale {
        /// This run's token.
        fencing_token: u64,
        /// The newest token stored.
        newest: u64,
    },
}

/// What [`write_report`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReportWrite {
    /// The row was written.
    Written,
    /// The night already had its report (with a token not older than this one).
    AlreadyDone,
    /// Refused: a newer token is stored.
    Stale {
        /// The newest token stored.
        newest: u64,
    },
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestockError {
    /// The lock could not be taken (store unavailable, or the policy lacks `nightly_restock`).
    #[error("the {RESTOCK_LOCK_CLASS} lock: {0}")]
    Lock(#[from] keyward::Error),
    /// The database failed; nothing was written.
    #[error("the restock report: {0}")]
    Db(#[from] DbError),
}

/// Run the job once: take the lock (or skip), read the products at or below their reorder level, and
/// write tonight's report with the lock's fencing token.
///
/// # Errors
/// [`RestockError`] if the lock or the database failed (the row is then not written).
pub async fn run_once(kw: &Keyward, db: &Db) -> Result<RestockOutcome, RestockError> {
    let locks = kw.locks(RESTOCK_LOCK_CLASS)?;
    let Some(guard) = locks.lock(RESTOCK_LOCK_NAME).await? else {
        return Ok(RestockOutcome::Skipped);
    };
    let fencing_token = guard.fence();
    let outcome = db
        .write(move |tx| {
            let night: String = tx
                .query_row("SELECT date('now')", [], |row| row.get(0))
                .map_err(DbError::query("today's date"))?;
            let lines = low_stock(tx)?;
            let count = lines.len();
            let body = serde_json::to_string(&lines).map_err(|e| DbError::Invalid {
                what: "restock report",
                reason: e.to_string(),
            })?;
            Ok::<_, DbError>(match write_in(tx, &night, fencing_token, &body)? {
                ReportWrite::Written => RestockOutcome::Written {
                    night,
                    fencing_token,
                    lines: count,
                },
                ReportWrite::AlreadyDone => RestockOutcome::AlreadyDone { night },
                ReportWrite::Stale { newest } => RestockOutcome::Stale {
                    fencing_token,
                    newest,
                },
            })
        })
        .await?;
    if let Err(error) = guard.release().await {
        // The lease ends on its own; the next run waits at most its 30 s.
        tracing::warn!(%error, "releasing the restock lock failed");
    }
    Ok(outcome)
}

/// Write the report of `night` (`YYYY-MM-DD`) with `fencing_token`, refusing it when the table holds a
/// newer token (of any night) and writing nothing when the night already has a report.
///
/// # Errors
/// [`DbError`] if the transaction failed.
pub async fn write_report(
    db: &Db,
    night: &str,
    fencing_token: u64,
    body: &str,
) -> Result<ReportWrite, DbError> {
    let (night, body) = (night.to_owned(), body.to_owned());
    db.write(move |tx| write_in(tx, &night, fencing_token, &body))
        .await
}

fn write_in(
    tx: &rusqlite::Transaction<'_>,
    night: &str,
    fencing_token: u64,
    body: &str,
) -> Result<ReportWrite, DbError> {
    let token = i64::try_from(fencing_token).map_err(|_| DbError::Invalid {
        what: "fencing token",
        reason: format!("{fencing_token} is above SQLite's integer range"),
    })?;
    let newest: Option<i64> = tx
        .query_row(
            "SELECT MAX(fencing_token) FROM restock_reports",
            [],
            |row| row.get(0),
        )
        .map_err(DbError::query("the newest restock fencing token"))?;
    if let Some(newest) = newest
        && newest > token
    {
        return Ok(ReportWrite::Stale {
            newest: u64::try_from(newest).unwrap_or(0),
        });
    }
    let existing = tx
        .query_row(
            "SELECT 1 FROM restock_reports WHERE night = ?1",
            params![night],
            |_| Ok(()),
        )
        .optional()
        .map_err(DbError::query("tonight's restock report"))?;
    if existing.is_some() {
        return Ok(ReportWrite::AlreadyDone);
    }
    tx.execute(
        "INSERT INTO restock_reports (night, fencing_token, body, created_at)
         VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))",
        params![night, token, body],
    )
    .map_err(DbError::query("write the restock report"))?;
    Ok(ReportWrite::Written)
}

fn low_stock(tx: &rusqlite::Transaction<'_>) -> Result<Vec<RestockLine>, DbError> {
    let mut statement = tx
        .prepare_cached(
            "SELECT id, name, stock, units_on_order, reorder_level FROM products
             WHERE discontinued = 0 AND stock <= reorder_level ORDER BY id",
        )
        .map_err(DbError::query("products to restock"))?;
    let rows = statement
        .query_map([], |row| {
            Ok(RestockLine {
                product_id: row.get(0)?,
                name: row.get(1)?,
                stock: row.get(2)?,
                units_on_order: row.get(3)?,
                reorder_level: row.get(4)?,
            })
        })
        .map_err(DbError::query("products to restock"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(DbError::query("products to restock"))
}

/// `POST /admin/restock-report` (admin token): run the job once now; answers the [`RestockOutcome`].
pub(crate) async fn post_restock_report(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<RestockOutcome>, AppError> {
    crate::admin::authorize(&state, &headers)?;
    match run_once(&state.kw, &state.db).await {
        Ok(outcome) => Ok(Json(outcome)),
        Err(RestockError::Lock(error)) => Err(error.into()),
        Err(RestockError::Db(error)) => Err(error.into()),
    }
}

/// Run the job every `interval` (the first run at once) until `shutdown` resolves; failures are logged
/// and the next tick tries again.
pub async fn run_every(
    kw: Keyward,
    db: Db,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => match run_once(&kw, &db).await {
                Ok(outcome) => tracing::info!(?outcome, "restock report"),
                Err(error) => tracing::warn!(%error, "restock report failed"),
            },
        }
    }
}
