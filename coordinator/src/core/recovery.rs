//! Opening the core on a store: known workers (lost until they call), every unfinished run
//! resumed with its counted results, retry state and the attempts workers may still run.

use std::collections::{BTreeMap, HashMap, HashSet};

use shardgate_common::{Error, Outcome, RunId};
use tracing::{info, warn};

use super::Core;
use super::runs::PlannedTests;
use super::state::{Attempt, Effects, RunState, TestSlot, WorkerEntry};
use crate::model::{CoreConfig, Now};
use crate::scheduler::RunQueue;
use crate::store::{AttemptRow, DeployState, RunRow, Store, WorkerState};

impl Core {
    /// Loads the store: known workers (as lost until they heartbeat) and every unfinished run,
    /// whose tests without a counted result go back to the queue.
    pub fn open(cfg: CoreConfig, store: impl Store + 'static, now: Now) -> Result<Self, Error> {
        Self::open_boxed(cfg, Box::new(store), now)
    }

    /// [`Core::open`] on a store chosen at run time.
    pub fn open_boxed(cfg: CoreConfig, store: Box<dyn Store>, now: Now) -> Result<Self, Error> {
        let mut core = Self {
            cfg,
            store,
            runs: BTreeMap::new(),
            workers: HashMap::new(),
            attempts: HashMap::new(),
            known_runners: BTreeMap::new(),
            known_labels: BTreeMap::new(),
            overhead_ms: HashMap::new(),
            fleet_version: 0,
            pruned_at: None,
            effects: Effects::default(),
            poisoned: None,
        };
        core.load_workers(now)?;
        // Attempts that were live when the coordinator stopped: a worker that still runs one
        // keeps it (its lease starts afresh) and reports into it.
        let mut stored_attempts: HashMap<RunId, Vec<AttemptRow>> = HashMap::new();
        for a in core.store.attempts()? {
            stored_attempts.entry(a.run).or_default().push(a);
        }
        for row in core.store.unfinished_runs()? {
            let attempts = stored_attempts.remove(&row.id).unwrap_or_default();
            core.resume_run(row, attempts, now)?;
        }
        let kept: HashSet<_> = core.attempts.keys().copied().collect();
        for a in core.store.attempts()? {
            if !kept.contains(&a.id) {
                core.store.delete_attempt(a.id)?;
            }
        }
        // A deploy whose hook was running when the coordinator stopped may or may not have
        // happened: it is shown as unknown, never run again.
        for d in core.store.deploys_in(DeployState::Running)? {
            warn!(deploy = %d.id, run = %d.run_id, "rollout was interrupted; its outcome is unknown");
            core.store.update_deploy(
                &d.id,
                DeployState::Running,
                DeployState::Unknown,
                now.ms,
                "the coordinator stopped while the rollout hook ran; not run again",
            )?;
        }
        core.effects.deploy_added = true;
        // A run whose tests were all counted before a crash but whose verdict was not written
        // gets its verdict now.
        let complete: Vec<RunId> = core
            .runs
            .values()
            .filter(|r| r.complete())
            .map(|r| r.row.id)
            .collect();
        for id in complete {
            core.atomically(|c| c.conclude(id, now))?;
        }
        core.effects.work_added = true;
        Ok(core)
    }

    fn load_workers(&mut self, now: Now) -> Result<(), Error> {
        for mut row in self.store.workers()? {
            for r in &row.runners {
                self.known_runners.insert(r.name.clone(), r.kind);
                self.known_labels
                    .entry(r.name.clone())
                    .or_default()
                    .insert(row.labels.clone());
            }
            if row.state == WorkerState::Gone {
                continue;
            }
            // Live again only when it calls.
            row.state = WorkerState::Lost;
            let runners = row.runners.iter().map(|r| (r.name.clone(), r.kind)).collect();
            self.effects.workers_changed.insert(row.id);
            self.workers.insert(
                row.id,
                WorkerEntry {
                    row,
                    runners,
                    last_seen: now.at,
                    attempts: HashSet::new(),
                    unavailable: Default::default(),
                    draining: false,
                },
            );
        }
        Ok(())
    }

    /// Rebuilds one unfinished run from the store, keeping the stored attempts whose worker is
    /// known: their tests stay with them.
    fn resume_run(&mut self, row: RunRow, attempts: Vec<AttemptRow>, now: Now) -> Result<(), Error> {
        let Some(kind) = self.known_runners.get(&row.runner).copied() else {
            warn!(run = %row.id, runner = %row.runner, "unfinished run names an unknown runner");
            return Ok(());
        };
        let stored = self.store.tests(row.id)?;
        let ids: Vec<String> = stored.iter().map(|t| t.test_id.clone()).collect();
        let (mut tests, learning) = self.plan(&row.suite, ids, row.policy, now)?;
        let plans = super::runs::plans_of(&tests);
        let mut state = RunState::new(row, kind, PlannedTests::default());
        for (t, s) in tests.iter_mut().zip(stored) {
            t.retry = s.retry;
            t.quarantined = s.quarantined;
            if let Some(o) = s.outcome {
                t.done = true;
                state.done[o.to_wire() as usize] += 1;
                if s.quarantined {
                    state.done_quarantined[o.to_wire() as usize] += 1;
                }
            }
        }
        let restored = self.restore_attempts(&mut tests, attempts);
        let open = (0..tests.len() as u32)
            .filter(|&i| !tests[i as usize].done && tests[i as usize].leased.is_none());
        let (solo, open): (Vec<u32>, Vec<u32>) = open.partition(|&i| tests[i as usize].runs_alone());
        let discovering = restored.iter().any(|(a, _)| a.discover);
        state.discover_pending = state.row.discover && tests.is_empty() && !discovering;
        state.take_plan(PlannedTests {
            queue: RunQueue::with(&plans, open),
            tests,
            learning,
        });
        state.solo = solo;
        for (a, pending) in restored {
            self.install_attempt(&mut state, a, pending, now);
        }
        info!(run = %state.row.id, queued = state.queue.len(), kept = state.live_attempts, "resumed unfinished run");
        self.effects.runs_changed.insert(state.row.id);
        self.runs.insert(state.row.id, state);
        Ok(())
    }
}

/// One test as [`DurableView`] shows it.
#[derive(Debug, PartialEq)]
pub struct DurableTest {
    pub id: String,
    pub outcome: Option<Outcome>,
    /// The retry state, as stored.
    pub retry: String,
    pub quarantined: bool,
}

impl Core {
    /// The stored attempts of a run that keep their tests: those whose worker is known, newest
    /// first (a test that failed and was handed out again belongs to its newest attempt, the
    /// one running it). Marks their tests leased; returns each with the tests it holds.
    fn restore_attempts(
        &self,
        tests: &mut [TestSlot],
        mut attempts: Vec<AttemptRow>,
    ) -> Vec<(AttemptRow, Vec<u32>)> {
        attempts.sort_by_key(|a| std::cmp::Reverse(a.id));
        let mut restored = Vec::new();
        for a in attempts {
            let in_range = a.tests.iter().all(|&i| (i as usize) < tests.len());
            if !self.workers.contains_key(&a.worker) || !in_range {
                continue;
            }
            let pending: Vec<u32> = a
                .tests
                .iter()
                .copied()
                .filter(|&i| !tests[i as usize].done && tests[i as usize].leased.is_none())
                .collect();
            for &i in &pending {
                let t = &mut tests[i as usize];
                t.leased = Some(a.id);
                t.handouts = t.handouts.max(1);
            }
            restored.push((a, pending));
        }
        restored
    }

    /// Makes a restored attempt live again, its lease starting now.
    fn install_attempt(&mut self, state: &mut RunState, a: AttemptRow, pending: Vec<u32>, now: Now) {
        state.running += pending.len() as u32;
        state.running_ms += state.estimate_ms(&pending);
        state.live_attempts += 1;
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.attempts.insert(a.id);
        }
        let lease_until = now.at + self.cfg.lease;
        let estimate_ms = state.estimate_ms(&a.tests);
        let overhead_ms = self.overhead(&state.row.runner);
        let attempt = Attempt::from_row(&a, pending, lease_until, estimate_ms, overhead_ms);
        state.outstanding.add(attempt.due_ms, a.id);
        self.attempts.insert(a.id, attempt);
    }
}

/// The durable part of the core's memory, in a form two cores can be compared by: a core after
/// any failed message must equal a core reopened from the same database.
#[derive(Debug, PartialEq)]
pub struct DurableView {
    /// Per active run: its row (without the shard count, which is written with the status),
    /// each test's outcome (or none), retry state and quarantine flag.
    pub runs: BTreeMap<RunId, (RunRow, Vec<DurableTest>)>,
    /// Live attempts and their run.
    pub attempts: BTreeMap<String, RunId>,
    /// Known workers (not gone) and their runners.
    pub workers: BTreeMap<String, Vec<String>>,
}

impl Core {
    /// See [`DurableView`].
    pub fn durable_view(&self) -> DurableView {
        let outcomes = |r: &RunState| {
            // Memory keeps counts per outcome, not per test: read the stored outcome of each
            // test that memory says is done, so a test done in memory but open on disk shows.
            let stored = self.store.tests(r.row.id).unwrap_or_default();
            r.tests
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let outcome = if t.done {
                        Some(stored.get(i).and_then(|s| s.outcome).unwrap_or(Outcome::Skipped))
                    } else {
                        None
                    };
                    DurableTest {
                        id: t.id.clone(),
                        outcome,
                        retry: serde_json::to_string(&t.retry).unwrap_or_default(),
                        quarantined: t.quarantined,
                    }
                })
                .collect()
        };
        DurableView {
            runs: self
                .runs
                .values()
                .map(|r| {
                    let mut row = r.row.clone();
                    row.shards = 0;
                    (r.row.id, (row, outcomes(r)))
                })
                .collect(),
            attempts: self
                .attempts
                .iter()
                .map(|(id, a)| (id.to_string(), a.run))
                .collect(),
            workers: self
                .workers
                .values()
                .map(|w| {
                    (
                        w.row.id.to_string(),
                        w.row.runners.iter().map(|r| r.name.clone()).collect(),
                    )
                })
                .collect(),
        }
    }
}
