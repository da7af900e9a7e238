//! A worker that checks itself: for each runner, whether its directory and program are there,
//! whether it lists tests, and (in a full check) whether one small shard of them runs and gives
//! back a readable result per test. `shardgate-worker --check` prints the report; at start-up
//! the worker runs the light check (no tests run: a test's side effects belong to real runs; an
//! empty listing passes, as the checkout may come later) in the background and tells the
//! coordinator which runners failed it, so they get no shards.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use shardgate_common::{Outcome, RunnerKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runners::{Runner, TestRun};

/// How much a check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The directory, the program and the listing (skipped when the profile has a setup,
    /// which needs a revision).
    Light,
    /// Also one shard of `sample` listed tests, run and read back.
    Full { sample: usize },
}

/// One runner's check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub runner: String,
    pub kind: RunnerKind,
    pub ok: bool,
    /// What was found, or what is wrong and how to fix it.
    pub summary: String,
    /// The tool's own words, when it failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub evidence: String,
    /// Tests the listing found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed: Option<usize>,
    /// The sample's results: id and outcome.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ran: Vec<(String, Outcome)>,
    pub elapsed_ms: u64,
}

/// Checks `runner` (named `name`) at `revision`, running sampled tests under `test_timeout`.
pub async fn check(
    name: &str,
    runner: &Runner,
    depth: Depth,
    revision: &str,
    test_timeout: Duration,
) -> Report {
    let started = Instant::now();
    let mut report = Report {
        runner: name.to_owned(),
        kind: runner.kind(),
        ok: false,
        summary: String::new(),
        evidence: String::new(),
        listed: None,
        ran: Vec::new(),
        elapsed_ms: 0,
    };
    let outcome = run_check(runner, depth, revision, test_timeout, &mut report).await;
    match outcome {
        Ok(summary) => {
            report.ok = true;
            report.summary = summary;
        }
        Err((summary, evidence)) => {
            report.summary = summary;
            report.evidence = evidence;
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

type Problem = (String, String);

async fn run_check(
    runner: &Runner,
    depth: Depth,
    revision: &str,
    test_timeout: Duration,
    report: &mut Report,
) -> Result<String, Problem> {
    if let Runner::Command(c) = runner
        && let Some(g) = c.checkouts().map(|c| c.config())
    {
        // The workdir and programs are inside a checkout, made per revision.
        if depth == Depth::Light {
            return Ok(format!(
                "git source '{}': each revision is checked out on demand under '{}'",
                g.repo,
                g.dir.display()
            ));
        }
    } else if let Runner::Command(c) = runner {
        let cfg = c.config();
        if !cfg.workdir.is_dir() {
            return Err((
                format!(
                    "workdir '{}' is not a directory: fix `workdir` in the runner profile",
                    cfg.workdir.display()
                ),
                String::new(),
            ));
        }
        for argv in [Some(&cfg.run), cfg.list.as_ref()].into_iter().flatten() {
            check_program(&argv[0], &cfg.workdir, &cfg.env)?;
        }
        if depth == Depth::Light && cfg.setup.is_some() {
            return Ok("workdir and programs found (the listing needs the setup, which needs a revision: run --check for it)".into());
        }
        if cfg.list.is_none() {
            return Ok("workdir and programs found; no list command, so no sample was run".into());
        }
    }
    let tests = runner.discover(revision).await.map_err(|e| {
        let e = e.to_string();
        match e.starts_with("listing tests") {
            true => split(&e),
            false => split(&format!("listing tests failed: {e}")),
        }
    })?;
    report.listed = Some(tests.len());
    // At start-up an empty listing may only mean the checkout is not there yet.
    if tests.is_empty() && depth == Depth::Light {
        return Ok("no tests listed yet".into());
    }
    if tests.is_empty() {
        return Err((
            "the listing found no tests: check `workdir` (and the tool's own test paths) in the profile"
                .into(),
            String::new(),
        ));
    }
    let Depth::Full { sample } = depth else {
        return Ok(format!("{} tests listed", tests.len()));
    };
    let sample: Vec<String> = tests.iter().take(sample.max(1)).cloned().collect();
    let (tx, mut rx) = mpsc::channel::<(String, TestRun)>(sample.len() + 1);
    let cancel = CancellationToken::new();
    let ran = runner
        .run_shard(&sample, revision, "", test_timeout, &cancel, tx)
        .await;
    let mut results = Vec::new();
    while let Some(r) = rx.recv().await {
        results.push(r);
    }
    report.ran = results.iter().map(|(id, r)| (id.clone(), r.outcome)).collect();
    ran.map_err(|e| split(&format!("running {} listed tests failed: {e}", sample.len())))?;
    if let Some((id, r)) = results.iter().find(|(_, r)| r.outcome == Outcome::InfraError) {
        return Err((
            format!(
                "the tool ran, but its result for '{id}' could not be read: {}",
                r.detail
            ),
            r.output.clone(),
        ));
    }
    let missing: Vec<&String> = sample
        .iter()
        .filter(|t| !results.iter().any(|(id, _)| id == *t))
        .collect();
    if !missing.is_empty() {
        return Err((format!("no result for {missing:?}"), String::new()));
    }
    let mut counts: Vec<(Outcome, usize)> = Vec::new();
    for (_, r) in &results {
        match counts.iter_mut().find(|(o, _)| *o == r.outcome) {
            Some((_, n)) => *n += 1,
            None => counts.push((r.outcome, 1)),
        }
    }
    let counts: Vec<String> = counts.iter().map(|(o, n)| format!("{n} {o}")).collect();
    Ok(format!(
        "{} tests listed; ran {} and read their results ({})",
        tests.len(),
        results.len(),
        counts.join(", ")
    ))
}

/// A failure's first line as the summary, the rest as the evidence.
fn split(text: &str) -> Problem {
    match text.split_once('\n') {
        Some((first, rest)) => (first.to_owned(), rest.to_owned()),
        None => (text.to_owned(), String::new()),
    }
}

/// Whether `program` can be started from `workdir` with the profile's `PATH`.
fn check_program(
    program: &str,
    workdir: &Path,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), Problem> {
    // A placeholder (go test's `{tests}`, nextest's own command) is the tool's business.
    if program.starts_with('{') {
        return Ok(());
    }
    let program = program.replace("{workdir}", &workdir.display().to_string());
    let found = if program.contains('/') {
        let p = workdir.join(&program);
        is_executable(&p).then_some(p)
    } else {
        let path = env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(&program))
            .find(is_executable)
    };
    match found {
        Some(_) => Ok(()),
        None => Err((
            format!(
                "program '{program}' not found on PATH or not executable: install it on this worker, or fix the profile's command"
            ),
            String::new(),
        )),
    }
}

fn is_executable(p: &PathBuf) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The report as a person reads it: a line per runner, the evidence indented below a failure.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports {
        let status = if r.ok { "ok" } else { "FAILED" };
        out.push_str(&format!(
            "runner '{}' ({}): {status}: {} [{:.1} s]\n",
            r.runner,
            r.kind,
            r.summary,
            r.elapsed_ms as f64 / 1000.0
        ));
        for line in r.evidence.lines().filter(|l| !l.trim().is_empty()).take(20) {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile;

    async fn check_profile(toml: &str) -> Report {
        let runners = profile::parse(toml, 64 * 1024).unwrap();
        let (name, runner) = runners.iter().next().unwrap();
        check(
            name,
            runner,
            Depth::Full { sample: 2 },
            "HEAD",
            Duration::from_secs(30),
        )
        .await
    }

    fn exec_script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn a_good_profile_lists_runs_and_reads_a_sample() {
        let dir = tempfile::tempdir().unwrap();
        exec_script(dir.path(), "a.sh", "exit 0");
        exec_script(dir.path(), "b.sh", "exit 1");
        exec_script(dir.path(), "c.sh", "exit 0");
        let r = check_profile(&format!(
            "[runners.e]\nkind = \"exec\"\nroot = \"{}\"\n",
            dir.path().display()
        ))
        .await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.listed, Some(3));
        assert_eq!(r.ran.len(), 2);
        assert!(r.summary.contains("3 tests listed; ran 2"), "{}", r.summary);
    }

    #[tokio::test]
    async fn a_missing_workdir_or_program_is_named() {
        let r = check_profile("[runners.p]\nkind = \"pytest\"\nworkdir = \"/nonexistent/checkout\"\n").await;
        assert!(!r.ok);
        assert!(
            r.summary
                .contains("workdir '/nonexistent/checkout' is not a directory"),
            "{}",
            r.summary
        );

        let dir = tempfile::tempdir().unwrap();
        let r = check_profile(&format!(
            "[runners.j]\nkind = \"junit\"\nworkdir = \"{}\"\nrun = [\"no-such-tool-xyz\", \"{{junit}}\", \"{{tests}}\"]\nlist = [\"no-such-tool-xyz\", \"--list\"]\n",
            dir.path().display()
        ))
        .await;
        assert!(!r.ok);
        assert!(
            r.summary.contains("program 'no-such-tool-xyz' not found"),
            "{}",
            r.summary
        );
    }

    #[tokio::test]
    async fn results_it_cannot_read_are_named_with_the_tools_words() {
        let dir = tempfile::tempdir().unwrap();
        let r = check_profile(&format!(
            "[runners.j]\nkind = \"junit\"\nworkdir = \"{}\"\nlist = [\"sh\", \"-c\", \"echo t.a; echo t.b\"]\nrun = [\"sh\", \"-c\", \"echo wrote the report elsewhere\", \"{{junit}}\", \"{{tests}}\"]\n",
            dir.path().display()
        ))
        .await;
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.listed, Some(2));
        assert!(r.summary.contains("no JUnit file"), "{}", r.summary);
        assert!(r.evidence.contains("wrote the report elsewhere"), "{r:?}");
    }

    #[tokio::test]
    async fn a_listing_that_fails_or_finds_nothing_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let r = check_profile(&format!(
            "[runners.j]\nkind = \"junit\"\nworkdir = \"{}\"\nlist = [\"sh\", \"-c\", \"echo cannot import conftest >&2; exit 4\"]\nrun = [\"true\", \"{{junit}}\", \"{{tests}}\"]\n",
            dir.path().display()
        ))
        .await;
        assert!(!r.ok);
        assert!(r.summary.starts_with("listing tests failed"), "{}", r.summary);
        assert!(r.evidence.contains("cannot import conftest"), "{r:?}");

        let r = check_profile(&format!(
            "[runners.j]\nkind = \"junit\"\nworkdir = \"{}\"\nlist = [\"true\"]\nrun = [\"true\", \"{{junit}}\", \"{{tests}}\"]\n",
            dir.path().display()
        ))
        .await;
        assert!(!r.ok);
        assert!(r.summary.contains("found no tests"), "{}", r.summary);
    }
}
