//! `/dashboard`: one HTML page (embedded in the binary, no build step, no CDN) whose small hand-written
//! script polls `/dashboard/data` every few seconds and draws the numbers as inline SVG charts.
//!
//! **The one decision to know: `/dashboard/data` answers `200` even while the store is down.** The
//! page exists to show an outage (the breaker open, the stream unreadable), so the parts that need the
//! store report `"available": false` instead of failing the whole answer; the cache figures, the
//! database count and the login decisions are this process's own counters and are always there.
//!
//! What the JSON holds (all counts since this process started, per instance):
//! - `caches`: per catalog class, [`CacheStats`] — hits (both tiers), L1 hits, misses, loader calls, and
//!   `hit_ratio` / `l1_hit_ratio` (of reads; `null` before the first read);
//! - `db`: SQLite calls made ([`Db::queries`](crate::Db::queries)) and `queries_saved`: cache reads
//!   answered without calling the loader (hits, cached absences, reads that shared another's load);
//! - `login_limits`: the two login limits' decisions — allowed, limited (`429`), unavailable (`503`,
//!   the store down and the classes failing closed);
//! - `stream`: the `order_events` group `notifier`'s pending entries, lag and dead letters (counted up to
//!   [`DEAD_LETTERS_COUNTED`]);
//! - `breaker`: `closed`, `open` or `half_open` (always `closed` on the embedded backend).
//!
//! Like `/metrics`, the page shows how the shop is used: serve it where only operators reach it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use keyward::BreakerState;
use keyward::CacheStats;
use serde::Serialize;

use crate::AppState;
use crate::worker::NOTIFIER_GROUP;

/// How many dead letters `/dashboard/data` counts at most (it reads them to count them).
pub const DEAD_LETTERS_COUNTED: usize = 1000;

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// This process's own counts of login-limit decisions (keyward's rate limiters keep no totals of their
/// own that a handler can read; their metrics go to the recorder).
#[derive(Debug, Default)]
pub struct Tallies {
    login_allowed: AtomicU64,
    login_limited: AtomicU64,
    login_unavailable: AtomicU64,
}

/// What the login limits decided for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginDecision {
    /// Both limits let it through.
    Allowed,
    /// A limit refused it (`429`).
    Limited,
    /// The store was down and the login classes fail closed (`503`).
    Unavailable,
}

impl Tallies {
    /// New, shared tallies.
    pub fn new() -> Arc<Tallies> {
        Arc::new(Tallies::default())
    }

    /// Count one login attempt's decision.
    pub fn login(&self, decision: LoginDecision) {
        let counter = match decision {
            LoginDecision::Allowed => &self.login_allowed,
            LoginDecision::Limited => &self.login_limited,
            LoginDecision::Unavailable => &self.login_unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// `/dashboard/data`'s answer.
#[derive(Clone, Debug, Serialize)]
pub struct DashboardData {
    /// keyward's backend kind as `Debug` prints it: `Embedded` or `Redis`.
    pub backend: String,
    /// Per catalog cache class.
    pub caches: Vec<CacheFigures>,
    /// The database.
    pub db: DbFigures,
    /// The login limits' decisions.
    pub login_limits: LoginFigures,
    /// The order stream.
    pub stream: StreamFigures,
    /// The circuit breaker in front of the store: `closed`, `open`, `half_open` (`unknown` for a state
    /// a later keyward adds).
    pub breaker: &'static str,
}

/// One cache class.
#[derive(Clone, Debug, Serialize)]
pub struct CacheFigures {
    /// The policy class.
    pub class: &'static str,
    /// Reads answered with a stored value (either tier).
    pub hits: u64,
    /// The part of `hits` answered in process (L1).
    pub l1_hits: u64,
    /// Reads that found no usable value.
    pub misses: u64,
    /// Loader (SQLite) calls.
    pub loader_calls: u64,
    /// `(hits + cached absences) / reads`, `None` before the first read.
    pub hit_ratio: Option<f64>,
    /// `l1_hits / reads`, `None` before the first read.
    pub l1_hit_ratio: Option<f64>,
}

/// The database.
#[derive(Clone, Debug, Serialize)]
pub struct DbFigures {
    /// SQLite calls made by this process.
    pub queries: u64,
    /// Cache reads answered without calling the loader.
    pub queries_saved: u64,
}

/// The login limits' decisions.
#[derive(Clone, Debug, Serialize)]
pub struct LoginFigures {
    /// Attempts both limits let through.
    pub allowed: u64,
    /// Attempts refused with `429`.
    pub limited: u64,
    /// Attempts refused with `503` (store down, fail closed).
    pub unavailable: u64,
}

/// The `order_events` stream, group `notifier`.
#[derive(Clone, Debug, Serialize)]
pub struct StreamFigures {
    /// Whether the store answered (else the other fields are `None`).
    pub available: bool,
    /// The stream class.
    pub class: &'static str,
    /// The consumer group.
    pub group: &'static str,
    /// Delivered, not acknowledged (`None`: no group yet, or the store did not answer).
    pub pending: Option<u64>,
    /// Not delivered yet (`None` also when Redis cannot count it).
    pub lag: Option<u64>,
    /// Dead letters, counted up to [`DEAD_LETTERS_COUNTED`].
    pub dead_letters: Option<u64>,
}

impl CacheFigures {
    fn new(class: &'static str, stats: &CacheStats) -> CacheFigures {
        let reads = stats.hits + stats.negative_hits + stats.misses;
        // Counts stay far below 2^52, where u64 → f64 is exact.
        #[allow(clippy::cast_precision_loss)]
        let l1_hit_ratio = (reads > 0).then(|| stats.l1_hits as f64 / reads as f64);
        CacheFigures {
            class,
            hits: stats.hits,
            l1_hits: stats.l1_hits,
            misses: stats.misses,
            loader_calls: stats.loader_calls,
            hit_ratio: stats.hit_ratio(),
            l1_hit_ratio,
        }
    }
}

/// Gather the figures (reads the stream's group and dead letters from the store; everything else is
/// in process).
pub async fn data(state: &AppState) -> DashboardData {
    use crate::catalog::{CATEGORIES_CLASS, PRODUCT_CLASS, PRODUCT_LIST_CLASS};
    let catalog = &state.catalog;
    let stats = [
        (CATEGORIES_CLASS, catalog.categories_cache().stats()),
        (PRODUCT_LIST_CLASS, catalog.lists_cache().stats()),
        (PRODUCT_CLASS, catalog.products_cache().stats()),
    ];
    let queries_saved = stats
        .iter()
        .map(|(_, s)| s.hits + s.negative_hits + s.coalesced)
        .sum();
    let caches = stats
        .iter()
        .map(|(class, s)| CacheFigures::new(class, s))
        .collect();
    let tallies = &state.tallies;
    DashboardData {
        backend: format!("{:?}", state.kw.backend()),
        caches,
        db: DbFigures {
            queries: state.db.queries(),
            queries_saved,
        },
        login_limits: LoginFigures {
            allowed: tallies.login_allowed.load(Ordering::Relaxed),
            limited: tallies.login_limited.load(Ordering::Relaxed),
            unavailable: tallies.login_unavailable.load(Ordering::Relaxed),
        },
        stream: stream_figures(state).await,
        breaker: match state.kw.breaker_state() {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            _ => "unknown",
        },
    }
}

async fn stream_figures(state: &AppState) -> StreamFigures {
    let mut figures = StreamFigures {
        available: false,
        class: crate::orders::ORDER_EVENTS_CLASS,
        group: NOTIFIER_GROUP,
        pending: None,
        lag: None,
        dead_letters: None,
    };
    let info = match state.events.group_info(NOTIFIER_GROUP).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "dashboard: the stream's group info");
            return figures;
        }
    };
    let dead = match state.events.dead_letters(DEAD_LETTERS_COUNTED).await {
        Ok(dead) => dead,
        Err(error) => {
            tracing::debug!(%error, "dashboard: the stream's dead letters");
            return figures;
        }
    };
    figures.available = true;
    figures.pending = info.as_ref().map(|i| i.pending);
    figures.lag = info.and_then(|i| i.lag);
    figures.dead_letters = Some(dead.len() as u64);
    figures
}

/// `GET /dashboard`: the page.
pub(crate) async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

/// `GET /dashboard/data`: the figures as JSON (never cached).
pub(crate) async fn get_data(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(data(&state).await),
    )
}
