//! `/metrics`: keyward's metrics (docs/metrics.md) and the storefront's own, in Prometheus's text format.
//!
//! **The one decision to know: the recorder is installed once per process by the binary, never by
//! [`app`](crate::app).** A `metrics` recorder is process-global, and a second install fails; tests build
//! many apps in one process. So the binary calls [`install_recorder`] and keeps the
//! [`PrometheusHandle`] in [`AppState::metrics`](crate::AppState::metrics); the route renders that
//! handle. Without one (`None`), `GET /metrics` answers **`503`** with a plain-text line saying no
//! recorder is installed, so a scraper reports the target as down rather than as an instance with no
//! traffic. Tests build a recorder with `PrometheusBuilder::new().build_recorder()`, set it as the
//! thread's default (`metrics::set_default_local_recorder`) while they build the app and send
//! traffic, and put `recorder.handle()` in the state.
//!
//! The storefront's own series:
//!
//! | name | type | labels | what |
//! | --- | --- | --- | --- |
//! | `storefront_requests_total` | counter | `route` (the matched route, or `unmatched`), `method`, `status` | each answered request |
//! | `storefront_db_queries_total` | counter | — | each SQLite call ([`Db::queries`](crate::Db::queries) counts the same per pool) |
//! | `storefront_order_invalidations_failed_total` | counter | — | an order's cache invalidation failed after its commit |
//! | `storefront_order_events_deferred_total` | counter | — | an `order.placed` left in the outbox for the relay |
//!
//! Serve `/metrics` where only the scraper reaches it: the counts say how the shop is used.

use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

use crate::AppState;

/// `storefront_requests_total{route, method, status}`.
pub const REQUESTS: &str = "storefront_requests_total";
/// `storefront_db_queries_total`.
pub const DB_QUERIES: &str = "storefront_db_queries_total";

/// Histogram buckets in seconds (keyward's `_seconds` histograms), so `histogram_quantile` works across
/// instances.
const BUCKETS: &[f64] = &[0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0];

/// How often [`install_recorder`]'s task runs the exporter's upkeep (histograms drain into it).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Install the Prometheus recorder for this process and start its upkeep task (on the current tokio
/// runtime). Call once, before the first keyward call; keep the handle in [`AppState::metrics`].
///
/// # Errors
/// [`BuildError`] if a recorder is already installed in this process.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_EVERY);
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// `GET /metrics`: the text format, or `503` when this process has no recorder (see the module docs).
pub(crate) async fn get_metrics(State(state): State<AppState>) -> Response {
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, TEXT)], handle.render()).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            "# no metrics recorder is installed in this process\n",
        )
            .into_response(),
    }
}

/// Middleware: count each answered request by its matched route (never the raw path: ids would make
/// the series unbounded), method (a non-standard one as `other`) and status.
pub(crate) async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // Only the standard methods get their own series: any client can send `FOO1`, `FOO2`, ….
    let method: &'static str = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    metrics::counter!(
        REQUESTS,
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string(),
    )
    .increment(1);
    response
}
