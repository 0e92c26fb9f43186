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

/// A synchronous connection with a short read timeout, so a silent peer shows as an error quickly.
fn short_timeout_connection(url: &str) -> redis::RedisResult<Connection> {
    let client = redis::Client::open(url)?;
    let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(con)
}

fn is_timeout(err: &redis::RedisError) -> bool {
    err.is_timeout()
        || matches!(err.kind(), redis::ErrorKind::Io)
            && err.to_string().to_lowercase().contains("timed out")
        || err.to_string().contains("Resource temporarily unavailable")
}

#[test]
fn pause_silences_the_server_and_resume_brings_it_back() {
    for mut server in [RedisServer::spawn(), RedisServer::spawn_tcp()] {
        let mut before = short_timeout_connection(&server.url()).unwrap();
        assert_eq!(ping(&mut before).unwrap(), "PONG");

        server.pause();
        assert!(server.is_paused());
        let err = ping(&mut before).expect_err("a stopped server answered");
        assert!(is_timeout(&err), "expected a timeout, got {err}");
        // The kernel still accepts new connections; nothing answers them.
        let client = redis::Client::open(server.url()).unwrap();
        let mut during = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .and_then(|con| {
                con.set_read_timeout(Some(Duration::from_millis(200)))?;
                Ok(con)
            });
        if let Ok(con) = during.as_mut() {
            assert!(
                ping(con).is_err(),
                "a stopped server answered a new connection"
            );
        }

        let answered = server.resume();
        assert!(!server.is_paused());
        assert!(answered <= Instant::now());
        let mut after = server.connection();
        assert_eq!(ping(&mut after).unwrap(), "PONG");
    }
}

#[test]
fn restart_comes_back_empty_on_the_same_address() {
    for mut server in [RedisServer::spawn(), RedisServer::spawn_tcp()] {
        let url = server.url();
        let old_pid = server.pid();
        let mut con = server.connection();
        let () = con.set("testkit:restart", "before").unwrap();

        let started = Instant::now();
        let answered = server.restart();
        assert!(answered >= started);

        assert_eq!(server.url(), url, "the address changed");
        assert_ne!(server.pid(), old_pid, "the same process still runs");
        assert!(
            ping(&mut con).is_err(),
            "the old connection survived a restart"
        );
        let mut fresh = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let seen: Option<String> = fresh.get("testkit:restart").unwrap();
        assert_eq!(seen, None, "a restarted server kept its data");
        let log = server.log();
        assert_eq!(
            log.matches("Redis is starting").count(),
            2,
            "both starts are in one log:\n{log}"
        );
    }
}

#[test]
fn restart_keeps_the_extra_args_and_works_after_kill_and_pause() {
    let mut server = RedisServer::spawn_with(
        ServerOptions::default()
            .tcp(true)
            .args(["--databases", "4"]),
    );
    server.kill();
    server.restart();
    assert_eq!(config_get(&mut server.connection(), "databases"), "4");
    server.pause();
    server.restart();
    assert!(!server.is_paused());
    assert_eq!(ping(&mut server.connection()).unwrap(), "PONG");
}

#[test]
#[should_panic(expected = "it is not running")]
fn pause_after_kill_panics() {
    let mut server = RedisServer::spawn();
    server.kill();
    server.pause();
}

#[test]
fn drop_kills_a_paused_server() {
    let mut server = RedisServer::spawn();
    let proc_entry = Path::new("/proc").join(server.pid().to_string());
    server.pause();
    drop(server);
    if cfg!(target_os = "linux") {
        assert!(
            eventually(|| !proc_entry.exists()),
            "a paused server survived drop"
        );
    }
}

#[test]
fn url_credentials_log_in_as_that_user_and_stay_out_of_debug() {
    for mut server in [RedisServer::spawn(), RedisServer::spawn_tcp()] {
        let password = "p@ss/w:rd?&=";
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("tester")
            .arg("on")
            .arg(format!(">{password}"))
            .arg("+acl|whoami")
            .arg("+ping")
            .query(&mut server.connection())
            .unwrap();
        server.set_url_credentials(Some(("tester", password)));
        assert!(!format!("{server:?}").contains(password), "{server:?}");
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let me: String = redis::cmd("ACL").arg("WHOAMI").query(&mut con).unwrap();
        assert_eq!(me, "tester", "{}", server.url());
        // The harness's own connection stays the unrestricted default user.
        let me: String = redis::cmd("ACL")
            .arg("WHOAMI")
            .query(&mut server.connection())
            .unwrap();
        assert_eq!(me, "default");
        server.set_url_credentials(None);
        assert!(!server.url().contains("tester"));
    }
}

mod proxy {
    use std::io::{ErrorKind, Read};
    use std::net::TcpStream;

    use super::*;
    use crate::{Blackhole, ProxyMode, TcpProxy};

    #[test]
    fn forwards_commands_both_ways() {
        let server = RedisServer::spawn_tcp();
        let proxy = TcpProxy::to_server(&server);
        assert_eq!(proxy.mode(), ProxyMode::Forward);
        assert_eq!(
            proxy.upstream().port(),
            server.tcp_port().unwrap(),
            "{proxy:?}"
        );
        assert!(proxy.addr().ip().is_loopback());
        let mut con = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut con).unwrap(), "PONG");
        let () = con.set("testkit:proxy", "x".repeat(100_000)).unwrap();
        let back: String = server.connection().get("testkit:proxy").unwrap();
        assert_eq!(back.len(), 100_000);
        let back: String = con.get("testkit:proxy").unwrap();
        assert_eq!(back.len(), 100_000);
    }

    #[test]
    fn blackhole_silences_open_and_new_connections_until_forward() {
        let server = RedisServer::spawn_tcp();
        let proxy = TcpProxy::to_server(&server);
        let mut open = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut open).unwrap(), "PONG");

        proxy.blackhole();
        assert_eq!(proxy.mode(), ProxyMode::Blackhole);
        let err = ping(&mut open).expect_err("a blackholed connection answered");
        assert!(is_timeout(&err), "expected a timeout, got {err}");
        // A new connection is accepted (connect succeeds) and then nothing answers.
        let mut raw = TcpStream::connect(proxy.addr()).expect("a blackhole accepts");
        raw.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        std::io::Write::write_all(&mut raw, b"PING\r\n").unwrap();
        let mut buf = [0_u8; 16];
        let err = raw
            .read(&mut buf)
            .expect_err("a blackholed connection answered");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );

        proxy.forward();
        // The held bytes are delivered now, as after a healed partition.
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = raw.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"+PONG\r\n");
        let mut fresh = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut fresh).unwrap(), "PONG");
    }

    #[test]
    fn refuse_closes_connections_and_the_port_then_forward_reopens_it() {
        let server = RedisServer::spawn_tcp();
        let proxy = TcpProxy::to_server(&server);
        let mut open = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut open).unwrap(), "PONG");
        proxy.blackhole();
        let mut held = TcpStream::connect(proxy.addr()).unwrap();

        proxy.refuse();
        assert_eq!(proxy.mode(), ProxyMode::Refuse);
        let err = ping(&mut open).expect_err("a refused connection answered");
        assert!(!is_timeout(&err), "expected a closed connection, got {err}");
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0_u8; 4];
        assert!(
            matches!(held.read(&mut buf), Ok(0) | Err(_)),
            "a held connection stayed open"
        );
        let err = TcpStream::connect(proxy.addr()).expect_err("a refusing proxy accepted");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

        proxy.forward();
        let mut fresh = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut fresh).unwrap(), "PONG");
        proxy.refuse();
        proxy.blackhole();
        assert!(
            TcpStream::connect(proxy.addr()).is_ok(),
            "blackhole after refuse binds again"
        );
    }

    #[test]
    fn a_dead_upstream_closes_the_client_connection() {
        let mut server = RedisServer::spawn_tcp();
        let proxy = TcpProxy::to_server(&server);
        server.kill();
        let mut raw = TcpStream::connect(proxy.addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0_u8; 4];
        assert!(matches!(raw.read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn drop_closes_the_port_and_every_connection() {
        let server = RedisServer::spawn_tcp();
        let proxy = TcpProxy::to_server(&server);
        let addr = proxy.addr();
        let mut open = short_timeout_connection(&proxy.url()).unwrap();
        assert_eq!(ping(&mut open).unwrap(), "PONG");
        proxy.blackhole();
        let mut held = TcpStream::connect(addr).unwrap();
        drop(proxy);
        assert!(ping(&mut open).is_err());
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0_u8; 4];
        assert!(matches!(held.read(&mut buf), Ok(0) | Err(_)));
        assert!(TcpStream::connect(addr).is_err(), "the port still listens");
    }

    #[test]
    #[should_panic(expected = "only to loopback")]
    fn refuses_a_non_loopback_upstream() {
        let _ = TcpProxy::start("192.0.2.1:6379".parse().unwrap());
    }

    #[test]
    fn blackhole_accepts_and_never_answers() {
        let hole = Blackhole::start();
        let addr = hole.addr();
        assert!(addr.ip().is_loopback());
        assert_eq!(hole.url(), format!("redis://{addr}"));
        let mut raw = TcpStream::connect(addr).expect("a blackhole accepts");
        std::io::Write::write_all(&mut raw, b"PING\r\n").unwrap();
        raw.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0_u8; 4];
        let err = raw.read(&mut buf).expect_err("a blackhole answered");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        assert!(eventually(|| hole.connections() == 1), "{hole:?}");
        let client = redis::Client::open(hole.url()).unwrap();
        let started = Instant::now();
        let result = client
            .get_connection_with_timeout(Duration::from_millis(300))
            .and_then(|mut con| {
                con.set_read_timeout(Some(Duration::from_millis(300)))?;
                ping(&mut con)
            });
        assert!(result.is_err(), "a blackhole answered PING");
        assert!(started.elapsed() < Duration::from_secs(5));

        drop(hole);
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(matches!(raw.read(&mut buf), Ok(0) | Err(_)));
        assert!(TcpStream::connect(addr).is_err(), "the port still listens");
    }
}
