//! Connecting: schemes, typed errors that name the server (never the credentials), no hangs, no panics.

use std::time::Duration;

use keyward::policy::{CacheClass, Policy};
use keyward::{BackendKind, ConnectOptions, Error, Keyward};
use keyward_testkit::RedisServer;

fn policy() -> Policy {
    Policy::builder("test", "connect")
        .cache("c", CacheClass::new(Duration::from_secs(60), "tests"))
        .build()
        .unwrap()
}

#[tokio::test]
async fn mem_scheme_is_the_embedded_backend() {
    let kw = Keyward::connect("mem://", policy()).await.unwrap();
    assert_eq!(kw.backend(), BackendKind::Embedded);
    assert!(format!("{kw:?}").contains("Embedded"));
    let err = Keyward::connect("mem://somewhere", policy())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
}

#[tokio::test]
async fn unix_and_tcp_urls_connect() {
    let unix = RedisServer::spawn();
    let kw = Keyward::connect(&unix.url(), policy()).await.unwrap();
    assert_eq!(kw.backend(), BackendKind::Redis);
    assert!(format!("{kw:?}").contains("unix:"), "{kw:?}");
    let path = unix.socket_path().unwrap().display().to_string();
    Keyward::connect(&format!("unix://{path}"), policy())
        .await
        .unwrap();
    let tcp = RedisServer::spawn_tcp();
    let kw = Keyward::connect(&tcp.url(), policy()).await.unwrap();
    assert!(format!("{kw:?}").contains(&tcp.tcp_port().unwrap().to_string()));
}

#[tokio::test]
async fn refused_connection_names_the_server_not_the_password() {
    // Bind a port, then free it: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Keyward::connect(&format!("redis://app:hunter2@127.0.0.1:{port}/"), policy())
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("hunter2"), "credentials leaked: {text}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn silent_server_times_out_instead_of_hanging() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let options = ConnectOptions::default().connect_timeout(Duration::from_millis(300));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        Keyward::connect_with(&format!("redis://127.0.0.1:{port}"), policy(), options),
    )
    .await
    .expect("connect gives up by itself")
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

#[tokio::test]
async fn bad_urls_are_typed_errors() {
    for url in ["http://example", "not a url", "redis://host:notaport"] {
        let err = Keyward::connect(url, policy()).await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
    }
}

/// A URL that does not parse says what is wrong with it, not only "not a Redis URL"; the hint about
/// percent-encoding credentials comes only when the credentials are what breaks it; no password is shown.
#[tokio::test]
async fn a_bad_url_says_what_is_wrong_with_it() {
    let cases = [
        ("redis://127.0.0.1:65xx", "port"),
        ("redis://:s3cret@127.0.0.1:65xx", "port"),
        ("redis://127.0.0.1:99999", "port"),
        ("redis://127.0.0.1:6379/abc", "database"),
        ("redis://:s3cret@127.0.0.1:6379/abc", "database"),
        ("http://127.0.0.1:6379", "scheme"),
        ("redis://:s3/cret@127.0.0.1:6379", "percent-encode"),
    ];
    for (url, says) in cases {
        let err = Keyward::connect(url, policy()).await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(says),
            "{url}: {text:?} should name the {says}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("cret@"),
            "{url}: {text}"
        );
        if says != "percent-encode" {
            assert!(
                !text.contains("percent-encode"),
                "{url}: misleading hint in {text:?}"
            );
        }
    }
}

#[tokio::test]
async fn server_gone_mid_use_is_an_error_not_a_panic_or_hang() {
    let mut server = RedisServer::spawn();
    let options = ConnectOptions::default()
        .response_timeout(Duration::from_millis(300))
        .reconnect_retries(1);
    let kw = Keyward::connect_with(&server.url(), policy(), options)
        .await
        .unwrap();
    let c = kw.cache::<String>("c").unwrap();
    c.set("k", &"v".to_owned()).await.unwrap();
    server.kill();
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        c.get_or_set("k", || async {
            Ok::<_, std::io::Error>("loaded".to_owned())
        }),
    )
    .await
    .expect("fails by itself");
    // The class fails open (the default): the source answers although Redis is gone.
    assert_eq!(res.unwrap(), "loaded");
    let err = c.set("k", &"v".to_owned()).await.unwrap_err();
    assert!(err.is_backend() && err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn rediss_connects_over_tls() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a test certificate");
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The kit checks readiness over the unix socket; TLS listens on its own port.
    let _server = RedisServer::spawn_with(keyward_testkit::ServerOptions::default().args([
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        cert_path.display().to_string(),
        "--tls-key-file".to_owned(),
        key_path.display().to_string(),
        "--tls-auth-clients".to_owned(),
        "no".to_owned(),
    ]));
    // A self-signed certificate is rejected unless the URL opts out of verification explicitly.
    let err = Keyward::connect(&format!("rediss://127.0.0.1:{port}/"), policy())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("tls://127.0.0.1"), "{err}");
    // The `#insecure` fragment alone is refused: turning verification off takes the explicit option.
    let err = Keyward::connect(&format!("rediss://127.0.0.1:{port}/#insecure"), policy())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    let kw = Keyward::connect_with(
        &format!("rediss://127.0.0.1:{port}/"),
        policy(),
        keyward::ConnectOptions::default().danger_accept_invalid_certs(),
    )
    .await
    .expect("TLS connection with the rustls provider keyward installs");
    assert!(
        format!("{kw:?}").contains("tls_verification: \"OFF"),
        "Debug shows that verification is off: {kw:?}"
    );
    let c = kw.cache::<String>("c").unwrap();
    let v = c
        .get_or_set("k", || async {
            Ok::<_, std::io::Error>("over tls".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(v, "over tls");
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some("over tls"));
}
