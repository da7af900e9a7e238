//! Reports: counting a live attempt's results. A report is classified (counted now, or a
//! failure that goes round again), its consequences decided (auto-quarantine, fail-fast, the
//! verdict when it was the run's last result), written, and only then applied.

use std::collections::HashSet;

use shardgate_common::{AttemptId, Error, Outcome, RunId, RunStatus, WorkerId, pb};
use tracing::{info, warn};

use super::Core;
use super::runs::Ending;
use super::state::{AttemptKind, RunState, Tally, cap};
use crate::model::Now;
use crate::policy::{self, Classified};
use crate::store::{FirstFailure, QuarantineRow, ResultRow, RetryState};

/// How much longer than its attempt's time out a reported test may claim to have run.
const DURATION_SLACK_MS: u64 = 5_000;

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
    /// Counts the results of a live attempt. Results for tests the attempt does not hold, or
    /// that already have a result, are not counted.
    pub fn report(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        results: Vec<pb::TestResult>,
        now: Now,
    ) -> Result<pb::ReportResultsResponse, Error> {
        self.report_proven(worker, attempt_id, results, "", now)
    }

    /// [`Core::report`] of results the worker says it produced from commit `tested` (empty:
    /// it cannot tell). A commit that is not the run's revision ends the attempt as a runner
    /// failure with nothing of it counted; the run's first proof pins its tested commit.
    pub fn report_proven(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        results: Vec<pb::TestResult>,
        tested: &str,
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
            let pin = match c.check_commit(run_id, tested) {
                Ok(pin) => pin,
                Err(why) => {
                    c.end_attempt_by_worker(worker, attempt_id, &why, false, now)?;
                    return Ok(pb::ReportResultsResponse {
                        accepted: 0,
                        stop: true,
                    });
                }
            };
            let mut plan = c.decide_report(worker, attempt_id, results, now)?;
            if let (Some(p), Some(e)) = (&pin, &mut plan.ending) {
                e.row.tested_commit = p.clone();
            }
            // Write.
            if let Some(p) = &pin {
                c.store.set_tested_commit(run_id, p)?;
            }
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
                let counted: HashSet<u32> = plan.rows.iter().map(|r| r.idx).collect();
                c.write_end_after(e, &counted)?;
            }
            // Apply.
            c.apply_touch(worker, revived, now);
            c.apply_pin(run_id, pin);
            Ok(c.apply_report(attempt_id, plan, now))
        })
    }

    /// The commit to pin for run `run` when a worker proves it ran `tested` (`None`: nothing to
    /// pin), or why the proof is refused.
    pub(crate) fn check_commit(&self, run: RunId, tested: &str) -> Result<Option<String>, String> {
        let r = &self.runs[&run].row;
        match policy::check_tested_commit(&r.revision, &r.tested_commit, tested) {
            policy::CommitCheck::Unproven | policy::CommitCheck::Pinned => Ok(None),
            policy::CommitCheck::Pin => Ok(Some(tested.to_ascii_lowercase())),
            policy::CommitCheck::Refused(why) => {
                warn!(run = %run, tested, revision = %r.revision, "refused an attempt that ran another commit");
                Err(format!(
                    "refused: {why}; none of the attempt's results were counted"
                ))
            }
        }
    }

    /// Applies a pin that [`Core::check_commit`] decided and the store took.
    pub(crate) fn apply_pin(&mut self, run: RunId, pin: Option<String>) {
        if let (Some(p), Some(r)) = (pin, self.runs.get_mut(&run)) {
            info!(run = %run, commit = %p, "tested commit pinned");
            r.row.tested_commit = p;
        }
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
        // A test cannot take longer than its attempt has been out (a few seconds of slack for
        // clocks): a forged huge duration must not poison the suite's estimates.
        let longest_ms = now.ms.saturating_sub(attempt.started_ms) + DURATION_SLACK_MS;
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
                    history: t.hist.update(outcome, r.duration_ms.min(longest_ms), now.ms),
                    outcome,
                    duration_ms: r.duration_ms.min(longest_ms),
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
    pub(crate) fn decide_completion(
        &self,
        run: RunId,
        tally: &Tally,
        now: Now,
    ) -> Result<Option<Ending>, Error> {
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
                self.effects.counts.push(crate::metrics::CoreCount::Retry);
                run.requeue(idx);
            }
            self.effects.work_added = true;
        }
        for r in &rows {
            run.release(r.idx);
            run.tests[r.idx as usize].hist = r.history;
            run.count(r.idx, r.outcome);
            if matches!(r.outcome, Outcome::Passed | Outcome::Flaky) {
                run.learn(r.idx, r.duration_ms);
            }
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
            if self.cfg.trace {
                self.effects.traced.push(crate::otlp::Traced::Test {
                    run: run_id,
                    attempt: attempt_id,
                    at_ms: now.ms,
                    result: result.clone(),
                });
            }
            self.effects
                .events
                .push(pb::run_event::Event::TestFinished(pb::TestFinished {
                    run_id: run_id.to_string(),
                    result: Some(result),
                    counts: Some(run.counts()),
                    eta_ms: run.eta_ms(),
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
}
