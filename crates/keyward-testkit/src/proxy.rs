//! Network faults on loopback: a [`TcpProxy`] whose behaviour can be switched while clients are connected,
//! and a [`Blackhole`] listener that accepts connections and never answers.
//!
//! The one decision a reader must know: both run on plain OS threads, not on a tokio runtime, so a test
//! whose runtime is busy (or blocked on the very call being tested) cannot stall the fault it is measuring.
//! Every thread polls its stop flag every few milliseconds, so dropping a proxy or a blackhole stops all of
//! its threads and closes all of its sockets before `drop` returns.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often idle threads look at the mode and the stop flag.
const POLL: Duration = Duration::from_millis(5);
/// How long one write to a peer may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the proxy tries to connect to its upstream for one client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long re-binding the proxy's port after [`TcpProxy::refuse`] is retried.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a [`TcpProxy`] does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Bytes flow both ways between each client and the upstream server.
    Forward,
    /// New connections are accepted and existing ones stay open, but no byte is forwarded either way:
    /// a host that accepts TCP and never answers. Bytes already sent stay queued and flow again after
    /// [`TcpProxy::forward`], as TCP retransmission would deliver them after a partition heals.
    Blackhole,
    /// Every connection is closed and new ones are refused (the port is not listening).
    Refuse,
}

/// State shared by the proxy handle and its threads.
struct Shared {
    /// The current mode. Pumps hold a read guard while they write, so a switch away from
    /// [`ProxyMode::Forward`] has taken effect when the switching call returns.
    mode: RwLock<ProxyMode>,
    /// Incremented by every [`TcpProxy::refuse`]; a connection accepted in an older generation is closed.
    generation: AtomicU64,
    /// Set on drop: every thread exits.
    stop: AtomicBool,
    /// The listening socket; `None` while refusing.
    listener: Mutex<Option<TcpListener>>,
    /// Clones of every live socket (client and upstream sides), so `refuse` and drop can close them at once.
    sockets: Mutex<Vec<TcpStream>>,
    /// Connection threads, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether a connection accepted in `generation` must close now.
    fn must_close(&self, generation: u64) -> bool {
        self.stopped() || self.generation.load(Ordering::SeqCst) != generation
    }

    fn register(&self, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            self.sockets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(clone);
        }
    }

    /// Closes every registered socket (both directions), waking any thread blocked on one.
    fn close_all(&self) {
        let sockets =
            std::mem::take(&mut *self.sockets.lock().unwrap_or_else(PoisonError::into_inner));
        for socket in sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// A TCP proxy on `127.0.0.1:<free port>` in front of one upstream server, whose behaviour can be switched
/// at run time between [`forward`](TcpProxy::forward), [`blackhole`](TcpProxy::blackhole) and
/// [`refuse`](TcpProxy::refuse), to reproduce network faults that a killed or stopped process cannot: a
/// host that accepts TCP and never answers, or a partition in the middle of a connection.
///
/// ```no_run
/// use keyward_testkit::{RedisServer, TcpProxy};
///
/// let server = RedisServer::spawn_tcp();
/// let proxy = TcpProxy::to_server(&server);
/// let client = redis::Client::open(proxy.url()).unwrap(); // goes through the proxy
/// proxy.blackhole(); // from now on the client's commands are never answered
/// ```
///
/// Dropping the proxy closes every connection and its port, and stops its threads.
pub struct TcpProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    upstream: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .finish()
    }
}

impl TcpProxy {
    /// Starts a proxy in [`ProxyMode::Forward`] on a free port of 127.0.0.1, forwarding to `upstream`.
    ///
    /// # Panics
    ///
    /// Panics if `upstream` is not a loopback address (fault tests never send traffic off the machine) or
    /// if no port can be bound.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        assert!(
            upstream.ip().is_loopback(),
            "TcpProxy forwards only to loopback addresses, got {upstream}"
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0 for a proxy: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("cannot read the proxy's address: {err}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|err| panic!("cannot make the proxy's listener non-blocking: {err}"));
        let shared = Arc::new(Shared {
            mode: RwLock::new(ProxyMode::Forward),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            listener: Mutex::new(Some(listener)),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("tcp-proxy-{}", addr.port()))
                .spawn(move || accept_loop(&shared, upstream))
                .unwrap_or_else(|err| panic!("cannot spawn the proxy's thread: {err}"))
        };
        TcpProxy {
            shared,
            addr,
            upstream,
            acceptor: Some(acceptor),
        }
    }

    /// Starts a proxy in front of a server that listens on TCP ([`RedisServer::spawn_tcp`]).
    ///
    /// # Panics
    ///
    /// Panics if the server listens only on a Unix socket, or as [`TcpProxy::start`].
    ///
    /// [`RedisServer::spawn_tcp`]: crate::RedisServer::spawn_tcp
    pub fn to_server(server: &crate::RedisServer) -> TcpProxy {
        let port = server
            .tcp_port()
            .expect("TcpProxy::to_server needs a server spawned with spawn_tcp()");
        TcpProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// The proxy's own address (127.0.0.1 and the port it listens on).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A Redis URL that reaches the upstream through the proxy: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    /// Forwards bytes both ways again, on existing connections (bytes queued meanwhile flow now) and new
    /// ones. After [`refuse`](TcpProxy::refuse) the same port is bound again.
    ///
    /// # Panics
    ///
    /// Panics if the port cannot be bound again within 5 s (another process took it).
    pub fn forward(&self) {
        self.set_mode(ProxyMode::Forward);
    }

    /// Keeps accepting connections and keeps them open, but forwards no byte either way from the moment
    /// this returns: clients see a host that accepts TCP and never answers. After
    /// [`refuse`](TcpProxy::refuse) the same port is bound again.
    ///
    /// # Panics
    ///
    /// As [`forward`](TcpProxy::forward).
    pub fn blackhole(&self) {
        self.set_mode(ProxyMode::Blackhole);
    }

    /// Closes every connection and the listening port: when this returns, new connections are refused
    /// (`ECONNREFUSED`) and existing ones have been shut down.
    pub fn refuse(&self) {
        {
            let mut mode = self
                .shared
                .mode
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *mode = ProxyMode::Refuse;
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            // Dropping the listener closes the port; connections still in its backlog are reset.
            self.shared
                .listener
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        }
        self.shared.close_all();
    }

    fn set_mode(&self, new: ProxyMode) {
        let mut mode = self
            .shared
            .mode
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut listener = self
            .shared
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if listener.is_none() {
            *listener = Some(rebind(self.addr));
        }
        *mode = new;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.shared.close_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in threads {
            let _ = handle.join();
        }
        // Sockets registered by connections that raced the stop flag.
        self.shared.close_all();
    }
}

/// Binds `addr` again (std sets `SO_REUSEADDR`, so lingering connections do not block it).
fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                listener.set_nonblocking(true).unwrap_or_else(|err| {
                    panic!("cannot make the proxy's listener non-blocking: {err}")
                });
                return listener;
            }
            Err(err) if Instant::now() >= deadline => {
                panic!("cannot bind the proxy's port {addr} again: {err}")
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Accepts connections until the proxy stops, giving each its own thread.
fn accept_loop(shared: &Arc<Shared>, upstream: SocketAddr) {
    while !shared.stopped() {
        let accepted = {
            let listener = shared
                .listener
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match listener.as_ref() {
                Some(listener) => listener.accept().map(Some),
                None => Ok(None),
            }
        };
        match accepted {
            Ok(Some((client, _))) => {
                let generation = shared.generation.load(Ordering::SeqCst);
                if shared.mode() == ProxyMode::Refuse {
                    continue; // raced a refuse: dropping closes it
                }
                if client.set_nonblocking(false).is_err() {
                    continue;
                }
                shared.register(&client);
                let conn_shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name("tcp-proxy-conn".to_owned())
                    .spawn(move || connection(&conn_shared, client, upstream, generation));
                if let Ok(handle) = spawned {
                    shared
                        .threads
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(handle);
                }
            }
            Ok(None) => thread::sleep(POLL),
            Err(err) if err.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// One client connection: held silently until the mode is [`ProxyMode::Forward`], then connected to the
/// upstream and pumped both ways until either side closes, the proxy refuses, or it stops.
fn connection(shared: &Arc<Shared>, client: TcpStream, upstream: SocketAddr, generation: u64) {
    // A connection accepted while blackholed waits here, open and silent.
    loop {
        if shared.must_close(generation) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        if shared.mode() == ProxyMode::Forward {
            break;
        }
        thread::sleep(POLL);
    }
    let Ok(server) = TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT) else {
        // The upstream is down: the client sees its connection closed, as with a dead server.
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    shared.register(&server);
    let (Ok(client_rx), Ok(server_tx)) = (client.try_clone(), server.try_clone()) else {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        return;
    };
    let back = {
        let shared = Arc::clone(shared);
        thread::Builder::new()
            .name("tcp-proxy-pump".to_owned())
            .spawn(move || pump(&shared, server, client, generation))
    };
    pump(shared, client_rx, server_tx, generation);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

/// Copies bytes from `from` to `to` while the mode is [`ProxyMode::Forward`]; holds them otherwise.
fn pump(shared: &Shared, mut from: TcpStream, mut to: TcpStream, generation: u64) {
    let close = |from: &TcpStream, to: &TcpStream| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    if from.set_read_timeout(Some(POLL)).is_err()
        || to.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        close(&from, &to);
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        if shared.must_close(generation) {
            close(&from, &to);
            return;
        }
        {
            // Holding the read guard while writing: a mode switch waits for this write to finish.
            let mode = shared.mode.read().unwrap_or_else(PoisonError::into_inner);
            if *mode != ProxyMode::Forward {
                drop(mode);
                thread::sleep(POLL);
                continue;
            }
            if !pending.is_empty() {
                if to.write_all(&pending).is_err() {
                    drop(mode);
                    close(&from, &to);
                    return;
                }
                pending.clear();
            }
        }
        match from.read(&mut buf) {
            Ok(0) => {
                close(&from, &to);
                return;
            }
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                close(&from, &to);
                return;
            }
        }
    }
}

/// A listener on `127.0.0.1:<free port>` that accepts every TCP connection and never sends a byte: the
/// client's connect succeeds, and then nothing ever answers. Dropping it closes every connection and the
/// port and stops its thread.
///
/// ```no_run
/// use keyward_testkit::Blackhole;
///
/// let hole = Blackhole::start();
/// let url = hole.url(); // redis://127.0.0.1:PORT — connects, then hangs
/// ```
pub struct Blackhole {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Blackhole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blackhole")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .finish()
    }
}

impl Blackhole {
    /// Starts listening on a free port of 127.0.0.1.
    ///
    /// # Panics
    ///
    /// Panics if no port can be bound.
    pub fn start() -> Blackhole {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0 for a blackhole: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("cannot read the blackhole's address: {err}"));
        listener.set_nonblocking(true).unwrap_or_else(|err| {
            panic!("cannot make the blackhole's listener non-blocking: {err}")
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            thread::Builder::new()
                .name(format!("blackhole-{}", addr.port()))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            // Kept open and never read or written.
                            Ok((stream, _)) => accepted
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(stream),
                            Err(_) => thread::sleep(POLL),
                        }
                    }
                })
                .unwrap_or_else(|err| panic!("cannot spawn the blackhole's thread: {err}"))
        };
        Blackhole {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A Redis URL pointing at it: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// How many connections it has accepted so far (all still open).
    pub fn connections(&self) -> usize {
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The listener was dropped with the thread; the accepted sockets close here.
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
