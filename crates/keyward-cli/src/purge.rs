//! `keyward purge`: delete an old version of a class, or keys of the namespace that no class owns — dry run
//! by default, paced, resumable, logged.
//!
//! The one decision: **a key is deleted only if [`keyward::key::classify`] puts it in the selection *and* it
//! is still, at the moment of deletion, the key the walk inspected** (`purge_unlink.lua`: same type, a TTL
//! that has only run down, the same sampled `MEMORY USAGE`). So a purge can never reach outside the policy's
//! namespace or into a current version by accident, and a key the application rewrote between the walk and
//! the delete survives — unless the rewrite kept the value's size exactly and left no fresh TTL (Redis keeps
//! no per-key version; docs/cli.md says so). Deletes use `UNLINK` (freed in the background), never a flush.
//! A confirmed purge holds a lock per class (`purge_lock.lua`, in keyward's `_kw` keys) while it runs, so two
//! purges of the same keys never delete at once; whatever happens after the walk started, the checkpoint is
//! saved before the summary is printed and before anything else (the log, the lock) can fail.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context as _, anyhow};
use clap::{ArgGroup, Args};
use keyward::key::{KeyClass, classify, glob_match};
use keyward::policy::Policy;
use serde::{Deserialize, Serialize};

use crate::audit::walk::{self, KeyFacts, NodeState, NodeWalk, ResumePoint, ServerId, Walker};
use crate::audit::{EXIT_INCOMPLETE, progress_bar, stop_on_signal};
use crate::bench::servers::Servers;
use crate::error::usage;
use crate::redis_url::UrlArg;

/// The delete-if-unchanged script (see the module docs).
const UNLINK_SCRIPT: &str = include_str!("purge_unlink.lua");
/// Sample keys shown by the dry run.
const SAMPLE: usize = 10;
/// How long the purge log stream lives after the last purge (its length bound is
/// [`checks::PURGE_LOG_MAXLEN`](crate::audit::checks::PURGE_LOG_MAXLEN), which the audit judges it by).
const LOG_TTL_MS: u64 = 90 * 86_400_000;
/// `MEMORY USAGE … SAMPLES n` for the walk, as the audit's default: never 0 (every element of every
/// aggregate, O(N) per key, blocking the server on a big hash), since a purge is paced.
const MEMORY_SAMPLES: u64 = 5;

/// Arguments of `keyward purge`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["class", "orphans"])))]
pub(crate) struct PurgeArgs {
    /// The policy file (TOML).
    #[arg(long)]
    policy: PathBuf,
    /// Purge keys of this class (with --version N of an old version, or --all-versions).
    #[arg(long)]
    class: Option<String>,
    /// The old version of --class to purge (below the class's current version).
    #[arg(long, requires = "class", conflicts_with = "all_versions")]
    version: Option<u32>,
    /// Purge every version of --class, the current one included.
    #[arg(long, requires = "class")]
    all_versions: bool,
    /// Purge keys matching this glob inside the policy's namespace that no class owns (it must start with
    /// `{env}:{app}:`).
    #[arg(long, value_name = "PATTERN")]
    orphans: Option<String>,
    /// Actually delete: repeat the class name (or the --orphans pattern). Without it, a dry run.
    #[arg(long, value_name = "NAME")]
    confirm: Option<String>,
    #[command(flatten)]
    url: UrlArg,
    /// Ceiling on the commands sent per second to each server.
    #[arg(long, default_value_t = 300_000)]
    max_ops_per_sec: u64,
    /// Keys asked of each SCAN (its COUNT).
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Continue an interrupted purge from the token it printed.
    #[arg(long, value_name = "TOKEN")]
    resume: Option<String>,
    /// Where interrupted purges keep their checkpoint (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Stop after about this many keys examined (exit status 4 with a resume token).
    #[arg(long, value_name = "N")]
    limit_keys: Option<u64>,
    /// Print one JSON document (field names in docs/cli.md) instead of the summary line.
    #[arg(long)]
    json: bool,
}

/// Which keys go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum Selection {
    Version { class: String, version: u32 },
    AllVersions { class: String },
    Orphans { pattern: String },
}

impl Selection {
    fn scan_pattern(&self, policy: &Policy) -> String {
        match self {
            Selection::Version { class, version } => {
                format!("{}:{}:{class}:v{version}:*", policy.env(), policy.app())
            }
            Selection::AllVersions { class } => {
                format!("{}:{}:{class}:v*", policy.env(), policy.app())
            }
            Selection::Orphans { pattern } => pattern.clone(),
        }
    }

    fn selects(&self, policy: &Policy, key: &[u8]) -> bool {
        match (self, classify(policy, key)) {
            (Selection::Version { class, version }, KeyClass::Class(k)) => {
                k.class().name() == class && k.version() == *version
            }
            (Selection::AllVersions { class }, KeyClass::Class(k)) => k.class().name() == class,
            (Selection::Orphans { pattern }, KeyClass::Unknown) => {
                glob_match(pattern.as_bytes(), key)
            }
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Selection::Version { class, version } => format!("class {class} v{version}"),
            Selection::AllVersions { class } => format!("class {class}, every version"),
            Selection::Orphans { pattern } => format!("orphans {pattern}"),
        }
    }
}

/// The counts of a purge (saved in its checkpoint).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Counts {
    examined: u64,
    selected: u64,
    /// `MEMORY USAGE` of the selected keys, summed.
    bytes: u64,
    deleted: u64,
    /// `MEMORY USAGE` (as the walk measured it) of the keys actually deleted, summed (absent in older
    /// checkpoints).
    #[serde(default)]
    deleted_bytes: u64,
    /// Selected, but changed (or gone) before the delete: left alone.
    skipped: u64,
    sample: Vec<String>,
}

impl Counts {
    /// Adds a batch's counts (the sample keeps its first [`SAMPLE`] keys).
    fn add(&mut self, batch: &Counts) {
        self.examined += batch.examined;
        self.selected += batch.selected;
        self.bytes += batch.bytes;
        self.deleted += batch.deleted;
        self.deleted_bytes += batch.deleted_bytes;
        self.skipped += batch.skipped;
        let room = SAMPLE.saturating_sub(self.sample.len());
        self.sample.extend(batch.sample.iter().take(room).cloned());
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    env: String,
    app: String,
    selection: Selection,
    confirmed: bool,
    nodes: Vec<NodeState>,
    counts: Counts,
    /// Seconds the runs so far walked (for the dry run's estimate); absent in older checkpoints.
    #[serde(default)]
    seconds: f64,
}

/// Checks the arguments against the policy: what to select, and whether deletion is confirmed.
fn selection(policy: &Policy, args: &PurgeArgs) -> anyhow::Result<(Selection, bool)> {
    let (sel, name) = if let Some(class) = &args.class {
        let Some(declared) = policy.class(class) else {
            usage!("--class {class}: the policy declares no such class");
        };
        let current = declared.kind().version();
        let sel = match (args.version, args.all_versions) {
            (Some(0), _) => {
                usage!("--version 0: versions start at 1, so no key of class {class} has version 0")
            }
            (Some(v), _) if v >= current => usage!(
                "--version {v}: class {class} is at v{current}; only an older version can be purged (--all-versions purges every version, the current one included)"
            ),
            (Some(version), _) => Selection::Version {
                class: class.clone(),
                version,
            },
            (None, true) => Selection::AllVersions {
                class: class.clone(),
            },
            (None, false) => usage!(
                "--class {class} is current (v{current}): select an old version with --version N (--all-versions purges every version, the current one included)"
            ),
        };
        (sel, class.clone())
    } else if let Some(pattern) = &args.orphans {
        let ns = format!("{}:{}:", policy.env(), policy.app());
        let literal: String = pattern
            .chars()
            .take_while(|c| !matches!(c, '*' | '?' | '[' | '\\'))
            .collect();
        if !literal.starts_with(&ns) {
            usage!(
                "--orphans {pattern}: refused, the pattern must start with the policy's namespace `{ns}`"
            );
        }
        (
            Selection::Orphans {
                pattern: pattern.clone(),
            },
            pattern.clone(),
        )
    } else {
        usage!("give --class NAME or --orphans PATTERN");
    };
    match &args.confirm {
        Some(c) if *c != name => usage!("--confirm {c}: it must repeat {name:?} exactly"),
        Some(_) => Ok((sel, true)),
        None => Ok((sel, false)),
    }
}

/// Runs `keyward purge`.
///
/// # Errors
/// A [`UsageError`](crate::error::UsageError) for a bad policy, selection, confirmation, URL or token; otherwise when a server cannot
/// be reached or refuses a command (the resume token is printed first).
pub(crate) fn run(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let policy = crate::policy_cmd::load(&args.policy)?;
    if args.count == 0 || args.max_ops_per_sec == 0 {
        usage!("--count and --max-ops-per-sec must be at least 1");
    }
    if args.count > walk::MAX_COUNT {
        usage!(
            "--count {}: at most {} (one SCAN walks about that many keys while the server waits)",
            args.count,
            walk::MAX_COUNT
        );
    }
    let (sel, confirmed) = selection(&policy, &args)?;
    let url = args.url.resolve();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(purge(args, Arc::new(policy), sel, confirmed, &url))
}

/// One walked batch of one server.
struct Msg {
    node: usize,
    counts: Counts,
    resume_at: Option<u64>,
    /// Whether the batch is finished (its cursor may be saved); `false` for the keys a failed delete
    /// pipeline did delete: counted, while the batch is walked again on resume.
    batch_done: bool,
}

async fn purge(
    args: PurgeArgs,
    policy: Arc<Policy>,
    sel: Selection,
    confirmed: bool,
    url: &str,
) -> anyhow::Result<ExitCode> {
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
            let resume = ResumePoint::named(Walker::Purge, &dir, token)?;
            let cp: Checkpoint = resume.load()?;
            if cp.format != 1
                || cp.env != policy.env()
                || cp.app != policy.app()
                || cp.selection != sel
                || cp.confirmed != confirmed
            {
                usage!(
                    "--resume {token}: the checkpoint is for another purge ({}{} of {}:{}); nothing was deleted",
                    if cp.confirmed {
                        "a confirmed purge"
                    } else {
                        "a dry run"
                    },
                    format_args!(", {}", cp.selection.describe()),
                    cp.env,
                    cp.app
                );
            }
            (resume, Some(cp))
        }
        None => (ResumePoint::fresh(Walker::Purge, &dir), None),
    };
    let mut conns = Vec::with_capacity(addrs.len());
    let mut ids = Vec::with_capacity(addrs.len());
    let mut total_keys = 0;
    for (addr, node_url) in &addrs {
        let label = if addr.is_empty() {
            crate::redis_url::server_label(node_url)?
        } else {
            addr.clone()
        };
        let mut conn = walk::connect(node_url).await?;
        let n: u64 = redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .with_context(|| format!("DBSIZE on {label}"))?;
        total_keys += n;
        walk::probe(
            &mut conn,
            &keyward::key::internal_key(&policy, "purges"),
            MEMORY_SAMPLES,
            confirmed,
        )
        .await
        .with_context(|| {
            format!(
                "{label} refuses a command the purge needs (renamed, or not granted to this user)"
            )
        })?;
        ids.push(
            ServerId::read(&mut conn, &label)
                .await
                .with_context(|| format!("cannot purge on {label}"))?,
        );
        conns.push(conn);
    }
    let (mut nodes, mut counts, earlier_seconds) = match saved {
        Some(cp) => {
            if let Some(why) = NodeState::mismatch(&cp.nodes, &ids) {
                usage!(
                    "--resume {}: the checkpoint is not for this server: {why}; nothing was deleted",
                    resume.token()
                );
            }
            (cp.nodes, cp.counts, cp.seconds)
        }
        None => (NodeState::start(&ids), Counts::default(), 0.0),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop_on_signal(stop.clone())?;
    let mut routed = Routed::connect(&servers, url, &conns[0]).await?;
    // A confirmed purge holds its class's lock (`purge_lock.lua`) from before its first log entry to its end,
    // renewed meanwhile: a second confirmed purge of the class is refused, having done nothing.
    let lost = Arc::new(std::sync::Mutex::new(None));
    let mut lock = None;
    if confirmed {
        let held = Arc::new(PurgeLock::new(&policy, &sel));
        let mut taken = routed.lock(&held, "take").await?;
        if let Some(dead) = taken.as_deref()
            && PurgeLock::holder_is_dead_here(dead)
        {
            eprintln!(
                "keyward purge: taking over the lock of a purge that is no longer running ({})",
                PurgeLock::holder(dead)
            );
            taken = routed.lock_over(&held, "replace", dead).await?;
        }
        if let Some(holder) = taken {
            let holder = PurgeLock::holder(&holder);
            usage!(
                "--confirm: another purge of {} is running ({holder}); nothing was deleted. Run this one when it has ended (its lock {} expires {} s after that purge stops renewing it).",
                match &sel {
                    Selection::Orphans { .. } => "orphans of this namespace".to_owned(),
                    Selection::Version { class, .. } | Selection::AllVersions { class } =>
                        format!("class {class}"),
                },
                held.key,
                LOCK_TTL.as_secs()
            );
        }
        // Logged before the first delete: a purge whose user cannot write the log stops here, having deleted
        // nothing, and a purge killed outright (SIGKILL) still leaves its trace.
        if let Err(e) = routed.log(&policy, &sel, &counts, "started").await {
            let _ = routed.lock(&held, "drop").await;
            return Err(e.context("nothing was deleted"));
        }
        let renew = tokio::spawn(keep_lock(
            routed.clone(),
            held.clone(),
            stop.clone(),
            lost.clone(),
        ));
        lock = Some((held, renew));
    }
    let progress = progress_bar(total_keys, 0);
    let examined = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(16);
    let mut tasks = tokio::task::JoinSet::new();
    let pattern = sel.scan_pattern(&policy);
    for (i, conn) in conns.iter().enumerate() {
        if nodes[i].done {
            continue;
        }
        let walker = NodeWalk::new(
            conn.clone(),
            nodes[i].cursor,
            args.count,
            MEMORY_SAMPLES,
            args.max_ops_per_sec,
        )
        .matching(pattern.clone());
        let (policy, sel, tx, stop, examined) = (
            policy.clone(),
            sel.clone(),
            tx.clone(),
            stop.clone(),
            examined.clone(),
        );
        let limit = args.limit_keys;
        tasks.spawn(async move {
            let r = purge_node(
                i, walker, &policy, &sel, confirmed, &tx, &stop, &examined, limit,
            )
            .await;
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        });
    }
    drop(tx);
    let signals = tokio::spawn(on_signal);
    let started = Instant::now();
    // `counts`: since the purge started (restored from the checkpoint when resumed); `run`: this run only.
    let mut run = Counts::default();
    while let Some(msg) = rx.recv().await {
        run.add(&msg.counts);
        counts.add(&msg.counts);
        if msg.batch_done {
            nodes[msg.node].advance(msg.resume_at);
        }
        examined.fetch_add(msg.counts.examined, Ordering::Relaxed);
        if let Some(pb) = &progress {
            pb.set_position(run.examined);
        }
    }
    signals.abort();
    let mut failure = walk::first_failure(&mut tasks, "purge").await;
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let complete = failure.is_none() && nodes.iter().all(|n| n.done);
    // Saved whenever the purge did not finish (a signal, --limit-keys, an error), before anything else can
    // fail: the keys deleted so far are counted, and the token resumes.
    let mut token = None;
    if complete {
        resume.remove();
    } else {
        let saved = resume.save(
            counts.examined,
            Some("same selection and --confirm"),
            || Checkpoint {
                format: 1,
                env: policy.env().to_owned(),
                app: policy.app().to_owned(),
                selection: sel.clone(),
                confirmed,
                nodes,
                counts: counts.clone(),
                seconds: earlier_seconds + seconds,
            },
        );
        match saved {
            Ok(()) => token = Some(resume.token().to_owned()),
            Err(e) => failure = Some(join(failure, e)),
        }
    }
    if let Some(holder) = lost
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        failure = Some(join(
            failure,
            anyhow!(
                "the purge lock expired while this purge stalled and another purge took it ({}): stopped, so the two never delete at once",
                PurgeLock::holder(&holder)
            ),
        ));
    }
    if confirmed && (counts.deleted > 0 || complete) {
        let state = if complete { "yes" } else { "no" };
        if let Err(e) = routed.log(&policy, &sel, &counts, state).await {
            failure = Some(join(failure, e));
        }
    }
    if let Some((held, renew)) = lock {
        renew.abort();
        if let Err(e) = routed.lock(&held, "drop").await {
            eprintln!(
                "keyward purge: cannot release the purge lock (it expires in {} s): {}",
                LOCK_TTL.as_secs(),
                crate::error::one_line(&e)
            );
        }
    }
    let summary = Summary::new(
        &policy,
        &sel,
        confirmed,
        complete,
        args.resume.is_some(),
        token.clone(),
        &run,
        &counts,
        seconds,
        // Walking again, plus one delete (a script call) per key, at the pace's ceiling.
        (!confirmed).then(|| {
            earlier_seconds + seconds + counts.selected as f64 / args.max_ops_per_sec as f64
        }),
    );
    let text = if args.json {
        let mut text =
            serde_json::to_string_pretty(&summary).context("cannot encode the summary")?;
        text.push('\n');
        text
    } else {
        summary.text()
    };
    // Printed on every exit after the walk started, an error's included: what was done, and the token.
    crate::error::print_stdout(text.as_bytes())?;
    if let Some(e) = failure {
        return Err(match (&token, complete) {
            (Some(token), _) => e.context(format!(
                "the purge stopped (the summary above counts what was done; resume by running the same command with --resume {token})"
            )),
            (None, true) => e.context("the purge finished (the summary above is complete)"),
            (None, false) => e.context("the purge stopped (the summary above counts what was done)"),
        });
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INCOMPLETE)
    })
}

/// Two failures as one error: the first, then the second.
fn join(first: Option<anyhow::Error>, second: anyhow::Error) -> anyhow::Error {
    match first {
        Some(first) => anyhow!(
            "{}; and {}",
            crate::error::one_line(&first),
            crate::error::one_line(&second)
        ),
        None => second,
    }
}

/// The end of a purge as printed: the summary line (and the dry run's sample), or with `--json` one
/// document with the same facts (field names in docs/cli.md, stable).
#[derive(Debug, Serialize)]
struct Summary {
    /// The format's version: 1.
    keyward_purge: u32,
    /// `env:app`, the namespace the purge acts on (after `KEYWARD_ENV` / `KEYWARD_APP`).
    namespace: String,
    dry_run: bool,
    /// `version` (`--class` with `--version`), `all_versions` or `orphans`.
    selection: &'static str,
    class: Option<String>,
    version: Option<u32>,
    /// The `--orphans` pattern.
    pattern: Option<String>,
    /// The `SCAN … MATCH` glob walked.
    scan_match: String,
    complete: bool,
    resume_token: Option<String>,
    /// Whether this run continued a stopped one (`--resume`); then `this_run` and `since_start` differ.
    resumed: bool,
    this_run: SummaryCounts,
    since_start: SummaryCounts,
    /// The first keys selected (at most 10, since the start), as `keyward audit` prints keys.
    sample_keys: Vec<String>,
    /// Dry run: the estimated wall time of the confirmed purge; `null` when confirmed.
    estimated_seconds: Option<f64>,
    /// The selection in words, for the text form.
    #[serde(skip)]
    what: String,
}

#[derive(Debug, Serialize)]
struct SummaryCounts {
    keys_examined: u64,
    /// Keys in the selection (a dry run's "would go").
    keys_matched: u64,
    /// `MEMORY USAGE` of the matched keys, summed.
    bytes: u64,
    keys_deleted: u64,
    /// `MEMORY USAGE` (as the walk measured it) of the keys deleted, summed: 0 in a dry run.
    bytes_deleted: u64,
    /// Matched, but changed (or gone) between the walk and the delete: left alone.
    keys_changed: u64,
    /// Wall time of this run (`this_run` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
}

impl SummaryCounts {
    fn new(c: &Counts, seconds: Option<f64>) -> Self {
        SummaryCounts {
            keys_examined: c.examined,
            keys_matched: c.selected,
            bytes: c.bytes,
            keys_deleted: c.deleted,
            bytes_deleted: c.deleted_bytes,
            keys_changed: c.skipped,
            seconds,
        }
    }
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    fn new(
        policy: &Policy,
        sel: &Selection,
        confirmed: bool,
        complete: bool,
        resumed: bool,
        resume_token: Option<String>,
        run: &Counts,
        total: &Counts,
        seconds: f64,
        estimated_seconds: Option<f64>,
    ) -> Self {
        let (selection, class, version, pattern) = match sel {
            Selection::Version { class, version } => {
                ("version", Some(class.clone()), Some(*version), None)
            }
            Selection::AllVersions { class } => ("all_versions", Some(class.clone()), None, None),
            Selection::Orphans { pattern } => ("orphans", None, None, Some(pattern.clone())),
        };
        Summary {
            keyward_purge: 1,
            namespace: format!("{}:{}", policy.env(), policy.app()),
            dry_run: !confirmed,
            selection,
            class,
            version,
            pattern,
            scan_match: sel.scan_pattern(policy),
            complete,
            resume_token,
            resumed,
            this_run: SummaryCounts::new(run, Some(seconds)),
            since_start: SummaryCounts::new(total, None),
            sample_keys: total.sample.clone(),
            estimated_seconds,
            what: sel.describe(),
        }
    }

    /// The readable form: one line (a resumed purge says what this run did and what the purge did since its
    /// start), then the dry run's sample keys.
    fn text(&self) -> String {
        let (run, total) = (&self.this_run, &self.since_start);
        let incomplete = if self.complete { "" } else { " — INCOMPLETE" };
        let seconds = run.seconds.unwrap_or_default();
        let what = format!("{} in namespace {}", self.what, self.namespace);
        let keys = |n: u64| crate::words::count(n, "key");
        let bytes = |n: u64| crate::words::count(n, "byte");
        let changed = |n: u64| {
            format!(
                "{} changed since the walk and {} left alone",
                n,
                if n == 1 { "was" } else { "were" }
            )
        };
        if !self.dry_run {
            let mut t = format!(
                "purge {what}: deleted {} ({}); {}; {seconds:.1}s{incomplete}\n",
                keys(run.keys_deleted),
                bytes(run.bytes_deleted),
                changed(run.keys_changed),
            );
            if self.resumed {
                t.push_str(&format!(
                    "  resumed: since the purge started, {} deleted ({}), {} left alone as changed\n",
                    keys(total.keys_deleted),
                    bytes(total.bytes_deleted),
                    total.keys_changed
                ));
            }
            return t;
        }
        let mut t = format!(
            "DRY RUN — nothing deleted. purge {what}: {}, {} would go (of {} examined); estimated time with --confirm: {:.1}s{incomplete}\n",
            keys(total.keys_matched),
            bytes(total.bytes),
            total.keys_examined,
            self.estimated_seconds.unwrap_or_default(),
        );
        if self.resumed {
            t.push_str(&format!(
                "  resumed: this run examined {} and matched {} ({}); the counts above are since the start\n",
                keys(run.keys_examined),
                run.keys_matched,
                bytes(run.bytes)
            ));
        }
        for key in &self.sample_keys {
            t.push_str(&format!("  {key}\n"));
        }
        t
    }
}

/// Walks one server: selects keys, and with `confirmed` deletes each that is unchanged since the walk.
#[allow(clippy::too_many_arguments)]
async fn purge_node(
    node: usize,
    mut walker: NodeWalk,
    policy: &Policy,
    sel: &Selection,
    confirmed: bool,
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
        let Some(batch) = walker.next_batch().await? else {
            return Ok(());
        };
        let mut counts = Counts {
            examined: batch.keys.len() as u64,
            ..Counts::default()
        };
        let chosen: Vec<&KeyFacts> = batch
            .keys
            .iter()
            .filter(|f| sel.selects(policy, &f.key))
            .collect();
        counts.selected = chosen.len() as u64;
        counts.bytes = chosen.iter().map(|f| f.memory).sum();
        counts.sample = chosen
            .iter()
            .take(SAMPLE)
            .map(|f| crate::audit::display_key(&f.key))
            .collect();
        if confirmed && !chosen.is_empty() {
            let (deleted, refused) = unlink_unchanged(walker.conn(), &chosen).await?;
            let gone: Vec<&&KeyFacts> = chosen
                .iter()
                .zip(&deleted)
                .filter_map(|(f, d)| d.then_some(f))
                .collect();
            counts.deleted = gone.len() as u64;
            counts.deleted_bytes = gone.iter().map(|f| f.memory).sum();
            if let Some(refused) = refused {
                // Count what this batch did delete (those keys are gone, a resume cannot meet them), and
                // leave the batch's cursor unsaved so a resume walks its other keys again.
                let partial = Counts {
                    examined: counts.deleted,
                    selected: counts.deleted,
                    bytes: counts.deleted_bytes,
                    deleted: counts.deleted,
                    deleted_bytes: counts.deleted_bytes,
                    ..Counts::default()
                };
                let _ = tx
                    .send(Msg {
                        node,
                        counts: partial,
                        resume_at: batch.resume_at,
                        batch_done: false,
                    })
                    .await;
                return Err(refused);
            }
            counts.skipped = counts.selected - counts.deleted;
        }
        let done = batch.resume_at.is_none();
        let msg = Msg {
            node,
            counts,
            resume_at: batch.resume_at,
            batch_done: true,
        };
        if tx.send(msg).await.is_err() || done {
            return Ok(());
        }
    }
}

/// Deletes each key that is still what the walk saw (`purge_unlink.lua`): whether each was deleted, and,
/// when the server refused the script for some keys, one error saying so with how many (not one per key).
///
/// # Errors
/// When the pipeline as a whole fails (the connection broke): which of its keys were deleted is unknown.
async fn unlink_unchanged(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[&KeyFacts],
) -> anyhow::Result<(Vec<bool>, Option<anyhow::Error>)> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for f in keys {
        pipe.cmd("EVAL")
            .arg(UNLINK_SCRIPT)
            .arg(1)
            .arg(&f.key)
            .arg(&f.kind)
            .arg(f.pttl_ms)
            .arg(f.memory)
            .arg(MEMORY_SAMPLES);
    }
    let replies: Vec<redis::Value> = pipe
        .query_async(conn)
        .await
        .context("the delete pipeline failed")?;
    let mut refused: Vec<(String, u64)> = Vec::new();
    let deleted = replies
        .iter()
        .map(|r| match r {
            redis::Value::Int(n) => *n > 0,
            other => {
                let why = match other {
                    redis::Value::ServerError(e) => e.to_string(),
                    other => format!("unexpected reply {other:?}"),
                };
                match refused.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, n)) => *n += 1,
                    None => refused.push((why, 1)),
                }
                false
            }
        })
        .collect();
    let refused = (!refused.is_empty()).then(|| {
        let reasons: Vec<String> = refused
            .iter()
            .map(|(why, n)| format!("{} ({})", why, crate::words::count(*n, "key")))
            .collect();
        anyhow!(
            "the server refused the delete script for {} of {}: {}",
            refused.iter().map(|(_, n)| n).sum::<u64>(),
            crate::words::count(keys.len() as u64, "key"),
            reasons.join("; ")
        )
    });
    Ok((deleted, refused))
}

/// A connection for keyward's own keys of the namespace (the purge log, the purge lock): the server itself,
/// or on a Cluster the Cluster client, which routes each key to the primary of its slot.
#[derive(Clone)]
enum Routed {
    Plain(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Routed {
    /// `conn` (the first server's) for a standalone server; a Cluster connection from the URL's seeds.
    async fn connect(
        servers: &Servers,
        url: &str,
        conn: &redis::aio::MultiplexedConnection,
    ) -> anyhow::Result<Self> {
        if !servers.is_cluster() {
            return Ok(Routed::Plain(conn.clone()));
        }
        let seeds = crate::bench::servers::cluster_seeds(url)?.unwrap_or_default();
        let client = redis::cluster::ClusterClient::new(
            seeds.iter().map(|s| s.url.as_str()).collect::<Vec<_>>(),
        )
        .map_err(|e| anyhow!("invalid Cluster URL: {e}"))?;
        let conn = client.get_async_connection().await.map_err(|e| {
            anyhow!("cannot connect to the Cluster for the purge log and lock: {e}")
        })?;
        Ok(Routed::Cluster(conn))
    }

    /// Appends the purge to `{env}:{app}:_kw:purges` (at most 1000 entries, the stream expiring 90 days after
    /// the last purge): who ($USER@host), what, how many, the bytes deleted, `complete` (`started` before the
    /// first delete, then `yes` or `no`), when (the server's time is the entry id).
    async fn log(
        &mut self,
        policy: &Policy,
        sel: &Selection,
        counts: &Counts,
        state: &str,
    ) -> anyhow::Result<()> {
        match self {
            Routed::Plain(c) => append_log(policy, c, sel, counts, state).await,
            Routed::Cluster(c) => append_log(policy, c, sel, counts, state).await,
        }
    }

    /// Runs `purge_lock.lua` in `mode` (`take`, `keep`, `drop`) on `lock`: `None` when this purge holds (or
    /// dropped) it, else the holder's value.
    async fn lock(&mut self, lock: &PurgeLock, mode: &str) -> anyhow::Result<Option<String>> {
        self.lock_over(lock, mode, "").await
    }

    /// [`lock`](Self::lock) with the value of a dead holder to replace (`mode` `replace`).
    async fn lock_over(
        &mut self,
        lock: &PurgeLock,
        mode: &str,
        dead: &str,
    ) -> anyhow::Result<Option<String>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LOCK_SCRIPT)
            .arg(1)
            .arg(&lock.key)
            .arg(&lock.value)
            .arg(LOCK_TTL.as_millis() as u64)
            .arg(mode)
            .arg(dead);
        let reply: String = match self {
            Routed::Plain(c) => cmd.query_async(c).await,
            Routed::Cluster(c) => cmd.query_async(c).await,
        }
        .with_context(|| format!("the purge lock {}", lock.key))?;
        Ok((reply != "ok").then_some(reply))
    }
}

/// The lock script (see its header).
const LOCK_SCRIPT: &str = include_str!("purge_lock.lua");
/// How long the purge lock outlives its last renewal: a purge killed outright blocks the next one at most
/// this long.
const LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a running purge renews its lock.
const LOCK_RENEW: std::time::Duration = std::time::Duration::from_secs(15);

/// The lock a confirmed purge holds while it runs: `{env}:{app}:_kw:purging:class:{name}` for a class (every
/// version of it), `…:purging:orphans` for orphan purges (patterns may overlap, so they take turns).
struct PurgeLock {
    key: String,
    /// A random token, then who holds it, its pid and since when (shown to a purge that is refused).
    value: String,
}

impl PurgeLock {
    /// A lock's value without its token: who holds it, pid, since when, what.
    fn holder(value: &str) -> &str {
        value.split_once(' ').map_or(value, |(_, who)| who)
    }

    /// Whether the lock `value` was taken by a process of this host that is no longer running (a purge
    /// killed outright): then a new purge may take the lock over at once instead of waiting for its TTL.
    /// Only on Linux (`/proc`); a holder on another host always counts as alive.
    fn holder_is_dead_here(value: &str) -> bool {
        let holder = Self::holder(value);
        let Some((who, rest)) = holder.split_once(" (pid ") else {
            return false;
        };
        let Some(pid) = rest.split(',').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        let proc = std::path::Path::new("/proc");
        who == who_am_i()
            && pid != std::process::id()
            && proc.join("self").exists()
            && !proc.join(pid.to_string()).exists()
    }

    fn new(policy: &Policy, sel: &Selection) -> Self {
        let name = match sel {
            Selection::Version { class, .. } | Selection::AllVersions { class } => {
                format!("purging:class:{class}")
            }
            Selection::Orphans { .. } => "purging:orphans".to_owned(),
        };
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PurgeLock {
            key: keyward::key::internal_key(policy, &name),
            value: format!(
                "{:016x} {} (pid {}, since unix {since}: {})",
                rand::random::<u64>(),
                who_am_i(),
                std::process::id(),
                sel.describe()
            ),
        }
    }
}

/// Renews `lock` every [`LOCK_RENEW`] (taking it again if it expired while this process stalled and nobody
/// took it). If another purge holds it now, records the holder in `lost` and sets `stop`: the walk ends after
/// its batch, so two purges never delete at once.
async fn keep_lock(
    mut routed: Routed,
    lock: Arc<PurgeLock>,
    stop: Arc<AtomicBool>,
    lost: Arc<std::sync::Mutex<Option<String>>>,
) {
    loop {
        tokio::time::sleep(LOCK_RENEW).await;
        match routed.lock(&lock, "keep").await {
            Ok(None) => {}
            Ok(Some(holder)) => {
                *lost
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(holder);
                stop.store(true, Ordering::Relaxed);
                return;
            }
            // A blip: try again at the next renewal (the lock lives four renewals).
            Err(e) => eprintln!(
                "keyward purge: cannot renew the purge lock: {}",
                crate::error::one_line(&e)
            ),
        }
    }
}

/// `$USER@host` of this process.
fn who_am_i() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    // `HOSTNAME` is a shell variable that most shells do not export: fall back to the kernel's host name.
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

async fn append_log(
    policy: &Policy,
    conn: &mut impl redis::aio::ConnectionLike,
    sel: &Selection,
    counts: &Counts,
    state: &str,
) -> anyhow::Result<()> {
    let key = keyward::key::internal_key(policy, "purges");
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&key)
        .arg("MAXLEN")
        .arg("~")
        .arg(crate::audit::checks::PURGE_LOG_MAXLEN)
        .arg("*")
        .arg("who")
        .arg(who_am_i())
        .arg("what")
        .arg(sel.describe())
        .arg("deleted")
        .arg(counts.deleted)
        .arg("bytes")
        .arg(counts.deleted_bytes)
        .arg("skipped")
        .arg(counts.skipped)
        .arg("complete")
        .arg(state)
        .ignore();
    pipe.cmd("PEXPIRE").arg(&key).arg(LOG_TTL_MS).ignore();
    pipe.query_async::<()>(conn)
        .await
        .context("cannot log the purge")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_rewritten_after_the_walk_survives_and_an_untouched_one_goes() {
        let server = keyward_testkit::RedisServer::spawn();
        let mut sync = server.connection();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut conn = walk::connect(&server.url()).await.unwrap();
            let mut facts = Vec::new();
            for (key, px) in [("old", 100_000), ("rewritten", 100_000), ("forever", -1)] {
                let mut set = redis::cmd("SET");
                set.arg(key).arg("v");
                if px > 0 {
                    set.arg("PX").arg(px);
                }
                set.query::<()>(&mut sync).unwrap();
                let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut sync).unwrap();
                facts.push(KeyFacts {
                    key: key.as_bytes().to_vec(),
                    kind: "string".to_owned(),
                    pttl_ms: pttl,
                    memory: 0,
                });
            }
            // The application rewrites one key after the walk saw it, and gives the key without TTL one.
            redis::cmd("SET")
                .arg("rewritten")
                .arg("new")
                .arg("PX")
                .arg(200_000)
                .query::<()>(&mut sync)
                .unwrap();
            redis::cmd("SET")
                .arg("forever")
                .arg("new")
                .arg("PX")
                .arg(50_000)
                .query::<()>(&mut sync)
                .unwrap();
            let chosen: Vec<&KeyFacts> = facts.iter().collect();
            let (deleted, refused) = unlink_unchanged(&mut conn, &chosen).await.unwrap();
            assert!(refused.is_none());
            assert_eq!(deleted, [true, false, false]);
        });
        let exists = |k: &str| -> bool {
            redis::cmd("EXISTS")
                .arg(k)
                .query::<i64>(&mut server.connection())
                .unwrap()
                == 1
        };
        assert!(!exists("old"));
        assert!(exists("rewritten"));
        assert!(exists("forever"));
        let value: String = redis::cmd("GET").arg("rewritten").query(&mut sync).unwrap();
        assert_eq!(value, "new");
    }

    /// A rewrite that keeps the type and no TTL (or `SET … KEEPTTL`) leaves the TTL check blind; the value's
    /// size (`MEMORY USAGE`, as the walk measured it) catches it when the size changed.
    #[test]
    fn a_key_rewritten_without_a_ttl_or_with_keepttl_survives() {
        let server = keyward_testkit::RedisServer::spawn();
        let mut sync = server.connection();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut facts = Vec::new();
        for (key, px) in [
            ("untouched", None),
            ("no_ttl", None),
            ("keepttl", Some(100_000)),
        ] {
            let mut set = redis::cmd("SET");
            set.arg(key).arg("v");
            if let Some(px) = px {
                set.arg("PX").arg(px);
            }
            set.query::<()>(&mut sync).unwrap();
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut sync).unwrap();
            let memory: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(MEMORY_SAMPLES)
                .query(&mut sync)
                .unwrap();
            facts.push(KeyFacts {
                key: key.as_bytes().to_vec(),
                kind: "string".to_owned(),
                pttl_ms: pttl,
                memory,
            });
        }
        let new_value = "a new value, rewritten by the application after the walk".repeat(4);
        redis::cmd("SET")
            .arg("no_ttl")
            .arg(&new_value)
            .query::<()>(&mut sync)
            .unwrap();
        redis::cmd("SET")
            .arg("keepttl")
            .arg(&new_value)
            .arg("KEEPTTL")
            .query::<()>(&mut sync)
            .unwrap();
        let deleted = runtime.block_on(async {
            let mut conn = walk::connect(&server.url()).await.unwrap();
            let chosen: Vec<&KeyFacts> = facts.iter().collect();
            unlink_unchanged(&mut conn, &chosen).await.unwrap().0
        });
        assert_eq!(deleted, [true, false, false]);
        let exists = |k: &str| -> bool {
            redis::cmd("EXISTS")
                .arg(k)
                .query::<i64>(&mut server.connection())
                .unwrap()
                == 1
        };
        assert!(!exists("untouched"));
        for key in ["no_ttl", "keepttl"] {
            let value: String = redis::cmd("GET").arg(key).query(&mut sync).unwrap();
            assert_eq!(value, new_value, "{key} was deleted");
        }
    }

    #[test]
    fn selections_refuse_current_versions_and_foreign_patterns() {
        let policy = Policy::from_toml_str(
            "[namespace]\nenv = \"prod\"\napp = \"shop\"\n[classes.pl]\nkind = \"cache\"\nttl = \"1m\"\nversion = 2\ninvalidation = \"x\"\n",
        )
        .unwrap();
        let args = |class: Option<&str>,
                    version: Option<u32>,
                    all: bool,
                    orphans: Option<&str>,
                    confirm: Option<&str>| PurgeArgs {
            policy: PathBuf::new(),
            class: class.map(str::to_owned),
            version,
            all_versions: all,
            orphans: orphans.map(str::to_owned),
            confirm: confirm.map(str::to_owned),
            url: UrlArg::default(),
            max_ops_per_sec: 1,
            count: 1,
            resume: None,
            checkpoint_dir: None,
            limit_keys: None,
            json: false,
        };
        let err = |a: PurgeArgs| selection(&policy, &a).unwrap_err().to_string();
        assert!(err(args(Some("pl"), None, false, None, None)).contains("current"));
        assert!(err(args(Some("pl"), Some(2), false, None, None)).contains("older version"));
        assert!(err(args(Some("nope"), Some(1), false, None, None)).contains("no such class"));
        assert!(err(args(None, None, false, Some("prod:*"), None)).contains("namespace"));
        assert!(err(args(None, None, false, Some("*"), None)).contains("namespace"));
        assert!(err(args(Some("pl"), Some(1), false, None, Some("other"))).contains("--confirm"));
        let (sel, yes) =
            selection(&policy, &args(Some("pl"), Some(1), false, None, Some("pl"))).unwrap();
        assert!(yes);
        assert!(sel.selects(&policy, b"prod:shop:pl:v1:{a}"));
        assert!(!sel.selects(&policy, b"prod:shop:pl:v2:{a}"));
        assert!(!sel.selects(&policy, b"prod:shop:pl:v1:handmade"));
        let (orphans, yes) =
            selection(&policy, &args(None, None, false, Some("prod:shop:*"), None)).unwrap();
        assert!(!yes);
        assert!(orphans.selects(&policy, b"prod:shop:pl:v1:handmade"));
        assert!(!orphans.selects(&policy, b"prod:shop:pl:v1:{a}"));
        assert!(!orphans.selects(&policy, b"prod:shop:_kw:gens"));
        assert!(!orphans.selects(&policy, b"other:thing"));
    }
}
