//! The `storefront` binary: parse the command line, start an instance, serve until Ctrl-C.
//!
//! ```text
//! storefront [--addr 127.0.0.1:8080] [--db storefront.db] [--policy FILE] [--no-worker]
//! storefront worker [--db storefront.db] [--policy FILE]
//! storefront restock-report [--db storefront.db] [--policy FILE]
//! storefront replay [--url http://127.0.0.1:8080] [--db storefront.db] [--speedup X] [--limit N] …
//! ```
//! `--no-cache` serves the catalog straight from SQLite (keyward bypassed), for load tests;
//! `--trust-proxy NET` (repeatable) reads the client address from those proxies' `X-Forwarded-For`
//! (the per-IP login limit; `storefront replay` sends one address per customer).
//! `storefront replay` replays the Northwind orders against a running shop (see `storefront::replay`)
//! and exits 0 when every check passed, 1 when one failed, 2 when it could not run. Its admin token
//! (for the restock) is read from `--admin-token-file`, else `STOREFRONT_ADMIN_TOKEN`, else
//! `<db>.admin-token` (what the shop on that database wrote).
//! The server also runs the restock report every `--restock-every` seconds (default 86400; 0: never),
//! under the `nightly_restock` lock, so instances sharing a store run it one at a time.
//! The first form serves the shop and, unless `--no-worker`, runs the order worker in the same process;
//! `storefront worker` runs only the worker (with Redis, next to instances started with `--no-worker`).
//! `REDIS_URL` selects Redis (any URL keyward takes); without it the embedded backend is used: its state
//! lives in the process, so the worker must run in the shop's process (the stream lives there) and only
//! one shop (or `restock-report`) runs per database, held by an OS lock on `<db>.embedded.lock`
//! (`storefront::embedded_lock`; a second one exits 2). `storefront replay` never takes that lock.
//! `STOREFRONT_ADMIN_TOKEN` (at least 16 characters) is the token admin routes require; without it a
//! random one is kept in `<db>.admin-token` (mode 0600; created once, so instances on one database share
//! it) and only that path is printed.
//! `STOREFRONT_SESSION_SECRETS` (comma-separated base64, current first, each at least 32 bytes) keys the
//! session ids; without it a random secret is kept in `<db>.session-secret` (mode 0600; created once, so
//! sessions outlive a restart and instances on one database share it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keyward::policy::Policy;
use keyward::session::SessionSecrets;
use keyward_axum::TrustedProxies;
use rand::Rng as _;
use storefront::embedded_lock::{EmbeddedLock, EmbeddedLockError};
use storefront::replay::{self, ReplayOptions};
use storefront::{AdminToken, Config, ImportReport, StartError};
use tokio::sync::watch;

/// `println!` that never panics: a shop whose stdout was closed (a pipe whose reader went away, as in
/// `storefront | head -3`) keeps serving instead of dying on `EPIPE` and releasing its embedded lock.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics, for the same reason as [`say!`].
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The shop's allocator (see "The allocator" in `docs/building-a-service.md`): keyward's and hyper's work
/// allocates on one thread and frees on another, which serialises glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// keyward's reference service: the Northwind shop on SQLite, with keyward in front of it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The SQLite database file; created and filled with Northwind at first start.
    #[arg(long, default_value = "storefront.db", global = true)]
    db: PathBuf,
    /// A keyward policy file to use instead of the compiled-in crates/storefront/policy.toml.
    #[arg(long, global = true)]
    policy: Option<PathBuf>,
    /// Do not run the order worker in this process (run `storefront worker` elsewhere; needs REDIS_URL).
    #[arg(long)]
    no_worker: bool,
    /// Seconds between runs of the restock report inside the server (0: never).
    #[arg(long, default_value_t = 86_400)]
    restock_every: u64,
    /// Serve the catalog straight from SQLite, bypassing keyward's cache (for load tests).
    #[arg(long)]
    no_cache: bool,
    /// Trust this proxy (an address or a CIDR network; repeatable): the client address is read from
    /// its X-Forwarded-For (the per-IP login limit). With 127.0.0.1, each of `storefront replay`'s
    /// customers gets its own limit; without it the replay still passes, waiting out refused logins.
    #[arg(long = "trust-proxy", value_name = "NET")]
    trust_proxy: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run only the order worker (consumes order.placed) until Ctrl-C.
    Worker,
    /// Write tonight's restock report (products at or below their reorder level) once, under the lock.
    RestockReport,
    /// Replay the Northwind orders as HTTP traffic against a running shop, then check its database.
    Replay(ReplayArgs),
}

/// `storefront replay`'s options. `--db` and `--policy` are its own, not the server's global ones
/// (clap does not propagate a global argument into a subcommand that declares one with the same id):
/// the replay's `--db` is only read, and `--policy` means nothing to it, so it is hidden.
#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// The running shop's SQLite database, opened read-only before and after the traffic (it must
    /// exist: the replay never creates it).
    #[arg(long, default_value = "storefront.db")]
    db: PathBuf,
    /// Ignored: the replay is a client of the shop, whose policy is its own.
    #[arg(long, hide = true)]
    policy: Option<PathBuf>,
    /// The running shop's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Historical seconds per real second (0: no pauses); the default plays the 22 months in about a
    /// minute.
    #[arg(long, default_value_t = replay::DEFAULT_SPEEDUP)]
    speedup: f64,
    /// Customers in flight at once.
    #[arg(long, default_value_t = replay::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Replay only the first N orders by date.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Re-send every N-th order with its Idempotency-Key, as a flaky client would (0: never).
    #[arg(long, value_name = "N", default_value_t = replay::DEFAULT_RESEND_EVERY)]
    resend_every: u32,
    /// The file holding the shop's admin token (default: STOREFRONT_ADMIN_TOKEN, else <db>.admin-token).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Do not send X-Forwarded-For (every login then comes from this host's address).
    #[arg(long)]
    no_forwarded_for: bool,
    /// Seconds to wait for the worker to confirm every order (0: skip that check, no worker runs).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    worker_deadline: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    // Logs go to stderr (stdout carries the start-up lines), in colour only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(Command::Replay(replay)) = &args.command {
        // A client of a running shop: no server state, and the shop's token file is only read.
        return Ok(run_replay(replay).await);
    }

    // One policy for every deployment: `KEYWARD_ENV` / `KEYWARD_APP` pick the namespace, as they do for the
    // `keyward` CLI, so an operator's `KEYWARD_ENV=prod keyward invalidate …` acts on this shop's keys.
    let policy = match &args.policy {
        Some(file) => Policy::from_file(file)?,
        None => storefront::policy().context("the compiled-in policy")?,
    }
    .with_env_overrides()?;
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    if matches!(args.command, Some(Command::Worker)) && redis_url.is_none() {
        // Embedded, the stream lives in the shop's process: a worker of its own would consume an empty
        // stream of its own for ever.
        say_err!(
            "storefront worker: REDIS_URL is not set. A worker in its own process needs the shop's Redis \
             (on the embedded backend the shop runs its worker itself; start it without --no-worker)"
        );
        return Ok(ExitCode::from(2));
    }
    if args.command.is_none() && args.no_worker && redis_url.is_none() {
        // The same reason seen from the shop: nothing outside this process can read its stream.
        say_err!(
            "storefront --no-worker: REDIS_URL is not set. On the embedded backend the order stream lives \
             in the shop's process, so no `storefront worker` can ever consume its orders: start the shop \
             without --no-worker, or set REDIS_URL and run `storefront worker` next to it"
        );
        return Ok(ExitCode::from(2));
    }
    // Held until main returns (the OS drops it if the process dies): one embedded instance per database.
    let _embedded_lock = match (&redis_url, &args.command) {
        (None, None | Some(Command::RestockReport)) => match EmbeddedLock::acquire(&args.db) {
            Ok(lock) => Some(lock),
            Err(error @ EmbeddedLockError::Held { .. }) => {
                let hint = if matches!(args.command, Some(Command::RestockReport)) {
                    " (or ask the running shop: POST /admin/restock-report with its admin token)"
                } else {
                    ""
                };
                say_err!("storefront: {error}{hint}");
                return Ok(ExitCode::from(2));
            }
            Err(error) => return Err(error.into()),
        },
        _ => None,
    };
    let admin_token = admin_token(&args.db)?;
    let config = Config::new(&args.db, policy)
        .redis_url(redis_url.clone())
        .admin_token(Some(admin_token.token))
        .session_secrets(Some(session_secrets(&args.db)?))
        .catalog_cache(!args.no_cache);
    let config = if args.trust_proxy.is_empty() {
        config
    } else {
        config.trusted_proxies(
            TrustedProxies::networks(&args.trust_proxy)
                .context("--trust-proxy: an address or a CIDR network")?,
        )
    };

    // Before the first keyward call: every handle reports to it (see storefront::telemetry).
    let metrics = storefront::telemetry::install_recorder().context("the metrics recorder")?;
    let (mut state, report) = storefront::start(config).await.map_err(|error| {
        // The headline names the step that failed: Redis (its URL without credentials) or the database.
        let headline = match (&error, &redis_url) {
            (
                StartError::Keyward(
                    keyward::Error::Connect { .. }
                    | keyward::Error::InvalidUrl { .. }
                    | keyward::Error::Timeout { .. },
                ),
                Some(url),
            ) => format!(
                "connecting to Redis at {} (REDIS_URL)",
                keyward::redact_url(url)
            ),
            _ => format!("starting with the database {}", args.db.display()),
        };
        anyhow::Error::new(error).context(headline)
    })?;
    state.metrics = Some(metrics);
    if let ImportReport::Imported(counts) = &report {
        say!(
            "storefront: imported Northwind into {} ({} products, {} customers, {} orders)",
            args.db.display(),
            counts.products,
            counts.customers,
            counts.orders
        );
    }
    let (stop, stopped) = watch::channel(false);
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        // Ctrl-C, or SIGTERM (what service managers and `docker stop` send): the same orderly stop.
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        let _ = stop.send(true);
    });

    if matches!(args.command, Some(Command::RestockReport)) {
        let outcome = storefront::restock::run_once(&state.kw, &state.db)
            .await
            .context("the restock report")?;
        say!("storefront: restock report: {outcome:?}");
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(args.command, Some(Command::Worker)) {
        say!("storefront: order worker running (Ctrl-C stops it)");
        let report = storefront::worker::run(&state.kw, state.db.clone(), shutdown())
            .await
            .context("the order worker")?;
        say!("storefront: order worker stopped: {report:?}");
        return Ok(ExitCode::SUCCESS);
    }
    let worker = (!args.no_worker).then(|| {
        let (kw, db, shutdown) = (state.kw.clone(), state.db.clone(), shutdown());
        tokio::spawn(async move { storefront::worker::run(&kw, db, shutdown).await })
    });

    if args.restock_every > 0 {
        let (kw, db, shutdown) = (state.kw.clone(), state.db.clone(), shutdown());
        let every = std::time::Duration::from_secs(args.restock_every);
        tokio::spawn(storefront::restock::run_every(kw, db, every, shutdown));
    }

    let backend = state.kw.backend();
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = listener.local_addr()?;
    let caching = if args.no_cache {
        ", catalog cache OFF (--no-cache)"
    } else {
        ""
    };
    say!("storefront: the shop is at http://{addr}/ (keyward backend: {backend:?}{caching})");
    match &admin_token.file {
        Some(file) => say!(
            "storefront: admin token in {} (or set STOREFRONT_ADMIN_TOKEN)",
            file.display()
        ),
        None => say!("storefront: admin token from STOREFRONT_ADMIN_TOKEN"),
    }
    say!(
        "storefront: the dashboard is at http://{addr}/dashboard, metrics at http://{addr}/metrics"
    );

    axum::serve(
        listener,
        storefront::app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await
    .context("serving")?;
    if let Some(worker) = worker {
        match worker.await {
            Ok(Ok(report)) => say!("storefront: order worker stopped: {report:?}"),
            Ok(Err(error)) => say_err!("storefront: the order worker failed: {error}"),
            Err(error) => say_err!("storefront: the order worker panicked: {error}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `storefront replay`: 0 when every check passed, 1 when one failed, 2 when the replay could not run.
async fn run_replay(args: &ReplayArgs) -> ExitCode {
    let db = args.db.as_path();
    if let Some(policy) = &args.policy {
        say_err!(
            "storefront replay: --policy {} is ignored (the shop uses its own policy)",
            policy.display()
        );
    }
    let token = match replay_admin_token(db, args.admin_token_file.as_deref()) {
        Ok(token) => token,
        Err(error) => {
            say_err!("storefront replay: {error:#}");
            return ExitCode::from(2);
        }
    };
    let options = ReplayOptions::new(&args.url, db, token)
        .speedup(args.speedup)
        .concurrency(args.concurrency)
        .limit(args.limit)
        .resend_every(args.resend_every)
        .forwarded_for(!args.no_forwarded_for)
        .worker_deadline(
            (args.worker_deadline > 0)
                .then(|| std::time::Duration::from_secs(args.worker_deadline)),
        );
    match replay::run(options).await {
        Ok(report) => {
            say!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            say_err!("storefront replay: {error}");
            ExitCode::from(2)
        }
    }
}

/// The replay's admin token: `file` if given, else `STOREFRONT_ADMIN_TOKEN`, else `<db>.admin-token`.
fn replay_admin_token(db: &Path, file: Option<&Path>) -> anyhow::Result<AdminToken> {
    let from_env = std::env::var("STOREFRONT_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let (text, source) = match (file, from_env) {
        (None, Some(token)) => (token, "STOREFRONT_ADMIN_TOKEN".to_owned()),
        (file, _) => {
            let file = file.map_or_else(|| beside(db, ".admin-token"), Path::to_path_buf);
            let text = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "reading the admin token from {} (start the shop on {} first, or pass \
                     --admin-token-file / set STOREFRONT_ADMIN_TOKEN)",
                    file.display(),
                    db.display()
                )
            })?;
            (text, file.display().to_string())
        }
    };
    AdminToken::new(text.trim()).with_context(|| format!("{source}: at least 16 characters"))
}

/// `STOREFRONT_SESSION_SECRETS`, or the secret kept in `<db>.session-secret` (created on first use,
/// owner-only).
fn session_secrets(db: &Path) -> anyhow::Result<SessionSecrets> {
    if let Ok(list) = std::env::var("STOREFRONT_SESSION_SECRETS") {
        return SessionSecrets::from_base64_list(&list).context("STOREFRONT_SESSION_SECRETS");
    }
    let file = beside(db, ".session-secret");
    let secret = kept_secret(&file, 32)?;
    // The file holds 64 hex digits (256 random bits); their text is the secret.
    SessionSecrets::new(secret.as_bytes())
        .with_context(|| format!("{}: at least 32 characters", file.display()))
}

struct Token {
    token: AdminToken,
    /// Where a generated token was written.
    file: Option<PathBuf>,
}

/// `STOREFRONT_ADMIN_TOKEN`, or the random token kept in `<db>.admin-token` (owner-only; created at the
/// first start on this database).
fn admin_token(db: &Path) -> anyhow::Result<Token> {
    if let Ok(token) = std::env::var("STOREFRONT_ADMIN_TOKEN") {
        let token = AdminToken::new(token)
            .context("STOREFRONT_ADMIN_TOKEN must be at least 16 characters")?;
        return Ok(Token { token, file: None });
    }
    // Created once, like the session secret: every instance started on this database uses the same token.
    let file = beside(db, ".admin-token");
    let hex = kept_secret(&file, 24)?;
    let token = AdminToken::new(hex)
        .with_context(|| format!("{}: at least 16 characters", file.display()))?;
    Ok(Token {
        token,
        file: Some(file),
    })
}

/// `<db><suffix>`.
fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut file = db.as_os_str().to_owned();
    file.push(suffix);
    PathBuf::from(file)
}

/// The secret kept in `file` (owner-only): `bytes` random bytes in hex, created if the file is missing,
/// else what it holds. Written to a temporary file and hard-linked into place, so instances starting at once
/// on one database never overwrite each other's secret nor read a half-written one: the loser reads the
/// winner's.
fn kept_secret(file: &Path, bytes: usize) -> anyhow::Result<String> {
    let random: Vec<u8> = (0..bytes).map(|_| rand::rng().random()).collect();
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    write_private(&tmp, &hex).with_context(|| format!("writing {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, file);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(hex),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?
                .trim()
                .to_owned())
        }
        Err(error) => Err(error).with_context(|| format!("writing {}", file.display())),
    }
}

/// Write `text` to `file` (created or truncated), readable by its owner only.
fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut out = options.open(file)?;
    out.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second instance started on the same database keeps the first one's admin token (it used to write
    /// a new one, so the file no longer opened the first instance's admin routes) and session secret.
    #[test]
    fn redacted_urls_hold_no_credentials() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/0", "redis://***@host:6379/0"),
            (
                "rediss://user:p@ss/w:rd@host:6380",
                "rediss://***@host:6380",
            ),
            (
                "redis://host:6379/0?password=s3cret",
                "redis://host:6379/0?…",
            ),
            (
                "redis+sentinel://host:26379/mymaster?p=a@b",
                "redis+sentinel://***…",
            ),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ] {
            assert_eq!(keyward::redact_url(url), shown, "{url}");
        }
    }

    /// `storefront replay --help` shows the replay's own `--db` (read, never created) and no `--policy`;
    /// the server's help keeps both. Either spelling of `--db` (before or after `replay`) reaches it.
    #[test]
    fn the_replay_has_its_own_db_and_no_policy() {
        use clap::CommandFactory as _;
        let mut command = Args::command();
        command.build();
        let replay = command.find_subcommand("replay").unwrap();
        let help = replay.clone().render_long_help().to_string();
        assert!(
            help.contains("read-only") && help.contains("never creates it"),
            "{help}"
        );
        assert!(!help.contains("created and filled"), "{help}");
        assert!(!help.contains("--policy"), "{help}");
        let server = command.clone().render_long_help().to_string();
        assert!(
            server.contains("created and filled") && server.contains("--policy"),
            "{server}"
        );
        for argv in [
            &["storefront", "replay", "--db", "x.db"][..],
            &["storefront", "--db", "x.db", "replay"][..],
        ] {
            let args = Args::try_parse_from(argv).unwrap();
            let Some(Command::Replay(replay)) = args.command else {
                panic!("{argv:?}: a replay");
            };
            assert_eq!(replay.db, Path::new("x.db"), "{argv:?}");
        }
        let help = command.render_long_help().to_string();
        assert!(
            help.contains("without it the replay still passes")
                && !help.contains("needs 127.0.0.1"),
            "--trust-proxy's help agrees with the README: {help}"
        );
    }

    #[test]
    fn secrets_are_created_once_per_database() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop.db.admin-token");
        let first = kept_secret(&file, 24).unwrap();
        assert_eq!(first.len(), 48);
        assert_eq!(kept_secret(&file, 24).unwrap(), first);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only");
        }
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
