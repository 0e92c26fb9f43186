//! `--processes P`: one workload spread over P child processes sharing one namespace and key.
//!
//! The fleet knows nothing of any scenario: a child prepares and runs its share through the scenario
//! abstraction ([`scenarios::prepare`], [`scenarios::Prepared::run`]) and reports a [`Measured`], which the
//! parent merges ([`Measured::merge`]). Scenarios never depend on the fleet.
//!
//! The parent re-runs its own executable as each child (`keyward bench <scenario> --child --app … --key-id …`,
//! with the URL in `REDIS_URL` so a password never shows in `ps`). The handshake, one line each way:
//!
//! 1. each child connects and warms up, prints `READY` and blocks reading stdin;
//! 2. once every child is ready, the parent writes `GO` to all of them (the measured phase starts);
//! 3. each child runs and prints one JSON line ([`ChildReport`]) with its counts (loader calls, rate-limit
//!    checks allowed and limited, lock violations, timeouts and re-acquisitions, the L1 scenarios' counts)
//!    and its latency histogram
//!    (HdrHistogram V2 serialization, base64), then exits; the parent adds the counts up and merges the
//!    histograms.
//!
//! A scenario that [runs until stopped](crate::bench::scenarios::Scenario::runs_until_stopped)
//! (`stream_e2e`: the children consume while the parent publishes) adds one line: the parent writes `STOP`
//! when its own part is done ([`Fleet::go_with`]), and each child ends its run then, before step 3. A child
//! whose stdin closes (the parent died) stops too.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::bench::measure::{L1Counts, Measured, StaleCounts, StreamCounts};
use crate::bench::scenarios::{self, Workload};

/// What a child prints when connected and warmed up.
const READY: &str = "READY";
/// What the parent writes to start the measured phase.
const GO: &str = "GO";
/// What the parent writes to end a child that runs until stopped (`stream_e2e`'s workers).
const STOP: &str = "STOP";
/// How long a child may take to connect and warm up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take beyond the scenario's own duration.
const RUN_GRACE: Duration = Duration::from_secs(120);

/// One child's result, one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChildReport {
    ops: u64,
    loader_calls: u64,
    allowed: u64,
    limited: u64,
    violations: u64,
    timeouts: u64,
    reacquired: u64,
    seconds: f64,
    /// The L1 scenarios' counts.
    #[serde(default)]
    l1: L1Counts,
    /// The stream scenarios' counts.
    #[serde(default)]
    stream: StreamCounts,
    /// Latencies in µs: HdrHistogram V2 serialization, base64.
    histogram: String,
}

impl ChildReport {
    fn new(m: &Measured) -> anyhow::Result<Self> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&m.latencies, &mut bytes)
            .context("cannot serialize the latency histogram")?;
        Ok(Self {
            ops: m.latencies.len(),
            loader_calls: m.loader_calls,
            allowed: m.allowed,
            limited: m.limited,
            violations: m.violations,
            timeouts: m.timeouts,
            reacquired: m.reacquired,
            seconds: m.seconds,
            l1: m.l1,
            stream: m.stream,
            histogram: BASE64.encode(bytes),
        })
    }

    fn into_measured(self) -> anyhow::Result<Measured> {
        let bytes = BASE64
            .decode(&self.histogram)
            .context("the histogram is not valid base64")?;
        let latencies: hdrhistogram::Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .context("cannot deserialize the latency histogram")?;
        if latencies.len() != self.ops {
            bail!(
                "reported {} ops but its histogram holds {}",
                self.ops,
                latencies.len()
            );
        }
        Ok(Measured {
            loader_calls: self.loader_calls,
            allowed: self.allowed,
            limited: self.limited,
            violations: self.violations,
            timeouts: self.timeouts,
            reacquired: self.reacquired,
            seconds: self.seconds,
            latencies,
            l1: self.l1,
            // `stale_serve` runs in one process only (see `bench::run`).
            stale: StaleCounts::default(),
            stream: self.stream,
        })
    }
}

/// The child side: connect, READY, wait for GO, run, report.
pub(crate) async fn child(url: &str, app: &str, work: Workload) -> anyhow::Result<()> {
    let until_stopped = work.scenario.runs_until_stopped();
    let prepared = scenarios::prepare(url, app, work).await?;
    println_flush(READY)?;
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    stdin
        .read_line(&mut line)
        .await
        .context("cannot read the start signal from the parent")?;
    if line.trim() != GO {
        bail!("expected `{GO}` from the parent process, got {line:?}");
    }
    let measured = if until_stopped {
        // STOP, or the parent closing the pipe (it failed), ends the run.
        let stop = async move {
            let mut line = String::new();
            let _ = stdin.read_line(&mut line).await;
        };
        prepared.consume_until(stop).await?
    } else {
        prepared.run().await?
    };
    let report = serde_json::to_string(&ChildReport::new(&measured)?)?;
    println_flush(&report)
}

fn println_flush(line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to the parent process")
}

struct Member {
    index: usize,
    /// The command line it was started with (to start it again after a kill).
    args: Vec<String>,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Member {
    fn describe(&self, of: usize) -> String {
        match self.child.id() {
            Some(pid) => format!("child {} of {of} (pid {pid})", self.index + 1),
            None => format!("child {} of {of}", self.index + 1),
        }
    }

    /// The child's next stdout line; an error naming the child and its exit status if it ends first.
    async fn line(
        &mut self,
        of: usize,
        waiting_for: &str,
        within: Duration,
    ) -> anyhow::Result<String> {
        let who = self.describe(of);
        let read = tokio::time::timeout(within, self.stdout.next_line())
            .await
            .with_context(|| format!("{who} sent no {waiting_for} within {within:?}"))?
            .with_context(|| format!("cannot read from {who}"))?;
        match read {
            Some(line) => Ok(line),
            None => {
                let status = self
                    .child
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                bail!("{who} exited before sending {waiting_for} ({status}); see its error above")
            }
        }
    }
}

/// Children that are connected, warmed up and waiting for GO.
pub(crate) struct Fleet {
    members: Vec<Member>,
    run_limit: Duration,
    /// To start a child again: this executable and the URL.
    exe: std::path::PathBuf,
    url: String,
}

/// Start `exe` as child `index` with `args`, its stdin and stdout piped to this process.
fn spawn(
    exe: &std::path::Path,
    url: &str,
    index: usize,
    args: Vec<String>,
    of: usize,
) -> anyhow::Result<Member> {
    let mut child = Command::new(exe)
        .args(&args)
        .env("REDIS_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start child process {} of {of}", index + 1))?;
    let stdin = child.stdin.take().context("child stdin is not piped")?;
    let stdout = child.stdout.take().context("child stdout is not piped")?;
    Ok(Member {
        index,
        args,
        child,
        stdin,
        stdout: BufReader::new(stdout).lines(),
    })
}

impl Fleet {
    /// Start one child per workload and wait until each has printed READY.
    pub(crate) async fn start(
        url: &str,
        app: &str,
        works: Vec<Workload>,
        run_limit: Duration,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()
            .context("cannot find the keyward executable to start child processes")?;
        let of = works.len();
        let mut members = Vec::with_capacity(of);
        for (index, work) in works.into_iter().enumerate() {
            members.push(spawn(&exe, url, index, child_args(app, &work), of)?);
        }
        for m in &mut members {
            let line = m.line(of, READY, READY_TIMEOUT).await?;
            if line.trim() != READY {
                bail!("{} sent {line:?} instead of {READY}", m.describe(of));
            }
        }
        Ok(Self {
            members,
            run_limit: run_limit + RUN_GRACE,
            exe,
            url: url.to_owned(),
        })
    }

    /// Send GO to every child, then collect and merge their reports. `seconds` is the slowest child's.
    pub(crate) async fn go(mut self) -> anyhow::Result<Measured> {
        self.send(GO).await?;
        self.collect().await
    }

    /// Send GO to every child, run `lead` in this process meanwhile, then send STOP to every child and
    /// collect their reports; `lead`'s figures are merged with theirs. For children that run until stopped.
    ///
    /// With `chaos` (`stream_chaos`), until `published` fires (or `lead` ends) a child picked at random is
    /// SIGKILLed every `kill_every` and started again at once (READY, then GO); the kills are counted in
    /// the result's `stream.kills`. A killed child's figures are lost with it.
    pub(crate) async fn go_with(
        mut self,
        lead: impl std::future::Future<Output = anyhow::Result<Measured>>,
        chaos: Option<(Duration, tokio::sync::oneshot::Receiver<()>)>,
    ) -> anyhow::Result<Measured> {
        self.send(GO).await?;
        let mut lead = std::pin::pin!(lead);
        let mut led = None;
        let mut kills = 0u64;
        if let Some((every, mut published)) = chaos {
            let mut next = tokio::time::Instant::now() + every;
            loop {
                tokio::select! {
                    r = &mut lead => {
                        led = Some(r);
                        break;
                    }
                    _ = &mut published => break,
                    () = tokio::time::sleep_until(next) => {
                        let i = rand::random_range(0..self.members.len());
                        self.restart(i).await?;
                        kills += 1;
                        next = tokio::time::Instant::now() + every;
                    }
                }
            }
        }
        let led = match led {
            Some(r) => r,
            None => lead.await,
        };
        self.send(STOP).await?;
        let led = led?;
        let mut total = self.collect().await?;
        total.merge(&led)?;
        total.stream.kills += kills;
        Ok(total)
    }

    /// SIGKILL child `i`, start it again with the same command line, and send it GO once it is READY.
    async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let of = self.members.len();
        let m = &mut self.members[i];
        let who = m.describe(of);
        m.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {who}"))?;
        let mut fresh = spawn(&self.exe, &self.url, m.index, m.args.clone(), of)?;
        let line = fresh.line(of, READY, READY_TIMEOUT).await?;
        if line.trim() != READY {
            bail!("{} sent {line:?} instead of {READY}", fresh.describe(of));
        }
        fresh
            .stdin
            .write_all(format!("{GO}\n").as_bytes())
            .await
            .and(fresh.stdin.flush().await)
            .with_context(|| format!("cannot send {GO} to {}", fresh.describe(of)))?;
        self.members[i] = fresh;
        Ok(())
    }

    async fn send(&mut self, word: &str) -> anyhow::Result<()> {
        let of = self.members.len();
        for m in &mut self.members {
            let who = m.describe(of);
            m.stdin
                .write_all(format!("{word}\n").as_bytes())
                .await
                .and(m.stdin.flush().await)
                .with_context(|| format!("cannot send {word} to {who}"))?;
        }
        Ok(())
    }

    /// Read every child's report and merge them.
    async fn collect(mut self) -> anyhow::Result<Measured> {
        let of = self.members.len();
        let mut total = Measured::empty();
        for m in &mut self.members {
            let who = m.describe(of);
            let line = m.line(of, "its report", self.run_limit).await?;
            let report: ChildReport = serde_json::from_str(&line)
                .with_context(|| format!("{who} sent an unreadable report: {line:?}"))?;
            let measured = report
                .into_measured()
                .with_context(|| format!("bad report from {who}"))?;
            total.merge(&measured)?;
            let status = m
                .child
                .wait()
                .await
                .with_context(|| format!("cannot wait for {who}"))?;
            if !status.success() {
                bail!("{who} failed after reporting ({status})");
            }
        }
        Ok(total)
    }
}

/// The hidden command line that makes a child run `work` in namespace `app`.
fn child_args(app: &str, work: &Workload) -> Vec<String> {
    let mut args = vec![
        "bench".to_owned(),
        work.scenario.name().to_owned(),
        "--concurrency".to_owned(),
        work.concurrency.to_string(),
        "--duration".to_owned(),
        work.duration.as_secs_f64().to_string(),
        "--keys".to_owned(),
        work.keys.to_string(),
        "--hit-keys".to_owned(),
        work.hit_keys.to_string(),
        "--loader-ms".to_owned(),
        work.loader_delay.as_millis().to_string(),
        "--algorithm".to_owned(),
        work.algorithm.name().to_owned(),
        "--limit".to_owned(),
        work.limit.to_string(),
        "--names".to_owned(),
        work.lock_names.name().to_owned(),
        "--extend".to_owned(),
        work.extend.name().to_owned(),
        "--invalidate-every".to_owned(),
        work.invalidate_every.as_millis().to_string(),
        "--messages".to_owned(),
        work.messages.to_string(),
        "--batch".to_owned(),
        work.batch.to_string(),
        "--child".to_owned(),
        "--app".to_owned(),
        app.to_owned(),
        "--key-id".to_owned(),
        work.key_id.to_string(),
        "--key-offset".to_owned(),
        work.key_offset.to_string(),
        "--process-index".to_owned(),
        work.process.to_string(),
    ];
    if work.scenario == crate::bench::scenarios::Scenario::StreamChaos {
        args.extend([
            "--kill-every".to_owned(),
            work.kill_every.as_millis().to_string(),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::new_histogram;

    #[test]
    fn reports_round_trip_their_histogram() {
        let mut latencies = new_histogram();
        for us in [5, 50, 500, 5_000, 50_000] {
            latencies.saturating_record(us);
        }
        let measured = Measured {
            loader_calls: 1,
            allowed: 3,
            limited: 2,
            violations: 1,
            timeouts: 4,
            reacquired: 5,
            seconds: 0.25,
            latencies,
            l1: L1Counts {
                l1_hits: 6,
                max_stale_us: 7,
                ..L1Counts::default()
            },
            stale: StaleCounts::default(),
            stream: StreamCounts {
                handled: 8,
                ..StreamCounts::default()
            },
        };
        let line = serde_json::to_string(&ChildReport::new(&measured).unwrap()).unwrap();
        let back: ChildReport = serde_json::from_str(&line).unwrap();
        let back = back.into_measured().unwrap();
        assert_eq!(back.latencies, measured.latencies);
        assert_eq!(back.loader_calls, 1);
        assert_eq!((back.allowed, back.limited), (3, 2));
        assert_eq!((back.violations, back.timeouts, back.reacquired), (1, 4, 5));
        assert_eq!(back.l1, measured.l1);
        assert_eq!(back.stream, measured.stream);
    }
}
