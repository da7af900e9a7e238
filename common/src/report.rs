//! The JSON shape of a run and its results, shared by `shardgate run --json` and the
//! coordinator's HTTP API so that both speak the same document.

use serde::{Deserialize, Serialize};

use crate::labels;
use crate::model::{Outcome, RunStatus};
use crate::pb;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub total: u32,
    pub queued: u32,
    pub running: u32,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub flaky: u32,
    pub timed_out: u32,
    pub infra_error: u32,
    /// Handed out, waiting behind another test of its shard (`running` is one per busy slot).
    #[serde(default)]
    pub assigned: u32,
}

impl From<&pb::RunCounts> for Counts {
    fn from(c: &pb::RunCounts) -> Self {
        Self {
            total: c.total,
            queued: c.queued,
            running: c.running,
            passed: c.passed,
            failed: c.failed,
            skipped: c.skipped,
            flaky: c.flaky,
            timed_out: c.timed_out,
            infra_error: c.infra_error,
            assigned: c.assigned,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestReport {
    pub id: String,
    /// `None` while the test has no counted result yet.
    pub outcome: Option<Outcome>,
    pub duration_ms: u64,
    pub attempts: u32,
    pub worker: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub output: String,
    /// Quarantined when the run was submitted: reported, but not held against the gate.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub quarantined: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    /// `passed`, `failed`, `cancelled` or `errored` once the run ended; `None` before.
    pub verdict: Option<RunStatus>,
    pub status: RunStatus,
    pub suite: String,
    pub revision: String,
    /// The full commit hash the run's results were produced from, as its workers proved it;
    /// absent while none proved one.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub tested_commit: String,
    pub requested_by: String,
    pub runner: String,
    pub labels: labels::Labels,
    pub priority: i32,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub message: String,
    pub created_at_ms: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// Wall time from the first hand-out to the verdict.
    pub makespan_ms: u64,
    /// Shards handed out (every hand-out, retries included).
    pub shards: u32,
    pub counts: Counts,
    /// Estimated time to the last result while the run is active (0: unknown or ended).
    #[serde(default)]
    pub eta_ms: u64,
    /// Slots running the run's shards now.
    #[serde(default)]
    pub slots_busy: u32,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tests: Vec<TestReport>,
    /// The run's deploy, when the client waited for it (`--wait-rollout`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deploy: Option<DeployReport>,
}

/// How a run's rollout went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeployReport {
    pub deploy_id: String,
    /// succeeded, failed, rolled_back or unknown.
    pub state: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub detail: String,
}

impl RunReport {
    pub fn new(run: &pb::RunSummary, results: &[pb::TestResult]) -> Self {
        let status = RunStatus::from_wire(run.status).unwrap_or(RunStatus::Queued);
        Self {
            run_id: run.run_id.clone(),
            verdict: status.is_terminal().then_some(status),
            status,
            suite: run.suite.clone(),
            revision: run.revision.clone(),
            tested_commit: run.tested_commit.clone(),
            requested_by: run.requested_by.clone(),
            runner: run.runner.clone(),
            labels: run
                .labels
                .iter()
                .map(|l| (l.key.clone(), l.value.clone()))
                .collect(),
            priority: run.priority,
            message: run.message.clone(),
            created_at_ms: run.created_at_ms,
            started_at_ms: run.started_at_ms,
            finished_at_ms: run.finished_at_ms,
            makespan_ms: if run.started_at_ms > 0 && run.finished_at_ms >= run.started_at_ms {
                run.finished_at_ms - run.started_at_ms
            } else {
                0
            },
            shards: run.shards,
            counts: run.counts.as_ref().map(Counts::from).unwrap_or_default(),
            eta_ms: run.eta_ms,
            slots_busy: run.slots_busy,
            tests: results.iter().map(TestReport::from).collect(),
            deploy: None,
        }
    }
}

impl From<&pb::TestResult> for TestReport {
    fn from(r: &pb::TestResult) -> Self {
        Self {
            id: r.test_id.clone(),
            outcome: Outcome::from_wire(r.outcome),
            duration_ms: r.duration_ms,
            attempts: r.attempts,
            worker: r.worker.clone(),
            detail: r.detail.clone(),
            output: r.output.clone(),
            quarantined: r.quarantined,
        }
    }
}
