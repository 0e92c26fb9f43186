//! `keyward` — the operator CLI for the keyward Redis data layer.
//!
//! - `keyward policy check FILE` validates a policy file and prints what it declares.
//! - `keyward invalidate --policy FILE --class NAME [--id ID…] [--tag TAG…]` runs the library's O(1)
//!   invalidations from the shell; `keyward dead-letters list|replay STREAM` lists dead letters and moves
//!   them back into their stream. Both are dry runs unless `--confirm NAME` repeats the class.
//! - `keyward audit --policy FILE [--url URL]` walks a live keyspace (`SCAN`, every primary of a Cluster,
//!   paced, resumable) and reports keys, memory and TTLs per class and every violation of the policy
//!   (see `docs/cli.md`).
//! - `keyward purge --policy FILE (--class NAME --version N | --orphans PATTERN) [--confirm NAME]` deletes an
//!   old version of a class or keys no class owns: a dry run unless confirmed, paced, resumable, logged.
//! - `keyward inspect KEY --policy FILE` describes one key (class, TTL against its bound, size, content decoded
//!   per kind, never a secret); `keyward streams [STREAM…] --policy FILE` shows stream classes' groups, lag,
//!   pending entries and dead letters.
//! - `keyward bench <hit|miss|stampede|get|ratelimit_exact|ratelimit_throughput|lock|session>` measures
//!   keyward against Redis (or the embedded backend), optionally across several OS processes sharing one
//!   namespace, and counts the Redis commands each operation costs.
//!
//! # Exit codes
//! - `0`: success.
//! - `1`: runtime failure, e.g. Redis cannot be reached or a benchmark operation failed (`audit` and `purge`
//!   still print what they counted, and the resume token, when they fail after the walk started).
//! - `2`: bad usage (unknown flag, invalid value or combination) or an invalid policy file.
//! - `3`: `audit` completed and found violations of the policy (so it can gate a deploy).
//! - `4`: `audit` or `purge` stopped before the end (Ctrl-C, SIGTERM, `--limit-keys`); it printed a resume token.
//!
//! A stdout closed early (`keyward audit … | grep -q …`, `| head`) never changes the code: the command exits
//! as it would have after writing everything (so 3 or 4 from an audit, never 0 instead).
//!
//! # Layout
//! This file only parses arguments, dispatches, and maps errors to exit codes. Dependencies point one way:
//! each module below imports only modules listed above it, so there is no import cycle.
//! - `error` — `UsageError` (exit 2) and the choice of exit code for an error.
//! - `redis_url` — which server a command acts on: `--url`, else `$REDIS_URL`, else the local default; the
//!   same rule for every command but `bench`; and how every command words a failed connection (unreachable,
//!   a `rediss://` port that speaks plain text, a password missing or refused) and opens its own connections.
//! - `policy_cmd` — `policy check`.
//! - `ops` — `invalidate` and `dead-letters`: the library's calls against a live Redis, dry run by default.
//! - `stream_info` — the read-only stream reads (`XINFO`, `XPENDING`), shared by `audit` and `streams`; it
//!   imports no other module of the crate.
//! - `audit` — `audit`: the paced, resumable keyspace walker (`audit::walk`, reused by `purge`), the tally
//!   per class, the stream and server checks, and the report. It uses `bench::servers` to find the primaries.
//! - `purge` — `purge`: selection by `keyward::key::classify`, the audit's walker, delete-if-unchanged.
//! - `inspect` — `inspect`, and the lookup of the primary holding a key (also used by `streams`).
//! - `streams` — `streams`.
//! - `words` — counts (`1 key`, `2 keys`) and durations (`1 h 5 m`) in the text forms; JSON keeps numbers.
//! - `stats` — `INFO commandstats` snapshots for `redis_cmds_per_op`; `MONITOR` for `redis_client_cmds_per_op`.
//! - `bench` — the `bench` arguments, the orchestration of one run, and its report; inside it:
//!   - `bench::measure` — latency histograms, spans, counts and worker loops, shared by every scenario;
//!   - `bench::report` — the JSON line (the `BENCHMARKS.md` contract) and the table;
//!   - `bench::scenarios` — the `Scenario` abstraction: the names and options (`workload`), one file per
//!     family (`cache`, `rate_limit`, `lock`, `session`), and the dispatch of their phases (`mod.rs`);
//!   - `bench::fleet` — `--processes`: child processes, the READY/GO handshake, merging their results. It
//!     runs scenarios through the abstraction; no scenario knows about it.

mod audit;
mod bench;
mod error;
mod inspect;
mod ops;
mod policy_cmd;
mod purge;
mod redis_url;
mod stats;
mod stream_info;
mod streams;
mod words;

use std::io;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The CLI's allocator (see "The allocator" in `docs/building-a-service.md`): keyward's calls allocate on
/// one thread and free on another, a pattern that serialises glibc's malloc; `keyward bench hit` at 64
/// callers measured about 1.4× the hits per second with mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shown at the end of `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure, e.g. Redis cannot be reached or a benchmark operation failed (audit and purge
     still print what they counted and a resume token when they fail after the walk started)
  2  bad usage (unknown flag, invalid value or combination) or an invalid policy file
  3  audit: violations of the policy were found
  4  audit, purge: stopped before the end (interrupted or --limit-keys); a resume token was printed
A stdout closed early (| head, | grep -q) does not change the code.";

/// The keyward operator CLI: policy checks, keyspace audits and purges, invalidations, dead-letter replay
/// and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with policy files.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Audit a live Redis keyspace against a policy: counts, memory and TTLs per class, and violations.
    Audit(Box<audit::AuditArgs>),
    /// Delete an old version of a class, or keys of the namespace no class owns: dry run unless --confirm.
    Purge(Box<purge::PurgeArgs>),
    /// Invalidate cache entries (by id, by tag, or the whole class) through the library's O(1)
    /// invalidations. A dry run unless `--confirm CLASS`.
    Invalidate(Box<ops::InvalidateArgs>),
    /// List a stream's dead letters, or move them back into the stream (a dry run unless `--confirm STREAM`).
    DeadLetters {
        #[command(subcommand)]
        command: ops::DeadLettersCommand,
    },
    /// Describe one key: its class, version and role, type, TTL against the class's bound, size, and its
    /// content decoded per kind (never a secret).
    Inspect(Box<inspect::InspectArgs>),
    /// Streams of the policy: length against retention, consumer groups with consumers, lag and pending
    /// entries, dead letters.
    Streams(Box<streams::StreamsArgs>),
    /// Benchmark keyward's cache, rate limiter, locks and sessions against Redis or the embedded backend.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors to stderr with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Policy { command } => policy_cmd::run(command).map(|()| ExitCode::SUCCESS),
        Command::Audit(args) => audit::run(*args),
        Command::Purge(args) => purge::run(*args),
        Command::Invalidate(args) => ops::invalidate(*args).map(|()| ExitCode::SUCCESS),
        Command::DeadLetters { command } => ops::dead_letters(command).map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => inspect::run(*args),
        Command::Streams(args) => streams::run(*args),
        Command::Bench(args) => bench::run(*args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) if error::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error::one_line(&err));
            error::exit_code(&err)
        }
    }
}

/// Logs (keyward's `tracing` events) go to stderr, filtered by `RUST_LOG` (default: warnings and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colour only on a terminal: redirected logs stay plain text.
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
}
