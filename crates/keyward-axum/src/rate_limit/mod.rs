//! Rate limits: [`RateLimitLayer`] identifies a request ([`KeyExtractor`]), checks its limiter, then calls
//! the inner service or refuses; `headers` writes the `RateLimit-Policy` / `RateLimit` fields.
//!
//! **The one decision to know:** the limiter is checked *before* the inner service is called, and a
//! refused request never reaches it. Every response the layer writes itself is listed in the crate docs
//! (*Responses*), with why a failed check is a `500`.

pub(crate) mod headers;

use std::fmt;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Request, header};
use keyward::RateLimiter;
use keyward::rate_limit::Source;
use tower::{Layer, Service};

use crate::identity::{Extracted, KeyExtractor};
use crate::problem::rate_limit as problem;
use crate::shell::{Capability, ResponseFuture, Shell};
use headers::{RATELIMIT, RATELIMIT_POLICY};

/// The id of the shared bucket of [`OnMissing::SharedBucket`]: one part, so it cannot collide with an
/// extractor's ids, which always have a kind and a value.
const UNIDENTIFIED: &str = "unidentified";

/// What to do with a request whose identity the [`KeyExtractor`] cannot find (a missing header, no user in
/// the extensions, a `from_fn` that returned `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnMissing {
    /// Answer `400 Bad Request` (problem+json saying what the endpoint is limited by) without calling the
    /// inner service. The default: a client cannot escape its limit by leaving its identity out.
    #[default]
    Reject,
    /// Count every such request in one shared bucket (`unidentified`), so anonymous traffic is limited as
    /// a whole. To count anonymous clients one by one instead, use [`KeyExtractor::or`] with a client-IP
    /// extractor.
    SharedBucket,
}

/// A tower [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html) that rate-limits requests with a keyward [`RateLimiter`], counting each request in the
/// bucket its [`KeyExtractor`] finds. Cheap to clone.
///
/// See the [crate docs](crate) for an example and for every response it writes itself (*Responses*). An allowed request carries its [`Decision`](keyward::Decision) in its extensions, for handlers that want it
/// (`Extension<keyward::Decision>`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use axum::{Router, body::Body, routing::get};
/// use http::{Request, StatusCode};
/// use keyward::Keyward;
/// use keyward::policy::{Algorithm, Policy, RateLimitClass};
/// use keyward_axum::{KeyExtractor, RateLimitLayer};
/// use tower::ServiceExt;
///
/// let policy = Policy::builder("dev", "api")
///     .rate_limit("per_key", RateLimitClass::new(Algorithm::Gcra, 2, Duration::from_secs(60)))
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let app = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(RateLimitLayer::new(kw.rate_limiter("per_key")?, KeyExtractor::header("x-api-key")));
///
/// let request = || Request::get("/").header("x-api-key", "k1").body(Body::empty()).unwrap();
/// let first = app.clone().oneshot(request()).await?;
/// assert_eq!(first.headers()["ratelimit-policy"], r#""per_key";q=2;w=60"#);
/// assert_eq!(first.headers()["ratelimit"], r#""per_key";r=1;t=30"#);
///
/// app.clone().oneshot(request()).await?;
/// let third = app.clone().oneshot(request()).await?;
/// assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(third.headers()["retry-after"], "30");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    config: Arc<RateLimitConfig>,
}

/// The configuration of a [`RateLimitLayer`], shared by its services (the per-request logic is this
/// module's `rate_limit` function).
#[derive(Clone)]
pub struct RateLimitConfig {
    limiter: RateLimiter,
    extractor: KeyExtractor,
    on_missing: OnMissing,
    /// `RateLimit-Policy`, computed once: the draft wants it the same on every response.
    policy: Option<HeaderValue>,
}

impl RateLimitLayer {
    /// Limit requests with `limiter` (one class, or a group from `rate_limiter_group`, checked all or
    /// nothing), counting each in the bucket `extractor` finds.
    pub fn new(limiter: RateLimiter, extractor: KeyExtractor) -> RateLimitLayer {
        let policy = headers::policy_value(&limiter);
        RateLimitLayer {
            config: Arc::new(RateLimitConfig {
                limiter,
                extractor,
                on_missing: OnMissing::default(),
                policy,
            }),
        }
    }

    /// What to do when the extractor finds no identity (default [`OnMissing::Reject`]).
    #[must_use]
    pub fn on_missing(mut self, on_missing: OnMissing) -> RateLimitLayer {
        Arc::make_mut(&mut self.config).on_missing = on_missing;
        self
    }

    /// The limiter this layer checks.
    pub fn limiter(&self) -> &RateLimiter {
        &self.config.limiter
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl fmt::Debug for RateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("extractor", &self.extractor)
            .field("on_missing", &self.on_missing)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shell::new(inner, Arc::clone(&self.config))
    }
}

/// The [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) of [`RateLimitLayer`], wrapping the inner service `S`. Cheap to clone; its `Debug`
/// prints the layer's configuration.
pub type RateLimitService<S> = Shell<RateLimitConfig, S>;

impl<S, B> Capability<S, B> for RateLimitConfig
where
    S: Service<Request<B>> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type InnerRequest = Request<B>;
    type Error = S::Error;

    fn call(self: Arc<Self>, inner: S, request: Request<B>) -> ResponseFuture<S::Error> {
        Box::pin(rate_limit(self, inner, request))
    }
}

async fn rate_limit<S, B>(
    config: Arc<RateLimitConfig>,
    mut inner: S,
    request: Request<B>,
) -> Result<Response, S::Error>
where
    S: Service<Request<B>>,
    S::Response: IntoResponse,
{
    let (mut parts, body) = request.into_parts();
    let id = match config.extractor.extract(&parts).await {
        Extracted::Id(id) => id,
        Extracted::Missing => match config.on_missing {
            OnMissing::Reject => {
                tracing::debug!(extractor = ?config.extractor, "keyward-axum: no client identity in the request");
                return Ok(problem::unidentified(&config.extractor.describe()));
            }
            OnMissing::SharedBucket => vec![UNIDENTIFIED.to_owned()],
        },
        Extracted::Misconfigured(why) => {
            tracing::error!(reason = why, "keyward-axum: cannot rate-limit requests");
            return Ok(problem::internal());
        }
        // The identity is the session's user and the session cannot be read: answered as the session
        // extractor would (503 with Retry-After when the store is unreachable), and logged there.
        Extracted::Failed(error) => return Ok(error.into_response()),
    };
    let decision = match config.limiter.check(&id).await {
        Ok(decision) => decision,
        Err(error) => {
            tracing::error!(%error, limiter = ?config.limiter, "keyward-axum: rate-limit check failed");
            return Ok(problem::internal());
        }
    };
    // After a store failure the numbers are made up (fail open/closed): report none.
    let measured = !matches!(decision.source(), Source::FailOpen | Source::FailClosed);
    let ratelimit = measured
        .then(|| headers::ratelimit_value(&decision))
        .flatten();

    if decision.is_allowed() {
        parts.extensions.insert(decision);
        let mut response = inner
            .call(Request::from_parts(parts, body))
            .await?
            .into_response();
        add_fields(response.headers_mut(), config.policy.as_ref(), ratelimit);
        return Ok(response);
    }

    let retry_after = headers::retry_after_secs(decision.retry_after());
    let violated: Vec<&str> = decision
        .limits()
        .iter()
        .filter(|l| !l.is_shadow() && !l.is_allowed())
        .map(|l| l.class())
        .collect();
    tracing::debug!(?violated, retry_after, source = ?decision.source(), "keyward-axum: request refused");
    let mut response = if decision.source() == Source::FailClosed {
        problem::reduced_capacity(&violated, retry_after)
    } else {
        problem::quota_exceeded(&violated, retry_after)
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    add_fields(response.headers_mut(), config.policy.as_ref(), ratelimit);
    Ok(response)
}

/// Appends (not inserts) the fields, so that stacked layers each contribute their members to the one
/// list a client reads: field lines of a Structured Field List combine in order.
fn add_fields(
    headers: &mut HeaderMap,
    policy: Option<&HeaderValue>,
    ratelimit: Option<HeaderValue>,
) {
    if let Some(policy) = policy {
        headers.append(RATELIMIT_POLICY, policy.clone());
    }
    if let Some(ratelimit) = ratelimit {
        headers.append(RATELIMIT, ratelimit);
    }
}
