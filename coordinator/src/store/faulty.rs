//! A store wrapper that fails the Nth write, for fault-injection tests of the core: every
//! message must be all-or-nothing whichever of its writes fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use shardgate_common::{AttemptId, RunId, pb};

use super::{
    AttemptRow, DeployRow, DeployState, FlakinessRow, FleetStore, GateStore, HistoryStore, OutcomeCounts,
    QuarantineRow, Reads, ResultRow, RetryState, RunFilter, RunRow, RunStore, StoreError, StoreResult,
    StoredTest, Transactions, WorkerRow,
};
use crate::scheduler::History;

/// Arms and reads a [`FaultyStore`] from outside the core that owns it.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    /// Writes made since the last [`FaultHandle::arm`].
    writes: Arc<AtomicU32>,
    /// The write that fails (1-based); 0 when disarmed.
    fail_at: Arc<AtomicU32>,
}

impl FaultHandle {
    /// Counts writes from zero again and fails the `n`th one from now (0: none fails).
    pub fn arm(&self, n: u32) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
    }

    /// Writes made since the last [`FaultHandle::arm`].
    pub fn writes(&self) -> u32 {
        self.writes.load(Ordering::SeqCst)
    }

    fn write(&self) -> StoreResult<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_at.load(Ordering::SeqCst) == n {
            return Err(StoreError::Injected(n));
        }
        Ok(())
    }
}

/// Wraps a store; every write first asks the [`FaultHandle`] whether it is the one to fail.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    faults: FaultHandle,
}

impl<S> FaultyStore<S> {
    pub fn new(inner: S) -> (Self, FaultHandle) {
        let faults = FaultHandle::default();
        (
            Self {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl<S: Transactions> Transactions for FaultyStore<S> {
    fn begin_batch(&mut self) -> StoreResult<()> {
        self.inner.begin_batch()
    }
    fn commit_batch(&mut self) -> StoreResult<()> {
        self.inner.commit_batch()
    }
    fn savepoint(&mut self) -> StoreResult<()> {
        self.inner.savepoint()
    }
    fn release(&mut self) -> StoreResult<()> {
        self.inner.release()
    }
    fn rollback(&mut self) -> StoreResult<()> {
        self.inner.rollback()
    }
}

impl<S: RunStore> RunStore for FaultyStore<S> {
    fn insert_run(&mut self, run: &RunRow, tests: &[String], staged: bool) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.insert_run(run, tests, staged)
    }
    fn add_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.add_tests(run, first_idx, tests)
    }
    fn unstage_run(&mut self, run: RunId) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.unstage_run(run)
    }
    fn delete_staged_runs(&mut self) -> StoreResult<u32> {
        self.faults.write()?;
        self.inner.delete_staged_runs()
    }
    fn prune_output(&mut self, before_ms: u64, limit: u32) -> StoreResult<u32> {
        self.faults.write()?;
        self.inner.prune_output(before_ms, limit)
    }
    fn update_run_status(&mut self, row: &RunRow) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.update_run_status(row)
    }
    fn set_tested_commit(&mut self, run: RunId, commit: &str) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.set_tested_commit(run, commit)
    }
    fn record_results(
        &mut self,
        run: RunId,
        suite: &str,
        results: &[ResultRow],
        retry: &[(u32, &RetryState)],
    ) -> StoreResult<usize> {
        self.faults.write()?;
        self.inner.record_results(run, suite, results, retry)
    }
    fn mark_quarantined(&mut self, run: RunId, suite: &str) -> StoreResult<Vec<u32>> {
        self.faults.write()?;
        self.inner.mark_quarantined(run, suite)
    }
    fn add_rollout_request(&mut self, run: RunId, authors: &[String]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.add_rollout_request(run, authors)
    }
    fn rollout_request(&self, run: RunId) -> StoreResult<Option<Vec<String>>> {
        self.inner.rollout_request(run)
    }
    fn unfinished_runs(&self) -> StoreResult<Vec<RunRow>> {
        self.inner.unfinished_runs()
    }
    fn tests(&self, run: RunId) -> StoreResult<Vec<StoredTest>> {
        self.inner.tests(run)
    }
}

impl<S: HistoryStore> HistoryStore for FaultyStore<S> {
    fn put_history(&mut self, suite: &str, entries: &[(String, History)]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.put_history(suite, entries)
    }
    fn flakiness_of(&self, suite: &str, test_id: &str) -> StoreResult<Option<FlakinessRow>> {
        self.inner.flakiness_of(suite, test_id)
    }
}

impl<S: GateStore> GateStore for FaultyStore<S> {
    fn add_quarantine(&mut self, q: &QuarantineRow) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.add_quarantine(q)
    }
    fn remove_quarantine(&mut self, suite: &str, test_id: &str) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.remove_quarantine(suite, test_id)
    }
    fn insert_deploy(&mut self, d: &DeployRow) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.insert_deploy(d)
    }
    fn update_deploy(
        &mut self,
        id: &str,
        from: DeployState,
        to: DeployState,
        at_ms: u64,
        detail: &str,
    ) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.update_deploy(id, from, to, at_ms, detail)
    }
    fn next_pending_deploy(&self) -> StoreResult<Option<DeployRow>> {
        self.inner.next_pending_deploy()
    }
    fn deploys_in(&self, state: DeployState) -> StoreResult<Vec<DeployRow>> {
        self.inner.deploys_in(state)
    }
}

impl<S: FleetStore> FleetStore for FaultyStore<S> {
    fn upsert_worker(&mut self, w: &WorkerRow) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.upsert_worker(w)
    }
    fn workers(&self) -> StoreResult<Vec<WorkerRow>> {
        self.inner.workers()
    }
    fn insert_attempt(&mut self, a: &AttemptRow) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.insert_attempt(a)
    }
    fn delete_attempt(&mut self, id: AttemptId) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.delete_attempt(id)
    }
    fn attempts(&self) -> StoreResult<Vec<AttemptRow>> {
        self.inner.attempts()
    }
    fn log_shard(&mut self, shard: &pb::ShardProgress) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.log_shard(shard)
    }
}

impl<S: Reads> Reads for FaultyStore<S> {
    fn runs_page(&self, limit: u32) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
        self.inner.runs_page(limit)
    }
    fn runs_search(&self, filter: &RunFilter) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
        self.inner.runs_search(filter)
    }
    fn runs_by_status(&self) -> StoreResult<Vec<(String, u64)>> {
        self.inner.runs_by_status()
    }
    fn shard_log(&self, run: RunId) -> StoreResult<Vec<pb::ShardProgress>> {
        self.inner.shard_log(run)
    }
    fn run_with_counts(&self, id: RunId) -> StoreResult<Option<(RunRow, OutcomeCounts)>> {
        self.inner.run_with_counts(id)
    }
    fn results(&self, run: RunId) -> StoreResult<Vec<pb::TestResult>> {
        self.inner.results(run)
    }
    fn notable_results(&self, run: RunId, limit: u32) -> StoreResult<Vec<pb::TestResult>> {
        self.inner.notable_results(run, limit)
    }
    fn deploys(&self, limit: u32) -> StoreResult<Vec<DeployRow>> {
        self.inner.deploys(limit)
    }
    fn deploy_of_run(&self, run: RunId) -> StoreResult<Option<DeployRow>> {
        self.inner.deploy_of_run(run)
    }
    fn last_started_deploy(&self) -> StoreResult<Option<DeployRow>> {
        self.inner.last_started_deploy()
    }
    fn deploys_since(&self, since_ms: u64) -> StoreResult<u32> {
        self.inner.deploys_since(since_ms)
    }
    fn quarantine(&self, suite: Option<&str>) -> StoreResult<Vec<QuarantineRow>> {
        self.inner.quarantine(suite)
    }
    fn flakiness(&self, suite: &str, limit: u32) -> StoreResult<Vec<FlakinessRow>> {
        self.inner.flakiness(suite, limit)
    }
    fn history(&self, suite: &str) -> StoreResult<HashMap<String, History>> {
        self.inner.history(suite)
    }
    fn flaky_tests(&self, suite: &str, since_ms: u64) -> StoreResult<HashSet<String>> {
        self.inner.flaky_tests(suite, since_ms)
    }
}
