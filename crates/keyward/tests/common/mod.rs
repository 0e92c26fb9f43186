//! Shared test harness: one policy per test, on the embedded backend or a throwaway redis-server.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::policy::{
    Backoff, CacheClass, ChannelClass, Jitter, L1Tier, Policy, Retention, StreamClass,
};
use keyward::{KeyTtl, Keyward};
use keyward_testkit::{RedisCluster, RedisServer};

/// TTL of the test policy's fail-safe classes (`safe`, `soft`): their values go stale this soon.
pub const FAILSAFE_TTL: Duration = Duration::from_millis(200);

/// `l1_max_stale` of the test policy's `near` classes.
pub const L1_MAX_STALE: Duration = Duration::from_millis(300);

static NEXT_APP: AtomicUsize = AtomicUsize::new(0);

/// Which backend a test runs on.
pub struct Harness {
    server: Option<RedisServer>,
    /// [`Harness::cluster`]: the binary's shared cluster, and the URL that logs in as the documented ACL user.
    cluster: Option<(&'static RedisCluster, &'static str)>,
    app: String,
    /// Set by [`Harness::redis_acl`]: dropping the harness fails the test if the server denied anything.
    check_acl_log: bool,
}

impl Harness {
    pub fn embedded() -> Self {
        Self {
            server: None,
            cluster: None,
            app: unique_app(),
            check_acl_log: false,
        }
    }

    pub fn redis() -> Self {
        Self {
            server: Some(RedisServer::spawn()),
            cluster: None,
            app: unique_app(),
            check_acl_log: false,
        }
    }

    /// The test binary's shared 3-master cluster (started on first use, see `RedisCluster::shared`), where the
    /// code under test connects as a user created on every node with exactly the documented ACL rule; each
    /// test has its own app, so tests sharing the cluster never see each other's keys.
    pub fn cluster() -> Self {
        Self {
            server: None,
            cluster: Some(shared_acl_cluster()),
            app: unique_app(),
            check_acl_log: true,
        }
    }

    /// Whether this runs on Redis (a server or the cluster), not the embedded backend.
    pub fn is_redis(&self) -> bool {
        self.server.is_some() || self.cluster.is_some()
    }

    /// This test's own app name (unique in the process): tests sharing the cluster keep to their own keys.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// Whether this is the cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The URL the code under test connects to (`None`: embedded).
    pub fn url(&self) -> Option<String> {
        match (&self.server, &self.cluster) {
            (Some(s), _) => Some(s.url()),
            (None, Some((_, url))) => Some((*url).to_owned()),
            (None, None) => None,
        }
    }

    /// An unrestricted synchronous connection for poking at keys behind keyward's back (on the cluster, a
    /// cluster connection that routes each command by its key). `None` when embedded.
    pub fn raw(&self) -> Option<Box<dyn redis::ConnectionLike>> {
        match (&self.server, &self.cluster) {
            (Some(s), _) => Some(Box::new(s.connection())),
            (None, Some((c, _))) => Some(Box::new(
                redis::cluster::ClusterClient::new(c.urls())
                    .expect("cluster client")
                    .get_connection()
                    .expect("connect to the shared cluster"),
            )),
            (None, None) => None,
        }
    }

    /// An unrestricted connection to each primary (one on a single server), e.g. to sum `INFO` counters.
    pub fn node_connections(&self) -> Vec<redis::Connection> {
        match (&self.server, &self.cluster) {
            (Some(s), _) => vec![s.connection()],
            (None, Some((c, _))) => masters(c)
                .into_iter()
                .map(|url| {
                    redis::Client::open(url)
                        .and_then(|c| c.get_connection())
                        .expect("connect to a cluster node")
                })
                .collect(),
            (None, None) => Vec::new(),
        }
    }

    pub fn server(&self) -> Option<&RedisServer> {
        self.server.as_ref()
    }

    pub fn server_mut(&mut self) -> Option<&mut RedisServer> {
        self.server.as_mut()
    }

    /// The standard test policy: `product` (plain), `maybe` (negative caching), `short` (tiny lease), `small`
    /// (64-byte values), `other` (a second class), `pii` (personal), `pii_ok` (personal + allow_shared),
    /// `near` and `near2` (an in-process tier, `l1_max_stale` = [`L1_MAX_STALE`]), `safe` (fail-safe: 200 ms
    /// TTL, 60 s stale grace, 300 ms loader timeout; `safe_eager` also refreshes ahead in its last 150 ms), `soft` (the same with a 50 ms soft timeout), `eager`
    /// (2 s TTL, refreshed ahead in its last 1.8 s), `kept` (fail-safe with a 60 s TTL: stale only when a
    /// tag expired it), `ft` and `ft_l1` (the same with a 60 s throttle, the
    /// second with an in-process tier; `break_throttle`'s), `news` (a typed channel, messages of at most 256 bytes),
    /// `writes` (a stream for write-behind: 3 deliveries, 20–100 ms backoff, 300 ms claim_idle).
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
                "near",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .l1(L1Tier::new(1 << 20, Duration::from_secs(60)))
                    .l1_max_stale(L1_MAX_STALE),
            )
            .cache(
                "near2",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .l1(L1Tier::new(1 << 20, Duration::from_secs(60)))
                    .l1_max_stale(L1_MAX_STALE),
            )
            .cache(
                "safe",
                CacheClass::new(FAILSAFE_TTL, "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .fail_safe_throttle(Duration::from_millis(150))
                    .lease_ttl(Duration::from_secs(2))
                    .loader_timeout(Duration::from_millis(300)),
            )
            .cache(
                "safe_eager",
                CacheClass::new(FAILSAFE_TTL, "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .fail_safe_throttle(Duration::from_millis(150))
                    .refresh_ahead(Duration::from_millis(150))
                    .lease_ttl(Duration::from_secs(2))
                    .loader_timeout(Duration::from_millis(300)),
            )
            .cache(
                "soft",
                CacheClass::new(FAILSAFE_TTL, "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .soft_timeout(Duration::from_millis(50))
                    .lease_ttl(Duration::from_secs(5))
                    .loader_timeout(Duration::from_secs(3)),
            )
            .cache(
                "kept",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .lease_ttl(Duration::from_secs(2))
                    .loader_timeout(Duration::from_millis(300)),
            )
            // `break_throttle`'s: fail-safe values stale only when a tag expires them (or by hand), and a
            // throttle that outlasts every case, so that a throttled copy is there for the whole test.
            .cache(
                "ft",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .fail_safe_throttle(Duration::from_secs(60))
                    .lease_ttl(Duration::from_secs(12))
                    .loader_timeout(Duration::from_secs(10)),
            )
            .cache(
                "ft_l1",
                CacheClass::new(Duration::from_secs(60), "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .stale_grace(Duration::from_secs(60))
                    .fail_safe_throttle(Duration::from_secs(60))
                    .lease_ttl(Duration::from_secs(12))
                    .loader_timeout(Duration::from_secs(10))
                    .l1(L1Tier::new(1 << 20, Duration::from_secs(60)))
                    .l1_max_stale(L1_MAX_STALE),
            )
            .cache(
                "eager",
                CacheClass::new(Duration::from_secs(2), "tests, after each write")
                    .jitter(Jitter::Percent(0.0))
                    .refresh_ahead(Duration::from_millis(1800)),
            )
            .channel("news", ChannelClass::new().max_message_bytes(256))
            .stream(
                "writes",
                StreamClass::new(Retention::maxlen(10_000))
                    .max_deliveries(3)
                    .backoff(
                        Backoff::new(Duration::from_millis(20), 2.0, Duration::from_millis(100))
                            .jitter_percent(0.0),
                    )
                    .claim_idle(Duration::from_millis(300)),
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
        match self.url() {
            Some(url) => Keyward::connect(&url, self.policy())
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
        if !self.is_redis() {
            return kw.scan_namespace().await.expect("scan");
        }
        // On the shared cluster, other tests' keys are there too: only this test's app.
        let pattern = if self.is_cluster() {
            format!("test:{}:*", kw.policy().app())
        } else {
            "*".to_owned()
        };
        let mut out = Vec::new();
        for mut con in self.node_connections() {
            let keys: Vec<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter(&mut con)
                .expect("scan")
                .map(|k: ::redis::RedisResult<String>| k.expect("scan key"))
                .collect();
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
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
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
        /// The same cases on the binary's shared 3-master Redis Cluster, as the documented ACL user; no node's
        /// ACL LOG may record a denial.
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    tokio::time::timeout(std::time::Duration::from_secs(120), super::cases::$name(super::Harness::cluster()))
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

/// The primaries of `cluster`, as `redis://` URLs.
fn masters(cluster: &RedisCluster) -> Vec<String> {
    cluster
        .nodes()
        .into_iter()
        .filter(|n| n.role == keyward_testkit::NodeRole::Master)
        .map(|n| n.url())
        .collect()
}

/// The shared cluster, with the documented ACL user on every node (once per binary), and the URL logging in
/// as it.
fn shared_acl_cluster() -> (&'static RedisCluster, &'static str) {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cluster = RedisCluster::shared();
    let url = URL.get_or_init(|| {
        let password = format!("pw-{}", std::process::id());
        let words = documented_acl_rule("keyward", &password, "test", "*");
        for url in cluster.urls() {
            let mut cmd = redis::cmd(&words[0]);
            for word in &words[1..] {
                cmd.arg(word);
            }
            let mut con = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .expect("connect to a cluster node");
            let () = cmd.query(&mut con).unwrap_or_else(|e| {
                panic!("the documented ACL rule is refused by redis-server: {e}: {words:?}")
            });
        }
        cluster.seed_url().replacen(
            "redis+cluster://",
            &format!("redis+cluster://keyward:{password}@"),
            1,
        )
    });
    (cluster, url.as_str())
}

/// The server's ACL LOG (denials), one line per entry: `reason object context`.
pub fn acl_log(server: &RedisServer) -> Vec<String> {
    acl_log_of(&mut server.connection())
}

/// [`acl_log`] of one connection's server.
pub fn acl_log_of(con: &mut redis::Connection) -> Vec<String> {
    let entries: Vec<std::collections::HashMap<String, redis::Value>> =
        redis::cmd("ACL").arg("LOG").query(con).expect("ACL LOG");
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
            cluster: None,
            app: unique_app(),
            check_acl_log: true,
        }
    }

    /// Panics with the server's ACL LOG (every node's, on the cluster) if it recorded any denial (no-op on
    /// the embedded backend).
    pub fn assert_no_acl_denials(&self) {
        if let Some(server) = &self.server {
            let log = acl_log(server);
            assert!(log.is_empty(), "ACL denials:\n{}", log.join("\n"));
        }
        if self.cluster.is_some() {
            // The cluster is shared: only the documented user's permission denials count (other tests try
            // wrong passwords on purpose, which the log records as `auth` entries).
            let log: Vec<String> = self
                .node_connections()
                .iter_mut()
                .flat_map(acl_log_of)
                .filter(|entry| entry.ends_with("user keyward)") && !entry.starts_with("auth "))
                .collect();
            assert!(
                log.is_empty(),
                "ACL denials on the cluster:\n{}",
                log.join("\n")
            );
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

/// A two-worker runtime for tests that drive real processes from a plain `#[test]`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// How many clients are subscribed to the sharded `channel`, asked of the primary serving its slot.
pub fn shard_subscribers(cluster: &RedisCluster, channel: &str) -> i64 {
    let node = cluster.master_for_key(channel);
    let mut con = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channel)
        .query(&mut con)
        .unwrap();
    reply.1
}

/// The Redis Cluster hash slot of `key`, written out here from the Cluster specification (independent of
/// keyward's own): the bytes between the first `{` and the first `}` after it if there are any, else the
/// whole key; CRC16-XMODEM mod 16384. Checked against a real node's `CLUSTER KEYSLOT` in `session.rs`.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let len = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &bytes[open + 1..open + 1 + len])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % 16384
}
