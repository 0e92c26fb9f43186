//! A Sentinel-managed pair on loopback: one master, one replica and three sentinels, for failover tests —
//! optionally over TLS ([`SentinelOptions::tls`]) and with password-protected sentinels
//! ([`SentinelOptions::sentinel_password`], [`SentinelOptions::sentinel_user`]).
//!
//! The one decision to know: the kit itself always talks to every process in **plain text on a port of its
//! own** (a sentinel's `port`, a data node's TCP port), as [`TlsServer`](crate::TlsServer) does over its Unix
//! socket, so readiness and failover probes need no certificate. Code under test only ever sees the
//! addresses in [`SentinelSet::url`]: with TLS, the sentinels' `tls-port`s, and the data nodes' TLS ports,
//! which is what the sentinels monitor and announce (`tls-replication yes` everywhere).

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tempfile::TempDir;

use crate::binary::redis_server_binary;
use crate::server::{RedisServer, ServerOptions, free_tcp_port};
use crate::tls::{TlsFiles, spawn_tls};

/// The master name the sentinels monitor.
pub const SENTINEL_MASTER_NAME: &str = "mymaster";
/// How long the set may take to be ready, and a failover to be announced.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between probes while waiting.
const POLL: Duration = Duration::from_millis(50);

/// Options for [`SentinelSet::spawn_with`]; the default is the plain set of [`SentinelSet::spawn`].
///
/// ```
/// use keyward_testkit::{SentinelOptions, TestCerts};
///
/// let certs = TestCerts::generate();
/// let opts = SentinelOptions::default()
///     .tls(certs.server_files(true))
///     .sentinel_password("s3ntinel");
/// assert!(opts.tls.is_some());
/// assert!(!format!("{opts:?}").contains("s3ntinel"));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SentinelOptions {
    /// Every process speaks TLS with these files (`tls-port`, `tls-replication yes`): the sentinels, the
    /// master and the replica. Clients must present a certificate when
    /// [`TlsFiles::require_client_cert`]. Default: plain text.
    pub tls: Option<TlsFiles>,
    /// The sentinels require this password (`requirepass`, and `sentinel sentinel-pass` between
    /// themselves). Default: none.
    pub sentinel_password: Option<String>,
    /// With [`SentinelOptions::sentinel_password`]: the sentinels' only enabled user is this ACL user
    /// (`user <name> on >password allchannels +@all`, `user default off`, `sentinel sentinel-user`) instead of
    /// `requirepass`. Default: none.
    pub sentinel_user: Option<String>,
}

impl fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelOptions")
            .field("tls", &self.tls)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .field("sentinel_user", &self.sentinel_user)
            .finish()
    }
}

impl SentinelOptions {
    /// Sets [`SentinelOptions::tls`] (from [`TestCerts::server_files`](crate::TestCerts::server_files)).
    #[must_use]
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Sets [`SentinelOptions::sentinel_password`] (the sentinels' `requirepass`).
    #[must_use]
    pub fn sentinel_password(mut self, password: impl Into<String>) -> Self {
        self.sentinel_password = Some(password.into());
        self.sentinel_user = None;
        self
    }

    /// Sets [`SentinelOptions::sentinel_user`] and [`SentinelOptions::sentinel_password`]: the sentinels
    /// accept only this ACL user.
    #[must_use]
    pub fn sentinel_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.sentinel_user = Some(user.into());
        self.sentinel_password = Some(password.into());
        self
    }

    /// The sentinels' configuration lines for their credentials.
    fn auth_conf(&self) -> String {
        match (&self.sentinel_user, &self.sentinel_password) {
            (Some(user), Some(password)) => format!(
                "user default off\nuser {user} on >{password} allchannels +@all\n\
                 sentinel sentinel-user {user}\nsentinel sentinel-pass {password}\n"
            ),
            (None, Some(password)) => {
                format!("requirepass {password}\nsentinel sentinel-pass {password}\n")
            }
            _ => String::new(),
        }
    }
}

/// One `redis-server --sentinel` process.
struct Sentinel {
    child: Child,
    /// The port clients use: its `tls-port` with TLS, else its plain port.
    port: u16,
    /// The plain-text port the kit probes.
    plain_port: u16,
    log: PathBuf,
}

/// A master or replica: the process and the port the sentinels know it by (its TLS port with TLS).
#[derive(Debug)]
struct DataNode {
    server: RedisServer,
    port: u16,
}

/// One master, one replica (`--replicaof`) and three sentinels (`redis-server <conf> --sentinel`, quorum 2,
/// `down-after-milliseconds 1000`), all on 127.0.0.1; everything is killed on drop. With
/// [`SentinelOptions`], over TLS and/or with password-protected sentinels.
///
/// ```no_run
/// let set = keyward_testkit::SentinelSet::spawn();
/// let url = set.url(); // redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster
/// let promoted_at = set.failover();
/// # let _ = (url, promoted_at);
/// ```
pub struct SentinelSet {
    servers: Vec<DataNode>,
    sentinels: Vec<Sentinel>,
    opts: SentinelOptions,
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
            .field("opts", &self.opts)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl SentinelSet {
    /// Spawn the plain set (no TLS, no passwords) and wait until it is ready: every sentinel knows the
    /// master, its replica and the two other sentinels, and the replica is in sync.
    ///
    /// # Panics
    /// When a process cannot be started or the set is not ready within 30 s (with the sentinels' logs).
    pub fn spawn() -> SentinelSet {
        SentinelSet::spawn_with(SentinelOptions::default())
    }

    /// Spawn the set with `opts` and wait until it is ready, as [`SentinelSet::spawn`].
    ///
    /// # Panics
    /// As [`SentinelSet::spawn`].
    pub fn spawn_with(opts: SentinelOptions) -> SentinelSet {
        let base = ServerOptions::default().tcp(true);
        let replica_of = |port: u16| {
            vec![
                "--replicaof".to_owned(),
                Ipv4Addr::LOCALHOST.to_string(),
                port.to_string(),
            ]
        };
        let (master, replica) = match &opts.tls {
            Some(files) => {
                let (master, master_port) = spawn_tls(files, &base, |_| Vec::new());
                let (replica, replica_port) = spawn_tls(files, &base, |_| replica_of(master_port));
                (
                    DataNode {
                        server: master,
                        port: master_port,
                    },
                    DataNode {
                        server: replica,
                        port: replica_port,
                    },
                )
            }
            None => {
                let master = RedisServer::spawn_with(base.clone());
                let master_port = master.tcp_port().expect("a TCP server has a port");
                let replica = RedisServer::spawn_with(base.args(replica_of(master_port)));
                let replica_port = replica.tcp_port().expect("a TCP server has a port");
                (
                    DataNode {
                        server: master,
                        port: master_port,
                    },
                    DataNode {
                        server: replica,
                        port: replica_port,
                    },
                )
            }
        };
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let binary = redis_server_binary();
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let plain_port = free_tcp_port();
            let (port, tls_conf) = match &opts.tls {
                Some(files) => {
                    let port = free_tcp_port();
                    let mut conf = format!("tls-port {port}\n");
                    for (directive, value) in files.directives() {
                        conf.push_str(&format!("{directive} \"{value}\"\n"));
                    }
                    (port, conf)
                }
                None => (plain_port, String::new()),
            };
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            let log = dir.path().join(format!("sentinel-{i}.log"));
            fs::write(
                &conf,
                format!(
                    "port {plain_port}\nbind 127.0.0.1\ndaemonize no\nlogfile \"{log}\"\ndir \"{dir}\"\n\
                     {tls_conf}{auth_conf}\
                     sentinel monitor {SENTINEL_MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER_NAME} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER_NAME} 1\n",
                    log = log.display(),
                    dir = dir.path().display(),
                    auth_conf = opts.auth_conf(),
                    master_port = master.port,
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
            sentinels.push(Sentinel {
                child,
                port,
                plain_port,
                log,
            });
        }
        let set = SentinelSet {
            servers: vec![master, replica],
            sentinels,
            opts,
            dir,
        };
        set.wait_ready();
        set
    }

    /// The URL code under test connects with: `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`
    /// (`rediss+sentinel://` and the sentinels' TLS ports with [`SentinelOptions::tls`]), plus
    /// `?sentinel_username=…&sentinel_password=…` when the sentinels require them (the kit's passwords are
    /// plain words, so they need no percent-encoding).
    pub fn url(&self) -> String {
        let mut url = self.url_without_credentials();
        match (&self.opts.sentinel_user, &self.opts.sentinel_password) {
            (Some(user), Some(password)) => {
                url.push_str(&format!(
                    "?sentinel_username={user}&sentinel_password={password}"
                ));
            }
            (None, Some(password)) => url.push_str(&format!("?sentinel_password={password}")),
            _ => {}
        }
        url
    }

    /// [`SentinelSet::url`] without the sentinels' credentials.
    pub fn url_without_credentials(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("{}:{}", Ipv4Addr::LOCALHOST, s.port))
            .collect();
        let scheme = if self.opts.tls.is_some() {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        format!("{scheme}://{}/{SENTINEL_MASTER_NAME}", hosts.join(","))
    }

    /// The URL as [`url_without_credentials`](Self::url_without_credentials), logging in to the sentinels as
    /// a user created here without channel permissions (`resetchannels`): a handle on it cannot subscribe
    /// to `+switch-master`, so it follows a failover only by asking.
    ///
    /// # Panics
    /// When a sentinel refuses the `ACL SETUSER`.
    pub fn url_as_poller(&self) -> String {
        for port in self.sentinel_ports() {
            let mut sentinel = Client::open(format!("redis://{}:{port}", Ipv4Addr::LOCALHOST))
                .and_then(|c| c.get_connection())
                .expect("connect to a sentinel");
            let () = redis::cmd("ACL")
                .arg(&[
                    "SETUSER",
                    "poller",
                    "on",
                    ">pollerPW",
                    "resetchannels",
                    "+@all",
                ])
                .query(&mut sentinel)
                .expect("ACL SETUSER poller on a sentinel");
        }
        format!(
            "{}?sentinel_username=poller&sentinel_password=pollerPW",
            self.url_without_credentials()
        )
    }

    /// The sentinels' ports as clients see them (their TLS ports with [`SentinelOptions::tls`]).
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The port of the master, as the first sentinel that answers names it (its TLS port with
    /// [`SentinelOptions::tls`]).
    ///
    /// # Panics
    /// When no sentinel answers.
    pub fn master_port(&self) -> u16 {
        self.sentinels
            .iter()
            .find_map(|s| self.master_of(s))
            .unwrap_or_else(|| panic!("no sentinel names a master{}", self.logs()))
    }

    /// A plain-text client to the current master (the kit's own port, also with TLS).
    ///
    /// # Panics
    /// When no sentinel names a master, or it names an unknown one.
    pub fn master_client(&self) -> Client {
        let port = self.master_port();
        self.servers
            .iter()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("the sentinels name an unknown master on port {port}"))
            .server
            .client()
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
            let asked = self
                .sentinel_connection(&self.sentinels[0])
                .and_then(|mut c| {
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
        for node in &mut self.servers {
            if node.port == old {
                node.server.kill();
            }
        }
        (old, Instant::now())
    }

    /// Restart the current master in place (`SIGKILL`, then a new, empty server on the same port, see
    /// [`crate::RedisServer::restart`]): no failover, as long as it answers again within `down-after-milliseconds`.
    /// Returns the instant it answered `PING`.
    ///
    /// # Panics
    /// When no sentinel names a master, or the server does not come back (see [`crate::RedisServer::restart`]).
    pub fn restart_master(&mut self) -> Instant {
        let port = self.master_port();
        let node = self
            .servers
            .iter_mut()
            .find(|node| node.port == port)
            .expect("the master is one of the set's servers");
        node.server.restart()
    }

    /// Return when every sentinel names a master other than the one on port `old`; returns that instant.
    ///
    /// # Panics
    /// When that does not happen within 30 s.
    pub fn wait_new_master(&self, old: u16) -> Instant {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let ports: Vec<Option<u16>> =
                self.sentinels.iter().map(|s| self.master_of(s)).collect();
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
            let mut c = self.sentinel_connection(s)?;
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
        for node in &self.servers {
            if node.port == master {
                continue;
            }
            let mut replica = node
                .server
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
                return Err(format!("the replica on {} is not in sync", node.port));
            }
        }
        for s in &self.sentinels {
            let mut c = self.sentinel_connection(s)?;
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

    /// A plain-text connection to sentinel `s` (on the kit's port), authenticated when the sentinels
    /// require it.
    fn sentinel_connection(&self, s: &Sentinel) -> Result<redis::Connection, String> {
        let mut redis = RedisConnectionInfo::default();
        if let Some(user) = &self.opts.sentinel_user {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.opts.sentinel_password {
            redis = redis.set_password(password);
        }
        let info = ConnectionAddr::Tcp(Ipv4Addr::LOCALHOST.to_string(), s.plain_port)
            .into_connection_info()
            .map_err(|e| e.to_string())?
            .set_redis_settings(redis);
        Client::open(info)
            .map_err(|e| e.to_string())?
            .get_connection_with_timeout(Duration::from_millis(500))
            .map_err(|e| e.to_string())
    }

    /// The master's port as sentinel `s` names it.
    fn master_of(&self, s: &Sentinel) -> Option<u16> {
        let mut c = self.sentinel_connection(s).ok()?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SENTINEL_MASTER_NAME)
            .query(&mut c)
            .ok()?;
        addr.map(|(_, p)| p)
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
        for node in &self.servers {
            out.push_str(&format!(
                "\n--- data node {} log ---\n{}",
                node.port,
                node.server.log()
            ));
        }
        out
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}
