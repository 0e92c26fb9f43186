//! `keyward purge` end to end against throwaway servers (keyward-testkit): the dry run deletes nothing, a
//! confirmed purge deletes exactly the selected keys (checked key by key) and logs itself, a purge stopped
//! and resumed ends the same, refusals exit 2, and a Cluster is purged on every primary.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use keyward::key::KeySpace;
use keyward::policy::Policy;
use keyward_testkit::{RedisCluster, RedisServer};

const POLICY: &str = r#"
[namespace]
env = "prod"
app = "shop"

[classes.product_list]
kind = "cache"
ttl = "10m"
version = 3
invalidation = "catalog service"

[classes.invoice_run]
kind = "lock"
ttl = "30s"
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

/// Every key of the server, by SCAN (a test may look at everything).
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

fn set(conn: &mut redis::Connection, key: &[u8], px: Option<u64>) {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg("v");
    if let Some(px) = px {
        cmd.arg("PX").arg(px);
    }
    cmd.query::<()>(conn).unwrap();
}

/// A server with the [`fixture`], the v1 keys it planted, and the policy file (in the returned directory).
fn setup() -> (
    RedisServer,
    redis::Connection,
    BTreeSet<Vec<u8>>,
    tempfile::TempDir,
    String,
) {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let v1 = fixture(&mut conn);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap().to_owned();
    (server, conn, v1, dir, policy)
}

/// Returns the keys of `product_list` v1 (the ones a `--version 1` purge must delete).
fn fixture(conn: &mut redis::Connection) -> BTreeSet<Vec<u8>> {
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let v3 = KeySpace::new(&policy, "product_list").unwrap();
    let mut v1 = BTreeSet::new();
    for i in 0..40 {
        let id = format!("caf\u{e9} {i}");
        let current = v3.key(&("en", id.as_str())).unwrap();
        set(conn, current.as_bytes(), Some(600_000));
        let old = current.replacen(":v3:", ":v1:", 1);
        set(conn, old.as_bytes(), Some(600_000));
        v1.insert(old.into_bytes());
        let v2 = current.replacen(":v3:", ":v2:", 1);
        set(conn, v2.as_bytes(), Some(600_000));
    }
    // Look-alikes that are not keyward keys of v1: they must survive a version purge.
    set(conn, b"prod:shop:product_list:v1:handmade", None);
    set(conn, b"prod:shop:product_list:v10:{x}", Some(600_000));
    set(conn, b"prod:shop:product_listing:v1:{x}", Some(600_000));
    set(conn, b"app:v1:products:list:en", None);
    set(conn, b"prod:shop:_kw:gens", Some(600_000));
    v1
}

#[test]
fn dry_run_deletes_nothing_and_confirm_deletes_exactly_the_old_version() {
    let (server, mut conn, v1, _dir, policy) = setup();
    let policy = policy.as_str();
    let url = server.url();
    let before = all_keys(&mut conn);

    let dry = keyward(&[
        "purge",
        "--policy",
        policy,
        "--url",
        &url,
        "--class",
        "product_list",
        "--version",
        "1",
    ]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry.stderr));
    let out = text(&dry.stdout);
    assert!(out.starts_with("DRY RUN — nothing deleted"), "{out}");
    assert!(
        out.contains("class product_list v1 in namespace prod:shop: 40 keys"),
        "{out}"
    );
    assert!(
        out.contains("prod:shop:product_list:v1:{en:caf\u{e9}%20"),
        "{out}"
    );
    assert_eq!(all_keys(&mut conn), before, "the dry run deleted something");

    let wet = keyward(&[
        "purge",
        "--policy",
        policy,
        "--url",
        &url,
        "--class",
        "product_list",
        "--version",
        "1",
        "--confirm",
        "product_list",
    ]);
    assert_eq!(wet.status.code(), Some(0), "{}", text(&wet.stderr));
    assert!(
        text(&wet.stdout).contains("deleted 40 keys"),
        "{}",
        text(&wet.stdout)
    );
    let after = all_keys(&mut conn);
    let gone: BTreeSet<Vec<u8>> = before.difference(&after).cloned().collect();
    assert_eq!(gone, v1, "deleted exactly the v1 keys, key by key");
    let added: Vec<_> = after.difference(&before).collect();
    assert_eq!(
        added,
        [&b"prod:shop:_kw:purges".to_vec()],
        "only the purge log was added"
    );
    let log: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg("prod:shop:_kw:purges")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    // One entry before the first delete, one at the end.
    assert_eq!(log.len(), 2);
    let fields_of = |i: usize| -> Vec<(&str, &str)> {
        log[i]
            .1
            .chunks(2)
            .map(|kv| (kv[0].as_str(), kv[1].as_str()))
            .collect()
    };
    let started = fields_of(0);
    for expected in [
        ("what", "class product_list v1"),
        ("deleted", "0"),
        ("complete", "started"),
    ] {
        assert!(
            started.contains(&expected),
            "{expected:?} not in {started:?}"
        );
    }
    let fields = fields_of(1);
    for expected in [
        ("what", "class product_list v1"),
        ("deleted", "40"),
        ("skipped", "0"),
        ("complete", "yes"),
    ] {
        assert!(fields.contains(&expected), "{expected:?} not in {fields:?}");
    }
    assert!(
        fields.iter().any(|(k, v)| *k == "who" && !v.is_empty()),
        "{fields:?}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("prod:shop:_kw:purges")
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0, "the purge log has a TTL");

    // keyward's own log is bounded (MAXLEN and a TTL): an audit after a purge does not report it, or every
    // deploy gated on the audit would fail for 90 days after someone purged (found by a fresh-user trial).
    let checkpoints = tempfile::tempdir().unwrap();
    let audit = keyward(&[
        "audit",
        "--policy",
        policy,
        "--url",
        &url,
        "--json",
        "--checkpoint-dir",
        checkpoints.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&audit.stderr)));
    let v = &report["violations"];
    for list in [
        "streams_without_retention",
        "streams_over_retention",
        "no_ttl",
        "outside_classes",
    ] {
        assert!(
            !v[list].to_string().contains("_kw:purges"),
            "{list}: {}",
            v[list]
        );
    }
}

#[test]
fn orphans_go_and_nothing_a_class_owns() {
    let (server, mut conn, _, _dir, policy) = setup();
    let policy = policy.as_str();
    let before = all_keys(&mut conn);
    let out = keyward(&[
        "purge",
        "--policy",
        policy,
        "--url",
        &server.url(),
        "--orphans",
        "prod:shop:*",
        "--confirm",
        "prod:shop:*",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let after = all_keys(&mut conn);
    let gone: BTreeSet<Vec<u8>> = before.difference(&after).cloned().collect();
    let expected: BTreeSet<Vec<u8>> = [
        &b"prod:shop:product_list:v1:handmade"[..],
        b"prod:shop:product_listing:v1:{x}",
    ]
    .iter()
    .map(|k| k.to_vec())
    .collect();
    assert_eq!(gone, expected);
}

/// A confirmed purge of `product_list` v1 that stops every 8 keys or so (`--count 5 --limit-keys 8`).
fn stopping_purge<'a>(policy: &'a str, url: &'a str, checkpoints: &'a str) -> Vec<&'a str> {
    vec![
        "purge",
        "--policy",
        policy,
        "--url",
        url,
        "--class",
        "product_list",
        "--version",
        "1",
        "--confirm",
        "product_list",
        "--count",
        "5",
        "--limit-keys",
        "8",
        "--checkpoint-dir",
        checkpoints,
    ]
}

/// The number after `deleted ` in a summary line.
fn deleted_in(line: &str) -> u64 {
    line.split("deleted ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no deleted count in {line:?}"))
}

/// Stopped and resumed until done, the purge deletes exactly the v1 keys; each resumed run reports its own
/// deletions and, on its `resumed:` line, those since the start (it used to report the total as its own).
#[test]
fn a_stopped_purge_resumes_to_the_same_end() {
    let (server, mut conn, v1, dir, policy) = setup();
    let cp = dir.path().join("cp");
    let cp = cp.to_str().unwrap();
    let url = server.url();
    let before = all_keys(&mut conn);
    let base = stopping_purge(&policy, &url, cp);
    let first = keyward(&base);
    assert_eq!(first.status.code(), Some(4), "{}", text(&first.stderr));
    let mut deleted = deleted_in(&text(&first.stdout));
    let err = text(&first.stderr);
    let mut token = err
        .split("--resume ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"))
        .trim()
        .to_owned();
    let mut runs = 1;
    loop {
        let mut args = base.clone();
        args.extend(["--resume", token.as_str()]);
        let out = keyward(&args);
        runs += 1;
        let summary = text(&out.stdout);
        deleted += deleted_in(&summary);
        assert!(
            summary.contains(&format!(
                "resumed: since the purge started, {deleted} keys deleted"
            )),
            "{summary}"
        );
        match out.status.code() {
            Some(0) => break,
            Some(4) => {
                let err = text(&out.stderr);
                token = err.split("--resume ").nth(1).unwrap().trim().to_owned();
            }
            other => panic!("{other:?}: {}", text(&out.stderr)),
        }
        assert!(runs < 100);
    }
    assert!(runs >= 2);
    assert_eq!(deleted, 40, "the runs' own counts add up to the purge's");
    let after = all_keys(&mut conn);
    let gone: BTreeSet<Vec<u8>> = before.difference(&after).cloned().collect();
    assert_eq!(gone, v1);
}

#[test]
fn refusals_exit_2_and_delete_nothing() {
    let (server, mut conn, _, _dir, policy) = setup();
    let policy = policy.as_str();
    let before = all_keys(&mut conn);
    let url = server.url();
    for (args, says) in [
        (
            vec!["--class", "product_list", "--confirm", "product_list"],
            "current",
        ),
        (
            vec![
                "--class",
                "product_list",
                "--version",
                "3",
                "--confirm",
                "product_list",
            ],
            "older version",
        ),
        (
            vec![
                "--class",
                "product_list",
                "--version",
                "1",
                "--confirm",
                "invoice_run",
            ],
            "--confirm",
        ),
        (
            vec!["--orphans", "app:*", "--confirm", "app:*"],
            "namespace",
        ),
        (vec!["--orphans", "*", "--confirm", "*"], "namespace"),
        (vec!["--class", "nope", "--version", "1"], "no such class"),
    ] {
        let mut all = vec!["purge", "--policy", policy, "--url", &url];
        all.extend(args.iter().copied());
        let out = keyward(&all);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(all_keys(&mut conn), before);
}

#[test]
fn a_cluster_is_purged_on_every_primary() {
    let cluster = RedisCluster::shared();
    let text_policy = POLICY.replace("app = \"shop\"", "app = \"purgecl\"");
    let policy = Policy::from_toml_str(&text_policy).unwrap();
    let v3 = KeySpace::new(&policy, "product_list").unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut old = Vec::new();
    let mut primaries = BTreeSet::new();
    for i in 0..30 {
        let current = v3.key(&i).unwrap();
        let v1 = current.replacen(":v3:", ":v1:", 1);
        primaries.insert(cluster.master_for_key(&v1).port);
        for key in [&current, &v1] {
            redis::cmd("SET")
                .arg(key)
                .arg("v")
                .arg("PX")
                .arg(600_000)
                .query::<()>(&mut conn)
                .unwrap();
        }
        old.push(v1);
    }
    assert_eq!(primaries.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, &text_policy).unwrap();
    let out = keyward(&[
        "purge",
        "--policy",
        file.to_str().unwrap(),
        "--url",
        &cluster.seed_url(),
        "--class",
        "product_list",
        "--version",
        "1",
        "--confirm",
        "product_list",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted 30 keys"),
        "{}",
        text(&out.stdout)
    );
    for (i, v1) in old.iter().enumerate() {
        let current = v3.key(&i).unwrap();
        let exists: i64 = redis::cmd("EXISTS").arg(&current).query(&mut conn).unwrap();
        assert_eq!(exists, 1, "{current} is current and must stay");
        let exists: i64 = redis::cmd("EXISTS").arg(v1).query(&mut conn).unwrap();
        assert_eq!(exists, 0, "{v1} is v1 and must go");
    }
}

/// `purge --json`: one document on stdout, for the dry run and for the confirmed purge, with the facts the
/// text line gives (docs/cli.md lists the fields).
#[test]
fn purge_json_is_one_document_with_the_summary_s_facts() {
    let (server, mut conn, v1, _dir, policy) = setup();
    let policy = policy.as_str();
    let url = server.url();
    let before = all_keys(&mut conn);
    let base = [
        "purge",
        "--policy",
        policy,
        "--url",
        &url,
        "--class",
        "product_list",
        "--version",
        "1",
        "--json",
    ];
    let doc = |out: &Output| -> serde_json::Value {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(&out.stdout)))
    };

    let dry = doc(&keyward(&base));
    assert_eq!(all_keys(&mut conn), before, "the dry run deleted something");
    assert_eq!(dry["keyward_purge"], 1);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["selection"], "version");
    assert_eq!(dry["class"], "product_list");
    assert_eq!(dry["version"], 1);
    assert_eq!(dry["pattern"], serde_json::Value::Null);
    assert_eq!(dry["scan_match"], "prod:shop:product_list:v1:*");
    assert_eq!(dry["complete"], true);
    assert_eq!(dry["resumed"], false);
    assert_eq!(dry["resume_token"], serde_json::Value::Null);
    for counts in ["this_run", "since_start"] {
        let c = &dry[counts];
        assert_eq!(c["keys_matched"], 40, "{counts}: {c}");
        assert_eq!(c["keys_deleted"], 0, "{counts}: {c}");
        assert_eq!(c["keys_changed"], 0, "{counts}: {c}");
        assert!(c["bytes"].as_u64().unwrap() > 0, "{counts}: {c}");
        assert!(c["keys_examined"].as_u64().unwrap() >= 40, "{counts}: {c}");
    }
    assert!(dry["estimated_seconds"].as_f64().unwrap() > 0.0, "{dry}");
    let sample: Vec<&str> = dry["sample_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(sample.len(), 10, "{dry}");
    for key in sample {
        assert!(
            v1.contains(key.replace("\\x5c", "\\").as_bytes()),
            "{key} is not a v1 key"
        );
    }

    let mut confirmed = base.to_vec();
    confirmed.extend(["--confirm", "product_list"]);
    let wet = doc(&keyward(&confirmed));
    assert_eq!(wet["dry_run"], false);
    assert_eq!(wet["this_run"]["keys_deleted"], 40, "{wet}");
    assert_eq!(wet["since_start"]["keys_deleted"], 40, "{wet}");
    assert_eq!(wet["this_run"]["keys_changed"], 0, "{wet}");
    assert_eq!(wet["estimated_seconds"], serde_json::Value::Null);
    assert_eq!(wet["resumed"], false);
    let gone: BTreeSet<Vec<u8>> = before.difference(&all_keys(&mut conn)).cloned().collect();
    assert_eq!(gone, v1);

    let orphans = doc(&keyward(&[
        "purge",
        "--policy",
        policy,
        "--url",
        &url,
        "--orphans",
        "prod:shop:product_list*",
        "--json",
    ]));
    assert_eq!(orphans["selection"], "orphans");
    assert_eq!(orphans["pattern"], "prod:shop:product_list*");
    assert_eq!(orphans["class"], serde_json::Value::Null);
    // The handmade look-alike and `product_listing`: no class owns them.
    assert_eq!(orphans["since_start"]["keys_matched"], 2, "{orphans}");
}

/// `--json` of a stopped and a resumed purge: `this_run` is the run's own, `since_start` the whole purge's.
#[test]
fn a_resumed_purge_s_json_tells_this_run_from_the_whole_purge() {
    let (server, mut conn, v1, dir, policy) = setup();
    let cp = dir.path().join("cp");
    let cp = cp.to_str().unwrap();
    let url = server.url();
    let mut first = stopping_purge(&policy, &url, cp);
    first.push("--json");
    let out = keyward(&first);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stopped["complete"], false);
    assert_eq!(stopped["resumed"], false);
    let token = stopped["resume_token"].as_str().unwrap().to_owned();
    let first_deleted = stopped["this_run"]["keys_deleted"].as_u64().unwrap();
    assert!(
        (1..40).contains(&first_deleted),
        "the first run should delete some of the 40, not all: {stopped}"
    );

    // Resumed to the end (no --limit-keys this time).
    let mut resumed: Vec<&str> = stopping_purge(&policy, &url, cp)
        .into_iter()
        .filter(|a| *a != "--limit-keys" && *a != "8")
        .collect();
    resumed.extend(["--resume", token.as_str(), "--json"]);
    let out = keyward(&resumed);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["resumed"], true);
    assert_eq!(done["complete"], true);
    assert_eq!(done["resume_token"], serde_json::Value::Null);
    assert_eq!(
        done["this_run"]["keys_deleted"].as_u64().unwrap(),
        40 - first_deleted,
        "{done}"
    );
    assert_eq!(done["since_start"]["keys_deleted"], 40, "{done}");
    let left = all_keys(&mut conn);
    assert!(v1.iter().all(|k| !left.contains(k)), "a v1 key survived");
}

/// `KEYWARD_ENV` applies to purge as to every command: a purge under `KEYWARD_ENV=stage` deletes only
/// `stage:shop`'s keys, and its output names the namespace it acted on (text and `namespace` in `--json`),
/// as `invalidate` and `dead-letters` do. Before, a confirmed purge said only "purge class product_list v1:
/// deleted 2 keys", with nothing to show it had acted on another namespace than the file's `prod:shop`.
#[test]
fn purge_names_the_namespace_keyward_env_selects() {
    let (server, mut conn, v1, _dir, policy) = setup();
    set(&mut conn, b"stage:shop:product_list:v1:{a}", Some(600_000));
    set(&mut conn, b"stage:shop:product_list:v1:{b}", Some(600_000));
    let url = server.url();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["purge", "--class", "product_list", "--version", "1"])
            .args(["--policy", &policy, "--url", &url])
            .args(extra)
            .env_remove("REDIS_URL")
            .env_remove("KEYWARD_APP")
            .env("KEYWARD_ENV", "stage")
            .output()
            .unwrap()
    };
    let dry = run(&["--json"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("valid JSON");
    assert_eq!(doc["namespace"], "stage:shop", "{doc}");
    assert_eq!(doc["this_run"]["keys_matched"], 2, "{doc}");

    let dry = run(&[]);
    assert!(
        text(&dry.stdout).contains("in namespace stage:shop"),
        "{}",
        text(&dry.stdout)
    );
    let done = run(&["--confirm", "product_list"]);
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    let out = text(&done.stdout);
    assert!(out.contains("in namespace stage:shop"), "{out}");
    assert!(out.contains("deleted 2 keys"), "{out}");
    let keys = all_keys(&mut conn);
    assert!(
        v1.iter().all(|k| keys.contains(k)),
        "prod:shop is untouched"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with(b"stage:shop:product_list:v1:"))
    );
}
