//! The `keyward` binary end to end: exit codes, `policy check`, and each bench scenario against the embedded
//! backend and a throwaway Redis (keyward-testkit).

use std::path::PathBuf;
use std::process::{Command, Output};

use keyward_testkit::{RedisCluster, RedisServer};
use serde_json::Value;

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .output()
        .expect("run the keyward binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run a `bench … --json` that must succeed; returns its one JSON line.
fn bench_json(args: &[&str]) -> Value {
    let out = keyward(args);
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        stderr(&out)
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one JSON line, got {text:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("the line is JSON");
    assert_eq!(v["peer"], "keyward");
    v
}

#[test]
fn policy_check_prints_the_example_policy() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy.toml");
    let out = keyward(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("product_list"), "{}", stdout(&out));
}

/// The CLI reads a policy file as a service deployed with it does: `KEYWARD_ENV` / `KEYWARD_APP` override the
/// namespace (`Policy::with_env_overrides`). Before, `KEYWARD_ENV=prod keyward …` acted on the file's `dev`.
#[test]
fn policy_check_applies_and_names_the_environment_overrides() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy.toml");
    let run = |vars: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["policy", "check", file.to_str().unwrap()])
            .env_remove("KEYWARD_ENV")
            .env_remove("KEYWARD_APP")
            .envs(vars.iter().copied())
            .output()
            .expect("run the keyward binary")
    };
    let out = run(&[("KEYWARD_ENV", "prod")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("namespace: env = prod, app = shop"), "{text}");
    assert!(
        text.contains("namespace.env = prod comes from KEYWARD_ENV (the file declares dev)"),
        "{text}"
    );
    assert!(!text.contains("KEYWARD_APP"), "{text}");

    let out = run(&[]);
    assert!(stdout(&out).contains("namespace: env = dev, app = shop"));
    assert!(!stdout(&out).contains("comes from"), "{}", stdout(&out));

    let out = run(&[("KEYWARD_APP", "Shop!")]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stderr(&out).contains("KEYWARD_APP"), "{}", stderr(&out));
}

/// `keyward streams` on a policy without stream classes (the README's `examples/policy.toml`) printed nothing
/// at all; it says so instead, without connecting anywhere.
#[test]
fn streams_says_when_the_policy_declares_no_stream_class() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy.toml");
    let file = file.to_str().unwrap();
    let out = keyward(&["streams", "--policy", file, "--url", "redis://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("the policy declares no stream class"),
        "{}",
        stdout(&out)
    );
    let out = keyward(&[
        "streams",
        "--policy",
        file,
        "--json",
        "--url",
        "redis://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: Value = serde_json::from_str(&stdout(&out)).expect("one JSON document");
    assert_eq!(doc["streams"], serde_json::json!([]));
}

#[test]
fn an_invalid_policy_exits_2_naming_class_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[namespace]\nenv = \"dev\"\napp = \"shop\"\n\n[classes.orders]\nkind = \"cache\"\nttl = \"5m\"\n",
    )
    .unwrap();
    let out = keyward(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("orders"), "{err}");
    assert!(err.contains("invalidation"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(keyward(&["bench", "nonsense"]).status.code(), Some(2));
    let out = keyward(&["bench", "stampede", "--url", "mem://", "--processes", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--processes"), "{}", stderr(&out));
}

#[test]
fn help_documents_exit_codes() {
    let out = keyward(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Exit codes"), "{}", stdout(&out));
}

#[test]
fn cannot_connect_exits_1() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let out = keyward(&["bench", "hit", "--url", &url, "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

#[test]
fn embedded_stampede_loads_once() {
    let v = bench_json(&[
        "bench",
        "stampede",
        "--url",
        "mem://",
        "--concurrency",
        "200",
        "--loader-ms",
        "20",
        "--json",
    ]);
    assert_eq!(v["scenario"], "stampede");
    assert_eq!(v["backend"], "embedded");
    assert_eq!(v["loader_calls"], 1);
    assert_eq!(v["ops"], 200);
    assert!(v.get("redis_cmds_per_op").is_none(), "{v}");
}

#[test]
fn redis_stampede_across_processes_loads_once() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "stampede",
        "--url",
        &server.url(),
        "--concurrency",
        "200",
        "--processes",
        "2",
        "--json",
    ]);
    assert_eq!(v["backend"], "redis");
    assert_eq!(v["processes"], 2);
    assert_eq!(v["loader_calls"], 1);
    assert_eq!(v["ops"], 200);
    assert!(v["redis_cmds_per_op"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["redis_cmds"].as_object().is_some_and(|c| !c.is_empty()),
        "{v}"
    );
}

#[test]
fn redis_hit_never_calls_the_loader() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "hit",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert_eq!(v["loader_calls"], 0);
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert!(v["p50_us"].as_u64().unwrap() > 0, "{v}");
    assert!(v["redis_cmds_per_op"].as_f64().is_some(), "{v}");
}

#[test]
fn cluster_hit_counts_commands_on_every_primary() {
    let cluster = RedisCluster::spawn();
    // 64 workers on 64 keys of their own: no two share a read, and the keys spread over all three primaries.
    let v = bench_json(&[
        "bench",
        "hit",
        "--url",
        &cluster.seed_url(),
        "--duration",
        "0.5",
        "--concurrency",
        "64",
        "--hit-keys",
        "64",
        "--json",
    ]);
    assert_eq!(v["backend"], "redis_cluster", "{v}");
    assert_eq!(v["loader_calls"], 0, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    assert!(ops > 0, "{v}");
    assert_eq!(v["redis_primaries"], 3, "{v}");
    let by_primary = v["redis_cmds_by_primary"].as_object().unwrap();
    let mut addrs: Vec<String> = by_primary.keys().cloned().collect();
    addrs.sort();
    let mut expected: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    expected.sort();
    assert_eq!(addrs, expected, "{v}");
    assert!(by_primary.values().all(|c| c.as_u64().unwrap() > 0), "{v}");
    let cmds = v["redis_cmds"].as_object().unwrap();
    let total: u64 = cmds.values().map(|c| c.as_u64().unwrap()).sum();
    let shares: u64 = by_primary.values().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(total, shares, "{v}");
    // On Cluster a hit is one `SET … NX GET` on the entry's primary: counted on one server only, a third of
    // the hits would be missing.
    assert_eq!(cmds["set"].as_u64(), Some(ops), "{v}");
    let per_op = v["redis_cmds_per_op"].as_f64().unwrap();
    assert!((1.0..1.1).contains(&per_op), "{v}");
}

#[test]
fn redis_miss_loads_every_key_once() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "miss",
        "--url",
        &server.url(),
        "--keys",
        "500",
        "--json",
    ]);
    assert_eq!(v["loader_calls"], 500);
    assert_eq!(v["ops"], 500);
    assert!(v["redis_cmds_per_op"].as_f64().unwrap() >= 1.0, "{v}");
}

#[test]
fn table_output_is_readable() {
    let out = keyward(&[
        "bench",
        "miss",
        "--url",
        "mem://",
        "--keys",
        "50",
        "--concurrency",
        "4",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("scenario") && l.ends_with("miss")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("loader_calls") && l.ends_with(" 50")),
        "{text}"
    );
}

#[test]
fn bad_rate_limit_flags_exit_2() {
    let out = keyward(&["bench", "ratelimit_exact", "--algorithm", "leaky"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("gcra"), "{}", stderr(&out));
    let out = keyward(&[
        "bench",
        "ratelimit_exact",
        "--url",
        "mem://",
        "--algorithm",
        "sliding_log",
        "--limit",
        "200000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--limit 200000"), "{}", stderr(&out));
}

#[test]
fn embedded_ratelimit_exact_allows_the_limit() {
    let v = bench_json(&["bench", "ratelimit_exact", "--url", "mem://", "--json"]);
    assert_eq!(v["scenario"], "ratelimit_exact");
    assert_eq!(v["backend"], "embedded");
    assert_eq!(v["algorithm"], "gcra");
    assert_eq!(v["concurrency"], 1000);
    assert_eq!(v["ops"], 1000);
    assert_eq!(v["limit"], 100);
    assert_eq!(v["allowed"], 100);
    assert_eq!(v["limited"], 900);
    assert_eq!(v["exact"], true);
    assert!(v.get("redis_cmds_per_op").is_none(), "{v}");
}

#[test]
fn redis_ratelimit_exact_across_processes_allows_the_limit() {
    let server = RedisServer::spawn();
    for algorithm in [
        "fixed_window",
        "sliding_log",
        "sliding_counter",
        "token_bucket",
        "gcra",
    ] {
        let v = bench_json(&[
            "bench",
            "ratelimit_exact",
            "--url",
            &server.url(),
            "--algorithm",
            algorithm,
            "--limit",
            "50",
            "--concurrency",
            "400",
            "--processes",
            "2",
            "--json",
        ]);
        assert_eq!(v["backend"], "redis");
        assert_eq!(v["processes"], 2);
        assert_eq!(v["algorithm"], algorithm);
        assert_eq!(v["ops"], 400, "{v}");
        assert_eq!(v["allowed"], 50, "{v}");
        assert_eq!(v["limited"], 350, "{v}");
        assert_eq!(v["exact"], true, "{v}");
        // At most one EVALSHA per check, whatever the script calls inside: concurrent checks of one
        // process share one call (auto-batching), and each of the 2 processes makes at least one.
        let calls = v["redis_cmds"]["evalsha"].as_u64().unwrap();
        assert!((2..=400).contains(&calls), "{v}");
    }
}

#[test]
fn embedded_ratelimit_throughput_never_refuses() {
    let v = bench_json(&[
        "bench",
        "ratelimit_throughput",
        "--url",
        "mem://",
        "--duration",
        "1",
        "--concurrency",
        "8",
        "--json",
    ]);
    assert_eq!(v["scenario"], "ratelimit_throughput");
    assert_eq!(v["backend"], "embedded");
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["limited"], 0, "{v}");
    assert_eq!(v["allowed"], v["ops"], "{v}");
    assert!(v.get("exact").is_none(), "{v}");
    assert!(v.get("redis_client_cmds_per_op").is_none(), "{v}");
}

#[test]
fn redis_ratelimit_throughput_sends_at_most_one_command_per_check() {
    let server = RedisServer::spawn();
    for algorithm in ["gcra", "sliding_log"] {
        let v = bench_json(&[
            "bench",
            "ratelimit_throughput",
            "--url",
            &server.url(),
            "--algorithm",
            algorithm,
            "--duration",
            "1",
            "--concurrency",
            "8",
            "--json",
        ]);
        assert_eq!(v["backend"], "redis");
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["limited"], 0, "{v}");
        // 8 callers × 16 checks while MONITOR counts: EVALSHA only, at most one per check (concurrent
        // checks share one call).
        let per_op = v["redis_client_cmds_per_op"].as_f64().unwrap();
        assert!(per_op > 0.0 && per_op <= 1.0, "{v}");
        let cmds = v["redis_client_cmds"].as_object().unwrap();
        assert_eq!(cmds.keys().collect::<Vec<_>>(), ["evalsha"], "{v}");
        assert!(
            (1..=128).contains(&cmds["evalsha"].as_u64().unwrap()),
            "{v}"
        );
        // The server runs more than the client sends: the script's own calls.
        assert!(v["redis_cmds_per_op"].as_f64().unwrap() > 1.0, "{v}");
    }
}

#[test]
fn embedded_lock_on_one_name_is_exclusive() {
    let v = bench_json(&[
        "bench",
        "lock",
        "--names",
        "one",
        "--url",
        "mem://",
        "--duration",
        "1",
        "--concurrency",
        "16",
        "--json",
    ]);
    assert_eq!(v["scenario"], "lock");
    assert_eq!(v["backend"], "embedded");
    assert_eq!(v["names"], "one");
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["timeouts"], 0, "{v}");
    assert_eq!(v["handoffs_per_s"], v["ops_per_s"], "{v}");
    assert!(
        v["reacquired"].as_u64().unwrap() <= v["ops"].as_u64().unwrap(),
        "{v}"
    );
    // Attempts are counted from the server's script calls: none here.
    assert!(v.get("acquire_attempts").is_none(), "{v}");
}

#[test]
fn redis_lock_on_distinct_names_takes_one_attempt() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "lock",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert_eq!(v["names"], "distinct");
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["acquire_attempts"], v["ops"], "{v}");
    assert_eq!(v["attempts_per_acquire"].as_f64(), Some(1.0), "{v}");
    assert!(v.get("violations").is_none(), "{v}");
    // 4 callers × 16 ops while MONITOR counts: one EVALSHA to acquire, one to release.
    assert_eq!(
        v["redis_client_cmds"],
        serde_json::json!({ "evalsha": 128 }),
        "{v}"
    );
}

#[test]
fn redis_lock_on_one_name_across_processes_is_exclusive() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "lock",
        "--names",
        "one",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "8",
        "--processes",
        "2",
        "--json",
    ]);
    assert_eq!(v["processes"], 2);
    let ops = v["ops"].as_u64().unwrap();
    assert!(ops > 0, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["timeouts"], 0, "{v}");
    assert!(v["acquire_attempts"].as_u64().unwrap() >= ops, "{v}");
    assert!(v["reacquired"].as_u64().unwrap() <= ops, "{v}");
    assert!(v["attempts_per_acquire"].as_f64().unwrap() >= 1.0, "{v}");
    assert!(
        v["redis_client_cmds_per_op"].as_f64().unwrap() >= 2.0,
        "{v}"
    );
}

#[test]
fn embedded_session_reads_find_every_session() {
    let v = bench_json(&[
        "bench",
        "session",
        "--url",
        "mem://",
        "--keys",
        "100",
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert_eq!(v["scenario"], "session");
    assert_eq!(v["backend"], "embedded");
    assert_eq!(v["extend"], "default");
    assert_eq!(v["sessions"], 100);
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn redis_session_reads_write_only_when_extending() {
    let server = RedisServer::spawn();
    for extend in ["default", "always"] {
        let v = bench_json(&[
            "bench",
            "session",
            "--extend",
            extend,
            "--url",
            &server.url(),
            "--keys",
            "200",
            "--duration",
            "1",
            "--concurrency",
            "4",
            "--json",
        ]);
        assert_eq!(v["extend"], extend);
        assert_eq!(v["sessions"], 200);
        let ops = v["ops"].as_u64().unwrap();
        assert!(ops > 0, "{v}");
        // One EVALSHA per read: 4 callers × 16 reads while MONITOR counts.
        assert_eq!(
            v["redis_client_cmds"],
            serde_json::json!({ "evalsha": 64 }),
            "{v}"
        );
        assert_eq!(v["redis_cmds"]["evalsha"], ops, "{v}");
        let writes = v["redis_cmds"]["hset"].as_u64().unwrap_or(0);
        if extend == "default" {
            assert_eq!(v["extend_after_ms"], 180_000, "{v}");
            assert_eq!(writes, 0, "{v}");
        } else {
            assert_eq!(v["extend_after_ms"], 0, "{v}");
            assert!(writes > ops / 2, "{v}");
        }
    }
}

// The in-process tier (L1): `hit_l1` and `staleness`.

#[test]
fn embedded_hit_l1_is_answered_by_l1() {
    let v = bench_json(&[
        "bench",
        "hit_l1",
        "--url",
        "mem://",
        "--duration",
        "0.5",
        "--concurrency",
        "4",
        "--hit-keys",
        "2",
        "--json",
    ]);
    assert_eq!(v["scenario"], "hit_l1");
    assert_eq!(v["loader_calls"], 0, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    assert!(ops > 0, "{v}");
    assert_eq!(v["l1_hits"].as_u64(), Some(ops), "{v}");
    assert_eq!(v["l1_hit_ratio"], 1.0, "{v}");
    assert_eq!(v["l1_max_stale_ms"], 500, "{v}");
    assert!(v.get("max_stale_us").is_none(), "{v}");
}

#[test]
fn redis_hit_l1_reads_without_asking_redis() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "hit_l1",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "8",
        "--hit-keys",
        "8",
        "--json",
    ]);
    assert_eq!(v["loader_calls"], 0, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    let l1_hits = v["l1_hits"].as_u64().unwrap();
    // Every read is an L1 hit unless this process was kept off the CPU for longer than l1_max_stale (its
    // heartbeats then lapse and reads go to Redis, as they must): on a busy machine, allow a few.
    assert!(l1_hits > 0 && l1_hits * 10 >= ops * 9, "{v}");
    // What reached Redis: heartbeats (PUBLISH), and the reads L1 did not answer (two commands each), plus a
    // few for a re-subscription after a lapse.
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert!(cmds["publish"].as_u64().unwrap() > 0, "{v}");
    let to_redis: u64 = cmds
        .iter()
        .filter(|(name, _)| *name != "publish")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert!(to_redis <= 2 * (ops - l1_hits) + 16, "{v}");
}

#[test]
fn staleness_needs_processes_and_redis_and_its_faults_need_it() {
    let server = RedisServer::spawn();
    let out = keyward(&["bench", "staleness", "--url", &server.url()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--processes 2"), "{}", stderr(&out));
    let out = keyward(&["bench", "staleness", "--url", "mem://", "--processes", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = keyward(&[
        "bench",
        "hit",
        "--url",
        &server.url(),
        "--kill-backplane-every",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("staleness"), "{}", stderr(&out));
    let out = keyward(&[
        "bench",
        "staleness",
        "--url",
        &server.url(),
        "--processes",
        "2",
        "--pause-every",
        "500",
        "--pause-for",
        "500",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--pause-for"), "{}", stderr(&out));
}

/// Run `staleness` with `processes` processes (one writer), 4 keys, 2 readers per reader process, for
/// `seconds`, plus `extra` flags; check what every run must show and return the line.
fn staleness(url: &str, processes: usize, seconds: &str, extra: &[&str]) -> Value {
    // C/P callers per process: the writer (process 0) uses one, each reader process both of its two.
    let concurrency = (2 * processes).to_string();
    let processes_arg = processes.to_string();
    let mut args = vec![
        "bench",
        "staleness",
        "--url",
        url,
        "--processes",
        &processes_arg,
        "--concurrency",
        &concurrency,
        "--hit-keys",
        "4",
        "--duration",
        seconds,
        "--json",
    ];
    args.extend_from_slice(extra);
    let v = bench_json(&args);
    assert_eq!(v["scenario"], "staleness");
    assert_eq!(v["processes"], processes, "{v}");
    assert_eq!(v["l1_max_stale_ms"], 500, "{v}");
    // The property: no read started more than l1_max_stale after an invalidation of its value returned.
    assert_eq!(v["violations"], 0, "{v}");
    assert!(v["max_stale_us"].as_u64().unwrap() <= 500_000, "{v}");
    // And the run tested something: invalidations of keys and of the class returned while reads were
    // answered by L1.
    assert!(v["key_invalidations"].as_u64().unwrap() > 10, "{v}");
    assert!(v["group_invalidations"].as_u64().unwrap() > 2, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    assert!(ops > 100, "{v}");
    assert!(v["l1_hits"].as_u64().unwrap() > 0, "{v}");
    // Values were loaded again after invalidations (the loader reads the versions).
    assert!(v["loader_calls"].as_u64().unwrap() > 4, "{v}");
    v
}

#[test]
fn redis_staleness_two_and_four_processes_stay_within_the_bound() {
    let server = RedisServer::spawn();
    let two = staleness(&server.url(), 2, "2", &[]);
    assert!(two.get("backplane_kills").is_none(), "{two}");
    let four = staleness(&server.url(), 4, "2", &[]);
    assert_eq!(four["read_errors"], 0, "{four}");
}

#[test]
fn redis_staleness_stays_within_the_bound_while_the_backplane_is_killed() {
    let server = RedisServer::spawn();
    for processes in [2, 4] {
        let v = staleness(
            &server.url(),
            processes,
            "2.5",
            &["--kill-backplane-every", "300"],
        );
        let kills = v["backplane_kills"].as_u64().unwrap();
        assert!(kills >= 5, "{v}");
        // Every round disconnects every process's subscription.
        assert!(
            v["pubsub_clients_killed"].as_u64().unwrap() >= kills * processes as u64 / 2,
            "{v}"
        );
    }
}

#[test]
fn redis_staleness_stays_within_the_bound_while_the_server_pauses() {
    let server = RedisServer::spawn();
    // Pauses longer than l1_max_stale: trust lapses during each, and L1 must start over after it.
    let v = staleness(
        &server.url(),
        3,
        "3",
        &["--pause-every", "1200", "--pause-for", "700"],
    );
    // Every 1.2 s of a 3 s run (a third only if the run overran by 0.6 s).
    assert!((2..=3).contains(&v["pauses"].as_u64().unwrap()), "{v}");
    assert_eq!(v["pause_ms"], 700, "{v}");
    // Reads that waited for the pause to end show in the latency.
    assert!(v["max_us"].as_u64().unwrap() >= 100_000, "{v}");
}

#[test]
fn cluster_staleness_stays_within_the_bound_while_the_backplane_is_killed() {
    let cluster = RedisCluster::spawn();
    let v = staleness(
        &cluster.seed_url(),
        3,
        "2.5",
        &["--kill-backplane-every", "400"],
    );
    assert_eq!(v["backend"], "redis_cluster", "{v}");
    assert!(v["backplane_kills"].as_u64().unwrap() >= 4, "{v}");
    assert!(v["pubsub_clients_killed"].as_u64().unwrap() > 0, "{v}");
}

// Fail-safe: `stale_serve`.

/// The checks every `stale_serve` line must pass: stale values served, no failed read, every op counted by
/// its lookup, and a loader call behind every stale serve (the refill that failed).
fn assert_stale_serve(v: &Value) -> (u64, u64) {
    assert_eq!(v["scenario"], "stale_serve", "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    let stale = v["stale_served"].as_u64().unwrap();
    assert!(stale > 0, "{v}");
    let lookups = v["lookups"].as_object().unwrap();
    let by_lookup: u64 = lookups.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(by_lookup, ops, "{v}");
    let stale_by_lookup: u64 = lookups
        .iter()
        .filter(|(name, _)| name.starts_with("stale_"))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(stale_by_lookup, stale, "{v}");
    assert!(lookups["stale_loader_error"].as_u64().unwrap() > 0, "{v}");
    assert!(v["loader_calls"].as_u64().unwrap() >= stale, "{v}");
    assert!(v["stale_p99_us"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(
        (v["ttl_ms"].as_u64(), v["fail_safe_throttle_ms"].as_u64()),
        (Some(1000), Some(50)),
        "{v}"
    );
    (ops, stale)
}

#[test]
fn redis_stale_serve_serves_stale_values_while_the_loader_fails() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "stale_serve",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "8",
        "--keys",
        "16",
        "--json",
    ]);
    assert_eq!(v["backend"], "redis", "{v}");
    let (ops, stale) = assert_stale_serve(&v);
    // Between two failed refills of a key (50 ms throttle) its reads are plain hits.
    assert!(v["lookups"]["hit"].as_u64().unwrap() > 0, "{v}");
    assert!(stale < ops, "{v}");
    // A stale serve stores the value again: the commit script ran once per stale serve at least.
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert!(cmds["evalsha"].as_u64().unwrap() >= stale, "{v}");
}

#[test]
fn embedded_stale_serve_serves_stale_values_while_the_loader_fails() {
    let v = bench_json(&[
        "bench",
        "stale_serve",
        "--url",
        "mem://",
        "--duration",
        "0.5",
        "--concurrency",
        "4",
        "--keys",
        "4",
        "--json",
    ]);
    assert_eq!(v["backend"], "embedded", "{v}");
    assert_stale_serve(&v);
}

#[test]
fn stale_serve_runs_in_one_process() {
    let server = RedisServer::spawn();
    let out = keyward(&[
        "bench",
        "stale_serve",
        "--url",
        &server.url(),
        "--processes",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("one process"), "{}", stderr(&out));
}

// Streams: `stream_produce` and `stream_e2e`.

/// The checks every stream line must pass: every event published counted once, in calls of `batch`.
fn assert_stream(v: &Value, scenario: &str, batch: u64) -> u64 {
    assert_eq!(v["scenario"], scenario, "{v}");
    assert_eq!(v["batch"], batch, "{v}");
    assert_eq!(v["maxlen"], 10_000, "{v}");
    assert_eq!(v["loader_calls"], 0, "{v}");
    let published = v["published"].as_u64().unwrap();
    let calls = v["publish_calls"].as_u64().unwrap();
    assert!(published > 0, "{v}");
    // Every call publishes `batch` events (stream_e2e's last call may publish fewer).
    assert!(
        calls * batch >= published && (calls - 1) * batch < published,
        "{v}"
    );
    assert!(
        v["p99_us"].as_u64().unwrap() >= v["p50_us"].as_u64().unwrap(),
        "{v}"
    );
    published
}

#[test]
fn embedded_stream_produce_counts_every_event() {
    let v = bench_json(&[
        "bench",
        "stream_produce",
        "--url",
        "mem://",
        "--duration",
        "0.5",
        "--concurrency",
        "4",
        "--json",
    ]);
    let published = assert_stream(&v, "stream_produce", 1);
    assert_eq!(v["ops"].as_u64(), Some(published), "{v}");
    assert!(v.get("messages").is_none(), "{v}");
}

#[test]
fn redis_stream_produce_sends_at_most_one_script_per_call() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "stream_produce",
        "--url",
        &server.url(),
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--batch",
        "8",
        "--json",
    ]);
    assert_eq!(v["backend"], "redis", "{v}");
    let published = assert_stream(&v, "stream_produce", 8);
    assert_eq!(v["ops"].as_u64(), Some(published), "{v}");
    let cmds = v["redis_cmds"].as_object().unwrap();
    // One plain XADD per event; the warm-up publish ran before the measured phase. Concurrent calls are
    // batched: one round trip (its XADDs, then one `EVAL` of the retention script) carries one to four (the
    // loops) calls. No `EVALSHA`: a `NOSCRIPT` after the XADDs could not be retried without duplicates.
    assert_eq!(cmds["xadd"].as_u64(), Some(published), "{v}");
    assert!(!cmds.contains_key("evalsha"), "{v}");
    let (scripts, calls) = (
        cmds["eval"].as_u64().unwrap(),
        v["publish_calls"].as_u64().unwrap(),
    );
    assert!(scripts <= calls && scripts * 4 >= calls, "{v}");
    assert!(v["redis_cmds_per_op"].as_f64().unwrap() > 1.0, "{v}");
}

/// Run `stream_e2e` and check that every message was handled once and acknowledged.
fn stream_e2e(url: &str, messages: u64, extra: &[&str]) -> Value {
    let n = messages.to_string();
    let mut args = vec![
        "bench",
        "stream_e2e",
        "--url",
        url,
        "--messages",
        &n,
        "--json",
    ];
    args.extend_from_slice(extra);
    let v = bench_json(&args);
    let batch = v["batch"].as_u64().unwrap();
    assert_eq!(assert_stream(&v, "stream_e2e", batch), messages, "{v}");
    assert_eq!(v["messages"].as_u64(), Some(messages), "{v}");
    assert_eq!(v["ops"].as_u64(), Some(messages), "{v}");
    assert_eq!(v["handled"].as_u64(), Some(messages), "{v}");
    assert_eq!(v["duplicates"], 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["dead_lettered"], 0, "{v}");
    assert!(v["drain_polls"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["seconds"].as_f64().unwrap() > 0.0, "{v}");
    v
}

#[test]
fn embedded_stream_e2e_handles_every_message() {
    let v = stream_e2e("mem://", 300, &["--concurrency", "8"]);
    assert_eq!(v["backend"], "embedded", "{v}");
    assert_eq!(v["publish_calls"], 300, "{v}");
}

#[test]
fn redis_stream_e2e_acknowledges_every_message() {
    let server = RedisServer::spawn();
    let v = stream_e2e(
        &server.url(),
        1000,
        &["--concurrency", "16", "--batch", "10"],
    );
    assert_eq!(v["publish_calls"], 100, "{v}");
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert_eq!(cmds["xadd"], 1000, "{v}");
    assert_acks_batched(cmds, 1000, &v);
}

/// Every message was acknowledged (the run ends only once the group has nothing pending), by `XACK` calls
/// that each carry the entries whose handlers finished together: at least one, at most one per message.
fn assert_acks_batched(cmds: &serde_json::Map<String, Value>, messages: u64, v: &Value) {
    let xack = cmds["xack"].as_u64().unwrap();
    assert!((1..=messages).contains(&xack), "{v}");
}

/// The producer keeps `--inflight` publishes outstanding; they share round trips through the stream's
/// batching (one `EVAL` of the retention script per round trip; the workers' scripts go as `EVALSHA`, `EVAL`
/// only on their first call).
#[test]
fn redis_stream_e2e_keeps_publishes_in_flight() {
    let server = RedisServer::spawn();
    let v = stream_e2e(
        &server.url(),
        1000,
        &["--concurrency", "16", "--inflight", "32"],
    );
    assert_eq!(v["inflight"], 32, "{v}");
    assert_eq!(v["publish_calls"], 1000, "{v}");
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert_eq!(cmds["xadd"], 1000, "{v}");
    let round_trips = cmds["eval"].as_u64().unwrap();
    assert!(
        round_trips <= 500,
        "1000 publishes in {round_trips} round trips: {v}"
    );
    let one = stream_e2e(
        &server.url(),
        200,
        &["--concurrency", "4", "--inflight", "1"],
    );
    assert_eq!(one["inflight"], 1, "{one}");
}

#[test]
fn redis_stream_e2e_with_worker_processes_acknowledges_every_message() {
    let server = RedisServer::spawn();
    let v = stream_e2e(
        &server.url(),
        1000,
        &["--concurrency", "8", "--processes", "2", "--batch", "4"],
    );
    assert_eq!(v["processes"], 2, "{v}");
    assert_eq!(v["publish_calls"], 250, "{v}");
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert_acks_batched(cmds, 1000, &v);
    // Each worker process created the group, or found it (BUSYGROUP).
    assert!(cmds["xgroup|create"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn bad_stream_flags_exit_2() {
    for args in [
        &["bench", "stream_e2e", "--url", "mem://", "--messages", "0"][..],
        &["bench", "stream_produce", "--url", "mem://", "--batch", "0"][..],
        &["bench", "stream_e2e", "--url", "mem://", "--inflight", "0"][..],
        &[
            "bench",
            "stream_produce",
            "--url",
            "mem://",
            "--batch",
            "10001",
        ][..],
    ] {
        let out = keyward(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn redis_stream_chaos_loses_nothing_while_workers_are_killed() {
    let server = RedisServer::spawn();
    let v = bench_json(&[
        "bench",
        "stream_chaos",
        "--url",
        &server.url(),
        "--messages",
        "3000",
        "--processes",
        "3",
        "--concurrency",
        "6",
        "--kill-every",
        "150",
        "--json",
    ]);
    assert_eq!(assert_stream(&v, "stream_chaos", 1), 3000, "{v}");
    assert_eq!(v["kill_every_ms"], 150, "{v}");
    // The property: every event was handled (and recorded) or dead-lettered.
    assert_eq!(v["lost"], 0, "{v}");
    // Workers were killed while the producer published (3000 single publishes take well over 150 ms).
    assert!(v["kills"].as_u64().unwrap() >= 1, "{v}");
    let (handled, duplicates, dead) = (
        v["handled"].as_u64().unwrap(),
        v["duplicates"].as_u64().unwrap(),
        v["dead_lettered"].as_u64().unwrap(),
    );
    // Every event counted once, plus the duplicates, except the dead letters that never succeeded.
    assert!(handled + dead >= 3000, "{v}");
    assert!(handled <= 3000 + duplicates, "{v}");
    // Each successful handler call counted itself once (a failed HINCRBY would have failed the delivery).
    let cmds = v["redis_cmds"].as_object().unwrap();
    assert_eq!(cmds["hincrby"].as_u64(), Some(handled), "{v}");
}

#[test]
fn stream_chaos_needs_worker_processes_and_kill_every_needs_it() {
    let server = RedisServer::spawn();
    let out = keyward(&["bench", "stream_chaos", "--url", &server.url()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--processes 2"), "{}", stderr(&out));
    let out = keyward(&[
        "bench",
        "stream_e2e",
        "--url",
        "mem://",
        "--kill-every",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("stream_chaos"), "{}", stderr(&out));
}
