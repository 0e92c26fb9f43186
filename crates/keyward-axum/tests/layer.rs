//! The layer on an axum `Router`, driven with `oneshot`: fields, refusals, groups, shadow mode.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use http::{Request, StatusCode};
use keyward_axum::{
    KeyExtractor, QUOTA_EXCEEDED, RATELIMIT, RATELIMIT_POLICY, RateLimitLayer, TrustedProxies,
};
use tower::{Layer, Service, ServiceExt};

use crate::util::*;

fn per_ip_layer(limit: u64) -> RateLimitLayer {
    let kw = keyward(&[("per_ip", per_minute(limit))]);
    RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::client_ip(TrustedProxies::none()),
    )
}

#[tokio::test]
async fn allowed_requests_carry_both_fields_with_correct_values() {
    let (app, calls) = counting_app(per_ip_layer(3));
    // GCRA 3 per minute: each request pushes full replenishment 20 s further out.
    for n in 1..=3i64 {
        let response = send(&app, get_from("192.0.2.1:1000")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "ratelimit-policy"),
            Some(r#""per_ip";q=3;w=60"#)
        );
        assert_eq!(
            sf_list(&response, "ratelimit"),
            vec![member("per_ip", &[("r", 3 - n), ("t", 20 * n)])]
        );
        assert_eq!(header(&response, "retry-after"), None);
        assert_eq!(body_text(response).await, "ok");
    }
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn over_the_limit_is_429_problem_json_without_calling_the_handler() {
    let (app, calls) = counting_app(per_ip_layer(3));
    for _ in 0..3 {
        assert_eq!(
            status(&app, get_from("192.0.2.1:1000")).await,
            StatusCode::OK
        );
    }
    let response = send(&app, get_from("192.0.2.1:1001")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        calls.get(),
        3,
        "the handler must not run for a refused request"
    );
    // The next unit comes back 20 s after the first request (60 s / 3), within the same second here.
    assert_eq!(header(&response, "retry-after"), Some("20"));
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        sf_list(&response, "ratelimit-policy"),
        vec![member("per_ip", &[("q", 3), ("w", 60)])]
    );
    // A refusing limit reports its retry time as `t`, so Retry-After is not before the window's end.
    assert_eq!(
        sf_list(&response, "ratelimit"),
        vec![member("per_ip", &[("r", 0), ("t", 20)])]
    );
    let body = body_json(response).await;
    assert_eq!(body["type"], QUOTA_EXCEEDED);
    assert_eq!(body["status"], 429);
    assert_eq!(body["retry_after"], 20);
    assert_eq!(body["violated-policies"], serde_json::json!(["per_ip"]));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("20 seconds")),
        "{body}"
    );
    // Still refused, still not called.
    assert_eq!(
        status(&app, get_from("192.0.2.1:1002")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn different_ips_are_independent() {
    let (app, calls) = counting_app(per_ip_layer(1));
    assert_eq!(status(&app, get_from("192.0.2.1:1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, get_from("192.0.2.1:2")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, get_from("192.0.2.2:1")).await, StatusCode::OK);
    assert_eq!(
        status(&app, get_from("[2001:db8::1]:1")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, get_from("[2001:db8::2]:1")).await,
        StatusCode::OK
    );
    assert_eq!(calls.get(), 4);
}

#[tokio::test]
async fn forwarded_for_is_ignored_without_trusted_proxies() {
    let (app, calls) = counting_app(per_ip_layer(1));
    let from = |xff: &str| request_from("10.0.0.5:1", "/", &[("x-forwarded-for", xff)]);
    assert_eq!(status(&app, from("203.0.113.1")).await, StatusCode::OK);
    // Another claimed client, same peer: same bucket.
    assert_eq!(
        status(&app, from("203.0.113.2")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let forwarded = request_from("10.0.0.5:1", "/", &[("forwarded", "for=203.0.113.3")]);
    assert_eq!(status(&app, forwarded).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn forwarded_for_is_honoured_behind_trusted_proxies() {
    let kw = keyward(&[("per_ip", per_minute(1))]);
    let layer = RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::client_ip(TrustedProxies::networks(["10.0.0.0/8"]).unwrap()),
    );
    let (app, calls) = counting_app(layer);
    let via_proxy = |xff: &str| request_from("10.0.0.5:1", "/", &[("x-forwarded-for", xff)]);
    assert_eq!(status(&app, via_proxy("203.0.113.1")).await, StatusCode::OK);
    assert_eq!(status(&app, via_proxy("203.0.113.2")).await, StatusCode::OK);
    assert_eq!(
        status(&app, via_proxy("203.0.113.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Prepending a fresh address does not get 203.0.113.1 a new bucket.
    assert_eq!(
        status(&app, via_proxy("198.51.100.77, 203.0.113.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Two proxies deep.
    assert_eq!(
        status(&app, via_proxy("203.0.113.1, 10.9.9.9")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client bypassing the proxies cannot borrow another's address, nor escape its own bucket.
    let direct = |xff: &str| request_from("198.51.100.9:1", "/", &[("x-forwarded-for", xff)]);
    assert_eq!(status(&app, direct("203.0.113.3")).await, StatusCode::OK);
    assert_eq!(
        status(&app, direct("203.0.113.4")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn rfc7239_forwarded_with_ipv6_behind_hops() {
    let kw = keyward(&[("per_ip", per_minute(1))]);
    let layer = RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::client_ip(
            TrustedProxies::hops(1).header(keyward_axum::ProxyHeader::Forwarded),
        ),
    );
    let (app, _) = counting_app(layer);
    let via = |fwd: &str| request_from("10.0.0.5:1", "/", &[("forwarded", fwd)]);
    assert_eq!(
        status(&app, via(r#"for="[2001:db8:cafe::17]:4711";proto=https"#)).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, via(r#"for=1.2.3.4, for="[2001:db8:cafe::17]""#)).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&app, via("for=192.0.2.60")).await, StatusCode::OK);
}

#[tokio::test]
async fn a_group_emits_one_member_per_limit() {
    let kw = keyward(&[
        ("per_minute", per_minute(2)),
        ("per_day", {
            keyward::policy::RateLimitClass::new(
                keyward::policy::Algorithm::FixedWindow,
                1000,
                std::time::Duration::from_secs(86_400),
            )
        }),
    ]);
    let limiter = kw.rate_limiter_group(&["per_minute", "per_day"]).unwrap();
    let layer = RateLimitLayer::new(limiter, KeyExtractor::client_ip(TrustedProxies::none()));
    let (app, calls) = counting_app(layer);

    let first = send(&app, get_from("192.0.2.1:1")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        header(&first, "ratelimit-policy"),
        Some(r#""per_minute";q=2;w=60, "per_day";q=1000;w=86400"#)
    );
    let members = sf_list(&first, "ratelimit");
    assert_eq!(members.len(), 2, "{members:?}");
    assert_eq!(members[0], member("per_minute", &[("r", 1), ("t", 30)]));
    assert_eq!(members[1].0, "per_day");
    assert_eq!(members[1].1[0], ("r".to_owned(), 999));
    let day_t = members[1].1[1].1;
    assert!(
        members[1].1[1].0 == "t" && (1..=86_400).contains(&day_t),
        "{members:?}"
    );

    assert_eq!(status(&app, get_from("192.0.2.1:1")).await, StatusCode::OK);
    let refused = send(&app, get_from("192.0.2.1:1")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "retry-after"), Some("30"));
    let members = sf_list(&refused, "ratelimit");
    assert_eq!(members[0], member("per_minute", &[("r", 0), ("t", 30)]));
    // All or nothing: the refused request charged no daily unit.
    assert_eq!(members[1].1[0], ("r".to_owned(), 998));
    let body = body_json(refused).await;
    assert_eq!(body["violated-policies"], serde_json::json!(["per_minute"]));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn shadow_classes_never_refuse_nor_show_up() {
    let kw = keyward(&[
        ("per_ip", per_minute(100)),
        ("strict", per_minute(1).shadow(true)),
    ]);
    let limiter = kw.rate_limiter_group(&["per_ip", "strict"]).unwrap();
    let layer = RateLimitLayer::new(limiter, KeyExtractor::client_ip(TrustedProxies::none()));
    let shadow_seen = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&shadow_seen);
    let app = Router::new()
        .route(
            "/",
            get(
                move |Extension(decision): Extension<keyward::Decision>| async move {
                    if decision.is_shadow_limited() {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    "ok"
                },
            ),
        )
        .layer(layer);
    for n in 1..=5i64 {
        let response = send(&app, get_from("192.0.2.1:1")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "ratelimit-policy"),
            Some(r#""per_ip";q=100;w=60"#)
        );
        let members = sf_list(&response, "ratelimit");
        assert_eq!(members.len(), 1, "{members:?}");
        assert_eq!(members[0].0, "per_ip");
        assert_eq!(members[0].1[0], ("r".to_owned(), 100 - n));
    }
    assert_eq!(
        shadow_seen.load(Ordering::SeqCst),
        4,
        "the shadow class would have refused 4 of 5"
    );

    // Only shadow classes: no fields at all (the draft's lists must not be empty), never a refusal.
    let kw = keyward(&[("strict", per_minute(1).shadow(true))]);
    let layer = RateLimitLayer::new(
        kw.rate_limiter("strict").unwrap(),
        KeyExtractor::client_ip(TrustedProxies::none()),
    );
    let (app, calls) = counting_app(layer);
    for _ in 0..3 {
        let response = send(&app, get_from("192.0.2.1:1")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get(RATELIMIT_POLICY).is_none());
        assert!(response.headers().get(RATELIMIT).is_none());
    }
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn a_failed_check_is_a_500_and_the_handler_is_not_called() {
    // An empty id cannot make a key (`keyward::Error::Key`): a bug in the extractor, not the client.
    let kw = keyward(&[("per_ip", per_minute(5))]);
    let layer = RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::from_fn(|_| Some(String::new())),
    );
    let (app, calls) = counting_app(layer);
    let response = send(&app, get_from("192.0.2.1:1")).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    assert!(response.headers().get(RATELIMIT).is_none());
    let body = body_json(response).await;
    assert_eq!(body["status"], 500);
    assert_eq!(body["type"], "about:blank");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        !detail.contains("empty"),
        "internals stay in the log: {detail}"
    );
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn stacked_layers_add_members_to_the_same_lists() {
    let kw = keyward(&[("global", per_minute(100)), ("per_ip", per_minute(10))]);
    let (app, _) = counting_app(RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::client_ip(TrustedProxies::none()),
    ));
    let app = app.layer(RateLimitLayer::new(
        kw.rate_limiter("global").unwrap(),
        KeyExtractor::route(),
    ));
    let response = send(&app, get_from("192.0.2.1:1")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let names: Vec<String> = sf_list(&response, "ratelimit")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names, ["per_ip", "global"]);
    assert_eq!(sf_list(&response, "ratelimit-policy").len(), 2);
}

/// An inner service that must be polled ready before each call, and whose clones start unready — as with
/// tower's buffer or concurrency-limit services. A layer calling a clone instead of the readied instance
/// would trip its assertion.
struct NeedsReady {
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl Clone for NeedsReady {
    fn clone(&self) -> Self {
        NeedsReady {
            ready: false,
            calls: Arc::clone(&self.calls),
        }
    }
}

impl Service<Request<Body>> for NeedsReady {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        assert!(self.ready, "called without poll_ready on this instance");
        self.ready = false;
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Response::new(Body::from("inner"))) })
    }
}

#[tokio::test]
async fn the_readied_inner_service_is_the_one_called() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = NeedsReady {
        ready: false,
        calls: Arc::clone(&calls),
    };
    let mut service = per_ip_layer(2).layer(inner);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(get_from("192.0.2.1:1"))
            .await
            .unwrap();
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The session and idempotency services share the rate-limit service's shell: they too call the
/// instance that was polled ready, never a fresh clone.
#[tokio::test]
async fn every_layer_calls_the_readied_inner_service() {
    use keyward::policy::{IdempotencyClass, Policy, SessionClass};
    use keyward::session::SessionSecrets;
    use keyward_axum::{IdempotencyLayer, SessionLayer};
    use std::time::Duration;

    let policy = Policy::builder("test", "shell")
        .session(
            "web",
            SessionClass::new(Duration::from_secs(60), Duration::from_secs(600)),
        )
        .idempotency("charges", IdempotencyClass::new())
        .build()
        .unwrap();
    let kw = keyward::Keyward::embedded(policy);
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = || NeedsReady {
        ready: false,
        calls: Arc::clone(&calls),
    };

    let secrets = SessionSecrets::new(*b"a 32-byte secret from your vault").unwrap();
    let mut sessions =
        SessionLayer::new(kw.sessions::<String>("web", secrets).unwrap()).layer(inner());
    let mut idempotent = IdempotencyLayer::new(kw.idempotency("charges").unwrap()).layer(inner());
    for n in 0..2 {
        let response = sessions
            .ready()
            .await
            .unwrap()
            .call(get_from("192.0.2.1:1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let charge = Request::post("/charges")
            .header("authorization", "Bearer sk_alice")
            .header("idempotency-key", format!("\"key-{n}\""))
            .body(Body::from("amount=1"))
            .unwrap();
        let response = ServiceExt::<Request<Body>>::ready(&mut idempotent)
            .await
            .unwrap()
            .call(charge)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}
