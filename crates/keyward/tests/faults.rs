//! The fault suite: real `redis-server` processes that die, hang, go silent or come back empty, while
//! keyward is in use. It asserts the bounds of issue #9 with measured durations (never sleeps that wait for
//! something; the only sleeps are the length of a fault itself and short polls against a deadline):
//!
//! - every call of every capability finishes within `response_timeout` + [`MARGIN`] whatever the fault,
//!   and at once (< `response_timeout`) while the breaker is open;
//! - with the store unavailable, a `fail_open` cache serves the loader's value;
//! - whatever a timed-out call may leave on the server (a fill lease, an in-progress marker, a lock) does
//!   not block anyone for more than [`RECOVERY`] after the server answers `PING` again;
//! - no wrong value is ever returned, and a restart that lost live state is reported as such.
//!
//! Each measured figure is printed as `FAULT-FIGURE name=value_ms` (run with `-- --nocapture`), for
//! `BENCHMARKS.md`.

#![allow(unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward::idempotency::{Begin, Completion, Idempotency, StoredResponse, fingerprint};
use keyward::lock::{FencedWrite, LockGuard, Locks};
use keyward::policy::{
    Algorithm, CacheClass, CacheOnError, IdempotencyClass, LockClass, OnError, Policy,
    RateLimitClass, SessionClass,
};
use keyward::rate_limit::{BreakerState, Source};
use keyward::session::{SessionSecrets, Sessions};
use keyward::{Cache, ConnectOptions, Keyward, RateLimiter};
use keyward_testkit::{Blackhole, RedisServer, TcpProxy};

/// The response timeout every test connects with.
const RESPONSE: Duration = Duration::from_millis(250);
/// What a call may take beyond the response timeout: scheduling on a loaded 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(750);
/// The bound on any one call during a fault.
const BOUND: Duration = RESPONSE.saturating_add(MARGIN);
/// How soon after the server answers `PING` again everything must work.
const RECOVERY: Duration = Duration::from_secs(1);
/// How long a poll for something that must not happen "soon" may wait before the test gives up.
const GIVE_UP: Duration = Duration::from_secs(20);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(10);
const SECRET: &[u8; 32] = b"fault suite secret, 32 bytes...!";

static NEXT_APP: AtomicUsize = AtomicUsize::new(0);

fn unique_app() -> String {
    format!(
        "faults{}-{}",
        std::process::id(),
        NEXT_APP.fetch_add(1, Ordering::Relaxed)
    )
}

/// `product` (cache, `on_error` fail open, the default, 10 s fill lease), `strict` (cache, `on_error =
/// error`), `limited` (GCRA, `on_error = local`), `web` (sessions), `job` (locks, 30 s, no waiting),
/// `charge` (idempotency, default 60 s lease).
fn policy(app: &str) -> Policy {
    Policy::builder("test", app)
        .cache(
            "product",
            CacheClass::new(Duration::from_secs(60), "fault tests"),
        )
        .cache(
            "strict",
            CacheClass::new(Duration::from_secs(60), "fault tests").on_error(CacheOnError::Error),
        )
        .rate_limit(
            "limited",
            RateLimitClass::new(Algorithm::Gcra, 1000, Duration::from_secs(3600))
                .on_error(OnError::Local),
        )
        .session(
            "web",
            SessionClass::new(Duration::from_secs(1800), Duration::from_secs(43200)),
        )
        .lock(
            "job",
            LockClass::new(Duration::from_secs(30)).wait(Duration::ZERO),
        )
        .idempotency("charge", IdempotencyClass::new())
        .build()
        .expect("fault test policy is valid")
}

/// Response and connect timeouts of [`RESPONSE`]; the breaker opens after 3 failures for `breaker_cooldown`.
fn options(breaker_cooldown: Duration) -> ConnectOptions {
    ConnectOptions::default()
        .response_timeout(RESPONSE)
        .connect_timeout(RESPONSE)
        .breaker(3, breaker_cooldown)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Prints one measured figure in the format the lead collects for `BENCHMARKS.md`.
fn figure(name: &str, d: Duration) {
    eprintln!("FAULT-FIGURE {name}={}", ms(d));
}

/// Whether `err` is the breaker refusing a call without trying the store.
fn is_circuit_open(err: &keyward::Error) -> bool {
    matches!(err, keyward::Error::CircuitOpen { .. })
}

/// The health check under test.
async fn ping(kw: &Keyward) -> keyward::Result<()> {
    kw.ping().await
}

/// Every handle on one namespace, with one of each capability.
#[derive(Clone)]
struct Kit {
    kw: Keyward,
    cache: Cache<String>,
    strict: Cache<String>,
    limiter: RateLimiter,
    sessions: Sessions<Vec<u32>>,
    locks: Locks,
    idem: Idempotency,
    /// How often a loader ran.
    loads: Arc<AtomicUsize>,
}

impl Kit {
    async fn connect(url: &str, app: &str, options: ConnectOptions) -> Kit {
        let kw = Keyward::connect_with(url, policy(app), options)
            .await
            .expect("connect before the fault");
        Kit {
            cache: kw.cache("product").unwrap(),
            strict: kw.cache("strict").unwrap(),
            limiter: kw.rate_limiter("limited").unwrap(),
            sessions: kw
                .sessions("web", SessionSecrets::new(SECRET).unwrap())
                .unwrap(),
            locks: kw.locks("job").unwrap(),
            idem: kw.idempotency("charge").unwrap(),
            loads: Arc::new(AtomicUsize::new(0)),
            kw,
        }
    }

    /// A loader that counts its calls and returns `value`.
    fn loader(
        &self,
        value: String,
    ) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + use<> {
        let loads = Arc::clone(&self.loads);
        move || {
            loads.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(value))
        }
    }
}

/// State that exists before the fault: a session and a held lock. Every capability has been used once, so
/// its scripts are loaded, as in a service that has been running for a while.
struct Before {
    token: String,
    guard: LockGuard,
}

async fn before_the_fault(kit: &Kit) -> Before {
    assert_eq!(
        kit.cache
            .get_or_set("warm", kit.loader("warm".to_owned()))
            .await
            .unwrap(),
        "warm"
    );
    assert_eq!(
        kit.limiter.check("client").await.unwrap().source(),
        Source::Store
    );
    let (token, _) = kit.sessions.create("alice", &vec![1]).await.unwrap();
    let _ = kit
        .idem
        .begin("warm-up", &fingerprint(&[b"warm-up"]))
        .await
        .unwrap();
    // A name of its own: several handles on one namespace may each hold one.
    let held = format!("held-{}", NEXT_APP.fetch_add(1, Ordering::Relaxed));
    let guard = kit.locks.try_lock(&held).await.unwrap().expect("free lock");
    Before {
        token: token.as_str().to_owned(),
        guard,
    }
}

/// Measures calls against a bound and remembers the longest.
struct Timer {
    bound: Duration,
    longest: Duration,
    longest_name: String,
    calls: usize,
}

impl Timer {
    fn new(bound: Duration) -> Timer {
        Timer {
            bound,
            longest: Duration::ZERO,
            longest_name: String::new(),
            calls: 0,
        }
    }

    async fn time<T>(&mut self, name: &str, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        let took = started.elapsed();
        self.calls += 1;
        if took > self.longest {
            self.longest = took;
            self.longest_name = name.to_owned();
        }
        assert!(
            took <= self.bound,
            "`{name}` took {took:?} during the fault, over the bound of {:?}",
            self.bound
        );
        out
    }
}

/// One call of every operation of every capability, each timed; asserts what each must return while the
/// store is unavailable. `round` makes the ids unique, so no call is answered by in-process state.
async fn every_capability_once(kit: &Kit, before: &Before, timer: &mut Timer, round: usize) {
    let backend_error = |name: &str, r: Result<(), keyward::Error>| match r {
        Err(err) => assert!(err.is_backend(), "`{name}`: not a backend error: {err}"),
        Ok(()) => panic!("`{name}` succeeded with the store unavailable"),
    };

    // Cache, fail open: reads are misses, get_or_set serves the loader's value, writes are errors.
    let got = timer
        .time("cache.get", kit.cache.get(&("gone", round)))
        .await;
    assert!(
        matches!(got, Ok(None)),
        "fail_open get must read as a miss: {got:?}"
    );
    let loads = kit.loads.load(Ordering::SeqCst);
    let value = format!("loaded {round}");
    let got = timer
        .time(
            "cache.get_or_set",
            kit.cache
                .get_or_set(&("load", round), kit.loader(value.clone())),
        )
        .await;
    assert_eq!(
        got.as_ref().ok(),
        Some(&value),
        "fail_open get_or_set must return the loader's value: {got:?}"
    );
    assert_eq!(
        kit.loads.load(Ordering::SeqCst),
        loads + 1,
        "the loader ran once"
    );
    let r = timer
        .time("cache.set", kit.cache.set(&("set", round), &value))
        .await;
    backend_error("cache.set", r);
    let r = timer
        .time("cache.invalidate", kit.cache.invalidate(&("set", round)))
        .await;
    backend_error("cache.invalidate", r);
    let r = timer
        .time("cache.invalidate_all", kit.cache.invalidate_all())
        .await;
    backend_error("cache.invalidate_all", r);

    // Cache, on_error = error: every call is the error, the loader never runs.
    let r = timer
        .time("strict.get", kit.strict.get(&("gone", round)))
        .await;
    backend_error("strict.get", r.map(|_| ()));
    let loads = kit.loads.load(Ordering::SeqCst);
    let r = timer
        .time(
            "strict.get_or_set",
            kit.strict
                .get_or_set(&("load", round), kit.loader(value.clone())),
        )
        .await;
    backend_error("strict.get_or_set", r.map(|_| ()));
    assert_eq!(
        kit.loads.load(Ordering::SeqCst),
        loads,
        "on_error = error ran the loader"
    );

    // Rate limit, on_error = local: a decision from the in-process limiter.
    let d = timer
        .time("ratelimit.check", kit.limiter.check("client"))
        .await
        .expect("a rate-limit check with on_error = local answers");
    assert_eq!(d.source(), Source::LocalFallback);

    // Sessions, locks, idempotency: typed backend errors.
    let r = timer
        .time("session.get", kit.sessions.get(&before.token))
        .await;
    backend_error("session.get", r.map(|_| ()));
    let r = timer
        .time(
            "session.create",
            kit.sessions.create(&format!("u{round}"), &vec![2]),
        )
        .await;
    backend_error("session.create", r.map(|_| ()));
    let r = timer
        .time("lock.try_lock", kit.locks.try_lock(&("other", round)))
        .await;
    backend_error("lock.try_lock", r.map(|_| ()));
    let r = timer
        .time("lock.extend", before.guard.extend(Duration::from_secs(30)))
        .await;
    backend_error("lock.extend", r.map(|_| ()));
    let r = timer
        .time("lock.fenced_write", before.guard.fenced_write(b"x"))
        .await;
    backend_error("lock.fenced_write", r.map(|_| ()));
    let fp = fingerprint(&[b"POST", b"/charges"]);
    let r = timer
        .time("idempotency.begin", kit.idem.begin(&("k", round), &fp))
        .await;
    backend_error("idempotency.begin", r.map(|_| ()));

    // Health and namespace-wide calls.
    let r = timer.time("ping", ping(&kit.kw)).await;
    backend_error("ping", r);
    let r = timer
        .time("invalidate_namespace", kit.kw.invalidate_namespace())
        .await;
    backend_error("invalidate_namespace", r);
}

/// Runs one call during a fault, asserting it stays within [`BOUND`]; returns its output and duration.
async fn timed<T>(name: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = call.await;
    let took = started.elapsed();
    assert!(took <= BOUND, "`{name}` took {took:?} during the fault");
    (out, took)
}

/// Polls `call` until it returns `Some`, at most until `deadline`; returns the value and when it came, or
/// `None` if the deadline passed first.
async fn try_poll_until<T, F, Fut>(deadline: Instant, mut call: F) -> Option<(T, Instant)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(out)) = tokio::time::timeout(remaining, call()).await {
            return Some((out, Instant::now()));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`try_poll_until`], failing the test if the deadline passes.
async fn poll_until<T, F, Fut>(deadline: Instant, what: &str, call: F) -> (T, Instant)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    try_poll_until(deadline, call)
        .await
        .unwrap_or_else(|| panic!("{what}: not done by the deadline"))
}

/// Polls until a store call on `kit` succeeds; returns when it did.
async fn first_success(kit: &Kit, deadline: Instant, what: &str) -> Instant {
    let (_, at) = poll_until(deadline, what, || async {
        kit.cache.set("probe", &"p".to_owned()).await.ok()
    })
    .await;
    at
}

/// A server that is killed: the port refuses connections. Every call stays within the bound, a fail-open
/// cache serves the loader's value, and once the breaker is open every call returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_every_call_is_bounded_and_the_cache_fails_open() {
    let mut server = RedisServer::spawn_tcp();
    // A long cooldown: once open, the breaker stays open for the rest of the test.
    let kit = Kit::connect(
        &server.url(),
        &unique_app(),
        options(Duration::from_secs(60)),
    )
    .await;
    let before = before_the_fault(&kit).await;

    server.kill();
    let mut timer = Timer::new(BOUND);
    every_capability_once(&kit, &before, &mut timer, 0).await;
    figure("refused_longest_call", timer.longest);
    eprintln!("refused: longest call `{}`", timer.longest_name);
    assert_eq!(
        kit.kw.breaker_state(),
        BreakerState::Open,
        "a round of failures opens the breaker for every capability"
    );

    // Breaker open: no call pays the timeout any more, and store calls say why they failed.
    let mut fast = Timer::new(RESPONSE);
    for round in 1..4 {
        every_capability_once(&kit, &before, &mut fast, round).await;
    }
    figure("refused_breaker_open_longest_call", fast.longest);
    let err = kit
        .sessions
        .get(&before.token)
        .await
        .expect_err("the store is down");
    assert!(
        is_circuit_open(&err) && err.is_backend(),
        "expected CircuitOpen: {err}"
    );
    let started = Instant::now();
    let value = kit
        .cache
        .get_or_set("while-open", kit.loader("fresh".to_owned()))
        .await
        .expect("fail open");
    assert_eq!(value, "fresh");
    figure("refused_breaker_open_get_or_set", started.elapsed());
}

/// Concurrent fail-open callers of one key in one process share one load, and nothing is written: once
/// the server is reachable again, the key is still a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_callers_share_one_load_and_write_nothing() {
    let server = RedisServer::spawn_tcp();
    let proxy = TcpProxy::to_server(&server);
    let app = unique_app();
    let kit = Kit::connect(&proxy.url(), &app, options(Duration::from_millis(250))).await;
    let direct = Kit::connect(&server.url(), &app, options(Duration::from_millis(250))).await;
    proxy.blackhole();

    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cache = kit.cache.clone();
        let loads = Arc::clone(&loads);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let got = cache
                .get_or_set("shared", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // The source's own latency: every caller has joined the load by the time it answers.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>("from the source".to_owned())
                })
                .await;
            (got, started.elapsed())
        }));
    }
    for task in tasks {
        let (got, took) = task.await.unwrap();
        assert_eq!(got.expect("fail open"), "from the source");
        assert!(
            took <= BOUND + Duration::from_millis(300),
            "a fail-open get_or_set took {took:?} (bound + loader time)"
        );
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "concurrent fail-open callers in one process share one load"
    );

    proxy.forward();
    first_success(&kit, Instant::now() + GIVE_UP, "recovery through the proxy").await;
    assert_eq!(
        direct.cache.get("shared").await.unwrap(),
        None,
        "a fail-open load was written to the store"
    );
}

/// The fail-open counter counts per class.
#[test]
fn fail_open_is_counted_per_class() {
    with_recorder(|snapshotter| {
        Box::pin(async move {
            let mut server = RedisServer::spawn_tcp();
            let kit = Kit::connect(
                &server.url(),
                &unique_app(),
                options(Duration::from_secs(60)),
            )
            .await;
            server.kill();
            for i in 0..3 {
                let v = kit
                    .cache
                    .get_or_set(&("k", i), kit.loader("v".to_owned()))
                    .await
                    .expect("fail open");
                assert_eq!(v, "v");
            }
            assert_eq!(
                counted(
                    &snapshotter,
                    "keyward_cache_fail_open_total",
                    Some("product")
                ),
                3,
                "keyward_cache_fail_open_total{{class=\"product\"}}"
            );
            assert_eq!(
                counted(
                    &snapshotter,
                    "keyward_cache_fail_open_total",
                    Some("strict")
                ),
                0
            );
        })
    });
}

/// A host that accepts TCP and never answers (the connection goes silent mid-use, and new connections are
/// accepted and never answered) for more than 5 s: every call stays within the bound all along, also
/// while the breaker probes and the client tries to reconnect. Traffic then flows again and everything
/// recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_host_every_call_is_bounded_for_the_whole_outage() {
    let server = RedisServer::spawn_tcp();
    let proxy = TcpProxy::to_server(&server);
    // A short cooldown, so the breaker probes (and the client reconnects) many times during the outage.
    let kit = Kit::connect(
        &proxy.url(),
        &unique_app(),
        options(Duration::from_millis(300)),
    )
    .await;
    let before = before_the_fault(&kit).await;

    proxy.blackhole();
    let outage = Instant::now();
    let mut timer = Timer::new(BOUND);
    let mut round = 0;
    while outage.elapsed() < Duration::from_secs(6) {
        every_capability_once(&kit, &before, &mut timer, round).await;
        round += 1;
    }
    // A new handle connecting to the silent host gives up within its connect timeout.
    let started = Instant::now();
    let connected = Keyward::connect_with(
        &proxy.url(),
        policy(&unique_app()),
        options(Duration::from_secs(1)),
    )
    .await;
    let took = started.elapsed();
    assert!(connected.is_err(), "connected to a host that never answers");
    assert!(took <= BOUND, "connecting to a silent host took {took:?}");
    figure("silent_longest_call", timer.longest.max(took));
    eprintln!(
        "silent: {} calls in {round} rounds over {:?}; longest `{}`",
        timer.calls,
        outage.elapsed(),
        timer.longest_name
    );

    proxy.forward();
    let back = Instant::now();
    let at = first_success(&kit, back + GIVE_UP, "recovery after the silent host").await;
    figure("silent_recovery", at - back);
    assert!(
        at - back <= RECOVERY,
        "the first successful store call came {:?} after traffic flowed again",
        at - back
    );
}

/// Connecting to a listener that accepts and never answers fails within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_host_that_never_answers_is_bounded() {
    let hole = Blackhole::start();
    let started = Instant::now();
    let connected = Keyward::connect_with(
        &hole.url(),
        policy(&unique_app()),
        options(Duration::from_secs(1)),
    )
    .await;
    let took = started.elapsed();
    let err = connected.expect_err("connected to a blackhole");
    assert!(
        err.is_backend() || matches!(err, keyward::Error::Connect { .. }),
        "{err}"
    );
    assert!(took <= BOUND, "connect took {took:?}");
    figure("blackhole_connect", took);
}

/// A server frozen for 5 s (`SIGSTOP`), then resumed (`SIGCONT`): the calls that timed out during the
/// freeze still run on the server afterwards, and what they leave behind must not block anyone: a cache
/// fetch's fill lease, an idempotency `begin`'s in-progress marker, a lock acquired for nobody. Each must be
/// usable again, from another handle too, within 1 s of the server answering `PING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_timed_out_calls_are_cleaned_when_a_hung_server_resumes() {
    let mut server = RedisServer::spawn();
    let app = unique_app();
    // Each timed-out call gets a handle of its own, connected and warm (scripts loaded) before the freeze,
    // so that it is surely written to the server and runs there after the resume, like a request from
    // another process that gave up.
    let options = options(Duration::from_millis(250));
    let hung = Kit::connect(&server.url(), &app, options.clone()).await;
    let hung_idem = Kit::connect(&server.url(), &app, options.clone()).await;
    let hung_lock = Kit::connect(&server.url(), &app, options.clone()).await;
    let other = Kit::connect(&server.url(), &app, options).await;
    let fp = fingerprint(&[b"POST", b"/charges", b"{\"amount\":1}"]);
    for kit in [&hung, &hung_idem, &hung_lock, &other] {
        let _ = before_the_fault(kit).await;
    }

    server.pause();
    let frozen = Instant::now();
    let (cache, idem, lock) = tokio::join!(
        // (a) a cache fetch of a cold key: on the server it will take the fill lease for this caller.
        // (What it returns is the refused-port test's business; here only its leftovers matter.)
        // Two keys: "cold" is read again by another handle, "cold-same" by this one.
        timed("cache.get_or_set", async {
            let _ = tokio::join!(
                hung.cache
                    .get_or_set("cold", hung.loader("during the hang".to_owned())),
                hung.cache
                    .get_or_set("cold-same", hung.loader("during the hang".to_owned())),
            );
            true
        }),
        // (b) an idempotency begin: on the server it will leave an in-progress marker.
        timed("idempotency.begin", async {
            hung_idem.idem.begin("retried", &fp).await.is_err()
        }),
        // (c) a lock acquire: on the server it will take the lock for a caller that gave up.
        timed("lock.try_lock", async {
            hung_lock.locks.try_lock("contested").await.is_err()
        }),
    );
    assert!(idem.0, "begin succeeded against a frozen server");
    assert!(lock.0, "try_lock succeeded against a frozen server");
    figure("sigstop_longest_call", cache.1.max(idem.1).max(lock.1));

    // The freeze lasts 5 s in all.
    tokio::time::sleep_until((frozen + Duration::from_secs(5)).into()).await;
    let answered = server.resume();
    let deadline = answered + GIVE_UP;

    // Each recovery is polled until GIVE_UP, so a failure reports how long it really took ("never" = the
    // deadline).
    let cache_back = async {
        // From another handle, and from the handle whose fetch timed out; the fill must be stored (a
        // fail-open bypass does not count).
        let other_at = try_poll_until(deadline, || async {
            let v = other
                .cache
                .get_or_set("cold", other.loader("after the hang".to_owned()))
                .await
                .ok()?;
            assert!(
                v == "after the hang" || v == "during the hang",
                "wrong value {v:?}"
            );
            other.cache.get("cold").await.ok().flatten()
        });
        let hung_at = try_poll_until(deadline, || async {
            let v = hung
                .cache
                .get_or_set("cold-same", hung.loader("after the hang".to_owned()))
                .await
                .ok()?;
            assert!(
                v == "after the hang" || v == "during the hang",
                "wrong value {v:?}"
            );
            other.cache.get("cold-same").await.ok().flatten()
        });
        let (other_at, hung_at) = tokio::join!(other_at, hung_at);
        (
            other_at.map_or(deadline, |(_, at)| at),
            hung_at.map_or(deadline, |(_, at)| at),
        )
    };
    let idempotency_back = try_poll_until(deadline, || async {
        match other.idem.begin("retried", &fp).await {
            Ok(Begin::New(lease)) => {
                let stored = other
                    .idem
                    .complete(&lease, &StoredResponse::new(201, "done"))
                    .await
                    .ok()?;
                assert_eq!(stored, Completion::Stored);
                Some(())
            }
            Ok(Begin::Completed(_)) => Some(()),
            Ok(Begin::InProgress { .. }) | Err(_) => None,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    });
    let lock_back = try_poll_until(deadline, || async {
        other.locks.try_lock("contested").await.ok().flatten()
    });
    let ((cache_other, cache_hung), idempotency, lock) =
        tokio::join!(cache_back, idempotency_back, lock_back);
    let idem_at = idempotency.map_or(deadline, |(_, at)| at);
    let lock_at = lock.as_ref().map_or(deadline, |(_, at)| *at);

    let after = |at: Instant| at.saturating_duration_since(answered);
    figure("sigstop_recovery_cache_other_handle", after(cache_other));
    figure("sigstop_recovery_cache_same_handle", after(cache_hung));
    figure("sigstop_recovery_idempotency", after(idem_at));
    figure("sigstop_recovery_lock", after(lock_at));
    for (what, at) in [
        (
            "a cache read of the key whose fetch timed out (other handle)",
            cache_other,
        ),
        (
            "a cache read of the key whose fetch timed out (same handle)",
            cache_hung,
        ),
        ("an idempotency retry", idem_at),
        ("a lock acquire from another handle", lock_at),
    ] {
        assert!(
            after(at) <= RECOVERY,
            "{what} worked only {:?} after the server answered PING again",
            after(at)
        );
    }
    if let Some((guard, _)) = lock {
        assert!(guard.release().await.unwrap());
    }
}

/// A server killed and restarted empty while tasks loop `get_or_set` over a set of keys: no task ever gets
/// a wrong value (another key's, or one older than an invalidation that finished before its call began),
/// every call stays within the bound, and a store call succeeds within 1 s of the new server answering
/// `PING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_under_load_returns_no_wrong_value() {
    let mut server = RedisServer::spawn_tcp();
    let app = unique_app();
    let cooldown = Duration::from_millis(250);
    let kits = [
        Kit::connect(&server.url(), &app, options(cooldown)).await,
        Kit::connect(&server.url(), &app, options(cooldown)).await,
    ];
    // The source of truth: value = "{key}@v{version}".
    let version = Arc::new(AtomicU64::new(0));
    // The version every call that starts now must at least see (an invalidation after a version change
    // has completed).
    let floor = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for t in 0..8 {
        let kit = kits[t % 2].clone();
        let (version, floor, stop) = (Arc::clone(&version), Arc::clone(&floor), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut calls = 0_u64;
            let mut wrong = Vec::new();
            let mut longest = Duration::ZERO;
            let mut i = t;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("k{}", i % 20);
                i += 7;
                let must_see = floor.load(Ordering::SeqCst);
                let call_started = Instant::now();
                let source = Arc::clone(&version);
                let k = key.clone();
                let got = kit
                    .cache
                    .get_or_set(&key, move || async move {
                        Ok::<_, std::io::Error>(format!("{k}@v{}", source.load(Ordering::SeqCst)))
                    })
                    .await;
                longest = longest.max(call_started.elapsed());
                calls += 1;
                if let Ok(value) = got {
                    let ok = value
                        .strip_prefix(&format!("{key}@v"))
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v >= must_see);
                    if !ok {
                        wrong.push(format!("{key} (must see v{must_see}) -> {value}"));
                    }
                }
                tokio::task::yield_now().await;
            }
            (calls, wrong, longest)
        }));
    }

    // Healthy: a new version, made visible by an invalidation.
    let bump = |to: u64| {
        let (version, floor, kit) = (Arc::clone(&version), Arc::clone(&floor), kits[0].clone());
        async move {
            version.store(to, Ordering::SeqCst);
            let deadline = Instant::now() + GIVE_UP;
            loop {
                if kit.cache.invalidate_all().await.is_ok() {
                    floor.store(to, Ordering::SeqCst);
                    return;
                }
                assert!(Instant::now() < deadline, "invalidate_all never succeeded");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    bump(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.kill();
    // The outage under load lasts 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered = server.restart();
    let deadline = answered + GIVE_UP;
    let (a, b) = tokio::join!(
        first_success(&kits[0], deadline, "recovery of handle 0"),
        first_success(&kits[1], deadline, "recovery of handle 1"),
    );
    let recovered = a.max(b);
    figure("sigkill_recovery", recovered - answered);

    // Healthy again: another version; epochs must not repeat on the empty server.
    bump(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);

    let mut calls = 0;
    let mut wrong = Vec::new();
    let mut longest = Duration::ZERO;
    for task in tasks {
        let (c, w, l) = task.await.unwrap();
        calls += c;
        wrong.extend(w);
        longest = longest.max(l);
    }
    figure("sigkill_longest_call", longest);
    eprintln!(
        "sigkill: {calls} calls in {:?}, {} wrong",
        started.elapsed(),
        wrong.len()
    );
    assert!(calls > 0);
    assert!(wrong.is_empty(), "wrong values: {wrong:?}");
    assert!(
        longest <= BOUND,
        "a get_or_set took {longest:?} around the restart"
    );
    assert!(
        recovered - answered <= RECOVERY,
        "the first successful store call came {:?} after the restarted server answered PING",
        recovered - answered
    );
}

/// A restart that loses live locks, sessions and idempotency keys: the old lock guard learns its lease is
/// lost, a new holder gets a greater fencing token (and a fenced write with the old one is refused), the
/// session reads as absent, and the idempotency key can be used again while the old lease's completion is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_empty_loses_live_state_visibly_and_safely() {
    let mut server = RedisServer::spawn();
    let kit = Kit::connect(
        &server.url(),
        &unique_app(),
        options(Duration::from_millis(250)),
    )
    .await;
    let fp = fingerprint(&[b"POST", b"/charges"]);
    let guard = kit
        .locks
        .try_lock("nightly")
        .await
        .unwrap()
        .expect("free lock");
    assert!(guard.fenced_write(b"before").await.unwrap().is_applied());
    let old_fence = guard.fence();
    let (token, _) = kit.sessions.create("alice", &vec![1]).await.unwrap();
    let _ = kit
        .idem
        .begin("warm-up", &fingerprint(&[b"warm-up"]))
        .await
        .unwrap();
    let Begin::New(lease) = kit.idem.begin("pay-1", &fp).await.unwrap() else {
        panic!("first begin runs");
    };

    let answered = server.restart();
    first_success(&kit, answered + GIVE_UP, "recovery after the restart").await;

    assert!(
        !guard.extend(Duration::from_secs(30)).await.unwrap(),
        "extend must report the lease lost"
    );
    let new = kit
        .locks
        .try_lock("nightly")
        .await
        .unwrap()
        .expect("the lock is free after the restart");
    assert!(
        new.fence() > old_fence,
        "fence after the restart {} is not greater than {old_fence}",
        new.fence()
    );
    assert!(new.fenced_write(b"after").await.unwrap().is_applied());
    assert!(
        matches!(
            guard.fenced_write(b"stale").await.unwrap(),
            FencedWrite::Stale { .. }
        ),
        "a fenced write with the old guard must be refused"
    );
    assert!(guard.is_lost(), "the old guard knows its lease is lost");
    assert!(new.release().await.unwrap());

    assert!(
        kit.sessions.get(token.as_str()).await.unwrap().is_none(),
        "the session is gone"
    );

    let Begin::New(again) = kit.idem.begin("pay-1", &fp).await.unwrap() else {
        panic!("the idempotency key is new again after the restart");
    };
    assert_eq!(
        kit.idem
            .complete(&lease, &StoredResponse::new(201, "old"))
            .await
            .unwrap(),
        Completion::LeaseLost,
        "the lease from before the restart must not complete"
    );
    assert_eq!(
        kit.idem
            .complete(&again, &StoredResponse::new(201, "new"))
            .await
            .unwrap(),
        Completion::Stored
    );
}

/// Sum of a counter over every label set that includes `class`.
fn counted(
    snapshotter: &metrics_util::debugging::Snapshotter,
    name: &str,
    class: Option<&str>,
) -> u64 {
    use metrics_util::debugging::DebugValue;
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == name
                && class.is_none_or(|class| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == "class" && l.value() == class)
                })
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// Runs `test` on a current-thread runtime with a local metrics recorder, so every counter keyward
/// touches during the test (also those it creates lazily) is recorded here and nowhere else.
fn with_recorder(
    test: impl FnOnce(
        metrics_util::debugging::Snapshotter,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()>>>,
) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test(snapshotter)));
}

/// A rate-limit check that timed out during a freeze may still be charged on the server once it resumes —
/// at most once — and is counted in `keyward_ratelimit_uncertain_total`.
#[test]
fn a_timed_out_rate_limit_check_is_charged_at_most_once_and_counted() {
    with_recorder(|snapshotter| {
        Box::pin(async move {
            let mut server = RedisServer::spawn();
            let kit = Kit::connect(
                &server.url(),
                &unique_app(),
                options(Duration::from_millis(250)),
            )
            .await;
            let first = kit.limiter.check("payer").await.unwrap();
            assert_eq!(first.source(), Source::Store);
            let limit = first.binding().limit();
            assert_eq!(first.binding().remaining(), limit - 1);

            server.pause();
            let (decision, _) = timed("ratelimit.check", kit.limiter.check("payer")).await;
            assert_eq!(decision.unwrap().source(), Source::LocalFallback);
            server.resume();

            let (after, _) = poll_until(Instant::now() + GIVE_UP, "rate limit back", || async {
                kit.limiter
                    .peek("payer")
                    .await
                    .ok()
                    .filter(|d| d.source() == Source::Store)
            })
            .await;
            let charged = limit - 1 - after.binding().remaining();
            assert!(
                charged <= 1,
                "the timed-out check was charged {charged} times on the server"
            );
            assert_eq!(
                counted(
                    &snapshotter,
                    "keyward_ratelimit_uncertain_total",
                    Some("limited")
                ),
                1,
                "keyward_ratelimit_uncertain_total{{class=\"limited\"}}"
            );
        })
    });
}

/// `Keyward::ping` answers on a healthy server and is not counted as cache traffic.
#[test]
fn ping_is_not_a_cache_metric() {
    with_recorder(|snapshotter| {
        Box::pin(async move {
            let server = RedisServer::spawn();
            let kit = Kit::connect(
                &server.url(),
                &unique_app(),
                options(Duration::from_secs(1)),
            )
            .await;
            let cache_traffic = |snapshotter: &metrics_util::debugging::Snapshotter| {
                snapshotter
                    .snapshot()
                    .into_vec()
                    .into_iter()
                    .filter(|(key, _, _, _)| key.key().name().starts_with("keyward_cache_"))
                    .map(|(key, _, _, value)| format!("{} {value:?}", key.key().name()))
                    .filter(|line| !line.ends_with("Counter(0)"))
                    .collect::<Vec<_>>()
            };
            let before = cache_traffic(&snapshotter);
            for _ in 0..3 {
                let (pinged, _) = timed("ping", ping(&kit.kw)).await;
                pinged.expect("ping a healthy server");
            }
            assert_eq!(
                cache_traffic(&snapshotter),
                before,
                "ping counted as cache traffic"
            );
        })
    });
}

/// An error reply for one rate-limit identity (its key holds the wrong type) is an error for that identity
/// only: it is not "Redis unavailable", so `on_error = "local"` does not hide it, and it does not open the
/// breaker that every capability shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_is_not_unavailability() {
    let server = RedisServer::spawn();
    let kit = Kit::connect(
        &server.url(),
        &unique_app(),
        options(Duration::from_secs(60)),
    )
    .await;
    assert_eq!(
        kit.limiter.check("victim").await.unwrap().source(),
        Source::Store
    );
    // Corrupt the victim's state with a value of another type.
    let mut admin = server.connection();
    let keys: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg("*:limited:*victim*")
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut admin)
        .unwrap()
        .map(|k: redis::RedisResult<String>| k.unwrap())
        .collect();
    assert!(
        !keys.is_empty(),
        "the victim's rate-limit key was not found"
    );
    for key in &keys {
        let () = redis::pipe()
            .cmd("DEL")
            .arg(key)
            .ignore()
            .cmd("RPUSH")
            .arg(key)
            .arg("not a rate-limit state")
            .ignore()
            .cmd("PEXPIRE")
            .arg(key)
            .arg(60_000)
            .ignore()
            .query(&mut admin)
            .unwrap();
    }

    for _ in 0..5 {
        match kit.limiter.check("victim").await {
            // An error (or a reset of the corrupt state, answered by the store) is fine; the breaker's
            // refusal is not.
            Err(err) => assert!(
                !is_circuit_open(&err),
                "the corrupt identity opened the breaker: {err}"
            ),
            Ok(d) => assert_eq!(
                d.source(),
                Source::Store,
                "a corrupt identity fell back ({:?}) as if Redis were down",
                d.source()
            ),
        }
    }
    assert_eq!(
        kit.kw.breaker_state(),
        BreakerState::Closed,
        "an error reply opened the shared breaker"
    );
    assert_eq!(
        kit.limiter.check("bystander").await.unwrap().source(),
        Source::Store
    );
    assert!(
        kit.cache
            .get_or_set("still-cached", kit.loader("v".to_owned()))
            .await
            .is_ok()
    );
}
