//! `keyward invalidate` and `keyward dead-letters`: the library's O(1) invalidations and its dead-letter
//! replay, from the shell, against a live Redis.
//!
//! **The one decision to know:** a command that changes something is a dry run unless `--confirm NAME`
//! repeats the class it acts on, so a command pasted from a runbook into the wrong terminal only prints
//! what it would do. Every change goes through the library's own calls (`Cache::invalidate`,
//! `Keyward::invalidate_tag`, `Stream::replay_dead_letters`…), so the CLI keeps the library's guarantees:
//! an invalidation fences in-flight fills and reaches every instance's in-process tier; a replay moves each
//! dead letter in one script, never leaving it in both places or in none.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use keyward::Keyward;
use keyward::policy::{ClassKind, Policy};
use keyward::stream::DeadLetter;
use serde_json::{Value, json};

use crate::error::{UsageError, usage};
use crate::redis_url::UrlArg;

/// Where to act: the policy file that declares the classes, and the Redis to act on.
#[derive(Debug, Args)]
pub(crate) struct Target {
    /// The policy file (TOML) whose namespace and classes the command acts on.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    url: UrlArg,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// `keyward invalidate`.
#[derive(Debug, Args)]
pub(crate) struct InvalidateArgs {
    #[command(flatten)]
    target: Target,
    /// The cache class (not needed to invalidate tags alone: tags span every cache class of the namespace).
    #[arg(long, required_unless_present = "tags")]
    class: Option<String>,
    /// An entry's id as it appears in its key between the braces: parts joined by `:`, each part
    /// percent-escaped as keyward writes it (`acme:42`; a literal `:` inside a part is `%3A`). Repeatable.
    #[arg(long = "id", value_name = "ID", requires = "class")]
    ids: Vec<String>,
    /// A tag (dependency set) whose entries are invalidated, in every cache class of the namespace.
    /// Repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Expire rather than remove the tags' entries: the old values stay usable as the fail-safe fallback of
    /// a class with `stale_grace` (only with `--tag`).
    #[arg(long)]
    expire: bool,
    /// Act (repeat the class name; with --tag alone, the namespace `env:app`, which the tags span); without it,
    /// only print what would be invalidated.
    #[arg(long, value_name = "CLASS|NAMESPACE")]
    confirm: Option<String>,
}

/// `keyward dead-letters`.
#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// List the oldest dead letters of a stream class: original id, group, deliveries, last error, event.
    List {
        #[command(flatten)]
        target: Target,
        /// The stream class.
        stream: String,
        /// At most this many (1–10,000).
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Move dead letters back into their stream for another round of deliveries (a dry run unless
    /// `--confirm STREAM`).
    Replay {
        #[command(flatten)]
        target: Target,
        /// The stream class.
        stream: String,
        #[command(flatten)]
        filter: Filter,
        /// Consider at most the oldest this many dead letters (1–10,000).
        #[arg(long, default_value_t = 1000)]
        max: usize,
        /// Act (repeat the stream class); without it, only print what would be replayed.
        #[arg(long, value_name = "STREAM")]
        confirm: Option<String>,
    },
}

/// Which dead letters a replay takes; all of them when no filter is given.
#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Only those the consumer group GROUP gave up on.
    #[arg(long)]
    group: Option<String>,
    /// Only those whose last error contains TEXT.
    #[arg(long, value_name = "TEXT")]
    error_contains: Option<String>,
    /// Only the entry with this original stream id (`ms-seq`; `ms` alone is `ms-0`). Repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
}

impl Filter {
    /// Refuses an `--id` that is not a stream id (`ms-seq`): it could match nothing, and a typo must not
    /// read as "no such dead letter".
    fn check(&self) -> anyhow::Result<()> {
        for id in &self.ids {
            if id.parse::<keyward::stream::EntryId>().is_err() {
                usage!("--id {id:?}: not a stream entry id (`<ms>-<seq>`, e.g. 1700000000000-0)");
            }
        }
        Ok(())
    }

    fn accepts(&self, d: &DeadLetter) -> bool {
        self.group.as_ref().is_none_or(|g| *g == d.group)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|t| d.error.contains(t.as_str()))
            && (self.ids.is_empty()
                || self.ids.iter().any(|i| {
                    i.parse::<keyward::stream::EntryId>()
                        .is_ok_and(|i| i == d.id)
                }))
    }
}

pub(crate) fn invalidate(args: InvalidateArgs) -> anyhow::Result<()> {
    let policy = load(&args.target)?;
    if let Some(class) = &args.class {
        match policy.class(class).map(|c| c.kind()) {
            None => usage!(
                "{}: no class `{class}` in the policy",
                args.target.policy.display()
            ),
            Some(ClassKind::Cache(_)) => {}
            Some(other) => usage!(
                "class `{class}` is a {} class; only cache classes are invalidated",
                other.name()
            ),
        }
    }
    if args.expire && args.tags.is_empty() {
        usage!("--expire applies to tags: give --tag");
    }
    let ids = args
        .ids
        .iter()
        .map(|id| parse_id(id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let namespace = namespace(&policy);
    // What --confirm repeats: the class acted on, or for tags alone the namespace they span.
    let confirm_name = args.class.clone().unwrap_or_else(|| namespace.clone());
    let act = confirmed(args.confirm.as_deref(), &confirm_name)?;
    let what = if ids.is_empty() && args.tags.is_empty() {
        vec![format!(
            "every entry of class `{}` (the class epoch is bumped: O(1), no key is walked)",
            confirm_name
        )]
    } else {
        let verb = if args.expire { "expire" } else { "remove" };
        ids.iter()
            .map(|parts| format!("entry {} of class `{}`", parts.join(":"), confirm_name))
            .chain(args.tags.iter().map(|t| {
                format!("{verb} tag `{t}` (its entries in every cache class of the namespace)")
            }))
            .collect()
    };
    let url = args.target.url.resolve();
    runtime()?.block_on(async {
        let kw = connect(&url, policy).await?;
        if act {
            if let Some(class) = &args.class {
                let cache = kw.cache::<Value>(class)?;
                if ids.is_empty() && args.tags.is_empty() {
                    cache.invalidate_all().await?;
                }
                for parts in &ids {
                    cache.invalidate(parts).await?;
                }
            }
            for tag in &args.tags {
                if args.expire {
                    kw.expire_tag(tag).await?;
                } else {
                    kw.invalidate_tag(tag).await?;
                }
            }
        } else {
            // A dry run still connects, so a wrong URL or a missing grant shows now, not at --confirm.
            kw.ping().await?;
        }
        anyhow::Ok(())
    })?;
    let doc = json!({
        "namespace": namespace,
        "dry_run": !act,
        "class": args.class,
        "invalidated": what,
    });
    print(&args.target, &doc, || {
        let mut text = if act {
            format!("invalidated in namespace {namespace}:\n")
        } else {
            format!(
                "dry run (nothing changed; add --confirm {confirm_name} to act), would invalidate in \
                 namespace {namespace}:\n"
            )
        };
        for w in &what {
            text.push_str(&format!("  {w}\n"));
        }
        text
    })
}

pub(crate) fn dead_letters(command: DeadLettersCommand) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List {
            target,
            stream,
            max,
        } => {
            check_max(max)?;
            let policy = stream_policy(&target, &stream)?;
            let namespace = namespace(&policy);
            let url = target.url.resolve();
            let letters = runtime()?.block_on(async {
                let kw = connect(&url, policy).await?;
                anyhow::Ok(kw.stream::<Value>(&stream)?.dead_letters(max).await?)
            })?;
            let doc = json!({
                "namespace": namespace,
                "stream": stream,
                "dead_letters": letters.iter().map(letter_json).collect::<Vec<_>>(),
            });
            print(&target, &doc, || {
                let n = letters.len() as u64;
                let head = format!(
                    "{} of `{stream}` in namespace {namespace}{}\n",
                    crate::words::count(n, "dead letter"),
                    if n == 0 { "" } else { ":" }
                );
                letters_table(&letters, head)
            })
        }
        DeadLettersCommand::Replay {
            target,
            stream,
            filter,
            max,
            confirm,
        } => {
            check_max(max)?;
            filter.check()?;
            let policy = stream_policy(&target, &stream)?;
            let namespace = namespace(&policy);
            let act = confirmed(confirm.as_deref(), &stream)?;
            let url = target.url.resolve();
            let moved = runtime()?.block_on(async {
                let kw = connect(&url, policy).await?;
                let s = kw.stream::<Value>(&stream)?;
                anyhow::Ok(
                    s.replay_dead_letters(|d| filter.accepts(d), max, !act)
                        .await?,
                )
            })?;
            let doc = json!({
                "namespace": namespace,
                "stream": stream,
                "dry_run": !act,
                "replayed": moved.iter().map(|(d, new)| {
                    let mut v = letter_json(d);
                    v["new_id"] = new.map_or(Value::Null, |n| Value::String(n.to_string()));
                    v
                }).collect::<Vec<_>>(),
            });
            print(&target, &doc, || {
                let letters: Vec<DeadLetter> = moved.iter().map(|(d, _)| d.clone()).collect();
                let n = moved.len() as u64;
                let colon = if n == 0 { "" } else { ":" };
                let head = if act {
                    format!(
                        "replayed {} into `{stream}` in namespace {namespace}{colon}\n",
                        crate::words::count(n, "dead letter")
                    )
                } else {
                    format!(
                        "dry run (nothing changed; add --confirm {stream} to act): would replay {} \
                         into `{stream}` in namespace {namespace}{colon}\n",
                        crate::words::count(n, "dead letter")
                    )
                };
                letters_table(&letters, head)
            })
        }
    }
}

fn letter_json(d: &DeadLetter) -> Value {
    json!({
        "dead_id": d.dead_id.to_string(),
        "id": d.id.to_string(),
        "origin": d.origin.map(|o| o.to_string()),
        "group": d.group,
        "deliveries": d.deliveries,
        "error": d.error,
        "event": String::from_utf8_lossy(&d.payload),
    })
}

fn letters_table(letters: &[DeadLetter], head: String) -> String {
    let mut text = head;
    for d in letters {
        // Group and error come from consumers (an error may quote the event): control characters are
        // written `\xNN`, so a letter cannot drive the operator's terminal or forge a line of the table.
        // A replayed letter also names the id its event was first published under.
        let origin = d
            .origin
            .map(|o| format!(" (first published as {o})"))
            .unwrap_or_default();
        text.push_str(&format!(
            "  {}{origin}  group {}  {}  error: {}\n",
            d.id,
            crate::audit::display_key(d.group.as_bytes()),
            crate::words::count_of(d.deliveries, "delivery", "deliveries"),
            crate::audit::display_key(d.error.as_bytes())
        ));
    }
    text
}

fn check_max(max: usize) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&max) {
        usage!("--max must be between 1 and 10000, not {max}");
    }
    Ok(())
}

/// Whether to act: `--confirm` absent is a dry run; present, it must repeat `name` exactly.
fn confirmed(confirm: Option<&str>, name: &str) -> anyhow::Result<bool> {
    match confirm {
        None => Ok(false),
        Some(c) if c == name => Ok(true),
        Some(c) => usage!("--confirm {c} does not repeat `{name}`; nothing was changed"),
    }
}

/// `env:app`, the namespace a command acts on (after `KEYWARD_ENV` / `KEYWARD_APP`), which its output names.
fn namespace(policy: &Policy) -> String {
    format!("{}:{}", policy.env(), policy.app())
}

fn load(target: &Target) -> anyhow::Result<Policy> {
    Ok(crate::policy_cmd::load(&target.policy)?)
}

fn stream_policy(target: &Target, stream: &str) -> anyhow::Result<Policy> {
    let policy = load(target)?;
    match policy.class(stream).map(|c| c.kind()) {
        None => usage!(
            "{}: no class `{stream}` in the policy",
            target.policy.display()
        ),
        Some(ClassKind::Stream(_)) => Ok(policy),
        Some(other) => usage!("class `{stream}` is a {} class, not a stream", other.name()),
    }
}

/// The id parts of `id` as it appears in a key: split at `:`, each part unescaped
/// ([`keyward::key::unescape_part`], the exact inverse of the escaping keys are built with).
fn parse_id(id: &str) -> anyhow::Result<Vec<String>> {
    id.split(':')
        .map(|part| match keyward::key::unescape_part(part) {
            Some(raw) => Ok(raw),
            None => usage!(
                "--id {id}: part `{part}` is not an id part as keyward escapes it (empty, or a bad %XX escape)"
            ),
        })
        .collect()
}

async fn connect(url: &str, policy: Policy) -> anyhow::Result<Keyward> {
    Keyward::connect(url, policy).await.map_err(|e| match e {
        keyward::Error::InvalidUrl { .. } => anyhow::Error::new(UsageError(e.to_string())),
        keyward::Error::Connect { .. } => {
            crate::redis_url::library_connect_failed(&e, crate::redis_url::HINT)
        }
        other => anyhow::Error::new(other).context("cannot connect to Redis"),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print(target: &Target, doc: &Value, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if target.json {
        writeln!(out, "{doc}")
    } else {
        write!(out, "{}", text())
    }
    .and_then(|()| out.flush())
    .context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_split_at_colons_and_decode_escapes() {
        assert_eq!(parse_id("acme:42").unwrap(), ["acme", "42"]);
        assert_eq!(parse_id("a%3Ab").unwrap(), ["a:b"]);
        assert!(parse_id("a::b").is_err());
        assert!(parse_id("%FF").is_err());
    }

    #[test]
    fn confirm_must_repeat_the_name() {
        assert!(!confirmed(None, "orders").unwrap());
        assert!(confirmed(Some("orders"), "orders").unwrap());
        assert!(confirmed(Some("order"), "orders").is_err());
    }
}
