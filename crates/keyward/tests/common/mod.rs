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
}

impl Harness {
    pub fn embedded() -> Self {
        Self {
            server: None,
            app: unique_app(),
        }
    }

    pub fn redis() -> Self {
        Self {
            server: Some(RedisServer::spawn()),
            app: unique_app(),
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

/// Runs each named case of the calling file's `mod cases` twice: `embedded::name` on the embedded backend and
/// `redis::name` on a throwaway redis-server, each bounded by two minutes. The backends must agree.
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
    };
}
