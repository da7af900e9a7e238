//! Named runners a worker offers. A runner lists a suite's tests and runs a shard, sending each
//! test's result on a channel as soon as it is known, so the agent can report it at once.

use std::collections::BTreeMap;
use std::time::Duration;

use shardgate_common::RunnerKind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::command::CommandRunner;
use crate::exec::{ExecRunner, TestRun};

#[derive(Debug, Clone)]
pub enum Runner {
    Exec(ExecRunner),
    /// pytest or any tool that writes JUnit XML, a whole shard per command.
    Command(CommandRunner),
}

impl Runner {
    pub fn kind(&self) -> RunnerKind {
        match self {
            Runner::Exec(_) => RunnerKind::Exec,
            Runner::Command(c) => c.kind(),
        }
    }

    /// The suite's tests at `revision`, in a stable order.
    pub async fn discover(&self, revision: &str) -> Result<Vec<String>, String> {
        match self {
            Runner::Command(c) => c.discover(revision).await,
            Runner::Exec(r) => {
                let r = r.clone();
                tokio::task::spawn_blocking(move || r.discover())
                    .await
                    .map_err(|e| format!("discovery task failed: {e}"))?
                    .map_err(|e| e.to_string())
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
        test_timeout: Duration,
        cancel: &CancellationToken,
        results: mpsc::Sender<(String, TestRun)>,
    ) -> Result<(), String> {
        match self {
            Runner::Command(c) => c.run_shard(tests, revision, cancel, results).await,
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
