//! Runs: submission (whole, or staged in parts for large runs), cancellation, discovery, and
//! the end of a run (its verdict, its deploy, its live attempts dropped).

use std::collections::HashSet;

use shardgate_common::labels;
use shardgate_common::{Error, RunId, RunStatus, RunnerKind, pb, validate};
use tracing::{info, warn};

use super::Core;
use super::state::{AttemptKind, RunState, TestSlot};
use crate::auth::Identity;
use crate::model::{Now, Policy};
use crate::policy;
use crate::scheduler::{self, Learning, Plan, PlanOptions, RunQueue};
use crate::store::{DeployRow, DeployState, Reads, RunRow};

/// How long a flake counts as a flaky history: 30 days.
const FLAKY_MEMORY_MS: u64 = 30 * 24 * 3600 * 1000;

/// A submission checked against the coordinator's state, before its tests are looked at.
#[derive(Debug, Clone)]
pub struct PreparedRun {
    pub row: RunRow,
    pub kind: RunnerKind,
    /// Authors for the deploy log when the run asks for a rollout.
    pub rollout: Option<Vec<String>>,
}

/// A run's tests with their plans, built off the scheduler thread for large runs.
#[derive(Debug, Default)]
pub struct PlannedTests {
    pub(crate) tests: Vec<TestSlot>,
    pub(crate) queue: RunQueue,
    pub(crate) learning: Learning,
}

impl PlannedTests {
    /// Plans `ids` from the suite's duration and flakiness history as `reads` has it: each
    /// test's estimate, its retries (more for tests that flaked lately), and the queue. Runs
    /// on any thread: the scheduler's own connection or the read side's.
    pub fn plan(
        reads: &dyn Reads,
        suite: &str,
        ids: Vec<String>,
        policy: Policy,
        now: Now,
    ) -> Result<Self, Error> {
        let (tests, learning) = plan_tests(reads, suite, ids, policy, now)?;
        Ok(Self {
            queue: RunQueue::new(&plans_of(&tests)),
            tests,
            learning,
        })
    }

    /// Marks the tests at `idxs` as quarantined in the suite.
    pub(crate) fn quarantine(&mut self, idxs: &[u32]) {
        for &i in idxs {
            if let Some(t) = self.tests.get_mut(i as usize) {
                t.quarantined = true;
            }
        }
    }
}

/// Each test of `ids` with its plan and its retries, from the suite's history in `reads`, and
/// what the run is to learn about the tests with none.
fn plan_tests(
    reads: &dyn Reads,
    suite: &str,
    ids: Vec<String>,
    policy: Policy,
    now: Now,
) -> Result<(Vec<TestSlot>, Learning), Error> {
    if ids.is_empty() {
        return Ok((Vec::new(), Learning::default()));
    }
    let history = reads.history(suite)?;
    let flaky = reads.flaky_tests(suite, now.ms.saturating_sub(FLAKY_MEMORY_MS))?;
    let (plans, learning) = scheduler::plan(
        &ids,
        &history,
        PlanOptions {
            fail_first: policy.fail_first,
        },
        now.ms,
    );
    let tests = ids
        .into_iter()
        .zip(plans)
        .map(|(id, p)| {
            let hist = history.get(&id).copied();
            let mut t = TestSlot::new(id, p, hist.as_ref());
            t.retries = policy.retries_for(flaky.contains(&t.id));
            t
        })
        .collect();
    Ok((tests, learning))
}

pub(crate) fn plans_of(tests: &[TestSlot]) -> Vec<Plan> {
    tests.iter().map(|t| t.plan).collect()
}

/// How an active run ends, decided before anything is written.
#[derive(Debug)]
pub(crate) struct Ending {
    pub run: RunId,
    pub row: RunRow,
    pub deploy: Option<DeployRow>,
}

impl Core {
    /// Plans a run's tests from its suite's history as the store has it now.
    pub(crate) fn plan(
        &self,
        suite: &str,
        ids: Vec<String>,
        policy: Policy,
        now: Now,
    ) -> Result<(Vec<TestSlot>, Learning), Error> {
        plan_tests(self.store.as_ref(), suite, ids, policy, now)
    }

    /// Checks a submission's fields (all but its test list) and resolves its runner and policy.
    /// Changes nothing.
    pub fn prepare_run(
        &self,
        req: &pb::SubmitRunRequest,
        tests: usize,
        now: Now,
    ) -> Result<PreparedRun, Error> {
        validate::name("suite", &req.suite, true)?;
        validate::name("revision", &req.revision, true)?;
        validate::name("requested_by", &req.requested_by, false)?;
        validate::name("runner", &req.runner, true)?;
        let labels = labels::from_wire("labels", &req.labels)?;
        let kind = *self.known_runners.get(&req.runner).ok_or_else(|| {
            let known: Vec<&str> = self.known_runners.keys().map(String::as_str).collect();
            Error::invalid(
                "runner",
                format!(
                    "unknown runner '{}': no worker has registered it (known runners: {})",
                    req.runner,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;
        // Labels no worker offering the runner ever carried: the run would wait forever.
        if let Some(sets) = self.known_labels.get(&req.runner)
            && !sets.iter().any(|l| labels::satisfies(l, &labels))
        {
            let carried: Vec<String> = sets
                .iter()
                .map(|l| match labels::to_text(l) {
                    t if t.is_empty() => "(none)".to_owned(),
                    t => t,
                })
                .collect();
            return Err(Error::invalid(
                "labels",
                format!(
                    "no known worker offering runner '{}' carries labels {}; their labels: {}",
                    req.runner,
                    labels::to_text(&labels),
                    carried.join("; ")
                ),
            ));
        }
        if req.discover && !req.tests.is_empty() {
            return Err(Error::invalid(
                "tests",
                "give either a test list or discover, not both",
            ));
        }
        let rollout = self.check_rollout(req)?;
        self.check_requester_load(&req.requested_by, tests)?;
        Ok(PreparedRun {
            row: RunRow {
                id: RunId::new(),
                suite: req.suite.clone(),
                revision: req.revision.clone(),
                requested_by: req.requested_by.clone(),
                runner: req.runner.clone(),
                labels,
                policy: Policy::resolve(req.policy.as_ref(), &self.cfg)?,
                priority: req.priority,
                discover: req.discover,
                status: RunStatus::Queued,
                message: String::new(),
                created_ms: now.ms,
                started_ms: 0,
                finished_ms: 0,
                shards: 0,
                tested_commit: String::new(),
            },
            kind,
            rollout,
        })
    }

    /// Refuses a submission that would take `requester` past its share: active runs, or tests
    /// without a result across them.
    fn check_requester_load(&self, requester: &str, tests: usize) -> Result<(), Error> {
        let (mut runs, mut open) = (0usize, 0usize);
        for r in self.runs.values().filter(|r| r.row.requested_by == requester) {
            runs += 1;
            open += r.tests.len() - r.done_total() as usize;
        }
        let who = if requester.is_empty() {
            "anonymous"
        } else {
            requester
        };
        if runs >= self.cfg.max_active_runs_per_requester {
            return Err(Error::ResourceExhausted(format!(
                "'{who}' has {runs} active runs, at most {} allowed: wait for one to end, or cancel one",
                self.cfg.max_active_runs_per_requester
            )));
        }
        if open + tests > self.cfg.max_open_tests_per_requester {
            return Err(Error::ResourceExhausted(format!(
                "'{who}' would have {} tests without a result across its active runs, at most {} allowed",
                open + tests,
                self.cfg.max_open_tests_per_requester
            )));
        }
        Ok(())
    }

    /// The authors for the deploy log of a run that asks for a rollout (`None` when it does
    /// not), refused when this coordinator has no rollout hook.
    fn check_rollout(&self, req: &pb::SubmitRunRequest) -> Result<Option<Vec<String>>, Error> {
        if !req.rollout && req.authors.is_empty() {
            return Ok(None);
        }
        if !req.rollout {
            return Err(Error::invalid(
                "authors",
                "authors are for the deploy log: ask for a rollout too",
            ));
        }
        if !self.cfg.rollout_configured {
            return Err(Error::invalid(
                "rollout",
                "this coordinator has no rollout hook (start it with --rollout-command or --rollout-url)",
            ));
        }
        if req.authors.len() > 100 || req.authors.iter().any(|a| a.trim().is_empty() || a.len() > 256) {
            return Err(Error::invalid(
                "authors",
                "at most 100 authors, each non-empty and at most 256 bytes",
            ));
        }
        Ok(Some(req.authors.clone()))
    }

    /// Submits a run in one message: checks, plans, stores and queues it.
    pub fn submit(&mut self, req: pb::SubmitRunRequest, now: Now) -> Result<pb::RunSummary, Error> {
        self.atomically(|c| {
            let prepared = c.prepare_run(&req, req.tests.len(), now)?;
            if !req.discover {
                validate::test_list(prepared.kind, &req.tests)?;
            }
            c.stage_run(&prepared, &req.tests)?;
            let planned = PlannedTests::plan(
                c.store.as_ref(),
                &prepared.row.suite,
                req.tests,
                prepared.row.policy,
                now,
            )?;
            c.activate_run(prepared, planned)
        })
    }

    /// Writes a run (staged: invisible until [`Core::activate_run`]) with its first tests, and
    /// its rollout request.
    pub fn stage_run(&mut self, run: &PreparedRun, first: &[String]) -> Result<(), Error> {
        self.atomically(|c| {
            c.store.insert_run(&run.row, first, true)?;
            if let Some(authors) = &run.rollout {
                c.store.add_rollout_request(run.row.id, authors)?;
            }
            Ok(())
        })
    }

    /// Writes the next part of a staged run's tests.
    pub fn stage_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> Result<(), Error> {
        self.atomically(|c| Ok(c.store.add_tests(run, first_idx, tests)?))
    }

    /// Makes a staged run visible and queues its planned tests.
    pub fn activate_run(&mut self, run: PreparedRun, planned: PlannedTests) -> Result<pb::RunSummary, Error> {
        self.atomically(|c| {
            c.store.unstage_run(run.row.id)?;
            let quarantined = c.store.mark_quarantined(run.row.id, &run.row.suite)?;
            // Applied only now that every write succeeded.
            let mut planned = planned;
            planned.quarantine(&quarantined);
            let state = RunState::new(run.row, run.kind, planned);
            let summary = state.summary();
            info!(run = %state.row.id, suite = %state.row.suite, tests = state.tests.len(), "run submitted");
            c.effects.runs_changed.insert(state.row.id);
            c.runs.insert(state.row.id, state);
            c.effects.work_added = true;
            c.effects
                .events
                .push(pb::run_event::Event::Progress(summary.clone()));
            Ok(summary)
        })
    }

    /// Cancels a run for `who`: a trigger may cancel only the runs it submitted; the actor is
    /// recorded in the run's message.
    pub fn cancel_as(
        &mut self,
        run: RunId,
        reason: &str,
        who: &Identity,
        now: Now,
    ) -> Result<pb::RunSummary, Error> {
        validate::text("reason", reason, validate::MAX_REASON_LEN, false)?;
        if who.known() && who.role != shardgate_common::auth::Role::Admin {
            let owner = match self.runs.get(&run) {
                Some(r) => r.row.requested_by.clone(),
                None => self
                    .store
                    .run_with_counts(run)?
                    .map(|(row, _)| row.requested_by)
                    .ok_or_else(|| Error::not_found("run", run))?,
            };
            if owner != who.name {
                return Err(Error::PermissionDenied(format!(
                    "run '{run}' was submitted by '{owner}'; '{}' may cancel only its own runs",
                    who.name
                )));
            }
        }
        let reason = if who.known() {
            format!(
                "by {}{}{}",
                who.name,
                if reason.is_empty() { "" } else { ": " },
                reason
            )
        } else {
            reason.to_owned()
        };
        self.cancel(run, &reason, now)
    }

    pub fn cancel(&mut self, run: RunId, reason: &str, now: Now) -> Result<pb::RunSummary, Error> {
        self.atomically(|c| {
            if !c.runs.contains_key(&run) {
                let (row, _) = c
                    .store
                    .run_with_counts(run)?
                    .ok_or_else(|| Error::not_found("run", run))?;
                return Err(Error::FailedPrecondition(format!(
                    "run '{run}' already ended ({})",
                    row.status
                )));
            }
            let message = if reason.is_empty() {
                "cancelled".to_owned()
            } else {
                format!("cancelled: {reason}")
            };
            let ending = c.decide_end(run, RunStatus::Cancelled, message, now)?;
            c.write_end(&ending)?;
            Ok(c.apply_end(ending))
        })
    }

    /// Takes the test list a discovery attempt found.
    pub fn discovery(
        &mut self,
        worker: shardgate_common::WorkerId,
        attempt_id: shardgate_common::AttemptId,
        tests: Vec<String>,
        error: &str,
        now: Now,
    ) -> Result<(), Error> {
        self.discovery_proven(worker, attempt_id, tests, error, "", now)
    }

    /// [`Core::discovery`] of a listing the worker says ran on commit `tested` (empty: it
    /// cannot tell); a commit that is not the run's revision ends the attempt as a runner
    /// failure (the discovery goes round again, elsewhere), and the first proof pins it.
    pub fn discovery_proven(
        &mut self,
        worker: shardgate_common::WorkerId,
        attempt_id: shardgate_common::AttemptId,
        tests: Vec<String>,
        error: &str,
        tested: &str,
        now: Now,
    ) -> Result<(), Error> {
        self.atomically(|c| c.discovery_inner(worker, attempt_id, tests, error, tested, now))
    }

    fn discovery_inner(
        &mut self,
        worker: shardgate_common::WorkerId,
        attempt_id: shardgate_common::AttemptId,
        tests: Vec<String>,
        error: &str,
        tested: &str,
        now: Now,
    ) -> Result<(), Error> {
        let attempt = self.live_attempt(worker, attempt_id)?;
        if attempt.kind != AttemptKind::Discover {
            return Err(Error::FailedPrecondition(format!(
                "attempt '{attempt_id}' is not a discovery"
            )));
        }
        let run_id = attempt.run;
        let worker_name = self.worker_name(worker);
        let (kind, suite, policy) = self
            .runs
            .get(&run_id)
            .map(|r| (r.kind, r.row.suite.clone(), r.row.policy))
            .ok_or_else(|| Error::FailedPrecondition(format!("run '{run_id}' ended")))?;
        // Decide.
        let pin = match self.check_commit(run_id, tested) {
            Ok(pin) => pin,
            Err(why) => {
                self.end_attempt_by_worker(worker, attempt_id, &why, false, now)?;
                return Ok(());
            }
        };
        let failure = if !error.is_empty() {
            Some(format!(
                "discovery failed on worker {worker_name}: {}",
                super::state::cap(error, 4096)
            ))
        } else if tests.is_empty() {
            Some(format!("discovery on worker {worker_name} found no tests"))
        } else {
            validate::test_list(kind, &tests)
                .err()
                .map(|e| format!("discovery on worker {worker_name} returned a bad test list: {e}"))
        };
        if let Some(message) = failure {
            warn!(run = %run_id, %message, "discovery failed");
            let ending = self.decide_end(run_id, RunStatus::Errored, message, now)?;
            self.write_end(&ending)?;
            self.apply_end(ending);
            return Ok(());
        }
        // Write.
        if let Some(p) = &pin {
            self.store.set_tested_commit(run_id, p)?;
        }
        self.write_attempt_gone(attempt_id, "finished", now.ms)?;
        self.store.add_tests(run_id, 0, &tests)?;
        let quarantined = self.store.mark_quarantined(run_id, &suite)?;
        let mut planned = PlannedTests::plan(self.store.as_ref(), &suite, tests, policy, now)?;
        // Apply.
        self.apply_pin(run_id, pin);
        self.forget_attempt(attempt_id);
        planned.quarantine(&quarantined);
        let run = self.runs.get_mut(&run_id).expect("checked above");
        run.take_plan(planned);
        info!(run = %run_id, tests = run.tests.len(), worker = %worker_name, "tests discovered");
        self.effects
            .events
            .push(pb::run_event::Event::Progress(run.summary()));
        self.effects.runs_changed.insert(run_id);
        self.effects.work_added = true;
        Ok(())
    }

    /// The end of a run whose every test has a counted result: `status` is its verdict, and a
    /// passed run that asked for a rollout gets its deploy.
    pub(crate) fn decide_verdict(&self, run: RunId, status: RunStatus, now: Now) -> Result<Ending, Error> {
        let mut ending = self.decide_end(run, status, String::new(), now)?;
        if status == RunStatus::Passed
            && let Some(authors) = self.store.rollout_request(run)?
        {
            // Stored with the verdict, in the same message: a passed gate that asked for a
            // rollout always has its deploy, and the schema allows one per run.
            let r = &self.runs[&run];
            ending.deploy = Some(DeployRow {
                id: uuid::Uuid::now_v7().to_string(),
                run_id: run,
                suite: r.row.suite.clone(),
                revision: r.row.revision.clone(),
                requested_by: r.row.requested_by.clone(),
                authors,
                created_ms: now.ms,
                started_ms: 0,
                finished_ms: 0,
                state: DeployState::Pending,
                detail: String::new(),
            });
        }
        Ok(ending)
    }

    /// All tests of `run` have a counted result: write the verdict.
    pub(crate) fn conclude(&mut self, run: RunId, now: Now) -> Result<(), Error> {
        let r = &self.runs[&run];
        let status = policy::verdict(r.row.policy.strict_flaky, |o| r.reds(o));
        let ending = self.decide_verdict(run, status, now)?;
        self.write_end(&ending)?;
        self.apply_end(ending);
        Ok(())
    }

    /// The row an active run ends with.
    pub(crate) fn decide_end(
        &self,
        run: RunId,
        status: RunStatus,
        message: String,
        now: Now,
    ) -> Result<Ending, Error> {
        debug_assert!(status.is_terminal());
        let r = self.runs.get(&run).ok_or_else(|| Error::not_found("run", run))?;
        let mut row = r.row.clone();
        row.status = status;
        row.message = message;
        if row.started_ms == 0 {
            row.started_ms = now.ms;
        }
        row.finished_ms = now.ms;
        Ok(Ending {
            run,
            row,
            deploy: None,
        })
    }

    /// Writes a run's end: its status, its deploy, and the removal of its live attempts.
    pub(crate) fn write_end(&mut self, ending: &Ending) -> Result<(), Error> {
        self.write_end_after(ending, &HashSet::new())
    }

    /// [`Core::write_end`] of a run that ends on results of the same message, not applied
    /// yet: `counted`, the indexes of the tests they count, are done in its attempts' timeline
    /// entries.
    pub(crate) fn write_end_after(&mut self, ending: &Ending, counted: &HashSet<u32>) -> Result<(), Error> {
        self.store.update_run_status(&ending.row)?;
        if let Some(d) = &ending.deploy {
            self.store.insert_deploy(d)?;
        }
        for id in self.attempts_of(ending.run) {
            // An attempt whose every test has its result only had its finish call to make.
            let left = self.attempts[&id].pending.iter().any(|i| !counted.contains(i));
            let state = if left { "run ended" } else { "finished" };
            self.write_attempt_gone_after(id, state, ending.row.finished_ms, counted)?;
        }
        Ok(())
    }

    /// The live attempts of `run`.
    fn attempts_of(&self, run: RunId) -> Vec<shardgate_common::AttemptId> {
        self.attempts
            .iter()
            .filter(|(_, a)| a.run == run)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Moves an active run to its terminal status in memory and drops its live attempts (their
    /// workers are told to stop at their next heartbeat or report).
    pub(crate) fn apply_end(&mut self, ending: Ending) -> pb::RunSummary {
        let Ending { run, row, deploy } = ending;
        for id in self.attempts_of(run) {
            self.forget_attempt(id);
        }
        let mut r = self.runs.remove(&run).expect("decided on an active run");
        let status = row.status;
        r.row = row;
        let mut summary = r.summary();
        // Tests that were running when the run ended are no longer running.
        if let Some(c) = summary.counts.as_mut() {
            c.queued += c.running + c.assigned;
            c.running = 0;
            c.assigned = 0;
        }
        summary.eta_ms = 0;
        summary.slots_busy = 0;
        if let Some(d) = deploy {
            info!(run = %run, deploy = %d.id, "gate passed: rollout queued");
            self.effects.deploy_added = true;
        }
        info!(run = %run, status = %status, "run ended");
        self.effects.runs_changed.insert(run);
        self.effects
            .events
            .push(pb::run_event::Event::Finished(summary.clone()));
        summary
    }
}
