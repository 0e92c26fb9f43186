//! A payments API whose `POST /charges` is safe to retry: the `Idempotency-Key` layer runs each charge
//! once and replays its response to every retry.
//!
//! Without arguments it sends requests to itself in process and prints what happens: the first call, a
//! replay, a concurrent duplicate (`409`, `Retry-After: 1`), the key reused for another charge (`422`),
//! a request without a key (`400`) and the health check (`ApiError`: `503` while Redis is down).
//!
//! ```text
//! cargo run -p keyward-axum --example idempotent_payments
//! ```
//!
//! With a port it serves instead, for `curl`:
//!
//! ```text
//! cargo run -p keyward-axum --example idempotent_payments -- 3000
//! curl -si localhost:3000/charges -H 'authorization: Bearer sk_alice' \
//!      -H 'idempotency-key: "8e03978e-40d5-43e8-bc93-6894a57f9324"' -d amount=100    # twice
//! ```
//!
//! With `REDIS_URL` set, keys live in that Redis and every process serving the API shares them; without
//! it, the embedded backend keeps them in process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use keyward::Keyward;
use keyward::policy::{IdempotencyClass, Policy};
use keyward_axum::{ApiError, IdempotencyKey, IdempotencyLayer};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Ledger {
    charges: Arc<AtomicU64>,
}

/// Charges the card (pretend: it takes 300 ms) and answers `201` with the charge as JSON.
async fn charge(
    State(ledger): State<Ledger>,
    Extension(key): Extension<IdempotencyKey>,
    form: String,
) -> Response {
    let Some(amount) = form
        .strip_prefix("amount=")
        .and_then(|a| a.parse::<u64>().ok())
    else {
        return (StatusCode::BAD_REQUEST, "send amount=<cents>\n").into_response();
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = ledger.charges.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(key = key.as_str(), amount, "charged ch_{n}");
    let body = serde_json::json!({ "id": format!("ch_{n}"), "amount": amount });
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/charges/ch_{n}")),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        body.to_string(),
    )
        .into_response()
}

/// `GET /healthz`: `200 ok` while Redis answers; `?` turns a keyward error into `ApiError`, a `503` with
/// `Retry-After` (and no internals in the body) while it does not.
async fn healthz(State(kw): State<Keyward>) -> Result<&'static str, ApiError> {
    kw.ping().await?;
    Ok("ok")
}

fn app(kw: &Keyward, ledger: Ledger) -> anyhow::Result<Router> {
    // Authentication would go outside (added after) the idempotency layer; here the default scope, the
    // hashed `Authorization` header, stands in for it. Behind a session layer, scope keys by the
    // logged-in user instead: `.scope(KeyExtractor::session_user::<Profile>())`.
    let charges = Router::new()
        .route("/charges", post(charge))
        .with_state(ledger)
        // A duplicate sent while the first charge runs gets `409` with `Retry-After: 1` (the default).
        .layer(
            IdempotencyLayer::new(kw.idempotency("charges")?)
                .in_progress_retry_after(Duration::from_secs(1)),
        );
    Ok(Router::new()
        .route("/healthz", get(healthz))
        .with_state(kw.clone())
        .merge(charges))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,idempotent_payments=info".into()),
        )
        .init();

    let policy = Policy::builder("dev", "payments")
        .idempotency(
            "charges",
            // Replays for a day; a charge may take up to 30 s before a retry may run it again.
            IdempotencyClass::new()
                .ttl(Duration::from_secs(24 * 3600))
                .lease(Duration::from_secs(30)),
        )
        .build()?;
    let kw = Keyward::from_env(policy).await?;
    let ledger = Ledger::default();
    let app = app(&kw, ledger.clone())?;

    if let Some(port) = std::env::args().nth(1) {
        let port: u16 = port
            .parse()
            .with_context(|| format!("{port:?} is not a port number"))?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot bind 127.0.0.1:{port}"))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        return Ok(());
    }

    let charge = |key: Option<&str>, amount: u64| {
        let mut request = Request::post("/charges")
            .header(header::AUTHORIZATION, "Bearer sk_alice")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
            .body(Body::from(format!("amount={amount}")))
            .expect("a valid request")
    };
    let key = r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#;

    println!("1. A first charge runs the handler:");
    show(app.clone().oneshot(charge(Some(key), 100)).await?).await;

    println!("2. A retry with the same key gets the same response back, without charging again:");
    show(app.clone().oneshot(charge(Some(key), 100)).await?).await;

    println!("3. A duplicate sent while the first is still running is told to wait:");
    let other = r#""0b5a1a4e-33c4-4c3f-a0f5-1d1c6f0e8d27""#;
    let first = tokio::spawn(app.clone().oneshot(charge(Some(other), 250)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    show(app.clone().oneshot(charge(Some(other), 250)).await?).await;
    println!("   ...while the first one completes:");
    show(first.await??).await;

    println!("4. The first key reused for a different charge is refused:");
    show(app.clone().oneshot(charge(Some(key), 999)).await?).await;

    println!("5. A charge without a key is refused:");
    show(app.clone().oneshot(charge(None, 100)).await?).await;

    println!("6. The health check pings the store:");
    let healthz = Request::get("/healthz").body(Body::empty())?;
    show(app.clone().oneshot(healthz).await?).await;

    println!(
        "Six charge requests, charges made: {} (backend: {:?}).",
        ledger.charges.load(Ordering::SeqCst),
        kw.backend()
    );
    Ok(())
}

/// Prints the status, the headers that matter here, and the body.
async fn show(response: Response) {
    println!("   HTTP {}", response.status());
    for name in [
        "location",
        "idempotent-replayed",
        "retry-after",
        "content-type",
    ] {
        if let Some(value) = response.headers().get(name) {
            println!("   {name}: {}", value.to_str().unwrap_or("(binary)"));
        }
    }
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    println!("   {}\n", String::from_utf8_lossy(&body));
}
