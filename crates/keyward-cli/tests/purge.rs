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
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let v1 = fixture(&mut conn);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap();
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
    assert!(out.contains("class product_list v1: 40 keys"), "{out}");
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
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    fixture(&mut conn);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap();
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

#[test]
fn a_stopped_purge_resumes_to_the_same_end() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    let v1 = fixture(&mut conn);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap();
    let cp = dir.path().join("cp");
    let cp = cp.to_str().unwrap();
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
        "--confirm",
        "product_list",
        "--count",
        "5",
        "--limit-keys",
        "8",
        "--checkpoint-dir",
        cp,
    ];
    let first = keyward(&base);
    assert_eq!(first.status.code(), Some(4), "{}", text(&first.stderr));
    let err = text(&first.stderr);
    let mut token = err
        .split("--resume ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"))
        .trim()
        .to_owned();
    let mut runs = 1;
    loop {
        let mut args = base.to_vec();
        args.extend(["--resume", token.as_str()]);
        let out = keyward(&args);
        runs += 1;
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
    let after = all_keys(&mut conn);
    let gone: BTreeSet<Vec<u8>> = before.difference(&after).cloned().collect();
    assert_eq!(gone, v1);
}

#[test]
fn refusals_exit_2_and_delete_nothing() {
    let server = RedisServer::spawn();
    let mut conn = server.connection();
    fixture(&mut conn);
    let before = all_keys(&mut conn);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy = policy.to_str().unwrap();
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
