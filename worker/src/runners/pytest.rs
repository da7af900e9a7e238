//! pytest: node ids as test ids. shardgate's own plugin (`shardgate_pytest.py`, loaded through
//! `PYTEST_ADDOPTS` so a profile's own commands load it too) reports every collected item and
//! every test's start, phases and end by its exact node id, as it happens; so ids, outcomes and
//! captured output do not depend on the project's addopts, junit family or class layout, and a
//! test that runs past the run's test timeout is stopped and counted `timed_out` while the rest
//! of the shard goes on in a fresh pytest. Where the plugin did not load (a run command that does
//! not start pytest), the JUnit file (`junit_family=xunit1`) and the `-q` listing are read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use shardgate_common::Outcome;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::batch::{CommandRunner, IdFormat, Shard, deliver, tail};
use super::pytest_warm as warm;
use super::{BoxFuture, Commands, RunnerError, TestRun, Tool, ToolSpec};
use crate::junit::Case;
use crate::process::{self, Ending};

/// The plugin, written into each command's scratch directory.
const PLUGIN: &str = include_str!("shardgate_pytest.py");
/// The plugin's module name.
const PLUGIN_MODULE: &str = "shardgate_pytest";
/// The events file in a scratch directory.
pub(super) const EVENTS: &str = "events.jsonl";
/// How often a running shard's events are read to time its tests.
const POLL: Duration = Duration::from_millis(100);
/// The most output kept for one test.
const MAX_TEST_OUTPUT: usize = 64 * 1024;

#[derive(Debug)]
pub struct Pytest;

impl Tool for Pytest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.id.is_some() {
            return Err("pytest maps JUnit test cases to node ids itself; remove id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: spec.run.cloned().unwrap_or_else(run),
            id: IdFormat::PytestNodeId,
        })
    }

    fn environment(&self, scratch: &Path, base: &BTreeMap<String, String>) -> Vec<(String, String)> {
        plugin_environment(scratch, base)
    }

    /// The plugin's `collected` events; else `pytest --collect-only -q` output (node ids, then a
    /// blank line and a summary).
    fn parse_listing_in(&self, scratch: &Path, stdout: &str) -> Vec<String> {
        let events = read_events(&scratch.join(EVENTS));
        let collected = listed(&events);
        if !collected.is_empty() {
            return collected;
        }
        stdout
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.contains("::"))
            .map(|l| l.trim().to_owned())
            .collect()
    }

    /// pytest's listing fails (exit status 2) when a module fails to collect; those modules
    /// are tests of their own in the listing (each fails with its error when run), so the
    /// listing stands when the plugin reported every such error.
    fn listing_failure_is_results(&self, scratch: &Path) -> bool {
        read_events(&scratch.join(EVENTS))
            .iter()
            .any(|e| e.e == "collecterror")
    }

    /// With its default commands, from a warm pytest that then serves the run's shards.
    fn list_for_run<'a>(
        &'a self,
        runner: &'a CommandRunner,
        revision: &'a str,
        run: &'a str,
        limit: Duration,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async move {
            if runner.config().list != Some(list()) || !warm::enabled(runner) {
                return None;
            }
            warm::discover(runner, revision, run, limit).await
        })
    }

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(run_shard(runner, shard))
    }
}

/// pytest's default listing command.
fn list() -> Vec<String> {
    ["python3", "-m", "pytest", "--collect-only", "-q"]
        .map(String::from)
        .to_vec()
}

/// pytest's default run command: JUnit with the file recorded, read when the plugin is absent.
pub(super) fn run() -> Vec<String> {
    [
        "python3",
        "-m",
        "pytest",
        "-o",
        "junit_family=xunit1",
        "--junitxml={junit}",
        // A module that fails to collect is a failed result of its own, and the shard's other
        // tests still run.
        "--continue-on-collection-errors",
        "--",
        "{tests}",
    ]
    .map(String::from)
    .to_vec()
}

/// Writes the plugin into `scratch` and returns the environment that loads it: the directory
/// first on `PYTHONPATH`, `-p shardgate_pytest` and a cache directory of the command's own
/// (so the project's `--ff` or `--lf` work and its tree is left alone) added to
/// `PYTEST_ADDOPTS`, and where the events go.
pub(super) fn plugin_environment(scratch: &Path, base: &BTreeMap<String, String>) -> Vec<(String, String)> {
    if std::fs::write(scratch.join(format!("{PLUGIN_MODULE}.py")), PLUGIN).is_err() {
        // Without the plugin the JUnit file is read, as for any run command.
        return Vec::new();
    }
    let inherited = |k: &str| base.get(k).cloned().or_else(|| std::env::var(k).ok());
    let dir = scratch.display().to_string();
    let pythonpath = match inherited("PYTHONPATH") {
        Some(p) if !p.is_empty() => format!("{dir}:{p}"),
        _ => dir,
    };
    let ours = format!(
        "-p {PLUGIN_MODULE} -o cache_dir={}",
        shell_quote(&scratch.join("cache").display().to_string())
    );
    let addopts = match inherited("PYTEST_ADDOPTS") {
        Some(a) if !a.trim().is_empty() => format!("{a} {ours}"),
        _ => ours,
    };
    vec![
        ("PYTHONPATH".into(), pythonpath),
        ("PYTEST_ADDOPTS".into(), addopts),
        (
            "SHARDGATE_PYTEST_EVENTS".into(),
            scratch.join(EVENTS).display().to_string(),
        ),
    ]
}

/// `s` quoted for Python's `shlex.split`.
fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// One line the plugin wrote.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Event {
    pub e: String,
    #[serde(default)]
    pub id: String,
    /// `ready`: how many tests a warm pytest collected.
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    when: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    longrepr: String,
    #[serde(default)]
    sections: Vec<(String, String)>,
    /// A skip's or an xfail's reason.
    #[serde(default)]
    reason: String,
    /// The report is of a test pytest expected to fail (`wasxfail`).
    #[serde(default)]
    xfail: bool,
}

/// What a listing found: every collected item, then every collector (a module) that failed to
/// collect, which is a test of its own that fails with its error.
pub(super) fn listed(events: &[Event]) -> Vec<String> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| e.e == "collected" || e.e == "collecterror")
        .filter(|e| seen.insert(e.id.as_str()))
        .map(|e| e.id.clone())
        .collect()
}

/// The test a pytest was running when it ended without finishing it (a test that killed its
/// interpreter, by a signal or `os._exit`), if one was.
pub(super) fn died_in(events: &[Event]) -> Option<String> {
    let mut running: Vec<&str> = Vec::new();
    for e in events {
        match e.e.as_str() {
            "start" => running.push(&e.id),
            "finish" => running.retain(|id| *id != e.id),
            _ => {}
        }
    }
    running.last().map(|id| (*id).to_owned())
}

/// The result of the test a pytest died in: a failure of its own (retried as any failure),
/// which costs the shard's other tests nothing.
pub(super) fn crashed(id: &str, how: &str, events: &[Event], output: &str) -> TestRun {
    let mut out = String::new();
    for r in events.iter().filter(|e| e.e == "report" && e.id == id) {
        out.push_str(&r.longrepr);
    }
    out.push_str(&tail(output, MAX_TEST_OUTPUT / 2));
    TestRun {
        outcome: Outcome::Failed,
        duration: Duration::ZERO,
        output: tail(&out, MAX_TEST_OUTPUT),
        detail: format!(
            "pytest ended ({how}) while this test ran: the test ended its process; the shard's other tests ran on in a fresh pytest"
        ),
    }
}

/// The events in a file; a line cut short by a killed pytest is skipped.
fn read_events(path: &Path) -> Vec<Event> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What the events say of each test that finished: its outcome from its phases (any failed
/// phase fails it, an error in setup or teardown included; else a skip or an xfail skips it),
/// its time, and for failures the report and captured output.
fn results_of(events: &[Event]) -> HashMap<String, TestRun> {
    let mut phases: HashMap<&str, Vec<&Event>> = HashMap::new();
    let mut finished = Vec::new();
    for e in events {
        match e.e.as_str() {
            "report" => phases.entry(&e.id).or_default().push(e),
            "finish" => finished.push(e.id.as_str()),
            _ => {}
        }
    }
    let mut out = HashMap::new();
    // A module that failed to collect: its id fails with the collection's error.
    for e in events.iter().filter(|e| e.e == "collecterror") {
        out.entry(e.id.clone()).or_insert_with(|| TestRun {
            outcome: Outcome::Failed,
            duration: Duration::ZERO,
            output: tail(&e.longrepr, MAX_TEST_OUTPUT),
            detail: format!(
                "failed to collect: {}",
                e.message.lines().next().unwrap_or("error")
            ),
        });
    }
    // A module that skipped itself (`importorskip` at import): its id is skipped.
    for e in events.iter().filter(|e| e.e == "collectskip") {
        out.entry(e.id.clone()).or_insert_with(|| TestRun {
            outcome: Outcome::Skipped,
            duration: Duration::ZERO,
            output: String::new(),
            detail: e.reason.clone(),
        });
    }
    for id in finished {
        let reports = phases.remove(id).unwrap_or_default();
        if reports.is_empty() {
            continue;
        }
        let failed: Vec<&&Event> = reports.iter().filter(|r| r.outcome == "failed").collect();
        let outcome = if !failed.is_empty() {
            Outcome::Failed
        } else if reports.iter().any(|r| r.outcome == "skipped") {
            Outcome::Skipped
        } else {
            Outcome::Passed
        };
        let mut output = String::new();
        let mut detail = String::new();
        for r in &failed {
            if detail.is_empty() {
                detail = match (r.when.as_str(), r.message.lines().next()) {
                    ("call", Some(m)) => m.to_owned(),
                    ("call", None) => "test failed".into(),
                    (when, m) => format!("error in {when}: {}", m.unwrap_or("failed")),
                };
            }
            output.push_str(&r.longrepr);
            output.push('\n');
            for (title, text) in &r.sections {
                output.push_str(&format!("----- {title} -----\n{text}\n"));
            }
        }
        if outcome == Outcome::Skipped
            && let Some(r) = reports.iter().find(|r| r.outcome == "skipped")
        {
            detail = skip_detail(r);
        } else if outcome == Outcome::Passed
            && let Some(r) = reports.iter().find(|r| r.xfail)
        {
            // pytest's XPASS of a non-strict xfail: a pass, said as pytest says it.
            detail = labelled("xpassed", &r.reason);
        }
        let seconds: f64 = reports.iter().map(|r| r.duration.clamp(0.0, 1e7)).sum();
        out.insert(
            id.to_owned(),
            TestRun {
                outcome,
                duration: Duration::from_secs_f64(seconds),
                output: tail(&output, MAX_TEST_OUTPUT),
                detail,
            },
        );
    }
    out
}

/// A skipped test's detail: its reason, or for an xfail `xfailed: <reason>` (the outcome stays
/// `skipped`, which is what an xfail means to the gate; pytest's summary counts the two apart,
/// and so can a reader of the detail).
fn skip_detail(r: &Event) -> String {
    if r.xfail {
        return labelled("xfailed", &r.reason);
    }
    if !r.reason.is_empty() {
        return r.reason.clone();
    }
    // A plugin older than `reason`, or a report type of a plugin's own.
    r.longrepr.lines().last().unwrap_or_default().to_owned()
}

fn labelled(label: &str, reason: &str) -> String {
    if reason.is_empty() {
        label.to_owned()
    } else {
        format!("{label}: {reason}")
    }
}

/// Reads `events` while pytest runs; when a started test has been running longer than
/// `timeout`, returns its id (the caller stops pytest). Never returns otherwise. Each poll
/// reads only the complete lines appended since the last one, so a large shard's file is not
/// read over and over.
async fn watch_for_hung_test(events: &Path, timeout: Duration) -> String {
    let mut running = Running::default();
    let mut offset = 0usize;
    loop {
        tokio::time::sleep(POLL).await;
        for e in read_new_events(events, &mut offset) {
            running.note(&e);
        }
        if let Some(id) = running.past(timeout) {
            return id;
        }
    }
}

/// The tests a pytest started and has not finished, with when each started: what the
/// per-test timeout watches.
#[derive(Debug, Default)]
pub(super) struct Running(HashMap<String, Instant>);

impl Running {
    /// Takes in one of the plugin's events.
    pub(super) fn note(&mut self, e: &Event) {
        match e.e.as_str() {
            "start" => {
                self.0.insert(e.id.clone(), Instant::now());
            }
            "finish" => {
                self.0.remove(&e.id);
            }
            _ => {}
        }
    }

    /// A test that has been running longer than `timeout`.
    pub(super) fn past(&self, timeout: Duration) -> Option<String> {
        self.0
            .iter()
            .find(|(_, t)| t.elapsed() > timeout)
            .map(|(id, _)| id.clone())
    }
}

/// The events in the complete lines of `path` after byte `offset`, moving `offset` past them.
pub(super) fn read_new_events(path: &Path, offset: &mut usize) -> Vec<Event> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(*offset as u64))?;
        f.read_to_end(&mut buf)
    });
    if read.is_err() {
        return Vec::new();
    }
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    *offset += end + 1;
    String::from_utf8_lossy(&buf[..end])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A shard under pytest: the plugin's events give each test's result; a test past the test
/// timeout is stopped (`timed_out`) and the tests it held up run in a fresh pytest.
async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let deadline = Instant::now() + shard.limit;
    let mut remaining: Vec<String> = shard.tests.to_vec();
    let mut results: HashMap<String, TestRun> = HashMap::new();
    if warm::enabled(runner)
        && let Some(ran) = warm::run(runner, &shard, deadline).await
    {
        if shard.cancel.is_cancelled() {
            return Ok(());
        }
        let finished = process::Finished {
            ending: Ending::Exited(0),
            duration: Duration::ZERO,
            output: ran.output,
            limit: Some(shard.limit),
        };
        take_in(
            &mut results,
            &mut remaining,
            &ran.events,
            ran.hung.as_deref(),
            &shard,
            &finished,
        );
        if let Some(how) = &ran.died
            && let Some(victim) = died_in(&ran.events).filter(|v| !results.contains_key(v))
        {
            warn!(test = %victim, how = %how, "a test ended its warm pytest; the shard's other tests run on");
            results.insert(
                victim.clone(),
                crashed(&victim, how, &ran.events, &finished.output),
            );
            remaining.retain(|t| t != &victim);
        }
        if remaining.is_empty() || Instant::now() >= deadline {
            return finish(runner, shard, results, &finished).await;
        }
    }
    loop {
        let scratch = tempfile::tempdir()
            .map_err(|e| RunnerError::Local(format!("failed to create a scratch directory: {e}")))?;
        let junit_path = scratch.path().join("junit.xml");
        let events_path = scratch.path().join(EVENTS);
        let mut cmd = runner.command(
            &runner.cfg.run,
            &remaining,
            &junit_path.display().to_string(),
            shard.revision,
        );
        cmd.envs(plugin_environment(scratch.path(), &runner.cfg.env));
        let stop = shard.cancel.child_token();
        let left = deadline.saturating_duration_since(Instant::now());
        let (finished, hung) = run_watched(runner, cmd, left, &stop, &events_path, shard.test_timeout).await;
        if shard.cancel.is_cancelled() {
            return Ok(());
        }
        let events = read_events(&events_path);
        if events.is_empty() && hung.is_none() {
            // The plugin did not load: read the JUnit file, as for any run command.
            drop(scratch);
            return run_from_junit(runner, shard, remaining, results, finished, &junit_path).await;
        }
        take_in(
            &mut results,
            &mut remaining,
            &events,
            hung.as_deref(),
            &shard,
            &finished,
        );
        // One crash, one victim: a pytest that ended in the middle of a test charges that test
        // alone, and the shard's other tests go on in a fresh pytest.
        let mut crashed_one = false;
        if hung.is_none()
            && matches!(finished.ending, Ending::Exited(_) | Ending::Signaled(_))
            && let Some(victim) = died_in(&events).filter(|v| !results.contains_key(v))
        {
            warn!(test = %victim, how = %finished.describe(), "a test ended its pytest; the shard's other tests run on");
            results.insert(
                victim.clone(),
                crashed(&victim, &finished.describe(), &events, &finished.output),
            );
            remaining.retain(|t| t != &victim);
            crashed_one = true;
        }
        if (hung.is_none() && !crashed_one) || remaining.is_empty() || Instant::now() >= deadline {
            return finish(runner, shard, results, &finished).await;
        }
    }
}

/// Takes in what one pytest did: the results its events give, and the test it was stopped
/// for, `timed_out`; `remaining` keeps the shard's tests still without a result.
fn take_in(
    results: &mut HashMap<String, TestRun>,
    remaining: &mut Vec<String>,
    events: &[Event],
    hung: Option<&str>,
    shard: &Shard<'_>,
    finished: &process::Finished,
) {
    results.extend(results_of(events));
    if let Some(id) = hung {
        results.insert(id.to_owned(), timed_out(id, shard.test_timeout, events, finished));
    }
    remaining.retain(|t| !results.contains_key(t));
}

/// Runs `cmd` while watching its events for a test past `test_timeout`; returns how it ended
/// and the test that hung, if one did.
async fn run_watched(
    runner: &CommandRunner,
    cmd: tokio::process::Command,
    limit: Duration,
    stop: &CancellationToken,
    events: &Path,
    test_timeout: Duration,
) -> (process::Finished, Option<String>) {
    let running = process::run(cmd, Some(limit), stop, runner.cfg.max_output);
    tokio::pin!(running);
    tokio::select! {
        finished = &mut running => (finished, None),
        id = watch_for_hung_test(events, test_timeout) => {
            stop.cancel();
            (running.await, Some(id))
        }
    }
}

/// The result of a test stopped at the test timeout, with what it printed so far.
fn timed_out(id: &str, timeout: Duration, events: &[Event], finished: &process::Finished) -> TestRun {
    let phases: Vec<&Event> = events.iter().filter(|e| e.e == "report" && e.id == id).collect();
    let mut output = String::new();
    for r in phases.iter().filter(|r| r.outcome == "failed") {
        output.push_str(&r.longrepr);
    }
    output.push_str(&tail(&finished.output, MAX_TEST_OUTPUT / 2));
    TestRun {
        outcome: Outcome::TimedOut,
        duration: timeout,
        output: tail(&output, MAX_TEST_OUTPUT),
        detail: format!(
            "ran longer than the test timeout ({} s); pytest was stopped and the shard's other tests ran on",
            timeout.as_secs_f64()
        ),
    }
}

/// pytest's exit status when it collected no test.
const NO_TESTS_COLLECTED: i32 = 5;

/// Sends one result per requested test; a test the events never finished gets `infra_error`.
async fn finish(
    runner: &CommandRunner,
    shard: Shard<'_>,
    mut results: HashMap<String, TestRun>,
    finished: &process::Finished,
) -> Result<(), RunnerError> {
    let runs: Vec<(String, TestRun)> = shard
        .tests
        .iter()
        .map(|t| {
            let run = results
                .remove(t)
                .unwrap_or_else(|| runner.missing("pytest reported no end for this test", finished, None));
            (t.clone(), run)
        })
        .collect();
    let finished = match finished.ending {
        // The last pytest was stopped for a hung test, which explains its ending.
        Ending::Cancelled => process::Finished {
            ending: Ending::Exited(1),
            ..finished.clone()
        },
        // pytest's "no tests collected" for a shard of modules that each skipped themselves:
        // what a whole-suite pytest would say of them is "skipped", exit status 0.
        Ending::Exited(NO_TESTS_COLLECTED)
            if runs
                .iter()
                .all(|(_, r): &(String, TestRun)| r.outcome == Outcome::Skipped) =>
        {
            process::Finished {
                ending: Ending::Exited(0),
                ..finished.clone()
            }
        }
        _ => finished.clone(),
    };
    deliver(runs, &finished, &shard.results).await
}

/// Results from the JUnit file when the plugin did not load.
async fn run_from_junit(
    runner: &CommandRunner,
    shard: Shard<'_>,
    remaining: Vec<String>,
    mut results: HashMap<String, TestRun>,
    finished: process::Finished,
    junit_path: &PathBuf,
) -> Result<(), RunnerError> {
    let cases = match std::fs::read_to_string(junit_path) {
        Ok(xml) => crate::junit::parse(&xml).map_err(|e| e.to_string()),
        Err(e) => Err(format!("no JUnit file ({e})")),
    };
    let cases = cases.map_err(|e| {
        RunnerError::Tool(super::batch::join_detail(
            format!("{e}; the command ended with {}", finished.describe()),
            finished.output.clone(),
        ))
    })?;
    let wanted: HashSet<&String> = remaining.iter().collect();
    for c in cases {
        let id = node_id(&c);
        if wanted.contains(&id) {
            results.insert(
                id,
                TestRun {
                    outcome: c.outcome,
                    duration: Duration::from_millis(c.duration_ms),
                    output: c.output,
                    detail: c.message,
                },
            );
        }
    }
    finish(runner, shard, results, &finished).await
}

/// pytest's node id of a JUnit test case written with `junit_family=xunit1` (which records the
/// file): the file, the classes below the module, the test name.
pub(crate) fn node_id(c: &Case) -> String {
    let file = if c.file.is_empty() {
        // xunit2 has no file: guess the module from the classname.
        format!("{}.py", c.classname.replace('.', "/"))
    } else {
        c.file.clone()
    };
    let module = file.trim_end_matches(".py").replace(['/', '\\'], ".");
    let classes = c
        .classname
        .strip_prefix(&module)
        .unwrap_or("")
        .trim_start_matches('.');
    let mut id = file;
    for class in classes.split('.').filter(|s| !s.is_empty()) {
        id.push_str("::");
        id.push_str(class);
    }
    id.push_str("::");
    id.push_str(&c.name);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &str) -> Event {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn outcomes_come_from_every_phase() {
        let events: Vec<Event> = [
            r#"{"e":"start","id":"t.py::ok"}"#,
            r#"{"e":"report","id":"t.py::ok","when":"call","outcome":"passed","duration":0.5}"#,
            r#"{"e":"finish","id":"t.py::ok"}"#,
            r#"{"e":"report","id":"t.py::bad","when":"call","outcome":"failed","duration":0.1,"message":"assert 1 == 2","longrepr":"E  assert 1 == 2","sections":[["Captured stdout call","hello"]]}"#,
            r#"{"e":"finish","id":"t.py::bad"}"#,
            r#"{"e":"report","id":"t.py::fx","when":"setup","outcome":"failed","message":"RuntimeError: no db"}"#,
            r#"{"e":"finish","id":"t.py::fx"}"#,
            r#"{"e":"report","id":"t.py::xf","when":"call","outcome":"skipped","xfail":true,"reason":"bug 12","longrepr":"reason"}"#,
            r#"{"e":"finish","id":"t.py::xf"}"#,
            r#"{"e":"start","id":"t.py::hung"}"#,
        ]
        .map(ev)
        .to_vec();
        let r = results_of(&events);
        assert_eq!(r["t.py::ok"].outcome, Outcome::Passed);
        assert_eq!(r["t.py::ok"].duration, Duration::from_millis(500));
        assert_eq!(r["t.py::bad"].outcome, Outcome::Failed);
        assert_eq!(r["t.py::bad"].detail, "assert 1 == 2");
        assert!(r["t.py::bad"].output.contains("Captured stdout call"));
        assert!(r["t.py::bad"].output.contains("hello"));
        assert_eq!(r["t.py::fx"].outcome, Outcome::Failed);
        assert_eq!(r["t.py::fx"].detail, "error in setup: RuntimeError: no db");
        assert_eq!(r["t.py::xf"].outcome, Outcome::Skipped);
        assert_eq!(r["t.py::xf"].detail, "xfailed: bug 12");
        assert!(
            !r.contains_key("t.py::hung"),
            "a test that never finished has no result"
        );
    }

    #[test]
    fn new_events_are_read_once_and_a_half_written_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EVENTS);
        let mut offset = 0;
        std::fs::write(&path, "{\"e\":\"start\",\"id\":\"a\"}\n{\"e\":\"fin").unwrap();
        let first: Vec<String> = read_new_events(&path, &mut offset)
            .into_iter()
            .map(|e| e.e)
            .collect();
        assert_eq!(first, ["start"]);
        std::fs::write(
            &path,
            "{\"e\":\"start\",\"id\":\"a\"}\n{\"e\":\"finish\",\"id\":\"a\"}\n",
        )
        .unwrap();
        let next: Vec<String> = read_new_events(&path, &mut offset)
            .into_iter()
            .map(|e| e.e)
            .collect();
        assert_eq!(next, ["finish"]);
        assert!(read_new_events(&path, &mut offset).is_empty());
    }

    #[test]
    fn the_plugin_is_loaded_beside_the_profiles_own_settings() {
        let dir = tempfile::tempdir().unwrap();
        let base = BTreeMap::from([
            ("PYTHONPATH".to_owned(), "/src".to_owned()),
            ("PYTEST_ADDOPTS".to_owned(), "-x".to_owned()),
        ]);
        let env: BTreeMap<String, String> = plugin_environment(dir.path(), &base).into_iter().collect();
        assert_eq!(env["PYTHONPATH"], format!("{}:/src", dir.path().display()));
        assert!(env["PYTEST_ADDOPTS"].starts_with("-x -p shardgate_pytest -o cache_dir="));
        assert!(dir.path().join("shardgate_pytest.py").exists());
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
