//! Hand-outs: which run gets a worker's free slot, forming its shard, and writing the attempt
//! before the shard is sent (one message: the tests go back to the queue if the write fails).

use shardgate_common::{AttemptId, Error, RunId, RunStatus, RunnerKind, ShardId, WorkerId, pb};

use super::Core;
use super::state::{Attempt, AttemptKind, RunState};
use crate::model::Now;
use crate::policy;
use crate::scheduler::ShardContext;
use crate::store::{AttemptRow, WorkerState};

/// What a runner of `kind` starts once per shard for each of, when that is what a shard
/// mostly costs: the function that takes the part of a test id naming it, or `None` for
/// runners that start once per shard whatever it holds.
///
/// - nextest lists every test binary its shard has tests in before it runs one (about 4.6 ms a
///   binary, measured on itertools: 13 quick tests of one binary 66 ms, a quick test from each
///   of 13 binaries 121 ms): the binary id, before the space.
/// - go test runs one `go test` per package of the shard: the package, before the last space.
pub(crate) fn start_unit(kind: RunnerKind) -> Option<fn(&str) -> &str> {
    match kind {
        RunnerKind::Nextest => Some(|id| id.split_once(' ').map_or(id, |(binary, _)| binary)),
        RunnerKind::GoTest => Some(|id| id.rsplit_once(' ').map_or(id, |(package, _)| package)),
        RunnerKind::Exec | RunnerKind::Pytest | RunnerKind::Junit | RunnerKind::CargoTest => None,
    }
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
        let (kind, tests) = self.take_shard(run_id, solo, fleet_slots, overhead_ms, now.ms);
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
        Ok(Some(self.apply_handout(attempt, kind, started, overhead_ms, now)))
    }

    /// Takes a shard's tests from `run_id`'s queue: its discovery, the solo test at `solo`, or
    /// a batch sized for the work left at `now_ms`.
    fn take_shard(
        &mut self,
        run_id: RunId,
        solo: Option<usize>,
        slots: usize,
        overhead_ms: f64,
        now_ms: u64,
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
            // What the shards out on workers have left: the estimates of their tests without
            // a result, but no more than their time to their due ends.
            running_ms: run.running_ms.min(run.outstanding.left_ms(now_ms)),
            overhead_ms,
        };
        // Runners that start something per unit a shard touches get shards filled by unit
        // first (see [`start_unit`]).
        let tests = &run.tests;
        let unit = start_unit(run.kind).map(|unit| move |i: u32| unit(&tests[i as usize].id));
        (AttemptKind::Run, run.queue.next_shard_by(ctx, unit))
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
        overhead_ms: f64,
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
            tested_commit: run.row.tested_commit.clone(),
        };
        self.effects.runs_changed.insert(a.run);
        self.effects.workers_changed.insert(a.worker);
        let pending = a.tests.clone();
        let estimate_ms = run.estimate_ms(&a.tests);
        tracing::debug!(
            run = %a.run,
            attempt = %a.id,
            tests = a.tests.len(),
            estimate_ms = estimate_ms as u64,
            first = shard.tests.first().map(String::as_str).unwrap_or_default(),
            last = shard.tests.last().map(String::as_str).unwrap_or_default(),
            "shard handed out"
        );
        let attempt = Attempt::from_row(&a, pending, now.at + lease, estimate_ms, overhead_ms);
        run.outstanding.add(attempt.due_ms, a.id);
        self.attempts.insert(a.id, attempt);
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
    pub(crate) fn overhead(&self, runner: &str) -> f64 {
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
}
