//! `keyward inspect` and `keyward streams` against a throwaway Redis: every kind of key the library writes is
//! described from its bytes, nothing that grants access is printed, garbage is "unknown format", and bad
//! input or an unreachable server exit 2 and 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use keyward::Keyward;
use keyward::idempotency::{Begin, StoredResponse};
use keyward::key::KeySpace;
use keyward::policy::Policy;
use keyward::session::SessionSecrets;
use keyward::stream::Message;
use keyward_testkit::RedisServer;
use serde_json::Value;
use tokio::sync::Notify;

const POLICY: &str = r#"
[namespace]
env = "test"
app = "insp"

[classes.product]
kind = "cache"
ttl = "10m"
version = 2
invalidation = "the inspect tests"

[classes.profile]
kind = "cache"
ttl = "5m"
personal = true
allow_shared = true
invalidation = "the inspect tests"

[classes.login]
kind = "rate_limit"
algorithm = "gcra"
limit = 5
window = "1m"

[classes.search]
kind = "rate_limit"
algorithm = "sliding_log"
limit = 3
window = "10s"

[classes.web]
kind = "session"
idle = "30m"
absolute = "12h"

[classes.invoice_run]
kind = "lock"
ttl = "30s"

[classes.payment]
kind = "idempotency"
ttl = "1h"
lease = "30s"

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

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
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

    fn parsed(&self) -> Policy {
        Policy::from_file(Path::new(&self.policy)).unwrap()
    }

    async fn kw(&self) -> Keyward {
        Keyward::connect(&self.server.url(), self.parsed())
            .await
            .unwrap()
    }

    fn key(&self, class: &str, id: &str) -> String {
        KeySpace::new(&self.parsed(), class)
            .unwrap()
            .key(id)
            .unwrap()
    }

    fn redis(&self) -> redis::Connection {
        redis::Client::open(self.server.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        let url = self.server.url();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--policy", self.policy(), "--url", &url]);
        keyward(&all)
    }

    /// `keyward inspect KEY --json`, checked to succeed, and its text form, checked to succeed too.
    fn inspect(&self, key: &str) -> (Value, String) {
        let doc = json(&self.run(&["inspect", key, "--json"]));
        let text = self.run(&["inspect", key]);
        assert!(text.status.success(), "{}", stderr(&text));
        (doc, stdout(&text))
    }
}

#[tokio::test]
async fn cache_values_leases_old_versions_and_garbage() {
    let s = Setup::new();
    let kw = s.kw().await;
    let product = kw.cache::<String>("product").unwrap();
    product
        .set_tagged(&"p1", &"a red bicycle".to_owned(), &["category:7"])
        .await
        .unwrap();
    let (doc, text) = s.inspect(&s.key("product", "p1"));
    assert_eq!(doc["exists"], true);
    assert_eq!(doc["class"]["name"], "product");
    assert_eq!(doc["class"]["version_status"], "current");
    assert_eq!(doc["class"]["role"], "entry");
    assert_eq!(doc["type"], "string");
    assert_eq!(doc["ttl_ok"], true, "{doc:#}");
    assert!(doc["ttl_ms"].as_u64().unwrap() <= doc["max_ttl_ms"].as_u64().unwrap());
    assert!(doc["memory_bytes"].as_u64().unwrap() > 0);
    let c = &doc["content"];
    assert_eq!(c["format"], "cache_value", "{doc:#}");
    assert_eq!(c["tags"][0]["tag"], "category:7");
    assert_eq!(c["payload"], "\"a red bicycle\"");
    assert_eq!(c["absent"], false);
    assert!(
        text.contains("cache_value") && text.contains("a red bicycle"),
        "{text}"
    );
    assert_readable_cache_value(&text);

    // A write-behind version marker next to the entry: its newest write, or "unknown" for garbage.
    let marker = format!("{}:wv", s.key("product", "p1"));
    let mut r = s.redis();
    for (value, format) in [("1700000000000-3", "write_version"), ("garbage", "unknown")] {
        let () = redis::cmd("SET")
            .arg(&marker)
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query(&mut r)
            .unwrap();
        let (doc, _) = s.inspect(&marker);
        assert_eq!(doc["class"]["role"], "write_version", "{doc:#}");
        assert_eq!(doc["content"]["format"], format, "{doc:#}");
    }

    // A payload longer than --max-bytes is cut there.
    product.set(&"long", &"x".repeat(1000)).await.unwrap();
    let long = json(&s.run(&[
        "inspect",
        &s.key("product", "long"),
        "--json",
        "--max-bytes",
        "10",
    ]));
    assert_eq!(long["content"]["payload"].as_str().unwrap().len(), 10);
    assert_eq!(long["content"]["payload_truncated"], true);
    assert_eq!(long["content"]["payload_bytes"], 1002);

    // A personal class's payload is not shown.
    let profile = kw.cache::<String>("profile").unwrap();
    profile
        .set(&"u7", &"alice@example.com".to_owned())
        .await
        .unwrap();
    let (doc, text) = s.inspect(&s.key("profile", "u7"));
    assert_eq!(doc["content"]["format"], "cache_value");
    assert!(!text.contains("alice@example.com"), "{text}");
    assert!(!doc.to_string().contains("alice@example.com"));

    // A fill lease, while a loader runs: described without its token.
    let loading = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let fill = {
        let (product, loading, release) = (product.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            product
                .get_or_set(&"p2", || async move {
                    loading.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("loaded".to_owned())
                })
                .await
        })
    };
    loading.notified().await;
    let lease_key = s.key("product", "p2");
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(&lease_key)
        .query(&mut s.redis())
        .unwrap();
    let token = String::from_utf8_lossy(&raw[3..35]).into_owned();
    let (doc, text) = s.inspect(&lease_key);
    assert_eq!(doc["content"]["format"], "cache_lease", "{doc:#}");
    assert!(
        !text.contains(&token) && !doc.to_string().contains(&token),
        "{text}"
    );
    release.notify_one();
    assert_eq!(fill.await.unwrap().unwrap(), "loaded");

    // An old version, written by older code: still decoded, and said to be old.
    let mut conn = s.redis();
    let old = "test:insp:product:v1:{p1}";
    let _: () = redis::cmd("SET")
        .arg(old)
        .arg("V1:0:0:v:\"old\"")
        .arg("EX")
        .arg(60)
        .query(&mut conn)
        .unwrap();
    let (doc, _) = s.inspect(old);
    assert_eq!(doc["class"]["version"], 1);
    assert_eq!(doc["class"]["current_version"], 2);
    assert_eq!(doc["class"]["version_status"], "old");
    assert_eq!(doc["content"]["payload"], "\"old\"");

    // Binary garbage under a class key: "unknown", not a failure; no TTL is out of bounds.
    let junk = s.key("product", "junk");
    let _: () = redis::cmd("SET")
        .arg(&junk)
        .arg(&b"\xff\x00garbage\x1b[2J"[..])
        .query(&mut conn)
        .unwrap();
    let (doc, text) = s.inspect(&junk);
    assert_eq!(doc["content"]["format"], "unknown", "{doc:#}");
    assert_eq!(doc["ttl_ms"], Value::Null);
    assert_eq!(doc["ttl_ok"], false);
    assert!(!text.contains('\u{1b}'), "never moves the terminal");

    // The wrong type under a class key, too.
    let list = s.key("product", "list");
    let _: () = redis::cmd("RPUSH")
        .arg(&list)
        .arg("a")
        .query(&mut conn)
        .unwrap();
    let (doc, _) = s.inspect(&list);
    assert_eq!(doc["content"]["format"], "unknown");
    assert!(doc["content"]["reason"].as_str().unwrap().contains("list"));

    // A binary key name, given as `keyward audit` prints it.
    let _: () = redis::cmd("SET")
        .arg(&b"bin\xffkey"[..])
        .arg("x")
        .query(&mut conn)
        .unwrap();
    let (doc, _) = s.inspect("bin\\xffkey");
    assert_eq!(doc["exists"], true);
    assert_eq!(doc["class"]["owner"], "outside_namespace");

    // A missing key is not an error.
    let (doc, _) = s.inspect(&s.key("product", "nope"));
    assert_eq!(doc["exists"], false);
}

#[tokio::test]
async fn outside_keys_show_no_content() {
    let s = Setup::new();
    let mut conn = s.redis();
    let secret = "tok_8f3a91c2e7d04b5f";
    let _: () = redis::cmd("SET")
        .arg("prod:user:session:8f3a")
        .arg(secret)
        .arg("EX")
        .arg(3600)
        .query(&mut conn)
        .unwrap();
    let (doc, text) = s.inspect("prod:user:session:8f3a");
    assert_eq!(doc["class"]["owner"], "outside_namespace");
    assert_eq!(doc["type"], "string");
    assert_eq!(doc["content"]["format"], "not_decoded");
    assert!(
        !text.contains(secret) && !doc.to_string().contains(secret),
        "{text}"
    );

    let _: () = redis::cmd("SET")
        .arg("test:insp:legacy:thing")
        .arg(secret)
        .query(&mut conn)
        .unwrap();
    let (doc, _) = s.inspect("test:insp:legacy:thing");
    assert_eq!(doc["class"]["owner"], "unknown");
    assert!(!doc.to_string().contains(secret));
}

#[tokio::test]
async fn sessions_show_no_token_and_no_data() {
    let s = Setup::new();
    let kw = s.kw().await;
    let sessions = kw
        .sessions::<Value>(
            "web",
            SessionSecrets::new(*b"a 32-byte secret from your vault").unwrap(),
        )
        .unwrap();
    let data = serde_json::json!({"password": "hunter2-very-secret", "cart": [1, 2]});
    let (token, _) = sessions.create("user-7", &data).await.unwrap();
    let keys: Vec<String> = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("test:insp:web:v1:{s*")
        .arg("COUNT")
        .arg(1000)
        .query::<(u64, Vec<String>)>(&mut s.redis())
        .unwrap()
        .1;
    assert_eq!(keys.len(), 1);
    let (doc, text) = s.inspect(&keys[0]);
    let c = &doc["content"];
    assert_eq!(c["format"], "session", "{doc:#}");
    assert_eq!(c["user"], "user-7");
    assert_eq!(c["version"], 1);
    assert!(c["data_bytes"].as_u64().unwrap() > 0);
    for secret in [token.as_str(), "hunter2-very-secret", "a 32-byte secret"] {
        assert!(!text.contains(secret), "{secret} in {text}");
        assert!(!doc.to_string().contains(secret), "{secret} in {doc}");
    }
    let (index, _) = s.inspect("test:insp:web:v1:{u:user-7}");
    assert_eq!(index["class"]["role"], "session_index");
    assert_eq!(index["content"]["sessions"], 1);
}

#[tokio::test]
async fn rate_limits_locks_and_idempotency_records() {
    let s = Setup::new();
    let kw = s.kw().await;
    kw.rate_limiter("login")
        .unwrap()
        .check(&"10.0.0.1")
        .await
        .unwrap();
    let (doc, _) = s.inspect(&s.key("login", "10.0.0.1"));
    assert_eq!(doc["content"]["format"], "rate_limit", "{doc:#}");
    assert_eq!(doc["content"]["algorithm"], "gcra");
    assert!(
        doc["content"]["theoretical_arrival_unix_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(doc["ttl_ok"], true);
    kw.rate_limiter("search")
        .unwrap()
        .check(&"u7")
        .await
        .unwrap();
    let (doc, _) = s.inspect(&s.key("search", "u7"));
    assert_eq!(doc["content"]["requests_in_window"], 1, "{doc:#}");

    let locks = kw.locks("invoice_run").unwrap();
    let guard = locks.try_lock(&"2026-11").await.unwrap().expect("free");
    let key = locks.key(&"2026-11").unwrap();
    let holder: String = redis::cmd("GET").arg(&key).query(&mut s.redis()).unwrap();
    let (doc, text) = s.inspect(&key);
    assert_eq!(doc["content"]["format"], "lock", "{doc:#}");
    assert!(
        doc["content"]["holder_token"]
            .as_str()
            .unwrap()
            .starts_with("redacted")
    );
    assert!(!text.contains(&holder) && !doc.to_string().contains(&holder));
    let (fence, _) = s.inspect(&format!("{key}:f"));
    assert_eq!(fence["class"]["role"], "lock_fence");
    assert_eq!(fence["content"]["last_fencing_token"], guard.fence());

    let idem = kw.idempotency("payment").unwrap();
    let Begin::New(lease) = idem.begin(&"order-9", b"fingerprint").await.unwrap() else {
        panic!("a new key")
    };
    let key = s.key("payment", "order-9");
    let lease_token: String = redis::cmd("HGET")
        .arg(&key)
        .arg("t")
        .query(&mut s.redis())
        .unwrap();
    let (doc, text) = s.inspect(&key);
    assert_eq!(doc["content"]["status"], "in_progress", "{doc:#}");
    assert_eq!(doc["content"]["lease_token"], "redacted");
    assert!(!text.contains(&lease_token) && !doc.to_string().contains(&lease_token));
    let _ = idem
        .complete(&lease, &StoredResponse::new(201, "created order 9"))
        .await
        .unwrap();
    let (doc, _) = s.inspect(&key);
    assert_eq!(doc["content"]["status"], "completed");
    assert!(doc["content"]["response_bytes"].as_u64().unwrap() > 0);
    assert_eq!(doc["content"]["lease_token"], Value::Null);
}

/// A stream with a dead letter (group `billing`) and a stuck group (`slow`: one entry pending for an hour).
async fn jobs_with_trouble(s: &Setup) -> String {
    let kw = s.kw().await;
    let jobs = kw.stream::<Value>("jobs").unwrap();
    let failed = Arc::new(Notify::new());
    let worker = {
        let failed = Arc::clone(&failed);
        jobs.worker("billing", move |_m: Message<Value>| {
            let failed = Arc::clone(&failed);
            async move {
                failed.notify_one();
                Err("card declined".to_owned())
            }
        })
    };
    jobs.publish(&serde_json::json!({"order": 7}))
        .await
        .unwrap();
    let report = worker.run(failed.notified()).await.unwrap();
    assert_eq!(report.dead_lettered, 1);
    // The dead letter left the stream; one more entry, for the slow group to strand.
    jobs.publish(&serde_json::json!({"order": 8}))
        .await
        .unwrap();
    let key = s.key("jobs", "jobs");
    let mut conn = s.redis();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("slow")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    let read: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("slow")
        .arg("c1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query::<redis::Value>(&mut conn)
        .map(|v| serde_json::json!(format!("{v:?}")))
        .unwrap();
    assert!(read.to_string().contains('-'), "one entry read: {read}");
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&key)
        .arg("slow")
        .arg("-")
        .arg("+")
        .arg(10)
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&key)
        .arg("slow")
        .arg("c1")
        .arg(0)
        .arg(&pending[0].0)
        .arg("IDLE")
        .arg(3_600_000)
        .query(&mut conn)
        .unwrap();
    key
}

#[tokio::test]
async fn streams_show_groups_lag_pending_and_dead_letters() {
    let s = Setup::new();
    let key = jobs_with_trouble(&s).await;
    let doc = json(&s.run(&["streams", "--json"]));
    let all = doc["streams"].as_array().unwrap();
    assert_eq!(all.len(), 1, "every stream class: {doc:#}");
    let jobs = &all[0];
    assert_eq!(jobs["stream"], "jobs");
    assert_eq!(jobs["key"], key);
    assert_eq!(jobs["length"], 1);
    assert_eq!(jobs["retention"]["maxlen"], 1000);
    assert_eq!(jobs["over_retention"], false);
    assert_eq!(jobs["dead_letters"], 1);
    let groups = jobs["groups"].as_array().unwrap();
    let group = |name: &str| {
        groups
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {doc:#}"))
    };
    let billing = group("billing");
    assert_eq!(billing["pending"], 0);
    assert_eq!(billing["stuck"], false);
    assert_eq!(
        billing["lag"], 1,
        "the entry after the dead letter is not delivered yet"
    );
    let slow = group("slow");
    assert_eq!(slow["pending"], 1);
    assert_eq!(slow["stuck"], true);
    assert_eq!(slow["consumers"][0]["name"], "c1");
    assert_eq!(slow["consumers"][0]["pending"], 1);
    assert!(slow["consumers"][0]["idle_ms"].is_u64());
    assert!(slow["oldest_pending_age_ms"].is_u64());
    assert!(slow["oldest_pending_idle_ms"].as_u64().unwrap() >= 3_600_000);

    let text = s.run(&["streams", "jobs"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = stdout(&text);
    assert!(text.contains("dead letters 1"), "{text}");
    assert!(
        text.contains("group slow") && text.contains("STUCK"),
        "{text}"
    );
    assert!(text.contains("consumer c1"), "{text}");

    // inspect describes the same stream and its dead letters.
    let (doc, _) = s.inspect(&key);
    assert_eq!(doc["content"]["format"], "stream");
    assert_eq!(doc["content"]["groups"].as_array().unwrap().len(), 2);
    assert_eq!(
        doc["ttl_ok"], true,
        "a stream is bounded by its retention, not a TTL"
    );
    let (dead, _) = s.inspect(&format!("{key}:dead"));
    assert_eq!(dead["content"]["format"], "dead_letters");
    assert_eq!(dead["content"]["length"], 1);
}

#[test]
fn bad_input_exits_2_and_an_unreachable_server_1() {
    let s = Setup::new();
    for args in [
        &["streams", "nope"][..],
        &["streams", "product"],
        &["inspect", "a\\q"],
        &["inspect", "k", "--max-bytes", "0"],
        &["inspect"],
    ] {
        let out = s.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let bad_policy = keyward(&["inspect", "k", "--policy", "/nonexistent/policy.toml"]);
    assert_eq!(bad_policy.status.code(), Some(2), "{}", stderr(&bad_policy));

    // Nothing listens on port 1; the password in the URL is never printed.
    let url = "redis://:hunter2pass@127.0.0.1:1/";
    for args in [&["inspect", "k"][..], &["streams"]] {
        let mut all = args.to_vec();
        all.extend(["--policy", s.policy(), "--url", url]);
        let out = keyward(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("hunter2pass"), "{}", stderr(&out));
        assert!(!stdout(&out).contains("hunter2pass"));
    }
}

/// The audit's read-only rule plus what docs/cli.md adds for `inspect` and `streams`.
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
    "+exists",
    "+getrange",
    "+hget",
    "+hmget",
    "+hexists",
    "+zcard",
    "+zrange",
    "+xinfo|consumers",
];

#[tokio::test]
async fn the_documented_read_only_user_can_inspect_every_kind_and_list_streams() {
    let mut s = Setup::new();
    let stream = jobs_with_trouble(&s).await;
    let kw = s.kw().await;
    kw.cache::<String>("product")
        .unwrap()
        .set_tagged(&"p1", &"bike".to_owned(), &["c:1"])
        .await
        .unwrap();
    kw.rate_limiter("login")
        .unwrap()
        .check(&"ip")
        .await
        .unwrap();
    kw.rate_limiter("search")
        .unwrap()
        .check(&"u")
        .await
        .unwrap();
    let sessions = kw
        .sessions::<Value>(
            "web",
            SessionSecrets::new(*b"a 32-byte secret from your vault").unwrap(),
        )
        .unwrap();
    sessions.create("user-7", &Value::Null).await.unwrap();
    let locks = kw.locks("invoice_run").unwrap();
    let _guard = locks.try_lock(&"n").await.unwrap().expect("free");
    let lock = locks.key(&"n").unwrap();
    let idem = kw.idempotency("payment").unwrap();
    let _ = idem.begin(&"o", b"f").await.unwrap();
    let keys = [
        s.key("product", "p1"),
        s.key("login", "ip"),
        s.key("search", "u"),
        "test:insp:web:v1:{u:user-7}".to_owned(),
        lock.clone(),
        format!("{lock}:f"),
        s.key("payment", "o"),
        stream.clone(),
        format!("{stream}:dead"),
    ];
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("kw-ro").arg("on").arg(">acl-pw");
    for rule in ACL_RULE {
        setuser.arg(*rule);
    }
    let _: () = setuser.query(&mut s.redis()).unwrap();
    s.server.set_url_credentials(Some(("kw-ro", "acl-pw")));
    for key in &keys {
        let out = s.run(&["inspect", key, "--json"]);
        assert!(!stdout(&out).contains("acl-pw") && !stderr(&out).contains("acl-pw"));
        let doc = json(&out);
        assert_ne!(doc["content"]["format"], "unknown", "{key}: {doc:#}");
    }
    let doc = json(&s.run(&["streams", "--json"]));
    assert_eq!(doc["streams"][0]["dead_letters"], 1);
    let denied = redis::cmd("SET")
        .arg("x")
        .arg("1")
        .query::<()>(&mut s.redis());
    assert!(denied.is_err(), "the rule is read-only");
}

/// On a Cluster, `inspect` and `streams` go to the primary serving the key's slot, whichever it is: twelve
/// ids spread over the three primaries (a fresh user found both failing with `MOVED` unless the key lived on
/// the first primary asked).
#[tokio::test]
async fn inspect_and_streams_find_the_primary_of_the_key_slot_on_a_cluster() {
    let cluster = keyward_testkit::RedisCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY.replace("app = \"insp\"", "app = \"inspcl\"")).unwrap();
    let file = path.to_str().unwrap();
    let policy = Policy::from_file(&path).unwrap();
    let url = cluster.seed_url();
    let kw = Keyward::connect(&url, policy.clone()).await.unwrap();
    let cache = kw.cache::<String>("product").unwrap();
    let space = KeySpace::new(&policy, "product").unwrap();
    for i in 0..12 {
        cache.set(&i, &format!("v{i}")).await.unwrap();
    }
    for i in 0..12 {
        let key = space.key(&i).unwrap();
        let doc = json(&keyward(&[
            "inspect", &key, "--policy", file, "--url", &url, "--json",
        ]));
        assert_eq!(doc["exists"], true, "{key}: {doc:#}");
        assert_eq!(doc["class"]["name"], "product");
    }
    kw.stream::<Value>("jobs")
        .unwrap()
        .publish(&serde_json::json!({"order": 1}))
        .await
        .unwrap();
    let out = keyward(&["streams", "--policy", file, "--url", &url, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("jobs"), "{}", stdout(&out));
}

/// `keyward streams` shows a class's `max_age` (it showed only `maxlen`, or nothing of an age-only bound
/// when both were set), and says so when a stream does not exist instead of showing it with length 0.
#[test]
fn streams_show_max_age_and_say_when_a_stream_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let policy_text = r#"
[namespace]
env = "test"
app = "str"

[classes.events]
kind = "stream"
retention = { max_age = "1h" }

[classes.trail]
kind = "stream"
retention = { maxlen = 500, max_age = "7d" }
"#;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_text).unwrap();
    let server = RedisServer::spawn();
    let trail = KeySpace::new(&Policy::from_toml_str(policy_text).unwrap(), "trail")
        .unwrap()
        .key("trail")
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&trail)
        .arg("*")
        .arg("e")
        .arg("1")
        .query(&mut server.connection())
        .unwrap();
    let url = server.url();
    let run = |more: &[&str]| {
        let mut args = vec![
            "streams",
            "--policy",
            policy.to_str().unwrap(),
            "--url",
            &url,
        ];
        args.extend_from_slice(more);
        keyward(&args)
    };

    let doc = json(&run(&["--json"]));
    let stream = |name: &str| {
        doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == name)
            .unwrap_or_else(|| panic!("{name}: {doc:#}"))
            .clone()
    };
    let events = stream("events");
    assert_eq!(events["exists"], false, "{events:#}");
    assert_eq!(events["retention"]["max_age_ms"], 3_600_000);
    let trail_doc = stream("trail");
    assert_eq!(trail_doc["exists"], true, "{trail_doc:#}");
    assert_eq!(trail_doc["length"], 1);
    assert_eq!(trail_doc["retention"]["maxlen"], 500);
    assert_eq!(trail_doc["retention"]["max_age_ms"], 7 * 86_400_000_u64);

    let out = run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let section = |name: &str| -> String {
        text.split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&format!("{name} ")))
            .take_while({
                let mut first = true;
                move |l| std::mem::take(&mut first) || l.starts_with(' ')
            })
            .collect()
    };
    let events = section("events");
    assert!(
        events.contains("does not exist (no entries were ever published, or it expired)"),
        "{text}"
    );
    assert!(!events.contains("length"), "{text}");
    assert!(events.contains("retention max_age 1h"), "{text}");
    let trail = section("trail");
    assert!(trail.contains("length 1"), "{text}");
    assert!(trail.contains("retention maxlen 500, max_age 7d"), "{text}");
    assert!(!trail.contains("does not exist"), "{text}");
}

/// The labels of `text`'s lines (the word before the value), in order.
fn labels(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}

/// `keyward inspect KEY` (text) reads as labelled lines — key, class, kind, version, role, id, type, TTL,
/// size, then the content's fields with what the entry is before its epochs — not as the JSON document's
/// fields sorted by name (`class:` … `content:` … `exists` … `key` …), which it used to print. `text` is
/// the description of a current cache value "a red bicycle" tagged `category:7`.
fn assert_readable_cache_value(text: &str) {
    let l = labels(text);
    assert_eq!(
        l[..10],
        [
            "key", "class", "kind", "version", "role", "id", "type", "TTL", "size", "content"
        ],
        "{text}"
    );
    assert!(line_of(text, "class").ends_with(" product"), "{text}");
    assert!(line_of(text, "kind").ends_with(" cache"), "{text}");
    assert!(line_of(text, "version").contains("v2 (current)"), "{text}");
    assert!(line_of(text, "TTL").contains(": ok)"), "{text}");
    assert!(line_of(text, "content").ends_with(" cache_value"), "{text}");
    assert!(
        text.lines()
            .any(|x| x.trim_start().starts_with("payload  ") && x.contains("a red bicycle")),
        "{text}"
    );
    assert!(
        line_of(text, "tags").contains("category:7 (epoch"),
        "{text}"
    );
    let at = |label: &str| l.iter().position(|x| x == label).unwrap();
    assert!(
        at("payload") < at("namespace"),
        "payload before the epochs: {text}"
    );
}

/// The text form of an old version, a missing key and a stream (a cache value: [`assert_readable_cache_value`]).
#[test]
fn inspect_text_names_old_versions_missing_keys_and_stream_groups() {
    let s = Setup::new();
    // An old version says which version the class is at.
    let old = s.key("product", "p1").replacen(":v2:", ":v1:", 1);
    let _: () = redis::cmd("SET")
        .arg(&old)
        .arg("junk")
        .arg("PX")
        .arg(60_000)
        .query(&mut s.redis())
        .unwrap();
    let (_, text) = s.inspect(&old);
    assert!(text.contains("v1 (old: the class is at v2)"), "{text}");
    assert!(text.contains("content   unknown"), "{text}");

    // A missing key: who would own it, and that it is not there.
    let (_, text) = s.inspect(&s.key("product", "nope"));
    assert_eq!(
        labels(&text).last().map(String::as_str),
        Some("exists"),
        "{text}"
    );
    assert!(text.contains("no: the key is not in Redis"), "{text}");

    // A stream: bounded by its retention, groups one per item.
    let jobs = s.key("jobs", "jobs");
    let _: String = redis::cmd("XADD")
        .arg(&jobs)
        .arg("*")
        .arg("e")
        .arg("1")
        .query(&mut s.redis())
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&jobs)
        .arg("billing")
        .arg("0")
        .query(&mut s.redis())
        .unwrap();
    let (_, text) = s.inspect(&jobs);
    assert!(text.contains("bounded by its retention"), "{text}");
    assert!(
        line_of(&text, "groups").contains("billing (consumers 0"),
        "{text}"
    );
}

fn line_of(text: &str, label: &str) -> String {
    text.lines()
        .find(|x| x.split_whitespace().next() == Some(label))
        .unwrap_or_else(|| panic!("no {label} line in:\n{text}"))
        .to_owned()
}

/// Under `KEYWARD_ENV`, a key of the file's own namespace is "outside the policy's namespace": the output
/// says which namespace that is (text, and `namespace` in `--json`). Before, it said only "outside the
/// policy's namespace" while the file named `test:insp`, the very namespace of the key.
#[tokio::test]
async fn inspect_names_the_namespace_it_classifies_against() {
    let s = Setup::new();
    let key = s.key("product", "7");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query(&mut s.redis())
        .unwrap();
    let url = s.server.url();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(["inspect", &key, "--policy", s.policy(), "--url", &url])
            .env_remove("REDIS_URL")
            .env_remove("KEYWARD_APP")
            .env("KEYWARD_ENV", "prod");
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let doc = json(&run(true));
    assert_eq!(doc["class"]["owner"], "outside_namespace", "{doc}");
    assert_eq!(doc["namespace"], "prod:insp", "{doc}");
    let out = run(false);
    assert!(
        stdout(&out).contains("outside the policy's namespace prod:insp"),
        "{}",
        stdout(&out)
    );
}
