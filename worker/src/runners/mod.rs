//! The runners a worker offers, one module per tool:
//!
//! - `exec`: each test an executable file, run on its own.
//! - `pytest`, `nextest`, `cargo_test`, `go_test`, `junit`: batch tools, a whole shard in one
//!   command, through the machinery in `batch` (profiles, setup once per revision, listing,
//!   every requested test given exactly one result).
//!
//! A batch tool is a [`Tool`]: how its profile is checked and completed, how its listing is
//! read, and (when it is not "write JUnit XML") how a shard runs. Adding a runner kind is its
//! own file, a `RunnerKind` in `shardgate-common` (with its test-id rule), and one line in
//! [`tool`].

mod batch;
mod cargo_test;
pub mod exec;
mod go_test;
mod junit;
mod nextest;
mod nextest_direct;
mod pytest;
mod pytest_warm;
pub mod workspace;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use batch::{CommandRunner, Config, IdFormat};
pub use exec::ExecRunner;
pub use nextest_direct::record_start_if_asked;
use shardgate_common::{Outcome, RunnerKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The result of one test, before it is put on the wire.
#[derive(Debug, Clone)]
pub struct TestRun {
    pub outcome: Outcome,
    pub duration: Duration,
    pub output: String,
    pub detail: String,
}

/// Why a runner failed for a whole shard or a discovery (its tests are handed back, not
/// counted). The text is what the coordinator records: the first line says what, the rest is
/// the evidence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    /// The profile's setup failed for the revision.
    #[error("{0}")]
    Setup(String),
    /// The tool could not be started, failed, or reported nothing readable.
    #[error("{0}")]
    Tool(String),
    /// Something of the worker's own failed (a temporary directory, a file, a task).
    #[error("{0}")]
    Local(String),
    /// The runner cannot do what was asked (a discovery without a list command).
    #[error("{0}")]
    Unsupported(String),
    /// The runner's repository does not have the revision (or it is no revision at all): no
    /// worker with this source can test it.
    #[error("{0}")]
    UnknownRevision(String),
}

/// The commit an attempt's results were produced from, as its runner proved it: set by the
/// runner (before a shard starts, and again as its results leave), read by the agent for every
/// report. Empty when the runner cannot prove one.
#[derive(Debug, Clone, Default)]
pub struct Proof(std::sync::Arc<std::sync::Mutex<String>>, Option<String>);

impl Proof {
    /// The proof of an attempt of a run the coordinator pinned to `commit` (empty: not yet):
    /// a runner that checks revisions out itself tests that commit.
    pub fn pinned(commit: &str) -> Self {
        Self(
            Default::default(),
            (!commit.is_empty()).then(|| commit.to_owned()),
        )
    }

    /// The commit the run is pinned to, if it is.
    pub fn pin(&self) -> Option<&str> {
        self.1.as_deref()
    }

    pub fn set(&self, commit: String) {
        *self.0.lock().expect("proof lock") = commit;
    }

    pub fn get(&self) -> String {
        self.0.lock().expect("proof lock").clone()
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The commands of a batch profile once its tool checked and completed it.
#[derive(Debug, Clone)]
pub struct Commands {
    pub list: Option<Vec<String>>,
    pub run: Vec<String>,
    pub id: IdFormat,
}

/// What a profile says of a batch tool's commands, before the tool fills in its defaults.
#[derive(Debug, Clone, Copy)]
pub struct ToolSpec<'a> {
    pub list: Option<&'a Vec<String>>,
    pub run: Option<&'a Vec<String>>,
    pub id: Option<IdFormat>,
}

/// One batch tool.
pub trait Tool: Sync + std::fmt::Debug {
    /// Checks a profile's commands for this tool and fills in its defaults.
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String>;

    /// Whether the run command must write JUnit XML to `{junit}`.
    fn writes_junit(&self) -> bool {
        true
    }

    /// The test ids in the list command's standard output.
    fn parse_listing(&self, stdout: &str) -> Vec<String> {
        stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Environment for one of the tool's commands, given a scratch directory of that command's
    /// own and the profile's environment.
    fn environment(
        &self,
        _scratch: &std::path::Path,
        _base: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The test ids a listing found: from what it left in its scratch directory, or its
    /// standard output.
    fn parse_listing_in(&self, _scratch: &std::path::Path, stdout: &str) -> Vec<String> {
        self.parse_listing(stdout)
    }

    /// Whether a listing that exited non-zero still stands, from what it left in its scratch
    /// directory (pytest: modules that failed to collect are tests of their own).
    fn listing_failure_is_results(&self, _scratch: &std::path::Path) -> bool {
        false
    }

    /// Lists the suite for run `run` in a way of the tool's own, or `None` for the profile's
    /// list command (the default). pytest lists from a warm pytest that then serves the run.
    fn list_for_run<'a>(
        &'a self,
        _runner: &'a CommandRunner,
        _revision: &'a str,
        _run: &'a str,
        _limit: std::time::Duration,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async { None })
    }

    /// Runs one shard after the setup, sending one result per requested test. By default: the
    /// profile's run command, results read from the JUnit XML it writes.
    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: batch::Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(runner.run_junit_shard(shard))
    }
}

/// The batch tool of each kind; `None` for `exec`, which runs test by test.
pub fn tool(kind: RunnerKind) -> Option<&'static dyn Tool> {
    match kind {
        RunnerKind::Exec => None,
        RunnerKind::Pytest => Some(&pytest::Pytest),
        RunnerKind::Nextest => Some(&nextest::Nextest),
        RunnerKind::CargoTest => Some(&cargo_test::CargoTest),
        RunnerKind::GoTest => Some(&go_test::GoTest),
        RunnerKind::Junit => Some(&junit::Junit),
    }
}

#[derive(Debug, Clone)]
pub enum Runner {
    Exec(ExecRunner),
    /// A batch tool, a whole shard per command.
    Command(Box<CommandRunner>),
}

impl Runner {
    pub fn kind(&self) -> RunnerKind {
        match self {
            Runner::Exec(_) => RunnerKind::Exec,
            Runner::Command(c) => c.kind(),
        }
    }

    /// The suite's tests at `revision`, in a stable order.
    pub async fn discover(&self, revision: &str) -> Result<Vec<String>, RunnerError> {
        self.discover_for(revision, None, &Proof::default()).await
    }

    /// The suite's tests for a run's discovery shard: as [`Runner::discover`], but a runner
    /// that keeps warm processes (pytest) lists from one that then serves the run's shards;
    /// `proof` gets the commit the listing ran on.
    pub async fn discover_for_run(
        &self,
        revision: &str,
        run: &str,
        proof: &Proof,
    ) -> Result<Vec<String>, RunnerError> {
        self.discover_for(revision, Some(run), proof).await
    }

    async fn discover_for(
        &self,
        revision: &str,
        run: Option<&str>,
        proof: &Proof,
    ) -> Result<Vec<String>, RunnerError> {
        match self {
            Runner::Command(c) => c.discover(revision, run, proof).await,
            Runner::Exec(r) => {
                let r = r.clone();
                tokio::task::spawn_blocking(move || r.discover())
                    .await
                    .map_err(|e| RunnerError::Local(format!("discovery task failed: {e}")))?
                    .map_err(|e| RunnerError::Local(e.to_string()))
            }
        }
    }

    /// Runs `tests` in order, sending each result as it finishes. Stops early when `cancel`
    /// fires or the receiver is gone. An error is a failure of the runner for the whole shard
    /// (its tests are handed back), not of a test.
    pub async fn run_shard(
        &self,
        tests: &[String],
        revision: &str,
        run: &str,
        test_timeout: Duration,
        cancel: &CancellationToken,
        results: mpsc::Sender<(String, TestRun)>,
    ) -> Result<(), RunnerError> {
        self.run_shard_proven(
            tests,
            revision,
            run,
            test_timeout,
            cancel,
            results,
            &Proof::default(),
        )
        .await
    }

    /// [`Runner::run_shard`], with `proof` kept up to date with the commit the shard runs.
    #[expect(clippy::too_many_arguments, reason = "run_shard's arguments and the proof")]
    pub async fn run_shard_proven(
        &self,
        tests: &[String],
        revision: &str,
        run: &str,
        test_timeout: Duration,
        cancel: &CancellationToken,
        results: mpsc::Sender<(String, TestRun)>,
        proof: &Proof,
    ) -> Result<(), RunnerError> {
        match self {
            Runner::Command(c) => {
                c.run_shard(tests, revision, run, test_timeout, cancel, results, proof)
                    .await
            }
            Runner::Exec(r) => {
                for id in tests {
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    let run = r.run_test(id, test_timeout, cancel).await;
                    if cancel.is_cancelled() || results.send((id.clone(), run)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            }
        }
    }
}

/// The runners of one worker, by name.
pub type Runners = BTreeMap<String, Runner>;
