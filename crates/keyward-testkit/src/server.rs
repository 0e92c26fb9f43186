//! Spawning, probing and killing `redis-server` processes.

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tempfile::TempDir;

use crate::binary::redis_server_binary;

/// How long a freshly spawned server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const READY_POLL: Duration = Duration::from_millis(5);
/// Connection timeout of a single readiness probe.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How many free ports [`RedisServer::spawn_tcp`] tries before giving up.
const TCP_ATTEMPTS: usize = 5;
/// File name of the Unix socket inside the server's directory.
const SOCKET_NAME: &str = "redis.sock";
/// File name of the server log inside the server's directory.
const LOG_NAME: &str = "redis.log";

/// Options for [`RedisServer::spawn_with`].
///
/// The struct is `#[non_exhaustive]`; build it from [`ServerOptions::default`]
/// and the builder methods:
///
/// ```
/// use keyward_testkit::ServerOptions;
///
/// let opts = ServerOptions::default()
///     .tcp(true)
///     .args(["--maxmemory", "10mb"]);
/// assert!(opts.tcp);
/// assert_eq!(opts.extra_args, ["--maxmemory", "10mb"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Listen on a free TCP port on 127.0.0.1 instead of a Unix socket.
    pub tcp: bool,
    /// Extra command-line arguments appended after the defaults, e.g.
    /// `["--maxmemory", "10mb"]`. Later arguments override earlier ones.
    pub extra_args: Vec<String>,
    /// Start the server under `setpriv --pdeathsig KILL` (util-linux), so that it is killed when the thread
    /// that spawned it exits — with the process, for a server spawned by a thread that lives as long as the
    /// process. For servers kept in a `static`, which is never dropped.
    pub die_with_parent: bool,
}

impl ServerOptions {
    /// Sets [`ServerOptions::die_with_parent`].
    #[must_use]
    pub fn die_with_parent(mut self, die: bool) -> Self {
        self.die_with_parent = die;
        self
    }

    /// Sets [`ServerOptions::tcp`].
    #[must_use]
    pub fn tcp(mut self, tcp: bool) -> Self {
        self.tcp = tcp;
        self
    }

    /// Appends one argument to [`ServerOptions::extra_args`].
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends several arguments to [`ServerOptions::extra_args`].
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// Where a server listens.
#[derive(Debug, Clone)]
enum Endpoint {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
}

impl Endpoint {
    /// The redis-rs address of this endpoint.
    fn addr(&self) -> ConnectionAddr {
        match self {
            Endpoint::Unix(path) => ConnectionAddr::Unix(path.clone()),
            Endpoint::Tcp(port) => ConnectionAddr::Tcp(Ipv4Addr::LOCALHOST.to_string(), *port),
        }
    }

    /// The connection info of this endpoint.
    fn connection_info(&self) -> ConnectionInfo {
        self.addr()
            .into_connection_info()
            .expect("a ConnectionAddr always converts into ConnectionInfo")
    }
}

/// A throwaway `redis-server` process.
///
/// The server runs with persistence disabled in a fresh temporary directory.
/// Dropping the handle kills the process (`SIGKILL`), waits for it and
/// removes the directory.
pub struct RedisServer {
    /// The server process; `None` once killed and reaped.
    child: Option<Child>,
    /// The process id, kept after the child is reaped.
    pid: u32,
    /// Where the server listens.
    endpoint: Endpoint,
    /// Path of the server's log file.
    log_path: PathBuf,
    /// The server's working directory; dropped (removed) after the process is gone.
    dir: TempDir,
    /// The executable, kept for [`RedisServer::restart`].
    binary: PathBuf,
    /// The options it was spawned with, kept for [`RedisServer::restart`].
    opts: ServerOptions,
    /// Whether [`RedisServer::pause`] stopped it (and no [`RedisServer::resume`] followed yet).
    paused: bool,
    /// User name and password that [`RedisServer::url`] carries, set by [`RedisServer::set_url_credentials`].
    url_credentials: Option<(String, String)>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("pid", &self.pid)
            .field("url", &self.endpoint_url())
            .field(
                "url_user",
                &self.url_credentials.as_ref().map(|(user, _)| user),
            )
            .field("running", &self.child.is_some())
            .field("paused", &self.paused)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Why one spawn attempt failed.
enum SpawnFailure {
    /// The process exited before answering `PING`.
    Exited {
        /// The exit status.
        status: ExitStatus,
        /// The server log.
        log: String,
    },
    /// The readiness deadline passed.
    TimedOut {
        /// The last probe error.
        last_error: String,
        /// The server log.
        log: String,
    },
}

impl RedisServer {
    /// Spawns a server listening only on a Unix socket in a fresh temporary
    /// directory (`--port 0 --unixsocket <dir>/redis.sock`).
    ///
    /// # Panics
    ///
    /// Panics if `redis-server` cannot be found (see
    /// [`redis_server_binary`](crate::redis_server_binary)), or if the server
    /// exits or does not answer `PING` within 10 seconds; the panic message
    /// carries the exit status and the server log.
    pub fn spawn() -> RedisServer {
        RedisServer::spawn_with(ServerOptions::default())
    }

    /// Spawns a server listening on a free TCP port on 127.0.0.1 (and no Unix
    /// socket). Needed by tools such as `redis-benchmark`.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::spawn`]; binding a port is retried a few times first.
    pub fn spawn_tcp() -> RedisServer {
        RedisServer::spawn_with(ServerOptions::default().tcp(true))
    }

    /// Spawns a server with the given options.
    ///
    /// The server always gets `--daemonize no --save "" --appendonly no` and
    /// its directory and log file in a fresh temporary directory; then either
    /// `--port 0 --unixsocket <dir>/redis.sock --unixsocketperm 700` or
    /// `--port <free port> --bind 127.0.0.1`; then
    /// [`ServerOptions::extra_args`].
    ///
    /// # Panics
    ///
    /// As [`RedisServer::spawn`].
    pub fn spawn_with(opts: ServerOptions) -> RedisServer {
        let binary = redis_server_binary();
        let attempts = if opts.tcp { TCP_ATTEMPTS } else { 1 };
        let mut failures = Vec::new();
        for attempt in 1..=attempts {
            match RedisServer::try_spawn(&binary, &opts) {
                Ok(server) => return server,
                Err(failure) => {
                    let text = match failure {
                        SpawnFailure::Exited { status, log } => format!(
                            "attempt {attempt}: redis-server exited before becoming ready ({status})\n\
                             --- server log ---\n{log}--- end of log ---"
                        ),
                        SpawnFailure::TimedOut { last_error, log } => format!(
                            "attempt {attempt}: redis-server did not answer PING within {READY_TIMEOUT:?} \
                             (last error: {last_error})\n--- server log ---\n{log}--- end of log ---"
                        ),
                    };
                    failures.push(text);
                }
            }
        }
        panic!(
            "failed to start {} with {opts:?}:\n{}",
            binary.display(),
            failures.join("\n")
        );
    }

    /// One attempt at spawning a server and waiting until it is ready.
    fn try_spawn(binary: &Path, opts: &ServerOptions) -> Result<RedisServer, SpawnFailure> {
        let dir = tempfile::Builder::new()
            .prefix("keyward-redis-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("cannot create a temporary directory for redis-server: {err}")
            });
        let log_path = dir.path().join(LOG_NAME);
        if opts.die_with_parent {
            mark_owned(dir.path());
        }

        let endpoint = if opts.tcp {
            Endpoint::Tcp(free_tcp_port())
        } else {
            Endpoint::Unix(dir.path().join(SOCKET_NAME))
        };
        let mut cmd = server_command(binary, dir.path(), &log_path, &endpoint, opts);
        let child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot execute {}: {err}", binary.display()));
        let mut server = RedisServer {
            pid: child.id(),
            child: Some(child),
            endpoint,
            log_path,
            dir,
            binary: binary.to_path_buf(),
            opts: opts.clone(),
            paused: false,
            url_credentials: None,
        };
        server.wait_until_ready()?;
        Ok(server)
    }

    /// Polls connect + `PING` until the server answers, exits, or the deadline passes.
    fn wait_until_ready(&mut self) -> Result<(), SpawnFailure> {
        let client = self.client();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(SpawnFailure::Exited {
                    status,
                    log: self.log(),
                });
            }
            let last_error = match probe(&client, self.pid) {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                // Leave nothing running behind the failed attempt.
                self.kill();
                return Err(SpawnFailure::TimedOut {
                    last_error,
                    log: self.log(),
                });
            }
            thread::sleep(READY_POLL);
        }
    }

    /// Reaps the child if it has exited, returning its status.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(err) => panic!("cannot query redis-server (pid {}): {err}", self.pid),
        }
    }

    /// The connection URL: `redis+unix:///path/redis.sock` or `redis://127.0.0.1:PORT`.
    ///
    /// After [`RedisServer::set_url_credentials`] it also carries that user and password
    /// (`redis+unix:///path/redis.sock?user=U&pass=P`, `redis://U:P@127.0.0.1:PORT`), so code under test
    /// that connects with `url()` connects as that user, while [`RedisServer::client`] and
    /// [`RedisServer::connection`] stay the unrestricted `default` user for assertions.
    pub fn url(&self) -> String {
        match &self.url_credentials {
            None => self.endpoint_url(),
            Some((user, pass)) => match &self.endpoint {
                Endpoint::Unix(path) => format!(
                    "redis+unix://{}?user={}&pass={}",
                    encode_path(path),
                    encode_component(user),
                    encode_component(pass)
                ),
                Endpoint::Tcp(port) => format!(
                    "redis://{}:{}@{}:{port}",
                    encode_component(user),
                    encode_component(pass),
                    Ipv4Addr::LOCALHOST
                ),
            },
        }
    }

    /// The URL without credentials.
    fn endpoint_url(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(path) => format!("redis+unix://{}", encode_path(path)),
            Endpoint::Tcp(port) => format!("redis://{}:{port}", Ipv4Addr::LOCALHOST),
        }
    }

    /// Makes [`RedisServer::url`] carry `user` and `password` (for example a user created with
    /// `ACL SETUSER` through [`RedisServer::connection`]); `None` goes back to the plain URL.
    /// Users created at run time do not survive [`RedisServer::restart`].
    pub fn set_url_credentials(&mut self, credentials: Option<(&str, &str)>) {
        self.url_credentials = credentials.map(|(user, pass)| (user.to_owned(), pass.to_owned()));
    }

    /// The TCP port, if the server listens on TCP.
    pub fn tcp_port(&self) -> Option<u16> {
        match self.endpoint {
            Endpoint::Tcp(port) => Some(port),
            Endpoint::Unix(_) => None,
        }
    }

    /// The Unix socket path, if the server listens on a Unix socket.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp(_) => None,
        }
    }

    /// A redis-rs client for this server.
    pub fn client(&self) -> Client {
        Client::open(self.endpoint.connection_info())
            .expect("a ConnectionInfo for a local server is always a valid client config")
    }

    /// A synchronous connection, for test assertions.
    ///
    /// # Panics
    ///
    /// Panics if the connection cannot be established (e.g. after
    /// [`RedisServer::kill`]).
    pub fn connection(&self) -> redis::Connection {
        self.client()
            .get_connection()
            .unwrap_or_else(|err| panic!("cannot connect to {}: {err}", self.url()))
    }

    /// The contents of the server log (empty if the log does not exist yet).
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// The server's process id (still reported after the server was killed).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's temporary working directory (holds the socket and the log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server now (`SIGKILL`) and waits for it to exit. Later calls
    /// and the eventual drop are no-ops. For failure-mode tests.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `kill` fails only if the process was already reaped, which `take` rules out,
            // or if it already exited; `wait` reaps it either way. SIGKILL also ends a stopped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Freezes the server (`SIGSTOP`): connections stay open and new ones are accepted by the kernel, but
    /// nothing is answered until [`RedisServer::resume`]. A hung server, as seen by its clients.
    ///
    /// # Panics
    ///
    /// Panics if the server is not running (killed) or the signal cannot be sent.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Lets a [`paused`](RedisServer::pause) server run again (`SIGCONT`) and waits until it answers `PING`
    /// (it first works through the commands that queued up meanwhile). Returns when it answered.
    ///
    /// # Panics
    ///
    /// Panics if the server is not running, the signal cannot be sent, or it does not answer `PING` within
    /// 10 seconds (the message carries the server log).
    pub fn resume(&mut self) -> Instant {
        self.signal("-CONT");
        self.paused = false;
        self.wait_for_ping()
    }

    /// Whether [`RedisServer::pause`] stopped the server and no resume followed.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Kills the server (`SIGKILL`, if it still runs) and starts a new, empty one with the same arguments on
    /// the same TCP port or Unix socket, in the same directory (the log is appended to), then waits until it
    /// answers `PING`. Returns when it answered. Clients see a server that crashed and came back without its
    /// data. Credentials set with [`RedisServer::set_url_credentials`] stay in [`RedisServer::url`], but
    /// users created at run time are gone.
    ///
    /// # Panics
    ///
    /// Panics if the new server exits or does not answer `PING` within 10 seconds (binding the old TCP port
    /// is retried meanwhile, in case the kernel still holds it); the message carries the server log.
    pub fn restart(&mut self) -> Instant {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut failures = Vec::new();
        loop {
            let mut cmd = server_command(
                &self.binary,
                self.dir.path(),
                &self.log_path,
                &self.endpoint,
                &self.opts,
            );
            let child = cmd
                .spawn()
                .unwrap_or_else(|err| panic!("cannot execute {}: {err}", self.binary.display()));
            self.pid = child.id();
            self.child = Some(child);
            match self.wait_until_ready() {
                Ok(()) => return Instant::now(),
                Err(SpawnFailure::Exited { status, .. }) if Instant::now() < deadline => {
                    // Most likely the port is still held; try again shortly.
                    failures.push(format!("{status}"));
                    thread::sleep(READY_POLL * 10);
                }
                Err(SpawnFailure::Exited { status, log }) => panic!(
                    "restarted redis-server exited before becoming ready ({status}; earlier attempts: \
                     {failures:?})\n--- server log ---\n{log}--- end of log ---"
                ),
                Err(SpawnFailure::TimedOut { last_error, log }) => panic!(
                    "restarted redis-server did not answer PING within {READY_TIMEOUT:?} \
                     (last error: {last_error})\n--- server log ---\n{log}--- end of log ---"
                ),
            }
        }
    }

    /// Waits until the running server answers `PING`; returns when it did.
    fn wait_for_ping(&mut self) -> Instant {
        match self.wait_until_ready() {
            Ok(()) => Instant::now(),
            Err(SpawnFailure::Exited { status, log }) => panic!(
                "redis-server exited ({status})\n--- server log ---\n{log}--- end of log ---"
            ),
            Err(SpawnFailure::TimedOut { last_error, log }) => panic!(
                "redis-server did not answer PING within {READY_TIMEOUT:?} (last error: {last_error})\n\
                 --- server log ---\n{log}--- end of log ---"
            ),
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`) to the running server with `kill(1)` (the crate forbids `unsafe`).
    fn signal(&self, sig: &str) {
        assert!(
            self.child.is_some(),
            "cannot send {sig} to redis-server pid {}: it is not running",
            self.pid
        );
        let status = Command::new("kill")
            .arg(sig)
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|err| panic!("cannot run `kill {sig} {}`: {err}", self.pid));
        assert!(
            status.success(),
            "`kill {sig} {}` failed: {status}",
            self.pid
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        // `dir` is dropped after this, removing the socket and the log.
    }
}

/// One readiness probe: connect with a short timeout, `PING`, and check that
/// the answering server is process `pid` (on TCP, a port race could otherwise
/// let another test's server answer for one that failed to bind).
fn probe(client: &Client, pid: u32) -> Result<(), String> {
    let mut con = client
        .get_connection_with_timeout(PROBE_CONNECT_TIMEOUT)
        .map_err(|err| err.to_string())?;
    con.set_read_timeout(Some(PROBE_CONNECT_TIMEOUT))
        .map_err(|err| err.to_string())?;
    let pong: String = redis::cmd("PING")
        .query(&mut con)
        .map_err(|err| err.to_string())?;
    if pong != "PONG" {
        return Err(format!("unexpected PING reply {pong:?}"));
    }
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut con)
        .map_err(|err| err.to_string())?;
    let answering_pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .map(str::trim);
    match answering_pid {
        Some(found) if found == pid.to_string() => Ok(()),
        Some(found) => Err(format!(
            "another redis-server (pid {found}) answered instead of pid {pid}"
        )),
        None => Err("INFO server reported no process_id".to_owned()),
    }
}

/// The command line of a server: the defaults, the endpoint, then the extra arguments.
/// The file naming the process that owns a directory which outlives it (a `static` server's, never dropped).
const OWNER_FILE: &str = "owner.pid";

/// Mark `dir` as owned by this process, for [`sweep_orphans`].
pub(crate) fn mark_owned(dir: &Path) {
    let _ = std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string());
}

/// Remove the temporary directories of shared servers and clusters whose owning process is gone (their
/// nodes died with it, but a `static` is never dropped, so nobody removed the directories). Best effort.
pub(crate) fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("keyward-redis-") || name.starts_with("keyward-cluster-")) {
            continue;
        }
        let Ok(pid) = std::fs::read_to_string(entry.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = pid
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn server_command(
    binary: &Path,
    dir: &Path,
    log_path: &Path,
    endpoint: &Endpoint,
    opts: &ServerOptions,
) -> Command {
    let extra_args = &opts.extra_args;
    let mut cmd = if opts.die_with_parent {
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
            panic!(
                "`setpriv` (util-linux) is needed to tie a shared test server to the test process; \
                 install it with `apt-get install -y util-linux`"
            )
        });
        let mut cmd = Command::new(setpriv);
        cmd.arg("--pdeathsig").arg("KILL").arg(binary);
        cmd
    } else {
        Command::new(binary)
    };
    cmd.arg("--daemonize")
        .arg("no")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log_path);
    match endpoint {
        Endpoint::Tcp(port) => {
            cmd.arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg(Ipv4Addr::LOCALHOST.to_string());
        }
        Endpoint::Unix(socket) => {
            cmd.arg("--port")
                .arg("0")
                .arg("--unixsocket")
                .arg(socket)
                .arg("--unixsocketperm")
                .arg("700");
        }
    }
    cmd.args(extra_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Percent-encodes a URL component (user name, password) so that any byte survives.
fn encode_component(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A currently free TCP port on 127.0.0.1 (bound, then released).
pub(crate) fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0 to pick a free port: {err}"));
    listener
        .local_addr()
        .unwrap_or_else(|err| panic!("cannot read the address of a bound listener: {err}"))
        .port()
}

/// Percent-encodes a filesystem path for use in a URL path.
fn encode_path(path: &Path) -> String {
    let mut out = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(*byte));
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
