//! The scenarios, measured inside one process: set-up (connect, warm) is separate from the measured phase, so
//! the caller can take its command-count snapshot or do the READY/GO handshake in between.
//!
//! The rate-limit scenarios give every run a class of its own (in the run's fresh namespace) whose numbers
//! are chosen for what the scenario measures: for `ratelimit_exact`, nothing replenishes during the run, so
//! any allowance beyond the limit is a race; for `ratelimit_throughput`, nothing is ever refused, so every
//! check costs the same. Likewise `lock` gets a lock class and `session` a session class (see [`policy`]).
//!
//! `lock --names one` checks what it measures: inside the critical section each worker makes sure no other
//! worker of its process is inside ([`Exclusion`]), and a violation is counted, not hidden.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use keyward::key::IdParts;
use keyward::lock::Locks;
use keyward::policy::{
    Algorithm, CacheClass, LockClass, OnError, Policy, PolicyError, RateLimitClass, SessionClass,
};
use keyward::rate_limit::Source;
use keyward::session::{SessionSecrets, SessionToken, Sessions};
use keyward::{Cache, Keyward, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::bench::{Extend, LockNames, Scenario};

/// Target size of one cached value, JSON-encoded.
const VALUE_BYTES: usize = 1024;
/// Highest latency the histograms track (60 s, in µs); slower operations are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;
/// The one cache class of the bench policy.
const CLASS: &str = "bench";
/// The rate-limit class of the bench policy (rate-limit scenarios only).
const RATE_CLASS: &str = "bench_rl";
/// `ratelimit_exact`: the window of every algorithm but `sliding_log`. Long, so that nothing replenishes during
/// a run (token bucket and GCRA refill one unit per window / limit) and a fixed window's edge (aligned to the
/// Unix epoch) falls inside a run of a few seconds with odds of about 1 in a million. The run's one key
/// expires on its own, within this window.
const EXACT_WINDOW: Duration = Duration::from_secs(100 * 24 * 60 * 60);
/// `ratelimit_exact` with `sliding_log`: its entries only leave the window when it has passed, so any window
/// longer than the run is exact; a short one keeps the run's (up to `limit`) entries from lingering.
const EXACT_LOG_WINDOW: Duration = Duration::from_secs(60 * 60);
/// `ratelimit_throughput`: a limit no identity gets near (10,000 identities at any plausible rate).
const THROUGHPUT_LIMIT: u64 = 1_000_000_000;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(60 * 60);
/// `ratelimit_throughput` with `sliding_log`, which allows at most 100,000 per window and stores one entry per
/// request for the window's length: 100,000 per second per identity is never reached, and a 1 s window keeps
/// the log of each identity short.
const THROUGHPUT_LOG_LIMIT: u64 = 100_000;
const THROUGHPUT_LOG_WINDOW: Duration = Duration::from_secs(1);
/// `ratelimit_throughput`: how many identities the workers spread their checks over.
pub(crate) const IDENTITIES: u64 = 10_000;
/// The lock class of the bench policy (`lock` only).
const LOCK_CLASS: &str = "bench_lock";
/// `lock`: the lease. Far longer than a critical section (a yield), so that no lease runs out while held,
/// which would let a second holder in and count as a violation without being one.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// `lock`: how long `Locks::lock` waits for the contended name before giving up (a timeout, counted).
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// `lock`: how long the fencing counters outlive their last use; the bench's keys need not last 7 days.
const LOCK_FENCE_TTL: Duration = Duration::from_secs(10 * 60);
/// The session class of the bench policy (`session` only).
const SESSION_CLASS: &str = "bench_session";
/// `session`: the class's timeouts; no session ends during a run.
const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
const SESSION_ABSOLUTE: Duration = Duration::from_secs(12 * 60 * 60);
/// `session`: the pool's sessions per user (the per-user index the scripts keep has this many entries).
const SESSIONS_PER_USER: u64 = 10;
/// `session`: the server secret tokens are keyed under. A benchmark's, not a secret.
const SESSION_SECRET: &[u8; 32] = b"keyward bench: not a real secret";
/// `session`: how many sessions are created at once while the pool is built.
const POOL_BUILDERS: usize = 64;

/// The value the benchmark caches: a record shaped like a typical API object, ≈1 KiB as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Item {
    id: u64,
    name: String,
    tags: Vec<String>,
    body: String,
}

impl Item {
    /// An item whose JSON encoding is [`VALUE_BYTES`] long (give or take the digits of `id`).
    pub(crate) fn sized(id: u64) -> Self {
        let mut item = Item {
            id,
            name: format!("benchmark item {id}"),
            tags: ["bench", "keyward", "cache", "redis"]
                .map(str::to_owned)
                .to_vec(),
            body: String::new(),
        };
        let bare = serde_json::to_vec(&item).map_or(0, |v| v.len());
        item.body = "x".repeat(VALUE_BYTES.saturating_sub(bare));
        item
    }
}

/// The policy every bench process uses, in a namespace of its own (`app`): one cache class, plus for the
/// rate-limit scenarios one rate-limit class (see [`rate_class`]), for `lock` one lock class (a
/// [`LOCK_TTL`] lease, a [`LOCK_WAIT`] wait, no watchdog) and for `session` one session class (see
/// [`session_class`]).
///
/// # Errors
/// A [`PolicyError`] when the rate-limit class is invalid (e.g. a `--limit` out of range for the algorithm).
pub(crate) fn policy(app: &str, work: &Workload) -> Result<Policy, PolicyError> {
    let mut builder = Policy::builder("bench", app).cache(
        CLASS,
        CacheClass::new(Duration::from_secs(600), "keyward bench")
            .lease_ttl(Duration::from_secs(10))
            .loader_timeout(Duration::from_secs(5))
            .max_value_bytes(1024 * 1024),
    );
    if let Some(class) = rate_class(work) {
        builder = builder.rate_limit(RATE_CLASS, class);
    }
    if work.scenario == Scenario::Lock {
        builder = builder.lock(
            LOCK_CLASS,
            LockClass::new(LOCK_TTL)
                .wait(LOCK_WAIT)
                .fence_ttl(LOCK_FENCE_TTL),
        );
    }
    if let Some(class) = session_class(work) {
        builder = builder.session(SESSION_CLASS, class);
    }
    builder.build()
}

/// The session class of `session` (`None` for the other scenarios): idle 30 min, absolute 12 h, and
/// `extend_after` 0 for `--extend always`, the default (`idle / 10`) for `--extend default`.
pub(crate) fn session_class(work: &Workload) -> Option<SessionClass> {
    if work.scenario != Scenario::Session {
        return None;
    }
    let class = SessionClass::new(SESSION_IDLE, SESSION_ABSOLUTE);
    Some(match work.extend {
        Extend::Always => class.extend_after(Duration::ZERO),
        Extend::Default => class,
    })
}

/// The rate-limit class of a rate-limit scenario (`None` for the others).
///
/// `ratelimit_exact`: `--limit` per [`EXACT_WINDOW`] (`sliding_log`: per [`EXACT_LOG_WINDOW`]), burst =
/// limit. `ratelimit_throughput`: [`THROUGHPUT_LIMIT`] per hour (`sliding_log`: [`THROUGHPUT_LOG_LIMIT`] per
/// second), burst = limit. `on_error = deny`, so that a Redis failure can never pass for an allowance; the
/// workload fails the run on any decision not made by the store anyway.
pub(crate) fn rate_class(work: &Workload) -> Option<RateLimitClass> {
    let log = work.algorithm == Algorithm::SlidingLog;
    let (limit, window) = match work.scenario {
        Scenario::RatelimitExact if log => (work.limit, EXACT_LOG_WINDOW),
        Scenario::RatelimitExact => (work.limit, EXACT_WINDOW),
        Scenario::RatelimitThroughput if log => (THROUGHPUT_LOG_LIMIT, THROUGHPUT_LOG_WINDOW),
        Scenario::RatelimitThroughput => (THROUGHPUT_LIMIT, THROUGHPUT_WINDOW),
        Scenario::Hit
        | Scenario::Miss
        | Scenario::Stampede
        | Scenario::Get
        | Scenario::Lock
        | Scenario::Session => return None,
    };
    let class = RateLimitClass::new(work.algorithm, limit, window).on_error(OnError::Deny);
    Some(if work.algorithm.has_burst() {
        class.burst(limit)
    } else {
        class
    })
}

/// What one process runs.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) scenario: Scenario,
    /// Concurrent callers in this process.
    pub(crate) concurrency: usize,
    /// How long `hit` runs.
    pub(crate) duration: Duration,
    /// `miss`: how many keys this process loads, and the index of its first one. `session`: how many
    /// sessions this process creates and reads (and the index of its first, which names their users).
    pub(crate) keys: u64,
    pub(crate) key_offset: u64,
    /// `hit` and `get`: how many warm keys the workers spread over.
    pub(crate) hit_keys: u64,
    /// `stampede`: how long the loader takes.
    pub(crate) loader_delay: Duration,
    /// Names the run's key(s), so every run starts cold.
    pub(crate) key_id: u64,
    /// Rate-limit scenarios: the algorithm of the class.
    pub(crate) algorithm: Algorithm,
    /// `ratelimit_exact`: the class's limit (and burst).
    pub(crate) limit: u64,
    /// `lock`: a name per worker, or one for all.
    pub(crate) lock_names: LockNames,
    /// `session`: extend on every read, or with the class default.
    pub(crate) extend: Extend,
}

/// What one process measured.
#[derive(Debug)]
pub(crate) struct Measured {
    pub(crate) loader_calls: u64,
    /// Rate-limit scenarios: checks allowed and refused.
    pub(crate) allowed: u64,
    pub(crate) limited: u64,
    /// `lock --names one`: mutual-exclusion violations seen (see [`Exclusion`]), and `lock` calls that gave
    /// up at the class's wait.
    pub(crate) violations: u64,
    pub(crate) timeouts: u64,
    /// `lock --names one`: acquisitions by the worker that held the lock last in its process (see
    /// [`Exclusion`]).
    pub(crate) reacquired: u64,
    pub(crate) seconds: f64,
    /// Latency of every operation, in µs; its length is the operation count.
    pub(crate) latencies: Histogram<u64>,
}

/// A connected, warmed-up workload, ready for its measured phase.
pub(crate) struct Prepared {
    work: Workload,
    cache: Cache<Item>,
    value: Arc<Item>,
    /// `get`: a plain redis-rs connection, as an application without keyward would hold.
    raw: Option<redis::aio::ConnectionManager>,
    /// Rate-limit scenarios: the limiter of the bench's rate-limit class.
    limiter: Option<RateLimiter>,
    /// `lock`: the bench's lock class.
    locks: Option<Locks>,
    /// `session`: the bench's session class and the tokens of this process's pool.
    pool: Option<SessionPool>,
    /// `lock --names distinct`: makes this process's lock names its own (children share `key_id`).
    salt: u64,
    /// The namespace app name (the baseline's keys live under it).
    app: String,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Connect to `url` in namespace `app` and warm up (one fill of a key of its own, or for the rate-limit
/// scenarios one check of an identity of its own, for `lock` one acquire + release of a name of its own; for
/// `hit`, the hit key is written with `set`; for `session`, the pool is created and one session read).
pub(crate) async fn prepare(url: &str, app: &str, work: Workload) -> anyhow::Result<Prepared> {
    let policy =
        policy(app, &work).map_err(|e| anyhow::Error::new(crate::UsageError(e.to_string())))?;
    let kw = Keyward::connect(url, policy).await.map_err(|e| match e {
        keyward::Error::InvalidUrl { .. } => anyhow::Error::new(crate::UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    let cache = kw
        .cache::<Item>(CLASS)
        .context("cannot open the bench cache class")?;
    let value = Arc::new(Item::sized(work.key_id));
    let mut raw = None;
    let mut limiter = None;
    let mut locks = None;
    let mut pool = None;
    let salt = rand::random::<u64>();
    // Warm-up, outside the measured phase: one call on a key of its own loads keyward's scripts into Redis
    // and opens the connection, so one-time costs do not count against the scenario.
    match work.scenario {
        Scenario::RatelimitExact | Scenario::RatelimitThroughput => {
            let rl = kw
                .rate_limiter(RATE_CLASS)
                .context("cannot open the bench rate-limit class")?;
            let warm = rl
                .check(&("warmup", work.key_id))
                .await
                .context("warm-up check failed")?;
            if warm.source() != Source::Store {
                anyhow::bail!(
                    "the warm-up check was decided without the store ({:?}): Redis failed, see the warning above",
                    warm.source()
                );
            }
            limiter = Some(rl);
        }
        Scenario::Lock => {
            let l = kw
                .locks(LOCK_CLASS)
                .context("cannot open the bench lock class")?;
            let guard = l
                .try_lock(&("warmup", work.key_id, salt))
                .await
                .context("warm-up lock failed")?
                .context("the warm-up lock, on a name of its own, was held")?;
            if !guard.release().await.context("warm-up release failed")? {
                anyhow::bail!("the warm-up release found its lease gone");
            }
            locks = Some(l);
        }
        Scenario::Session => pool = Some(SessionPool::create(&kw, &work).await?),
        Scenario::Hit | Scenario::Miss | Scenario::Stampede | Scenario::Get => {
            let warm = Item::clone(&value);
            cache
                .get_or_set(&("warmup", work.key_id), || async move {
                    Ok::<_, Infallible>(warm)
                })
                .await
                .context("warm-up get_or_set failed")?;
        }
    }
    match work.scenario {
        Scenario::Hit => {
            for k in 0..work.hit_keys {
                cache
                    .set(&("hit", work.key_id, k), &value)
                    .await
                    .context("cannot warm the hit keys")?;
            }
        }
        Scenario::Get => {
            let client = redis::Client::open(url).context("cannot open the baseline client")?;
            let mut con = client
                .get_connection_manager()
                .await
                .context("cannot connect the baseline client")?;
            let bytes = serde_json::to_vec(&*value)?;
            for k in 0..work.hit_keys {
                let _: () = redis::cmd("SET")
                    .arg(raw_key(app, work.key_id, k))
                    .arg(&bytes)
                    .arg("PX")
                    .arg(600_000)
                    .query_async(&mut con)
                    .await
                    .context("cannot warm the baseline keys")?;
            }
            raw = Some(con);
        }
        Scenario::Miss
        | Scenario::Stampede
        | Scenario::RatelimitExact
        | Scenario::RatelimitThroughput
        | Scenario::Lock
        | Scenario::Session => {}
    }
    Ok(Prepared {
        work,
        cache,
        value,
        raw,
        limiter,
        locks,
        pool,
        salt,
        app: app.to_owned(),
    })
}

/// `session`: the sessions one process reads.
struct SessionPool {
    sessions: Sessions<Item>,
    tokens: Arc<[SessionToken]>,
}

impl SessionPool {
    /// Create `work.keys` sessions of ≈1 KiB data, [`SESSIONS_PER_USER`] per user, [`POOL_BUILDERS`] at a
    /// time; then read one, which loads the read script into Redis.
    async fn create(kw: &Keyward, work: &Workload) -> anyhow::Result<Self> {
        let secrets =
            SessionSecrets::new(SESSION_SECRET).context("the bench session secret is refused")?;
        let sessions = kw
            .sessions::<Item>(SESSION_CLASS, secrets)
            .context("cannot open the bench session class")?;
        let (n, offset) = (work.keys, work.key_offset);
        let next = Arc::new(AtomicU64::new(0));
        let mut builders = JoinSet::new();
        for _ in 0..POOL_BUILDERS.min(usize::try_from(n).unwrap_or(usize::MAX)) {
            let (sessions, next) = (sessions.clone(), Arc::clone(&next));
            builders.spawn(async move {
                let mut made = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let index = offset + i;
                    let user = format!("user{}", index / SESSIONS_PER_USER);
                    let (token, _) = sessions
                        .create(&user, &Item::sized(index))
                        .await
                        .with_context(|| format!("cannot create session {index} of the pool"))?;
                    made.push(token);
                }
                anyhow::Ok(made)
            });
        }
        let mut tokens = Vec::new();
        while let Some(made) = builders.join_next().await {
            tokens.extend(made.context("a session builder panicked")??);
        }
        let first = tokens.first().context("the session pool is empty")?;
        sessions
            .get(first.as_str())
            .await
            .context("warm-up get failed")?
            .context("a session just created was not found")?;
        Ok(Self {
            sessions,
            tokens: tokens.into(),
        })
    }
}

/// The baseline's keys: in the bench namespace, with a TTL, like everything else the bench writes.
fn raw_key(app: &str, key_id: u64, k: u64) -> String {
    format!("bench:{app}:_baseline:{key_id}:{k}")
}

/// When the measured operations of one worker started and ended.
struct Span {
    start: Instant,
    end: Instant,
}

/// What the workers of one process count besides latencies.
#[derive(Default)]
struct Counters {
    loader_calls: AtomicU64,
    allowed: AtomicU64,
    limited: AtomicU64,
    violations: AtomicU64,
    timeouts: AtomicU64,
    reacquired: AtomicU64,
}

/// Joins callers that each made one timed call, and tallies their latencies and overall span.
async fn one_shot_tally(
    mut callers: JoinSet<anyhow::Result<Span>>,
    counters: &Counters,
) -> anyhow::Result<Measured> {
    let mut tally = Tally::new();
    while let Some(joined) = callers.join_next().await {
        let span = joined.context("a benchmark task panicked")??;
        tally
            .latencies
            .saturating_record(micros(span.end - span.start));
        tally.span(&span);
    }
    Ok(tally.finish(counters))
}

/// Merges what workers report.
struct Tally {
    latencies: Histogram<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latencies: new_histogram(),
            first: None,
            last: None,
        }
    }

    fn span(&mut self, span: &Span) {
        self.first = Some(self.first.map_or(span.start, |f| f.min(span.start)));
        self.last = Some(self.last.map_or(span.end, |l| l.max(span.end)));
    }

    fn finish(self, counters: &Counters) -> Measured {
        let seconds = match (self.first, self.last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        Measured {
            loader_calls: counters.loader_calls.load(Ordering::Relaxed),
            allowed: counters.allowed.load(Ordering::Relaxed),
            limited: counters.limited.load(Ordering::Relaxed),
            violations: counters.violations.load(Ordering::Relaxed),
            timeouts: counters.timeouts.load(Ordering::Relaxed),
            reacquired: counters.reacquired.load(Ordering::Relaxed),
            seconds,
            latencies: self.latencies,
        }
    }
}

/// When a worker stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// At this instant (a timed run); an op under way when it passes finishes first.
    At(Instant),
    /// After this many calls (counting those that were not ops, e.g. a lock timeout).
    After(u64),
}

/// Call `op` in a loop until `stop`, recording the latency of each call that returns `true` (an op; `false`
/// is a call that does not count as one).
async fn repeat<F, Fut>(stop: Stop, mut op: F) -> anyhow::Result<(Histogram<u64>, Span)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut latencies = new_histogram();
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        let t = Instant::now();
        let done = match stop {
            Stop::At(deadline) => t >= deadline,
            Stop::After(n) => calls >= n,
        };
        if done {
            break;
        }
        calls += 1;
        if op().await? {
            latencies.saturating_record(micros(t.elapsed()));
        }
    }
    Ok((
        latencies,
        Span {
            start,
            end: Instant::now(),
        },
    ))
}

/// Call `op` in a loop until `deadline`, recording each call's latency.
async fn until_deadline<F, Fut>(
    deadline: Instant,
    mut op: F,
) -> anyhow::Result<(Histogram<u64>, Span)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    repeat(Stop::At(deadline), move || {
        let call = op();
        async move { call.await.map(|()| true) }
    })
    .await
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Prepared {
    /// The measured phase.
    pub(crate) async fn run(self) -> anyhow::Result<Measured> {
        let timed = Stop::At(Instant::now() + self.work.duration);
        match self.work.scenario {
            Scenario::Hit => self.hit().await,
            Scenario::Miss => self.miss().await,
            Scenario::Stampede => self.stampede().await,
            Scenario::Get => self.get().await,
            Scenario::RatelimitExact => self.ratelimit_exact().await,
            Scenario::RatelimitThroughput => self.ratelimit_throughput(timed).await,
            Scenario::Lock => self.lock(timed).await,
            Scenario::Session => self.session(timed).await,
        }
    }

    /// Not a scenario: every worker makes `per_worker` ops as the timed run of `ratelimit_throughput`, `lock`
    /// or `session` does (same classes; same identities, names or pool), then stops. What the caller observes
    /// meanwhile (the commands the server receives) is the cost of an op, outside the timed run.
    pub(crate) async fn counted_ops(self, per_worker: u64) -> anyhow::Result<Measured> {
        let counted = Stop::After(per_worker);
        match self.work.scenario {
            Scenario::RatelimitThroughput => self.ratelimit_throughput(counted).await,
            Scenario::Lock => self.lock(counted).await,
            Scenario::Session => self.session(counted).await,
            other => anyhow::bail!("`{}` has no counted form", other.name()),
        }
    }

    fn limiter(&self) -> anyhow::Result<RateLimiter> {
        self.limiter
            .clone()
            .context("the rate-limit scenario was not prepared with a limiter")
    }

    /// C callers wait on a barrier, then each makes exactly one check of the same identity.
    async fn ratelimit_exact(self) -> anyhow::Result<Measured> {
        let limiter = self.limiter()?;
        let counters = Arc::new(Counters::default());
        let barrier = Arc::new(Barrier::new(self.work.concurrency));
        let id = ("exact", self.work.key_id);
        let mut callers = JoinSet::new();
        for _ in 0..self.work.concurrency {
            let (limiter, counters, barrier) =
                (limiter.clone(), Arc::clone(&counters), Arc::clone(&barrier));
            callers.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                check(&limiter, &id, &counters).await?;
                anyhow::Ok(Span {
                    start,
                    end: Instant::now(),
                })
            });
        }
        one_shot_tally(callers, &counters).await
    }

    /// C workers loop `check` until `stop`, worker w of C checking identities w, w + C, w + 2C, … modulo
    /// [`IDENTITIES`]. The class never refuses.
    async fn ratelimit_throughput(self, stop: Stop) -> anyhow::Result<Measured> {
        let limiter = self.limiter()?;
        let counters = Arc::new(Counters::default());
        let concurrency = self.work.concurrency as u64;
        let mut workers = JoinSet::new();
        for w in 0..concurrency {
            let (limiter, counters) = (limiter.clone(), Arc::clone(&counters));
            let mut next = w % IDENTITIES;
            workers.spawn(repeat(stop, move || {
                let id = next;
                next = (next + concurrency) % IDENTITIES;
                let (limiter, counters) = (limiter.clone(), Arc::clone(&counters));
                async move { check(&limiter, &id, &counters).await.map(|()| true) }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// C workers loop [`lock_cycle`] until `stop`: worker w on a name of its own (`distinct`: names carry
    /// this process's salt, as children share `key_id`), or all of them, in every process, on one name
    /// (`one`), checking mutual exclusion.
    async fn lock(self, stop: Stop) -> anyhow::Result<Measured> {
        let locks = self
            .locks
            .clone()
            .context("the lock scenario was not prepared with a lock class")?;
        let counters = Arc::new(Counters::default());
        let exclusion = Arc::new(Exclusion::default());
        let (key_id, salt) = (self.work.key_id, self.salt);
        let mut workers = JoinSet::new();
        for w in 0..self.work.concurrency as u64 {
            let (locks, counters, exclusion) =
                (locks.clone(), Arc::clone(&counters), Arc::clone(&exclusion));
            match self.work.lock_names {
                LockNames::Distinct => workers.spawn(repeat(stop, move || {
                    let locks = locks.clone();
                    async move { lock_cycle(&locks, &("distinct", key_id, salt, w), None).await }
                })),
                LockNames::One => workers.spawn(repeat(stop, move || {
                    let (locks, counters, exclusion) =
                        (locks.clone(), Arc::clone(&counters), Arc::clone(&exclusion));
                    async move {
                        let contended = Contended {
                            exclusion: &exclusion,
                            counters: &counters,
                            worker: w,
                        };
                        lock_cycle(&locks, &("one", key_id), Some(contended)).await
                    }
                })),
            };
        }
        collect_histograms(workers, &counters).await
    }

    /// C workers loop `Sessions::get` until `stop`, worker w of C reading the pool's sessions w, w + C,
    /// w + 2C, … modulo its size. Every read must find its session.
    async fn session(self, stop: Stop) -> anyhow::Result<Measured> {
        let Some(pool) = self.pool else {
            anyhow::bail!("the session scenario was not prepared with a session pool");
        };
        let counters = Arc::new(Counters::default());
        let (n, concurrency) = (pool.tokens.len(), self.work.concurrency);
        let mut workers = JoinSet::new();
        for w in 0..concurrency {
            let (sessions, tokens) = (pool.sessions.clone(), Arc::clone(&pool.tokens));
            let mut next = w % n;
            workers.spawn(repeat(stop, move || {
                let i = next;
                next = (next + concurrency) % n;
                let (sessions, tokens) = (sessions.clone(), Arc::clone(&tokens));
                async move {
                    let session = sessions
                        .get(tokens[i].as_str())
                        .await
                        .context("Sessions::get failed")?
                        .with_context(|| format!("session {i} of the pool was not found"))?;
                    std::hint::black_box(session);
                    Ok(true)
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// C workers loop `get_or_set` on the warm key until the deadline; the loader must never run.
    async fn hit(self) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + self.work.duration;
        let mut workers = JoinSet::new();
        for w in 0..self.work.concurrency {
            let (cache, value, counters) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&counters),
            );
            let key = ("hit", self.work.key_id, w as u64 % self.work.hit_keys);
            workers.spawn(until_deadline(deadline, move || {
                let (cache, value, counters) =
                    (cache.clone(), Arc::clone(&value), Arc::clone(&counters));
                async move {
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        let v = Item::clone(&value);
                        async move { Ok::<_, Infallible>(v) }
                    };
                    cache
                        .get_or_set(&key, loader)
                        .await
                        .context("get_or_set on the hit key failed")?;
                    Ok(())
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// The baseline: C workers loop a plain GET + JSON decode of the warm value until the deadline.
    async fn get(self) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let Some(con) = self.raw else {
            anyhow::bail!("the get baseline was not prepared with a Redis connection");
        };
        let deadline = Instant::now() + self.work.duration;
        let mut workers = JoinSet::new();
        for w in 0..self.work.concurrency {
            let con = con.clone();
            let key = Arc::new(raw_key(
                &self.app,
                self.work.key_id,
                w as u64 % self.work.hit_keys,
            ));
            workers.spawn(until_deadline(deadline, move || {
                // A clone per call, as keyward's backend does: the same cost on both sides.
                let (mut con, key) = (con.clone(), Arc::clone(&key));
                async move {
                    let bytes: Vec<u8> = redis::cmd("GET")
                        .arg(key.as_str())
                        .query_async(&mut con)
                        .await
                        .context("GET on the baseline key failed")?;
                    let item: Item =
                        serde_json::from_slice(&bytes).context("baseline value did not decode")?;
                    std::hint::black_box(item);
                    Ok(())
                }
            }));
        }
        collect_histograms(workers, &counters).await
    }

    /// C workers take key indices from a shared counter until all N cold keys are loaded once.
    async fn miss(self) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let next = Arc::new(AtomicU64::new(0));
        let (keys, offset, key_id) = (self.work.keys, self.work.key_offset, self.work.key_id);
        let mut workers = JoinSet::new();
        for _ in 0..self.work.concurrency {
            let (cache, counters, next) =
                (self.cache.clone(), Arc::clone(&counters), Arc::clone(&next));
            workers.spawn(async move {
                let mut latencies = new_histogram();
                let start = Instant::now();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        break;
                    }
                    let index = offset + i;
                    let t = Instant::now();
                    let loader = || {
                        counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Infallible>(Item::sized(index)) }
                    };
                    cache
                        .get_or_set(&("miss", key_id, index), loader)
                        .await
                        .with_context(|| format!("get_or_set on miss key {index} failed"))?;
                    latencies.saturating_record(micros(t.elapsed()));
                }
                anyhow::Ok((
                    latencies,
                    Span {
                        start,
                        end: Instant::now(),
                    },
                ))
            });
        }
        collect_histograms(workers, &counters).await
    }

    /// C callers wait on a barrier, then all ask for one cold key whose loader is slow.
    async fn stampede(self) -> anyhow::Result<Measured> {
        let counters = Arc::new(Counters::default());
        let barrier = Arc::new(Barrier::new(self.work.concurrency));
        let key = ("stampede", self.work.key_id);
        let delay = self.work.loader_delay;
        let mut callers = JoinSet::new();
        for _ in 0..self.work.concurrency {
            let (cache, value, counters, barrier) = (
                self.cache.clone(),
                Arc::clone(&self.value),
                Arc::clone(&counters),
                Arc::clone(&barrier),
            );
            callers.spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let loader = || {
                    counters.loader_calls.fetch_add(1, Ordering::Relaxed);
                    let v = Item::clone(&value);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(v)
                    }
                };
                cache
                    .get_or_set(&key, loader)
                    .await
                    .context("get_or_set on the stampede key failed")?;
                anyhow::Ok(Span {
                    start,
                    end: Instant::now(),
                })
            });
        }
        one_shot_tally(callers, &counters).await
    }
}

/// `lock --names one`: what a worker needs to check and count what happens while it holds the lock.
#[derive(Clone, Copy)]
struct Contended<'a> {
    exclusion: &'a Exclusion,
    counters: &'a Counters,
    /// The worker's index in its process.
    worker: u64,
}

/// One op of `lock`: take the lock (waiting up to the class's wait), then release it; its latency runs from
/// asking to having released. With `contended` (`--names one`), the holder checks mutual exclusion in
/// between, and a `lock` that gives up is counted as a timeout and is not an op (`false`). Without it (a name
/// no other worker uses), giving up fails the run. So does a release that finds the lease gone.
async fn lock_cycle(
    locks: &Locks,
    name: &(impl IdParts + Sync + ?Sized),
    contended: Option<Contended<'_>>,
) -> anyhow::Result<bool> {
    let Some(guard) = locks.lock(name).await.context("lock failed")? else {
        let Some(c) = contended else {
            anyhow::bail!("a lock no other worker uses was still held after {LOCK_WAIT:?}");
        };
        c.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        return Ok(false);
    };
    if let Some(c) = contended {
        let entry = c.exclusion.enter(guard.fence(), c.worker);
        if entry.violation {
            c.counters.violations.fetch_add(1, Ordering::Relaxed);
        }
        if entry.same_holder {
            c.counters.reacquired.fetch_add(1, Ordering::Relaxed);
        }
        // Hold the lock across a scheduling point, so that another worker of this process that got in
        // meanwhile would be seen.
        tokio::task::yield_now().await;
        c.exclusion.leave();
    }
    if !guard.release().await.context("release failed")? {
        anyhow::bail!(
            "a release found the lease gone: the {LOCK_TTL:?} lease ran out while held (was the machine stalled?)"
        );
    }
    Ok(true)
}

/// The in-process check of `lock --names one`. A holder enters once it has acquired and leaves before it
/// releases. Entering is a violation when another worker of this process is inside, or when the holder's
/// fence is not above the last one this process saw: holders follow one another, and every fence is above
/// all those issued before it, across processes too.
///
/// It also tells when the holder is the worker that held the lock last in this process: it released and took
/// the lock again before any worker its release woke (those wait a random 0–2 ms before trying, to spread
/// out). With one process that is exact; with several, another process may have held the lock in between,
/// so it is an upper bound.
#[derive(Default)]
struct Exclusion {
    inside: AtomicUsize,
    last_fence: AtomicU64,
    /// 1 + the index of the last worker to enter; 0 before the first.
    last_holder: AtomicU64,
}

/// What [`Exclusion::enter`] found.
struct Entry {
    violation: bool,
    same_holder: bool,
}

impl Exclusion {
    /// Enter holding `fence`, as worker `worker`.
    fn enter(&self, fence: u64, worker: u64) -> Entry {
        let others = self.inside.fetch_add(1, Ordering::SeqCst);
        let last = self.last_fence.fetch_max(fence, Ordering::SeqCst);
        let previous = self.last_holder.swap(worker + 1, Ordering::SeqCst);
        Entry {
            violation: others != 0 || fence <= last,
            same_holder: previous == worker + 1,
        }
    }

    fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One check, counted as allowed or limited. A decision the store did not make (Redis failed and `on_error`
/// answered) fails the run: it would measure the fallback, not the limiter.
async fn check(
    limiter: &RateLimiter,
    id: &(impl keyward::key::IdParts + ?Sized),
    counters: &Counters,
) -> anyhow::Result<()> {
    let decision = limiter.check(id).await.context("rate-limit check failed")?;
    if decision.source() != Source::Store {
        anyhow::bail!(
            "a check was decided without the store ({:?}): Redis failed, see the warning above",
            decision.source()
        );
    }
    let counter = if decision.is_allowed() {
        &counters.allowed
    } else {
        &counters.limited
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn collect_histograms(
    mut workers: JoinSet<anyhow::Result<(Histogram<u64>, Span)>>,
    counters: &Counters,
) -> anyhow::Result<Measured> {
    let mut tally = Tally::new();
    while let Some(joined) = workers.join_next().await {
        let (latencies, span) = joined.context("a benchmark task panicked")??;
        if latencies.is_empty() {
            continue;
        }
        tally
            .latencies
            .add(&latencies)
            .context("cannot merge latency histograms")?;
        tally.span(&span);
    }
    Ok(tally.finish(counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_about_one_kib() {
        for id in [0, 7, 12_345, u64::MAX] {
            let len = serde_json::to_vec(&Item::sized(id)).unwrap().len();
            assert!((VALUE_BYTES..VALUE_BYTES + 40).contains(&len), "{len}");
        }
    }

    fn work(scenario: Scenario, algorithm: Algorithm, limit: u64) -> Workload {
        Workload {
            scenario,
            concurrency: 4,
            duration: Duration::from_secs(1),
            keys: 1,
            key_offset: 0,
            hit_keys: 1,
            loader_delay: Duration::ZERO,
            key_id: 7,
            algorithm,
            limit,
            lock_names: LockNames::One,
            extend: Extend::Default,
        }
    }

    #[test]
    fn the_bench_policy_is_valid() {
        let policy = policy("kwbench42", &work(Scenario::Hit, Algorithm::Gcra, 100)).unwrap();
        assert_eq!(policy.app(), "kwbench42");
        assert!(policy.class(CLASS).is_some());
        assert!(policy.class(RATE_CLASS).is_none());
    }

    #[test]
    fn every_algorithm_has_valid_rate_limit_classes() {
        for algorithm in Algorithm::ALL {
            for scenario in [Scenario::RatelimitExact, Scenario::RatelimitThroughput] {
                for limit in [1, 100, 100_000] {
                    let w = work(scenario, algorithm, limit);
                    let policy = policy("kwbench42", &w)
                        .unwrap_or_else(|e| panic!("{scenario:?} {algorithm}: {e}"));
                    let class = policy.class(RATE_CLASS).unwrap().as_rate_limit().unwrap();
                    assert_eq!(class.algorithm_value(), algorithm);
                    assert_eq!(class.on_error_value(), OnError::Deny);
                    if scenario == Scenario::RatelimitExact {
                        assert_eq!(class.limit_value(), limit);
                        assert_eq!(class.capacity(), limit);
                    }
                }
            }
        }
    }

    #[test]
    fn the_throughput_class_never_refuses_ten_thousand_identities() {
        for algorithm in Algorithm::ALL {
            let c = rate_class(&work(Scenario::RatelimitThroughput, algorithm, 100)).unwrap();
            // Allowed per identity per second, and what 10,000 identities would need at 10M checks/s.
            let per_second = c.limit_value() as f64 / c.window_value().as_secs_f64();
            assert!(
                per_second >= 10_000_000.0 / IDENTITIES as f64,
                "{algorithm}: {per_second}"
            );
        }
    }

    #[test]
    fn lock_and_session_scenarios_have_valid_classes() {
        let w = work(Scenario::Lock, Algorithm::Gcra, 100);
        let locking = policy("kwbench42", &w).unwrap();
        let lock = locking.class(LOCK_CLASS).unwrap().as_lock().unwrap();
        assert_eq!(lock.ttl_value(), LOCK_TTL);
        assert_eq!(lock.wait_value(), LOCK_WAIT);
        assert!(locking.class(SESSION_CLASS).is_none());
        for (extend, after) in [
            (Extend::Always, Duration::ZERO),
            (Extend::Default, SESSION_IDLE / 10),
        ] {
            let w = Workload {
                extend,
                ..work(Scenario::Session, Algorithm::Gcra, 100)
            };
            let sessions = policy("kwbench42", &w).unwrap();
            let class = sessions.class(SESSION_CLASS).unwrap().as_session().unwrap();
            assert_eq!(class.extend_after_value(), after);
            assert!(sessions.class(LOCK_CLASS).is_none());
        }
        assert!(SessionSecrets::new(SESSION_SECRET).is_ok());
    }

    #[test]
    fn exclusion_sees_a_second_holder_and_a_stale_fence() {
        let x = Exclusion::default();
        let enter = |fence, worker| {
            let e = x.enter(fence, worker);
            (e.violation, e.same_holder)
        };
        assert_eq!(enter(10, 0), (false, false));
        assert_eq!(enter(11, 1), (true, false), "a second holder inside");
        x.leave();
        x.leave();
        assert_eq!(enter(12, 1), (false, true), "worker 1 again");
        x.leave();
        assert_eq!(
            enter(12, 2),
            (true, false),
            "a fence not above the last one"
        );
        x.leave();
        assert_eq!(enter(13, 0), (false, false));
        x.leave();
    }

    #[test]
    fn an_out_of_range_limit_is_a_policy_error() {
        let w = work(Scenario::RatelimitExact, Algorithm::SlidingLog, 200_000);
        let err = policy("kwbench42", &w).unwrap_err();
        assert_eq!(err.field(), Some("limit"), "{err}");
        let w = work(Scenario::RatelimitExact, Algorithm::Gcra, 0);
        assert!(policy("kwbench42", &w).is_err());
    }
}
