//! The binary end to end: it starts on port 0, prints the shop's URL, serves it (a customer can log in
//! over a real connection), and keeps a generated admin token in an owner-only file rather than
//! printing it.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Kills the server when the test ends, passing or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_prints_the_shop_url_and_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(["--addr", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the storefront binary");
    let stdout = child.stdout.take().unwrap();
    let _server = Server(child);

    // Lines arrive on a thread; the test waits for the URL line with a deadline.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no shop URL printed; got {printed:?}"));
        if let Some(rest) = line.split("the shop is at ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
        printed.push(line);
    };
    assert!(
        printed.iter().any(|l| l.contains("imported Northwind")),
        "{printed:?}"
    );
    let token_line = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let token_file = dir.path().join("shop.db.admin-token");
    assert!(
        token_line.contains(&token_file.display().to_string()),
        "{token_line}"
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        token.len() >= 32 && !token_line.contains(&token),
        "the token itself is never printed"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the token file is the owner's only: {mode:o}"
        );
    }

    // A plain HTTP/1.1 request to the printed address.
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix('/'))
        .unwrap_or_else(|| panic!("a URL like http://host:port/: {url}"));
    let response = http(
        addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""status":"ok""#), "{response}");

    // A login over a real connection: the per-IP limit reads the peer address (a 500 without it), and
    // the seeded password verifies against its Argon2id hash at the recommended cost.
    let body = r#"{"customer_id":"ALFKI","password":"alfki@northwind"}"#;
    let response = http(
        addr,
        &format!(
            "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("set-cookie: __Host-session="),
        "{response}"
    );
    // A session secret was kept for the next start, owner-only.
    let secret = std::fs::read_to_string(dir.path().join("shop.db.session-secret")).unwrap();
    assert_eq!(secret.len(), 64);
}

/// Send `request` to `addr` over a new connection and read the whole answer.
async fn http(addr: &str, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    response
}

/// `storefront worker` without `REDIS_URL` would consume an embedded stream of its own, which nothing
/// publishes to, for ever: it refuses to start (exit 2) and says why.
#[test]
fn a_worker_without_redis_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(["worker", "--db"])
        .arg(dir.path().join("shop.db"))
        .env_remove("REDIS_URL")
        .output()
        .expect("run the storefront binary");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("REDIS_URL"), "{err}");
}
