//! A Sentinel-managed pair on loopback: one master, one replica and three sentinels, for failover tests.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use redis::Client;
use tempfile::TempDir;

use crate::binary::redis_server_binary;
use crate::server::{RedisServer, ServerOptions, free_tcp_port};

/// The master name the sentinels monitor.
pub const SENTINEL_MASTER_NAME: &str = "mymaster";
/// How long the set may take to be ready, and a failover to be announced.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between probes while waiting.
const POLL: Duration = Duration::from_millis(50);

/// One `redis-server --sentinel` process.
struct Sentinel {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// One master, one replica (`--replicaof`) and three sentinels (`redis-server <conf> --sentinel`, quorum 2,
/// `down-after-milliseconds 1000`), all on 127.0.0.1; everything is killed on drop.
///
/// ```no_run
/// let set = keyward_testkit::SentinelSet::spawn();
/// let url = set.url(); // redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster
/// let promoted_at = set.failover();
/// # let _ = (url, promoted_at);
/// ```
pub struct SentinelSet {
    servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
    dir: TempDir,
}

impl fmt::Debug for SentinelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelSet")
            .field("servers", &self.servers)
            .field(
                "sentinel_ports",
                &self.sentinels.iter().map(|s| s.port).collect::<Vec<_>>(),
            )
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl SentinelSet {
    /// Spawn the set and wait until it is ready: every sentinel knows the master, its replica and the two
    /// other sentinels, and the replica is in sync.
    ///
    /// # Panics
    /// When a process cannot be started or the set is not ready within 30 s (with the sentinels' logs).
    pub fn spawn() -> SentinelSet {
        let master = RedisServer::spawn_tcp();
        let master_port = master.tcp_port().expect("a TCP server has a port");
        let replica = RedisServer::spawn_with(ServerOptions::default().tcp(true).args([
            "--replicaof".to_owned(),
            Ipv4Addr::LOCALHOST.to_string(),
            master_port.to_string(),
        ]));
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let binary = redis_server_binary();
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_tcp_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            let log = dir.path().join(format!("sentinel-{i}.log"));
            fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile \"{log}\"\ndir \"{dir}\"\n\
                     sentinel monitor {SENTINEL_MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER_NAME} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER_NAME} 1\n",
                    log = log.display(),
                    dir = dir.path().display(),
                ),
            )
            .expect("cannot write a sentinel config");
            let child = Command::new(&binary)
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {} --sentinel: {e}", binary.display()));
            sentinels.push(Sentinel { child, port, log });
        }
        let set = SentinelSet {
            servers: vec![master, replica],
            sentinels,
            dir,
        };
        set.wait_ready();
        set
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("{}:{}", Ipv4Addr::LOCALHOST, s.port))
            .collect();
        format!(
            "redis+sentinel://{}/{SENTINEL_MASTER_NAME}",
            hosts.join(",")
        )
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The port of the master, as the first sentinel that answers names it.
    ///
    /// # Panics
    /// When no sentinel answers.
    pub fn master_port(&self) -> u16 {
        self.sentinels
            .iter()
            .find_map(|s| master_of(s.port))
            .unwrap_or_else(|| panic!("no sentinel names a master{}", self.logs()))
    }

    /// A client to the current master.
    pub fn master_client(&self) -> Client {
        Client::open(format!(
            "redis://{}:{}",
            Ipv4Addr::LOCALHOST,
            self.master_port()
        ))
        .expect("a valid URL")
    }

    /// Run `SENTINEL FAILOVER mymaster` (retried while the sentinel is not ready for it) and return when
    /// every sentinel names the new master; returns that instant.
    ///
    /// # Panics
    /// When the failover is not announced within 30 s.
    pub fn failover(&self) -> Instant {
        let old = self.master_port();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let asked = sentinel_connection(self.sentinels[0].port).and_then(|mut c| {
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(SENTINEL_MASTER_NAME)
                    .query::<String>(&mut c)
                    .map_err(|e| e.to_string())
            });
            let Err(last) = asked else { break };
            assert!(
                Instant::now() < deadline,
                "SENTINEL FAILOVER refused: {last}{}",
                self.logs()
            );
            thread::sleep(POLL);
        }
        self.wait_new_master(old)
    }

    /// Kill the current master (`SIGKILL`); the sentinels then fail over after `down-after-milliseconds`.
    /// Returns the master's old port and the instant it was killed.
    ///
    /// # Panics
    /// When no sentinel names a master.
    pub fn kill_master(&mut self) -> (u16, Instant) {
        let old = self.master_port();
        for server in &mut self.servers {
            if server.tcp_port() == Some(old) {
                server.kill();
            }
        }
        (old, Instant::now())
    }

    /// Return when every sentinel names a master other than the one on port `old`; returns that instant.
    ///
    /// # Panics
    /// When that does not happen within 30 s.
    pub fn wait_new_master(&self, old: u16) -> Instant {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let ports: Vec<Option<u16>> =
                self.sentinels.iter().map(|s| master_of(s.port)).collect();
            if ports.iter().all(|p| p.is_some_and(|p| p != old)) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "no new master announced within {SETTLE_TIMEOUT:?} (sentinels say {ports:?}){}",
                self.logs()
            );
            thread::sleep(POLL);
        }
    }

    /// Wait until every sentinel knows the master, one replica and the two other sentinels, and a replica
    /// is in sync with the master (after a failover: until the old master has been turned into its replica).
    ///
    /// # Panics
    /// When that does not happen within 30 s (with the sentinels' logs).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let Err(last) = self.ready() else { return };
            assert!(
                Instant::now() < deadline,
                "the sentinel set is not ready within {SETTLE_TIMEOUT:?}: {last}{}",
                self.logs()
            );
            thread::sleep(POLL);
        }
    }

    fn ready(&self) -> Result<(), String> {
        for s in &self.sentinels {
            let mut c = sentinel_connection(s.port)?;
            let fields: Vec<String> = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(SENTINEL_MASTER_NAME)
                .query(&mut c)
                .map_err(|e| e.to_string())?;
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default()
            };
            if field("num-other-sentinels") != "2" || field("num-slaves") != "1" {
                return Err(format!(
                    "sentinel {} sees {} other sentinels and {} replicas",
                    s.port,
                    field("num-other-sentinels"),
                    field("num-slaves")
                ));
            }
        }
        let master = self.master_port();
        for server in &self.servers {
            if server.tcp_port() == Some(master) {
                continue;
            }
            let mut replica = server
                .client()
                .get_connection()
                .map_err(|e| e.to_string())?;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica)
                .map_err(|e| e.to_string())?;
            if !info.contains("master_link_status:up")
                || !info.contains(&format!("master_port:{master}\r"))
            {
                return Err(format!(
                    "the replica on {:?} is not in sync",
                    server.tcp_port()
                ));
            }
        }
        for s in &self.sentinels {
            let mut c = sentinel_connection(s.port)?;
            let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(SENTINEL_MASTER_NAME)
                .query(&mut c)
                .map_err(|e| e.to_string())?;
            for fields in replicas {
                let flags = fields
                    .chunks(2)
                    .find(|kv| kv[0] == "flags")
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default();
                if flags != "slave" {
                    return Err(format!(
                        "sentinel {} sees a replica with flags {flags}",
                        s.port
                    ));
                }
            }
        }
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for s in &self.sentinels {
            out.push_str(&format!(
                "\n--- sentinel {} log ---\n{}",
                s.port,
                fs::read_to_string(&s.log).unwrap_or_default()
            ));
        }
        out
    }
}

fn sentinel_connection(port: u16) -> Result<redis::Connection, String> {
    let client = Client::open(format!("redis://{}:{port}", Ipv4Addr::LOCALHOST))
        .map_err(|e| e.to_string())?;
    client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(|e| e.to_string())
}

/// The master's port as the sentinel on `port` names it.
fn master_of(port: u16) -> Option<u16> {
    let mut c = sentinel_connection(port).ok()?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(SENTINEL_MASTER_NAME)
        .query(&mut c)
        .ok()?;
    addr.map(|(_, p)| p)
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}
