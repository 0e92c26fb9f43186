//! The `storefront` binary: parse the command line, start an instance, serve until Ctrl-C.
//!
//! ```text
//! storefront [--addr 127.0.0.1:8080] [--db storefront.db] [--policy FILE]
//! ```
//! `REDIS_URL` selects Redis (any URL keyward takes); without it the embedded backend is used.
//! `STOREFRONT_ADMIN_TOKEN` (at least 16 characters) is the token admin routes require; without it a
//! random one is written to `<db>.admin-token` (mode 0600) and only that path is printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use keyward::policy::Policy;
use rand::Rng as _;
use storefront::{AdminToken, Config, ImportReport};

/// keyward's reference service: the Northwind shop on SQLite, with keyward in front of it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The SQLite database file; created and filled with Northwind at first start.
    #[arg(long, default_value = "storefront.db")]
    db: PathBuf,
    /// A keyward policy file to use instead of the compiled-in crates/storefront/policy.toml.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let policy = match &args.policy {
        Some(file) => Policy::from_file(file)?,
        None => storefront::policy().context("the compiled-in policy")?,
    };
    let admin_token = admin_token(&args.db)?;
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let config = Config::new(&args.db, policy)
        .redis_url(redis_url)
        .admin_token(Some(admin_token.token));

    let (state, report) = storefront::start(config)
        .await
        .with_context(|| format!("starting with the database {}", args.db.display()))?;
    if let ImportReport::Imported(counts) = &report {
        println!(
            "storefront: imported Northwind into {} ({} products, {} customers, {} orders)",
            args.db.display(),
            counts.products,
            counts.customers,
            counts.orders
        );
    }
    let backend = state.kw.backend();
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = listener.local_addr()?;
    println!("storefront: the shop is at http://{addr}/ (keyward backend: {backend:?})");
    match &admin_token.file {
        Some(file) => println!(
            "storefront: admin token in {} (or set STOREFRONT_ADMIN_TOKEN)",
            file.display()
        ),
        None => println!("storefront: admin token from STOREFRONT_ADMIN_TOKEN"),
    }

    axum::serve(listener, storefront::app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}

struct Token {
    token: AdminToken,
    /// Where a generated token was written.
    file: Option<PathBuf>,
}

/// `STOREFRONT_ADMIN_TOKEN`, or a random token written to `<db>.admin-token` (owner-only).
fn admin_token(db: &Path) -> anyhow::Result<Token> {
    if let Ok(token) = std::env::var("STOREFRONT_ADMIN_TOKEN") {
        let token = AdminToken::new(token)
            .context("STOREFRONT_ADMIN_TOKEN must be at least 16 characters")?;
        return Ok(Token { token, file: None });
    }
    let bytes: [u8; 24] = rand::rng().random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = db.as_os_str().to_owned();
    file.push(".admin-token");
    let file = PathBuf::from(file);
    write_private(&file, &hex).with_context(|| format!("writing {}", file.display()))?;
    let token = AdminToken::new(hex).context("a generated token is 48 characters")?;
    Ok(Token {
        token,
        file: Some(file),
    })
}

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
