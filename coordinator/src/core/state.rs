//! The core's memory: active runs with their tests and queues, live attempts, known workers,
//! and what a message produced besides its reply ([`Effects`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use shardgate_common::labels;
use shardgate_common::{AttemptId, Outcome, RunId, RunnerKind, ShardId, WorkerId, pb};

use super::runs::PlannedTests;
use crate::model::CoreConfig;
use crate::scheduler::{History, Learning, Outstanding, Plan, RunQueue};
use crate::store::{RetryState, RunRow, Store, WorkerRow, WorkerState, summary_of};

/// A test of an active run, as the scheduler tracks it.
#[derive(Debug, Clone)]
pub(crate) struct TestSlot {
    pub id: String,
    pub done: bool,
    pub leased: Option<AttemptId>,
    /// How many times this test was handed out.
    pub handouts: u32,
    pub plan: Plan,
    pub hist: History,
    /// Failures retried and workers lost so far in this run (stored, see [`RetryState`]).
    pub retry: RetryState,
    /// How many failed runs of this test are retried rather than counted.
    pub retries: u32,
    /// Quarantined in the suite when the run was submitted: runs, is reported, cannot fail
    /// the gate.
    pub quarantined: bool,
}

impl TestSlot {
    pub fn new(id: String, plan: Plan, hist: Option<&History>) -> Self {
        Self {
            id,
            done: false,
            leased: None,
            handouts: 0,
            plan,
            hist: hist.copied().unwrap_or_default(),
            retry: RetryState::default(),
            retries: 0,
            quarantined: false,
        }
    }

    /// A test that failed and waits for its retry, or that lost its worker twice, runs alone:
    /// a retry is not disturbed by shard-mates, and a test that takes workers down (a poison
    /// test) takes no innocent tests with it.
    pub fn runs_alone(&self) -> bool {
        self.retry.failures > 0 || self.retry.lost >= 2
    }
}

/// A run that has not ended.
#[derive(Debug)]
pub(crate) struct RunState {
    pub row: RunRow,
    pub kind: RunnerKind,
    pub tests: Vec<TestSlot>,
    pub queue: RunQueue,
    /// What the run learns from its own results about its tests with no history.
    pub learning: Learning,
    /// Tests handed out one at a time, preferably to a worker they have not failed or been
    /// lost on (see [`TestSlot::runs_alone`]), oldest first. They go before the queue.
    pub solo: Vec<u32>,
    /// Estimated work of the tests out on workers now.
    pub running_ms: f64,
    /// The live attempts by when each is due to end ([`Attempt::due_ms`]).
    pub outstanding: Outstanding<AttemptId>,
    /// Slots that may take this run, as of a fleet version.
    pub fleet_slots: Option<(u64, usize)>,
    /// A discovery attempt must be handed out before the run has tests.
    pub discover_pending: bool,
    pub discover_handouts: u32,
    /// Counted results per outcome, indexed by `Outcome::to_wire`.
    pub done: [u32; 7],
    /// The same, for quarantined tests only (they do not count toward the gate).
    pub done_quarantined: [u32; 7],
    pub running: u32,
    pub live_attempts: u32,
    /// Workers whose runner failed for this run (setup, unreadable results): they get its
    /// shards only when no other worker could take them.
    pub excluded: HashSet<WorkerId>,
    /// The runner's failures in a row for this run with the same first line (the error's
    /// "what"), and that line; a shard that ends with every result resets it.
    pub runner_streak: (u32, String),
    /// Since when the run has had work waiting and no live worker able to take it.
    pub unservable_since: Option<Instant>,
}

/// Counted results of a run per outcome, all and quarantined (which do not count toward the
/// gate), indexed by `Outcome::to_wire`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tally {
    pub done: [u32; 7],
    pub quarantined: [u32; 7],
}

impl Tally {
    pub fn add(&mut self, outcome: Outcome, quarantined: bool) {
        self.done[outcome.to_wire() as usize] += 1;
        if quarantined {
            self.quarantined[outcome.to_wire() as usize] += 1;
        }
    }

    pub fn total(&self) -> u32 {
        self.done.iter().sum()
    }

    /// Results of `outcome` that count toward the gate.
    pub fn reds(&self, outcome: Outcome) -> u32 {
        let i = outcome.to_wire() as usize;
        self.done[i] - self.quarantined[i]
    }
}

impl RunState {
    /// The estimated work of tests `idx` of this run.
    pub fn estimate_ms(&self, idx: &[u32]) -> f64 {
        idx.iter()
            .filter_map(|&i| self.tests.get(i as usize))
            .map(|t| t.plan.estimate_ms)
            .sum()
    }

    /// What is counted now.
    pub fn tally(&self) -> Tally {
        Tally {
            done: self.done,
            quarantined: self.done_quarantined,
        }
    }

    /// A run with its planned tests, nothing counted or handed out yet.
    pub fn new(row: RunRow, kind: RunnerKind, planned: PlannedTests) -> Self {
        let PlannedTests {
            tests,
            queue,
            learning,
        } = planned;
        Self {
            discover_pending: row.discover && tests.is_empty(),
            row,
            kind,
            tests,
            queue,
            learning,
            solo: Vec::new(),
            running_ms: 0.0,
            outstanding: Outstanding::default(),
            fleet_slots: None,
            discover_handouts: 0,
            done: [0; 7],
            done_quarantined: [0; 7],
            running: 0,
            live_attempts: 0,
            excluded: HashSet::new(),
            runner_streak: (0, String::new()),
            unservable_since: None,
        }
    }

    pub fn done_total(&self) -> u32 {
        self.done.iter().sum()
    }

    /// Every test has a counted result (and there are tests).
    pub fn complete(&self) -> bool {
        !self.discover_pending && !self.tests.is_empty() && self.done_total() as usize == self.tests.len()
    }

    /// Counts test `idx` as done with `outcome`.
    pub fn count(&mut self, idx: u32, outcome: Outcome) {
        let t = &mut self.tests[idx as usize];
        t.done = true;
        t.leased = None;
        self.done[outcome.to_wire() as usize] += 1;
        if t.quarantined {
            self.done_quarantined[outcome.to_wire() as usize] += 1;
        }
    }

    /// Results of `outcome` that count toward the gate, quarantined tests aside.
    pub fn reds(&self, outcome: Outcome) -> u32 {
        let i = outcome.to_wire() as usize;
        self.done[i] - self.done_quarantined[i]
    }

    /// Its tests, their queue and what it learns about them: planned anew (after its
    /// discovery, or when a restart resumes it).
    pub fn take_plan(&mut self, planned: PlannedTests) {
        self.tests = planned.tests;
        self.queue = planned.queue;
        self.learning = planned.learning;
    }

    /// Takes in the passing result of test `idx` for the run's estimates of its tests with no
    /// history, and re-plans the queue when that is due.
    pub fn learn(&mut self, idx: u32, duration_ms: u64) {
        if !self.tests[idx as usize].plan.cold || !self.learning.observe(idx, duration_ms) {
            return;
        }
        tracing::debug!(
            test = %self.tests[idx as usize].id,
            duration_ms,
            waiting = self.queue.len(),
            "re-planning the run's tests with no history"
        );
        let tests = &mut self.tests;
        self.learning
            .replan(&mut self.queue, |i, p| tests[i as usize].plan = p);
    }

    /// The test is no longer out on a worker.
    pub fn release(&mut self, idx: u32) {
        let t = &mut self.tests[idx as usize];
        t.leased = None;
        self.running -= 1;
        self.running_ms -= t.plan.estimate_ms;
    }

    /// Puts an open test back: alone or in the queue.
    pub fn requeue(&mut self, idx: u32) {
        let t = &self.tests[idx as usize];
        if t.runs_alone() {
            self.solo.push(idx);
        } else {
            self.queue.push(idx, t.plan);
        }
    }

    pub fn counts(&self) -> pb::RunCounts {
        let total = self.tests.len() as u32;
        let d = |o: Outcome| self.done[o.to_wire() as usize];
        pb::RunCounts {
            total,
            queued: total - self.running - self.done_total(),
            running: self.running_now(),
            assigned: self.running - self.running_now(),
            passed: d(Outcome::Passed),
            failed: d(Outcome::Failed),
            skipped: d(Outcome::Skipped),
            flaky: d(Outcome::Flaky),
            timed_out: d(Outcome::TimedOut),
            infra_error: d(Outcome::InfraError),
        }
    }

    /// Tests running now: one per slot that holds a shard of this run (a slot runs its shard's
    /// tests one after another); the rest of what is handed out waits in its shard.
    fn running_now(&self) -> u32 {
        self.running.min(self.live_attempts)
    }

    /// Estimated time to the last result: the estimated work left over the slots the run holds
    /// now; 0 when no slot holds it (nothing to go by) or nothing is left.
    pub fn eta_ms(&self) -> u64 {
        if self.live_attempts == 0 {
            return 0;
        }
        let solo: f64 = self
            .solo
            .iter()
            .map(|&i| self.tests[i as usize].plan.estimate_ms)
            .sum();
        let left = self.queue.queued_ms() + solo + self.running_ms.max(0.0);
        (left / f64::from(self.live_attempts)).round() as u64
    }

    pub fn summary(&self) -> pb::RunSummary {
        let mut s = summary_of(&self.row, self.counts());
        s.eta_ms = self.eta_ms();
        s.slots_busy = self.live_attempts;
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptKind {
    Run,
    Discover,
}

#[derive(Debug)]
pub(crate) struct Attempt {
    pub shard: ShardId,
    pub run: RunId,
    pub worker: WorkerId,
    pub kind: AttemptKind,
    /// Tests of the shard still without a result from this attempt.
    pub pending: Vec<u32>,
    pub total: u32,
    /// Sum of the durations reported so far, to measure the per-shard overhead.
    pub reported_ms: u64,
    /// The estimated work of the whole shard when it was handed out (its timeline entry keeps
    /// it once the attempt ends).
    pub estimate_ms: f64,
    pub lease_until: Instant,
    pub started_ms: u64,
    /// When it is due to end: its start, the per-shard overhead, its estimated work.
    pub due_ms: u64,
}

impl Attempt {
    /// A live attempt from its stored row, holding `pending` of its tests, its lease running
    /// until `lease_until`; `estimate_ms` is the whole shard's estimated work, `overhead_ms`
    /// what a shard of its runner costs besides.
    pub fn from_row(
        a: &crate::store::AttemptRow,
        pending: Vec<u32>,
        lease_until: Instant,
        estimate_ms: f64,
        overhead_ms: f64,
    ) -> Self {
        Self {
            shard: a.shard,
            run: a.run,
            worker: a.worker,
            kind: if a.discover {
                AttemptKind::Discover
            } else {
                AttemptKind::Run
            },
            total: a.tests.len() as u32,
            pending,
            reported_ms: 0,
            estimate_ms,
            lease_until,
            started_ms: a.started_ms,
            due_ms: a.started_ms + (overhead_ms + estimate_ms).max(0.0) as u64,
        }
    }
}

/// A known worker.
#[derive(Debug)]
pub(crate) struct WorkerEntry {
    pub row: WorkerRow,
    pub runners: HashMap<String, RunnerKind>,
    pub last_seen: Instant,
    pub attempts: HashSet<AttemptId>,
    /// Runners that failed the worker's own check, and why (from its heartbeats; not stored:
    /// the next heartbeat after a restart says it again).
    pub unavailable: std::collections::BTreeMap<String, String>,
    /// The worker's last heartbeat said it drains.
    pub draining: bool,
}

impl WorkerEntry {
    pub fn live(&self) -> bool {
        self.row.state == WorkerState::Live
    }

    /// Whether this worker offers `run`'s runner and carries the labels it asks for.
    pub fn fits(&self, run: &RunState) -> bool {
        self.runners.get(&run.row.runner) == Some(&run.kind)
            && !self.unavailable.contains_key(&run.row.runner)
            && labels::satisfies(&self.row.labels, &run.row.labels)
    }

    pub fn to_wire(&self) -> pb::WorkerInfo {
        pb::WorkerInfo {
            worker_id: self.row.id.to_string(),
            name: self.row.name.clone(),
            slots: self.row.slots,
            busy_slots: self.attempts.len() as u32,
            labels: labels::to_wire(&self.row.labels),
            runners: self
                .row
                .runners
                .iter()
                .map(|r| pb::RunnerInfo {
                    name: r.name.clone(),
                    kind: r.kind.to_wire(),
                })
                .collect(),
            state: self.row.state.as_str().to_owned(),
            last_seen_ms: self.row.last_seen_ms,
            draining: self.draining,
            unavailable_runners: self
                .unavailable
                .iter()
                .map(|(name, reason)| pb::UnavailableRunner {
                    name: name.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }
}

/// Why a test went back to the queue.
#[derive(Debug, Clone)]
pub(crate) enum RequeueReason {
    LeaseExpired(String),
    /// The worker's connection closed and it did not call again: its process died.
    ConnectionClosed(String),
    NoResult(String),
    RunnerError {
        worker: String,
        error: String,
    },
    Deregistered(String),
}

impl RequeueReason {
    pub fn describe(&self) -> String {
        match self {
            RequeueReason::LeaseExpired(w) => format!("lease expired on worker {w}"),
            RequeueReason::ConnectionClosed(w) => format!("worker {w} disconnected"),
            RequeueReason::NoResult(w) => format!("worker {w} finished the shard without a result"),
            RequeueReason::RunnerError { error, .. } => format!("runner failed: {error}"),
            RequeueReason::Deregistered(w) => format!("worker {w} left"),
        }
    }

    /// The worker the tests are held against; none for a drain hand-back, which is no fault
    /// of the tests.
    pub fn lost_on(&self) -> Option<&str> {
        match self {
            RequeueReason::Deregistered(_) => None,
            RequeueReason::LeaseExpired(w)
            | RequeueReason::ConnectionClosed(w)
            | RequeueReason::NoResult(w)
            | RequeueReason::RunnerError { worker: w, .. } => Some(w),
        }
    }
}

/// What messages to the core produced besides their replies, published by the actor once the
/// batch is durable.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<pb::run_event::Event>,
    /// New work was queued: wake waiting `AcquireShard` calls.
    pub work_added: bool,
    /// A deploy is waiting for the rollout task.
    pub deploy_added: bool,
    /// Active runs whose live summary changed; ended runs are dropped from the live view.
    pub runs_changed: HashSet<RunId>,
    /// Workers whose live state changed.
    pub workers_changed: HashSet<WorkerId>,
    /// What the metrics count (kept, like events, only when the message succeeds).
    pub counts: Vec<crate::metrics::CoreCount>,
    /// Results and attempt ends for the trace exporter; only with `CoreConfig::trace`.
    pub traced: Vec<crate::otlp::Traced>,
}

pub struct Core {
    pub(crate) cfg: CoreConfig,
    pub(crate) store: Box<dyn Store>,
    /// Active runs by id; ids are time-ordered, so iteration is oldest first.
    pub(crate) runs: BTreeMap<RunId, RunState>,
    pub(crate) workers: HashMap<WorkerId, WorkerEntry>,
    pub(crate) attempts: HashMap<AttemptId, Attempt>,
    /// Runner names any worker has ever registered, with their kind.
    pub(crate) known_runners: BTreeMap<String, RunnerKind>,
    /// Per runner name, the label sets of the workers that ever offered it.
    pub(crate) known_labels: BTreeMap<String, std::collections::BTreeSet<labels::Labels>>,
    /// Measured cost of one hand-out per runner (ms): wall time of a shard minus its tests.
    pub(crate) overhead_ms: HashMap<String, f64>,
    /// Changes whenever a worker comes, goes, is lost or revives.
    pub(crate) fleet_version: u64,
    /// When old runs' output was last pruned (`keep_output`).
    pub(crate) pruned_at: Option<Instant>,
    pub(crate) effects: Effects,
    /// A savepoint could not be closed: memory may be ahead of the disk. The actor stops.
    pub(crate) poisoned: Option<String>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("runs", &self.runs.len())
            .field("workers", &self.workers.len())
            .field("attempts", &self.attempts.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The name of a worker, for results and messages.
    pub(crate) fn worker_name(&self, worker: WorkerId) -> String {
        self.workers
            .get(&worker)
            .map(|w| w.row.name.clone())
            .unwrap_or_default()
    }

    /// Whether a live worker other than `except` that `ok` accepts could take `run`.
    pub(crate) fn another_could_take(
        &self,
        run: &RunState,
        except: WorkerId,
        ok: impl Fn(&WorkerEntry) -> bool,
    ) -> bool {
        self.workers.values().any(|o| {
            o.row.id != except && o.live() && !run.excluded.contains(&o.row.id) && o.fits(run) && ok(o)
        })
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, saying how much was cut.
pub(crate) fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… {} bytes cut]", &s[..end], s.len() - end)
}
