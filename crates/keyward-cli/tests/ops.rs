//! `keyward invalidate` and `keyward dead-letters` against a throwaway Redis: a dry run changes nothing, a
//! wrong `--confirm` changes nothing and exits 2, and a confirmed run does exactly what the library call does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use keyward::Keyward;
use keyward::policy::Policy;
use keyward::stream::Message;
use keyward_testkit::RedisServer;
use serde_json::Value;
use tokio::sync::Notify;

const POLICY: &str = r#"
[namespace]
env = "test"
app = "ops"

[classes.product]
kind = "cache"
ttl = "10m"
invalidation = "the CLI tests"

[classes.jobs]
kind = "stream"
retention = { maxlen = 1000 }
max_deliveries = 1
claim_idle = "30s"
dead_letter = { maxlen = 100 }
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}: {}", out.status, stderr(out));
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

struct Setup {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    server: RedisServer,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY).unwrap();
        Setup {
            _dir: dir,
            policy,
            server: RedisServer::spawn(),
        }
    }

    fn policy(&self) -> &str {
        self.policy.to_str().unwrap()
    }

    async fn kw(&self) -> Keyward {
        Keyward::connect(
            &self.server.url(),
            Policy::from_file(Path::new(&self.policy)).unwrap(),
        )
        .await
        .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        let url = self.server.url();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--policy", self.policy(), "--url", &url]);
        keyward(&all)
    }
}

#[tokio::test]
async fn invalidate_by_id_is_a_dry_run_until_confirmed() {
    let s = Setup::new();
    let kw = s.kw().await;
    let cache = kw.cache::<String>("product").unwrap();
    cache.set(&("acme", "a:b"), &"v1".to_owned()).await.unwrap();
    cache.set(&("acme", 2), &"v2".to_owned()).await.unwrap();

    // The id as it appears in the key: parts joined by ':', a literal ':' escaped.
    let dry = json(&s.run(&[
        "invalidate",
        "--class",
        "product",
        "--id",
        "acme:a%3Ab",
        "--json",
    ]));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        cache.get(&("acme", "a:b")).await.unwrap().as_deref(),
        Some("v1")
    );

    let wrong = s.run(&[
        "invalidate",
        "--class",
        "product",
        "--id",
        "acme:a%3Ab",
        "--confirm",
        "produc",
    ]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(
        stderr(&wrong).contains("nothing was changed"),
        "{}",
        stderr(&wrong)
    );
    assert_eq!(
        cache.get(&("acme", "a:b")).await.unwrap().as_deref(),
        Some("v1")
    );

    let done = json(&s.run(&[
        "invalidate",
        "--class",
        "product",
        "--id",
        "acme:a%3Ab",
        "--confirm",
        "product",
        "--json",
    ]));
    assert_eq!(done["dry_run"], false);
    assert_eq!(cache.get(&("acme", "a:b")).await.unwrap(), None);
    assert_eq!(
        cache.get(&("acme", 2)).await.unwrap().as_deref(),
        Some("v2"),
        "only the named entry goes"
    );
}

/// `KEYWARD_ENV` applies to the CLI as to a service (`Policy::with_env_overrides`): a confirmed
/// invalidation with `KEYWARD_ENV=prod` acts on `prod:ops`, never on the file's `test:ops`, and says which
/// namespace it acted on. Before, it bumped the file's namespace and printed only "invalidated".
#[tokio::test]
async fn invalidate_acts_on_the_namespace_keyward_env_names() {
    let s = Setup::new();
    let file = s.kw().await;
    let prod_policy = Policy::from_file(Path::new(&s.policy))
        .unwrap()
        .with_env_overrides_from(|v| (v == "KEYWARD_ENV").then(|| "prod".to_owned()))
        .unwrap();
    let prod = Keyward::connect(&s.server.url(), prod_policy)
        .await
        .unwrap();
    for kw in [&file, &prod] {
        let cache = kw.cache::<String>("product").unwrap();
        cache.set(&1, &"v".to_owned()).await.unwrap();
    }
    let url = s.server.url();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "invalidate",
            "--class",
            "product",
            "--confirm",
            "product",
            "--json",
        ])
        .args(["--policy", s.policy(), "--url", &url])
        .env_remove("REDIS_URL")
        .env_remove("KEYWARD_APP")
        .env("KEYWARD_ENV", "prod")
        .output()
        .unwrap();
    let done = json(&out);
    assert_eq!(done["namespace"], "prod:ops", "{done}");
    assert_eq!(done["dry_run"], false);
    let read = |kw: &Keyward| {
        let cache = kw.cache::<String>("product").unwrap();
        async move { cache.get(&1).await.unwrap() }
    };
    assert_eq!(read(&prod).await, None, "the prod entry is invalidated");
    assert_eq!(
        read(&file).await.as_deref(),
        Some("v"),
        "the file's namespace is untouched"
    );
}

/// Product 1 tagged `category:7` and product 2 tagged `category:8`; the class's cache.
async fn two_tagged_products(kw: &Keyward) -> keyward::Cache<String> {
    let cache = kw.cache::<String>("product").unwrap();
    cache
        .set_tagged(&1, &"one".to_owned(), &["category:7"])
        .await
        .unwrap();
    cache
        .set_tagged(&2, &"two".to_owned(), &["category:8"])
        .await
        .unwrap();
    cache
}

#[tokio::test]
async fn invalidate_by_tag_and_whole_class() {
    let s = Setup::new();
    let kw = s.kw().await;
    let cache = two_tagged_products(&kw).await;

    let out = s.run(&[
        "invalidate",
        "--class",
        "product",
        "--tag",
        "category:7",
        "--confirm",
        "product",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("category:7"));
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("two"));

    let out = s.run(&["invalidate", "--class", "product", "--confirm", "product"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(cache.get(&2).await.unwrap(), None, "the whole class");
}

/// Tags span every cache class of the namespace, so invalidating tags alone needs no class: `--confirm`
/// repeats the namespace they span. Before, `--class` was required and `--confirm` repeated a class the
/// action was not limited to.
#[tokio::test]
async fn tags_alone_are_invalidated_without_a_class_confirming_the_namespace() {
    let s = Setup::new();
    let kw = s.kw().await;
    let cache = two_tagged_products(&kw).await;

    let dry = s.run(&["invalidate", "--tag", "category:7"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.contains("add --confirm test:ops to act"), "{text}");
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("one"),
        "a dry run"
    );

    let wrong = s.run(&["invalidate", "--tag", "category:7", "--confirm", "product"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("one"));

    let done = json(&s.run(&[
        "invalidate",
        "--tag",
        "category:7",
        "--confirm",
        "test:ops",
        "--json",
    ]));
    assert_eq!(done["dry_run"], false, "{done}");
    assert_eq!(done["class"], serde_json::Value::Null, "{done}");
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("two"));

    // An id still needs its class.
    let no_class = s.run(&["invalidate", "--id", "1", "--confirm", "test:ops"]);
    assert_eq!(no_class.status.code(), Some(2), "{}", stderr(&no_class));
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_only_when_confirmed() {
    let s = Setup::new();
    let kw = s.kw().await;
    let jobs = kw.stream::<Value>("jobs").unwrap();
    let failed = Arc::new(Notify::new());
    let worker = {
        let failed = Arc::clone(&failed);
        jobs.worker("billing", move |m: Message<Value>| {
            let failed = Arc::clone(&failed);
            async move {
                failed.notify_one(); // the run waits for this handler and its dead-lettering
                Err(format!("card declined for order {}", m.event["order"]))
            }
        })
    };
    let id = jobs
        .publish(&serde_json::json!({"order": 7}))
        .await
        .unwrap();
    let report = worker.run(failed.notified()).await.unwrap();
    assert_eq!(report.dead_lettered, 1);

    let list = json(&s.run(&["dead-letters", "list", "jobs", "--json"]));
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["id"], id.to_string());
    assert_eq!(letters[0]["group"], "billing");
    assert_eq!(letters[0]["error"], "card declined for order 7");

    let dry = json(&s.run(&[
        "dead-letters",
        "replay",
        "jobs",
        "--group",
        "billing",
        "--json",
    ]));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["replayed"].as_array().unwrap().len(), 1);
    assert_eq!(
        jobs.dead_letters(10).await.unwrap().len(),
        1,
        "a dry run moves nothing"
    );

    let none = json(&s.run(&[
        "dead-letters",
        "replay",
        "jobs",
        "--error-contains",
        "timeout",
        "--confirm",
        "jobs",
        "--json",
    ]));
    assert_eq!(
        none["replayed"].as_array().unwrap().len(),
        0,
        "the filter selects nothing"
    );
    assert_eq!(jobs.dead_letters(10).await.unwrap().len(), 1);

    let before = jobs.len().await.unwrap();
    let done = json(&s.run(&[
        "dead-letters",
        "replay",
        "jobs",
        "--error-contains",
        "declined",
        "--confirm",
        "jobs",
        "--json",
    ]));
    assert_eq!(done["dry_run"], false);
    assert!(done["replayed"][0]["new_id"].is_string());
    assert!(jobs.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(jobs.len().await.unwrap(), before + 1, "back in the stream");
    assert_eq!(
        letters[0]["origin"],
        Value::Null,
        "a first dead letter has no origin"
    );

    // The replayed event fails again: its new dead letter names the id it was first published under.
    let failed = Arc::new(Notify::new());
    let worker = {
        let failed = Arc::clone(&failed);
        jobs.worker("billing", move |_: Message<Value>| {
            let failed = Arc::clone(&failed);
            async move {
                failed.notify_one();
                Err("card declined again".to_owned())
            }
        })
    };
    assert_eq!(
        worker.run(failed.notified()).await.unwrap().dead_lettered,
        1
    );
    let again = json(&s.run(&["dead-letters", "list", "jobs", "--json"]));
    assert_eq!(
        again["dead_letters"][0]["origin"],
        id.to_string(),
        "{again:#}"
    );
    let text =
        String::from_utf8_lossy(&s.run(&["dead-letters", "list", "jobs"]).stdout).into_owned();
    assert!(
        text.contains(&format!("(first published as {id})")),
        "{text}"
    );
}

#[test]
fn bad_invocations_exit_2_naming_what_is_wrong() {
    let s = Setup::new();
    let unknown = s.run(&["invalidate", "--class", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("nope"), "{}", stderr(&unknown));

    let wrong_kind = s.run(&["invalidate", "--class", "jobs"]);
    assert_eq!(wrong_kind.status.code(), Some(2));
    assert!(
        stderr(&wrong_kind).contains("stream"),
        "{}",
        stderr(&wrong_kind)
    );

    let not_stream = s.run(&["dead-letters", "list", "product"]);
    assert_eq!(not_stream.status.code(), Some(2));

    let expire_without_tag = s.run(&["invalidate", "--class", "product", "--expire"]);
    assert_eq!(expire_without_tag.status.code(), Some(2));

    let max = s.run(&["dead-letters", "list", "jobs", "--max", "0"]);
    assert_eq!(max.status.code(), Some(2));
}

/// Every command that talks to Redis picks its server by one rule (docs/cli.md): `--url`, else `$REDIS_URL`
/// (an empty one counts as unset), else redis://127.0.0.1:6379. `invalidate` and `dead-letters` used to
/// refuse to run without `--url` or `REDIS_URL` while the others fell back to the local default.
#[test]
fn every_command_takes_its_server_by_the_same_rule() {
    let s = Setup::new();
    let commands: [&[&str]; 7] = [
        &["audit"],
        &["purge", "--class", "product", "--all-versions"],
        &["inspect", "test:ops:product:v1:{p1}"],
        &["streams"],
        &["invalidate", "--class", "product"],
        &["dead-letters", "list", "jobs"],
        &["dead-letters", "replay", "jobs"],
    ];
    let with_env = |args: &[&str], url: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(args).args(["--policy", s.policy()]);
        match url {
            Some(u) => cmd.env("REDIS_URL", u),
            None => cmd.env_remove("REDIS_URL"),
        };
        cmd.output().expect("run the keyward binary")
    };
    let url = s.server.url();
    for args in commands {
        // REDIS_URL names the server: every command reaches it (audit: 0 or 3, by what it finds).
        let out = with_env(args, Some(&url));
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{args:?} with REDIS_URL: {}: {}",
            out.status,
            stderr(&out)
        );
        // Neither --url nor a (non-empty) REDIS_URL: not a usage error, the command goes to the local
        // default (whatever answers there, if anything).
        for env in [None, Some("")] {
            let out = with_env(args, env);
            let err = stderr(&out);
            assert_ne!(
                out.status.code(),
                Some(2),
                "{args:?} REDIS_URL={env:?}: {err}"
            );
            assert!(
                !err.contains("give --url") && !err.contains("invalid Redis URL"),
                "{args:?} REDIS_URL={env:?}: {err}"
            );
        }
    }
}
