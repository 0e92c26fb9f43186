//! Tests of the server harness against a real `redis-server`.

use std::panic;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use redis::{Commands, Connection};

use crate::{RedisServer, ServerOptions};

fn ping(con: &mut Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(con)
}

fn config_get(con: &mut Connection, name: &str) -> String {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query(con)
        .unwrap();
    assert_eq!(pair.len(), 2, "CONFIG GET {name} returned {pair:?}");
    pair[1].clone()
}

/// Waits up to 5 s for `cond` to hold.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
fn unix_server_answers_ping() {
    let server = RedisServer::spawn();
    let socket = server.socket_path().expect("unix server has a socket");
    assert!(socket.exists(), "{} missing", socket.display());
    assert!(socket.starts_with(server.dir()));
    assert_eq!(server.tcp_port(), None);
    assert_eq!(server.url(), format!("redis+unix://{}", socket.display()));
    assert_eq!(ping(&mut server.connection()).unwrap(), "PONG");
}

#[test]
fn unix_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = RedisServer::spawn();
    let mode = server
        .socket_path()
        .unwrap()
        .metadata()
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn unix_server_listens_on_no_tcp_port() {
    let server = RedisServer::spawn();
    assert_eq!(config_get(&mut server.connection(), "port"), "0");
}

#[test]
fn tcp_server_answers_ping() {
    let server = RedisServer::spawn_tcp();
    let port = server.tcp_port().expect("tcp server has a port");
    assert_ne!(port, 0);
    assert_eq!(server.socket_path(), None);
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    let mut con = server.connection();
    assert_eq!(ping(&mut con).unwrap(), "PONG");
    assert_eq!(config_get(&mut con, "port"), port.to_string());
}

#[test]
fn urls_open_working_clients() {
    for server in [RedisServer::spawn(), RedisServer::spawn_tcp()] {
        let client = redis::Client::open(server.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        assert_eq!(ping(&mut con).unwrap(), "PONG", "{}", server.url());
    }
}

#[test]
fn persistence_is_disabled() {
    let server = RedisServer::spawn();
    let mut con = server.connection();
    assert_eq!(config_get(&mut con, "save"), "");
    assert_eq!(config_get(&mut con, "appendonly"), "no");
    assert_eq!(config_get(&mut con, "daemonize"), "no");
    assert_eq!(
        Path::new(&config_get(&mut con, "dir")),
        server.dir().canonicalize().unwrap()
    );
}

#[test]
fn extra_args_are_applied() {
    let server = RedisServer::spawn_with(ServerOptions::default().args([
        "--maxmemory",
        "10mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]));
    let mut con = server.connection();
    assert_eq!(
        config_get(&mut con, "maxmemory"),
        (10 * 1024 * 1024).to_string()
    );
    assert_eq!(config_get(&mut con, "maxmemory-policy"), "allkeys-lru");
}

#[test]
fn extra_args_work_over_tcp() {
    let server = RedisServer::spawn_with(
        ServerOptions::default()
            .tcp(true)
            .arg("--databases")
            .arg("4"),
    );
    assert!(server.tcp_port().is_some());
    assert_eq!(config_get(&mut server.connection(), "databases"), "4");
}

#[test]
fn kill_makes_connections_fail() {
    let mut server = RedisServer::spawn();
    let pid = server.pid();
    let mut existing = server.connection();
    assert_eq!(ping(&mut existing).unwrap(), "PONG");

    server.kill();

    assert!(
        ping(&mut existing).is_err(),
        "command on an old connection succeeded"
    );
    assert!(
        server.client().get_connection().is_err(),
        "new connection succeeded"
    );
    assert_eq!(server.pid(), pid, "pid is still reported after kill");
    // Later calls are no-ops.
    server.kill();
}

#[test]
fn kill_over_tcp_makes_connections_fail() {
    let mut server = RedisServer::spawn_tcp();
    assert_eq!(ping(&mut server.connection()).unwrap(), "PONG");
    server.kill();
    assert!(server.client().get_connection().is_err());
}

#[test]
#[should_panic(expected = "cannot connect to")]
fn connection_after_kill_panics() {
    let mut server = RedisServer::spawn();
    server.kill();
    let _ = server.connection();
}

#[test]
fn log_is_written() {
    let server = RedisServer::spawn();
    let log = server.log();
    assert!(!log.is_empty(), "server log is empty");
    assert!(log.contains("Redis version="), "unexpected log:\n{log}");
    assert!(
        log.contains(&format!("pid={}", server.pid())),
        "unexpected log:\n{log}"
    );
}

#[test]
fn two_servers_are_independent() {
    let unix_a = RedisServer::spawn();
    let unix_b = RedisServer::spawn();
    assert_ne!(unix_a.socket_path(), unix_b.socket_path());
    assert_ne!(unix_a.pid(), unix_b.pid());

    let tcp_a = RedisServer::spawn_tcp();
    let tcp_b = RedisServer::spawn_tcp();
    assert_ne!(tcp_a.tcp_port(), tcp_b.tcp_port());
    assert_ne!(tcp_a.pid(), tcp_b.pid());

    let mut a = unix_a.connection();
    let mut b = unix_b.connection();
    let () = a.set("testkit:isolation", "a").unwrap();
    let seen: Option<String> = b.get("testkit:isolation").unwrap();
    assert_eq!(seen, None, "servers share data");
    let seen: Option<String> = a.get("testkit:isolation").unwrap();
    assert_eq!(seen.as_deref(), Some("a"));
}

#[test]
fn drop_kills_the_process_and_removes_the_dir() {
    let server = RedisServer::spawn();
    let pid = server.pid();
    let dir = server.dir().to_path_buf();
    let proc_entry = Path::new("/proc").join(pid.to_string());
    if cfg!(target_os = "linux") {
        assert!(
            proc_entry.exists(),
            "{} missing while running",
            proc_entry.display()
        );
    }

    drop(server);

    if cfg!(target_os = "linux") {
        assert!(
            eventually(|| !proc_entry.exists()),
            "redis-server pid {pid} still exists after drop"
        );
    }
    assert!(
        eventually(|| !dir.exists()),
        "{} not removed",
        dir.display()
    );
}

#[test]
fn drop_after_kill_is_harmless() {
    let mut server = RedisServer::spawn_tcp();
    server.kill();
    drop(server);
}

#[test]
fn startup_failure_panics_with_status_and_log() {
    let result = panic::catch_unwind(|| {
        RedisServer::spawn_with(ServerOptions::default().args(["--no-such-option", "1"]))
    });
    let payload = result.expect_err("spawning with a bad option must panic");
    let message = panic_message(payload.as_ref());
    assert!(
        message.contains("exited before becoming ready"),
        "{message}"
    );
    assert!(message.contains("exit status"), "{message}");
    assert!(message.contains("--- server log ---"), "{message}");
}
