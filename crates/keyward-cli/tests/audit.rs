//! `keyward audit` end to end against throwaway servers (keyward-testkit): a messy fixture keyspace where
//! the audit must find exactly the planted violations (JSON and table), resume after a stop with the same
//! result, run as the documented read-only ACL user, walk every primary of a Cluster, and hold its pace.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use keyward::key::KeySpace;
use keyward::policy::Policy;
use keyward_testkit::{RedisCluster, RedisServer, ServerOptions};
use serde_json::Value;

const POLICY: &str = r#"
[namespace]
env = "prod"
app = "shop"

[classes.product_list]
kind = "cache"
ttl = "10m"
version = 2
max_value_bytes = 1024
invalidation = "catalog service"

[classes.web_session]
kind = "session"
idle = "30m"
absolute = "12h"

[classes.invoice_run]
kind = "lock"
ttl = "30s"

[classes.orders]
kind = "stream"
retention = { maxlen = 100 }
"#;

/// The read-only ACL rule documented in docs/cli.md (after `ACL SETUSER <user> on ><password>`).
const ACL_RULE: &[&str] = &[
    "resetkeys",
    "%R~*",
    "resetchannels",
    "-@all",
    "+scan",
    "+type",
    "+pttl",
    "+memory|usage",
    "+strlen",
    "+hstrlen",
    "+dbsize",
    "+config|get",
    "+cluster|nodes",
    "+xlen",
    "+xrange",
    "+xinfo|groups",
    "+xpending",
    "+ping",
    "+info",
];

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .output()
        .expect("run the keyward binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_policy(dir: &Path, text: &str) -> String {
    let file = dir.join("policy.toml");
    std::fs::write(&file, text).unwrap();
    file.to_str().unwrap().to_owned()
}

fn run(conn: &mut redis::Connection, cmd: &mut redis::Cmd) {
    cmd.query::<redis::Value>(conn).expect("fixture command");
}

/// Builds the fixture: keys keyward would write (clean), and the planted violations listed in
/// [`assert_planted`].
fn fixture(conn: &mut redis::Connection) {
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let cache = KeySpace::new(&policy, "product_list").unwrap();
    // Clean keyward keys, with escaped, unicode and brace ids.
    for id in ["en", "caf\u{e9}", "a{b}c", "x:y", "\u{1F600} *"] {
        let key = cache.key(&("list", id)).unwrap();
        run(
            conn,
            redis::cmd("SET").arg(&key).arg("v").arg("PX").arg(600_000),
        );
    }
    let lock = KeySpace::new(&policy, "invoice_run")
        .unwrap()
        .key("nightly")
        .unwrap();
    run(
        conn,
        redis::cmd("SET").arg(&lock).arg("t").arg("PX").arg(20_000),
    );
    run(
        conn,
        redis::cmd("SET")
            .arg(format!("{lock}:f"))
            .arg("7")
            .arg("PX")
            .arg(86_400_000),
    );
    let index = KeySpace::new(&policy, "web_session")
        .unwrap()
        .key(&["u", "alice"])
        .unwrap();
    run(conn, redis::cmd("ZADD").arg(&index).arg(1).arg("s"));
    run(conn, redis::cmd("PEXPIRE").arg(&index).arg(3_600_000));
    run(
        conn,
        redis::cmd("HSET")
            .arg("prod:shop:_kw:gens")
            .arg("c")
            .arg("1"),
    );
    run(
        conn,
        redis::cmd("PEXPIRE")
            .arg("prod:shop:_kw:gens")
            .arg(3_600_000),
    );
    let orders = KeySpace::new(&policy, "orders")
        .unwrap()
        .key("orders")
        .unwrap();
    for i in 0..10 {
        run(
            conn,
            redis::cmd("XADD")
                .arg(&orders)
                .arg("MAXLEN")
                .arg(100)
                .arg("*")
                .arg("m")
                .arg(i),
        );
    }
    run(
        conn,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&orders)
            .arg("workers")
            .arg("$"),
    );

    // Planted: a hand-formatted key without TTL.
    run(
        conn,
        redis::cmd("SET").arg("app:v1:products:list:en").arg("[]"),
    );
    // Planted: another service's sessions (with TTLs).
    for id in ["8f3a9c", "17", "42", "d00d1e", "99"] {
        run(
            conn,
            redis::cmd("SET")
                .arg(format!("prod:user:session:{id}"))
                .arg("s")
                .arg("EX")
                .arg(3600),
        );
    }
    // Planted: an untrimmed stream with a stuck group (one pending entry idle for an hour).
    for i in 0..300 {
        run(
            conn,
            redis::cmd("XADD")
                .arg("events:raw")
                .arg("*")
                .arg("n")
                .arg(i),
        );
    }
    run(
        conn,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("events:raw")
            .arg("g")
            .arg("0"),
    );
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("events:raw")
        .arg(">")
        .query(conn)
        .unwrap();
    let first_id = first_stream_id(&read);
    run(
        conn,
        redis::cmd("XCLAIM")
            .arg("events:raw")
            .arg("g")
            .arg("c1")
            .arg(0)
            .arg(&first_id)
            .arg("IDLE")
            .arg(3_600_000),
    );
    // Planted: a big hash without TTL, a big sorted set with one.
    let mut hset = redis::cmd("HSET");
    hset.arg("legacy:cart:{user:17}");
    for i in 0..2000 {
        hset.arg(format!("f{i}")).arg("xxxxxxxxxxxxxxxx");
    }
    run(conn, &mut hset);
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("leaderboard:2024");
    for i in 0..2000 {
        zadd.arg(i).arg(format!("player{i}"));
    }
    run(conn, &mut zadd);
    run(conn, redis::cmd("EXPIRE").arg("leaderboard:2024").arg(100));
    // Planted: binary and unicode names.
    run(
        conn,
        redis::cmd("SET")
            .arg(&b"bin:\xff\x00"[..])
            .arg("b")
            .arg("EX")
            .arg(100),
    );
    run(
        conn,
        redis::cmd("SET")
            .arg("caf\u{e9}:menu")
            .arg("m")
            .arg("EX")
            .arg(100),
    );
    // Planted: an old version (3 keys), a TTL over the class's bound, a value over max_value_bytes, a class
    // key without TTL, a hand-made key inside the namespace.
    for id in ["en", "de", "fr"] {
        let key = format!("prod:shop:product_list:v1:{{list:{id}}}");
        run(
            conn,
            redis::cmd("SET").arg(key).arg("old").arg("PX").arg(600_000),
        );
    }
    let long = cache.key(&("list", "long")).unwrap();
    run(
        conn,
        redis::cmd("SET")
            .arg(&long)
            .arg("v")
            .arg("PX")
            .arg(10 * 86_400_000_u64),
    );
    let big = cache.key(&("list", "big")).unwrap();
    run(
        conn,
        redis::cmd("SET")
            .arg(&big)
            .arg("x".repeat(5000))
            .arg("PX")
            .arg(600_000),
    );
    let forever = cache.key(&("list", "forever")).unwrap();
    run(conn, redis::cmd("SET").arg(&forever).arg("v"));
    run(
        conn,
        redis::cmd("SET")
            .arg("prod:shop:product_list:v2:handmade")
            .arg("v")
            .arg("EX")
            .arg(100),
    );
    // Planted: a non-empty dead-letter stream.
    run(
        conn,
        redis::cmd("XADD")
            .arg(format!("{orders}:dead"))
            .arg("*")
            .arg("m")
            .arg("failed"),
    );
    // Planted: an evicting maxmemory-policy while the policy has never-evict classes.
    run(
        conn,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-lru"),
    );
}

/// Total keys of [`fixture`].
const FIXTURE_KEYS: u64 = 5 + 2 + 1 + 1 + 1 + 1 + 5 + 1 + 2 + 2 + 3 + 3 + 1 + 1;

fn first_stream_id(reply: &redis::Value) -> String {
    // [[stream, [[id, [fields]]]]] (RESP2)
    let redis::Value::Array(streams) = reply else {
        panic!("{reply:?}")
    };
    let redis::Value::Array(stream) = &streams[0] else {
        panic!("{reply:?}")
    };
    let redis::Value::Array(entries) = &stream[1] else {
        panic!("{reply:?}")
    };
    let redis::Value::Array(entry) = &entries[0] else {
        panic!("{reply:?}")
    };
    match &entry[0] {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("{other:?}"),
    }
}

fn set(v: &Value, list: &str, field: &str) -> BTreeSet<String> {
    v["violations"][list]
        .as_array()
        .unwrap_or_else(|| panic!("violations.{list} in {v}"))
        .iter()
        .map(|e| e[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The planted violations, exactly.
fn assert_planted(v: &Value) {
    assert_eq!(v["complete"], true, "{v:#}");
    assert_eq!(v["total"]["keys"], FIXTURE_KEYS, "{v:#}");
    let no_ttl: BTreeSet<String> = v["violations"]["no_ttl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{}{} {}",
                n["class"].as_str().unwrap_or(""),
                n["pattern"].as_str().unwrap_or(""),
                n["keys"]
            )
        })
        .collect();
    assert_eq!(
        no_ttl,
        strings(&[
            "product_list 1",
            "app:v1:products:list:en 1",
            "events:raw 1",
            "legacy:cart:{user:*} 1"
        ]),
        "{v:#}"
    );
    let outside: BTreeSet<String> = v["violations"]["outside_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{} {} {}",
                o["pattern"].as_str().unwrap(),
                o["keys"],
                o["in_namespace"]
            )
        })
        .collect();
    assert_eq!(
        outside,
        strings(&[
            "app:v1:products:list:en 1 false",
            "prod:user:session:* 5 false",
            "events:raw 1 false",
            "legacy:cart:{user:*} 1 false",
            "leaderboard:* 1 false",
            "bin:* 1 false",
            "*:menu 1 false",
            "prod:shop:product_list:v2:handmade 1 true",
        ]),
        "{v:#}"
    );
    let old = &v["violations"]["old_versions"];
    assert_eq!(old.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(
        (
            old[0]["class"].as_str(),
            old[0]["version"].as_u64(),
            old[0]["keys"].as_u64()
        ),
        (Some("product_list"), Some(1), Some(3))
    );
    assert!(old[0]["reclaimable_bytes"].as_u64().unwrap() > 0);
    let long = &v["violations"]["ttl_too_long"];
    assert_eq!(long.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(
        (long[0]["class"].as_str(), long[0]["keys"].as_u64()),
        (Some("product_list"), Some(1))
    );
    let over = &v["violations"]["over_max_value"];
    assert_eq!(over.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(over[0]["examples"][0]["bytes"], 5000, "{v:#}");
    assert_eq!(
        set(v, "streams_without_retention", "key"),
        strings(&["events:raw"])
    );
    assert!(
        v["violations"]["streams_over_retention"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{v:#}"
    );
    let stuck = &v["violations"]["stuck_groups"];
    assert_eq!(stuck.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(
        (
            stuck[0]["stream"].as_str(),
            stuck[0]["group"].as_str(),
            stuck[0]["pending_idle"].as_u64()
        ),
        (Some("events:raw"), Some("g"), Some(1))
    );
    let dead = &v["violations"]["dead_letters"];
    assert_eq!(dead.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(dead[0]["key"], "prod:shop:orders:v1:{orders}:dead");
    assert_eq!(
        set(v, "server_settings", "setting"),
        strings(&["maxmemory-policy", "save/appendonly"])
    );
    assert_eq!(
        v["violations"]["total"],
        4 + 8 + 1 + 1 + 1 + 1 + 1 + 1 + 2,
        "{v:#}"
    );
    // Per class: the clean keys plus the planted ones, by version.
    let classes = v["classes"].as_array().unwrap();
    let pl = classes
        .iter()
        .find(|c| c["name"] == "product_list")
        .unwrap();
    assert_eq!(pl["keys"], 5 + 3 + 3);
    assert_eq!(
        pl["biggest"][0]["key"],
        "prod:shop:product_list:v2:{list:big}"
    );
    let lock = classes.iter().find(|c| c["name"] == "invoice_run").unwrap();
    assert_eq!(lock["keys"], 2);
    assert_eq!(v["internal"]["keys"], 1);
}

fn audit_json(args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    let out = keyward(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\nstderr: {}", stderr(&out)));
    (out.status.code(), v, stderr(&out))
}

#[test]
fn audit_finds_exactly_the_planted_violations_and_resumes_to_the_same_result() {
    let server = RedisServer::spawn();
    fixture(&mut server.connection());
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let url = server.url();
    let cp = dir.path().join("cp");
    let cp = cp.to_str().unwrap();

    let (code, one_pass, err) =
        audit_json(&["--policy", &policy, "--url", &url, "--checkpoint-dir", cp]);
    assert_eq!(code, Some(3), "{err}");
    assert_planted(&one_pass);

    let table = keyward(&[
        "audit",
        "--policy",
        &policy,
        "--url",
        &url,
        "--checkpoint-dir",
        cp,
    ]);
    assert_eq!(table.status.code(), Some(3), "{}", stderr(&table));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert_a_row_per_version(&one_pass, &table);
    for line in [
        "VIOLATIONS: 20",
        "no TTL: pattern app:v1:products:list:en: 1 key,",
        "outside any class: prod:user:session:*: 5 keys",
        "old version: class product_list v1 (current v2): 3 keys",
        "stuck group: events:raw group g: 1 of 1 entry pending idle over 1 m",
        "dead letters: prod:shop:orders:v1:{orders}:dead",
        "stream without retention: events:raw (300 entries)",
        "bin:\\xff\\x00",
    ] {
        assert!(table.contains(line), "{line:?} missing from:\n{table}");
    }

    // Stopped every few keys and resumed until done: the same report as one pass.
    let (code, mut last, err) = audit_json(&[
        "--policy",
        &policy,
        "--url",
        &url,
        "--checkpoint-dir",
        cp,
        "--count",
        "3",
        "--limit-keys",
        "4",
    ]);
    assert_eq!(code, Some(4), "{err}");
    let mut token = last["resume_token"].as_str().unwrap().to_owned();
    assert!(err.contains(&format!("--resume {token}")), "{err}");
    let mut runs = 1;
    loop {
        let (code, v, err) = audit_json(&[
            "--policy",
            &policy,
            "--url",
            &url,
            "--checkpoint-dir",
            cp,
            "--count",
            "3",
            "--limit-keys",
            "4",
            "--resume",
            &token,
        ]);
        runs += 1;
        last = v;
        if code == Some(3) {
            break;
        }
        assert_eq!(code, Some(4), "{err}");
        assert_eq!(last["resume_token"].as_str(), Some(token.as_str()));
        token = last["resume_token"].as_str().unwrap().to_owned();
        assert!(runs < 100, "the resumed audit never finished");
    }
    assert!(runs >= 3, "expected several stops, got {runs}");
    assert_planted(&last);
    // Remaining TTLs shrink between the runs: compare everything else.
    let mut one_pass = one_pass;
    for v in [&mut last, &mut one_pass] {
        v["violations"]["ttl_too_long"][0]["examples"][0]["ttl_ms"] = Value::Null;
    }
    for field in ["total", "classes", "internal", "violations"] {
        assert_eq!(
            last[field], one_pass[field],
            "{field} differs after resuming"
        );
    }
    // The finished audit removed its checkpoint: the token is spent.
    let out = keyward(&[
        "audit",
        "--policy",
        &policy,
        "--url",
        &url,
        "--checkpoint-dir",
        cp,
        "--resume",
        &token,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn the_documented_read_only_user_can_run_the_audit() {
    let mut server = RedisServer::spawn();
    let mut conn = server.connection();
    fixture(&mut conn);
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("keyward-audit")
        .arg("on")
        .arg(">audit-pw");
    for rule in ACL_RULE {
        setuser.arg(*rule);
    }
    run(&mut conn, &mut setuser);
    server.set_url_credentials(Some(("keyward-audit", "audit-pw")));
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let (code, v, err) = audit_json(&["--policy", &policy, "--url", &server.url()]);
    assert_eq!(code, Some(3), "{err}");
    assert_planted(&v);
    // The rule is read-only: the same user cannot write.
    let client = redis::Client::open(server.url()).unwrap();
    let mut ro = client.get_connection().unwrap();
    let denied = redis::cmd("SET").arg("x").arg("1").query::<()>(&mut ro);
    assert!(denied.is_err(), "the audit user could write");
}

#[test]
fn a_clean_keyspace_exits_0_and_errors_exit_1_or_2() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let policy_text = "[namespace]\nenv = \"prod\"\napp = \"shop\"\n\n[classes.product_list]\nkind = \"cache\"\nttl = \"10m\"\ninvalidation = \"x\"\n";
    let policy = Policy::from_toml_str(policy_text).unwrap();
    let cache = KeySpace::new(&policy, "product_list").unwrap();
    for i in 0..50 {
        run(
            &mut conn,
            redis::cmd("SET")
                .arg(cache.key(&i).unwrap())
                .arg("v")
                .arg("PX")
                .arg(60_000),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), policy_text);
    let out = keyward(&["audit", "--policy", &file, "--url", &server.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no violations"), "{text}");
    assert!(text.contains("product_list"), "{text}");

    let down = keyward(&["audit", "--policy", &file, "--url", "redis://127.0.0.1:1"]);
    assert_eq!(down.status.code(), Some(1), "{}", stderr(&down));
    assert!(stderr(&down).starts_with("error: "), "{}", stderr(&down));
    let bad = keyward(&[
        "audit",
        "--policy",
        &file,
        "--url",
        &server.url(),
        "--resume",
        "nonsense",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("--resume"), "{}", stderr(&bad));
}

#[test]
fn audit_walks_every_primary_of_a_cluster() {
    let cluster = RedisCluster::shared();
    let text = POLICY.replace("app = \"shop\"", "app = \"auditcl\"");
    let policy = Policy::from_toml_str(&text).unwrap();
    let cache = KeySpace::new(&policy, "product_list").unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut primaries = BTreeSet::new();
    for i in 0..60 {
        let key = cache.key(&i).unwrap();
        primaries.insert(cluster.master_for_key(&key).port);
        redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .arg("PX")
            .arg(600_000)
            .query::<()>(&mut conn)
            .unwrap();
    }
    for i in 0..9 {
        let key = format!("prod:auditcl:product_list:v1:{{{i}}}");
        redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .arg("PX")
            .arg(600_000)
            .query::<()>(&mut conn)
            .unwrap();
    }
    assert_eq!(
        primaries.len(),
        3,
        "the keys should spread over the three primaries"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), &text);
    // Other tests may share this cluster: count only this namespace's classes.
    let (code, v, err) = audit_json(&[
        "--policy",
        &file,
        "--url",
        &cluster.seed_url(),
        "--count",
        "7",
        "--limit-keys",
        "20",
    ]);
    assert_eq!(code, Some(4), "{err}");
    let mut token = v["resume_token"].as_str().unwrap().to_owned();
    let v = loop {
        let (code, v, err) = audit_json(&[
            "--policy",
            &file,
            "--url",
            &cluster.seed_url(),
            "--count",
            "7",
            "--limit-keys",
            "20",
            "--resume",
            &token,
        ]);
        if code != Some(4) {
            assert!(code == Some(0) || code == Some(3), "{err}");
            break v;
        }
        token = v["resume_token"].as_str().unwrap().to_owned();
    };
    assert_eq!(v["servers"].as_array().unwrap().len(), 3, "{v:#}");
    let classes = v["classes"].as_array().unwrap();
    let pl = classes
        .iter()
        .find(|c| c["name"] == "product_list")
        .unwrap();
    assert_eq!(pl["keys"], 69, "{v:#}");
    let old = v["violations"]["old_versions"].as_array().unwrap();
    assert_eq!(old.len(), 1, "{v:#}");
    assert_eq!(old[0]["keys"], 9);
}

#[test]
fn the_walk_holds_its_pace_on_many_small_keys() {
    let server =
        RedisServer::spawn_with(ServerOptions::default().args(["--enable-debug-command", "yes"]));
    let mut conn = server.connection();
    run(
        &mut conn,
        redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(200_000)
            .arg("key")
            .arg(8),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), "[namespace]\nenv = \"prod\"\napp = \"shop\"\n");
    let max = 400_000_u64;
    let (code, v, err) = audit_json(&[
        "--policy",
        &file,
        "--url",
        &server.url(),
        "--max-ops-per-sec",
        &max.to_string(),
        "--count",
        "500",
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(v["scan"]["keys_scanned"], 200_000);
    assert_eq!(v["violations"]["no_ttl"][0]["keys"], 200_000);
    assert_eq!(v["violations"]["outside_classes"][0]["pattern"], "key:*");
    let commands = v["scan"]["commands"].as_f64().unwrap();
    let seconds = v["scan"]["seconds"].as_f64().unwrap();
    assert!(commands >= 600_000.0, "{v:#}");
    // The pace is a ceiling: never faster than --max-ops-per-sec (5 % for the first batch's head start).
    assert!(
        commands / seconds <= max as f64 * 1.05,
        "{commands} commands in {seconds} s exceed {max}/s"
    );
}

#[test]
fn sigterm_saves_a_checkpoint_and_the_resumed_audit_finishes() {
    let server =
        RedisServer::spawn_with(ServerOptions::default().args(["--enable-debug-command", "yes"]));
    let mut conn = server.connection();
    run(
        &mut conn,
        redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(50_000)
            .arg("key")
            .arg(8),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), "[namespace]\nenv = \"prod\"\napp = \"shop\"\n");
    let cp = dir.path().join("cp");
    let cp = cp.to_str().unwrap();
    // Slow enough (about 15 s for the whole keyspace) to be caught in the middle.
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "audit",
            "--json",
            "--policy",
            &file,
            "--url",
            &server.url(),
            "--checkpoint-dir",
            cp,
        ])
        .args(["--max-ops-per-sec", "10000"])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_ENV")
        .env_remove("KEYWARD_APP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (with a deadline) until the walk has started: the server has run a SCAN. (Not `MEMORY`: the audit
    // probes its commands once on a plain key before it installs its signal handler and walks.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut conn)
            .unwrap();
        if stats.contains("cmdstat_scan") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit never started"
        );
        std::thread::yield_now();
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["complete"], false);
    let scanned = v["scan"]["keys_scanned"].as_u64().unwrap();
    assert!(scanned < 50_000, "{v:#}");
    let token = v["resume_token"].as_str().unwrap().to_owned();
    assert!(
        stderr(&out).contains(&format!("--resume {token}")),
        "{}",
        stderr(&out)
    );

    let (code, v, err) = audit_json(&[
        "--policy",
        &file,
        "--url",
        &server.url(),
        "--checkpoint-dir",
        cp,
        "--resume",
        &token,
        "--count",
        "500",
        "--max-ops-per-sec",
        "10000000",
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(v["complete"], true);
    assert_eq!(v["total"]["keys"], 50_000, "{v:#}");
    assert_eq!(v["violations"]["no_ttl"][0]["keys"], 50_000, "{v:#}");
}

/// The table has one row per class *and version present*, each with the version of its keys: the fixture's
/// `product_list` has keys of v1 (old) and v2 (current). The table used to show one row per class labelled
/// with the current version while counting every version's keys.
fn assert_a_row_per_version(report: &Value, table: &str) {
    // (class, version, keys) from the JSON, which has always been per version.
    let mut expected = BTreeSet::new();
    for class in report["classes"].as_array().unwrap() {
        for v in class["versions"].as_array().unwrap() {
            expected.insert((
                class["name"].as_str().unwrap().to_owned(),
                format!("v{}", v["version"]),
                v["keys"].as_u64().unwrap(),
            ));
        }
    }
    assert!(
        expected.contains(&("product_list".to_owned(), "v1".to_owned(), 3)),
        "the fixture plants 3 product_list v1 keys: {expected:?}"
    );
    let names: BTreeSet<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
    let rows: BTreeSet<(String, String, u64)> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            // CLASS KIND VER [old|new] COUNT MEMORY …
            if !names.contains(cells.first()?) {
                return None;
            }
            let count_at = if matches!(cells.get(3), Some(&"old" | &"new")) {
                4
            } else {
                3
            };
            Some((
                cells[0].to_owned(),
                cells[2].to_owned(),
                cells.get(count_at)?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(rows, expected, "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("product_list")
            && l.split_whitespace().nth(2) == Some("v1")
            && l.split_whitespace().nth(3) == Some("old")),
        "an old version is marked old:\n{table}"
    );
}
