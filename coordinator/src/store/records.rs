//! The records the store keeps, as the core and the read side see them: named fields and typed
//! states, never SQL rows or strings compared in several places. Every store implementation
//! speaks these.

use serde::{Deserialize, Serialize};
use shardgate_common::labels::Labels;
use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, RunnerKind, ShardId, WorkerId, pb};

use crate::model::Policy;
use crate::scheduler::History;

shardgate_common::text_enum!(
    /// Where a deploy is in its life: `pending` (the gate passed; the hook has not started),
    /// `running` (written before the hook starts), then one of the ends. A deploy that was
    /// running when the coordinator stopped is `unknown` and never run again.
    DeployState, "deploy state", {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        RolledBack => "rolled_back",
        Unknown => "unknown",
    }
);

shardgate_common::text_enum!(
    /// A worker's liveness: `live` while it calls, `lost` when it fell silent for a lease (or
    /// the coordinator restarted and has not heard from it yet), `gone` once it deregistered.
    WorkerState, "worker state", {
        Live => "live",
        Lost => "lost",
        Gone => "gone",
    }
);

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: RunId,
    pub suite: String,
    pub revision: String,
    pub requested_by: String,
    pub runner: String,
    pub labels: Labels,
    pub policy: Policy,
    pub priority: i32,
    pub discover: bool,
    pub status: RunStatus,
    pub message: String,
    pub created_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub shards: u32,
    /// The full commit hash the run's counted results were produced from, pinned by the
    /// first worker that proved one (see `policy::check_tested_commit`); empty until then.
    pub tested_commit: String,
}

/// Counted results of one run per outcome, and how many tests have none yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub total: u32,
    pub open: u32,
    /// Indexed by [`Outcome::to_wire`].
    pub done: [u32; 7],
}

impl OutcomeCounts {
    pub fn add(&mut self, outcome: Option<Outcome>, n: u32) {
        self.total += n;
        match outcome {
            None => self.open += n,
            Some(o) => self.done[o.to_wire() as usize] += n,
        }
    }

    pub fn of(&self, outcome: Outcome) -> u32 {
        self.done[outcome.to_wire() as usize]
    }
}

/// One counted result, with the test's history updated by it.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub idx: u32,
    pub test_id: String,
    pub history: History,
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub attempts: u32,
    pub worker: String,
    pub detail: String,
    pub output: String,
    /// When the result was counted.
    pub at_ms: u64,
}

/// A test's flakiness in its suite, as `shardgate flaky` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakinessRow {
    pub test_id: String,
    pub runs: u32,
    pub failures: u32,
    pub flakes: u32,
    pub flips: u32,
    pub last_flake_ms: u64,
    pub last_run_ms: u64,
}

/// A test as loaded on restart: its id and, when counted, its outcome.
#[derive(Debug, Clone)]
pub struct StoredTest {
    pub test_id: String,
    pub outcome: Option<Outcome>,
    pub retry: RetryState,
    pub quarantined: bool,
}

/// One deploy in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRow {
    pub id: String,
    pub run_id: RunId,
    pub suite: String,
    pub revision: String,
    pub requested_by: String,
    pub authors: Vec<String>,
    pub created_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub state: DeployState,
    pub detail: String,
}

/// A quarantined test of a suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    pub suite: String,
    pub test_id: String,
    pub reason: String,
    pub added_by: String,
    pub added_ms: u64,
    pub automatic: bool,
}

/// The first failure of a test that was retried: what the gate reports if it later passes.
/// Stored as a `[detail, output, worker]` triple.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "(String, String, String)", into = "(String, String, String)")]
pub struct FirstFailure {
    pub detail: String,
    pub output: String,
    pub worker: String,
}

impl From<(String, String, String)> for FirstFailure {
    fn from((detail, output, worker): (String, String, String)) -> Self {
        Self {
            detail,
            output,
            worker,
        }
    }
}

impl From<FirstFailure> for (String, String, String) {
    fn from(f: FirstFailure) -> Self {
        (f.detail, f.output, f.worker)
    }
}

/// A worker that lost a test, with the last reason. Stored as a `[worker, reason]` pair.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "(String, String)", into = "(String, String)")]
pub struct LostOn {
    pub worker: String,
    pub reason: String,
}

impl From<(String, String)> for LostOn {
    fn from((worker, reason): (String, String)) -> Self {
        Self { worker, reason }
    }
}

impl From<LostOn> for (String, String) {
    fn from(l: LostOn) -> Self {
        (l.worker, l.reason)
    }
}

/// What an open test went through in its run so far, kept so that a restarted coordinator
/// neither forgets a failure (and grants an extra retry) nor a lost worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryState {
    /// Failed runs that were retried rather than counted.
    pub failures: u32,
    /// The first retried failure.
    pub first_failure: Option<FirstFailure>,
    /// Attempts that ended without a result for this test (lease expired, no result).
    pub lost: u32,
    /// The distinct workers that lost it, with the last reason for each.
    pub lost_on: Vec<LostOn>,
    /// Workers it should not run on again while others can take it (failed or lost there).
    pub avoid: Vec<WorkerId>,
}

impl RetryState {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A live attempt as stored, so a restarted coordinator keeps the shards workers still run.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub id: AttemptId,
    pub run: RunId,
    pub worker: WorkerId,
    pub shard: ShardId,
    pub discover: bool,
    /// Indexes of the shard's tests.
    pub tests: Vec<u32>,
    pub started_ms: u64,
}

/// One runner a worker offers: its profile name and kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunnerOffer {
    pub name: String,
    pub kind: RunnerKind,
}

/// A registered worker as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: WorkerId,
    pub name: String,
    pub slots: u32,
    pub labels: Labels,
    pub runners: Vec<RunnerOffer>,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    pub state: WorkerState,
    /// The identity (token name) that registered it; empty without credentials. Only its
    /// owner may act for a worker, and so for the attempts it holds.
    pub owner: String,
}

/// A run's summary on the wire, from its row and its counts.
pub fn summary_of(row: &RunRow, counts: pb::RunCounts) -> pb::RunSummary {
    pb::RunSummary {
        run_id: row.id.to_string(),
        suite: row.suite.clone(),
        revision: row.revision.clone(),
        requested_by: row.requested_by.clone(),
        runner: row.runner.clone(),
        labels: shardgate_common::labels::to_wire(&row.labels),
        status: row.status.to_wire(),
        counts: Some(counts),
        created_at_ms: row.created_ms,
        started_at_ms: row.started_ms,
        finished_at_ms: row.finished_ms,
        message: row.message.clone(),
        discover: row.discover,
        priority: row.priority,
        shards: row.shards,
        eta_ms: 0,
        slots_busy: 0,
        tested_commit: row.tested_commit.clone(),
    }
}

impl OutcomeCounts {
    /// The wire counts of a run that is not active: nothing runs, open tests are queued.
    pub fn to_wire(&self) -> pb::RunCounts {
        pb::RunCounts {
            total: self.total,
            queued: self.open,
            running: 0,
            assigned: 0,
            passed: self.of(Outcome::Passed),
            failed: self.of(Outcome::Failed),
            skipped: self.of(Outcome::Skipped),
            flaky: self.of(Outcome::Flaky),
            timed_out: self.of(Outcome::TimedOut),
            infra_error: self.of(Outcome::InfraError),
        }
    }
}

impl DeployRow {
    pub fn to_wire(self) -> pb::Deploy {
        pb::Deploy {
            deploy_id: self.id,
            run_id: self.run_id.to_string(),
            suite: self.suite,
            revision: self.revision,
            requested_by: self.requested_by,
            authors: self.authors,
            created_at_ms: self.created_ms,
            started_at_ms: self.started_ms,
            finished_at_ms: self.finished_ms,
            state: self.state.as_str().to_owned(),
            detail: self.detail,
        }
    }
}

impl QuarantineRow {
    pub fn to_wire(self) -> pb::QuarantineEntry {
        pb::QuarantineEntry {
            suite: self.suite,
            test_id: self.test_id,
            reason: self.reason,
            added_by: self.added_by,
            added_at_ms: self.added_ms,
            automatic: self.automatic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_text() {
        for s in DeployState::ALL {
            assert_eq!(s.as_str().parse::<DeployState>().unwrap(), *s);
        }
        for s in WorkerState::ALL {
            assert_eq!(s.as_str().parse::<WorkerState>().unwrap(), *s);
        }
        assert!("bogus".parse::<DeployState>().is_err());
    }

    #[test]
    fn retry_state_keeps_its_stored_json_form() {
        // Written by earlier versions as tuples: a restart must still read them.
        let old = r#"{"failures":1,"first_failure":["exit 1","boom","w1"],"lost":1,"lost_on":[["w2","lease expired"]],"avoid":[]}"#;
        let st: RetryState = serde_json::from_str(old).unwrap();
        assert_eq!(st.first_failure.as_ref().unwrap().worker, "w1");
        assert_eq!(st.lost_on[0].reason, "lease expired");
        assert_eq!(serde_json::to_string(&st).unwrap(), old);
    }
}
