//! What every command that talks to Redis says when the connection itself is the problem: a server that wants a
//! password the URL does not give, credentials the server refuses, and a `rediss://` URL at a plain-text port.
//! The same words whichever command it is (one shared classification), naming the server and never the password.

use std::process::{Command, Output};

use keyward_testkit::RedisServer;

const POLICY: &str = r#"
[namespace]
env = "dev"
app = "shop"

[classes.product]
kind = "cache"
ttl = "30m"
version = 2
invalidation = "catalog"

[classes.orders]
kind = "stream"
retention = { maxlen = 1000 }
"#;

/// Every command that connects to a server, without `--policy` and `--url`.
const COMMANDS: [&[&str]; 6] = [
    &["audit"],
    &["purge", "--orphans", "dev:shop:legacy:*"],
    &["inspect", "dev:shop:product:v2:1"],
    &["streams"],
    &["invalidate", "--class", "product"],
    &["dead-letters", "list", "orders"],
];

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .output()
        .expect("run the keyward binary")
}

/// The policy written to a temp dir (kept alive by the returned guard).
fn policy_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// Runs `command` against `url` with the policy; returns its exit code and stderr.
fn run(command: &[&str], policy: &str, url: &str) -> (Option<i32>, String) {
    let mut args = command.to_vec();
    args.extend(["--policy", policy, "--url", url]);
    let out = keyward(&args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP server whose default user needs the password `password` (set after start, so the testkit's readiness
/// check still connects without one).
fn server_requiring(password: &str) -> (RedisServer, u16) {
    let server = RedisServer::spawn_tcp();
    let mut conn = server.connection();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query::<()>(&mut conn)
        .unwrap();
    let port = server.tcp_port().unwrap();
    (server, port)
}

/// No password in the URL for a server that requires one: every command says so and how to give one, instead of
/// a raw `NOAUTH` (a pipeline failure, a refused command "renamed or not granted", a failed `HELLO`).
#[test]
fn a_server_that_requires_a_password_says_so_for_every_command() {
    let (_dir, policy) = policy_file();
    let (_server, port) = server_requiring("s3cret");
    let url = format!("redis://127.0.0.1:{port}");
    for command in COMMANDS {
        let (code, err) = run(command, &policy, &url);
        assert_eq!(code, Some(1), "{command:?}: {err}");
        assert!(
            err.contains(&format!(
                "Redis at 127.0.0.1:{port} requires authentication"
            )),
            "{command:?}: {err}"
        );
        assert!(
            err.contains("redis://:PASSWORD@host:port"),
            "{command:?}: {err}"
        );
        assert!(err.contains("redis://USER:PASSWORD@"), "{command:?}: {err}");
        assert!(err.contains("percent-encode"), "{command:?}: {err}");
        assert!(!err.contains("Pipeline failures"), "{command:?}: {err}");
        assert!(!err.contains("not granted"), "{command:?}: {err}");
        assert!(!err.contains("HELLO"), "{command:?}: {err}");
    }
}

/// `keyward bench` (the library's connection, its own hint) says the same as the other commands.
#[test]
fn bench_says_the_same_about_authentication() {
    let (_server, port) = server_requiring("right-one");
    for (url, said) in [
        (
            format!("redis://127.0.0.1:{port}"),
            "requires authentication",
        ),
        (
            format!("redis://:s3cret@127.0.0.1:{port}"),
            "refused the credentials",
        ),
    ] {
        let out = keyward(&["bench", "hit", "-d", "1", "--url", &url]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(
            err.contains(&format!("Redis at 127.0.0.1:{port} {said}")),
            "{url}: {err}"
        );
        assert!(err.contains("redis://:PASSWORD@host:port"), "{url}: {err}");
        assert!(!err.contains("HELLO"), "{url}: {err}");
        assert!(!err.contains("s3cret"), "{url}: {err}");
    }
}

/// A wrong password, for the default user and for an ACL user: every command says the server refused the
/// credentials, names the server, and never shows the password.
#[test]
fn refused_credentials_are_said_plainly_without_the_password() {
    let (_dir, policy) = policy_file();
    let (_server, port) = server_requiring("right-one");
    for url in [
        format!("redis://:s3cret@127.0.0.1:{port}"),
        format!("redis://someone:s3cret@127.0.0.1:{port}"),
    ] {
        for command in COMMANDS {
            let (code, err) = run(command, &policy, &url);
            assert_eq!(code, Some(1), "{command:?} {url}: {err}");
            assert!(
                err.contains(&format!(
                    "Redis at 127.0.0.1:{port} refused the credentials"
                )),
                "{command:?} {url}: {err}"
            );
            assert!(err.contains("redis://USER:PASSWORD@"), "{command:?}: {err}");
            assert!(!err.contains("s3cret"), "{command:?} {url}: {err}");
            assert!(!err.contains("is it up"), "{command:?} {url}: {err}");
        }
    }
}

/// `rediss://` at a port that speaks plain text: `audit`, `purge`, `inspect` and `streams` (their own
/// connections, not the library's) give the library's diagnosis instead of a bare "timed out".
#[test]
fn rediss_at_a_plain_text_port_asks_whether_the_port_speaks_tls() {
    let (_dir, policy) = policy_file();
    let server = RedisServer::spawn_tcp();
    let port = server.tcp_port().unwrap();
    let url = format!("rediss://:s3cret@127.0.0.1:{port}");
    // Each waits out the connect timeout: run them side by side.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = COMMANDS[..4]
            .iter()
            .map(|command| s.spawn(|| (*command, run(command, &policy, &url))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (command, (code, err)) in results {
        assert_eq!(code, Some(1), "{command:?}: {err}");
        assert!(
            err.contains(&format!("tls://127.0.0.1:{port}")),
            "{command:?}: {err}"
        );
        assert!(
            err.contains(
                "the port answers plain-text Redis: does this port speak TLS? use redis://"
            ),
            "{command:?}: {err}"
        );
        assert!(!err.contains("s3cret"), "{command:?}: {err}");
    }
}
