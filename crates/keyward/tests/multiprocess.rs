//! Concurrency across OS processes against one real Redis: the test binary re-runs itself as children.
//!
//! - 4 processes × 250 callers stampede one cold key → exactly one loader call fleet-wide.
//! - A process holding a fill lease is SIGKILLed mid-load → a caller in another process takes over.
//! - 4 processes × 250 racing rate-limit checks, limit 100 → exactly 100 allowed, for every exact algorithm.
//! - Processes whose clocks are hours apart (libfaketime) share one limit exactly: the server's clock rules.
//! - 4 processes × 50 acquisitions of one lock never overlap (checked by a raw counter in Redis).
//! - A lock holder SIGSTOPped past its lease is fenced off: its write is stale and its release refused.
//! - 4 processes race idempotency `begin`s (one `New` per key) and versioned session saves (no update lost).

#![allow(unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::Keyward;
use keyward::lock::FencedWrite;
use keyward::policy::{Algorithm, CacheClass, LockClass, Policy, RateLimitClass};
use keyward_testkit::RedisServer;

const CHILD_URL: &str = "KEYWARD_TEST_CHILD_URL";
const CHILD_APP: &str = "KEYWARD_TEST_CHILD_APP";
const CHILD_CALLERS: usize = 250;

fn policy(app: &str) -> Policy {
    let mut b = Policy::builder("test", app);
    for a in Algorithm::ALL {
        // Windows long enough that no window edge falls inside a test.
        let window = match a {
            Algorithm::FixedWindow | Algorithm::SlidingCounter => Duration::from_secs(100 * 86_400),
            _ => Duration::from_secs(3600),
        };
        b = b.rate_limit(a.name(), RateLimitClass::new(a, 100, window));
    }
    b.rate_limit(
        "minute",
        RateLimitClass::new(Algorithm::SlidingLog, 10, Duration::from_secs(60)),
    )
    .rate_limit(
        "paced",
        RateLimitClass::new(Algorithm::Gcra, 10, Duration::from_secs(60)),
    )
    .cache(
        "product",
        CacheClass::new(Duration::from_secs(60), "tests").lease_ttl(Duration::from_secs(10)),
    )
    .cache(
        "short",
        CacheClass::new(Duration::from_secs(60), "tests")
            .lease_ttl(Duration::from_millis(500))
            .loader_timeout(Duration::from_millis(400)),
    )
    .build()
    .unwrap()
}

fn spawn_child(test: &str, url: &str, app: &str) -> (Child, BufReader<ChildStdout>) {
    spawn_child_in(None, test, url, app)
}

/// Like `spawn_child`, but runs the child under `wrapper` (e.g. `faketime -f -2h`).
fn spawn_child_in(
    wrapper: Option<&[&str]>,
    test: &str,
    url: &str,
    app: &str,
) -> (Child, BufReader<ChildStdout>) {
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper {
        Some([program, args @ ..]) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        _ => Command::new(&exe),
    };
    let mut child = command
        .args([
            "--exact",
            &test_path(test),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, url)
        .env(CHILD_APP, app)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("re-run the test binary as a child");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// `test`'s full name as the test harness matches it with `--exact`: its module path inside this test binary
/// (e.g. `multiprocess::child_stampede`), so that exactly one test runs in the child, wherever this file is
/// mounted in `tests/tests.rs`.
fn test_path(test: &str) -> String {
    match module_path!().split_once("::") {
        Some((_crate, module)) => format!("{module}::{test}"),
        None => test.to_owned(),
    }
}

/// `n` children running `test`, each past its setup (it printed `READY`) and waiting for `GO`.
fn spawn_ready(n: usize, test: &str, url: &str, app: &str) -> Vec<(Child, BufReader<ChildStdout>)> {
    let mut children: Vec<_> = (0..n).map(|_| spawn_child(test, url, app)).collect();
    for (_, out) in &mut children {
        expect_line(out, "READY");
    }
    children
}

/// Read lines until one contains `prefix` (the harness prints `test name ... ` before a child's first line);
/// returns the text from `prefix` on. Panics if the child closes stdout first.
fn expect_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited before printing {prefix}");
        if let Some(at) = line.find(prefix) {
            return line[at..].trim().to_owned();
        }
    }
}

fn child_env() -> Option<(String, String)> {
    Some((
        std::env::var(CHILD_URL).ok()?,
        std::env::var(CHILD_APP).ok()?,
    ))
}

/// Every child test name the parents pass, as `--exact` sees it, selects exactly one test of this binary: a
/// name that matched none would leave the parent waiting for a `READY` that never comes.
#[test]
fn child_test_names_select_exactly_one_test() {
    let exe = std::env::current_exe().unwrap();
    for child in [
        "child_stampede",
        "child_hold_lease",
        "child_rate_limit",
        "child_skewed",
        "child_lock",
        "child_lock_sigstop",
        "child_idempotency_and_session",
    ] {
        let out = Command::new(&exe)
            .args(["--exact", &test_path(child), "--ignored", "--list"])
            .output()
            .expect("list the tests of this binary");
        let listed = String::from_utf8_lossy(&out.stdout);
        let tests: Vec<&str> = listed.lines().filter(|l| l.ends_with(": test")).collect();
        assert_eq!(tests, [format!("{}: test", test_path(child))], "{listed}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn stampede_across_4_processes_loads_once() {
    let server = RedisServer::spawn();
    let app = format!("mp{}", std::process::id());
    let mut children = spawn_ready(4, "child_stampede", &server.url(), &app);
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    }
    let (mut loads, mut served) = (0, 0);
    for (mut child, mut out) in children {
        let line = expect_line(&mut out, "RESULT");
        let mut parts = line.split_whitespace().skip(1);
        loads += parts.next().unwrap().parse::<usize>().unwrap();
        served += parts.next().unwrap().parse::<usize>().unwrap();
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(served, 4 * CHILD_CALLERS, "every caller got the value");
    assert_eq!(loads, 1, "exactly one loader call across 4 processes");
}

#[test]
#[ignore = "child process of stampede_across_4_processes_loads_once"]
fn child_stampede() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        let cache = kw.cache::<String>("product").unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CHILD_CALLERS)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_set("cold", || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, std::io::Error>("loaded".to_owned())
                        })
                        .await
                })
            })
            .collect();
        let mut served = 0;
        for t in tasks {
            if t.await.unwrap().unwrap() == "loaded" {
                served += 1;
            }
        }
        println!("RESULT {} {served}", loads.load(Ordering::SeqCst));
    });
}

#[test]
fn killed_lease_holder_is_taken_over_by_another_process() {
    let server = RedisServer::spawn();
    let app = format!("kill{}", std::process::id());
    let (mut holder, mut out) = spawn_child("child_hold_lease", &server.url(), &app);
    expect_line(&mut out, "HOLDING");
    holder.kill().unwrap(); // SIGKILL: no release, no cleanup — the lease must expire on its own
    holder.wait().unwrap();
    runtime().block_on(async {
        let kw = Keyward::connect(&server.url(), policy(&app)).await.unwrap();
        let cache = kw.cache::<String>("short").unwrap();
        let key = cache.key("k").unwrap();
        let mut con = server.connection();
        let held: Option<String> = redis::cmd("GET").arg(&key).query(&mut con).unwrap();
        assert!(
            held.is_some_and(|v| v.starts_with("L1:")),
            "the dead process's lease is in place"
        );
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            cache.get_or_set("k", || async {
                Ok::<_, std::io::Error>("taken-over".to_owned())
            }),
        )
        .await
        .expect("takeover after lease expiry")
        .unwrap();
        assert_eq!(got, "taken-over");
    });
}

#[test]
#[ignore = "child process of killed_lease_holder_is_taken_over_by_another_process"]
fn child_hold_lease() {
    let Some((url, app)) = child_env() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        let cache = kw.cache::<String>("short").unwrap();
        cache
            .get_or_set("k", || async {
                println!("HOLDING");
                // Block the thread, not just the task: not even the loader timeout can run (and release the
                // lease) before the parent's SIGKILL arrives.
                std::thread::sleep(Duration::from_secs(60));
                Ok::<_, std::io::Error>(String::new())
            })
            .await
            .ok();
    });
}

#[test]
fn rate_limit_exact_across_4_processes() {
    let server = RedisServer::spawn();
    let app = format!("rl{}", std::process::id());
    let mut children = spawn_ready(4, "child_rate_limit", &server.url(), &app);
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    }
    let mut allowed = [0usize; 5];
    for (mut child, mut out) in children {
        let line = expect_line(&mut out, "RESULT");
        for (slot, n) in allowed.iter_mut().zip(line.split_whitespace().skip(1)) {
            *slot += n.parse::<usize>().unwrap();
        }
        assert!(child.wait().unwrap().success());
    }
    for (a, n) in Algorithm::ALL.iter().zip(allowed) {
        assert_eq!(n, 100, "{a}: 4 processes x 250 racing checks, limit 100");
    }
}

#[test]
#[ignore = "child process of rate_limit_exact_across_4_processes"]
fn child_rate_limit() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let mut counts = Vec::new();
        for a in Algorithm::ALL {
            let limiter = kw.rate_limiter(a.name()).unwrap();
            let barrier = Arc::new(tokio::sync::Barrier::new(CHILD_CALLERS));
            let tasks: Vec<_> = (0..CHILD_CALLERS)
                .map(|_| {
                    let (limiter, barrier) = (limiter.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        limiter.check("hot").await.unwrap().is_allowed()
                    })
                })
                .collect();
            let mut allowed = 0;
            for t in tasks {
                allowed += usize::from(t.await.unwrap());
            }
            counts.push(allowed.to_string());
        }
        println!("RESULT {}", counts.join(" "));
    });
}

/// The `faketime` wrapper (Debian package `faketime`); the test fails, never skips, without it.
fn faketime() -> &'static str {
    let ok = Command::new("faketime")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "the clock-skew test runs children under libfaketime: install it with `apt-get install -y faketime` \
         (scripts/test does this when it may)"
    );
    "faketime"
}

#[test]
fn skewed_client_clocks_do_not_change_decisions() {
    let faketime = faketime();
    let server = RedisServer::spawn();
    let app = format!("skew{}", std::process::id());
    // Hours apart: if a client's clock were used, each process would see its own windows and timestamps.
    let skews = ["-3h", "+0", "+2h", "+5d"];
    let mut children: Vec<_> = skews
        .iter()
        .map(|skew| {
            spawn_child_in(
                Some(&[faketime, "-f", skew]),
                "child_skewed",
                &server.url(),
                &app,
            )
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut seen = Vec::new();
    for (_, out) in &mut children {
        let line = expect_line(out, "READY");
        let t: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        seen.push(t - now);
    }
    // The children's clocks really are skewed.
    assert!(
        seen[0] < -3 * 3600 + 60 && seen[3] > 5 * 86_400 - 60,
        "{seen:?}"
    );
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    }
    let (mut minute, mut paced) = (0, 0);
    for (mut child, mut out) in children {
        let line = expect_line(&mut out, "RESULT");
        let mut parts = line.split_whitespace().skip(1);
        minute += parts.next().unwrap().parse::<usize>().unwrap();
        paced += parts.next().unwrap().parse::<usize>().unwrap();
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(
        minute, 10,
        "sliding_log 10/min shared by 4 skewed processes"
    );
    assert_eq!(paced, 10, "gcra 10/min shared by 4 skewed processes");
}

#[test]
#[ignore = "child process of skewed_client_clocks_do_not_change_decisions"]
fn child_skewed() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, policy(&app)).await.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        println!("READY {now}");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let mut counts = Vec::new();
        for class in ["minute", "paced"] {
            let limiter = kw.rate_limiter(class).unwrap();
            let mut allowed = 0;
            for _ in 0..20 {
                let d = limiter.check("shared").await.unwrap();
                assert!(d.reset_after() <= Duration::from_secs(60), "{d:?}");
                allowed += usize::from(d.is_allowed());
            }
            counts.push(allowed.to_string());
        }
        println!("RESULT {}", counts.join(" "));
    });
}

/// The lock classes of the lock tests: `mp_lock` (30 s lease) and `mp_short` (500 ms, no watchdog).
fn lock_policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .lock(
            "mp_lock",
            LockClass::new(Duration::from_secs(30)).wait(Duration::from_secs(120)),
        )
        .lock(
            "mp_short",
            LockClass::new(Duration::from_millis(500)).wait(Duration::ZERO),
        )
        .build()
        .unwrap()
}

const LOCK_TASKS: usize = 5;
const LOCK_ROUNDS: usize = 10;

#[test]
fn lock_exclusive_across_4_processes() {
    let server = RedisServer::spawn();
    let app = format!("lk{}", std::process::id());
    let mut children = spawn_ready(4, "child_lock", &server.url(), &app);
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    }
    let mut total = 0;
    for (mut child, mut out) in children {
        let line = expect_line(&mut out, "RESULT");
        total += line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<usize>()
            .unwrap();
        assert!(child.wait().unwrap().success(), "a child saw an overlap");
    }
    assert_eq!(total, 4 * LOCK_TASKS * LOCK_ROUNDS, "every acquisition ran");
    let inside: i64 = redis::cmd("GET")
        .arg(format!("{app}:inside"))
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(inside, 0);
}

#[test]
#[ignore = "child process of lock_exclusive_across_4_processes"]
fn child_lock() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, lock_policy(&app)).await.unwrap();
        let locks = kw.locks("mp_lock").unwrap();
        // A raw connection, independent of keyward, to check exclusivity on the server itself.
        let raw = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let inside_key = format!("{app}:inside");
        let tasks: Vec<_> = (0..LOCK_TASKS)
            .map(|_| {
                let (locks, mut raw, inside_key) = (locks.clone(), raw.clone(), inside_key.clone());
                tokio::spawn(async move {
                    let mut done = 0;
                    for _ in 0..LOCK_ROUNDS {
                        let guard = locks
                            .lock("one")
                            .await
                            .unwrap()
                            .expect("acquired within the wait");
                        let n: i64 = redis::cmd("INCR")
                            .arg(&inside_key)
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                        assert_eq!(n, 1, "two holders of one lock at once");
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        let n: i64 = redis::cmd("DECR")
                            .arg(&inside_key)
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                        assert_eq!(n, 0);
                        assert!(guard.release().await.unwrap(), "released while held");
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        let mut done = 0;
        for t in tasks {
            done += t.await.unwrap();
        }
        println!("RESULT {done}");
    });
}

/// SIGSTOP or SIGCONT a child (the `kill` utility: no libc binding needed).
fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig}");
}

/// Sends SIGCONT when dropped, so a failing parent never leaves its child stopped.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn sigstopped_lock_holder_is_fenced_off() {
    let server = RedisServer::spawn();
    let app = format!("stop{}", std::process::id());
    let (mut child, mut out) = spawn_child("child_lock_sigstop", &server.url(), &app);
    let line = expect_line(&mut out, "HOLDING");
    let child_fence: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let rt = runtime();
    let kw = rt
        .block_on(Keyward::connect(&server.url(), lock_policy(&app)))
        .unwrap();
    let locks = kw.locks("mp_short").unwrap();
    // The whole process stops, its renewal timers too: a GC pause or a stopped VM.
    signal(&child, "-STOP");
    let stopped = Stopped(child.id());
    let guard = rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(1200)).await; // > the 500 ms lease
        let guard = locks
            .try_lock("res")
            .await
            .unwrap()
            .expect("the stopped holder's lease expired");
        assert!(guard.fence() > child_fence);
        assert!(guard.fenced_write(b"parent").await.unwrap().is_applied());
        assert!(guard.extend(Duration::from_secs(30)).await.unwrap());
        guard
    });
    drop(stopped); // SIGCONT
    child.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    let line = expect_line(&mut out, "RESULT");
    assert_eq!(
        line, "RESULT stale=1 released=0 lost=1",
        "the resumed holder's write is refused, its release too, and it knows it lost the lease"
    );
    assert!(child.wait().unwrap().success());
    rt.block_on(async {
        let (fence, value) = locks.fenced_read("res").await.unwrap().unwrap();
        assert_eq!((fence, &value[..]), (guard.fence(), &b"parent"[..]));
        assert!(
            locks.try_lock("res").await.unwrap().is_none(),
            "still the parent's"
        );
        assert!(guard.release().await.unwrap());
    });
}

#[test]
#[ignore = "child process of sigstopped_lock_holder_is_fenced_off"]
fn child_lock_sigstop() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, lock_policy(&app)).await.unwrap();
        let locks = kw.locks("mp_short").unwrap();
        let guard = locks.try_lock("res").await.unwrap().expect("free");
        println!("HOLDING {}", guard.fence());
        // "Working": the parent stops this process here, past the lease, then lets it go on.
        let mut go = String::new();
        tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut go))
            .await
            .unwrap()
            .unwrap();
        let stale = matches!(
            guard.fenced_write(b"child").await.unwrap(),
            FencedWrite::Stale { .. }
        );
        let lost = guard.is_lost();
        let released = guard.release().await.unwrap();
        println!(
            "RESULT stale={} released={} lost={}",
            u8::from(stale),
            u8::from(released),
            u8::from(lost)
        );
    });
}

fn session_idem_policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .idempotency("charge", keyward::policy::IdempotencyClass::new())
        .session(
            "web",
            keyward::policy::SessionClass::new(Duration::from_secs(600), Duration::from_secs(3600)),
        )
        .build()
        .unwrap()
}

const SESSION_SECRET: &[u8; 32] = b"multiprocess test secret 32 byte";

/// 4 processes × 25 racing `begin`s on each of 40 idempotency keys: exactly one `New` per key fleet-wide.
/// The same 4 processes × 10 read-modify-save loops on one session: every update lands (conflicts retried).
#[test]
fn idempotency_and_session_saves_across_4_processes() {
    let server = RedisServer::spawn();
    let app = format!("is{}", std::process::id());
    let rt = runtime();
    let token = rt.block_on(async {
        let kw = Keyward::connect(&server.url(), session_idem_policy(&app))
            .await
            .unwrap();
        let sessions = kw
            .sessions::<Vec<u32>>(
                "web",
                keyward::session::SessionSecrets::new(SESSION_SECRET).unwrap(),
            )
            .unwrap();
        let (token, _) = sessions.create("shared", &Vec::new()).await.unwrap();
        token
    });
    let mut children = spawn_ready(4, "child_idempotency_and_session", &server.url(), &app);
    for (i, (child, _)) in children.iter_mut().enumerate() {
        writeln!(child.stdin.as_mut().unwrap(), "GO {i} {}", token.as_str()).unwrap();
    }
    let mut new = 0;
    for (mut child, mut out) in children {
        let line = expect_line(&mut out, "RESULT");
        new += line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<usize>()
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(
        new, 40,
        "one New per key across 4 processes x 25 racing begins"
    );
    rt.block_on(async {
        let kw = Keyward::connect(&server.url(), session_idem_policy(&app))
            .await
            .unwrap();
        let sessions = kw
            .sessions::<Vec<u32>>(
                "web",
                keyward::session::SessionSecrets::new(SESSION_SECRET).unwrap(),
            )
            .unwrap();
        let mut got = sessions.get(token.as_str()).await.unwrap().unwrap().data;
        got.sort_unstable();
        let want: Vec<u32> = (0..4)
            .flat_map(|c| (0..10).map(move |i| c * 100 + i))
            .collect();
        assert_eq!(got, want, "no session update lost across processes");
    });
}

#[test]
#[ignore = "child process of idempotency_and_session_saves_across_4_processes"]
fn child_idempotency_and_session() {
    let Some((url, app)) = child_env() else {
        return;
    };
    runtime().block_on(async {
        let kw = Keyward::connect(&url, session_idem_policy(&app))
            .await
            .unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let mut words = go.split_whitespace().skip(1);
        let me: u32 = words.next().unwrap().parse().unwrap();
        let token = Arc::new(words.next().unwrap().to_owned());

        let idem = kw.idempotency("charge").unwrap();
        let fp = keyward::idempotency::fingerprint(&[b"same"]);
        let new = Arc::new(AtomicUsize::new(0));
        for key in 0..40 {
            let barrier = Arc::new(tokio::sync::Barrier::new(25));
            let tasks: Vec<_> = (0..25)
                .map(|_| {
                    let (idem, barrier, new) = (idem.clone(), barrier.clone(), new.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        match idem.begin(&("k", key), &fp).await.unwrap() {
                            keyward::idempotency::Begin::New(_) => {
                                new.fetch_add(1, Ordering::SeqCst);
                            }
                            keyward::idempotency::Begin::InProgress { .. } => {}
                            other => panic!("unexpected {other:?}"),
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }

        let sessions = kw
            .sessions::<Vec<u32>>(
                "web",
                keyward::session::SessionSecrets::new(SESSION_SECRET).unwrap(),
            )
            .unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let (sessions, token) = (sessions.clone(), token.clone());
                tokio::spawn(async move {
                    loop {
                        let mut s = sessions.get(&token).await.unwrap().unwrap();
                        s.data.push(me * 100 + i);
                        match sessions.save(&mut s).await.unwrap() {
                            keyward::session::Saved::Saved => return,
                            keyward::session::Saved::Conflict { .. } => continue,
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        println!("RESULT {}", new.load(Ordering::SeqCst));
    });
}
