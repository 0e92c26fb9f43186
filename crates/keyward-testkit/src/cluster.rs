//! Throwaway Redis Clusters: [`RedisCluster`] starts 3 masters (and optionally replicas) on loopback, forms
//! them with `redis-cli --cluster create`, and offers the faults a failover test needs.
//!
//! The one decision to know: **readiness and topology are read from the servers, never assumed.** The cluster
//! is ready only when every node answers `CLUSTER INFO` with `cluster_state:ok`, all 16384 slots are served,
//! every node knows every other node, and every replica's link to its master is up; [`RedisCluster::nodes`]
//! and [`RedisCluster::master_for_key`] parse `CLUSTER NODES` and `CLUSTER KEYSLOT` from a live node, so they
//! follow failovers. Each node is an ordinary [`RedisServer`] (its own temporary directory, persistence off,
//! killed on drop) with `--cluster-enabled yes` and an explicit `--cluster-port`, because the default bus port
//! (`port + 10000`) can fall outside the valid range for the high ports the kernel hands out.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::redis_cli_binary;
use crate::server::{RedisServer, ServerOptions, free_tcp_port};
use crate::tls::{TlsFiles, spawn_tls};

/// Number of masters in every test cluster (the minimum `redis-cli --cluster create` accepts).
pub const MASTERS: usize = 3;
/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;
/// How long `redis-cli --cluster create` may run.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the formed cluster may take until every node reports it ok.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between topology probes.
const POLL: Duration = Duration::from_millis(20);
/// Connect and read timeout of one probe of one node.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// How many times one node is spawned before giving up (the bus port is picked before the node binds it).
const NODE_ATTEMPTS: usize = 3;

/// Options for [`RedisCluster::spawn_with`].
///
/// The struct is `#[non_exhaustive]`; build it from [`ClusterOptions::default`] and the builder methods:
///
/// ```
/// use std::time::Duration;
/// use keyward_testkit::ClusterOptions;
///
/// let opts = ClusterOptions::default().replicas(1).node_timeout(Duration::from_millis(2000));
/// assert_eq!(opts.replicas, 1);
/// assert_eq!(opts.node_timeout, Duration::from_millis(2000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// Replicas per master (`--cluster-replicas`); the cluster has `3 * (1 + replicas)` nodes. Default 0.
    pub replicas: usize,
    /// `--cluster-node-timeout`: how long a node may be unreachable before it counts as failing, which bounds
    /// how fast a failover starts. Default 1 s (Redis' own default is 15 s), in whole milliseconds.
    pub node_timeout: Duration,
    /// Extra `redis-server` arguments for every node, appended after the cluster arguments.
    pub extra_args: Vec<String>,
    /// Every node dies with the thread that spawned it ([`ServerOptions::die_with_parent`]).
    pub die_with_parent: bool,
    /// Every node speaks only TLS with these files, clients, peers and replicas alike: `--tls-port P --port 0
    /// --tls-cluster yes --tls-replication yes` (plus a Unix socket that only the kit uses, in plain text, for
    /// readiness and topology). The cluster is then formed with `redis-cli --tls`, and
    /// [`RedisCluster::seed_url`] is `rediss+cluster://…`. Default: plain text.
    pub tls: Option<TlsFiles>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 0,
            node_timeout: Duration::from_millis(1000),
            extra_args: Vec::new(),
            die_with_parent: false,
            tls: None,
        }
    }
}

impl ClusterOptions {
    /// Sets [`ClusterOptions::replicas`].
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sets [`ClusterOptions::node_timeout`].
    #[must_use]
    pub fn node_timeout(mut self, node_timeout: Duration) -> Self {
        self.node_timeout = node_timeout;
        self
    }

    /// `cluster-require-full-coverage`: with `false`, the live primaries go on serving their slots while
    /// another primary is down (Redis' default, `true`, makes every node refuse every command meanwhile).
    #[must_use]
    pub fn require_full_coverage(self, full: bool) -> Self {
        self.arg("--cluster-require-full-coverage")
            .arg(if full { "yes" } else { "no" })
    }

    /// Appends one argument to [`ClusterOptions::extra_args`].
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Sets [`ClusterOptions::tls`] (from [`TestCerts::server_files`](crate::TestCerts::server_files)).
    #[must_use]
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }
}

/// The role of a cluster node, as `CLUSTER NODES` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeRole {
    /// A master (primary): may own slots.
    Master,
    /// A replica of a master.
    Replica,
}

/// One node as seen in `CLUSTER NODES` by a live node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterNode {
    /// The node id (40 hex characters).
    pub id: String,
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// Master or replica.
    pub role: NodeRole,
    /// For a replica, the id of its master.
    pub master_id: Option<String>,
    /// Whether the reporting node flags it `fail` (agreed failed) or `fail?` (suspected).
    pub failed: bool,
    /// The slot ranges it serves (masters only; migrating/importing markers are left out).
    pub slots: Vec<RangeInclusive<u16>>,
}

impl ClusterNode {
    /// `redis://127.0.0.1:PORT`, a plain connection to this one node (of a cluster without
    /// [`ClusterOptions::tls`]; for a TLS cluster see [`RedisCluster::urls`] and [`RedisCluster::server`]).
    pub fn url(&self) -> String {
        node_url(self.port)
    }

    /// Whether this node serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|range| range.contains(&slot))
    }
}

/// A throwaway Redis Cluster on 127.0.0.1: 3 masters and `replicas` replicas per master.
///
/// ```no_run
/// use std::time::Duration;
/// use keyward_testkit::{ClusterOptions, RedisCluster};
///
/// let mut cluster = RedisCluster::spawn_with(ClusterOptions::default().replicas(1));
/// let url = cluster.seed_url(); // redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…
/// let killed = cluster.kill_master_of("{user:1}:session");
/// let recovered_at = cluster.wait_for_failover(Duration::from_secs(30));
/// assert_ne!(cluster.master_for_key("{user:1}:session").port, killed.port);
/// # let _ = (url, recovered_at);
/// ```
///
/// Dropping the handle kills every node (`SIGKILL`), waits for each and removes their directories.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes in spawn order (the first three are the masters at creation).
    servers: Vec<Node>,
    /// Ports of the nodes killed with [`RedisCluster::kill_node`] or [`RedisCluster::kill_master_of`].
    killed: HashSet<u16>,
    /// Holds the output of `redis-cli --cluster create`.
    dir: TempDir,
    /// Replicas per master.
    replicas: usize,
    /// How long [`RedisCluster::spawn_with`] took.
    spawn_time: Duration,
    /// The TLS files, when the nodes speak TLS.
    tls: Option<TlsFiles>,
}

/// One node: its process and the port clients and peers use (its TLS port with [`ClusterOptions::tls`]).
#[derive(Debug)]
struct Node {
    port: u16,
    server: RedisServer,
}

impl RedisCluster {
    /// One cluster per process, shared by every test that asks for it: 3 masters, started on first use.
    ///
    /// A `static` is never dropped, so the nodes are started by a thread that lives as long as the process and
    /// under `setpriv --pdeathsig KILL`: they die with the test process, however it ends. Their temporary
    /// directories cannot be removed by that process; the next shared cluster removes those of dead processes. Tests sharing it
    /// must keep to their own keys (e.g. one policy `app` each) and must not kill or pause its nodes (spawn
    /// a cluster of their own for that).
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::spawn_with`], and if `setpriv` is missing.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            // What earlier test processes' shared clusters left behind.
            crate::server::sweep_orphans();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("keyward-shared-cluster".into())
                .spawn(move || {
                    let spawned = panic::catch_unwind(|| {
                        RedisCluster::spawn_with(ClusterOptions {
                            die_with_parent: true,
                            ..ClusterOptions::default()
                        })
                    });
                    let failed = spawned.is_err();
                    let _ = tx.send(spawned);
                    if failed {
                        return;
                    }
                    // The nodes' death signal is tied to this thread: it must outlive every test.
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawn the shared cluster's keeper thread");
            match rx.recv() {
                Ok(Ok(cluster)) => cluster,
                Ok(Err(payload)) => panic::resume_unwind(payload),
                Err(_) => panic!("the shared cluster's keeper thread died"),
            }
        })
    }

    /// Spawns 3 masters without replicas and waits until the cluster is ok.
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::spawn_with`].
    pub fn spawn() -> RedisCluster {
        RedisCluster::spawn_with(ClusterOptions::default())
    }

    /// Spawns `3 * (1 + replicas)` nodes on free ports of 127.0.0.1, each with `--cluster-enabled yes
    /// --cluster-config-file nodes.conf` (in its own temporary directory) `--cluster-node-timeout <ms>
    /// --cluster-port <free port> --repl-diskless-sync-delay 0 --save '' --appendonly no`, forms them with `redis-cli --cluster create
    /// 127.0.0.1:P1 … --cluster-replicas N --cluster-yes`, and waits (up to 30 s) until every node answers
    /// `CLUSTER INFO` with `cluster_state:ok` and 16384 slots ok, knows every other node, and every replica's
    /// replication link is up.
    ///
    /// # Panics
    ///
    /// Panics if `redis-server` or `redis-cli` cannot be found (the message says how to install them), if a
    /// node does not start, if `redis-cli` fails or runs longer than 30 s, or if the cluster is not ready in
    /// time; the message carries the reason, the `redis-cli` output and every node's log.
    pub fn spawn_with(opts: ClusterOptions) -> RedisCluster {
        let started = Instant::now();
        let cli = redis_cli_binary();
        let dir = tempfile::Builder::new()
            .prefix("keyward-cluster-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("cannot create a temporary directory for the cluster: {err}")
            });
        if opts.die_with_parent {
            crate::server::mark_owned(dir.path());
        }
        let count = MASTERS * (1 + opts.replicas);
        let servers = (0..count).map(|_| spawn_node(&opts)).collect();
        let mut cluster = RedisCluster {
            servers,
            killed: HashSet::new(),
            dir,
            replicas: opts.replicas,
            spawn_time: Duration::ZERO,
            tls: opts.tls.clone(),
        };
        cluster.create(&cli);
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            match cluster.check(true) {
                Ok(()) => break,
                Err(reason) if Instant::now() >= deadline => panic!(
                    "the Redis Cluster was not ready within {FORM_TIMEOUT:?}: {reason}\n{}",
                    cluster.logs()
                ),
                Err(_) => thread::sleep(POLL),
            }
        }
        cluster.spawn_time = started.elapsed();
        cluster
    }

    /// Runs `redis-cli --cluster create` with a deadline.
    fn create(&self, cli: &Path) {
        let out_path = self.cli_log_path();
        let out = fs::File::create(&out_path)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", out_path.display()));
        let err_out = out
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot duplicate {}: {err}", out_path.display()));
        let mut cmd = Command::new(cli);
        cmd.arg("--cluster").arg("create");
        for port in self.ports() {
            cmd.arg(format!("{}:{port}", Ipv4Addr::LOCALHOST));
        }
        if let Some(files) = &self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(files.ca_file())
                .arg("--cert")
                .arg(files.client_cert_file())
                .arg("--key")
                .arg(files.client_key_file());
        }
        cmd.arg("--cluster-replicas")
            .arg(self.replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err_out);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot execute {}: {err}", cli.display()));
        let deadline = Instant::now() + CREATE_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => panic!(
                    "`redis-cli --cluster create` failed ({status})\n{}",
                    self.logs()
                ),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "`redis-cli --cluster create` did not finish within {CREATE_TIMEOUT:?}\n{}",
                        self.logs()
                    );
                }
                Ok(None) => thread::sleep(POLL),
                Err(err) => panic!("cannot query redis-cli (pid {}): {err}", child.id()),
            }
        }
    }

    /// Where the output of `redis-cli --cluster create` goes.
    fn cli_log_path(&self) -> PathBuf {
        self.dir.path().join("redis-cli.log")
    }

    /// How long [`RedisCluster::spawn_with`] took, from finding the binaries to the cluster being ok.
    pub fn spawn_time(&self) -> Duration {
        self.spawn_time
    }

    /// The client ports of all nodes, in spawn order (killed nodes included).
    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|node| node.port).collect()
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` with [`ClusterOptions::tls`]) for every node, in spawn order
    /// (killed nodes included): seed nodes for a cluster client such as `redis::cluster::ClusterClient`.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports()
            .into_iter()
            .map(|port| format!("{scheme}://{}:{port}", Ipv4Addr::LOCALHOST))
            .collect()
    }

    /// One URL naming every node as a seed: `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`
    /// (`rediss+cluster://` with [`ClusterOptions::tls`]; killed nodes included; a cluster client skips
    /// seeds that do not answer).
    pub fn seed_url(&self) -> String {
        let seeds: Vec<String> = self
            .ports()
            .into_iter()
            .map(|port| format!("{}:{port}", Ipv4Addr::LOCALHOST))
            .collect();
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", seeds.join(","))
    }

    /// The node process listening on `port`, for its log, pid or a plain connection to that node alone
    /// (over its Unix socket with [`ClusterOptions::tls`]).
    pub fn server(&self, port: u16) -> Option<&RedisServer> {
        self.servers
            .iter()
            .find(|node| node.port == port)
            .map(|node| &node.server)
    }

    /// The topology as `CLUSTER NODES` on the first live (not killed, not paused) node reports it, sorted
    /// by port. After a kill, nodes disagree until the failure is agreed; use
    /// [`RedisCluster::wait_for_failover`] first to get the settled view.
    ///
    /// # Panics
    ///
    /// Panics if no node answers.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        let mut last_error = String::from("every node is killed or paused");
        for node in self.live() {
            match query::<String>(node, redis::cmd("CLUSTER").arg("NODES")) {
                Ok(text) => match parse_cluster_nodes(&text) {
                    Ok(mut nodes) => {
                        nodes.sort_by_key(|node| node.port);
                        return nodes;
                    }
                    Err(err) => last_error = err,
                },
                Err(err) => last_error = err,
            }
        }
        panic!(
            "no cluster node answered CLUSTER NODES: {last_error}\n{}",
            self.logs()
        )
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a live node).
    ///
    /// # Panics
    ///
    /// Panics if no node answers.
    pub fn slot_of(&self, key: &str) -> u16 {
        let mut last_error = String::from("every node is killed or paused");
        for node in self.live() {
            match query::<u16>(node, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)) {
                Ok(slot) => return slot,
                Err(err) => last_error = err,
            }
        }
        panic!(
            "no cluster node answered CLUSTER KEYSLOT: {last_error}\n{}",
            self.logs()
        )
    }

    /// The master that serves `key`'s slot, per [`RedisCluster::slot_of`] and [`RedisCluster::nodes`].
    ///
    /// # Panics
    ///
    /// Panics if no node answers or no master (not flagged failed) serves the slot, e.g. right after its
    /// master was killed and before [`RedisCluster::wait_for_failover`].
    pub fn master_for_key(&self, key: &str) -> ClusterNode {
        let slot = self.slot_of(key);
        let nodes = self.nodes();
        nodes
            .iter()
            .find(|node| node.role == NodeRole::Master && !node.failed && node.serves(slot))
            .cloned()
            .unwrap_or_else(|| {
                panic!("no live master serves slot {slot} (of key {key:?}); topology: {nodes:#?}")
            })
    }

    /// Kills (`SIGKILL`, then waits for it) the master serving `key`'s slot and returns it as it was.
    /// With replicas, one of its replicas takes over after the node timeout: see
    /// [`RedisCluster::wait_for_failover`].
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::master_for_key`].
    pub fn kill_master_of(&mut self, key: &str) -> ClusterNode {
        let master = self.master_for_key(key);
        self.kill_node(master.port);
        master
    }

    /// Kills the node on `port` (`SIGKILL`) and waits for it to exit. Killing it again is a no-op.
    ///
    /// # Panics
    ///
    /// Panics if no node listens on `port`.
    pub fn kill_node(&mut self, port: u16) {
        self.server_mut(port).kill();
        self.killed.insert(port);
    }

    /// Freezes the node on `port` (`SIGSTOP`): its clients and its peers get no answer until
    /// [`RedisCluster::resume`]. Paused longer than the node timeout, its peers flag it failed (and, with
    /// replicas, fail it over).
    ///
    /// # Panics
    ///
    /// Panics if no node listens on `port`, or it was killed.
    pub fn pause(&mut self, port: u16) {
        self.server_mut(port).pause();
    }

    /// Lets a paused node run again (`SIGCONT`) and returns once it answers `PING`. It may take a moment
    /// more until the cluster is ok again: see [`RedisCluster::wait_until_ok`].
    ///
    /// # Panics
    ///
    /// As [`RedisServer::resume`].
    pub fn resume(&mut self, port: u16) -> Instant {
        self.server_mut(port).resume()
    }

    /// Waits until a replica has taken over every slot of a killed master and the cluster is ok again, and
    /// returns when it saw that; the same as [`RedisCluster::wait_until_ok`], named for what a failover test
    /// waits for. Measure the failover window from the kill to the returned instant.
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::wait_until_ok`] (for instance when the killed master had no replica).
    pub fn wait_for_failover(&self, timeout: Duration) -> Instant {
        self.wait_until_ok(timeout)
    }

    /// Waits up to `timeout` until every live (not killed, not paused) node answers `CLUSTER INFO` with
    /// `cluster_state:ok` and 16384 slots ok, and in its `CLUSTER NODES` every slot is served by a master that
    /// was not killed; returns when it saw that.
    ///
    /// # Panics
    ///
    /// Panics when `timeout` passes first, with the reason and every node's log.
    pub fn wait_until_ok(&self, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            match self.check(false) {
                Ok(()) => return Instant::now(),
                Err(reason) if Instant::now() >= deadline => panic!(
                    "the Redis Cluster was not ok within {timeout:?}: {reason}\n{}",
                    self.logs()
                ),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// The output of `redis-cli --cluster create` and every node's log, for panic messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let cli = fs::read(self.cli_log_path()).unwrap_or_default();
        let _ = writeln!(
            out,
            "--- redis-cli --cluster create ---\n{}",
            String::from_utf8_lossy(&cli)
        );
        for node in &self.servers {
            let _ = writeln!(
                out,
                "--- node 127.0.0.1:{} (pid {}) ---\n{}",
                node.port,
                node.server.pid(),
                node.server.log()
            );
        }
        out.push_str("--- end of logs ---");
        out
    }

    /// The nodes neither killed nor paused.
    fn live(&self) -> impl Iterator<Item = &Node> {
        self.servers
            .iter()
            .filter(|node| !self.killed.contains(&node.port) && !node.server.is_paused())
    }

    /// The node on `port`.
    fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        let ports = self.ports();
        self.servers
            .iter_mut()
            .find(|node| node.port == port)
            .map(|node| &mut node.server)
            .unwrap_or_else(|| panic!("no cluster node listens on port {port} (nodes: {ports:?})"))
    }

    /// Whether the cluster is ok on every live node; `formed` adds the checks of a freshly created cluster
    /// (every node known, the expected number of masters and replicas, every replica's link up).
    fn check(&self, formed: bool) -> Result<(), String> {
        let total = self.servers.len();
        let mut any = false;
        for server in self.live() {
            any = true;
            let port = server.port;
            let info: String = query(server, redis::cmd("CLUSTER").arg("INFO"))?;
            let field = |name: &str| info_field(&info, name).unwrap_or_default();
            if field("cluster_state") != "ok" {
                return Err(format!(
                    "node {port}: cluster_state:{}",
                    field("cluster_state")
                ));
            }
            if field("cluster_slots_ok") != SLOTS.to_string() {
                return Err(format!(
                    "node {port}: cluster_slots_ok:{}",
                    field("cluster_slots_ok")
                ));
            }
            if formed && field("cluster_known_nodes") != total.to_string() {
                return Err(format!(
                    "node {port}: cluster_known_nodes:{} of {total}",
                    field("cluster_known_nodes")
                ));
            }
            let text: String = query(server, redis::cmd("CLUSTER").arg("NODES"))?;
            let nodes = parse_cluster_nodes(&text).map_err(|err| format!("node {port}: {err}"))?;
            let mut served = 0u32;
            for node in nodes.iter().filter(|node| node.role == NodeRole::Master) {
                if !node.slots.is_empty() && self.killed.contains(&node.port) {
                    return Err(format!(
                        "node {port} still sees killed node {} serving slots",
                        node.port
                    ));
                }
                served += node
                    .slots
                    .iter()
                    .map(|range| u32::from(*range.end()) - u32::from(*range.start()) + 1)
                    .sum::<u32>();
            }
            if served != SLOTS {
                return Err(format!("node {port} sees {served} of {SLOTS} slots served"));
            }
            if formed {
                let masters = nodes
                    .iter()
                    .filter(|node| node.role == NodeRole::Master)
                    .count();
                if masters != MASTERS || nodes.len() != total {
                    return Err(format!(
                        "node {port} sees {masters} masters among {} nodes",
                        nodes.len()
                    ));
                }
                let me = nodes
                    .iter()
                    .find(|node| node.port == port)
                    .ok_or_else(|| format!("node {port} does not list itself"))?;
                if me.role == NodeRole::Replica {
                    let replication: String = query(server, redis::cmd("INFO").arg("replication"))?;
                    if info_field(&replication, "master_link_status") != Some("up") {
                        return Err(format!("replica {port}: replication link not up yet"));
                    }
                }
            }
        }
        if any {
            Ok(())
        } else {
            Err("every node is killed or paused".to_owned())
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Dropping each RedisServer kills and reaps it; do it explicitly so every node is gone before the
        // directories are removed, whatever the field order.
        for node in &mut self.servers {
            node.server.kill();
        }
    }
}

/// Spawns one cluster node, retrying with a new bus port if the picked one was taken meanwhile.
fn spawn_node(opts: &ClusterOptions) -> Node {
    let mut failures = Vec::new();
    for _ in 0..NODE_ATTEMPTS {
        let bus_port = free_tcp_port();
        let cluster_args = [
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            "nodes.conf".to_owned(),
            "--cluster-node-timeout".to_owned(),
            opts.node_timeout.as_millis().to_string(),
            "--cluster-port".to_owned(),
            bus_port.to_string(),
            // Replicas sync at once instead of after the default 5 s diskless-sync delay.
            "--repl-diskless-sync-delay".to_owned(),
            "0".to_owned(),
        ];
        let attempt = || match &opts.tls {
            // Port 0 and the Unix socket (the kit's plain-text side door); clients and peers use TLS only.
            Some(files) => {
                let base = ServerOptions::default()
                    .args(cluster_args.clone())
                    .args(["--tls-cluster", "yes"])
                    .die_with_parent(opts.die_with_parent);
                let (server, port) = spawn_tls(files, &base, |_| opts.extra_args.clone());
                Node { port, server }
            }
            None => {
                let server = RedisServer::spawn_with(
                    ServerOptions::default()
                        .tcp(true)
                        .args(cluster_args.clone())
                        .args(opts.extra_args.iter().cloned())
                        .die_with_parent(opts.die_with_parent),
                );
                let port = server
                    .tcp_port()
                    .expect("cluster nodes without TLS are spawned with ServerOptions::tcp");
                Node { port, server }
            }
        };
        match panic::catch_unwind(AssertUnwindSafe(attempt)) {
            Ok(node) => return node,
            Err(payload) => failures.push(
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default(),
            ),
        }
    }
    panic!(
        "a Redis Cluster node did not start in {NODE_ATTEMPTS} attempts:\n{}",
        failures.join("\n")
    )
}

/// `redis://127.0.0.1:PORT`.
fn node_url(port: u16) -> String {
    format!("redis://{}:{port}", Ipv4Addr::LOCALHOST)
}

/// Runs one command on one node with short timeouts, over the kit's plain connection (TCP, or the Unix
/// socket of a TLS node).
fn query<T: redis::FromRedisValue>(node: &Node, cmd: &mut redis::Cmd) -> Result<T, String> {
    let port = node.port;
    let mut con = node
        .server
        .client()
        .get_connection_with_timeout(PROBE_TIMEOUT)
        .map_err(|err| format!("node {port}: {err}"))?;
    con.set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|err| format!("node {port}: {err}"))?;
    cmd.query(&mut con)
        .map_err(|err| format!("node {port}: {err}"))
}

/// The value of `name:` in `INFO`-style text.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Parses the text of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_cluster_nodes(text: &str) -> Result<Vec<ClusterNode>, String> {
    let mut nodes = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!(
                "CLUSTER NODES line has {} fields: {line:?}",
                fields.len()
            ));
        }
        let address = fields[1].split(['@', ',']).next().unwrap_or_default();
        let port = address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .ok_or_else(|| format!("CLUSTER NODES line has no port: {line:?}"))?;
        let flags: Vec<&str> = fields[2].split(',').collect();
        if flags.contains(&"handshake") {
            continue; // a node being met: not a member yet
        }
        let role = if flags.contains(&"master") {
            NodeRole::Master
        } else if flags.contains(&"slave") {
            NodeRole::Replica
        } else {
            return Err(format!(
                "CLUSTER NODES line has neither master nor slave flag: {line:?}"
            ));
        };
        let master_id = (fields[3] != "-").then(|| fields[3].to_owned());
        let failed = flags.iter().any(|flag| *flag == "fail" || *flag == "fail?");
        let mut slots = Vec::new();
        for slot in &fields[8..] {
            if slot.starts_with('[') {
                continue; // a slot being migrated or imported
            }
            let parse = |text: &str| {
                text.parse::<u16>()
                    .map_err(|_| format!("CLUSTER NODES line has a bad slot {slot:?}: {line:?}"))
            };
            let range = match slot.split_once('-') {
                Some((start, end)) => parse(start)?..=parse(end)?,
                None => parse(slot)?..=parse(slot)?,
            };
            slots.push(range);
        }
        nodes.push(ClusterNode {
            id: fields[0].to_owned(),
            port,
            role,
            master_id,
            failed,
            slots,
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host.example slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail? - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5459 5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
";

    #[test]
    fn parses_cluster_nodes() {
        let nodes = parse_cluster_nodes(NODES).unwrap();
        assert_eq!(nodes.len(), 4);
        let replica = &nodes[0];
        assert_eq!(replica.port, 30004);
        assert_eq!(replica.role, NodeRole::Replica);
        assert_eq!(
            replica.master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert!(replica.slots.is_empty());
        assert!(!nodes[1].failed);
        assert!(nodes[2].failed);
        let me = &nodes[3];
        assert_eq!(me.role, NodeRole::Master);
        assert_eq!(me.master_id, None);
        assert_eq!(me.slots, vec![0..=5459, 5460..=5460]);
        assert!(me.serves(5460) && !me.serves(5461));
        assert_eq!(me.url(), "redis://127.0.0.1:30001");
    }

    #[test]
    fn rejects_malformed_cluster_nodes() {
        assert!(parse_cluster_nodes("abc 127.0.0.1:1@2 master").is_err());
        let bad_slot = "id 127.0.0.1:1@2 master - 0 0 1 connected 0-x";
        assert!(
            parse_cluster_nodes(bad_slot)
                .unwrap_err()
                .contains("bad slot")
        );
        let no_role = "id 127.0.0.1:1@2 noflags - 0 0 1 connected";
        assert!(parse_cluster_nodes(no_role).is_err());
        let meeting = "id 127.0.0.1:1@2 handshake - 0 0 1 connected";
        assert_eq!(parse_cluster_nodes(meeting).unwrap(), []);
    }

    #[test]
    fn reads_info_fields() {
        let info = "cluster_state:ok\r\ncluster_slots_ok:16384\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots_ok"), Some("16384"));
        assert_eq!(info_field(info, "cluster_slots"), None);
    }

    #[test]
    fn options_default_to_three_masters_and_a_short_node_timeout() {
        let opts = ClusterOptions::default();
        assert_eq!(opts.replicas, 0);
        assert_eq!(opts.node_timeout, Duration::from_millis(1000));
        assert_eq!(ClusterOptions::default().arg("--x").extra_args, ["--x"]);
    }
}
