//! The store seam: what the coordinator keeps durably, behind traits, so that SQLite (the
//! embedded default) and other databases can sit behind the same core.
//!
//! The writer ([`Store`]) belongs to the scheduler actor alone. It groups the writes of many
//! messages into one transaction (a *batch*) and each message's writes into a *savepoint*, so a
//! message that fails rolls back alone. The read side ([`Reads`]) serves dashboards and lists
//! from its own connections and sees only committed state.

mod codec;
#[cfg(test)]
pub(crate) mod conformance;
mod faulty;
pub mod postgres;
mod records;
pub mod sqlite;

use std::collections::{HashMap, HashSet};

pub use faulty::{FaultHandle, FaultyStore};
pub use records::{
    AttemptRow, DeployRow, DeployState, FirstFailure, FlakinessRow, LostOn, OutcomeCounts, QuarantineRow,
    ResultRow, RetryState, RunRow, RunnerOffer, StoredTest, WorkerRow, WorkerState, summary_of,
};
use shardgate_common::{AttemptId, RunId, pb};
pub use sqlite::{SqliteReader, SqliteStore};

use crate::scheduler::History;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open database '{path}': {reason}")]
    Open { path: String, reason: String },
    #[error("database '{path}' has schema version {found}, this coordinator knows {expected}")]
    Version { path: String, found: i64, expected: i64 },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt row in table {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error(
        "database '{path}' is held by another coordinator ({holder}); stop it first, or point this one at another database"
    )]
    Held { path: String, holder: String },
    #[error(
        "database file '{path}' was {what} while the coordinator ran; stopping so that no result is acknowledged that is not stored (restore the file from a backup, or start on a new one)"
    )]
    Vanished { path: String, what: &'static str },
    #[error(
        "database '{path}' failed its integrity check ({detail}); restore it from a backup, or start on a new file"
    )]
    Damaged { path: String, detail: String },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error(
        "this coordinator is no longer the leader of database '{db}': coordinator {holder} took over (epoch {newer}, ours {ours}); stopping so it alone writes"
    )]
    Fenced {
        db: String,
        holder: String,
        ours: i64,
        newer: i64,
    },
    #[error("injected store fault on write {0}")]
    Injected(u32),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Group commit and per-message savepoints.
pub trait Transactions {
    /// Starts a batch: the writes of every message until [`Transactions::commit_batch`]
    /// become durable together.
    fn begin_batch(&mut self) -> StoreResult<()>;
    /// Ends a batch; after it returns, every write of the batch is durable.
    fn commit_batch(&mut self) -> StoreResult<()>;
    /// Opens a savepoint (they nest).
    fn savepoint(&mut self) -> StoreResult<()>;
    /// Keeps the writes since the innermost open savepoint and closes it.
    fn release(&mut self) -> StoreResult<()>;
    /// Undoes the writes since the innermost open savepoint and closes it.
    fn rollback(&mut self) -> StoreResult<()>;
}

/// Runs, their tests and counted results, and their rollout requests.
pub trait RunStore {
    /// Stores a new run with its tests. A `staged` run is invisible (to restarts and to the
    /// read side) until [`RunStore::unstage_run`]; more tests may be added to it meanwhile.
    fn insert_run(&mut self, run: &RunRow, tests: &[String], staged: bool) -> StoreResult<()>;
    /// Adds tests at indexes `first_idx..` (a discovery, or the next part of a staged run).
    fn add_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> StoreResult<()>;
    /// Makes a staged run visible.
    fn unstage_run(&mut self, run: RunId) -> StoreResult<()>;
    /// Deletes every staged run with its tests; returns how many.
    fn delete_staged_runs(&mut self) -> StoreResult<u32>;
    /// Clears the captured output of at most `limit` tests of runs that finished before
    /// `before_ms` (their outcomes, details and times stay); returns how many.
    fn prune_output(&mut self, before_ms: u64, limit: u32) -> StoreResult<u32>;
    fn update_run_status(&mut self, row: &RunRow) -> StoreResult<()>;
    /// Pins the commit `run`'s counted results were produced from.
    fn set_tested_commit(&mut self, run: RunId, commit: &str) -> StoreResult<()>;
    /// Writes results, the histories they update and the retry state of tests that go round
    /// again. A test that already has an outcome is left alone, so a result is never counted
    /// twice; returns how many results were written.
    fn record_results(
        &mut self,
        run: RunId,
        suite: &str,
        results: &[ResultRow],
        retry: &[(u32, &RetryState)],
    ) -> StoreResult<usize>;
    /// Marks the tests of `run` that are quarantined in `suite` now; returns their indexes.
    fn mark_quarantined(&mut self, run: RunId, suite: &str) -> StoreResult<Vec<u32>>;
    fn add_rollout_request(&mut self, run: RunId, authors: &[String]) -> StoreResult<()>;
    /// The authors of a run that asked for a rollout; `None` when it did not ask.
    fn rollout_request(&self, run: RunId) -> StoreResult<Option<Vec<String>>>;
    /// Runs that have not reached a terminal status (staged ones aside), oldest first.
    fn unfinished_runs(&self) -> StoreResult<Vec<RunRow>>;
    /// A run's tests in submission order, with what was counted.
    fn tests(&self, run: RunId) -> StoreResult<Vec<StoredTest>>;
}

/// Per-test duration and flakiness history of each suite.
pub trait HistoryStore {
    /// Replaces the history of some tests (imports, benchmarks).
    fn put_history(&mut self, suite: &str, entries: &[(String, History)]) -> StoreResult<()>;
    fn flakiness_of(&self, suite: &str, test_id: &str) -> StoreResult<Option<FlakinessRow>>;
}

/// Quarantine and the deploy log.
pub trait GateStore {
    /// Quarantines a test of a suite (again: the newest reason wins).
    fn add_quarantine(&mut self, q: &QuarantineRow) -> StoreResult<()>;
    /// Lifts a quarantine; false when the test was not quarantined.
    fn remove_quarantine(&mut self, suite: &str, test_id: &str) -> StoreResult<bool>;
    /// Adds a deploy to the log; fails if the run already has one.
    fn insert_deploy(&mut self, d: &DeployRow) -> StoreResult<()>;
    /// Moves a deploy from state `from` to `to`; false when it was not in `from`.
    fn update_deploy(
        &mut self,
        id: &str,
        from: DeployState,
        to: DeployState,
        at_ms: u64,
        detail: &str,
    ) -> StoreResult<bool>;
    /// The oldest deploy still waiting for its hook.
    fn next_pending_deploy(&self) -> StoreResult<Option<DeployRow>>;
    /// Deploys in `state`, oldest first.
    fn deploys_in(&self, state: DeployState) -> StoreResult<Vec<DeployRow>>;
}

/// Workers and the live attempts they hold.
pub trait FleetStore {
    fn upsert_worker(&mut self, w: &WorkerRow) -> StoreResult<()>;
    fn workers(&self) -> StoreResult<Vec<WorkerRow>>;
    fn insert_attempt(&mut self, a: &AttemptRow) -> StoreResult<()>;
    fn delete_attempt(&mut self, id: AttemptId) -> StoreResult<()>;
    fn attempts(&self) -> StoreResult<Vec<AttemptRow>>;
    /// Adds an ended attempt to its run's timeline.
    fn log_shard(&mut self, shard: &pb::ShardProgress) -> StoreResult<()>;
}

/// Everything the scheduler actor needs from its database. One writer per database: the
/// implementation refuses to open a database another live coordinator holds.
pub trait Store: Transactions + RunStore + HistoryStore + GateStore + FleetStore + Reads + Send {}

impl<T: Transactions + RunStore + HistoryStore + GateStore + FleetStore + Reads + Send> Store for T {}

/// Which runs a page shows: every field set must match; `before_ms` pages back in time.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub suite: Option<String>,
    pub status: Option<String>,
    pub requested_by: Option<String>,
    /// Only runs created before this time (the `created_at_ms` of the last run of a page).
    pub before_ms: Option<u64>,
    pub limit: u32,
}

/// What the read side asks: one query per page, committed state only.
pub trait Reads {
    /// A page of runs, newest first, with their counts.
    fn runs_page(&self, limit: u32) -> StoreResult<Vec<(RunRow, OutcomeCounts)>>;
    /// A page of the runs that match `filter`, newest first, with their counts.
    fn runs_search(&self, filter: &RunFilter) -> StoreResult<Vec<(RunRow, OutcomeCounts)>>;
    /// How many stored runs are in each status.
    fn runs_by_status(&self) -> StoreResult<Vec<(String, u64)>>;
    /// The attempts of `run` that ended, oldest first.
    fn shard_log(&self, run: RunId) -> StoreResult<Vec<pb::ShardProgress>>;
    /// One run with its counts.
    fn run_with_counts(&self, id: RunId) -> StoreResult<Option<(RunRow, OutcomeCounts)>>;
    /// Every test of a run with its result, in submission order.
    fn results(&self, run: RunId) -> StoreResult<Vec<pb::TestResult>>;
    /// The counted results of `run` other than passed and skipped (failures, flakes, timeouts,
    /// infrastructure errors), at most `limit`, in submission order.
    fn notable_results(&self, run: RunId, limit: u32) -> StoreResult<Vec<pb::TestResult>>;
    /// The deploy log, newest first.
    fn deploys(&self, limit: u32) -> StoreResult<Vec<DeployRow>>;
    /// The deploy of `run`, if its passing made one (a run has at most one).
    fn deploy_of_run(&self, run: RunId) -> StoreResult<Option<DeployRow>>;
    /// The deploy that started last.
    fn last_started_deploy(&self) -> StoreResult<Option<DeployRow>>;
    /// How many deploys started at or after `since_ms`.
    fn deploys_since(&self, since_ms: u64) -> StoreResult<u32>;
    /// The quarantined tests of `suite`, or of every suite.
    fn quarantine(&self, suite: Option<&str>) -> StoreResult<Vec<QuarantineRow>>;
    /// The flakiest tests of `suite`, at most `limit`, among those with a flake or a flip.
    fn flakiness(&self, suite: &str, limit: u32) -> StoreResult<Vec<FlakinessRow>>;
    /// The duration and failure history of every test of `suite` seen so far.
    fn history(&self, suite: &str) -> StoreResult<HashMap<String, History>>;
    /// Tests of `suite` that flaked at or after `since_ms`.
    fn flaky_tests(&self, suite: &str, since_ms: u64) -> StoreResult<HashSet<String>>;
}
