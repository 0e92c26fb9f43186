//! One real server on 127.0.0.1, port 0, spoken to over TCP with plain HTTP/1.1 requests.

use std::net::SocketAddr;
use std::time::Duration;

use keyward_axum::{KeyExtractor, RateLimitLayer, TrustedProxies};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::*;

/// A parsed HTTP/1.1 response: status, headers (lowercased names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on a fresh connection with `Connection: close`, reading until the server closes it.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the server answered within 10 s");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header section");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn a_real_server_refuses_after_the_limit() {
    let kw = keyward(&[("per_ip", per_minute(2))]);
    let layer = RateLimitLayer::new(
        kw.rate_limiter("per_ip").unwrap(),
        KeyExtractor::client_ip(TrustedProxies::none()),
    );
    let (router, calls) = counting_app(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .await
    });

    for remaining in [1, 0] {
        let reply = get(addr, "/").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body, "ok");
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some(r#""per_ip";q=2;w=60"#)
        );
        let ratelimit = reply.header("ratelimit").expect("RateLimit field");
        assert!(
            ratelimit.starts_with(&format!(r#""per_ip";r={remaining};t="#)),
            "{ratelimit}"
        );
    }
    let refused = get(addr, "/").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("30"));
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(refused.header("ratelimit"), Some(r#""per_ip";r=0;t=30"#));
    let body: serde_json::Value = serde_json::from_str(&refused.body).expect("problem+json body");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["per_ip"]));
    assert_eq!(calls.get(), 2);

    let _ = stop.send(());
    server
        .await
        .expect("server task")
        .expect("server shut down cleanly");
}
