//! Idempotency keys for axum: a `POST` retried under the same `Idempotency-Key` runs once, and every
//! retry gets the first response back (draft-ietf-httpapi-idempotency-key-header).
//!
//! **The guarantee.** For one client and one key, the handler runs at most once at a time, and once it
//! has answered with a storable response (any status below 500 except `408` and `429`), it never runs
//! again for that key until the class `ttl` ends: every retry with the same request gets that response
//! back — status, stored headers and body, byte for byte — plus `Idempotent-Replayed: true`. The decision
//! is one atomic script on Redis, so this holds across processes. A retry while the first request still
//! runs gets `409`; the key used with a different request gets `422`. A client that disconnects does not
//! cancel the handler: it runs to the end in its own task and its response is stored for the retry. If
//! the handler fails (`5xx`, an error, a panic) or its response cannot be stored (too large, trailers),
//! nothing is stored and a retry runs the handler again. While the handler runs, the layer renews its lease
//! every third of the class `lease`, so a slow handler keeps its key; `lease` only decides how soon a retry
//! may run after the process running the request died.
//!
//! See [`IdempotencyLayer`] for the options and every response the layer writes itself.

mod body;
mod key;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use keyward::Error as KeywardError;
use keyward::idempotency::{Begin, Completion, Idempotency, Lease, StoredResponse, fingerprint};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::identity::{Extracted, KeyExtractor};
use crate::problem::{self as problems, idempotency as problem};
use crate::rate_limit::headers::retry_after_secs;
use crate::shell::{Capability, ResponseFuture, Shell};
use body::{Buffered, Unstorable};
pub use key::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, KeySyntax, MAX_IDEMPOTENCY_KEY_BYTES,
};

/// Default largest request body read for the fingerprint: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Default `Retry-After` of the `409` a duplicate gets while the first request runs: 1 s.
pub const DEFAULT_IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Response headers stored and replayed by default.
const DEFAULT_STORED_HEADERS: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::LOCATION,
    header::CONTENT_ENCODING,
];

/// Headers that are never stored: cookies (a session must not be handed to whoever retries), the
/// framing and hop-by-hop fields the server writes itself, and the replay marker.
const NEVER_STORED: [&str; 12] = [
    "set-cookie",
    "set-cookie2",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "trailer",
    "te",
    "proxy-authenticate",
    "proxy-connection",
    "idempotent-replayed",
];

/// A tower [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html) that makes `POST` and `PATCH` requests idempotent with a keyward
/// [`Idempotency`] class: the first request under a key runs the inner service and its response is
/// stored; retries get that response back. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::{Router, body::Body, routing::post};
/// use http::{Request, StatusCode};
/// use keyward::Keyward;
/// use keyward::policy::{IdempotencyClass, Policy};
/// use keyward_axum::IdempotencyLayer;
/// use tower::ServiceExt;
///
/// let policy = Policy::builder("dev", "payments")
///     .idempotency("charges", IdempotencyClass::new())
///     .build()?;
/// let kw = Keyward::embedded(policy);
/// let app = Router::new()
///     .route("/charges", post(|| async { (StatusCode::CREATED, "ch_1") }))
///     .layer(IdempotencyLayer::new(kw.idempotency("charges")?));
///
/// let charge = || {
///     Request::post("/charges")
///         .header("authorization", "Bearer sk_alice")
///         .header("idempotency-key", r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#)
///         .body(Body::from(r#"{"amount":100}"#))
///         .unwrap()
/// };
/// let first = app.clone().oneshot(charge()).await?;
/// assert_eq!(first.status(), StatusCode::CREATED);
/// assert!(first.headers().get("idempotent-replayed").is_none());
///
/// let retry = app.clone().oneshot(charge()).await?;
/// assert_eq!(retry.status(), StatusCode::CREATED);
/// assert_eq!(retry.headers()["idempotent-replayed"], "true");
/// # Ok(()) }
/// ```
///
/// # Options
/// | option | default |
/// | --- | --- |
/// | [`methods`](Self::methods): methods it applies to; others pass through untouched | `POST`, `PATCH` |
/// | [`require_key`](Self::require_key): a request of those methods without the header is refused | `true` |
/// | [`scope`](Self::scope): whose keys they are ([`KeyExtractor`]) | the `Authorization` header, hashed ([`authorization_scope`](Self::authorization_scope)) |
/// | [`max_request_bytes`](Self::max_request_bytes): largest body read for the fingerprint | 1 MiB |
/// | [`store_header`](Self::store_header): response headers stored and replayed | `content-type`, `location`, `content-encoding` |
/// | [`key_syntax`](Self::key_syntax): quoted only, or quoted or bare | [`KeySyntax::StringOrBare`] |
/// | [`in_progress_retry_after`](Self::in_progress_retry_after): `Retry-After` of a duplicate's `409` | 1 s ([`DEFAULT_IN_PROGRESS_RETRY_AFTER`]) |
///
/// **Scope.** Keys are unique per client, not globally: two clients may pick the same key, and each
/// gets its own response. By default the client is its credentials: the `Authorization` header, stored
/// only as a SHA-256 hash. Not the client IP: a client retrying after a network change has a new
/// address, and that retry must not run again. If your access tokens rotate while a client may still
/// retry, scope by account instead, e.g. `KeyExtractor::extension(|u: &User| u.account_id.clone())`
/// with the authentication layer running first. For browser clients with keyward sessions, scope by
/// the logged-in user: `.scope(KeyExtractor::session_user::<Profile>())` (a new cookie after a login
/// or on another device keeps the user's keys). A request without its scope is refused with `400`, as
/// the rate-limit layer does: it cannot be protected, and running it unprotected would be silent.
///
/// **Fingerprint.** Method, path and query, `Content-Type` and the body bytes, hashed with
/// [`keyward::idempotency::fingerprint`]. The same key with any of them changed is a `422`.
///
/// # Responses
/// For a request of one of the [`methods`](Self::methods). Every problem+json body here is of type
/// `about:blank` (RFC 9457 §4.2.1), its `title` the status phrase and its `detail` what happened and
/// what to do; `409`, `422` and `503` each have one cause here, and every `400` is fixed by correcting
/// the request as its `detail` says.
///
/// | situation | response |
/// | --- | --- |
/// | first request under the key | the inner service's; stored unless it is `5xx`, `408` or `429`, over the class's `max_response_bytes`, or has trailers |
/// | the same request again, after that | the stored status, headers and body, plus `Idempotent-Replayed: true` |
/// | the same key while the first request runs | `409`, `Retry-After` ([`in_progress_retry_after`](Self::in_progress_retry_after), default 1 s; less if the lease ends sooner), problem+json |
/// | the same key, a different request | `422` problem+json |
/// | no `Idempotency-Key` ([`require_key`](Self::require_key) on) | `400` problem+json, its `detail` naming the header |
/// | an unusable key: malformed, empty, over [`MAX_IDEMPOTENCY_KEY_BYTES`], more than one field | `400` problem+json, its `detail` saying what is wrong |
/// | no client identity for the [`scope`](Self::scope) | `400` problem+json |
/// | a body over [`max_request_bytes`](Self::max_request_bytes) | `413` problem+json |
/// | the store fails before the handler runs | `503` problem+json; the handler is not run |
/// | a server setup error (no connection info for a client-IP scope, an id keyward rejects, an unreadable stored response) | `500`, logged at `error` |
///
/// Refused requests never reach the inner service. Without a key and with
/// [`require_key(false)`](Self::require_key), a request passes through unprotected.
///
/// **Not stored, so a retry runs again:** `5xx` (the handler failed; the draft leaves them to the
/// server, and a stored `503` would turn a passing outage into a day of failures), `408` and `429`
/// (they say "not processed, try again"), a response over the class's `max_response_bytes` or with
/// trailers (passed to the client as it is), and a request whose inner service errored or panicked.
/// In each case the key is released at once, so the retry need not wait for the lease (after an error or
/// a panic, from a spawned task; the panic itself propagates). If storing fails after the handler ran, the
/// client still gets the handler's response, and the key stays held until the lease expires.
///
/// **Clients that go away.** The handler runs in a task of its own (spawned on the tokio runtime, in
/// the request's tracing span), so a client that disconnects — the very client that will retry — does
/// not cancel it halfway, effects done but unrecorded: it runs to the end and its response is stored,
/// and the retry gets `409` until then and the replay after.
///
/// **Buffering.** The request body (up to [`max_request_bytes`](Self::max_request_bytes)) is read before
/// the handler runs, and the first response's body (up to `max_response_bytes`) is read before it is
/// sent: streaming responses reach the client only once complete.
///
/// # Middleware order
/// In axum, the layer added last runs first. Put authentication *outside* (added after) this layer so
/// its refusals are not stored and the scope can read its user; a rate limit outside too, so a refused
/// request never takes a key. Put compression outside as well: stored bodies are then unencoded, and a
/// retry with another `Accept-Encoding` gets its own encoding. So:
/// `.layer(IdempotencyLayer::new(..)).layer(rate_limit).layer(auth)` runs `auth`, the rate limit, then
/// this layer. Prefer `Router::route_layer` to keep unmatched routes out of the key space. With
/// [`KeyExtractor::session_user`] as the scope, the [`SessionLayer`](crate::SessionLayer) goes outside
/// too; the session is then read once, for the scope, and the handler's
/// [`CurrentSession`](crate::CurrentSession) shares that read.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<IdempotencyConfig>,
}

/// The configuration of an [`IdempotencyLayer`], shared by its services.
#[derive(Clone)]
pub struct IdempotencyConfig {
    idempotency: Idempotency,
    methods: Vec<Method>,
    require_key: bool,
    scope: KeyExtractor,
    /// What the scope looks for, in the `400` when it finds nothing; `None`: the extractor's own words.
    scope_description: Option<&'static str>,
    max_request_bytes: usize,
    stored_headers: Vec<HeaderName>,
    key_syntax: KeySyntax,
    in_progress_retry_after: Duration,
}

impl IdempotencyLayer {
    /// Idempotency keys of the class behind `idempotency`, with the defaults in the table above.
    pub fn new(idempotency: Idempotency) -> IdempotencyLayer {
        IdempotencyLayer {
            config: Arc::new(IdempotencyConfig {
                idempotency,
                methods: vec![Method::POST, Method::PATCH],
                require_key: true,
                scope: IdempotencyLayer::authorization_scope(),
                scope_description: Some("its `Authorization` header"),
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                stored_headers: DEFAULT_STORED_HEADERS.to_vec(),
                key_syntax: KeySyntax::default(),
                in_progress_retry_after: DEFAULT_IN_PROGRESS_RETRY_AFTER,
            }),
        }
    }

    /// The default scope: the request's `Authorization` header, as a SHA-256 hash (the credential never
    /// reaches Redis). Missing when the request has no `Authorization` or more than one. The hash is not
    /// salted: fine for tokens and API keys; for `Basic` credentials with guessable passwords, scope by
    /// the authenticated user instead.
    pub fn authorization_scope() -> KeyExtractor {
        KeyExtractor::from_fn(|parts| {
            let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
            let value = values.next()?;
            if values.next().is_some() || value.is_empty() {
                return None;
            }
            let hash = fingerprint(&[b"authorization", value.as_bytes()]);
            Some(hash.iter().map(|b| format!("{b:02x}")).collect())
        })
    }

    /// The methods the layer applies to (default `POST` and `PATCH`, the methods that are not idempotent
    /// by themselves). Requests of other methods pass through untouched, key or not.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> IdempotencyLayer {
        Arc::make_mut(&mut self.config).methods = methods.into_iter().collect();
        self
    }

    /// Whether a request of those methods must carry an `Idempotency-Key` (default `true`: one without
    /// gets a `400`). With `false`, a request without a key runs unprotected; one with a key is protected.
    #[must_use]
    pub fn require_key(mut self, required: bool) -> IdempotencyLayer {
        Arc::make_mut(&mut self.config).require_key = required;
        self
    }

    /// Whose keys they are (default [`authorization_scope`](Self::authorization_scope)). A request
    /// whose scope cannot be found gets a `400`; to share one key space between all clients (keys are then
    /// global: only for trusted clients), use `KeyExtractor::from_fn(|_| Some("all".into()))`.
    #[must_use]
    pub fn scope(mut self, scope: KeyExtractor) -> IdempotencyLayer {
        let config = Arc::make_mut(&mut self.config);
        config.scope = scope;
        config.scope_description = None;
        self
    }

    /// Largest request body read for the fingerprint (default [`DEFAULT_MAX_REQUEST_BYTES`], 1 MiB); a
    /// larger one gets a `413` without reaching the handler.
    #[must_use]
    pub fn max_request_bytes(mut self, max: usize) -> IdempotencyLayer {
        Arc::make_mut(&mut self.config).max_request_bytes = max;
        self
    }

    /// Also store and replay the response header `name` (every value, in order). `content-type`,
    /// `location` and `content-encoding` always are; other headers are sent on the first response only.
    ///
    /// # Panics
    /// If `name` is not a valid header name, or is one that is never stored: `set-cookie` (a retry must
    /// not hand out a session), framing and hop-by-hop fields (`content-length`, `transfer-encoding`,
    /// `connection`, …), or `idempotent-replayed`.
    #[must_use]
    pub fn store_header(mut self, name: impl AsRef<str>) -> IdempotencyLayer {
        let name = name.as_ref();
        let parsed = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|_| panic!("`{name}` is not a valid HTTP header name"));
        assert!(
            !NEVER_STORED.contains(&parsed.as_str()),
            "the `{parsed}` header is never stored for replay"
        );
        let config = Arc::make_mut(&mut self.config);
        if !config.stored_headers.contains(&parsed) {
            config.stored_headers.push(parsed);
        }
        self
    }

    /// Which spellings of the key are accepted (default [`KeySyntax::StringOrBare`]).
    #[must_use]
    pub fn key_syntax(mut self, syntax: KeySyntax) -> IdempotencyLayer {
        Arc::make_mut(&mut self.config).key_syntax = syntax;
        self
    }

    /// How long a duplicate sent while the first request still runs is told to wait before retrying:
    /// the `Retry-After` (and `retry_after` member) of its `409`. Default 1 s
    /// ([`DEFAULT_IN_PROGRESS_RETRY_AFTER`]).
    ///
    /// Why short: most requests finish in well under a second, and the retry then gets the stored
    /// response at once. The class `lease` is no estimate of that: the layer renews the lease while the
    /// handler runs, so its remaining time is always close to the whole lease (30 s for a request that
    /// ends 1 s later). If the lease ends sooner than `wait` (its holder died), that shorter time is
    /// sent. Sent in whole seconds (`Retry-After` has no finer unit), rounded up, at least 1.
    #[must_use]
    pub fn in_progress_retry_after(mut self, wait: Duration) -> IdempotencyLayer {
        Arc::make_mut(&mut self.config).in_progress_retry_after = wait;
        self
    }

    /// The idempotency class this layer uses.
    pub fn idempotency(&self) -> &Idempotency {
        &self.config.idempotency
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("idempotency", &self.idempotency)
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("scope", &self.scope)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("stored_headers", &self.stored_headers)
            .field("key_syntax", &self.key_syntax)
            .field("in_progress_retry_after", &self.in_progress_retry_after)
            .finish()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shell::new(inner, Arc::clone(&self.config))
    }
}

/// The [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) of [`IdempotencyLayer`], wrapping the inner service `S`. Cheap to clone; its `Debug`
/// prints the layer's configuration.
pub type IdempotencyService<S> = Shell<IdempotencyConfig, S>;

impl<S, B> Capability<S, B> for IdempotencyConfig
where
    S: Service<Request<Body>> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type InnerRequest = Request<Body>;
    type Error = S::Error;

    fn call(self: Arc<Self>, inner: S, request: Request<B>) -> ResponseFuture<S::Error> {
        Box::pin(idempotent(self, inner, request.map(Body::new)))
    }
}

async fn idempotent<S>(
    config: Arc<IdempotencyConfig>,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response, S::Error>
where
    S: Service<Request<Body>> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    if !config.methods.contains(request.method()) {
        return Ok(inner.call(request).await?.into_response());
    }
    let (mut parts, body) = request.into_parts();
    let key = match key::read(&parts.headers, config.key_syntax) {
        key::Field::Key(key) => key,
        key::Field::Absent if !config.require_key => {
            return Ok(inner
                .call(Request::from_parts(parts, body))
                .await?
                .into_response());
        }
        key::Field::Absent => return Ok(problem::missing_key()),
        key::Field::Invalid(why) => return Ok(problem::invalid_key(&why)),
    };
    let mut id = match config.scope.extract(&parts).await {
        Extracted::Id(id) => id,
        Extracted::Missing => {
            tracing::debug!(scope = ?config.scope, "keyward-axum: no client identity for an idempotency key");
            let looked_for = config
                .scope_description
                .map_or_else(|| config.scope.describe(), str::to_owned);
            return Ok(problem::unidentified(&looked_for));
        }
        Extracted::Misconfigured(why) => {
            tracing::error!(reason = why, "keyward-axum: cannot scope idempotency keys");
            return Ok(problem::internal());
        }
        // The scope is the session's user and the session cannot be read: nothing was run.
        Extracted::Failed(error) => return Ok(error.into_response()),
    };

    // The body, for the fingerprint and for the handler.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_request_bytes as u64) {
        return Ok(problem::too_large(config.max_request_bytes));
    }
    let body = match body::buffer(body, config.max_request_bytes).await {
        Buffered::Whole(bytes) => bytes,
        Buffered::Unstorable {
            why: Unstorable::TooLarge,
            ..
        } => return Ok(problem::too_large(config.max_request_bytes)),
        Buffered::Unstorable {
            why: Unstorable::Failed,
            ..
        } => return Ok(problems::bad_request("The request body could not be read.")),
        Buffered::Unstorable {
            why: Unstorable::Trailers,
            ..
        } => {
            return Ok(problems::bad_request(
                "A request with trailer fields cannot be checked for idempotency.",
            ));
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map_or(&b""[..], |v| v.as_bytes());
    let fp = fingerprint(&[
        parts.method.as_str().as_bytes(),
        path.as_bytes(),
        content_type,
        &body,
    ]);

    id.push(key.clone());
    let idem = &config.idempotency;
    let lease = match idem.begin(&id, &fp).await {
        Ok(Begin::New(lease)) => lease,
        Ok(Begin::InProgress { retry_after }) => {
            tracing::debug!(class = idem.class(), "keyward-axum: idempotency key in use");
            let wait = retry_after.min(config.in_progress_retry_after);
            return Ok(problem::in_use(retry_after_secs(Some(wait))));
        }
        Ok(Begin::Completed(stored)) => return Ok(replay(stored)),
        Ok(Begin::Mismatch) => {
            tracing::debug!(class = idem.class(), "keyward-axum: idempotency key reused");
            return Ok(problem::reused());
        }
        Ok(other) => {
            tracing::error!(?other, "keyward-axum: unknown idempotency outcome");
            return Ok(problem::internal());
        }
        Err(KeywardError::Key(keyward::key::KeyError::TooLong { .. })) => {
            // Both parts are bounded, but escaping can triple them: the client chose this key.
            return Ok(problem::invalid_key(
                "The Idempotency-Key is too long for this client; use a shorter key, such as a UUID.",
            ));
        }
        Err(error) if error.is_backend() => {
            tracing::error!(%error, class = idem.class(), "keyward-axum: idempotency store unavailable; request refused");
            return Ok(problem::unavailable());
        }
        Err(error) => {
            tracing::error!(%error, class = idem.class(), "keyward-axum: cannot check an idempotency key");
            return Ok(problem::internal());
        }
    };

    // The handler runs in a task of its own, to the end, even if the client goes away meanwhile: its
    // outcome is stored, and the client's retry gets it. A client that disconnects is exactly the client
    // that will retry; cancelling the handler midway would leave its effects done but unrecorded.
    parts.extensions.insert(IdempotencyKey(key));
    let request = Request::from_parts(parts, Body::from(body));
    let task =
        tokio::spawn(run(config, inner, request, lease).instrument(tracing::Span::current()));
    match task.await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            // The runtime is shutting down.
            tracing::warn!(%error, "keyward-axum: an idempotent request was cancelled");
            Ok(problem::internal())
        }
    }
}

/// Runs the handler under `lease`, then stores its response if it can be stored.
async fn run<S>(
    config: Arc<IdempotencyConfig>,
    mut inner: S,
    request: Request<Body>,
    lease: Lease,
) -> Result<Response, S::Error>
where
    S: Service<Request<Body>>,
    S::Response: IntoResponse,
{
    let idem = &config.idempotency;
    // The guard gives the key back if the handler fails or panics, or the task is cancelled, before the
    // outcome is settled. An error from the inner service drops it, which releases the key from a
    // spawned task.
    let mut guard = LeaseGuard {
        idempotency: idem.clone(),
        lease: Some(lease),
    };
    // Until its outcome is settled, a heartbeat every third of the lease keeps the key ours (in a task of
    // its own, so the handler is never paused for it): the class `lease` only decides how soon a retry may run
    // after this process died, not how long a request, its body and the store call may take.
    let _heartbeat = guard.lease.as_ref().map(|lease| idem.keep_alive(lease));
    let response = inner.call(request).await?.into_response();
    let status = response.status();
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        guard.abandon("the response is not stored").await;
        return Ok(response);
    }

    let (head, body) = response.into_parts();
    let mut stored = StoredResponse::new(status.as_u16(), Bytes::new());
    for name in &config.stored_headers {
        for value in head.headers.get_all(name) {
            stored = stored.header(name.as_str(), Bytes::copy_from_slice(value.as_bytes()));
        }
    }
    // Everything but the body counts against `max_response_bytes` too.
    let overhead = stored.encoded_len();
    let budget = idem
        .settings()
        .max_response_bytes_value()
        .saturating_sub(overhead);
    let bytes = match body::buffer(body, budget).await {
        Buffered::Whole(bytes) => bytes,
        Buffered::Unstorable { why, body } => {
            tracing::debug!(
                ?why,
                class = idem.class(),
                "keyward-axum: response passed through unstored"
            );
            guard.abandon("the response cannot be stored").await;
            return Ok(Response::from_parts(head, body));
        }
    };
    stored.body = bytes.clone();
    let lease = guard.take();
    match idem.complete(&lease, &stored).await {
        Ok(Completion::Stored) => {}
        Ok(Completion::LeaseLost) => tracing::warn!(
            class = idem.class(),
            "keyward-axum: the idempotency lease was lost while the handler ran (renewals failed); \
             its response was not stored"
        ),
        Ok(other) => tracing::warn!(?other, "keyward-axum: unknown completion"),
        Err(error) => tracing::error!(
            %error,
            class = idem.class(),
            "keyward-axum: the response could not be stored; the key stays held until its lease expires"
        ),
    }
    Ok(Response::from_parts(head, Body::from(bytes)))
}

/// The stored response, as the client first got it, plus the replay marker.
fn replay(stored: StoredResponse) -> Response {
    let Ok(status) = StatusCode::from_u16(stored.status) else {
        tracing::error!(
            status = stored.status,
            "keyward-axum: a stored response has an invalid status"
        );
        return problem::internal();
    };
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = status;
    for (name, value) in stored.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => tracing::warn!(
                header = name,
                "keyward-axum: a stored header cannot be replayed"
            ),
        }
    }
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Holds the lease while the handler runs; gives it back unless it was taken to complete.
struct LeaseGuard {
    idempotency: Idempotency,
    lease: Option<Lease>,
}

impl LeaseGuard {
    fn take(&mut self) -> Lease {
        self.lease.take().expect("the lease is settled once")
    }

    async fn abandon(&mut self, why: &'static str) {
        let lease = self.take();
        tracing::debug!(
            why,
            class = self.idempotency.class(),
            "keyward-axum: idempotency key released"
        );
        if let Err(error) = self.idempotency.abandon(lease).await {
            tracing::warn!(%error, "keyward-axum: cannot release an idempotency key; it is released when its lease expires");
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        // The inner service failed, panicked, or its task was cancelled (the runtime is shutting down):
        // the handler has stopped, so a retry may run now. Without a runtime the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let idempotency = self.idempotency.clone();
            runtime.spawn(async move {
                tracing::debug!(
                    class = idempotency.class(),
                    "keyward-axum: idempotency key released after a failed or panicked request"
                );
                if let Err(error) = idempotency.abandon(lease).await {
                    tracing::warn!(%error, "keyward-axum: cannot release an idempotency key; it is released when its lease expires");
                }
            });
        }
    }
}
