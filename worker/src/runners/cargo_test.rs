//! cargo test (libtest): libtest names as test ids, results read from libtest's plain output.
//!
//! **Direct starts** (the default commands, see [`direct_refusal`]): once per run a worker
//! builds the test binaries and records how cargo starts each one, as `cargo test` itself would
//! run it: `cargo test --tests --no-fail-fast --message-format=json -- --list` with a target
//! runner of shardgate's own (`CARGO_TARGET_<HOST>_RUNNER`, the recorder nextest's direct
//! starts use: it writes down the binary, its directory and the whole environment cargo gave
//! it, then becomes the binary). Each binary's listing names its tests. A shard then starts
//! only the binaries its tests are in, each once, with `--exact NAME…`, in cargo's directory
//! and environment: no cargo start, no build check and no doc-test pass per shard (the doc
//! tests are never listed: rustdoc cannot select them exactly).
//!
//! Ids: a test's libtest name where that name is in one test binary only (so the ids of a suite
//! stay what they were); where one name is in several binaries, each is `<binary-id> <name>`
//! with nextest's binary ids (`crate`, `crate::bin/name`, `crate::test-name`...). A bare name
//! that is in several binaries (an id of an older listing) runs in all of them and keeps its
//! worst outcome. A binary that is not a libtest harness (`harness = false`: its `--list` does
//! not end with libtest's "N tests, M benchmarks") is a test of its own,
//! `<binary-id> (custom harness)`, run with no arguments as `cargo test` would, and passed
//! only when it exits 0.
//!
//! Otherwise (a profile's own commands, a target runner of the project's, a build that fails,
//! `SHARDGATE_CARGO_TEST_DIRECT=0`), each shard runs `cargo test --tests --no-fail-fast --
//! --exact NAME…`, which starts every test binary, and a name keeps its worst outcome across
//! them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use shardgate_common::Outcome;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::batch::{CommandRunner, IdFormat, Shard, deliver, found, join_detail, judge};
use super::{BoxFuture, Commands, RunnerError, TestRun, Tool, ToolSpec};
use crate::process::{self, Ending};

#[derive(Debug)]
pub struct CargoTest;

impl Tool for CargoTest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.id.is_some() {
            return Err("cargo test ids are libtest names; remove id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: spec.run.cloned().unwrap_or_else(run),
            id: IdFormat::Name,
        })
    }

    fn writes_junit(&self) -> bool {
        false
    }

    fn parse_listing(&self, stdout: &str) -> Vec<String> {
        crate::libtest::list(stdout)
    }

    /// With direct starts, the run's record lists the suite (one build for both).
    fn list_for_run<'a>(
        &'a self,
        runner: &'a CommandRunner,
        revision: &'a str,
        run: &'a str,
        limit: std::time::Duration,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async move {
            let cancel = CancellationToken::new();
            let recorded = tokio::time::timeout(limit, recorded_for(runner, revision, run, &cancel))
                .await
                .ok()??;
            Some(recorded.listing.clone())
        })
    }

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(async move {
            match recorded_for(runner, shard.revision, shard.run, shard.cancel).await {
                Some(recorded) => run_direct(runner, &recorded, shard).await,
                None => run_through_cargo(runner, shard).await,
            }
        })
    }
}

/// cargo test's listing command: `NAME: test` per line, per test binary.
fn list() -> Vec<String> {
    [
        "cargo", "test", "--tests", "--quiet", "--", "--list", "--format", "terse",
    ]
    .map(String::from)
    .to_vec()
}

/// cargo test's run command: every test binary runs the names it has, exactly. `--tests`:
/// the targets `cargo test` runs (`test = true`), without its doc-test pass, whose tests are
/// never listed.
fn run() -> Vec<String> {
    [
        "cargo",
        "test",
        "--tests",
        "--no-fail-fast",
        "--",
        "--exact",
        "{tests}",
    ]
    .map(String::from)
    .to_vec()
}

/// The run whose test binaries a worker recorded, and the record (`None`: it could not be made,
/// so the run's shards go through cargo).
pub(super) type RecordedRun = (String, Option<Arc<Recorded>>);

/// How cargo starts a run's test binaries, and the suite they hold.
#[derive(Debug)]
pub(super) struct Recorded {
    binaries: Vec<Binary>,
    /// The suite's ids, binary by binary in binary id order, each in libtest's order.
    listing: Vec<String>,
    /// Per id of the listing: the binary and the name to select (`None`: the whole binary).
    by_id: HashMap<String, (usize, Option<String>)>,
    /// Per libtest name: the binaries that have it.
    by_name: HashMap<String, Vec<usize>>,
}

#[derive(Debug)]
struct Binary {
    /// nextest's binary id: `crate`, `crate::bin/name`, `crate::test-name`...
    id: String,
    program: PathBuf,
    cwd: PathBuf,
    /// The whole environment cargo gave it (the child's is cleared first).
    env: Vec<(OsString, OsString)>,
    /// Its `--list` was libtest's; otherwise it is a test of its own.
    libtest: bool,
    names: Vec<String>,
}

/// Why a runner's shards go through cargo rather than start the test binaries directly.
fn direct_refusal(runner: &CommandRunner) -> Option<String> {
    let cfg = runner.config();
    if cfg.run != run() || cfg.list != Some(list()) {
        return Some("the profile has commands of its own".into());
    }
    if super::nextest::turned_off(runner, "SHARDGATE_CARGO_TEST_DIRECT") {
        return Some("SHARDGATE_CARGO_TEST_DIRECT=0".into());
    }
    super::nextest_direct::target_runner_refusal(runner, &[])
}

/// The record of `run`'s test binaries on this worker, made by the first of its shards (or its
/// listing) that needs it; a runner check (`run` empty) records for itself.
async fn recorded_for(
    runner: &CommandRunner,
    revision: &str,
    run: &str,
    cancel: &CancellationToken,
) -> Option<Arc<Recorded>> {
    if let Some(why) = direct_refusal(runner) {
        debug!(runner = %runner.config().name, %why, "cargo test shards go through cargo");
        return None;
    }
    if run.is_empty() {
        return record(runner, revision, cancel).await.map(Arc::new);
    }
    let mut built = runner.cargo_build.lock().await;
    if let Some((r, recorded)) = &*built
        && r == run
    {
        return recorded.clone();
    }
    let recorded = record(runner, revision, cancel).await.map(Arc::new);
    if !cancel.is_cancelled() {
        *built = Some((run.to_owned(), recorded.clone()));
    }
    recorded
}

/// Builds the test binaries and records how cargo starts each, then lists each one.
async fn record(runner: &CommandRunner, revision: &str, cancel: &CancellationToken) -> Option<Recorded> {
    let name = &runner.config().name;
    let host = host_triple(runner, revision, cancel).await?;
    let argv: Vec<String> = [
        "cargo",
        "test",
        "--tests",
        "--no-fail-fast",
        "--message-format=json-render-diagnostics",
        "--",
        "--list",
    ]
    .map(String::from)
    .to_vec();
    let cmd = runner.command(&argv, &[], "", revision);
    let (out, starts) = super::nextest_direct::run_recording(runner, cmd, &host, cancel, "cargo").await?;
    let artifacts = artifacts(&String::from_utf8_lossy(&out.stdout));
    let mut binaries = Vec::new();
    for start in starts {
        let program = PathBuf::from(&start.argv[0]);
        let Some(id) = artifacts.get(&program) else {
            info!(runner = %name, program = %program.display(), "cargo started a program its build did not name; cargo test shards go through cargo");
            return None;
        };
        binaries.push(Binary {
            id: id.clone(),
            program,
            cwd: start.cwd,
            env: start.env,
            libtest: false,
            names: Vec::new(),
        });
    }
    if binaries.len() != artifacts.len() {
        info!(runner = %name, built = artifacts.len(), started = binaries.len(), "cargo did not start every test binary it built; cargo test shards go through cargo");
        return None;
    }
    binaries.sort_by(|a, b| a.id.cmp(&b.id));
    for b in &mut binaries {
        let mut cmd = tokio::process::Command::new(&b.program);
        cmd.arg("--list")
            .current_dir(&b.cwd)
            .env_clear()
            .envs(b.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::select! {
            out = cmd.output() => out.ok()?,
            () = cancel.cancelled() => return None,
        };
        let text = String::from_utf8_lossy(&out.stdout);
        (b.libtest, b.names) = read_list(&text);
        if !out.status.success() {
            // `cargo test -- --list` passed it; a second listing that fails is no listing.
            return None;
        }
    }
    Some(index(binaries))
}

/// A binary's `--list`: whether it is libtest's (it ends with "N tests, M benchmarks"), and
/// its test names (benchmarks left out).
fn read_list(text: &str) -> (bool, Vec<String>) {
    let summary = |l: &str| {
        let mut words = l.split_whitespace();
        let count = |w: Option<&str>| w.is_some_and(|w| w.trim_end_matches(',').parse::<u64>().is_ok());
        count(words.next())
            && matches!(words.next(), Some("test," | "tests,"))
            && count(words.next())
            && matches!(words.next(), Some("benchmark" | "benchmarks"))
            && words.next().is_none()
    };
    let libtest = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .is_some_and(summary);
    let names = text
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect();
    (libtest, names)
}

/// Ids for the binaries' tests: the bare name where it is in one binary only.
fn index(binaries: Vec<Binary>) -> Recorded {
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, b) in binaries.iter().enumerate() {
        for n in &b.names {
            let seen = by_name.entry(n.clone()).or_default();
            if !seen.contains(&i) {
                seen.push(i);
            }
        }
    }
    let mut listing = Vec::new();
    let mut by_id = HashMap::new();
    for (i, b) in binaries.iter().enumerate() {
        if !b.libtest {
            let id = format!("{} (custom harness)", b.id);
            by_id.insert(id.clone(), (i, None));
            listing.push(id);
            continue;
        }
        for n in &b.names {
            let id = if by_name[n].len() == 1 {
                n.clone()
            } else {
                format!("{} {n}", b.id)
            };
            if by_id.insert(id.clone(), (i, Some(n.clone()))).is_none() {
                listing.push(id);
            }
        }
    }
    Recorded {
        binaries,
        listing,
        by_id,
        by_name,
    }
}

/// Test binaries by path, with their nextest binary ids, from cargo's JSON messages.
fn artifacts(json: &str) -> HashMap<PathBuf, String> {
    let mut out = HashMap::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(package), Some(target)) = (
            v["executable"].as_str(),
            v["package_id"].as_str().and_then(package_name),
            v["target"]["name"].as_str(),
        ) else {
            continue;
        };
        let kind = v["target"]["kind"][0].as_str().unwrap_or("lib");
        out.insert(PathBuf::from(exe), binary_id(&package, kind, target));
    }
    out
}

/// nextest's binary id of a test target.
fn binary_id(package: &str, kind: &str, target: &str) -> String {
    match kind {
        "test" => format!("{package}::{target}"),
        "bin" | "bench" | "example" => format!("{package}::{kind}/{target}"),
        // lib, proc-macro, rlib...: the package's own unit tests.
        _ => package.to_owned(),
    }
}

/// The package name in a cargo package id: `path+file:///p/my-crate#0.1.0`,
/// `registry+…#name@1.0.0`, or the older `name 1.0.0 (source)`.
fn package_name(id: &str) -> Option<String> {
    if let Some((source, rest)) = id.split_once('#') {
        if let Some((name, _version)) = rest.split_once('@') {
            return Some(name.to_owned());
        }
        let path = source.split(['?', '#']).next()?;
        return path.rsplit('/').find(|s| !s.is_empty()).map(str::to_owned);
    }
    id.split_whitespace().next().map(str::to_owned)
}

/// The host's target triple, from `rustc -vV` in the runner's directory and environment (so a
/// rustup toolchain file is honoured).
async fn host_triple(runner: &CommandRunner, revision: &str, cancel: &CancellationToken) -> Option<String> {
    let argv: Vec<String> = ["rustc", "-vV"].map(String::from).to_vec();
    let mut cmd = runner.command(&argv, &[], "", revision);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::select! {
        out = cmd.output() => out.ok()?,
        () = cancel.cancelled() => return None,
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
}

/// A shard from the record: each binary its tests are in starts once. A test's result is sent
/// once every binary it runs in has ended (a bare name in several binaries keeps its worst).
async fn run_direct(
    runner: &CommandRunner,
    recorded: &Recorded,
    shard: Shard<'_>,
) -> Result<(), RunnerError> {
    let Shard {
        tests,
        cancel,
        results,
        limit,
        ..
    } = shard;
    let deadline = Instant::now() + limit;
    // Per binary, the names to select in it and the ids they answer for.
    let mut plan: BTreeMap<usize, Vec<(Option<&str>, &String)>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for id in tests {
        if let Some((b, name)) = recorded.by_id.get(id) {
            plan.entry(*b).or_default().push((name.as_deref(), id));
        } else if let Some(bins) = recorded.by_name.get(id.as_str()) {
            for b in bins {
                plan.entry(*b).or_default().push((Some(id.as_str()), id));
            }
        } else {
            unknown.push(id);
        }
    }
    let mut left: HashMap<&String, usize> = HashMap::new();
    for group in plan.values() {
        for (_, id) in group {
            *left.entry(id).or_default() += 1;
        }
    }
    let mut worst: HashMap<&String, TestRun> = HashMap::new();
    for id in unknown {
        let r = TestRun {
            outcome: Outcome::InfraError,
            duration: std::time::Duration::ZERO,
            output: String::new(),
            detail: "missing result: no test binary of this build has this test".into(),
        };
        if results.send((id.clone(), r)).await.is_err() {
            return Ok(());
        }
    }
    for (b, group) in plan {
        let bin = &recorded.binaries[b];
        let mut cmd = tokio::process::Command::new(&bin.program);
        let names: Vec<&str> = group.iter().filter_map(|(n, _)| *n).collect();
        if bin.libtest {
            cmd.arg("--exact").args(&names);
        }
        cmd.current_dir(&bin.cwd)
            .env_clear()
            .envs(bin.env.iter().map(|(k, v)| (k, v)));
        let left_time = deadline.saturating_duration_since(Instant::now());
        let finished = process::run(cmd, Some(left_time), cancel, runner.cfg.max_output).await;
        if finished.ending == Ending::Cancelled {
            return Ok(());
        }
        let mut runs: Vec<(String, TestRun)> = if bin.libtest {
            let mut parsed = crate::libtest::parse(&finished.output);
            if parsed.is_empty() && finished.ending != Ending::TimedOut {
                return Err(runner.no_tests(&format!("test binary {} reported no tests", bin.id), finished));
            }
            let share = finished.duration / names.len().max(1) as u32;
            group
                .iter()
                .map(|(name, id)| {
                    let run = match name.and_then(|n| parsed.remove(n)) {
                        Some(r) => found(r.outcome, share, r.output),
                        None => {
                            runner.missing("the test binary printed no line for this test", &finished, None)
                        }
                    };
                    ((*id).clone(), run)
                })
                .collect()
        } else {
            // A harness of its own: its exit status is its result.
            let passed = finished.ending == Ending::Exited(0);
            let run = TestRun {
                outcome: match finished.ending {
                    Ending::Exited(0) => Outcome::Passed,
                    Ending::TimedOut => Outcome::TimedOut,
                    _ => Outcome::Failed,
                },
                duration: finished.duration,
                output: super::batch::tail(&finished.output, 64 * 1024),
                detail: if passed {
                    String::new()
                } else {
                    format!("the custom test harness ended with {}", finished.describe())
                },
            };
            group.iter().map(|(_, id)| ((*id).clone(), run.clone())).collect()
        };
        if bin.libtest {
            judge(&mut runs, &finished).map_err(|e| match e {
                RunnerError::Tool(t) => RunnerError::Tool(join_detail(
                    format!("test binary {}: {}", bin.id, super::batch::first_line(&t)),
                    finished.output.clone(),
                )),
                other => other,
            })?;
        }
        // `runs` is in the group's order.
        for ((_, key), (id, run)) in group.iter().zip(runs) {
            let key = *key;
            let merged = match worst.remove(key) {
                Some(before) if rank(before.outcome) >= rank(run.outcome) => before,
                _ => run,
            };
            let n = left.get_mut(key).expect("counted");
            *n -= 1;
            if *n == 0 {
                if results.send((id, merged)).await.is_err() {
                    return Ok(());
                }
            } else {
                worst.insert(key, merged);
            }
        }
    }
    Ok(())
}

/// Which of two results of one bare name across binaries is kept: the worse.
fn rank(o: Outcome) -> u8 {
    match o {
        Outcome::InfraError => 5,
        Outcome::TimedOut => 4,
        Outcome::Failed => 3,
        Outcome::Flaky => 2,
        Outcome::Passed => 1,
        Outcome::Skipped => 0,
    }
}

/// `cargo test`: results read from libtest's plain output. libtest prints no per-test time
/// on stable Rust, so each test is given an equal share of the shard's wall time.
async fn run_through_cargo(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let Shard {
        tests,
        revision,
        cancel,
        results,
        limit,
        ..
    } = shard;
    let cmd = runner.command(&runner.cfg.run, tests, "", revision);
    let finished = process::run(cmd, Some(limit), cancel, 16 * 1024 * 1024).await;
    if finished.ending == Ending::Cancelled {
        return Ok(());
    }
    let mut parsed = crate::libtest::parse(&finished.output);
    if parsed.is_empty() && finished.ending != Ending::TimedOut {
        return Err(runner.no_tests("cargo test reported no tests", finished));
    }
    let share = finished.duration / tests.len().max(1) as u32;
    let runs = tests
        .iter()
        .map(|t| {
            let run = match parsed.remove(t) {
                Some(r) => found(r.outcome, share, r.output),
                None => runner.missing("cargo test printed no line for this test", &finished, None),
            };
            (t.clone(), run)
        })
        .collect();
    deliver(runs, &finished, &results).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_every_id_format() {
        assert_eq!(
            package_name("path+file:///tmp/ct#my-crate@0.1.0").as_deref(),
            Some("my-crate")
        );
        assert_eq!(
            package_name("path+file:///tmp/my-crate#0.1.0").as_deref(),
            Some("my-crate")
        );
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#indexmap@2.14.2").as_deref(),
            Some("indexmap")
        );
        assert_eq!(
            package_name("strsim 0.11.1 (path+file:///w/strsim)").as_deref(),
            Some("strsim")
        );
    }

    #[test]
    fn binary_ids_are_nextests() {
        assert_eq!(binary_id("my-crate", "lib", "my_crate"), "my-crate");
        assert_eq!(binary_id("my-crate", "proc-macro", "my_crate"), "my-crate");
        assert_eq!(binary_id("my-crate", "test", "it"), "my-crate::it");
        assert_eq!(binary_id("my-crate", "bin", "tool"), "my-crate::bin/tool");
    }

    #[test]
    fn a_listing_is_libtests_only_with_its_summary() {
        let (libtest, names) = read_list("a::b: test\nbench_x: benchmark\n\n2 tests, 1 benchmark\n");
        assert!(libtest);
        assert_eq!(names, vec!["a::b"]);
        assert!(read_list("\n0 tests, 0 benchmarks\n").0);
        assert!(read_list("1 test, 0 benchmarks\n").0);
        assert!(!read_list("").0, "a harness that prints nothing is its own");
        assert!(!read_list("a: test\nall good\n").0);
    }

    fn bin(id: &str, libtest: bool, names: &[&str]) -> Binary {
        Binary {
            id: id.into(),
            program: PathBuf::from(id),
            cwd: PathBuf::new(),
            env: Vec::new(),
            libtest,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    #[test]
    fn a_name_in_two_binaries_gets_an_id_in_each_and_unique_names_stay_bare() {
        let r = index(vec![
            bin("c", true, &["same", "only_lib"]),
            bin("c::it", true, &["same"]),
            bin("c::custom", false, &[]),
        ]);
        assert_eq!(
            r.listing,
            vec!["c same", "only_lib", "c::it same", "c::custom (custom harness)"]
        );
        assert_eq!(r.by_id["c::it same"], (1, Some("same".into())));
        assert_eq!(r.by_id["c::custom (custom harness)"], (2, None));
        assert_eq!(r.by_name["same"], vec![0, 1], "an older bare id runs in both");
    }
}
