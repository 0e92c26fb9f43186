//! The one tower [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) shell the three layers share: it holds the inner service and the layer's
//! configuration, and hands each request to the layer's per-request logic ([`Capability`]).
//!
//! **The one decision to know:** `call` takes the inner service that `poll_ready` readied and leaves a fresh
//! clone (not yet readied) in its place for the next request, which tower polls ready before its own call.
//! Calling a clone that was never polled ready would break services with real back-pressure (a
//! concurrency limit, a buffer). Each capability only writes its async per-request function; the
//! `Clone`/`poll_ready`/boxing boilerplate lives here once.
//!
//! [`RateLimitService`](crate::RateLimitService), [`SessionService`](crate::SessionService) and
//! [`IdempotencyService`](crate::IdempotencyService) are this [`Shell`] with their layer's configuration.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::Response;
use http::Request;
use tower::Service;

/// The future of the layers' services: a boxed future of the response.
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response, E>> + Send + 'static>>;

/// The per-request half of a layer: what to do with one request, given the inner service to call.
///
/// Public only so the service types can name it; it cannot be implemented outside this crate (the
/// module is private).
pub trait Capability<S, B>: Send + Sync + 'static {
    /// The request type the inner service is called with (the outer `Request<B>`, or `Request<Body>`
    /// for a layer that buffers the body).
    type InnerRequest;
    /// The error of the inner service, passed through.
    type Error;

    /// Handles `request`, calling `inner` (already polled ready) at most once.
    fn call(self: Arc<Self>, inner: S, request: Request<B>) -> ResponseFuture<Self::Error>;
}

/// A tower [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html): the inner service `S` behind the per-request logic of `P`, shared by all clones.
pub struct Shell<P, S> {
    inner: S,
    capability: Arc<P>,
}

impl<P, S> Shell<P, S> {
    /// `inner` behind `capability`.
    pub(crate) fn new(inner: S, capability: Arc<P>) -> Self {
        Shell { inner, capability }
    }
}

impl<P, S: Clone> Clone for Shell<P, S> {
    fn clone(&self) -> Self {
        Shell {
            inner: self.inner.clone(),
            capability: Arc::clone(&self.capability),
        }
    }
}

/// Prints the layer's configuration, never the inner service.
impl<P: fmt::Debug, S> fmt::Debug for Shell<P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.capability.fmt(f)
    }
}

impl<P, S, B> Service<Request<B>> for Shell<P, S>
where
    P: Capability<S, B>,
    S: Service<P::InnerRequest, Error = P::Error> + Clone,
{
    type Response = Response;
    type Error = P::Error;
    type Future = ResponseFuture<P::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let readied = std::mem::replace(&mut self.inner, clone);
        Arc::clone(&self.capability).call(readied, request)
    }
}
