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
    let (_server, rx) = spawn_embedded(&["--addr", "127.0.0.1:0"], &db);
    let (url, printed) = shop_url(&rx, Duration::from_secs(30));
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

/// `storefront ARGS --db DB` without `REDIS_URL`, running (killed when the [`Server`] drops); its stdout
/// lines arrive on the returned channel, read on a thread.
fn spawn_embedded(args: &[&str], db: &std::path::Path) -> (Server, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(args)
        .arg("--db")
        .arg(db)
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the storefront binary");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Reads until the shop exits, even once nobody listens: a closed pipe would hand the shop an EPIPE.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Server(child), rx)
}

/// The lines from `rx` up to the one naming the shop's URL, waited for with a deadline of `within` per
/// line: the URL and the lines printed before it.
fn shop_url(rx: &mpsc::Receiver<String>, within: Duration) -> (String, Vec<String>) {
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no shop URL printed; got {printed:?}"));
        if let Some(rest) = line.split("the shop is at ").nth(1) {
            return (rest.split_whitespace().next().unwrap().to_owned(), printed);
        }
        printed.push(line);
    }
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
#[tokio::test]
async fn a_worker_without_redis_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_embedded(&["worker"], &dir.path().join("shop.db")).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("REDIS_URL"), "{err}");
}

/// A `storefront` process on the embedded backend whose stdout is read on a thread.
struct EmbeddedShop {
    server: Server,
    url: String,
}

impl EmbeddedShop {
    /// `storefront --addr 127.0.0.1:0 --db DB` without `REDIS_URL`, once it prints its URL.
    fn start(db: &std::path::Path) -> EmbeddedShop {
        let (server, rx) = spawn_embedded(&["--addr", "127.0.0.1:0", "--restock-every", "0"], db);
        let (url, _) = shop_url(&rx, Duration::from_secs(60));
        EmbeddedShop {
            server,
            url: url.trim_end_matches('/').to_owned(),
        }
    }
}

/// `storefront ARGS --db DB` without `REDIS_URL`, to completion within a minute: a command expected to
/// exit that serves instead fails the test (and is killed) rather than hanging it.
async fn run_embedded(args: &[&str], db: &std::path::Path) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(args)
        .arg("--db")
        .arg(db)
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap_or_else(|_| panic!("storefront {args:?} still ran after 60 s (serving?)"))
        .expect("run the storefront binary")
}

/// Trial finding (issue #15): a second embedded shop on the same database started silently, with its own
/// cache, sessions, idempotency keys and stream. Now it exits 2 and says why, while the first one holds
/// the lock; `restock-report` is refused the same way; `storefront replay` still runs against the
/// shop. The lock is the OS's: once the first shop is killed (SIGKILL, no clean-up), a new one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_embedded_shop_on_one_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    let first = EmbeddedShop::start(&db);

    let second = run_embedded(&["--addr", "127.0.0.1:0"], &db).await;
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another storefront on the embedded backend already uses the database")
            && err.contains(&db.display().to_string())
            && err.contains("in its own process")
            && err.contains("Set REDIS_URL to run several instances"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("the shop is at"),
        "it never served"
    );
    let report = run_embedded(&["restock-report"], &db).await;
    let err = String::from_utf8_lossy(&report.stderr);
    assert_eq!(report.status.code(), Some(2), "{err}");
    assert!(err.contains("POST /admin/restock-report"), "{err}");

    // The replay only reads the database: the lock does not stop it.
    let replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args([
            "replay",
            "--url",
            &first.url,
            "--limit",
            "5",
            "--speedup",
            "0",
        ])
        .arg("--db")
        .arg(&db)
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );

    // SIGKILL: no destructor runs, the OS releases the lock with the process.
    drop(first.server);
    let _again = EmbeddedShop::start(&db);
}

/// Trial finding (issue #15): `--no-worker` on the embedded backend was accepted, though nothing could
/// ever consume the orders' events (the stream lives in the shop's process). It exits 2 and says why.
#[tokio::test]
async fn no_worker_without_redis_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(["--addr", "127.0.0.1:0", "--no-worker", "--db"])
        .arg(&db)
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Before the fix it served until killed: the deadline turns that into a failure.
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("it exits instead of serving")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--no-worker") && err.contains("REDIS_URL"),
        "{err}"
    );
    assert!(!db.exists(), "refused before opening the database");
}

/// Trial finding (issue #15): with `REDIS_URL` on a closed port the headline said "starting with the
/// database …" and only the cause named Redis. Now the headline names the step, with the URL's
/// credentials removed.
#[tokio::test]
async fn an_unreachable_redis_is_named_in_the_headline_without_its_password() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(["--addr", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("shop.db"))
        .env(
            "REDIS_URL",
            format!("redis://shop:s3cret-pw@127.0.0.1:{port}/0"),
        )
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("it gives up on the closed port")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "Error: connecting to Redis at redis://***@127.0.0.1:{port}/0"
        )),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "no password: {err}");
    // The cause once: a wrapping error that also printed its source showed it twice.
    assert_eq!(err.matches("cannot connect to Redis").count(), 1, "{err}");
}

/// CI hang (stop 22): a shop whose stdout reader had gone panicked on its next `println!` (EPIPE), so
/// it died and released the embedded lock while a test still counted on it. A closed stdout must not
/// stop a serving shop: here its stdout is a pipe whose read end is closed before it starts, and it
/// must still answer `/healthz` on the address it was given.
#[tokio::test]
async fn a_shop_whose_stdout_is_closed_keeps_serving() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut shop = tokio::process::Command::new(env!("CARGO_BIN_EXE_storefront"))
        .args(["--addr", &addr, "--restock-every", "0", "--db"])
        .arg(dir.path().join("shop.db"))
        .env_remove("REDIS_URL")
        .env_remove("STOREFRONT_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = shop.try_wait().unwrap() {
            let mut err = String::new();
            shop.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .await
                .unwrap();
            panic!("the shop exited ({status}) instead of serving: {err}");
        }
        if let Ok(stream) = tokio::net::TcpStream::connect(&addr).await {
            drop(stream);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shop never listened on {addr}"
        );
        // Polls the port while the shop imports Northwind (a few seconds); each try is a connect.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = http(
        &addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(shop.try_wait().unwrap().is_none(), "still serving");
}
