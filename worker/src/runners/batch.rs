//! The batch machinery: a runner that hands a whole shard to a test tool in one command
//! (pytest, cargo-nextest, cargo test, go test, any JUnit-writing tool), runs the profile's
//! setup once per revision, lists tests, and reads per-test results back. What differs per tool
//! lives in the tool's own module (see `runners/mod.rs`); the JUnit path is here.
//!
//! Every requested test gets exactly one result: from its `testcase`, or `infra_error`
//! ("missing result") when the file has none for it — never a pass. A `testcase` that was not
//! asked for is ignored and logged. When the tool writes no readable file, the shard is handed
//! back with the tool's exit status and output as evidence.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shardgate_common::{Outcome, RunnerKind};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::workspace::{Checkouts, Prover, SharedDir, Workspace};
use super::{Proof, RunnerError, TestRun, Tool};
use crate::junit::{self, Case};
use crate::process::{self, Ending};

/// How a `testcase` element names the test it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum IdFormat {
    /// `tests/test_x.py::TestY::test_z[1]`, from `file`, `classname` and `name`.
    #[serde(skip)]
    PytestNodeId,
    #[serde(rename = "name")]
    Name,
    #[serde(rename = "classname.name")]
    ClassnameDotName,
    #[serde(rename = "classname::name")]
    ClassnameColonsName,
    #[serde(rename = "file::name")]
    FileColonsName,
    /// nextest: `<binary-id> <test name>` (the testsuite's classname is the binary id).
    #[serde(skip)]
    ClassnameSpaceName,
}

impl IdFormat {
    pub fn id_of(self, c: &Case) -> String {
        match self {
            IdFormat::Name => c.name.clone(),
            IdFormat::ClassnameDotName => format!("{}.{}", c.classname, c.name),
            IdFormat::ClassnameColonsName => format!("{}::{}", c.classname, c.name),
            IdFormat::FileColonsName => format!("{}::{}", c.file, c.name),
            IdFormat::ClassnameSpaceName => format!("{} {}", c.classname, c.name),
            IdFormat::PytestNodeId => super::pytest::node_id(c),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub kind: RunnerKind,
    pub workdir: PathBuf,
    /// Prints one test id per line (pytest: its `--collect-only -q` output).
    pub list: Option<Vec<String>>,
    pub run: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub setup: Option<Vec<String>>,
    pub setup_timeout: Duration,
    pub shard_timeout: Option<Duration>,
    pub id: IdFormat,
    pub max_output: usize,
    /// A `git` source: each revision gets a worktree of its own, and `workdir` is relative to
    /// its root (see `workspace.rs`).
    pub git: Option<super::workspace::GitConfig>,
    /// Prints the commit the workdir holds (e.g. `git rev-parse HEAD`), the proof sent with a
    /// shard's results when the source is not `git`.
    pub revision_check: Option<Vec<String>>,
}

/// One shard as a tool runs it.
#[derive(Debug)]
pub struct Shard<'a> {
    pub tests: &'a [String],
    pub revision: &'a str,
    /// The run the shard is of (empty outside a run: a runner check).
    pub run: &'a str,
    pub cancel: &'a CancellationToken,
    pub results: mpsc::Sender<(String, TestRun)>,
    /// The run's per-test timeout, which a tool holds inside the batch where it can.
    pub test_timeout: Duration,
    /// The whole shard's time limit: the profile's `shard_timeout`, else [`default_shard_limit`].
    pub limit: Duration,
}

/// Compilation, collection and start-up a shard may take besides its tests when the profile
/// sets no `shard_timeout`.
pub const SHARD_SLACK: Duration = Duration::from_secs(10 * 60);

/// A shard's time limit when the profile sets no `shard_timeout`: every test at the run's
/// test timeout, plus [`SHARD_SLACK`].
pub fn default_shard_limit(tests: usize, test_timeout: Duration) -> Duration {
    test_timeout.saturating_mul(tests.max(1) as u32) + SHARD_SLACK
}

#[derive(Debug, Clone)]
pub struct CommandRunner {
    pub(super) cfg: Config,
    tool: &'static dyn Tool,
    /// Setup outcome per revision, in a runner whose directory never changes revision (a
    /// worktree's, or a profile without a setup).
    setups: std::sync::Arc<Mutex<HashMap<String, Result<(), RunnerError>>>>,
    /// Where the runner's commands run for a revision.
    source: Source,
    /// pytest's warm processes (see `pytest_warm.rs`); empty for other tools.
    pub(super) warm: std::sync::Arc<super::pytest_warm::WarmPool>,
    /// nextest: the run whose build is recorded, and where (see `nextest.rs`).
    pub(super) nextest_build: std::sync::Arc<Mutex<Option<RecordedBuild>>>,
    /// cargo test: the run whose test binaries are recorded, and how cargo starts them (see
    /// `cargo_test.rs`).
    pub(super) cargo_build: std::sync::Arc<Mutex<Option<super::cargo_test::RecordedRun>>>,
    /// go test: the run whose test binaries are compiled, and where (see `go_test.rs`).
    pub(super) go_build: std::sync::Arc<Mutex<Option<super::go_test::CompiledRun>>>,
}

/// Where a runner's commands run for a revision (see `workspace.rs`).
#[derive(Debug, Clone)]
enum Source {
    /// The profile's `workdir`, as it is (or, for a worktree's runner, that worktree).
    Plain,
    /// The profile's `workdir`, which its `setup` switches from revision to revision.
    Shared(std::sync::Arc<SharedDir>),
    /// A worktree per revision.
    Git(std::sync::Arc<Checkouts>),
}

/// A run's id and its recorded build, if recording it worked.
pub(super) type RecordedBuild = (String, Option<std::sync::Arc<super::nextest::Recorded>>);

impl CommandRunner {
    /// A batch runner; `cfg.kind` must be a batch tool's (not `exec`).
    pub fn new(cfg: Config) -> Self {
        let source = match (&cfg.git, &cfg.setup) {
            (Some(g), _) => Source::Git(Checkouts::new(g.clone())),
            (None, Some(_)) => Source::Shared(Default::default()),
            (None, None) => Source::Plain,
        };
        Self::with_source(cfg, source)
    }

    fn with_source(cfg: Config, source: Source) -> Self {
        let tool = super::tool(cfg.kind).expect("a batch runner has a batch tool's kind");
        Self {
            cfg,
            tool,
            source,
            setups: Default::default(),
            warm: Default::default(),
            nextest_build: Default::default(),
            cargo_build: Default::default(),
            go_build: Default::default(),
        }
    }

    pub fn kind(&self) -> RunnerKind {
        self.cfg.kind
    }

    /// The profile this runner was made from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub(super) fn command(
        &self,
        argv: &[String],
        tests: &[String],
        junit: &str,
        revision: &str,
    ) -> tokio::process::Command {
        self.command_with(argv, tests, &[("{junit}", junit), ("{revision}", revision)])
    }

    /// Builds a command from `argv`: `{tests}` becomes one argument per test, each other
    /// `{name}` in `vars` is replaced where it appears.
    pub(super) fn command_with(
        &self,
        argv: &[String],
        tests: &[String],
        vars: &[(&str, &str)],
    ) -> tokio::process::Command {
        let workdir = self.cfg.workdir.display().to_string();
        let expand = |a: &str| {
            let mut a = a.replace("{workdir}", &workdir);
            for (k, v) in vars {
                a = a.replace(k, v);
            }
            a
        };
        let mut args = Vec::with_capacity(argv.len() + tests.len());
        for a in &argv[1..] {
            if a == "{tests}" {
                args.extend(tests.iter().cloned());
            } else {
                args.push(expand(a));
            }
        }
        let mut cmd = tokio::process::Command::new(expand(&argv[0]));
        cmd.args(args).current_dir(&self.cfg.workdir).envs(&self.cfg.env);
        cmd
    }

    /// The `git` source's checkouts, if the runner has one.
    pub fn checkouts(&self) -> Option<&std::sync::Arc<Checkouts>> {
        match &self.source {
            Source::Git(c) => Some(c),
            _ => None,
        }
    }

    /// The workspace of `revision` for run `run`, set up and held until it is dropped.
    pub(super) async fn enter(
        &self,
        revision: &str,
        run: &str,
        pinned: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Workspace, RunnerError> {
        match &self.source {
            Source::Plain => {
                let mentions = |a: &Vec<String>| a.iter().any(|x| x.contains("{revision}"));
                let cfg = &self.cfg;
                if [
                    Some(&cfg.run),
                    cfg.list.as_ref(),
                    cfg.setup.as_ref(),
                    cfg.revision_check.as_ref(),
                ]
                .into_iter()
                .flatten()
                .any(mentions)
                {
                    super::workspace::check_revision(revision)?;
                }
                self.setup(revision, cancel).await?;
                Ok(Workspace::plain(self.clone(), self.revision_prover(revision)))
            }
            Source::Shared(dir) => {
                super::workspace::check_revision(revision)?;
                let lease = dir
                    .acquire(revision, cancel, || self.run_setup(revision, cancel))
                    .await?;
                Ok(Workspace::shared(
                    self.clone(),
                    self.revision_prover(revision),
                    lease,
                ))
            }
            Source::Git(checkouts) => {
                let rel = self.cfg.workdir.clone();
                // A run already pinned to a commit tests that commit, whatever its ref
                // name says now.
                let ws = checkouts
                    .acquire(pinned.unwrap_or(revision), run, cancel, |root| {
                        let mut cfg = self.cfg.clone();
                        cfg.workdir = root.join(&rel);
                        cfg.git = None;
                        Self::with_source(cfg, Source::Plain)
                    })
                    .await?;
                ws.runner.setup(revision, cancel).await?;
                Ok(ws)
            }
        }
    }

    fn revision_prover(&self, revision: &str) -> Option<Prover> {
        let check = self.cfg.revision_check.as_ref()?;
        let cmd = self.command(check, &[], "", revision);
        let std = cmd.as_std();
        let mut argv = vec![std.get_program().to_string_lossy().into_owned()];
        argv.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
        Some(Prover::Command {
            argv,
            workdir: self.cfg.workdir.clone(),
            env: self.cfg.env.clone(),
        })
    }

    /// Runs the profile's setup for `revision` once; later calls return the first outcome.
    async fn setup(&self, revision: &str, cancel: &CancellationToken) -> Result<(), RunnerError> {
        if self.cfg.setup.is_none() {
            return Ok(());
        }
        let mut done = self.setups.lock().await;
        if let Some(r) = done.get(revision) {
            return r.clone();
        }
        let result = self.run_setup(revision, cancel).await;
        if !matches!(&result, Err(RunnerError::Setup(e)) if e == "setup cancelled") {
            done.insert(revision.to_owned(), result.clone());
        }
        result
    }

    /// Runs the profile's setup for `revision` in its workdir.
    async fn run_setup(&self, revision: &str, cancel: &CancellationToken) -> Result<(), RunnerError> {
        let Some(setup) = &self.cfg.setup else {
            return Ok(());
        };
        info!(runner = %self.cfg.name, revision, workdir = %self.cfg.workdir.display(), "running setup");
        let cmd = self.command(setup, &[], "", revision);
        let finished = process::run(cmd, Some(self.cfg.setup_timeout), cancel, self.cfg.max_output).await;
        match finished.ending {
            Ending::Exited(0) => Ok(()),
            Ending::Cancelled => Err(RunnerError::Setup("setup cancelled".into())),
            e => Err(RunnerError::Setup(format!(
                "setup for revision '{revision}' failed ({}):\n{}",
                e.describe(Some(self.cfg.setup_timeout)),
                finished.output
            ))),
        }
    }

    /// Lists the suite's tests with the profile's list command, or for a run in the tool's own
    /// way where it has one (see [`super::Tool::list_for_run`]).
    pub async fn discover(
        &self,
        revision: &str,
        for_run: Option<&str>,
        proof: &Proof,
    ) -> Result<Vec<String>, RunnerError> {
        let cancel = CancellationToken::new();
        let ws = self
            .enter(revision, for_run.unwrap_or(""), proof.pin(), &cancel)
            .await?;
        if let Some(p) = &ws.prover {
            proof.set(p.prove().await);
        }
        let ids = ws.runner.discover_here(revision, for_run).await?;
        if let Some(p) = &ws.prover {
            proof.set(p.prove().await);
        }
        Ok(ids)
    }

    /// [`CommandRunner::discover`] in this runner's workdir as it is.
    async fn discover_here(&self, revision: &str, for_run: Option<&str>) -> Result<Vec<String>, RunnerError> {
        let limit = self.cfg.shard_timeout.unwrap_or(Duration::from_secs(3600));
        if let Some(run) = for_run
            && let Some(ids) = self.tool.list_for_run(self, revision, run, limit).await
        {
            return Ok(ids);
        }
        let Some(list) = &self.cfg.list else {
            return Err(RunnerError::Unsupported(format!(
                "runner '{}' has no list command: give the tests explicitly",
                self.cfg.name
            )));
        };
        // Only stdout lists tests; stderr (build progress and the like) is kept for errors.
        let scratch = tempfile::tempdir()
            .map_err(|e| RunnerError::Local(format!("failed to create a scratch directory: {e}")))?;
        let mut cmd = self.command(list, &[], "", revision);
        cmd.envs(self.tool.environment(scratch.path(), &self.cfg.env));
        cmd.stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        let out = match tokio::time::timeout(limit, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(RunnerError::Tool(format!(
                    "failed to start the list command: {e}"
                )));
            }
            Err(_) => {
                return Err(RunnerError::Tool(format!(
                    "listing tests timed out after {} ms",
                    limit.as_millis()
                )));
            }
        };
        if !out.status.success() && !self.tool.listing_failure_is_results(scratch.path()) {
            return Err(RunnerError::Tool(format!(
                "listing tests failed ({}):\n{}{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 2048),
                tail(&String::from_utf8_lossy(&out.stderr), 4096)
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ids = self.tool.parse_listing_in(scratch.path(), &stdout);
        Ok(ids)
    }

    /// Runs a shard in one command and sends one result per requested test. An error means
    /// the runner itself failed for the whole shard (setup, no readable results): the agent
    /// hands the shard back so its tests run again, elsewhere if possible.
    #[expect(clippy::too_many_arguments, reason = "a shard's fields and the proof")]
    pub async fn run_shard(
        &self,
        tests: &[String],
        revision: &str,
        run: &str,
        test_timeout: Duration,
        cancel: &CancellationToken,
        results: mpsc::Sender<(String, TestRun)>,
        proof: &Proof,
    ) -> Result<(), RunnerError> {
        let ws = match self.enter(revision, run, proof.pin(), cancel).await {
            Ok(ws) => ws,
            Err(RunnerError::Setup(e)) => return Err(RunnerError::Setup(join_detail(first_line(&e), e))),
            Err(e) => return Err(e),
        };
        let view = &ws.runner;
        if let Some(p) = &ws.prover {
            proof.set(p.prove().await);
        }
        let limit = view
            .cfg
            .shard_timeout
            .unwrap_or_else(|| default_shard_limit(tests.len(), test_timeout));
        // Results pass through here so that the proof is read again before each leaves: a
        // checkout moved while the tool ran is caught before its results are reported.
        let (tx, mut rx) = mpsc::channel(64);
        let shard = Shard {
            tests,
            revision,
            run,
            cancel,
            results: tx,
            test_timeout,
            limit,
        };
        let forward = async {
            let mut proved: Option<std::time::Instant> = None;
            while let Some(r) = rx.recv().await {
                if let Some(p) = &ws.prover {
                    // A HEAD is two small files; a profile's command is rate-limited.
                    let cheap = matches!(p, Prover::Head { .. });
                    if cheap || proved.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        proof.set(p.prove().await);
                        proved = Some(std::time::Instant::now());
                    }
                }
                if results.send(r).await.is_err() {
                    break;
                }
            }
        };
        let (ran, ()) = tokio::join!(view.tool.run_shard(view, shard), forward);
        ran
    }

    /// The profile's run command with `{junit}` in a directory of the shard's own; results
    /// read from the file it writes.
    pub(super) async fn run_junit_shard(&self, shard: Shard<'_>) -> Result<(), RunnerError> {
        let dir = tempfile::tempdir()
            .map_err(|e| RunnerError::Local(format!("failed to create a directory for JUnit: {e}")))?;
        let junit_path = dir.path().join("junit.xml");
        let cmd = self.command(
            &self.cfg.run,
            shard.tests,
            &junit_path.display().to_string(),
            shard.revision,
        );
        self.run_junit(cmd, junit_path, None, shard).await
    }

    /// Runs `cmd`, reads the JUnit file it writes at `junit_path` (removing `cleanup`
    /// afterwards), and sends one result per requested test.
    pub(super) async fn run_junit(
        &self,
        cmd: tokio::process::Command,
        junit_path: PathBuf,
        cleanup: Option<PathBuf>,
        shard: Shard<'_>,
    ) -> Result<(), RunnerError> {
        let finished = process::run(cmd, Some(shard.limit), shard.cancel, self.cfg.max_output).await;
        let parsed = match std::fs::read_to_string(&junit_path) {
            Ok(xml) => junit::parse(&xml).map_err(|e| e.to_string()),
            Err(e) => Err(format!("no JUnit file ({e})")),
        };
        if let Some(store) = cleanup {
            let _ = std::fs::remove_dir_all(store);
        }
        if finished.ending == Ending::Cancelled {
            return Ok(());
        }
        let cases = match parsed {
            Ok(c) => c,
            // Stopped at its limit, the tool wrote nothing: every test is missing, and a lone
            // one is the test that hung (see `deliver`).
            Err(_) if finished.ending == Ending::TimedOut => Vec::new(),
            Err(e) => {
                let detail = format!("{e}; the command ended with {}", finished.describe());
                return Err(RunnerError::Tool(join_detail(detail, finished.output.clone())));
            }
        };
        let mut by_id: HashMap<String, Case> = HashMap::with_capacity(cases.len());
        for c in cases {
            let id = self.cfg.id.id_of(&c);
            if by_id.insert(id.clone(), c).is_some() {
                warn!(runner = %self.cfg.name, test = %id, "JUnit file reports a test twice; keeping the last");
            }
        }
        let mut runs = Vec::with_capacity(shard.tests.len());
        for t in shard.tests {
            let run = match by_id.remove(t) {
                Some(c) => TestRun {
                    outcome: c.outcome,
                    duration: Duration::from_millis(c.duration_ms),
                    output: c.output,
                    detail: c.message,
                },
                None => self.missing("the JUnit file has no test case for this test", &finished, None),
            };
            runs.push((t.clone(), run));
        }
        for id in by_id.keys() {
            warn!(runner = %self.cfg.name, test = %id, "JUnit file reports a test that was not asked for; ignored");
        }
        deliver(runs, &finished, &shard.results).await
    }

    /// The shard-level error when a tool reported nothing at all.
    pub(super) fn no_tests(&self, what: &str, finished: process::Finished) -> RunnerError {
        RunnerError::Tool(join_detail(
            format!("{what}; it ended with {}", finished.describe()),
            finished.output,
        ))
    }

    /// The result of a requested test the tool said nothing about.
    pub(super) fn missing(
        &self,
        what: &str,
        finished: &process::Finished,
        output: Option<String>,
    ) -> TestRun {
        TestRun {
            outcome: Outcome::InfraError,
            duration: Duration::ZERO,
            output: output.unwrap_or_else(|| tail(&finished.output, 16 * 1024)),
            detail: format!("missing result: {what} (it ended with {})", finished.describe()),
        }
    }
}

/// Sends a shard's results, unless the tool's ending contradicts them: a tool that ended badly
/// (a non-zero exit, a signal, a timeout) while every test it reported passed or was skipped
/// failed for a reason no result explains (a test binary that is not a test harness, a crashed
/// collector, a coverage threshold), so the shard fails instead: never a green from a red tool.
pub(super) async fn deliver(
    mut runs: Vec<(String, TestRun)>,
    finished: &process::Finished,
    results: &mpsc::Sender<(String, TestRun)>,
) -> Result<(), RunnerError> {
    judge(&mut runs, finished)?;
    for run in runs {
        if results.send(run).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// What [`deliver`] checks of one tool command's results before they are sent: a test left
/// without a result when the command timed out is the one that hung, and an ending no result
/// explains fails the shard.
pub(super) fn judge(runs: &mut [(String, TestRun)], finished: &process::Finished) -> Result<(), RunnerError> {
    // A shard stopped at its limit with one test left without a result: that test hung.
    if finished.ending == Ending::TimedOut {
        let mut missing = runs.iter_mut().filter(|(_, r)| is_missing(r));
        if let (Some((_, hung)), None) = (missing.next(), missing.next()) {
            hung.outcome = Outcome::TimedOut;
            hung.detail = format!(
                "the shard {} while this test, the only one without a result, ran",
                finished.describe()
            );
        }
    }
    let explained = runs
        .iter()
        .any(|(_, r)| !matches!(r.outcome, Outcome::Passed | Outcome::Skipped));
    if !matches!(finished.ending, Ending::Exited(0)) && !explained {
        return Err(RunnerError::Tool(join_detail(
            format!(
                "the tool ended with {} though every test it reported passed or was skipped: it failed for a reason outside these tests, so they are not counted",
                finished.describe()
            ),
            finished.output.clone(),
        )));
    }
    Ok(())
}

/// Whether `r` is the placeholder of a test the tool gave no result for.
fn is_missing(r: &TestRun) -> bool {
    r.outcome == Outcome::InfraError && r.detail.starts_with("missing result")
}

/// A result a text-reporting tool gave.
pub(super) fn found(outcome: Outcome, duration: Duration, output: String) -> TestRun {
    TestRun {
        outcome,
        duration,
        detail: if outcome == Outcome::Failed {
            "test failed".into()
        } else {
            String::new()
        },
        output,
    }
}

/// A shard-level failure: the first line says what, the rest is the evidence (cut).
pub(super) fn join_detail(detail: String, output: String) -> String {
    if output.is_empty() {
        detail
    } else {
        format!("{detail}\n{}", tail(&output, 8 * 1024))
    }
}

pub(super) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

pub(super) fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn case(file: &str, classname: &str, name: &str) -> Case {
        Case {
            name: name.into(),
            classname: classname.into(),
            file: file.into(),
            duration_ms: 0,
            outcome: Outcome::Passed,
            message: String::new(),
            output: String::new(),
        }
    }

    #[test]
    fn pytest_node_ids_are_rebuilt_from_junit() {
        let id = |c: Case| IdFormat::PytestNodeId.id_of(&c);
        assert_eq!(
            id(case("test_six.py", "test_six", "test_lazy")),
            "test_six.py::test_lazy"
        );
        assert_eq!(
            id(case("tests/test_m.py", "tests.test_m.TestA.TestB", "test_x[1-2]")),
            "tests/test_m.py::TestA::TestB::test_x[1-2]"
        );
        assert_eq!(id(case("", "tests.test_m", "test_y")), "tests/test_m.py::test_y");
        assert_eq!(
            IdFormat::ClassnameDotName.id_of(&case("", "com.x.T", "a")),
            "com.x.T.a"
        );
    }

    fn script(dir: &std::path::Path, body: &str) -> String {
        let p = dir.join("tool.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    fn runner(dir: &std::path::Path, run: Vec<String>, setup: Option<Vec<String>>) -> CommandRunner {
        CommandRunner::new(Config {
            name: "t".into(),
            kind: RunnerKind::Junit,
            workdir: dir.to_owned(),
            list: None,
            run,
            env: BTreeMap::new(),
            setup,
            setup_timeout: Duration::from_secs(10),
            shard_timeout: Some(Duration::from_secs(10)),
            id: IdFormat::Name,
            max_output: 4096,
            git: None,
            revision_check: None,
        })
    }

    async fn collect(r: &CommandRunner, tests: &[&str]) -> (Vec<(String, TestRun)>, Result<(), String>) {
        collect_at(r, tests, "rev1").await
    }

    async fn collect_at(
        r: &CommandRunner,
        tests: &[&str],
        revision: &str,
    ) -> (Vec<(String, TestRun)>, Result<(), String>) {
        let (tx, mut rx) = mpsc::channel(16);
        let tests: Vec<String> = tests.iter().map(|s| s.to_string()).collect();
        let ended = r
            .run_shard(
                &tests,
                revision,
                "",
                Duration::from_secs(60),
                &CancellationToken::new(),
                tx,
                &Proof::default(),
            )
            .await;
        let mut out = Vec::new();
        while let Some(x) = rx.recv().await {
            out.push(x);
        }
        (out, ended.map_err(|e| e.to_string()))
    }

    #[tokio::test]
    async fn every_requested_test_gets_one_result_and_missing_ones_are_infra_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Writes results for a, b and an extra test; nothing for c.
        let tool = script(
            dir.path(),
            r#"out="$1"; shift
echo "args: $*"
cat > "$out" <<'XML'
<testsuite><testcase name="a" time="0.5"/><testcase name="b"><failure message="boom">trace</failure></testcase><testcase name="extra"/></testsuite>
XML
exit 1"#,
        );
        let r = runner(dir.path(), vec![tool, "{junit}".into(), "{tests}".into()], None);
        let (got, ended) = collect(&r, &["a", "b", "c"]).await;
        assert_eq!(ended, Ok(()));
        let outcomes: Vec<_> = got.iter().map(|(id, t)| (id.as_str(), t.outcome)).collect();
        assert_eq!(
            outcomes,
            vec![
                ("a", Outcome::Passed),
                ("b", Outcome::Failed),
                ("c", Outcome::InfraError)
            ]
        );
        assert_eq!(got[0].1.duration, Duration::from_millis(500));
        assert_eq!(got[1].1.detail, "boom");
        assert!(
            got[2].1.detail.starts_with("missing result"),
            "{}",
            got[2].1.detail
        );
        assert!(
            got[2].1.output.contains("args: a b c"),
            "tests are separate arguments: {}",
            got[2].1.output
        );
    }

    #[tokio::test]
    async fn no_or_bad_junit_hands_the_whole_shard_back_with_the_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let tool = script(dir.path(), "echo crashed; exit 3");
        let r = runner(dir.path(), vec![tool, "{junit}".into(), "{tests}".into()], None);
        let (got, ended) = collect(&r, &["a", "b"]).await;
        assert!(got.is_empty(), "no test is counted: {got:?}");
        let e = ended.unwrap_err();
        assert!(
            e.starts_with("no JUnit file") && e.contains("exit status 3"),
            "{e}"
        );
        assert!(e.contains("crashed"), "{e}");
        let tool = script(dir.path(), r#"echo '<testsuite><testcase name="a">' > "$1""#);
        let r = runner(dir.path(), vec![tool, "{junit}".into(), "{tests}".into()], None);
        let e = collect(&r, &["a"]).await.1.unwrap_err();
        assert!(e.contains("ends inside a <testcase>"), "{e}");
    }

    #[tokio::test]
    async fn setup_runs_once_per_revision_and_its_failure_hands_the_shard_back() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let tool = script(
            dir.path(),
            r#"echo '<testsuite><testcase name="a"/></testsuite>' > "$1""#,
        );
        let setup = vec![
            "sh".into(),
            "-c".into(),
            format!("echo x >> {}; test {{revision}} = rev1", count.display()),
        ];
        let r = runner(
            dir.path(),
            vec![tool, "{junit}".into(), "{tests}".into()],
            Some(setup),
        );
        assert_eq!(collect(&r, &["a"]).await.0[0].1.outcome, Outcome::Passed);
        assert_eq!(collect(&r, &["a"]).await.0[0].1.outcome, Outcome::Passed);
        assert_eq!(
            std::fs::read_to_string(&count).unwrap().lines().count(),
            1,
            "setup ran once for rev1"
        );
        let (got, ended) = collect_at(&r, &["a"], "rev2").await;
        assert!(got.is_empty());
        let e = ended.unwrap_err();
        assert!(
            e.starts_with("setup for revision 'rev2' failed (exit status 1)"),
            "{e}"
        );
    }
}
