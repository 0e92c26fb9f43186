//! Issue #13, attacked as a hostile on-call engineer would: the operator commands (`purge`,
//! `dead-letters`) against throwaway servers. Each test pins a hole found by trying to break them (it failed
//! before its fix) or a safety property an attack tried and failed to break.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use keyward_testkit::RedisServer;

const POLICY: &str = r#"
[namespace]
env = "dev"
app = "shop"

[classes.product]
kind = "cache"
ttl = "30m"
version = 2
invalidation = "catalog"

[classes.orders]
kind = "stream"
retention = { maxlen = 1000 }
"#;

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .output()
        .expect("run the keyward binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The policy written to a temp dir (kept alive by the returned guard).
fn policy_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

fn all_keys(conn: &mut redis::Connection) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .unwrap();
        out.extend(keys);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// A purge must not run `MEMORY USAGE … SAMPLES 0` (every element of every aggregate it meets, O(N) and
/// blocking the server on a big hash) while it claims to be paced: it samples like the audit does.
#[test]
fn a_purge_never_measures_every_element_of_an_aggregate() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    redis::cmd("HSET")
        .arg("dev:shop:legacy:big")
        .arg("f1")
        .arg("v1")
        .arg("f2")
        .arg("v2")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(10_000)
        .query::<()>(&mut conn)
        .unwrap();
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        "dev:shop:legacy:*",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(": 1 key, "),
        "{}",
        text(&out.stdout)
    );
    // Every command the server ran, with its arguments.
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    let mut memory_calls = Vec::new();
    for entry in log {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let Some(redis::Value::Array(argv)) = fields.get(3) else {
            continue;
        };
        let argv: Vec<String> = argv
            .iter()
            .map(|a| match a {
                redis::Value::BulkString(b) => text(b).to_ascii_uppercase(),
                other => format!("{other:?}"),
            })
            .collect();
        if argv.first().map(String::as_str) == Some("MEMORY") {
            memory_calls.push(argv);
        }
    }
    assert!(!memory_calls.is_empty(), "the purge measured nothing");
    for argv in &memory_calls {
        let samples = argv
            .iter()
            .position(|a| a == "SAMPLES")
            .map(|i| &argv[i + 1]);
        assert_ne!(
            samples.map(String::as_str),
            Some("0"),
            "a purge ran {argv:?}: every element of the aggregate"
        );
    }
}

/// `--version 0` names a version keyward never writes (versions start at 1): it is refused as bad usage,
/// not run as a purge that could never select anything.
#[test]
fn a_purge_of_version_zero_is_refused() {
    let (_dir, policy) = policy_file();
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        "redis://127.0.0.1:1",
        "--class",
        "product",
        "--version",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("--version 0"),
        "{}",
        text(&out.stderr)
    );
}

/// Glob tricks in `--orphans` cannot reach outside `{env}:{app}:`, nor into a class's keys or keyward's
/// own: refused up front, or selected by `classify` and never by the glob alone.
#[test]
fn orphan_patterns_cannot_escape_the_namespace() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    let url = server.url();
    for pattern in [
        "*",
        "dev:*",
        "prod:shop:*",
        "[d]ev:shop:*",
        "\\dev:shop:*",
        "?ev:shop:*",
        "dev:shop*",
        "dev:sho[p]:*",
    ] {
        let out = keyward(&[
            "purge",
            "--policy",
            &policy,
            "--url",
            &url,
            "--orphans",
            pattern,
            "--confirm",
            pattern,
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{pattern}: {}",
            text(&out.stdout)
        );
    }
    let survivors: [&[u8]; 6] = [
        b"dev:shopping:x",
        b"dev:shop:product:v2:{a}",
        b"dev:shop:product:v1:{a}",
        b"dev:shop:_kw:gens",
        b"prod:shop:legacy:1",
        b"dev:shop",
    ];
    for key in survivors {
        redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query::<()>(&mut conn)
            .unwrap();
    }
    let orphans: [&[u8]; 3] = [
        b"dev:shop:legacy:1",
        b"dev:shop:\xff\x00bin",
        b"dev:shop:{x}",
    ];
    for key in orphans {
        redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query::<()>(&mut conn)
            .unwrap();
    }
    for pattern in ["dev:shop:*", "dev:shop:[^x]*", "dev:shop:\\*"] {
        let out = keyward(&[
            "purge",
            "--policy",
            &policy,
            "--url",
            &url,
            "--orphans",
            pattern,
            "--confirm",
            pattern,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{pattern}: {}",
            text(&out.stderr)
        );
    }
    let left = all_keys(&mut conn);
    let expected: BTreeSet<Vec<u8>> = survivors.iter().map(|k| k.to_vec()).collect();
    // The purge log is keyward's own key, added by the confirmed purges.
    let left: BTreeSet<Vec<u8>> = left
        .into_iter()
        .filter(|k| k.as_slice() != b"dev:shop:_kw:purges")
        .collect();
    assert_eq!(left, expected);
}

/// A dead letter's group and error come from consumers (an error message may quote the failing event):
/// the table escapes control characters, so a letter cannot clear the operator's screen, retitle the
/// terminal or forge table lines.
#[test]
fn the_dead_letter_table_escapes_control_characters() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    redis::cmd("XADD")
        .arg("dev:shop:orders:v1:{orders}:dead")
        .arg("*")
        .arg("m")
        .arg("{}")
        .arg("id")
        .arg("1-0")
        .arg("group")
        .arg("billing\x1b]0;pwned\x07")
        .arg("error")
        .arg("boom\x1b[2J\r\n  9-0  group x  1 deliveries  error: forged")
        .arg("deliveries")
        .arg(5)
        .query::<()>(&mut conn)
        .unwrap();
    for args in [
        vec!["dead-letters", "list", "orders"],
        vec!["dead-letters", "replay", "orders"],
    ] {
        let mut args = args;
        let url = server.url();
        args.extend(["--policy", &policy, "--url", &url]);
        let out = keyward(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            !stdout.bytes().any(|b| b == 0x1b || b == 0x07 || b == b'\r'),
            "{args:?} printed raw control characters: {stdout:?}"
        );
        assert_eq!(
            stdout.lines().filter(|l| l.contains("deliveries")).count(),
            1,
            "{args:?} printed a forged line: {stdout}"
        );
        assert!(stdout.contains("billing"), "{stdout}");
    }
}

/// A `--id` filter that is not a stream id (`ms-seq`) can match nothing: refused as bad usage, rather
/// than a replay that silently moves nothing (a typo must not read as "no such dead letter"); `ms` alone
/// means `ms-0`, as everywhere else in keyward.
#[test]
fn a_replay_filter_with_a_malformed_id_is_refused() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    redis::cmd("XADD")
        .arg("dev:shop:orders:v1:{orders}:dead")
        .arg("*")
        .arg("m")
        .arg("{}")
        .arg("id")
        .arg("1700000000000-0")
        .arg("group")
        .arg("billing")
        .arg("error")
        .arg("timeout")
        .arg("deliveries")
        .arg(5)
        .query::<()>(&mut conn)
        .unwrap();
    for id in ["1700000000000-0", "1700000000000"] {
        let out = keyward(&[
            "dead-letters",
            "replay",
            "orders",
            "--policy",
            &policy,
            "--url",
            &server.url(),
            "--id",
            id,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("would replay 1 dead letter into `orders` in namespace"),
            "--id {id}: {}",
            text(&out.stdout)
        );
    }
    for id in ["nonsense", "1-0-0", "x-1", ""] {
        let out = keyward(&[
            "dead-letters",
            "replay",
            "orders",
            "--policy",
            &policy,
            "--url",
            &server.url(),
            "--id",
            id,
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--id {id:?}: {}",
            text(&out.stdout)
        );
        assert!(text(&out.stderr).contains("--id"), "{}", text(&out.stderr));
    }
}

/// The delete-if-unchanged check compares the walk's sampled `MEMORY USAGE` with the key's at delete time:
/// untouched big aggregates (hashtable, skiplist, quicklist, intset-free sets, a stream with a group) measure
/// the same both times, so a confirmed purge deletes them all and reports none as changed.
#[test]
fn untouched_big_aggregates_are_all_purged() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        let member = format!("member-{i}-{}", "x".repeat(i % 70));
        pipe.cmd("HSET")
            .arg("dev:shop:legacy:hash")
            .arg(&member)
            .arg(i)
            .ignore();
        pipe.cmd("ZADD")
            .arg("dev:shop:legacy:zset")
            .arg(i)
            .arg(&member)
            .ignore();
        pipe.cmd("SADD")
            .arg("dev:shop:legacy:set")
            .arg(&member)
            .ignore();
        pipe.cmd("RPUSH")
            .arg("dev:shop:legacy:list")
            .arg(&member)
            .ignore();
        pipe.cmd("XADD")
            .arg("dev:shop:legacy:stream")
            .arg("*")
            .arg("m")
            .arg(&member)
            .ignore();
    }
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg("dev:shop:legacy:stream")
        .arg("g")
        .arg("0")
        .ignore();
    pipe.query::<()>(&mut conn).unwrap();
    let pattern = "dev:shop:legacy:*";
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        pattern,
        "--confirm",
        pattern,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("deleted 5 keys"), "{stdout}");
    assert!(stdout.contains("; 0 changed since the walk"), "{stdout}");
    let left: Vec<Vec<u8>> = all_keys(&mut conn)
        .into_iter()
        .filter(|k| k.starts_with(b"dev:shop:legacy:"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A confirmed purge whose user cannot write the purge log (no `+xadd`) must fail before deleting anything:
/// it used to delete every selected key and only then fail to log, leaving deletions nobody recorded.
#[test]
fn a_purge_that_cannot_log_deletes_nothing() {
    let mut server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    for i in 0..20 {
        redis::cmd("SET")
            .arg(format!("dev:shop:legacy:{i}"))
            .arg("v")
            .query::<()>(&mut conn)
            .unwrap();
    }
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("purger")
        .arg("on")
        .arg(">purge-pw")
        .arg("~*")
        .arg("+@all")
        .arg("-xadd")
        .query::<()>(&mut conn)
        .unwrap();
    let before = all_keys(&mut conn);
    server.set_url_credentials(Some(("purger", "purge-pw")));
    let pattern = "dev:shop:legacy:*";
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        pattern,
        "--confirm",
        pattern,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("log"), "{stderr}");
    assert!(
        !stderr.contains("purge-pw"),
        "the password leaked: {stderr}"
    );
    assert_eq!(all_keys(&mut conn), before, "keys went without a log entry");
}

/// A confirmed purge leaves a log entry before its first delete (`complete` = `started`), so even a purge
/// killed outright (no checkpoint, no final entry) is on record.
#[test]
fn a_confirmed_purge_is_on_record_before_it_deletes() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    redis::cmd("SET")
        .arg("dev:shop:legacy:1")
        .arg("v")
        .query::<()>(&mut conn)
        .unwrap();
    let pattern = "dev:shop:legacy:*";
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        pattern,
        "--confirm",
        pattern,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg("dev:shop:_kw:purges")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let states: Vec<&str> = log
        .iter()
        .map(|(_, f)| {
            let i = f.iter().position(|k| k == "complete").unwrap();
            f[i + 1].as_str()
        })
        .collect();
    assert_eq!(states, ["started", "yes"]);
}

/// A server with `rename-command MEMORY ""` answers the walk's `MEMORY USAGE <key>` with an error that
/// echoes the key's raw bytes; for a binary (invalid UTF-8) key name redis-rs cannot parse that error and
/// drops the connection, so the command used to fail with "broken pipe", naming neither the command nor the
/// cause. The operator must be told which command the server refused.
fn server_without_memory() -> RedisServer {
    let server = RedisServer::spawn_with(keyward_testkit::ServerOptions::default().args([
        "--rename-command",
        "MEMORY",
        "",
    ]));
    let mut conn = server.connection();
    for key in [
        &b"dev:shop:legacy:\xff\x1b[2Jbin"[..],
        b"dev:shop:legacy:plain",
    ] {
        redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query::<()>(&mut conn)
            .unwrap();
    }
    server
}

#[test]
fn a_purge_on_a_server_without_memory_usage_names_the_command() {
    let server = server_without_memory();
    let (_dir, policy) = policy_file();
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        "dev:shop:legacy:*",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("MEMORY"), "{stderr}");
    assert!(!stderr.contains("broken pipe"), "{stderr}");
}

#[test]
fn an_audit_on_a_server_without_memory_usage_names_the_command() {
    let server = server_without_memory();
    let (_dir, policy) = policy_file();
    let cp = tempfile::tempdir().unwrap();
    let out = keyward(&[
        "audit",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--checkpoint-dir",
        cp.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("MEMORY"), "{stderr}");
    assert!(!stderr.contains("broken pipe"), "{stderr}");
}

/// `SCAN … COUNT n` blocks the server for about n keys and the next batch pipelines 3n commands, whatever
/// `--max-ops-per-sec` says: a fat-fingered `--count 100000000` must be refused, not run against production.
#[test]
fn a_purge_refuses_a_count_that_would_block_the_server() {
    let (_dir, policy) = policy_file();
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        "redis://127.0.0.1:1",
        "--orphans",
        "dev:shop:legacy:*",
        "--count",
        "100000000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--count"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_audit_refuses_a_count_that_would_block_the_server() {
    let (_dir, policy) = policy_file();
    let out = keyward(&[
        "audit",
        "--policy",
        &policy,
        "--url",
        "redis://127.0.0.1:1",
        "--count",
        "100000000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--count"),
        "{}",
        text(&out.stderr)
    );
}

/// A dry run's resume token given to the confirmed purge (the obvious next step after a stopped dry run) is
/// refused, and the message says why: the checkpoint is a dry run's, not "another purge" of the same keys.
#[test]
fn resuming_a_dry_run_with_confirm_says_it_was_a_dry_run() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (dir, policy) = policy_file();
    for i in 0..300 {
        redis::cmd("SET")
            .arg(format!("dev:shop:legacy:{i}"))
            .arg("v")
            .query::<()>(&mut conn)
            .unwrap();
    }
    let cp = dir.path().to_str().unwrap();
    let pattern = "dev:shop:legacy:*";
    let url = server.url();
    let base = [
        "purge",
        "--policy",
        &policy,
        "--url",
        &url,
        "--orphans",
        pattern,
        "--checkpoint-dir",
        cp,
    ];
    let mut dry = base.to_vec();
    dry.extend(["--limit-keys", "10", "--count", "10"]);
    let out = keyward(&dry);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let token = stderr
        .split_whitespace()
        .find(|w| w.starts_with("kwp1-"))
        .unwrap_or_else(|| panic!("no token in {stderr}"))
        .to_owned();
    let before = all_keys(&mut conn);
    let mut wet = base.to_vec();
    wet.extend(["--resume", &token, "--confirm", pattern]);
    let out = keyward(&wet);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("dry run"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(all_keys(&mut conn), before);
}

/// A confirmed purge killed outright (SIGKILL: no checkpoint, no final log entry) and simply run again ends
/// exactly as one uninterrupted purge: the selected keys gone, every other key intact, both runs on record.
#[test]
fn a_purge_killed_mid_way_and_run_again_ends_the_same() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.cmd("SET")
            .arg(format!("dev:shop:legacy:{i}"))
            .arg("v")
            .ignore();
        pipe.cmd("SET")
            .arg(format!("dev:shop:product:v2:{{{i}}}"))
            .arg("v")
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let before = all_keys(&mut conn);
    let pattern = "dev:shop:legacy:*";
    let url = server.url();
    let args = [
        "purge",
        "--policy",
        &policy,
        "--url",
        &url,
        "--orphans",
        pattern,
        "--confirm",
        pattern,
        "--count",
        "20",
    ];
    let legacy = |conn: &mut redis::Connection| {
        all_keys(conn)
            .iter()
            .filter(|k| k.starts_with(b"dev:shop:legacy:"))
            .count()
    };
    // Slow enough to be killed mid-way: about 60 commands per batch at 600 a second.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .args(["--max-ops-per-sec", "600"])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = legacy(&mut conn);
        if left < 2000 {
            assert!(left > 0, "the purge finished before it could be killed");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the purge deleted nothing in 30 s"
        );
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = keyward(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let expected: BTreeSet<Vec<u8>> = before
        .into_iter()
        .filter(|k| !k.starts_with(b"dev:shop:legacy:"))
        .chain([b"dev:shop:_kw:purges".to_vec()])
        .collect();
    assert_eq!(all_keys(&mut conn), expected);
    let entries: usize = redis::cmd("XLEN")
        .arg("dev:shop:_kw:purges")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        entries, 3,
        "started (killed run), started and yes (the rerun)"
    );
}

// ---- Issue #13, second round: what a tester found by breaking the operator commands. ----

/// `keyward` with stdout and stderr captured, and its JSON stdout parsed (`Null` when it is not JSON).
fn keyward_json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = keyward(args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), v, text(&out.stderr))
}

/// The resume token a stopped walk printed on stderr.
fn token_in(stderr: &str, prefix: &str) -> String {
    stderr
        .split_whitespace()
        .find(|w| w.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} token in {stderr}"))
        .to_owned()
}

fn set_keys(conn: &mut redis::Connection, prefix: &str, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("SET")
            .arg(format!("{prefix}{i}"))
            .arg("v")
            .ignore();
    }
    pipe.query::<()>(conn).unwrap();
}

/// Waits (with a deadline) until the server has run `command` at least `calls` times.
fn wait_for_calls(conn: &mut redis::Connection, command: &str, calls: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
        let seen = stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if seen >= calls {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server ran {command} only {seen} times"
        );
        std::thread::yield_now();
    }
}

/// A purge's resume token is refused on another standalone server (exit 2, naming the server it belongs to,
/// deleting nothing): the checkpoint used to record a standalone server as "", so the token of a purge on A
/// walked B with A's cursor, skipped keys and reported the purge complete. The audit's token alike, and on
/// the same address after a restart (a new hash seed: the cursor means nothing there).
#[test]
fn a_resume_token_works_only_on_the_server_it_came_from() {
    let a = RedisServer::spawn();
    let mut b = RedisServer::spawn();
    let (dir, policy) = policy_file();
    let cp = dir.path().to_str().unwrap();
    set_keys(&mut a.connection(), "dev:shop:legacy:", 200);
    let mut conn_b = b.connection();
    set_keys(&mut conn_b, "dev:shop:legacy:", 200);
    let pattern = "dev:shop:legacy:*";
    let purge = |url: &str, extra: &[&str]| {
        let mut args = vec![
            "purge",
            "--policy",
            &policy,
            "--orphans",
            pattern,
            "--confirm",
            pattern,
            "--checkpoint-dir",
            cp,
            "--url",
            url,
        ];
        args.extend(extra);
        keyward(&args)
    };
    let out = purge(&a.url(), &["--limit-keys", "10", "--count", "10"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let token = token_in(&text(&out.stderr), "kwp1-");
    let before = all_keys(&mut conn_b);
    let out = purge(&b.url(), &["--resume", &token]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(all_keys(&mut conn_b), before, "the purge touched B");
    let a_path = a.socket_path().unwrap().display().to_string();
    assert!(err.contains(&a_path), "the message names A: {err}");
    assert!(err.contains("not for this server"), "{err}");
    // On its own server, the token finishes the purge.
    let out = purge(&a.url(), &["--resume", &token]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        all_keys(&mut a.connection()),
        BTreeSet::from([b"dev:shop:_kw:purges".to_vec()]),
        "only the purge log is left"
    );

    // The audit's token: refused on A, and on B after B restarted.
    let audit = |url: &str, extra: &[&str]| {
        let mut args = vec![
            "audit",
            "--json",
            "--policy",
            &policy,
            "--checkpoint-dir",
            cp,
            "--url",
            url,
        ];
        args.extend(extra);
        keyward_json(&args)
    };
    let (code, _, err) = audit(&b.url(), &["--limit-keys", "10", "--count", "10"]);
    assert_eq!(code, Some(4), "{err}");
    let token = token_in(&err, "kwa1-");
    let (code, _, err) = audit(&a.url(), &["--resume", &token]);
    assert_eq!(code, Some(2), "{err}");
    b.restart();
    let (code, _, err) = audit(&b.url(), &["--resume", &token]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("restarted"), "{err}");
}

/// A stream the walk saw and that is deleted before the stream checks is gone, not an error: the audit used
/// to fail for good (`XINFO GROUPS …: no such key`, exit 1, no report, and every resume failed the same way).
#[test]
fn a_stream_deleted_after_the_walk_saw_it_is_not_an_error() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (dir, policy) = policy_file();
    let cp = dir.path().to_str().unwrap();
    let stream = "dev:shop:orders:v1:{orders}";
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("f")
        .arg("v")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .query::<()>(&mut conn)
        .unwrap();
    set_keys(&mut conn, "dev:shop:legacy:", 300);
    // Walk a few keys at a time until the walk has counted the stream.
    let base = [
        "audit",
        "--json",
        "--policy",
        &policy,
        "--checkpoint-dir",
        cp,
    ];
    let url = server.url();
    let mut token: Option<String> = None;
    loop {
        let mut args = base.to_vec();
        args.extend(["--url", &url, "--count", "5", "--limit-keys", "1"]);
        if let Some(t) = &token {
            args.extend(["--resume", t]);
        }
        let (code, v, err) = keyward_json(&args);
        assert_eq!(
            code,
            Some(4),
            "the walk ended before the stream was seen? {err}"
        );
        token = Some(v["resume_token"].as_str().unwrap().to_owned());
        let orders = v["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "orders")
            .map_or(0, |c| c["keys"].as_u64().unwrap());
        if orders == 1 {
            break;
        }
    }
    redis::cmd("DEL")
        .arg(stream)
        .query::<()>(&mut conn)
        .unwrap();
    let token = token.unwrap();
    let mut args = base.to_vec();
    args.extend(["--url", &url, "--resume", &token]);
    let (code, v, err) = keyward_json(&args);
    // Complete: keys without TTL are violations (exit 3), the vanished stream is none.
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(v["complete"], true, "{v:#}");
    assert!(
        v["violations"]["stuck_groups"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{v:#}"
    );
}

/// A confirmed purge reports (summary, `--json`, the purge log) the bytes of the keys it deleted, not of the
/// keys it matched: keys rewritten between the walk and the delete survive and their bytes are not counted.
#[test]
fn a_purge_reports_the_bytes_it_deleted_not_the_bytes_it_matched() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    set_keys(&mut conn, "dev:shop:legacy:keep", 5);
    set_keys(&mut conn, "dev:shop:legacy:go", 5);
    let memory = |conn: &mut redis::Connection, key: &str| -> u64 {
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(5)
            .query(conn)
            .unwrap()
    };
    let gone_bytes: u64 = (0..5)
        .map(|i| memory(&mut conn, &format!("dev:shop:legacy:go{i}")))
        .sum();
    let pattern = "dev:shop:legacy:*";
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut conn)
        .unwrap();
    // One batch of 10 keys (31 commands) at 5 commands/s: about 6 s between the walk and the delete.
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "purge",
            "--json",
            "--policy",
            &policy,
            "--url",
            &server.url(),
            "--orphans",
            pattern,
            "--confirm",
            pattern,
            "--count",
            "1000",
            "--max-ops-per-sec",
            "5",
        ])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The probe runs MEMORY USAGE once; the walk's inspection ten more times. Then rewrite five keys.
    wait_for_calls(&mut conn, "memory|usage", 11);
    for i in 0..5 {
        redis::cmd("SET")
            .arg(format!("dev:shop:legacy:keep{i}"))
            .arg("rewritten by the application, with a longer value".repeat(4))
            .query::<()>(&mut conn)
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &v["this_run"];
    assert_eq!(run["keys_matched"], 10, "{v:#}");
    assert_eq!(run["keys_deleted"], 5, "{v:#}");
    assert_eq!(run["keys_changed"], 5, "{v:#}");
    assert_eq!(run["bytes_deleted"], gone_bytes, "{v:#}");
    assert!(run["bytes"].as_u64().unwrap() > gone_bytes, "{v:#}");
    // The log's end entry carries the deleted bytes.
    let log: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("dev:shop:_kw:purges")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let end = &log.last().unwrap().1;
    let field = |name: &str| {
        end.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(field("complete"), "yes");
    assert_eq!(field("bytes"), gone_bytes.to_string());
}

/// A reader that closes stdout early (`| grep -q`, `| head`) does not turn the audit's verdict into 0: the
/// exit status used to be 0 whenever the write met the closed pipe (at random, depending on who was first).
#[test]
fn a_closed_stdout_keeps_the_audit_s_exit_status() {
    let server = RedisServer::spawn();
    set_keys(&mut server.connection(), "dev:shop:legacy:", 50);
    let (_dir, policy) = policy_file();
    for (extra, expected) in [
        (&[][..], 3),
        (&["--limit-keys", "1", "--count", "5"][..], 4),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["audit", "--policy", &policy, "--url", &server.url()])
            .args(extra)
            .env_remove("REDIS_URL")
            .env_remove("KEYWARD_ENV")
            .env_remove("KEYWARD_APP")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the audit writes a byte.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{extra:?}: {}",
            text(&out.stderr)
        );
    }
}

/// An audit whose server dies mid-walk still prints what it counted (`--json`: `complete: false` and the
/// resume token), saves its checkpoint and exits 1: stdout used to be empty.
#[test]
fn an_audit_whose_server_dies_mid_walk_prints_its_partial_report() {
    let mut server = RedisServer::spawn_with(
        keyward_testkit::ServerOptions::default().args(["--enable-debug-command", "yes"]),
    );
    let mut conn = server.connection();
    redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(20_000)
        .arg("key")
        .query::<()>(&mut conn)
        .unwrap();
    let (dir, policy) = policy_file();
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "audit",
            "--json",
            "--policy",
            &policy,
            "--url",
            &server.url(),
        ])
        .args(["--checkpoint-dir", dir.path().to_str().unwrap()])
        .args(["--count", "50", "--max-ops-per-sec", "2000"])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_calls(&mut conn, "scan", 3);
    server.kill();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}; {err}", text(&out.stdout)));
    assert_eq!(v["complete"], false, "{v:#}");
    assert!(v["scan"]["keys_scanned"].as_u64().unwrap() > 0, "{v:#}");
    let token = v["resume_token"].as_str().unwrap();
    assert!(err.contains(&format!("--resume {token}")), "{err}");
    let id = token.strip_prefix("kwa1-").unwrap();
    assert!(
        dir.path().join(format!("keyward-audit-{id}.json")).exists(),
        "no checkpoint"
    );
}

/// A purge whose server dies mid-walk prints its summary (what it deleted, the token) and saves its
/// checkpoint: it used to print only `cannot log the purge: broken pipe: broken pipe`, with neither.
#[test]
fn a_purge_whose_server_dies_mid_walk_prints_its_summary_and_token() {
    let mut server = RedisServer::spawn_with(
        keyward_testkit::ServerOptions::default().args(["--enable-debug-command", "yes"]),
    );
    let mut conn = server.connection();
    redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(20_000)
        .arg("dev:shop:legacy")
        .query::<()>(&mut conn)
        .unwrap();
    let (dir, policy) = policy_file();
    let pattern = "dev:shop:legacy:*";
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["purge", "--policy", &policy, "--url", &server.url()])
        .args(["--orphans", pattern, "--confirm", pattern])
        .args(["--checkpoint-dir", dir.path().to_str().unwrap()])
        .args(["--count", "50", "--max-ops-per-sec", "2000"])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_calls(&mut conn, "eval", 60);
    server.kill();
    let out = child.wait_with_output().unwrap();
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(stdout.contains("INCOMPLETE"), "{stdout}; {err}");
    assert!(deleted_count(&stdout) > 0, "{stdout}");
    let token = token_in(&err, "kwp1-");
    assert!(stdout.contains("purge orphans"), "{stdout}");
    let id = token.strip_prefix("kwp1-").unwrap();
    assert!(
        dir.path().join(format!("keyward-purge-{id}.json")).exists(),
        "no checkpoint: {err}"
    );
    assert!(!err.contains("broken pipe: broken pipe"), "{err}");
}

/// The number after `deleted ` in a purge's summary line.
fn deleted_count(line: &str) -> u64 {
    line.split("deleted ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no deleted count in {line:?}"))
}

/// A local port nothing listens on (bound, then let go), and a URL for it with the password `s3cret`.
fn nobody_listening() -> (u16, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (port, format!("redis://u:s3cret@127.0.0.1:{port}"))
}

/// Every command that talks to Redis names the server it could not reach (never the password) with the
/// same hint, and a URL that does not parse is bad usage said plainly (exit 2).
#[test]
fn connection_errors_name_the_server_and_hide_the_password() {
    let (_dir, policy) = policy_file();
    let (port, url) = nobody_listening();
    let commands: [&[&str]; 6] = [
        &["audit"],
        &["purge", "--orphans", "dev:shop:legacy:*"],
        &["inspect", "dev:shop:x"],
        &["streams"],
        &["invalidate", "--class", "product"],
        &["dead-letters", "list", "orders"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.extend(["--policy", &policy, "--url", &url]);
        let out = keyward(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {err}");
        assert!(
            err.contains(&format!("cannot connect to Redis at 127.0.0.1:{port}")),
            "{command:?}: {err}"
        );
        assert!(err.contains("$REDIS_URL"), "{command:?}: no hint: {err}");
        assert!(!err.contains("s3cret"), "{command:?}: {err}");
        let mut args = command.to_vec();
        args.extend(["--policy", &policy, "--url", "redis://:s3cret@[nope"]);
        let out = keyward(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {err}");
        // The CLI's own connections say "not a Redis URL (…forms…)"; the library's (invalidate,
        // dead-letters) name what is wrong with it.
        assert!(
            err.contains("not a Redis URL")
                || err.contains("invalid connection URL: redis://***@[nope: invalid IPv6 address"),
            "{command:?}: {err}"
        );
        assert!(!err.contains("s3cret"), "{command:?}: {err}");
    }
}

/// `keyward bench` names the server it could not reach (never the password) with the hint the other commands
/// give, worded for its own rule (no URL at all measures the embedded backend).
#[test]
fn bench_connection_errors_carry_the_hint() {
    let (port, url) = nobody_listening();
    let out = keyward(&["bench", "hit", "--url", &url, "-d", "1"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot connect to Redis at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("is it up"), "no hint: {err}");
    assert!(err.contains("embedded backend"), "bench's own rule: {err}");
    assert!(!err.contains("s3cret"), "{err}");
}

/// A delete script the server refuses for every key is one error with a count (it used to print one
/// `NoPerm: …: NoPerm: …` line per key), and the summary of what was done is still printed.
#[test]
fn a_refused_delete_script_is_reported_once_with_a_count() {
    let mut server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    set_keys(&mut conn, "dev:shop:legacy:", 20);
    // Reads every key, writes only keyward's own (the purge log): every delete is refused.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("purger")
        .arg("on")
        .arg(">purge-pw")
        .arg("%R~*")
        .arg("~dev:shop:_kw:*")
        .arg("+@all")
        .query::<()>(&mut conn)
        .unwrap();
    let before = all_keys(&mut conn);
    server.set_url_credentials(Some(("purger", "purge-pw")));
    let pattern = "dev:shop:legacy:*";
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        pattern,
        "--confirm",
        pattern,
        "--count",
        "1000",
    ]);
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("20 of 20 keys"), "{err}");
    assert_eq!(err.matches("permissions").count(), 1, "{err}");
    assert!(stdout.contains("deleted 0 keys"), "{stdout}");
    let after: BTreeSet<Vec<u8>> = all_keys(&mut server.connection())
        .into_iter()
        .filter(|k| !k.starts_with(b"dev:shop:_kw:"))
        .collect();
    assert_eq!(after, before);
}

/// Counts agree with their nouns and empty lists end without a colon; TTLs read in units a person reads.
#[test]
fn text_output_speaks_proper_singular_plural_and_readable_ttls() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    let url = server.url();
    let out = keyward(&[
        "dead-letters",
        "list",
        "orders",
        "--policy",
        &policy,
        "--url",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        "0 dead letters of `orders` in namespace dev:shop"
    );
    let out = keyward(&[
        "dead-letters",
        "replay",
        "orders",
        "--policy",
        &policy,
        "--url",
        &url,
    ]);
    assert!(
        !text(&out.stdout).contains("0:") && text(&out.stdout).contains("0 dead letters"),
        "{}",
        text(&out.stdout)
    );
    redis::cmd("SET")
        .arg("dev:shop:legacy:one")
        .arg("v")
        .arg("PX")
        .arg(3_930_000)
        .query::<()>(&mut conn)
        .unwrap();
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &url,
        "--orphans",
        "dev:shop:legacy:*",
    ]);
    assert!(
        text(&out.stdout).contains(": 1 key, "),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stdout).contains("1 keys"),
        "{}",
        text(&out.stdout)
    );
    let out = keyward(&[
        "inspect",
        "dev:shop:legacy:one",
        "--policy",
        &policy,
        "--url",
        &url,
    ]);
    let ttl = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with("TTL"))
        .unwrap_or_default()
        .to_owned();
    assert!(ttl.contains("1 h 5 m"), "{}", text(&out.stdout));
}

/// Two confirmed purges of the same selection at once: the second is refused (exit 2, naming the first) and
/// deletes nothing, while a dry run is not held back; once the first stops, its lock is gone and the second
/// runs.
#[test]
fn a_second_confirmed_purge_of_the_same_keys_is_refused_while_the_first_runs() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let (dir, policy) = policy_file();
    set_keys(&mut conn, "dev:shop:legacy:", 2000);
    let pattern = "dev:shop:legacy:*";
    let url = server.url();
    let cp = dir.path().to_str().unwrap();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "purge",
            "--policy",
            &policy,
            "--url",
            &url,
            "--orphans",
            pattern,
            "--checkpoint-dir",
            cp,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    // The first: slow (about 20 s for the whole keyspace).
    let first = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args(&[
            "--confirm",
            pattern,
            "--count",
            "20",
            "--max-ops-per-sec",
            "500",
        ]))
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_calls(&mut conn, "eval", 20);
    let lock = "dev:shop:_kw:purging:orphans";
    let held: Option<String> = redis::cmd("GET").arg(lock).query(&mut conn).unwrap();
    assert!(held.is_some(), "the running purge holds no lock");
    let second = |extra: &[&'static str]| {
        let a = args(extra);
        keyward(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = second(&["--confirm", pattern]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another purge"), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    // A dry run deletes nothing and takes no lock.
    let out = second(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let held: Option<String> = redis::cmd("GET").arg(lock).query(&mut conn).unwrap();
    assert_eq!(held, None, "the stopped purge kept its lock");
    let token = token_in(&text(&out.stderr), "kwp1-");
    let out = second(&[
        "--confirm",
        pattern,
        "--resume",
        Box::leak(token.into_boxed_str()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let left: Vec<Vec<u8>> = all_keys(&mut conn)
        .into_iter()
        .filter(|k| k.starts_with(b"dev:shop:legacy:"))
        .collect();
    assert!(left.is_empty(), "{} keys left", left.len());
}

/// The purge's documented ACL rule (docs/cli.md: the audit's, plus `+eval +unlink +xadd +pexpire +get +set
/// +del` and `~*`) is enough for a confirmed purge: its walk, its deletes, its log and its lock.
#[test]
fn the_documented_purge_user_can_purge() {
    let mut server = RedisServer::spawn();
    let mut conn = server.connection();
    let (_dir, policy) = policy_file();
    set_keys(&mut conn, "dev:shop:legacy:", 30);
    let rule = "resetkeys ~* resetchannels -@all +scan +type +pttl +memory|usage +strlen +hstrlen +dbsize \
                +config|get +cluster|nodes +xlen +xrange +xinfo|groups +xpending +ping +info \
                +eval +unlink +xadd +pexpire +get +set +del";
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("purger")
        .arg("on")
        .arg(">purge-pw");
    for r in rule.split_whitespace() {
        setuser.arg(r);
    }
    setuser.query::<()>(&mut conn).unwrap();
    server.set_url_credentials(Some(("purger", "purge-pw")));
    let pattern = "dev:shop:legacy:*";
    let out = keyward(&[
        "purge",
        "--policy",
        &policy,
        "--url",
        &server.url(),
        "--orphans",
        pattern,
        "--confirm",
        pattern,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted 30 keys"),
        "{}",
        text(&out.stdout)
    );
    let left: Vec<Vec<u8>> = all_keys(&mut conn)
        .into_iter()
        .filter(|k| k.starts_with(b"dev:shop:legacy:") || k.starts_with(b"dev:shop:_kw:purging"))
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}
