//! Shared test harness: one policy per test, on the embedded backend or a throwaway redis-server.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::policy::{CacheClass, Policy};
use keyward::{KeyTtl, Keyward};
use keyward_testkit::RedisServer;

static NEXT_APP: AtomicUsize = AtomicUsize::new(0);

/// Which backend a test runs on.
pub struct Harness {
    server: Option<RedisServer>,
    app: String,
    /// Set by [`Harness::redis_acl`]: dropping the harness fails the test if the server denied anything.
    check_acl_log: bool,
}

impl Harness {
    pub fn embedded() -> Self {
        Self {
            server: None,
            app: unique_app(),
            check_acl_log: false,
        }
    }

    pub fn redis() -> Self {
        Self {
            server: Some(RedisServer::spawn()),
            app: unique_app(),
            check_acl_log: false,
        }
    }

    pub fn is_redis(&self) -> bool {
        self.server.is_some()
    }

    pub fn server(&self) -> Option<&RedisServer> {
        self.server.as_ref()
    }

    pub fn server_mut(&mut self) -> Option<&mut RedisServer> {
        self.server.as_mut()
    }

    /// The standard test policy: `product` (plain), `maybe` (negative caching), `short` (tiny lease), `small`
    /// (64-byte values), `other` (a second class), `pii` (personal), `pii_ok` (personal + allow_shared).
    pub fn policy(&self) -> Policy {
        Policy::builder("test", self.app.clone())
            .cache(
                "product",
                CacheClass::new(Duration::from_secs(60), "tests, after each write"),
            )
            .cache(
                "maybe",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .negative_ttl(Duration::from_secs(10)),
            )
            .cache(
                "short",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .lease_ttl(Duration::from_millis(400))
                    .loader_timeout(Duration::from_millis(300)),
            )
            .cache(
                "small",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .max_value_bytes(64),
            )
            .cache(
                "other",
                CacheClass::new(Duration::from_secs(30), "tests, after each write"),
            )
            .cache(
                "pii",
                CacheClass::new(Duration::from_secs(30), "tests, after each write").personal(true),
            )
            .cache(
                "pii_ok",
                CacheClass::new(Duration::from_secs(30), "tests, after each write")
                    .personal(true)
                    .allow_shared(true),
            )
            .build()
            .expect("test policy is valid")
    }

    /// A new handle: a new connection on Redis (like another process); on the embedded backend the *same*
    /// store must be shared, so embedded tests that need two handles clone the first one.
    pub async fn keyward(&self) -> Keyward {
        match &self.server {
            Some(s) => Keyward::connect(&s.url(), self.policy())
                .await
                .expect("connect to test redis"),
            None => Keyward::embedded(self.policy()),
        }
    }

    /// `n` handles that share one store but not one process-local state where the backend allows it
    /// (separate connections on Redis; clones on the embedded backend, which is single-process by design).
    pub async fn handles(&self, n: usize) -> Vec<Keyward> {
        let first = self.keyward().await;
        let mut out = vec![first.clone()];
        for _ in 1..n {
            out.push(if self.is_redis() {
                self.keyward().await
            } else {
                first.clone()
            });
        }
        out
    }

    /// Every key in the server (Redis: a raw SCAN over `*`, independent of keyward), else the namespace walk.
    pub async fn all_keys(&self, kw: &Keyward) -> Vec<KeyTtl> {
        match &self.server {
            Some(s) => {
                let mut con = s.connection();
                let keys: Vec<String> = redis::cmd("SCAN")
                    .cursor_arg(0)
                    .arg("COUNT")
                    .arg(1000)
                    .clone()
                    .iter(&mut con)
                    .expect("scan")
                    .map(|k: ::redis::RedisResult<String>| k.expect("scan key"))
                    .collect();
                let mut out = Vec::new();
                for key in keys {
                    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut con).expect("pttl");
                    if ttl == -2 {
                        continue;
                    }
                    out.push(KeyTtl {
                        key,
                        ttl: u64::try_from(ttl).ok().map(Duration::from_millis),
                    });
                }
                out.sort_by(|a, b| a.key.cmp(&b.key));
                out
            }
            None => kw.scan_namespace().await.expect("scan"),
        }
    }
}

fn unique_app() -> String {
    format!(
        "app{}-{}",
        std::process::id(),
        NEXT_APP.fetch_add(1, Ordering::Relaxed)
    )
}

/// A source of truth for tests: a versioned value and a count of loads.
#[derive(Default)]
pub struct Source {
    pub version: std::sync::atomic::AtomicU64,
    pub loads: AtomicUsize,
}

/// Runs each named case of the calling file's `mod cases` three times: `embedded::name` on the embedded
/// backend, `redis::name` on a throwaway redis-server, and `redis_acl::name` on one where keyward connects as
/// a user with exactly the documented ACL rule; each bounded by two minutes. The backends must agree.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(std::time::Duration::from_secs(120), super::cases::$name(super::Harness::embedded()))
                        .await
                        .expect("test case hung");
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(std::time::Duration::from_secs(120), super::cases::$name(super::Harness::redis()))
                        .await
                        .expect("test case hung");
                }
            )*
        }
        /// The same cases as a Redis user created with exactly the ACL rule of `docs/operations.md`; the
        /// server's ACL LOG must stay empty.
        mod redis_acl {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(std::time::Duration::from_secs(120), super::cases::$name(super::Harness::redis_acl()))
                        .await
                        .expect("test case hung");
                }
            )*
        }
    };
}

/// The documented ACL rule: the first fenced code block marked `acl` in `docs/operations.md`, whitespace
/// joined into one command, with `<user>`, `<password>`, `{env}` and `{app}` filled in. Read from the doc so
/// that the doc and the tests cannot drift apart.
pub fn documented_acl_rule(user: &str, password: &str, env: &str, app: &str) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/operations.md");
    let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let block = doc
        .split("```acl\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("{path} has no ```acl code block"));
    let words: Vec<String> = block
        .split_whitespace()
        .map(|word| {
            word.replace("<user>", user)
                .replace("<password>", password)
                .replace("{env}", env)
                .replace("{app}", app)
        })
        .collect();
    assert!(
        words.len() > 3
            && words[0].eq_ignore_ascii_case("ACL")
            && words[1].eq_ignore_ascii_case("SETUSER"),
        "the ```acl block of {path} must be one `ACL SETUSER` command, got {block:?}"
    );
    words
}

/// Creates a user on `server` with exactly the documented ACL rule (as the unrestricted admin connection)
/// and makes `server.url()` log in as it, so code under test connects as that user.
pub fn restrict_to_documented_acl(server: &mut RedisServer, env: &str, app: &str) {
    let password = format!("pw-{}", std::process::id());
    let words = documented_acl_rule("keyward", &password, env, app);
    let mut cmd = redis::cmd(&words[0]);
    for word in &words[1..] {
        cmd.arg(word);
    }
    let () = cmd.query(&mut server.connection()).unwrap_or_else(|e| {
        panic!("the documented ACL rule is refused by redis-server: {e}: {words:?}")
    });
    server.set_url_credentials(Some(("keyward", &password)));
}

/// The server's ACL LOG (denials), one line per entry: `reason object context`.
pub fn acl_log(server: &RedisServer) -> Vec<String> {
    let entries: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut server.connection())
        .expect("ACL LOG");
    entries
        .iter()
        .map(|entry| {
            let field = |name: &str| match entry.get(name) {
                Some(redis::Value::BulkString(bytes)) => {
                    String::from_utf8_lossy(bytes).into_owned()
                }
                Some(redis::Value::SimpleString(text)) => text.clone(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            format!(
                "{} {} (in {}, user {})",
                field("reason"),
                field("object"),
                field("context"),
                field("username")
            )
        })
        .collect()
}

impl Harness {
    /// A throwaway redis-server where the code under test connects as a user created with exactly the rule
    /// documented in `docs/operations.md`, for env `test` and any app (test files pick their own app names,
    /// so `{app}` is the glob `*`; `tests/acl.rs` checks a concrete app).
    pub fn redis_acl() -> Self {
        let mut server = RedisServer::spawn();
        restrict_to_documented_acl(&mut server, "test", "*");
        Self {
            server: Some(server),
            app: unique_app(),
            check_acl_log: true,
        }
    }

    /// Panics with the server's ACL LOG if it recorded any denial (no-op on other backends).
    pub fn assert_no_acl_denials(&self) {
        if let Some(server) = &self.server {
            let log = acl_log(server);
            assert!(log.is_empty(), "ACL denials:\n{}", log.join("\n"));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A case that already failed reports its own panic; a denial must not turn it into an abort.
        if self.check_acl_log && !std::thread::panicking() {
            self.assert_no_acl_denials();
        }
    }
}
