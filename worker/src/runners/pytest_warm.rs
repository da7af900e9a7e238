//! Warm pytest: one long-lived pytest per busy slot that collected the suite once and runs
//! shard after shard (`--shardgate-serve` in `shardgate_pytest.py`), so a shard pays no
//! interpreter start, import or collection, as pytest-xdist's workers do not. It is a fast
//! path only: whatever it does not finish (a test it did not collect, a retry, a pytest that
//! died or would not start) runs the ordinary way, a fresh pytest for the shard's remaining
//! tests, so the one-result-per-test guarantees are those of the ordinary path.
//!
//! Used when the profile keeps pytest's default run command (a custom one may not start
//! pytest at all) and `SHARDGATE_PYTEST_WARM` is not `0` in the profile's or the worker's
//! environment. A warm pytest serves one run (so a change to the code between two runs of the
//! same revision, as on a laptop, is never missed); it is stopped when a shard of another run
//! comes, when it has been idle for [`IDLE`], when a test in it runs past the test timeout,
//! and when the worker ends (it also exits by itself once its worker is gone).

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::batch::{CommandRunner, Shard, tail};
use super::pytest::{EVENTS, Event, Running, plugin_environment, read_new_events};

/// How often a warm pytest's events are read.
const POLL: Duration = Duration::from_millis(3);
/// A warm pytest idle this long is stopped when the pool is next used.
const IDLE: Duration = Duration::from_secs(60);
/// The file shards are appended to, in the warm pytest's scratch directory.
const COMMANDS: &str = "commands.jsonl";
/// Where a warm pytest's own output goes.
const LOG: &str = "serve.log";

/// The warm pytests of one runner that are not running a shard now.
#[derive(Debug, Default)]
pub struct WarmPool {
    idle: Mutex<Vec<Warm>>,
    /// The run a warm pytest would not start for: its shards run the ordinary way.
    failed: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Warm {
    child: tokio::process::Child,
    scratch: tempfile::TempDir,
    /// The revision and run it serves.
    serves: (String, String),
    /// Shards sent so far, the number of the next one.
    shards: u64,
    /// How far the events file has been read.
    offset: usize,
    idle_since: Instant,
}

impl WarmPool {
    /// An idle warm pytest for `revision` and `run`; stops the ones of other runs and the
    /// ones idle too long.
    fn take(&self, revision: &str, run: &str) -> Option<Warm> {
        let mut idle = self.idle.lock().expect("warm pool lock");
        idle.retain(|w| w.serves.0 == revision && w.serves.1 == run && w.idle_since.elapsed() < IDLE);
        idle.pop()
    }

    fn put(&self, mut w: Warm) {
        w.idle_since = Instant::now();
        self.idle.lock().expect("warm pool lock").push(w);
    }
}

/// Whether `runner` runs its shards in warm pytests.
pub fn enabled(runner: &CommandRunner) -> bool {
    let off = |v: Option<String>| v.is_some_and(|v| v.trim() == "0");
    runner.config().run == super::pytest::run()
        && !off(runner.config().env.get("SHARDGATE_PYTEST_WARM").cloned())
        && !off(std::env::var("SHARDGATE_PYTEST_WARM").ok())
}

/// What a warm pytest made of a shard: the events of the tests it ran, and the test that ran
/// past the test timeout, if one did (that pytest was stopped).
pub struct Ran {
    pub events: Vec<Event>,
    pub hung: Option<String>,
    /// The end of the warm pytest's own output, as evidence for a test it left unfinished.
    pub output: String,
    /// How the warm pytest ended, when it died during the shard by itself.
    pub died: Option<String>,
}

/// Runs `shard` in a warm pytest, started if none is idle. `None` when none could be started
/// or the shard could not be sent: the caller runs the tests the ordinary way, as it does the
/// ones a warm pytest leaves without a result.
pub async fn run(runner: &CommandRunner, shard: &Shard<'_>, deadline: Instant) -> Option<Ran> {
    let pool = &runner.warm;
    let mut w = match pool.take(shard.revision, shard.run) {
        Some(w) => w,
        None => {
            start(runner, shard.revision, shard.run, shard.cancel, deadline)
                .await?
                .0
        }
    };
    let n = w.shards;
    w.shards += 1;
    let line = serde_json::json!({ "shard": n, "ids": shard.tests }).to_string() + "\n";
    let sent = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(w.scratch.path().join(COMMANDS))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = sent {
        warn!(error = %e, "could not send a shard to a warm pytest");
        return None;
    }
    let events_path = w.scratch.path().join(EVENTS);
    let mut events = Vec::new();
    let mut running = Running::default();
    loop {
        let mut done = false;
        for e in read_new_events(&events_path, &mut w.offset) {
            running.note(&e);
            done |= e.e == "done";
            events.push(e);
        }
        if done {
            pool.put(w);
            return Some(Ran {
                events,
                hung: None,
                output: String::new(),
                died: None,
            });
        }
        let hung = running.past(shard.test_timeout);
        if hung.is_some() || shard.cancel.is_cancelled() || Instant::now() >= deadline {
            let _ = w.child.kill().await;
            let output = log_tail(&w);
            return Some(Ran {
                events,
                hung,
                output,
                died: None,
            });
        }
        if let Ok(Some(status)) = w.child.try_wait() {
            // It died in the middle of the shard (a test that ends the interpreter): what it
            // finished stands, the rest runs the ordinary way.
            warn!(%status, "a warm pytest ended during a shard");
            let output = log_tail(&w);
            return Some(Ran {
                events,
                hung: None,
                output,
                died: Some(describe(status)),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Lists the suite by starting a warm pytest, which then waits in the pool for the run's first
/// shard (so the suite is collected once for both). `None` when it would not start.
pub async fn discover(
    runner: &CommandRunner,
    revision: &str,
    run: &str,
    limit: Duration,
) -> Option<Vec<String>> {
    let cancel = CancellationToken::new();
    let (w, ids) = start(runner, revision, run, &cancel, Instant::now() + limit).await?;
    runner.warm.put(w);
    Some(ids)
}

/// Starts a warm pytest for `revision` and `run`, waits until it has collected the suite, and
/// returns it with what it collected. A run a warm pytest would not start for is remembered:
/// its later shards run the ordinary way without trying again.
async fn start(
    runner: &CommandRunner,
    revision: &str,
    run: &str,
    cancel: &CancellationToken,
    deadline: Instant,
) -> Option<(Warm, Vec<String>)> {
    let failed = &runner.warm.failed;
    if failed.lock().expect("warm pool lock").as_deref() == Some(run) {
        return None;
    }
    let started = launch(runner, revision, run, cancel, deadline).await;
    if started.is_none() && !cancel.is_cancelled() {
        *failed.lock().expect("warm pool lock") = Some(run.to_owned());
    }
    started
}

async fn launch(
    runner: &CommandRunner,
    revision: &str,
    run: &str,
    cancel: &CancellationToken,
    deadline: Instant,
) -> Option<(Warm, Vec<String>)> {
    let scratch = tempfile::tempdir().ok()?;
    let argv: Vec<String> = [
        "python3",
        "-m",
        "pytest",
        "-p",
        "no:xdist",
        "-q",
        "--shardgate-serve",
    ]
    .map(String::from)
    .to_vec();
    let mut cmd = runner.command(&argv, &[], "", revision);
    let log = std::fs::File::create(scratch.path().join(LOG)).ok()?;
    let commands: PathBuf = scratch.path().join(COMMANDS);
    std::fs::File::create(&commands).ok()?;
    let env = plugin_environment(scratch.path(), &runner.config().env);
    if env.is_empty() {
        return None;
    }
    cmd.envs(env)
        .env("SHARDGATE_PYTEST_COMMANDS", &commands)
        .stdin(Stdio::null())
        .stdout(log.try_clone().ok()?)
        .stderr(log)
        .kill_on_drop(true);
    let started = Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "could not start a warm pytest");
            return None;
        }
    };
    let mut w = Warm {
        child,
        scratch,
        serves: (revision.to_owned(), run.to_owned()),
        shards: 0,
        offset: 0,
        idle_since: Instant::now(),
    };
    let events_path = w.scratch.path().join(EVENTS);
    let mut collected = Vec::new();
    loop {
        for e in read_new_events(&events_path, &mut w.offset) {
            match e.e.as_str() {
                // A module that failed to collect is a test of its own (see `pytest::listed`).
                "collected" => collected.push(e.id),
                "collecterror" if !collected.contains(&e.id) => collected.push(e.id),
                "nowarm" => {
                    info!(runner = %runner.config().name, reason = %e.message, "no warm pytest for this suite; each shard runs in a pytest of its own");
                    return None;
                }
                "ready" => {
                    info!(
                        runner = %runner.config().name,
                        tests = e.count,
                        ms = started.elapsed().as_millis() as u64,
                        "warm pytest ready"
                    );
                    return Some((w, collected));
                }
                _ => {}
            }
        }
        if let Ok(Some(status)) = w.child.try_wait() {
            // Typically the project's addopts need a plugin this mode turns off (xdist's -n).
            debug!(%status, output = %log_tail(&w), "a warm pytest did not start; shards run the ordinary way");
            return None;
        }
        if cancel.is_cancelled() || Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// An exit status as the rest of the worker says it ("exit status 1", "killed by signal 9").
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn log_tail(w: &Warm) -> String {
    tail(
        &std::fs::read_to_string(w.scratch.path().join(LOG)).unwrap_or_default(),
        16 * 1024,
    )
}
