//! The end of an attempt: finished by its worker, handed back on a drain, or expired with its
//! lease. Its tests without a result go back to the queue, or are given up when they keep
//! losing their workers. Each end is one message shaped decide → write → apply.

use std::collections::HashSet;

use shardgate_common::{AttemptId, Error, Outcome, RunId, RunStatus, WorkerId, labels, pb};
use tracing::{info, warn};

use super::Core;
use super::runs::Ending;
use super::state::{Attempt, AttemptKind, RequeueReason, TestSlot, cap};
use crate::model::Now;
use crate::policy;
use crate::store::{LostOn, ResultRow, RetryState};

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
    /// The run ends with this attempt (its last tests given up, its discovery gave up, or its
    /// runner kept failing the same way).
    ending: Option<Ending>,
    reason: RequeueReason,
    now_ms: u64,
    /// The run's runner failures in a row after this one, when the runner failed.
    streak: Option<(u32, String)>,
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

/// Whether an attempt's end, as the shard log names it, means its worker or its runner failed
/// it (the names [`Core::write_end_attempt`] gives; "finished", "drained" and "run ended" do
/// not).
pub(crate) fn ended_in_failure(state: &str) -> bool {
    matches!(
        state,
        "lease expired" | "disconnected" | "no result" | "runner error"
    )
}

impl Core {
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

    /// Ends an attempt; its tests without a result go back to the queue.
    pub fn finish(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        error: &str,
        draining: bool,
        now: Now,
    ) -> Result<pb::FinishShardResponse, Error> {
        self.atomically(|c| c.end_attempt_by_worker(worker, attempt_id, error, draining, now))
    }

    /// Whether a worker's attempt is still live: `false` when it already ended (its run finished,
    /// its lease expired), where nothing is left to requeue and finishing twice is harmless; an
    /// error when it is another worker's.
    fn still_live(&self, worker: WorkerId, attempt_id: AttemptId) -> Result<bool, Error> {
        match self.live_attempt(worker, attempt_id) {
            Ok(_) => Ok(true),
            Err(_) if !self.attempts.contains_key(&attempt_id) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Ends an attempt whose runner could not find the run's revision in its repository: no
    /// worker can test it, so the run ends `errored` with the runner's words.
    pub fn finish_unknown_revision(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        error: &str,
        now: Now,
    ) -> Result<pb::FinishShardResponse, Error> {
        self.atomically(|c| {
            if !c.still_live(worker, attempt_id)? {
                return Ok(pb::FinishShardResponse { requeued: 0 });
            }
            let run = c.attempts[&attempt_id].run;
            let message = format!(
                "worker {}: {}",
                c.worker_name(worker),
                cap(error.lines().next().unwrap_or(error), 2048)
            );
            warn!(run = %run, %message, "the run's revision is unknown to a runner's repository");
            let ending = c.decide_end(run, RunStatus::Errored, message, now)?;
            c.write_end(&ending)?;
            c.apply_end(ending);
            Ok(pb::FinishShardResponse { requeued: 0 })
        })
    }

    /// The body of [`Core::finish`], inside a message that is already atomic.
    pub(crate) fn end_attempt_by_worker(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        error: &str,
        draining: bool,
        now: Now,
    ) -> Result<pb::FinishShardResponse, Error> {
        let c = self;
        if !c.still_live(worker, attempt_id)? {
            return Ok(pb::FinishShardResponse { requeued: 0 });
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
        if let Err(e) = self.end_unservable_runs(now) {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.prune_old_output(now) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Clears the output of tests of runs that finished more than `keep_output` ago, a bounded
    /// batch at a time (at most once a minute, in parts of 10,000 tests, so the writer's batches
    /// stay short).
    pub(crate) fn prune_old_output(&mut self, now: Now) -> Result<(), Error> {
        const PART: u32 = 10_000;
        let Some(keep) = self.cfg.keep_output else {
            return Ok(());
        };
        if self
            .pruned_at
            .is_some_and(|t| now.at.saturating_duration_since(t) < std::time::Duration::from_secs(60))
        {
            return Ok(());
        }
        let before = now.ms.saturating_sub(keep.as_millis() as u64);
        let pruned = self.atomically(|c| Ok(c.store.prune_output(before, PART)?))?;
        // A full part means there may be more: go on at the next tick.
        if pruned < PART {
            self.pruned_at = Some(now.at);
        }
        if pruned > 0 {
            info!(tests = pruned, "pruned the output of old runs (--keep-output)");
        }
        Ok(())
    }

    /// Ends, as `errored`, each run that has had work waiting for longer than its queue timeout
    /// while no live worker could take it (its runner with its labels): it would wait forever.
    pub(crate) fn end_unservable_runs(&mut self, now: Now) -> Result<(), Error> {
        let workers = &self.workers;
        let mut expired = Vec::new();
        for (id, run) in self.runs.iter_mut() {
            let waiting = run.discover_pending || !run.queue.is_empty() || !run.solo.is_empty();
            if !waiting || workers.values().any(|w| w.live() && w.fits(run)) {
                run.unservable_since = None;
                continue;
            }
            let since = *run.unservable_since.get_or_insert(now.at);
            let limit = match run.row.policy.queue_timeout_ms {
                0 => self.cfg.queue_timeout,
                ms => std::time::Duration::from_millis(ms),
            };
            if now.at.saturating_duration_since(since) >= limit {
                expired.push((*id, limit));
            }
        }
        for (id, limit) in expired {
            let run = &self.runs[&id];
            let labels = labels::to_text(&run.row.labels);
            let mut message = format!(
                "no live worker could take this run for {:?} (its queue timeout): it needs runner '{}'{}; start or free such a worker",
                limit,
                run.row.runner,
                if labels.is_empty() {
                    String::new()
                } else {
                    format!(" with labels {labels}")
                }
            );
            // Workers that offer the runner but found it broken say why, in the tool's words.
            let mut broken: Vec<(&str, &str)> = self
                .workers
                .values()
                .filter(|w| w.live() && labels::satisfies(&w.row.labels, &run.row.labels))
                .filter_map(|w| {
                    let why = w.unavailable.get(&run.row.runner)?;
                    Some((w.row.name.as_str(), why.as_str()))
                })
                .collect();
            broken.sort();
            if let Some((name, why)) = broken.first() {
                message.push_str(&format!(
                    "; the runner failed the worker's check on {} worker(s), e.g. {name}: {}",
                    broken.len(),
                    cap(why, 1024)
                ));
            }
            warn!(run = %id, %message, "run errored");
            self.atomically(|c| {
                let ending = c.decide_end(id, RunStatus::Errored, message, now)?;
                c.write_end(&ending)?;
                c.apply_end(ending);
                Ok(())
            })?;
        }
        Ok(())
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
            now_ms: now.ms,
            streak: None,
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
        // A runner that fails the same way shard after shard (a tool missing everywhere, a
        // profile whose results cannot be read) stops the run once, with its own words,
        // instead of costing every test its infrastructure attempts.
        if let RequeueReason::RunnerError { error, .. } = reason {
            let what = error.lines().next().unwrap_or_default().to_owned();
            let (n, last) = &run.runner_streak;
            let streak = if *last == what { n + 1 } else { 1 };
            if policy::runner_gives_up(streak, max) {
                let message = cap(
                    &format!(
                        "the runner failed {streak} shards in a row the same way, so the run stops: {error}"
                    ),
                    1024,
                );
                plan.ending = Some(self.decide_end(a.run, RunStatus::Errored, message, now)?);
                plan.streak = Some((streak, what));
                return Ok(plan);
            }
            plan.streak = Some((streak, what));
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

    /// Writes an attempt's end, named in the shard log "finished" when every test it held has
    /// its result, else by why it ended (see [`ended_in_failure`]).
    pub(crate) fn write_end_attempt(&mut self, plan: &EndPlan) -> Result<(), Error> {
        let state = if plan.pending.is_empty() {
            "finished"
        } else {
            match plan.reason {
                RequeueReason::LeaseExpired(_) => "lease expired",
                RequeueReason::ConnectionClosed(_) => "disconnected",
                RequeueReason::NoResult(_) => "no result",
                RequeueReason::RunnerError { .. } => "runner error",
                RequeueReason::Deregistered(_) => "drained",
            }
        };
        self.write_attempt_gone(plan.attempt, state, plan.now_ms)?;
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
        match (&plan.streak, &plan.reason) {
            (Some(s), _) => run.runner_streak = s.clone(),
            (None, RequeueReason::NoResult(_)) if plan.pending.is_empty() => {
                run.runner_streak = (0, String::new())
            }
            _ => {}
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
    /// Writes that attempt `id` ended (`state` says how): its row goes, its timeline entry
    /// stays.
    pub(crate) fn write_attempt_gone(
        &mut self,
        id: AttemptId,
        state: &'static str,
        now_ms: u64,
    ) -> Result<(), Error> {
        self.write_attempt_gone_after(id, state, now_ms, &HashSet::new())
    }

    /// [`Core::write_attempt_gone`] with the tests in `counted` done: their results are
    /// counted by the same message, which applies them after this write.
    pub(crate) fn write_attempt_gone_after(
        &mut self,
        id: AttemptId,
        state: &'static str,
        now_ms: u64,
        counted: &HashSet<u32>,
    ) -> Result<(), Error> {
        if let Some(a) = self.attempts.get(&id) {
            let mut entry = self.shard_progress(id, a, state, now_ms.max(a.started_ms));
            entry.done += a.pending.iter().filter(|i| counted.contains(i)).count() as u32;
            self.store.log_shard(&entry)?;
            if self.cfg.trace {
                self.effects.traced.push(crate::otlp::Traced::Shard(entry));
            }
        }
        self.store.delete_attempt(id)?;
        self.effects
            .counts
            .push(crate::metrics::CoreCount::AttemptEnded(state));
        Ok(())
    }

    pub(crate) fn forget_attempt(&mut self, id: AttemptId) -> Option<Attempt> {
        let a = self.attempts.remove(&id)?;
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.attempts.remove(&id);
            self.effects.workers_changed.insert(a.worker);
        }
        if let Some(r) = self.runs.get_mut(&a.run) {
            r.live_attempts -= 1;
            r.outstanding.remove(a.due_ms, id);
            self.effects.runs_changed.insert(a.run);
        }
        Some(a)
    }
}
