//! Attempts: forming and handing out a shard, counting reported results, finishing an
//! attempt, and lease expiry. Each is one message shaped decide → write → apply.

use std::collections::HashSet;

use shardgate_common::{AttemptId, Error, Outcome, RunId, RunStatus, ShardId, WorkerId, pb};
use tracing::{info, warn};

use super::Core;
use super::runs::Ending;
use super::state::{Attempt, AttemptKind, RequeueReason, RunState, Tally, TestSlot, cap};
use crate::model::Now;
use crate::policy::{self, Classified};
use crate::scheduler::ShardContext;
use crate::store::{AttemptRow, FirstFailure, LostOn, QuarantineRow, ResultRow, RetryState, WorkerState};

/// What ending an attempt does, decided before anything is written.
#[derive(Debug)]
pub(crate) struct EndPlan {
    attempt: AttemptId,
    run: Option<RunId>,
    kind: AttemptKind,
    /// The attempt's tests without a result.
    pending: Vec<u32>,
    /// Tests given up as infrastructure errors.
    give_up: Vec<ResultRow>,
    /// New retry state of the tests that go back.
    states: Vec<(u32, RetryState)>,
    /// The run ends with this attempt (its last tests given up, or its discovery gave up).
    ending: Option<Ending>,
    reason: RequeueReason,
}

/// What becomes of a test whose attempt ended without its result.
enum Lost {
    /// It goes back, with this retry state.
    Back(RetryState),
    /// It has lost too many workers: this infrastructure error is its result.
    GivenUp(ResultRow),
}

/// Test `idx` lost its attempt on `worker` (named `lost_on`) for `reason`.
fn lose(
    t: &TestSlot,
    idx: u32,
    worker: WorkerId,
    lost_on: &str,
    reason: &RequeueReason,
    max: u32,
    now: Now,
) -> Lost {
    let mut st = t.retry.clone();
    st.lost += 1;
    match st.lost_on.iter_mut().find(|l| l.worker == lost_on) {
        Some(l) => l.reason = reason.describe(),
        None => st.lost_on.push(LostOn {
            worker: lost_on.to_owned(),
            reason: reason.describe(),
        }),
    }
    if !st.avoid.contains(&worker) {
        st.avoid.push(worker);
    }
    if !policy::gives_up(&st, max) {
        return Lost::Back(st);
    }
    let evidence: Vec<&str> = st.lost_on.iter().map(|l| l.reason.as_str()).collect();
    Lost::GivenUp(ResultRow {
        idx,
        test_id: t.id.clone(),
        history: t.hist,
        outcome: Outcome::InfraError,
        duration_ms: 0,
        attempts: t.handouts,
        worker: String::new(),
        detail: format!(
            "no result after {} lost attempts on {} worker(s); it may take its worker down: {}",
            st.lost,
            st.lost_on.len(),
            evidence.join("; ")
        ),
        output: String::new(),
        at_ms: now.ms,
    })
}

/// What a report does, decided before anything is written.
#[derive(Debug)]
struct ReportPlan {
    run: RunId,
    /// Results counted now.
    rows: Vec<ResultRow>,
    /// Failed tests that go round again, with their new retry state.
    retried: Vec<(u32, RetryState)>,
    /// Flaky tests to quarantine automatically.
    quarantine: Vec<QuarantineRow>,
    ending: Option<Ending>,
}

impl Core {
    /// Forms a shard for `worker` from the run that most deserves a free slot, or `None` when
    /// no run this worker may take has work.
    pub fn acquire(&mut self, worker: WorkerId, now: Now) -> Result<Option<pb::Shard>, Error> {
        self.atomically(|c| c.acquire_inner(worker, now))
    }

    fn acquire_inner(&mut self, worker: WorkerId, now: Now) -> Result<Option<pb::Shard>, Error> {
        let w = self
            .workers
            .get(&worker)
            .ok_or_else(|| Error::not_found("worker", worker))?;
        if w.row.state == WorkerState::Gone {
            return Err(Error::FailedPrecondition(format!(
                "worker '{worker}' deregistered"
            )));
        }
        let full = w.attempts.len() as u32 >= w.row.slots;
        let revived = self.write_touch(worker, now)?;
        if full {
            self.apply_touch(worker, revived, now);
            return Ok(None);
        }
        let Some(run_id) = self.pick_run(worker) else {
            self.apply_touch(worker, revived, now);
            return Ok(None);
        };
        let fleet_slots = self.eligible_slots(run_id);
        let overhead_ms = self.overhead(&self.runs[&run_id].row.runner);
        let solo = self.solo_for(&self.runs[&run_id], worker);
        // Take the shard's tests from the queue; put them back if a write fails.
        let (kind, tests) = self.take_shard(run_id, solo, fleet_slots, overhead_ms);
        let run = &self.runs[&run_id];
        let attempt = AttemptRow {
            id: AttemptId::new(),
            run: run_id,
            worker,
            shard: ShardId::new(),
            discover: kind == AttemptKind::Discover,
            tests,
            started_ms: now.ms,
        };
        let started = (run.row.status == RunStatus::Queued).then(|| {
            let mut row = run.row.clone();
            row.status = RunStatus::Running;
            row.started_ms = now.ms;
            row
        });
        let written = match &started {
            Some(row) => self.store.update_run_status(row).map_err(Error::from),
            None => Ok(()),
        }
        .and_then(|()| Ok(self.store.insert_attempt(&attempt)?));
        if let Err(e) = written {
            self.put_back(run_id, kind, solo, &attempt.tests);
            return Err(e);
        }
        self.apply_touch(worker, revived, now);
        Ok(Some(self.apply_handout(attempt, kind, started, now)))
    }

    /// Takes a shard's tests from `run_id`'s queue: its discovery, the solo test at `solo`, or
    /// a batch sized for the work left.
    fn take_shard(
        &mut self,
        run_id: RunId,
        solo: Option<usize>,
        slots: usize,
        overhead_ms: f64,
    ) -> (AttemptKind, Vec<u32>) {
        let run = self.runs.get_mut(&run_id).expect("picked from the map");
        if run.discover_pending {
            run.discover_pending = false;
            return (AttemptKind::Discover, Vec::new());
        }
        if let Some(pos) = solo {
            return (AttemptKind::Run, vec![run.solo.remove(pos)]);
        }
        let ctx = ShardContext {
            slots,
            running_ms: run.running_ms,
            overhead_ms,
        };
        (AttemptKind::Run, run.queue.next_shard(ctx))
    }

    /// Undoes [`Core::take_shard`] after a failed write: the queue is as it was.
    fn put_back(&mut self, run_id: RunId, kind: AttemptKind, solo: Option<usize>, tests: &[u32]) {
        let run = self.runs.get_mut(&run_id).expect("picked from the map");
        match (kind, solo) {
            (AttemptKind::Discover, _) => run.discover_pending = true,
            (AttemptKind::Run, Some(pos)) => run.solo.insert(pos, tests[0]),
            (AttemptKind::Run, None) => {
                for &i in tests {
                    run.queue.push(i, run.tests[i as usize].plan);
                }
            }
        }
    }

    /// The run `worker` should take a shard of: highest priority, then fewest live attempts,
    /// then oldest, among the runs it may take that have work.
    fn pick_run(&self, worker: WorkerId) -> Option<RunId> {
        let w = &self.workers[&worker];
        let eligible = |r: &RunState| {
            (r.discover_pending || !r.queue.is_empty() || self.solo_for(r, worker).is_some())
                && w.fits(r)
                // Excluded, but no other live worker could take the run: better this worker
                // than a run that never ends.
                && (!r.excluded.contains(&worker) || !self.another_could_take(r, worker, |_| true))
        };
        self.runs
            .values()
            .filter(|r| eligible(r))
            .min_by_key(|r| policy::slot_order(r.row.priority, r.live_attempts, r.row.id))
            .map(|r| r.row.id)
    }

    /// Applies a written hand-out to memory and builds the shard to send.
    fn apply_handout(
        &mut self,
        a: AttemptRow,
        kind: AttemptKind,
        started: Option<crate::store::RunRow>,
        now: Now,
    ) -> pb::Shard {
        let lease = self.cfg.lease;
        let run = self.runs.get_mut(&a.run).expect("picked from the map");
        if let Some(row) = started {
            run.row = row;
            self.effects
                .events
                .push(pb::run_event::Event::Progress(run.summary()));
        }
        if kind == AttemptKind::Discover {
            run.discover_handouts += 1;
        }
        for &i in &a.tests {
            let t = &mut run.tests[i as usize];
            t.leased = Some(a.id);
            t.handouts += 1;
            run.running_ms += t.plan.estimate_ms;
        }
        run.running += a.tests.len() as u32;
        run.live_attempts += 1;
        run.row.shards += 1;
        let shard = pb::Shard {
            shard_id: a.shard.to_string(),
            attempt_id: a.id.to_string(),
            run_id: a.run.to_string(),
            kind: match kind {
                AttemptKind::Run => pb::ShardKind::Run as i32,
                AttemptKind::Discover => pb::ShardKind::Discover as i32,
            },
            runner: run.row.runner.clone(),
            suite: run.row.suite.clone(),
            revision: run.row.revision.clone(),
            tests: a
                .tests
                .iter()
                .map(|&i| run.tests[i as usize].id.clone())
                .collect(),
            policy: Some(run.row.policy.to_wire()),
            lease_ms: lease.as_millis() as u64,
        };
        self.effects.runs_changed.insert(a.run);
        self.effects.workers_changed.insert(a.worker);
        self.attempts.insert(
            a.id,
            Attempt {
                shard: a.shard,
                run: a.run,
                worker: a.worker,
                kind,
                total: a.tests.len() as u32,
                pending: a.tests,
                reported_ms: 0,
                lease_until: now.at + lease,
                started_ms: now.ms,
            },
        );
        self.workers
            .get_mut(&a.worker)
            .expect("checked by the caller")
            .attempts
            .insert(a.id);
        shard
    }

    /// The position in `run.solo` of the first test `worker` should take: one it has not failed
    /// or lost, or one it has when no other live worker free of that history could take it.
    pub(crate) fn solo_for(&self, run: &RunState, worker: WorkerId) -> Option<usize> {
        run.solo.iter().position(|&i| {
            let avoid = &run.tests[i as usize].retry.avoid;
            !avoid.contains(&worker) || !self.another_could_take(run, worker, |o| !avoid.contains(&o.row.id))
        })
    }

    /// The measured cost of one hand-out for `runner`, in milliseconds.
    fn overhead(&self, runner: &str) -> f64 {
        self.overhead_ms
            .get(runner)
            .copied()
            .unwrap_or(self.cfg.initial_overhead.as_millis() as f64)
    }

    /// Slots of live workers that may take `run`.
    fn eligible_slots(&mut self, run: RunId) -> usize {
        let version = self.fleet_version;
        let Some(r) = self.runs.get(&run) else { return 0 };
        if let Some((v, n)) = r.fleet_slots
            && v == version
        {
            return n;
        }
        let n = self
            .workers
            .values()
            .filter(|w| w.live() && w.fits(r))
            .map(|w| w.row.slots as usize)
            .sum();
        self.runs.get_mut(&run).expect("checked above").fleet_slots = Some((version, n));
        n
    }

    pub(crate) fn live_attempt(&self, worker: WorkerId, attempt: AttemptId) -> Result<&Attempt, Error> {
        match self.attempts.get(&attempt) {
            Some(a) if a.worker == worker => Ok(a),
            Some(_) => Err(Error::FailedPrecondition(format!(
                "attempt '{attempt}' belongs to another worker"
            ))),
            None => Err(Error::FailedPrecondition(format!(
                "attempt '{attempt}' is not live (its lease expired, it was superseded or its run ended); nothing from it is counted"
            ))),
        }
    }

    /// Counts the results of a live attempt. Results for tests the attempt does not hold, or
    /// that already have a result, are not counted.
    pub fn report(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        results: Vec<pb::TestResult>,
        now: Now,
    ) -> Result<pb::ReportResultsResponse, Error> {
        self.atomically(|c| {
            let attempt = c.live_attempt(worker, attempt_id)?;
            if attempt.kind != AttemptKind::Run {
                return Err(Error::FailedPrecondition(format!(
                    "attempt '{attempt_id}' is a discovery; report its tests with ReportDiscovery"
                )));
            }
            let run_id = attempt.run;
            if !c.runs.contains_key(&run_id) {
                let revived = c.write_touch(worker, now)?;
                c.apply_touch(worker, revived, now);
                return Ok(pb::ReportResultsResponse {
                    accepted: 0,
                    stop: true,
                });
            }
            let plan = c.decide_report(worker, attempt_id, results, now)?;
            // Write.
            let revived = c.write_touch(worker, now)?;
            let suite = c.runs[&run_id].row.suite.clone();
            let states: Vec<(u32, &RetryState)> = plan.retried.iter().map(|(i, st)| (*i, st)).collect();
            let written = c.store.record_results(run_id, &suite, &plan.rows, &states)?;
            if written != plan.rows.len() {
                return Err(Error::Internal(format!(
                    "memory and store disagree on which tests of run '{run_id}' are open ({written} of {} results written)",
                    plan.rows.len()
                )));
            }
            for q in &plan.quarantine {
                info!(suite = %q.suite, test = %q.test_id, reason = %q.reason, "quarantined automatically");
                c.store.add_quarantine(q)?;
            }
            if let Some(e) = &plan.ending {
                c.write_end(e)?;
            }
            // Apply.
            c.apply_touch(worker, revived, now);
            Ok(c.apply_report(attempt_id, plan, now))
        })
    }

    fn decide_report(
        &self,
        worker: WorkerId,
        attempt_id: AttemptId,
        results: Vec<pb::TestResult>,
        now: Now,
    ) -> Result<ReportPlan, Error> {
        let run_id = self.attempts[&attempt_id].run;
        let run = &self.runs[&run_id];
        let (rows, retried) = self.classify_report(worker, attempt_id, results, now)?;
        let quarantine = self.decide_auto_quarantine(run, &rows, now)?;
        let mut tally = run.tally();
        for r in &rows {
            tally.add(r.outcome, run.tests[r.idx as usize].quarantined);
        }
        let complete = tally.total() as usize == run.tests.len();
        // Fail-fast on the first confirmed failure of a test that is not quarantined.
        let stop = rows.iter().find(|r| {
            policy::fail_fast_stops(
                &run.row.policy,
                r.outcome,
                run.tests[r.idx as usize].quarantined,
                complete,
            )
        });
        let ending = match stop {
            Some(r) => {
                let open = run.tests.len() - tally.total() as usize;
                let message = format!(
                    "fail-fast: '{}' failed after {} attempt(s); {open} test(s) left unrun were cancelled, verdict {} ms after the start",
                    r.test_id,
                    r.attempts,
                    now.ms.saturating_sub(run.row.started_ms)
                );
                info!(run = %run_id, test = %r.test_id, "fail-fast: the run fails now");
                Some(self.decide_end(run_id, RunStatus::Failed, message, now)?)
            }
            None => self.decide_completion(run_id, &tally, now)?,
        };
        Ok(ReportPlan {
            run: run_id,
            rows,
            retried,
            quarantine,
            ending,
        })
    }

    /// Sorts a report's results into those counted now and failures that go round again;
    /// results for tests the attempt does not hold (or given twice) are left out.
    #[expect(clippy::type_complexity, reason = "two lists a caller takes apart at once")]
    fn classify_report(
        &self,
        worker: WorkerId,
        attempt_id: AttemptId,
        results: Vec<pb::TestResult>,
        now: Now,
    ) -> Result<(Vec<ResultRow>, Vec<(u32, RetryState)>), Error> {
        let attempt = &self.attempts[&attempt_id];
        let run = &self.runs[&attempt.run];
        let worker_name = self.worker_name(worker);
        let (mut rows, mut retried, mut seen) =
            (Vec::with_capacity(results.len()), Vec::new(), HashSet::new());
        for r in results {
            let outcome = Outcome::from_wire(r.outcome).ok_or_else(|| {
                Error::invalid(
                    "results",
                    format!("test '{}' has no valid outcome ({})", r.test_id, r.outcome),
                )
            })?;
            let held = attempt
                .pending
                .iter()
                .find(|&&i| run.tests[i as usize].id == r.test_id);
            let Some(&idx) = held else {
                warn!(attempt = %attempt_id, test = %r.test_id, "result for a test this attempt does not hold; not counted");
                continue;
            };
            if !seen.insert(idx) {
                continue;
            }
            let t = &run.tests[idx as usize];
            match policy::classify(outcome, &r.detail, &r.output, &t.retry, t.retries) {
                Classified::Retry => {
                    let first = FirstFailure {
                        detail: cap(&r.detail, 1024),
                        output: cap(&r.output, self.cfg.max_output_bytes),
                        worker: worker_name.clone(),
                    };
                    retried.push((idx, policy::after_failure(&t.retry, first, worker)));
                }
                Classified::Count {
                    outcome,
                    detail,
                    output,
                } => rows.push(ResultRow {
                    idx,
                    test_id: t.id.clone(),
                    history: t.hist.update(outcome, r.duration_ms, now.ms),
                    outcome,
                    duration_ms: r.duration_ms,
                    attempts: t.handouts,
                    worker: worker_name.clone(),
                    detail: cap(&detail, 1024),
                    output: cap(&output, self.cfg.max_output_bytes),
                    at_ms: now.ms,
                }),
            }
        }
        Ok((rows, retried))
    }

    /// The run's end once `tally` is what it has counted: its verdict when every test has a
    /// result, nothing otherwise.
    fn decide_completion(&self, run: RunId, tally: &Tally, now: Now) -> Result<Option<Ending>, Error> {
        let r = &self.runs[&run];
        if r.tests.is_empty() || tally.total() as usize != r.tests.len() {
            return Ok(None);
        }
        let status = policy::verdict(r.row.policy.strict_flaky, |o| tally.reds(o));
        Ok(Some(self.decide_verdict(run, status, now)?))
    }

    /// Flaky results of tests that are not quarantined, whose flake rate (with this result)
    /// passes the threshold, when the coordinator quarantines automatically.
    fn decide_auto_quarantine(
        &self,
        run: &RunState,
        rows: &[ResultRow],
        now: Now,
    ) -> Result<Vec<QuarantineRow>, Error> {
        if !self.cfg.auto_quarantine {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for r in rows {
            if r.outcome != Outcome::Flaky || run.tests[r.idx as usize].quarantined {
                continue;
            }
            // The history before this result, plus this flaky run.
            let mut f =
                self.store
                    .flakiness_of(&run.row.suite, &r.test_id)?
                    .unwrap_or(crate::store::FlakinessRow {
                        test_id: r.test_id.clone(),
                        runs: 0,
                        failures: 0,
                        flakes: 0,
                        flips: 0,
                        last_flake_ms: 0,
                        last_run_ms: 0,
                    });
            f.runs += 1;
            f.flakes += 1;
            if !policy::proposes_quarantine(&f, self.cfg.quarantine_min_runs, self.cfg.quarantine_threshold) {
                continue;
            }
            let reason = format!(
                "flaked in {} of {} runs ({:.1} %), past the {:.1} % threshold",
                f.flakes,
                f.runs,
                100.0 * policy::flake_rate(&f),
                100.0 * self.cfg.quarantine_threshold
            );
            out.push(QuarantineRow {
                suite: run.row.suite.clone(),
                test_id: r.test_id.clone(),
                reason,
                added_by: "shardgate".into(),
                added_ms: now.ms,
                automatic: true,
            });
        }
        Ok(out)
    }

    fn apply_report(
        &mut self,
        attempt_id: AttemptId,
        plan: ReportPlan,
        now: Now,
    ) -> pb::ReportResultsResponse {
        let ReportPlan {
            run: run_id,
            rows,
            retried,
            ending,
            ..
        } = plan;
        let lease = self.cfg.lease;
        let attempt = self.attempts.get_mut(&attempt_id).expect("checked live");
        attempt.lease_until = now.at + lease;
        let counted: HashSet<u32> = rows
            .iter()
            .map(|r| r.idx)
            .chain(retried.iter().map(|r| r.0))
            .collect();
        attempt.pending.retain(|i| !counted.contains(i));
        attempt.reported_ms += rows.iter().map(|r| r.duration_ms).sum::<u64>();
        let run = self.runs.get_mut(&run_id).expect("checked active");
        if !retried.is_empty() {
            for (idx, st) in retried {
                run.release(idx);
                let t = &mut run.tests[idx as usize];
                t.retry = st;
                t.hist = t.hist.update(Outcome::Failed, 0, now.ms);
                info!(run = %run_id, test = %t.id, failures = t.retry.failures, "test failed; running it again");
                run.requeue(idx);
            }
            self.effects.work_added = true;
        }
        for r in &rows {
            run.release(r.idx);
            run.tests[r.idx as usize].hist = r.history;
            run.count(r.idx, r.outcome);
            let t = &run.tests[r.idx as usize];
            let result = pb::TestResult {
                test_id: t.id.clone(),
                outcome: r.outcome.to_wire(),
                duration_ms: r.duration_ms,
                attempts: r.attempts,
                worker: r.worker.clone(),
                output: String::new(),
                detail: r.detail.clone(),
                quarantined: t.quarantined,
            };
            self.effects
                .events
                .push(pb::run_event::Event::TestFinished(pb::TestFinished {
                    run_id: run_id.to_string(),
                    result: Some(result),
                    counts: Some(run.counts()),
                }));
        }
        self.effects.runs_changed.insert(run_id);
        let accepted = rows.len() as u32;
        if let Some(e) = ending {
            self.apply_end(e);
        }
        pb::ReportResultsResponse {
            accepted,
            stop: !self.runs.contains_key(&run_id),
        }
    }

    /// Ends an attempt; its tests without a result go back to the queue.
    pub fn finish(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        error: &str,
        draining: bool,
        now: Now,
    ) -> Result<pb::FinishShardResponse, Error> {
        self.atomically(|c| {
            match c.live_attempt(worker, attempt_id) {
                Ok(_) => {}
                // The attempt already ended (its run finished, its lease expired): nothing is
                // left to requeue, and finishing twice is harmless.
                Err(_) if !c.attempts.contains_key(&attempt_id) => {
                    return Ok(pb::FinishShardResponse { requeued: 0 });
                }
                Err(e) => return Err(e),
            }
            let name = c.worker_name(worker);
            let reason = if draining {
                RequeueReason::Deregistered(name)
            } else if error.is_empty() {
                RequeueReason::NoResult(name)
            } else {
                RequeueReason::RunnerError {
                    worker: name,
                    error: cap(error, 2048),
                }
            };
            let plan = c.decide_end_attempt(attempt_id, &reason, now)?;
            c.write_end_attempt(&plan)?;
            // Apply: the runner failed on this worker, so the run's shards go elsewhere; a
            // whole shard's wall time minus its tests' time is what one hand-out costs.
            let a = &c.attempts[&attempt_id];
            let (run, whole, wall, tests_ms) = (
                a.run,
                a.pending.is_empty() && a.kind == AttemptKind::Run && a.total > 0,
                now.ms.saturating_sub(a.started_ms),
                a.reported_ms,
            );
            if let Some(r) = c.runs.get_mut(&run) {
                if matches!(reason, RequeueReason::RunnerError { .. }) {
                    r.excluded.insert(worker);
                }
                if whole {
                    let initial = c.cfg.initial_overhead.as_millis() as f64;
                    let o = c.overhead_ms.entry(r.row.runner.clone()).or_insert(initial);
                    *o = policy::next_overhead(*o, wall, tests_ms);
                }
            }
            let requeued = c.apply_end_attempt(plan);
            Ok(pb::FinishShardResponse { requeued })
        })
    }

    /// Expires attempts whose lease ran out and marks silent workers lost. Each expiry is a
    /// message of its own: one that fails is logged and the others go on.
    pub fn tick(&mut self, now: Now) -> Result<(), Error> {
        let mut expired: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.lease_until <= now.at)
            .map(|(id, _)| *id)
            .collect();
        expired.sort();
        let mut first_error = None;
        for id in expired {
            // Ending one attempt can end its run, and with it the run's other attempts.
            let Some(worker) = self.attempts.get(&id).map(|a| a.worker) else {
                continue;
            };
            let name = self.worker_name(worker);
            warn!(attempt = %id, worker = %name, "lease expired");
            let ended = self.atomically(|c| {
                let plan = c.decide_end_attempt(id, &RequeueReason::LeaseExpired(name), now)?;
                c.write_end_attempt(&plan)?;
                c.apply_end_attempt(plan);
                Ok(())
            });
            if let Err(e) = ended {
                warn!(attempt = %id, error = %e, "failed to expire an attempt; trying again next tick");
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.mark_silent_workers_lost(now) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What ending attempt `id` does: its unfinished tests go back, or are given up when they
    /// keep losing their workers; the run ends if that counted its last tests, or if its
    /// discovery gave up.
    pub(crate) fn decide_end_attempt(
        &self,
        id: AttemptId,
        reason: &RequeueReason,
        now: Now,
    ) -> Result<EndPlan, Error> {
        let a = &self.attempts[&id];
        let mut plan = EndPlan {
            attempt: id,
            run: None,
            kind: a.kind,
            pending: a.pending.clone(),
            give_up: Vec::new(),
            states: Vec::new(),
            ending: None,
            reason: reason.clone(),
        };
        let Some(run) = self.runs.get(&a.run) else {
            return Ok(plan);
        };
        plan.run = Some(a.run);
        let max = run.row.policy.max_infra_attempts;
        if a.kind == AttemptKind::Discover {
            if policy::discovery_gives_up(run.discover_handouts, max) {
                let message = format!(
                    "discovery got no answer after {} attempts: {}",
                    run.discover_handouts,
                    reason.describe()
                );
                plan.ending = Some(self.decide_end(a.run, RunStatus::Errored, message, now)?);
            }
            return Ok(plan);
        }
        // A drained worker handing its tests back is no fault of the tests; any other end
        // without a result counts against them.
        let Some(lost_on) = reason.lost_on() else {
            return Ok(plan);
        };
        let mut tally = run.tally();
        for &i in &a.pending {
            let t = &run.tests[i as usize];
            match lose(t, i, a.worker, lost_on, reason, max, now) {
                Lost::Back(st) => plan.states.push((i, st)),
                Lost::GivenUp(row) => {
                    tally.add(Outcome::InfraError, t.quarantined);
                    plan.give_up.push(row);
                }
            }
        }
        if !plan.give_up.is_empty() {
            plan.ending = self.decide_completion(a.run, &tally, now)?;
        }
        Ok(plan)
    }

    pub(crate) fn write_end_attempt(&mut self, plan: &EndPlan) -> Result<(), Error> {
        self.store.delete_attempt(plan.attempt)?;
        let Some(run) = plan.run else { return Ok(()) };
        if !plan.give_up.is_empty() || !plan.states.is_empty() {
            let suite = self.runs[&run].row.suite.clone();
            let refs: Vec<(u32, &RetryState)> = plan.states.iter().map(|(i, st)| (*i, st)).collect();
            self.store.record_results(run, &suite, &plan.give_up, &refs)?;
        }
        if let Some(e) = &plan.ending {
            self.write_end(e)?;
        }
        Ok(())
    }

    /// Applies a written end of an attempt; returns how many tests went back to the queue.
    pub(crate) fn apply_end_attempt(&mut self, plan: EndPlan) -> u32 {
        self.forget_attempt(plan.attempt);
        let Some(run_id) = plan.run else { return 0 };
        let run = self.runs.get_mut(&run_id).expect("decided on an active run");
        self.effects.runs_changed.insert(run_id);
        if plan.kind == AttemptKind::Discover {
            match plan.ending {
                Some(e) => {
                    self.apply_end(e);
                }
                None => {
                    run.discover_pending = true;
                    self.effects.work_added = true;
                }
            }
            return 0;
        }
        // The attempt's tests are no longer running, whatever happens to them next.
        for &i in &plan.pending {
            run.release(i);
        }
        for r in &plan.give_up {
            run.count(r.idx, Outcome::InfraError);
        }
        for (i, st) in plan.states {
            run.tests[i as usize].retry = st;
        }
        let mut requeued = 0;
        for &i in &plan.pending {
            if !run.tests[i as usize].done {
                run.requeue(i);
                requeued += 1;
            }
        }
        if requeued > 0 {
            info!(run = %run_id, requeued, reason = %plan.reason.describe(), "tests requeued");
            self.effects.work_added = true;
        }
        self.effects
            .events
            .push(pb::run_event::Event::Progress(run.summary()));
        if let Some(e) = plan.ending {
            self.apply_end(e);
        }
        requeued
    }

    /// Removes an attempt from memory without touching its tests.
    pub(crate) fn forget_attempt(&mut self, id: AttemptId) -> Option<Attempt> {
        let a = self.attempts.remove(&id)?;
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.attempts.remove(&id);
            self.effects.workers_changed.insert(a.worker);
        }
        if let Some(r) = self.runs.get_mut(&a.run) {
            r.live_attempts -= 1;
            self.effects.runs_changed.insert(a.run);
        }
        Some(a)
    }
}
