//! A tiny API limited to 5 requests per minute per client IP (GCRA, bursts of up to 5).
//!
//! Run it, then ask it six times:
//!
//! ```text
//! cargo run -p keyward-axum --example rate_limited_api           # PORT=8080 to move it off 3000
//! for i in 1 2 3 4 5 6; do curl -si localhost:3000/ | grep -iE '^(HTTP|ratelimit|retry-after)'; done
//! ```
//!
//! The sixth answer is a `429` with `Retry-After` and a problem+json body. With `REDIS_URL` set, the
//! limit is shared by every process using that Redis; without it, the embedded backend counts in process.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Router};
use keyward::policy::{Algorithm, Policy, RateLimitClass};
use keyward::{Decision, Keyward};
use keyward_axum::{ApiError, KeyExtractor, RateLimitLayer, TrustedProxies};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,keyward_axum=debug".into()),
        )
        .init();

    let policy = Policy::builder("dev", "example")
        .rate_limit(
            "per_ip",
            RateLimitClass::new(Algorithm::Gcra, 5, Duration::from_secs(60)),
        )
        .build()?;
    let kw = Keyward::from_env(policy).await?;

    // Clients connect directly here; behind a load balancer, name its addresses instead, e.g.
    // `TrustedProxies::networks(["10.0.0.0/8"])?`.
    let limit = RateLimitLayer::new(
        kw.rate_limiter("per_ip")?,
        KeyExtractor::client_ip(TrustedProxies::none()),
    );
    let app = Router::new()
        .route("/", get(hello))
        .route("/health", get(health))
        .with_state(kw.clone())
        .layer(limit);

    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .with_context(|| format!("PORT={p:?} is not a port number"))?,
        Err(_) => 3000,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot bind 127.0.0.1:{port}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        // The client-IP extractor reads the peer address from the connection info.
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// `200 up` while the store answers; a `503` problem+json with `Retry-After` (and no internals in the
/// body) while it does not: `?` turns the keyward error into an `ApiError`.
async fn health(State(kw): State<Keyward>) -> Result<&'static str, ApiError> {
    kw.ping().await?;
    Ok("up")
}

/// The layer puts its decision in the request extensions.
async fn hello(Extension(decision): Extension<Decision>) -> String {
    format!("hello (requests left: {})\n", decision.remaining())
}
