//! `keyward audit`: walk a live keyspace and check every key against the policy.
//!
//! The one decision: **the audit is read-only and resumable by construction.** It only sends the commands
//! listed in `docs/cli.md` (the read-only ACL rule there is tested), and everything it has counted lives in
//! a [`Tally`] that is saved with the per-server `SCAN` cursors in a checkpoint file whenever the walk
//! stops early (Ctrl-C, SIGTERM, `--limit-keys`, an error): `--resume TOKEN` loads it and continues, and the
//! final report is the one a single pass would have printed.
//!
//! Inside: `walk` (SCAN + inspection pipelines, pacing), `tally` (what the keys say, per class),
//! `checks` (streams and server settings, after the walk), `report` (JSON and table).

pub(crate) mod checks;
mod report;
mod tally;
pub(crate) mod walk;

pub(crate) use tally::display_key;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use clap::Args;
use keyward::policy::Policy;
use serde::{Deserialize, Serialize};

use crate::bench::servers::Servers;
use crate::error::usage;
use crate::redis_url::UrlArg;
use checks::{ServerInfo, StreamFindings};
use report::ScanStats;
use tally::Tally;
use walk::{KeyFacts, NodeState, NodeWalk, ResumePoint, ServerId, Walker};

/// Exit status when the audit found violations.
pub(crate) const EXIT_VIOLATIONS: u8 = 3;
/// Exit status when the walk stopped before the end (a resume token was printed).
pub(crate) const EXIT_INCOMPLETE: u8 = 4;

/// Default pace: Redis commands per second, per server. With the default `--count` of 100 (inspected by two
/// pipelines of about 150 commands sent together, each well under one read of the server's query buffer) and
/// waits carried over rather than slept in sub-millisecond pieces, this finished 1,000,000 keys about as fast
/// as `redis-cli --memkeys` and kept a concurrent client's p99 within 1 ms of its unloaded value on the
/// reference machine (BENCHMARKS.md).
const DEFAULT_MAX_OPS: u64 = 300_000;

/// Arguments of `keyward audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// The policy file (TOML) the keyspace is checked against.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    url: UrlArg,
    /// Print one JSON document (field names in docs/cli.md) instead of the table.
    #[arg(long)]
    json: bool,
    /// Continue an interrupted audit from the token it printed.
    #[arg(long, value_name = "TOKEN")]
    resume: Option<String>,
    /// Where interrupted audits keep their checkpoint (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Ceiling on the commands sent per second to each server; the walk slows further when the server's
    /// latency rises.
    #[arg(long, default_value_t = DEFAULT_MAX_OPS)]
    max_ops_per_sec: u64,
    /// Keys asked of each SCAN (its COUNT); they are inspected 50 keys per pipeline, those pipelines sent
    /// together.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// MEMORY USAGE SAMPLES: nested values sampled per hash, set, list, sorted set or stream (0 = all).
    #[arg(long, default_value_t = 5)]
    samples: u64,
    /// How many of the biggest keys to show per class.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Stop after about this many keys (a checkpoint and resume token are printed, exit status 4): spreads an
    /// audit over several runs.
    #[arg(long, value_name = "N")]
    limit_keys: Option<u64>,
}

/// What an interrupted audit saves: enough to finish as if it had never stopped.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    env: String,
    app: String,
    nodes: Vec<NodeState>,
    tally: Tally,
    seconds: f64,
    commands: u64,
    backoffs: u64,
}

/// One inspected batch of one server, sent to the tally.
struct Msg {
    node: usize,
    keys: Vec<(KeyFacts, Option<u64>)>,
    resume_at: Option<u64>,
    commands: u64,
    backoffs: u64,
}

/// Runs `keyward audit`.
///
/// # Errors
/// A [`UsageError`](crate::error::UsageError) for a bad policy, URL, token or flag; otherwise when a server cannot be reached or
/// refuses a command (the resume token is printed first if keys were already counted).
pub(crate) fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let policy = crate::policy_cmd::load(&args.policy)?;
    if args.count == 0 {
        usage!("--count must be at least 1");
    }
    if args.count > walk::MAX_COUNT {
        usage!(
            "--count {}: at most {} (one SCAN walks about that many keys while the server waits)",
            args.count,
            walk::MAX_COUNT
        );
    }
    if args.max_ops_per_sec == 0 {
        usage!("--max-ops-per-sec must be at least 1");
    }
    let url = args.url.resolve();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(audit(args, Arc::new(policy), &url))
}

async fn audit(args: AuditArgs, policy: Arc<Policy>, url: &str) -> anyhow::Result<ExitCode> {
    let dir = args
        .checkpoint_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let servers = Servers::discover(url).await?;
    let addrs: Vec<(String, String)> = servers
        .urls()
        .map(|(a, u)| (a.to_owned(), u.to_owned()))
        .collect();
    let (resume, saved) = match &args.resume {
        Some(token) => {
            let resume = ResumePoint::named(Walker::Audit, &dir, token)?;
            let cp: Checkpoint = resume.load()?;
            if cp.format != 1 || cp.env != policy.env() || cp.app != policy.app() {
                usage!(
                    "--resume {token}: the checkpoint is for namespace {}:{}, not {}:{}",
                    cp.env,
                    cp.app,
                    policy.env(),
                    policy.app()
                );
            }
            (resume, Some(cp))
        }
        None => (ResumePoint::fresh(Walker::Audit, &dir), None),
    };

    let mut conns = Vec::with_capacity(addrs.len());
    let mut infos: Vec<ServerInfo> = Vec::with_capacity(addrs.len());
    let mut ids = Vec::with_capacity(addrs.len());
    for (addr, node_url) in &addrs {
        let label = if addr.is_empty() {
            crate::redis_url::server_label(node_url)?
        } else {
            addr.clone()
        };
        let mut conn = walk::connect(node_url).await?;
        // Before the walk, on a plain key: a refused command is named here (see `walk::probe`).
        walk::probe(
            &mut conn,
            &keyward::key::internal_key(&policy, "audit"),
            args.samples,
            false,
        )
        .await
        .with_context(|| {
            format!(
                "{label} refuses a command the audit needs (renamed, or not granted to this user)"
            )
        })?;
        ids.push(
            ServerId::read(&mut conn, &label)
                .await
                .with_context(|| format!("cannot audit {label}"))?,
        );
        infos.push(
            checks::server_info(&mut conn, addr)
                .await
                .with_context(|| format!("cannot audit {label}"))?,
        );
        conns.push(conn);
    }
    let (mut nodes, mut tally, mut seconds, mut commands, mut backoffs) = match saved {
        Some(cp) => {
            if let Some(why) = NodeState::mismatch(&cp.nodes, &ids) {
                usage!(
                    "--resume {}: the checkpoint is not for this server: {why}",
                    resume.token()
                );
            }
            (cp.nodes, cp.tally, cp.seconds, cp.commands, cp.backoffs)
        }
        None => (NodeState::start(&ids), Tally::default(), 0.0, 0, 0),
    };

    let progress = progress_bar(infos.iter().map(|i| i.keys).sum(), tally.keys_seen);
    let stop = Arc::new(AtomicBool::new(false));
    let examined = Arc::new(AtomicU64::new(0));
    let on_signal = stop_on_signal(stop.clone())?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(16);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, conn) in conns.iter().enumerate() {
        if nodes[i].done {
            continue;
        }
        let walker = NodeWalk::new(
            conn.clone(),
            nodes[i].cursor,
            args.count,
            args.samples,
            args.max_ops_per_sec,
        );
        tasks.spawn(walk_node(
            i,
            walker,
            policy.clone(),
            tx.clone(),
            stop.clone(),
            examined.clone(),
            args.limit_keys,
        ));
    }
    drop(tx);
    let signals = tokio::spawn(on_signal);
    let started = Instant::now();
    while let Some(msg) = rx.recv().await {
        for (facts, size) in &msg.keys {
            tally.add(&policy, msg.node, facts, *size, args.top);
        }
        nodes[msg.node].advance(msg.resume_at);
        commands += msg.commands;
        backoffs += msg.backoffs;
        examined.fetch_add(msg.keys.len() as u64, Ordering::Relaxed);
        if let Some(pb) = &progress {
            pb.set_position(tally.keys_seen);
        }
    }
    signals.abort();
    let mut failure = walk::first_failure(&mut tasks, "walk").await;
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    seconds += started.elapsed().as_secs_f64();

    // The checks after the walk, once every server is walked. If they fail, the checkpoint records the walk
    // as done, so a resume runs only them.
    let mut findings = StreamFindings::default();
    let mut settings = Vec::new();
    if failure.is_none() && nodes.iter().all(|n| n.done) {
        match check_streams(&policy, &tally, &mut conns, &mut findings).await {
            Ok(()) => {
                for info in &infos {
                    settings.extend(checks::check_settings(&policy, info));
                }
            }
            Err(e) => failure = Some(e.context("the checks after the walk failed")),
        }
    }
    let complete = failure.is_none() && nodes.iter().all(|n| n.done);
    // Saved whenever the audit did not finish (a signal, --limit-keys, an error): what was counted is kept.
    let mut token = None;
    if complete {
        resume.remove();
    } else {
        match resume.save(tally.keys_seen, None, || Checkpoint {
            format: 1,
            env: policy.env().to_owned(),
            app: policy.app().to_owned(),
            nodes,
            tally: tally.clone(),
            seconds,
            commands,
            backoffs,
        }) {
            Ok(()) => token = Some(resume.token().to_owned()),
            Err(e) => {
                failure = Some(match failure {
                    Some(walk) => anyhow!(
                        "{}; and {}",
                        crate::error::one_line(&walk),
                        crate::error::one_line(&e)
                    ),
                    None => e,
                });
            }
        }
    }
    let report = report::build(
        &policy,
        &tally,
        infos,
        ScanStats {
            keys_scanned: tally.keys_seen,
            commands,
            seconds,
            backoffs,
            max_ops_per_sec: args.max_ops_per_sec,
        },
        findings,
        settings,
        complete,
        token.clone(),
    );
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        text.push('\n');
        text.into_bytes()
    } else {
        let mut text = Vec::new();
        report::write_table(&report, &mut text).context("cannot format the report")?;
        text
    };
    // Printed on every exit after the walk started, an error's included: what was counted, and the token.
    crate::error::print_stdout(&text)?;
    if let Some(e) = failure {
        return Err(match token {
            Some(token) => e.context(format!(
                "the audit stopped (the report above is partial; resume by running the same command with --resume {token})"
            )),
            None => e.context("the audit stopped (the report above is partial)"),
        });
    }
    Ok(if !complete {
        ExitCode::from(EXIT_INCOMPLETE)
    } else if report.violations.total > 0 {
        ExitCode::from(EXIT_VIOLATIONS)
    } else {
        ExitCode::SUCCESS
    })
}

/// The stream checks, on every stream the walk met.
async fn check_streams(
    policy: &Policy,
    tally: &Tally,
    conns: &mut [redis::aio::MultiplexedConnection],
    findings: &mut StreamFindings,
) -> anyhow::Result<()> {
    let mut streams = tally.streams.clone();
    streams.sort();
    streams.dedup();
    for seen in &streams {
        let key = base64::engine::general_purpose::STANDARD
            .decode(&seen.key_b64)
            .context("checkpoint holds a bad stream key")?;
        let conn = conns
            .get_mut(seen.node)
            .ok_or_else(|| anyhow!("checkpoint names an unknown server"))?;
        checks::check_stream(policy, conn, seen, &key, findings).await?;
    }
    Ok(())
}

/// Walks one server until it is done, `stop` is set, or `limit` keys were examined in this run.
async fn walk_node(
    node: usize,
    mut walker: NodeWalk,
    policy: Arc<Policy>,
    tx: tokio::sync::mpsc::Sender<Msg>,
    stop: Arc<AtomicBool>,
    examined: Arc<AtomicU64>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let result =
        walk_node_until_stopped(node, &mut walker, &policy, &tx, &stop, &examined, limit).await;
    if result.is_err() {
        // One server failed: stop the others too, so the checkpoint is written and the token printed soon.
        stop.store(true, Ordering::Relaxed);
    }
    result
}

async fn walk_node_until_stopped(
    node: usize,
    walker: &mut NodeWalk,
    policy: &Policy,
    tx: &tokio::sync::mpsc::Sender<Msg>,
    stop: &AtomicBool,
    examined: &AtomicU64,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    loop {
        if stop.load(Ordering::Relaxed)
            || limit.is_some_and(|l| examined.load(Ordering::Relaxed) >= l)
        {
            return Ok(());
        }
        let before = (walker.commands, walker.pacer.backoffs);
        let Some(batch) = walker.next_batch().await? else {
            return Ok(());
        };
        let probes: Vec<_> = batch
            .keys
            .iter()
            .map(|facts| tally::size_probe(policy, facts))
            .collect();
        let mut sizes = vec![None; batch.keys.len()];
        if probes.iter().any(Option::is_some) {
            let mut pipe = redis::pipe();
            let mut asked = Vec::new();
            for (i, probe) in probes.iter().enumerate() {
                if let Some((cmd, field, _)) = probe {
                    let mut c = redis::cmd(cmd);
                    c.arg(&batch.keys[i].key);
                    if let Some(f) = field {
                        c.arg(*f);
                    }
                    pipe.add_command(c);
                    asked.push(i);
                }
            }
            // A key replaced by another type since its inspection answers WRONGTYPE: it is no longer the
            // value that was measured, so it has no size to report (not an error).
            pipe.ignore_errors();
            let lens: Vec<redis::Value> = pipe
                .query_async(walker.conn())
                .await
                .context("STRLEN / HSTRLEN pipeline failed")?;
            walker.commands += asked.len() as u64;
            for (i, len) in asked.into_iter().zip(lens) {
                if let redis::Value::ServerError(e) = &len
                    && e.code() != "WRONGTYPE"
                {
                    return Err(anyhow!("STRLEN / HSTRLEN refused: {e}"));
                }
                if let (Some((_, _, limit)), redis::Value::Int(len)) = (probes[i], len)
                    && let Ok(len) = u64::try_from(len)
                    && len > limit
                {
                    sizes[i] = Some(len);
                }
            }
        }
        let msg = Msg {
            node,
            keys: batch.keys.into_iter().zip(sizes).collect(),
            resume_at: batch.resume_at,
            commands: walker.commands - before.0,
            backoffs: walker.pacer.backoffs - before.1,
        };
        let done = msg.resume_at.is_none();
        if tx.send(msg).await.is_err() || done {
            return Ok(());
        }
    }
}

/// Sets `stop` on Ctrl-C (SIGINT) or SIGTERM: the walks finish their batch, the checkpoint is saved and the
/// token printed. The handlers are installed when this is *called* (before any walk starts), not when the
/// returned future is first polled, so a signal that arrives early is not lost.
pub(crate) fn stop_on_signal(stop: Arc<AtomicBool>) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        stop.store(true, Ordering::Relaxed);
    })
}

/// A progress bar on stderr when it is a terminal: keys scanned of `DBSIZE`, rate and ETA.
pub(crate) fn progress_bar(total: u64, done: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total.max(done));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {human_pos}/{human_len} keys  {per_sec}  ETA {eta}  {wide_bar}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(done);
    pb.enable_steady_tick(Duration::from_millis(200));
    Some(pb)
}
