//! Server-side sessions with keyward-axum: log in, who am I, list my devices, log out, log out everywhere.
//!
//! ```text
//! cargo run -p keyward-axum --example sessions            # plays the routes in process and prints each exchange
//! cargo run -p keyward-axum --example sessions -- serve   # serves on 127.0.0.1:3000 (PORT to move it)
//!
//! curl -si -X POST -H 'x-user: ada' -A laptop localhost:3000/login   # copy the `__Host-session=…` pair
//! curl -si -H 'cookie: __Host-session=…' localhost:3000/me
//! curl -si -H 'cookie: __Host-session=…' localhost:3000/devices
//! curl -si -X POST -H 'cookie: __Host-session=…' localhost:3000/logout-everywhere
//! ```
//!
//! Without `REDIS_URL` the sessions live in the embedded backend (gone when the process exits); with it,
//! every process on that Redis shares them. Secrets come from `SESSION_SECRETS` (comma-separated base64,
//! current first); without it a fixed development secret is used — never do that in production. The login
//! takes the user from an `x-user` header and the device from `User-Agent`: a real one checks a password.
//!
//! Handlers return `Result<_, ApiError>`: `?` on a session call (or any keyward call) answers `503` with
//! `Retry-After` while Redis is down and `500` otherwise, as problem+json without internals.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, Request, StatusCode, header};
use keyward::Keyward;
use keyward::policy::{Policy, SessionClass};
use keyward::session::SessionSecrets;
use keyward_axum::{ApiError, CurrentSession, SessionLayer};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

/// What the session holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Profile {
    name: String,
    device: String,
}

fn header_or<'a>(headers: &'a HeaderMap, name: header::HeaderName, default: &'a str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
}

async fn login(session: CurrentSession<Profile>, headers: HeaderMap) -> Result<String, ApiError> {
    let user = header_or(&headers, header::HeaderName::from_static("x-user"), "ada");
    let device = header_or(&headers, header::USER_AGENT, "unknown device");
    // Ends the session the request came with, if any (session fixation), and sets the new cookie.
    session
        .create(
            user,
            &Profile {
                name: user.to_owned(),
                device: device.to_owned(),
            },
        )
        .await?;
    Ok(format!("logged in as {user} on {device}"))
}

async fn whoami(session: CurrentSession<Profile>) -> Response {
    match session.get() {
        Some(s) => format!("{} on {}", s.data.name, s.data.device).into_response(),
        None => (StatusCode::UNAUTHORIZED, "not logged in").into_response(),
    }
}

async fn devices(session: CurrentSession<Profile>) -> Result<Response, ApiError> {
    let Some(current) = session.get() else {
        return Ok((StatusCode::UNAUTHORIZED, "not logged in").into_response());
    };
    let mut lines = Vec::new();
    for info in session.sessions().list_for_user(current.user_id()).await? {
        let idle_left = info
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let age = SystemTime::now()
            .duration_since(info.created_at)
            .unwrap_or_default();
        // The id is HMAC of the token: safe to show, and usable with `destroy_by_id`.
        lines.push(format!(
            "{}… created {}s ago, ends in {}s if idle{}",
            &info.id.as_str()[..8],
            age.as_secs(),
            idle_left.as_secs(),
            if &info.id == current.id() {
                " (this device)"
            } else {
                ""
            }
        ));
    }
    Ok(lines.join("\n").into_response())
}

async fn logout(session: CurrentSession<Profile>) -> Result<&'static str, ApiError> {
    Ok(if session.destroy().await? {
        "logged out"
    } else {
        "there was no session"
    })
}

async fn logout_everywhere(session: CurrentSession<Profile>) -> Result<Response, ApiError> {
    let Some(current) = session.get() else {
        return Ok((StatusCode::UNAUTHORIZED, "not logged in").into_response());
    };
    let ended = session
        .sessions()
        .destroy_all_for_user(current.user_id())
        .await?;
    session.destroy().await?; // this one is gone too; this clears its cookie
    Ok(format!("ended {ended} sessions").into_response())
}

fn app(layer: SessionLayer<Profile>) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(whoami))
        .route("/devices", get(devices))
        .route("/logout", post(logout))
        .route("/logout-everywhere", post(logout_everywhere))
        .layer(layer)
}

/// Plays a browser in process: sends a request, prints the exchange (tokens shortened), and returns the
/// `Cookie` pair a browser would keep.
async fn exchange(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    device: &str,
) -> anyhow::Result<Option<String>> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::USER_AGENT, device);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app.clone().oneshot(request.body(Body::empty())?).await?;
    let status = response.status();
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()?;
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await?;
    println!(
        "{device:>7} {method:<4} {path:<19} -> {status}  {}",
        String::from_utf8_lossy(&body).replace('\n', &format!("\n{:44}", ""))
    );
    let Some(set_cookie) = set_cookie else {
        return Ok(None);
    };
    println!("{:>44}Set-Cookie: {}", "", shorten(&set_cookie));
    let pair = set_cookie.split(';').next().unwrap_or_default().to_owned();
    Ok(Some(pair))
}

/// The cookie with its token cut to 6 characters: a token is a credential, not something to print.
fn shorten(set_cookie: &str) -> String {
    match set_cookie.split_once('=') {
        Some((name, rest)) => {
            let (value, attributes) = rest.split_once(';').unwrap_or((rest, ""));
            let shown = if value.len() > 6 {
                format!("{}…", &value[..6])
            } else {
                value.to_owned()
            };
            format!("{name}={shown};{attributes}")
        }
        None => set_cookie.to_owned(),
    }
}

async fn play(app: &Router) -> anyhow::Result<()> {
    exchange(app, "GET", "/me", None, "laptop").await?;
    let laptop = exchange(app, "POST", "/login", None, "laptop")
        .await?
        .context("login sets a cookie")?;
    let phone = exchange(app, "POST", "/login", None, "phone")
        .await?
        .context("login sets a cookie")?;
    exchange(app, "GET", "/me", Some(&laptop), "laptop").await?;
    exchange(app, "GET", "/devices", Some(&phone), "phone").await?;
    exchange(app, "POST", "/logout", Some(&laptop), "laptop").await?;
    exchange(app, "GET", "/me", Some(&laptop), "laptop").await?;
    let laptop = exchange(app, "POST", "/login", None, "laptop")
        .await?
        .context("login sets a cookie")?;
    exchange(app, "POST", "/logout-everywhere", Some(&phone), "phone").await?;
    exchange(app, "GET", "/me", Some(&laptop), "laptop").await?;
    exchange(app, "GET", "/me", Some(&phone), "phone").await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,keyward_axum=debug".into()),
        )
        .init();

    let policy = Policy::builder("dev", "example")
        .session(
            "web",
            SessionClass::new(Duration::from_secs(30 * 60), Duration::from_secs(12 * 3600)),
        )
        .build()?;
    let kw = Keyward::from_env(policy).await?;
    let secrets = match std::env::var("SESSION_SECRETS") {
        Ok(list) => SessionSecrets::from_base64_list(&list).context("SESSION_SECRETS")?,
        Err(_) => {
            tracing::warn!("SESSION_SECRETS is not set: using a development secret");
            SessionSecrets::new(*b"development only; not a secret!!")?
        }
    };
    let app = app(SessionLayer::new(kw.sessions::<Profile>("web", secrets)?));

    match std::env::args().nth(1).as_deref() {
        None => return play(&app).await,
        Some("serve") => {}
        Some(other) => anyhow::bail!("unknown argument {other:?}; usage: sessions [serve]"),
    }
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
