//! TLS with a private CA and client certificates (mutual TLS) against a real `redis-server --tls-auth-clients
//! yes`: the right CA and client certificate run every capability; a wrong CA, a missing client certificate
//! or one from another CA is refused with `Error::Connect`; unreadable or malformed TLS files fail with a
//! typed error naming them, before any connection; key material never shows in `Debug` or errors. The same
//! holds on a Redis Cluster whose nodes speak only TLS (`rediss+cluster://`); Sentinel over TLS is proved in
//! `tests/sentinel.rs`.

use std::time::Duration;

use keyward::idempotency::{Begin, fingerprint};
use keyward::policy::{Algorithm, CacheClass, IdempotencyClass, LockClass, Policy, RateLimitClass};
use keyward::rate_limit::Source;
use keyward::{ConnectOptions, Error, Keyward};
use keyward_testkit::{ClusterOptions, RedisCluster, RedisServer, TestCerts, TlsServer};

fn policy() -> Policy {
    Policy::builder("test", "tls")
        .cache("c", CacheClass::new(Duration::from_secs(60), "tests"))
        .rate_limit(
            "api",
            RateLimitClass::new(Algorithm::Gcra, 2, Duration::from_secs(3600)),
        )
        .lock("job", LockClass::new(Duration::from_secs(30)))
        .idempotency("charge", IdempotencyClass::new())
        .build()
        .unwrap()
}

/// A distinctive piece of a private key's PEM body (its second line), to prove it is printed nowhere.
fn key_fragment(key_pem: &str) -> &str {
    let line = key_pem.lines().nth(1).expect("a PEM key has a body line");
    assert!(line.len() >= 40, "{line}");
    line
}

/// The same piece as `Debug` prints bytes (`45, 77, …`), for types that keep the key as `Vec<u8>`.
fn key_fragment_as_bytes(key_pem: &str) -> String {
    let debug = format!("{:?}", key_fragment(key_pem).as_bytes());
    debug[1..debug.len() - 1].to_owned()
}

/// Every capability over the connection: a cache fill, a rate limit that counts on the server, a lock that
/// excludes, an idempotency key.
async fn every_capability_works(kw: &Keyward, key: &str) {
    let cache = kw.cache::<String>("c").unwrap();
    let v = cache
        .get_or_set(key, || async {
            Ok::<_, std::io::Error>("over mutual tls".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(v, "over mutual tls");
    assert_eq!(
        cache.get(key).await.unwrap().as_deref(),
        Some("over mutual tls")
    );

    let limiter = kw.rate_limiter("api").unwrap();
    for _ in 0..2 {
        let d = limiter.check(key).await.unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.source(), Source::Store, "decided by Redis");
    }
    assert!(limiter.check(key).await.unwrap().is_limited());

    let locks = kw.locks("job").unwrap();
    let guard = locks.try_lock(key).await.unwrap().expect("free lock");
    assert!(locks.try_lock(key).await.unwrap().is_none(), "held");
    assert!(guard.release().await.unwrap());

    let idem = kw.idempotency("charge").unwrap();
    let fp = fingerprint(&[b"POST", b"/charges"]);
    assert!(matches!(idem.begin(key, &fp).await.unwrap(), Begin::New(_)));
    assert!(matches!(
        idem.begin(key, &fp).await.unwrap(),
        Begin::InProgress { .. }
    ));
}

#[tokio::test]
async fn right_ca_and_client_certificate_run_every_capability() {
    let certs = TestCerts::generate();
    let server = TlsServer::spawn(&certs, true);

    // From files.
    let kw = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_ca_file(certs.ca_file())
            .tls_client_cert_files(certs.client_cert_file(), certs.client_key_file()),
    )
    .await
    .expect("the right CA and client certificate connect");
    assert!(
        format!("{kw:?}").contains(&format!("tls://127.0.0.1:{}", server.port())),
        "{kw:?}"
    );
    every_capability_works(&kw, "from-files").await;

    // From PEM bytes.
    let kw = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.ca_pem())
            .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem()),
    )
    .await
    .expect("the same material as PEM bytes connects");
    every_capability_works(&kw, "from-pem").await;

    // The writes reached this server: its plain-text socket sees them.
    let mut con = server.server().connection();
    let keys: Vec<String> = redis::Commands::scan(&mut con)
        .unwrap()
        .collect::<redis::RedisResult<_>>()
        .unwrap();
    assert!(
        keys.iter().any(|k| k.contains("from-files"))
            && keys.iter().any(|k| k.contains("from-pem")),
        "{keys:?}"
    );
}

#[tokio::test]
async fn a_wrong_ca_is_refused() {
    let certs = TestCerts::generate();
    let server = TlsServer::spawn(&certs, true);
    let err = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.other_ca_pem())
            .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem())
            .connect_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("tls://127.0.0.1:{}", server.port())),
        "names the server: {err}"
    );
    // Without a CA option the system's trust store is used, which does not know the test CA either.
    let err = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    // The same options with the right CA connect: the refusals above were the CA's.
    Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.ca_pem())
            .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem()),
    )
    .await
    .expect("the right CA connects");
}

#[tokio::test]
async fn a_missing_or_foreign_client_certificate_is_refused() {
    let certs = TestCerts::generate();
    let server = TlsServer::spawn(&certs, true);
    let err = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default().tls_ca_pem(certs.ca_pem()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. }),
        "no client certificate: {err}"
    );
    let err = Keyward::connect_with(
        &server.url(),
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.ca_pem())
            .tls_client_cert_pem(certs.other_client_cert_pem(), certs.other_client_key_pem()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. }),
        "a client certificate from another CA: {err}"
    );
    assert!(
        !err.to_string()
            .contains(key_fragment(certs.other_client_key_pem())),
        "{err}"
    );

    // The same server without `--tls-auth-clients` takes the connection without one: the refusals above
    // were the client certificate's, not the CA's.
    let open = TlsServer::spawn(&certs, false);
    let kw = Keyward::connect_with(
        &open.url(),
        policy(),
        ConnectOptions::default().tls_ca_pem(certs.ca_pem()),
    )
    .await
    .expect("server authentication alone");
    kw.cache::<String>("c")
        .unwrap()
        .set("k", &"v".to_owned())
        .await
        .unwrap();
}

/// Files are read and PEM parsed before any connection (the port here has no server at all), with errors
/// naming the file or option.
#[tokio::test]
async fn bad_tls_files_are_typed_errors_naming_them() {
    let certs = TestCerts::generate();
    let url = "rediss://127.0.0.1:1/";
    let missing = certs.dir().join("no-such-ca.pem");
    let err = Keyward::connect_with(
        url,
        policy(),
        ConnectOptions::default().tls_ca_file(&missing),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let missing_key = certs.dir().join("no-such-client.key");
    let err = Keyward::connect_with(
        url,
        policy(),
        ConnectOptions::default()
            .tls_ca_file(certs.ca_file())
            .tls_client_cert_files(certs.client_cert_file(), &missing_key),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(
        err.to_string().contains(&missing_key.display().to_string()),
        "{err}"
    );

    // A file that is not a certificate: the server's key given as the CA.
    let err = Keyward::connect_with(
        url,
        policy(),
        ConnectOptions::default().tls_ca_file(certs.server_key_file()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&certs.server_key_file().display().to_string()),
        "{err}"
    );

    let err = Keyward::connect_with(
        url,
        policy(),
        ConnectOptions::default().tls_ca_pem("not a certificate"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(err.to_string().contains("tls_ca_pem"), "{err}");

    // A key that belongs to another certificate; the message shows neither key.
    let err = Keyward::connect_with(
        url,
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.ca_pem())
            .tls_client_cert_pem(certs.client_cert_pem(), certs.other_client_key_pem()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("tls_client_cert_pem"), "{text}");
    assert!(
        !text.contains(key_fragment(certs.other_client_key_pem())),
        "{text}"
    );
    assert!(
        !text.contains(key_fragment(certs.client_key_pem())),
        "{text}"
    );
}

/// A `rediss://` URL against a port that speaks plain text: the server never answers the TLS handshake, so the
/// connect runs into its timeout. The error said only "timed out"; it now names the likely cause.
#[tokio::test]
async fn a_rediss_url_against_a_plain_text_port_names_the_likely_cause() {
    let certs = TestCerts::generate();
    let plain = RedisServer::spawn_tcp();
    let url = format!("rediss://127.0.0.1:{}/", plain.tcp_port().unwrap());
    let err = Keyward::connect_with(
        &url,
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.ca_pem())
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect_err("no TLS server on that port");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("does this port speak TLS?"),
        "{err}"
    );
}

/// The "does this port speak TLS?" hint is for a port that answers plain-text Redis, and only that: a port
/// that accepts the connection but never answers (a TLS server that is merely slow looks the same), a port
/// whose connection is never accepted (a firewall dropping packets) and a closed port (refused) must not
/// get it. The URL's password shows in neither the error's `Display` nor its `Debug`. Before, every timeout
/// of a `rediss://` connect got the hint, even when no TCP connection was ever made.
#[tokio::test]
async fn the_tls_hint_fires_only_for_a_port_that_answers_plain_text() {
    let certs = TestCerts::generate();
    let connect = |port: u16| {
        let ca = certs.ca_pem().to_owned();
        async move {
            Keyward::connect_with(
                &format!("rediss://alice:s3cret-pw@127.0.0.1:{port}/"),
                policy(),
                ConnectOptions::default()
                    .tls_ca_pem(ca)
                    .connect_timeout(Duration::from_millis(500)),
            )
            .await
            .expect_err("no TLS server on that port")
        }
    };
    let check = |err: &Error, hint: bool, case: &str| {
        assert!(matches!(err, Error::Connect { .. }), "{case}: {err}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("s3cret-pw"), "{case}: {shown}");
            assert_eq!(
                shown.contains("does this port speak TLS?"),
                hint,
                "{case}: {shown}"
            );
        }
    };

    let plain = RedisServer::spawn_tcp();
    let err = connect(plain.tcp_port().unwrap()).await;
    check(&err, true, "plain-text Redis");

    // Accepts every connection, never sends a byte.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let err = connect(silent_port).await;
    check(&err, false, "a port that accepts and stays silent");
    held.abort();

    // Backlog 0, filled by one connection: the kernel drops every further SYN, so no TCP connection is made.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let full_port = full.local_addr().unwrap().port();
    let _filler = std::net::TcpStream::connect(("127.0.0.1", full_port)).unwrap();
    let err = connect(full_port).await;
    check(&err, false, "a port that never accepts");
    drop(full);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = connect(closed_port).await;
    check(&err, false, "a closed port");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
}

#[tokio::test]
async fn tls_options_need_a_rediss_url() {
    let certs = TestCerts::generate();
    for url in ["redis://127.0.0.1:1/", "redis+unix:///nonexistent.sock"] {
        for options in [
            ConnectOptions::default().tls_ca_pem(certs.ca_pem()),
            ConnectOptions::default()
                .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem()),
        ] {
            let err = Keyward::connect_with(url, policy(), options)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            assert!(err.to_string().contains("rediss://"), "{url}: {err}");
        }
    }
}

#[test]
fn debug_shows_no_key_material() {
    let certs = TestCerts::generate();
    let fragment = key_fragment(certs.client_key_pem());
    let from_pem = ConnectOptions::default()
        .tls_ca_pem(certs.ca_pem())
        .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem());
    let text = format!("{from_pem:?}");
    assert!(text.contains("client_cert: set"), "{text}");
    assert!(!text.contains(fragment), "{text}");
    assert!(
        !text.contains(&key_fragment_as_bytes(certs.client_key_pem())),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let from_files = ConnectOptions::default()
        .tls_client_cert_files(certs.client_cert_file(), certs.client_key_file());
    let text = format!("{from_files:?}");
    assert!(text.contains("client_cert: set"), "{text}");
    assert!(!text.contains(fragment), "{text}");

    let text = format!("{:?}", ConnectOptions::default());
    assert!(text.contains("client_cert: not set"), "{text}");
}

/// A 3-master cluster whose nodes speak only TLS and require client certificates (clients, the cluster bus
/// and `redis-cli --cluster create` alike): a wrong CA and a missing client certificate are refused with
/// `Error::Connect` naming a node, the right pair runs every capability, with keys on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_needs_the_right_ca_and_client_certificate() {
    let certs = TestCerts::generate();
    let files = certs.server_files(true);
    let cluster = tokio::task::spawn_blocking(move || {
        RedisCluster::spawn_with(ClusterOptions::default().tls(files))
    })
    .await
    .unwrap();
    let url = cluster.seed_url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");

    let refused = |err: &Error, why: &str| {
        assert!(matches!(err, Error::Connect { .. }), "{why}: {err}");
        let text = err.to_string();
        assert!(
            cluster
                .ports()
                .iter()
                .any(|port| text.contains(&format!("tls://127.0.0.1:{port}"))),
            "{why}: names a node: {text}"
        );
        assert!(
            !text.contains(key_fragment(certs.client_key_pem())),
            "{why}: {text}"
        );
    };
    let err = Keyward::connect_with(
        &url,
        policy(),
        ConnectOptions::default()
            .tls_ca_pem(certs.other_ca_pem())
            .tls_client_cert_pem(certs.client_cert_pem(), certs.client_key_pem()),
    )
    .await
    .unwrap_err();
    refused(&err, "a wrong CA");
    let err = Keyward::connect_with(
        &url,
        policy(),
        ConnectOptions::default().tls_ca_pem(certs.ca_pem()),
    )
    .await
    .unwrap_err();
    refused(&err, "no client certificate");

    let kw = Keyward::connect_with(
        &url,
        policy(),
        ConnectOptions::default()
            .tls_ca_file(certs.ca_file())
            .tls_client_cert_files(certs.client_cert_file(), certs.client_key_file()),
    )
    .await
    .expect("the right CA and client certificate connect to the cluster");
    every_capability_works(&kw, "on-the-cluster").await;
    let cache = kw.cache::<String>("c").unwrap();
    for i in 0..30 {
        let key = format!("spread-{i}");
        cache.set(&key, &key).await.unwrap();
        assert_eq!(cache.get(&key).await.unwrap(), Some(key));
    }
    // Every master got some of the keys (asked over the kit's plain Unix socket).
    for port in cluster.ports() {
        let mut con = cluster.server(port).expect("a node").connection();
        let keys: Vec<String> = redis::Commands::scan(&mut con)
            .unwrap()
            .collect::<redis::RedisResult<_>>()
            .unwrap();
        assert!(
            keys.iter().any(|k| k.contains("spread-")),
            "node {port} holds none of the keys: {keys:?}"
        );
    }
}
