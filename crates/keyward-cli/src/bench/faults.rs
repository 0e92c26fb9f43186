//! What the parent does to the servers while a `staleness` fleet runs: `--kill-backplane-every` and
//! `--pause-every`.
//!
//! The one decision: **the faults are Redis commands, sent to every server of the run** (every primary of a
//! Cluster), so that they work against any server the URL names, including one the bench did not start:
//! - `CLIENT KILL TYPE pubsub` disconnects every subscriber, as a proxy restart or a network blip does. The
//!   clients see their subscription drop and reconnect; whatever was published meanwhile is lost to them.
//! - `CLIENT PAUSE <pause_ms> WRITE` holds every write command, every script and every `PUBLISH` for that long
//!   (the server resumes on its own; the bench needs no control of the server process). For keyward that is
//!   the silence of a stopped server: its heartbeats and invalidations are not published, and its reads from
//!   Redis (`SET … NX GET`, which takes a fill lease) wait. Plain reads still answer, and that is why not
//!   `ALL` (or `SIGSTOP`): the readers' staleness checks are plain reads, and under `ALL` every reader would
//!   sit in its check for the whole pause instead of reading through L1 while keyward can no longer vouch for
//!   it — the window the bound is about.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use redis::aio::MultiplexedConnection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use crate::bench::servers::Servers;
use crate::error::UsageError;

/// How long connecting and each fault command may take (beyond a pause already under way).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Which faults to inject, and how often.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Plan {
    /// Period of `CLIENT KILL TYPE pubsub`.
    pub(crate) kill_every: Option<Duration>,
    /// Period of `CLIENT PAUSE`, and how long each pause lasts.
    pub(crate) pause_every: Option<Duration>,
    pub(crate) pause_for: Duration,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.kill_every.is_none() && self.pause_every.is_none()
    }
}

/// What was injected during the run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Injected {
    /// Rounds of `CLIENT KILL TYPE pubsub` (each on every server), and the clients they disconnected.
    pub(crate) kills: u64,
    pub(crate) killed: u64,
    /// Rounds of `CLIENT PAUSE … WRITE` (each on every server).
    pub(crate) pauses: u64,
}

/// A running injector: started before the measured phase, finished after it.
pub(crate) struct Injector {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<Injected>>,
}

impl Injector {
    /// Connect to every server of `servers` and start injecting the faults of `plan`, the first of each
    /// one period from now. `None` when the plan is empty.
    ///
    /// # Errors
    /// When a server cannot be connected to.
    pub(crate) async fn start(servers: &Servers, plan: Plan) -> anyhow::Result<Option<Self>> {
        if plan.is_empty() {
            return Ok(None);
        }
        // redis-rs enables rustls without a crypto provider; for `rediss://` use ring's unless one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut conns = Vec::new();
        for (addr, url) in servers.urls() {
            let client = redis::Client::open(url)
                .map_err(|e| UsageError(format!("invalid Redis URL (--url or REDIS_URL): {e}")))?;
            let conn = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| {
                    anyhow!("the fault connection to {addr} did not answer within {TIMEOUT:?}")
                })?
                .with_context(|| format!("cannot open the fault connection to Redis {addr}"))?;
            conns.push(conn);
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(inject(conns, plan, stopped));
        Ok(Some(Self { stop, task }))
    }

    /// Stop injecting (a pause under way ends on its own) and say what was injected.
    ///
    /// # Errors
    /// When a fault command failed during the run.
    pub(crate) async fn finish(self) -> anyhow::Result<Injected> {
        let _ = self.stop.send(());
        self.task.await.context("the fault injector panicked")?
    }
}

async fn inject(
    mut conns: Vec<MultiplexedConnection>,
    plan: Plan,
    mut stopped: oneshot::Receiver<()>,
) -> anyhow::Result<Injected> {
    let mut done = Injected::default();
    // A period that is not planned ticks never (in practice): a day, re-armed each time it would fire.
    let never = Duration::from_secs(86_400);
    let start = Instant::now();
    let ticker = |every: Option<Duration>| {
        let period = every.unwrap_or(never);
        let mut t = interval_at(start + period, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    };
    let mut kill = ticker(plan.kill_every);
    let mut pause = ticker(plan.pause_every);
    let pause_ms = u64::try_from(plan.pause_for.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            _ = &mut stopped => return Ok(done),
            _ = kill.tick(), if plan.kill_every.is_some() => {
                for conn in &mut conns {
                    let killed: u64 = command(
                        conn,
                        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
                        TIMEOUT + plan.pause_for,
                    )
                    .await
                    .context("CLIENT KILL TYPE pubsub failed")?;
                    done.killed += killed;
                }
                done.kills += 1;
            }
            _ = pause.tick(), if plan.pause_every.is_some() => {
                for conn in &mut conns {
                    let () = command(
                        conn,
                        redis::cmd("CLIENT").arg("PAUSE").arg(pause_ms).arg("WRITE"),
                        TIMEOUT + plan.pause_for,
                    )
                    .await
                    .context("CLIENT PAUSE failed")?;
                }
                done.pauses += 1;
            }
        }
    }
}

async fn command<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    within: Duration,
) -> anyhow::Result<T> {
    tokio::time::timeout(within, cmd.query_async(conn))
        .await
        .map_err(|_| anyhow!("no answer within {within:?}"))?
        .map_err(anyhow::Error::new)
}
