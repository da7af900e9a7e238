//! The scheduling core: the one owner of runs, tests, workers and attempts. It is plain
//! synchronous code; the actor in `actor.rs` feeds it one message at a time on its own thread,
//! and unit tests drive it directly with a stepped clock and an in-memory database.
//!
//! Every change is written to the store before the core's memory changes, so a failed write
//! leaves both as they were, and a result is acknowledged only once it is on disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use shardgate_common::labels;
use shardgate_common::{
    AttemptId, Error, Outcome, RunId, RunStatus, RunnerKind, ShardId, WorkerId, pb, validate,
};
use tracing::{info, warn};

use crate::model::{CoreConfig, Now, Policy};
use crate::scheduler::{self, History, Plan, PlanOptions, RunQueue, ShardContext};
use crate::store::{
    DeployRow, FlakinessRow, QuarantineRow, ResultRow, RetryState, RunRow, Store, StoreError, WorkerRow,
};

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        Error::Internal(e.to_string())
    }
}

/// How long a flake counts as a flaky history: 30 days.
const FLAKY_MEMORY_MS: u64 = 30 * 24 * 3600 * 1000;

/// A test of an active run, as the scheduler tracks it.
#[derive(Debug)]
struct TestSlot {
    id: String,
    done: bool,
    leased: Option<AttemptId>,
    /// How many times this test was handed out.
    handouts: u32,
    plan: Plan,
    hist: History,
    /// Failures retried and workers lost so far in this run (stored, see [`RetryState`]).
    retry: RetryState,
    /// How many failed runs of this test are retried rather than counted.
    retries: u32,
    /// Quarantined in the suite when the run was submitted: runs, is reported, cannot fail
    /// the gate.
    quarantined: bool,
}

impl TestSlot {
    fn new(id: String, plan: Plan, hist: Option<&History>) -> Self {
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
    fn runs_alone(&self) -> bool {
        self.retry.failures > 0 || self.retry.lost >= 2
    }
}

/// Plans `ids` from the suite's history.
fn plan_tests(
    ids: Vec<String>,
    history: &HashMap<String, History>,
    policy: Policy,
    now: Now,
) -> (Vec<TestSlot>, Vec<Plan>) {
    let plans = scheduler::estimate(
        &ids,
        history,
        PlanOptions {
            fail_first: policy.fail_first,
        },
        now.ms,
    );
    let slots = ids
        .into_iter()
        .zip(&plans)
        .map(|(id, p)| {
            let h = history.get(&id);
            TestSlot::new(id, *p, h)
        })
        .collect();
    (slots, plans)
}

/// A run that has not ended.
#[derive(Debug)]
struct RunState {
    row: RunRow,
    kind: RunnerKind,
    tests: Vec<TestSlot>,
    queue: RunQueue,
    /// Tests handed out one at a time, preferably to a worker they have not failed or been
    /// lost on (see [`TestSlot::runs_alone`]), oldest first. They go before the queue.
    solo: Vec<u32>,
    /// Estimated work of the tests out on workers now.
    running_ms: f64,
    /// Slots that may take this run, as of a fleet version.
    fleet_slots: Option<(u64, usize)>,
    /// A discovery attempt must be handed out before the run has tests.
    discover_pending: bool,
    discover_handouts: u32,
    /// Counted results per outcome, indexed by `Outcome::to_wire`.
    done: [u32; 7],
    /// The same, for quarantined tests only (they do not count toward the gate).
    done_quarantined: [u32; 7],
    running: u32,
    live_attempts: u32,
    /// Workers whose runner failed for this run (setup, unreadable results): they get its
    /// shards only when no other worker could take them.
    excluded: HashSet<WorkerId>,
}

impl RunState {
    fn done_total(&self) -> u32 {
        self.done.iter().sum()
    }

    /// Counts test `idx` as done with `outcome`.
    fn count(&mut self, idx: u32, outcome: Outcome) {
        let t = &mut self.tests[idx as usize];
        t.done = true;
        t.leased = None;
        self.done[outcome.to_wire() as usize] += 1;
        if t.quarantined {
            self.done_quarantined[outcome.to_wire() as usize] += 1;
        }
    }

    /// Whether counted results of `outcome` fail the gate, quarantined tests aside.
    fn reds(&self, outcome: Outcome) -> u32 {
        let i = outcome.to_wire() as usize;
        self.done[i] - self.done_quarantined[i]
    }

    /// Puts an open test back: alone or in the queue.
    fn requeue(&mut self, idx: u32) {
        let t = &self.tests[idx as usize];
        if t.runs_alone() {
            self.solo.push(idx);
        } else {
            self.queue.push(idx, t.plan);
        }
    }

    fn counts(&self) -> pb::RunCounts {
        let total = self.tests.len() as u32;
        let d = |o: Outcome| self.done[o.to_wire() as usize];
        pb::RunCounts {
            total,
            queued: total - self.running - self.done_total(),
            running: self.running,
            passed: d(Outcome::Passed),
            failed: d(Outcome::Failed),
            skipped: d(Outcome::Skipped),
            flaky: d(Outcome::Flaky),
            timed_out: d(Outcome::TimedOut),
            infra_error: d(Outcome::InfraError),
        }
    }

    fn summary(&self) -> pb::RunSummary {
        summary_of(&self.row, self.counts())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptKind {
    Run,
    Discover,
}

#[derive(Debug)]
struct Attempt {
    shard: ShardId,
    run: RunId,
    worker: WorkerId,
    kind: AttemptKind,
    /// Tests of the shard still without a result from this attempt.
    pending: Vec<u32>,
    total: u32,
    /// Sum of the durations reported so far, to measure the per-shard overhead.
    reported_ms: u64,
    lease_until: Instant,
    started_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerLiveness {
    Live,
    Lost,
    Gone,
}

impl WorkerLiveness {
    fn as_str(self) -> &'static str {
        match self {
            WorkerLiveness::Live => "live",
            WorkerLiveness::Lost => "lost",
            WorkerLiveness::Gone => "gone",
        }
    }
}

#[derive(Debug)]
struct WorkerState {
    row: WorkerRow,
    runners: HashMap<String, RunnerKind>,
    liveness: WorkerLiveness,
    last_seen: Instant,
    attempts: HashSet<AttemptId>,
}

/// Why a test went back to the queue.
#[derive(Debug, Clone)]
enum RequeueReason {
    LeaseExpired(String),
    NoResult(String),
    RunnerError(String),
    Deregistered(String),
}

impl RequeueReason {
    fn describe(&self) -> String {
        match self {
            RequeueReason::LeaseExpired(w) => format!("lease expired on worker {w}"),
            RequeueReason::NoResult(w) => format!("worker {w} finished the shard without a result"),
            RequeueReason::RunnerError(e) => format!("runner failed: {e}"),
            RequeueReason::Deregistered(w) => format!("worker {w} left"),
        }
    }
}

/// What one message to the core produced besides its reply.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<pb::run_event::Event>,
    /// New work was queued: wake waiting `AcquireShard` calls.
    pub work_added: bool,
    /// A deploy is waiting for the rollout task.
    pub deploy_added: bool,
}

#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    store: Store,
    /// Active runs by id; ids are time-ordered, so iteration is oldest first.
    runs: BTreeMap<RunId, RunState>,
    workers: HashMap<WorkerId, WorkerState>,
    attempts: HashMap<AttemptId, Attempt>,
    /// Runner names any worker has ever registered, with their kind.
    known_runners: BTreeMap<String, RunnerKind>,
    /// Measured cost of one hand-out per runner (ms): wall time of a shard minus its tests.
    overhead_ms: HashMap<String, f64>,
    /// Changes whenever a worker comes, goes, is lost or revives.
    fleet_version: u64,
    effects: Effects,
}

impl Core {
    /// Loads the store: known workers (as lost until they heartbeat) and every unfinished run,
    /// whose tests without a counted result go back to the queue.
    pub fn open(cfg: CoreConfig, store: Store, now: Now) -> Result<Self, Error> {
        let mut core = Self {
            cfg,
            store,
            runs: BTreeMap::new(),
            workers: HashMap::new(),
            attempts: HashMap::new(),
            known_runners: BTreeMap::new(),
            overhead_ms: HashMap::new(),
            fleet_version: 0,
            effects: Effects::default(),
        };
        for row in core.store.workers()? {
            for (name, kind) in &row.runners {
                core.known_runners.insert(name.clone(), *kind);
            }
            if row.state == WorkerLiveness::Gone.as_str() {
                continue;
            }
            let runners = row.runners.iter().cloned().collect();
            core.workers.insert(
                row.id,
                WorkerState {
                    row,
                    runners,
                    liveness: WorkerLiveness::Lost,
                    last_seen: now.at,
                    attempts: HashSet::new(),
                },
            );
        }
        // Attempts that were live when the coordinator stopped: a worker that still runs one
        // keeps it (its lease starts afresh) and reports into it.
        let mut stored_attempts: HashMap<RunId, Vec<crate::store::AttemptRow>> = HashMap::new();
        for a in core.store.attempts()? {
            stored_attempts.entry(a.run).or_default().push(a);
        }
        for row in core.store.unfinished_runs()? {
            let Some(kind) = core.known_runners.get(&row.runner).copied() else {
                warn!(run = %row.id, runner = %row.runner, "unfinished run names an unknown runner");
                continue;
            };
            let stored = core.store.tests(row.id)?;
            let outcomes: Vec<Option<Outcome>> = stored.iter().map(|t| t.outcome).collect();
            let quarantined: Vec<bool> = stored.iter().map(|t| t.quarantined).collect();
            let (ids, retries): (Vec<String>, Vec<RetryState>) =
                stored.into_iter().map(|t| (t.test_id, t.retry)).unzip();
            let (mut tests, plans) = core.plan(&row.suite, ids, row.policy, now)?;
            let mut done = [0; 7];
            let mut done_quarantined = [0; 7];
            for (((t, o), retry), q) in tests.iter_mut().zip(&outcomes).zip(retries).zip(quarantined) {
                t.retry = retry;
                t.quarantined = q;
                if let Some(o) = o {
                    t.done = true;
                    done[o.to_wire() as usize] += 1;
                    if q {
                        done_quarantined[o.to_wire() as usize] += 1;
                    }
                }
            }
            let mut restored = Vec::new();
            let mut rows = stored_attempts.remove(&row.id).unwrap_or_default();
            // Newest first: a test that failed and was handed out again belongs to its newest
            // attempt, which is the one running it.
            rows.sort_by_key(|a| std::cmp::Reverse(a.id));
            for a in rows {
                let worker_ok = core.workers.contains_key(&a.worker);
                let in_range = a.tests.iter().all(|&i| (i as usize) < tests.len());
                if !worker_ok || !in_range {
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
            let open = outcomes
                .iter()
                .enumerate()
                .filter(|(i, o)| o.is_none() && tests[*i].leased.is_none())
                .map(|(i, _)| i as u32)
                .collect::<Vec<_>>();
            let discovering = restored.iter().any(|(a, _)| a.discover);
            let (solo, open): (Vec<u32>, Vec<u32>) =
                open.into_iter().partition(|&i| tests[i as usize].runs_alone());
            let mut state = RunState {
                discover_pending: row.discover && tests.is_empty() && !discovering,
                queue: RunQueue::with(&plans, open),
                solo,
                row,
                kind,
                tests,
                running_ms: 0.0,
                fleet_slots: None,
                discover_handouts: 0,
                done,
                done_quarantined,
                running: 0,
                live_attempts: 0,
                excluded: HashSet::new(),
            };
            for (a, pending) in restored {
                state.running += pending.len() as u32;
                state.running_ms += pending
                    .iter()
                    .map(|&i| state.tests[i as usize].plan.estimate_ms)
                    .sum::<f64>();
                state.live_attempts += 1;
                if let Some(w) = core.workers.get_mut(&a.worker) {
                    w.attempts.insert(a.id);
                }
                core.attempts.insert(
                    a.id,
                    Attempt {
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
                        lease_until: now.at + core.cfg.lease,
                        started_ms: a.started_ms,
                    },
                );
            }
            info!(run = %state.row.id, queued = state.queue.len(), kept = state.live_attempts, "resumed unfinished run");
            core.runs.insert(state.row.id, state);
        }
        for (_, rows) in stored_attempts {
            for a in rows {
                core.store.delete_attempt(a.id)?;
            }
        }
        for id in core.store.attempts()?.into_iter().map(|a| a.id) {
            if !core.attempts.contains_key(&id) {
                core.store.delete_attempt(id)?;
            }
        }
        // A deploy whose hook was running when the coordinator stopped may or may not have
        // happened: it is shown as unknown, never run again.
        for d in core.store.deploys(Some("running"), u32::MAX)? {
            warn!(deploy = %d.id, run = %d.run_id, "rollout was interrupted; its outcome is unknown");
            core.store.update_deploy(
                &d.id,
                "running",
                "unknown",
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
            .filter(|r| {
                !r.discover_pending && r.done_total() as usize == r.tests.len() && !r.tests.is_empty()
            })
            .map(|r| r.row.id)
            .collect();
        for id in complete {
            core.conclude(id, now)?;
        }
        core.effects.work_added = true;
        Ok(core)
    }

    /// Plans a run's tests from its suite's duration history, and gives tests that flaked in
    /// the suite lately their extra retries.
    fn plan(
        &self,
        suite: &str,
        ids: Vec<String>,
        policy: Policy,
        now: Now,
    ) -> Result<(Vec<TestSlot>, Vec<Plan>), Error> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let history = self.store.history(suite)?;
        let flaky = self
            .store
            .flaky_tests(suite, now.ms.saturating_sub(FLAKY_MEMORY_MS))?;
        let (mut tests, plans) = plan_tests(ids, &history, policy, now);
        for t in &mut tests {
            t.retries = policy.retries_for(flaky.contains(&t.id));
        }
        Ok((tests, plans))
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Starts a group commit (see [`Store::begin_batch`]).
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.store.begin_batch()
    }

    /// Makes every write since [`Core::begin_batch`] durable.
    pub fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.store.commit_batch()
    }

    /// Events produced since the last [`Core::take_effects`], not yet published.
    pub fn pending_events(&self) -> usize {
        self.effects.events.len()
    }

    /// Takes what the last messages produced.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    // -----------------------------------------------------------------------------------------
    // Runs
    // -----------------------------------------------------------------------------------------

    pub fn submit(&mut self, req: pb::SubmitRunRequest, now: Now) -> Result<pb::RunSummary, Error> {
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
        if req.discover && !req.tests.is_empty() {
            return Err(Error::invalid(
                "tests",
                "give either a test list or discover, not both",
            ));
        }
        if !req.discover {
            validate::test_list(kind, &req.tests)?;
        }
        let row = RunRow {
            id: RunId::new(),
            suite: req.suite,
            revision: req.revision,
            requested_by: req.requested_by,
            runner: req.runner,
            labels,
            policy: Policy::resolve(req.policy.as_ref(), &self.cfg),
            priority: req.priority,
            discover: req.discover,
            status: RunStatus::Queued,
            message: String::new(),
            created_ms: now.ms,
            started_ms: 0,
            finished_ms: 0,
            shards: 0,
        };
        if req.rollout || !req.authors.is_empty() {
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
        }
        self.store.insert_run(&row, &req.tests)?;
        if req.rollout {
            self.store.add_rollout_request(row.id, &req.authors)?;
        }
        let quarantined = self.store.mark_quarantined(row.id, &row.suite)?;
        let (mut tests, plans) = self.plan(&row.suite, req.tests, row.policy, now)?;
        for i in quarantined {
            tests[i as usize].quarantined = true;
        }
        let state = RunState {
            discover_pending: row.discover,
            kind,
            tests,
            queue: RunQueue::new(&plans),
            solo: Vec::new(),
            running_ms: 0.0,
            fleet_slots: None,
            discover_handouts: 0,
            done: [0; 7],
            done_quarantined: [0; 7],
            running: 0,
            live_attempts: 0,
            excluded: HashSet::new(),
            row,
        };
        let summary = state.summary();
        info!(run = %state.row.id, suite = %state.row.suite, tests = state.tests.len(), "run submitted");
        self.runs.insert(state.row.id, state);
        self.effects.work_added = true;
        self.effects
            .events
            .push(pb::run_event::Event::Progress(summary.clone()));
        Ok(summary)
    }

    pub fn cancel(&mut self, run: RunId, reason: &str, now: Now) -> Result<pb::RunSummary, Error> {
        if !self.runs.contains_key(&run) {
            let row = self.store.run(run)?.ok_or_else(|| Error::not_found("run", run))?;
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
        self.finish_run(run, RunStatus::Cancelled, message, now)
    }

    /// A run's summary from memory when active, from the store otherwise.
    pub fn summary(&self, run: RunId) -> Result<pb::RunSummary, Error> {
        if let Some(r) = self.runs.get(&run) {
            return Ok(r.summary());
        }
        let row = self.store.run(run)?.ok_or_else(|| Error::not_found("run", run))?;
        let mut counts = pb::RunCounts::default();
        for (o, n) in self.store.outcome_counts(run)? {
            counts.total += n;
            match o {
                None => counts.queued += n,
                Some(Outcome::Passed) => counts.passed += n,
                Some(Outcome::Failed) => counts.failed += n,
                Some(Outcome::Skipped) => counts.skipped += n,
                Some(Outcome::Flaky) => counts.flaky += n,
                Some(Outcome::TimedOut) => counts.timed_out += n,
                Some(Outcome::InfraError) => counts.infra_error += n,
            }
        }
        Ok(summary_of(&row, counts))
    }

    pub fn get_run(&self, run: RunId, include_results: bool) -> Result<pb::GetRunResponse, Error> {
        let summary = self.summary(run)?;
        let results = if include_results {
            self.store.results(run)?
        } else {
            Vec::new()
        };
        Ok(pb::GetRunResponse {
            run: Some(summary),
            results,
        })
    }

    pub fn list_runs(&self, limit: u32) -> Result<Vec<pb::RunSummary>, Error> {
        let limit = if limit == 0 { 50 } else { limit.min(1000) };
        self.store
            .runs(limit)?
            .into_iter()
            .map(|row| self.summary(row.id))
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Workers
    // -----------------------------------------------------------------------------------------

    pub fn register(&mut self, req: pb::RegisterRequest, now: Now) -> Result<pb::RegisterResponse, Error> {
        validate::name("name", &req.name, true)?;
        if req.slots == 0 || req.slots > 1024 {
            return Err(Error::invalid(
                "slots",
                format!("{} is out of range 1..=1024", req.slots),
            ));
        }
        let labels = labels::from_wire("labels", &req.labels)?;
        if req.runners.is_empty() {
            return Err(Error::invalid(
                "runners",
                "a worker must offer at least one runner",
            ));
        }
        let mut runners = HashMap::new();
        for r in &req.runners {
            validate::name("runners", &r.name, true)?;
            let kind = RunnerKind::from_wire(r.kind).ok_or_else(|| {
                Error::invalid(
                    "runners",
                    format!("runner '{}' has an unknown kind {}", r.name, r.kind),
                )
            })?;
            if let Some(&known) = self.known_runners.get(&r.name)
                && known != kind
            {
                return Err(Error::invalid(
                    "runners",
                    format!(
                        "runner '{}' is registered as kind '{known}' by other workers, not '{kind}'",
                        r.name
                    ),
                ));
            }
            runners.insert(r.name.clone(), kind);
        }
        let id = WorkerId::new();
        let row = WorkerRow {
            id,
            name: req.name,
            slots: req.slots,
            labels,
            runners: {
                let mut v: Vec<_> = runners.iter().map(|(n, k)| (n.clone(), *k)).collect();
                v.sort();
                v
            },
            registered_ms: now.ms,
            last_seen_ms: now.ms,
            state: WorkerLiveness::Live.as_str().to_owned(),
        };
        self.store.upsert_worker(&row)?;
        for (n, k) in &runners {
            self.known_runners.insert(n.clone(), *k);
        }
        info!(worker = %id, name = %row.name, slots = row.slots, "worker registered");
        self.fleet_version += 1;
        self.workers.insert(
            id,
            WorkerState {
                row,
                runners,
                liveness: WorkerLiveness::Live,
                last_seen: now.at,
                attempts: HashSet::new(),
            },
        );
        self.effects.work_added = true;
        Ok(pb::RegisterResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            lease_ms: self.cfg.lease.as_millis() as u64,
        })
    }

    pub fn heartbeat(
        &mut self,
        worker: WorkerId,
        attempts: &[String],
        now: Now,
    ) -> Result<pb::HeartbeatResponse, Error> {
        let lease = self.cfg.lease;
        let Some(w) = self.workers.get_mut(&worker) else {
            return Ok(pb::HeartbeatResponse {
                cancel_attempt_ids: Vec::new(),
                reregister: true,
            });
        };
        if w.liveness == WorkerLiveness::Gone {
            return Ok(pb::HeartbeatResponse {
                cancel_attempt_ids: attempts.to_vec(),
                reregister: true,
            });
        }
        self.touch(worker, now)?;
        let mut cancel = Vec::new();
        for a in attempts {
            match a
                .parse::<AttemptId>()
                .ok()
                .and_then(|id| self.attempts.get_mut(&id))
            {
                Some(att) if att.worker == worker => att.lease_until = now.at + lease,
                _ => cancel.push(a.clone()),
            }
        }
        Ok(pb::HeartbeatResponse {
            cancel_attempt_ids: cancel,
            reregister: false,
        })
    }

    /// Any call from a worker proves it is alive: a lost worker that calls again is live again.
    fn touch(&mut self, worker: WorkerId, now: Now) -> Result<(), Error> {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Ok(());
        };
        w.last_seen = now.at;
        if w.liveness == WorkerLiveness::Lost {
            let mut row = w.row.clone();
            row.state = WorkerLiveness::Live.as_str().to_owned();
            row.last_seen_ms = now.ms;
            self.store.upsert_worker(&row)?;
            w.row = row;
            w.liveness = WorkerLiveness::Live;
            self.fleet_version += 1;
            info!(worker = %worker, "worker is live again");
            self.effects.work_added = true;
        }
        Ok(())
    }

    pub fn deregister(&mut self, worker: WorkerId, now: Now) -> Result<(), Error> {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Err(Error::not_found("worker", worker));
        };
        w.liveness = WorkerLiveness::Gone;
        self.fleet_version += 1;
        w.row.state = WorkerLiveness::Gone.as_str().to_owned();
        w.row.last_seen_ms = now.ms;
        let row = w.row.clone();
        let attempts: Vec<AttemptId> = w.attempts.iter().copied().collect();
        self.store.upsert_worker(&row)?;
        for a in attempts {
            self.end_attempt(a, RequeueReason::Deregistered(row.name.clone()), now)?;
        }
        info!(worker = %worker, name = %row.name, "worker deregistered");
        Ok(())
    }

    pub fn list_workers(&self, include_gone: bool) -> Vec<pb::WorkerInfo> {
        let mut out: Vec<_> = self
            .workers
            .values()
            .filter(|w| include_gone || w.liveness != WorkerLiveness::Gone)
            .map(|w| pb::WorkerInfo {
                worker_id: w.row.id.to_string(),
                name: w.row.name.clone(),
                slots: w.row.slots,
                busy_slots: w.attempts.len() as u32,
                labels: labels::to_wire(&w.row.labels),
                runners: w
                    .row
                    .runners
                    .iter()
                    .map(|(n, k)| pb::RunnerInfo {
                        name: n.clone(),
                        kind: k.to_wire(),
                    })
                    .collect(),
                state: w.liveness.as_str().to_owned(),
                last_seen_ms: w.row.last_seen_ms,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.worker_id.cmp(&b.worker_id)));
        out
    }

    pub fn progress(&self, run: Option<RunId>) -> Result<pb::RunProgressResponse, Error> {
        let runs = match run {
            Some(id) => vec![self.summary(id)?],
            None => self.runs.values().map(RunState::summary).collect(),
        };
        let mut shards: Vec<_> = self
            .attempts
            .iter()
            .filter(|(_, a)| run.is_none_or(|r| a.run == r))
            .map(|(id, a)| pb::ShardProgress {
                attempt_id: id.to_string(),
                run_id: a.run.to_string(),
                worker: self
                    .workers
                    .get(&a.worker)
                    .map(|w| w.row.name.clone())
                    .unwrap_or_default(),
                tests: a.total,
                done: a.total - a.pending.len() as u32,
                started_at_ms: a.started_ms,
                shard_id: a.shard.to_string(),
            })
            .collect();
        shards.sort_by(|a, b| a.attempt_id.cmp(&b.attempt_id));
        Ok(pb::RunProgressResponse { runs, shards })
    }

    // -----------------------------------------------------------------------------------------
    // Shards
    // -----------------------------------------------------------------------------------------

    /// Forms a shard for `worker` from the run that most deserves a free slot, or `None` when
    /// no run this worker may take has work.
    pub fn acquire(&mut self, worker: WorkerId, now: Now) -> Result<Option<pb::Shard>, Error> {
        let w = self
            .workers
            .get(&worker)
            .ok_or_else(|| Error::not_found("worker", worker))?;
        if w.liveness == WorkerLiveness::Gone {
            return Err(Error::FailedPrecondition(format!(
                "worker '{worker}' deregistered"
            )));
        }
        if w.attempts.len() as u32 >= w.row.slots {
            self.touch(worker, now)?;
            return Ok(None);
        }
        self.touch(worker, now)?;
        let w = &self.workers[&worker];
        let fits = |w: &WorkerState, r: &RunState| {
            w.runners.get(&r.row.runner) == Some(&r.kind) && labels::satisfies(&w.row.labels, &r.row.labels)
        };
        let eligible = |r: &RunState| {
            (r.discover_pending || !r.queue.is_empty() || self.solo_for(r, worker).is_some())
                && fits(w, r)
                && (!r.excluded.contains(&worker)
                    // Excluded, but no other live worker could take the run: better this
                    // worker than a run that never ends.
                    || !self.workers.values().any(|o| {
                        o.row.id != worker
                            && o.liveness == WorkerLiveness::Live
                            && !r.excluded.contains(&o.row.id)
                            && fits(o, r)
                    }))
        };
        // Highest priority first; among equals the run with the fewest live attempts (a fair
        // share of the fleet), then the oldest.
        let Some(run_id) = self
            .runs
            .values()
            .filter(|r| eligible(r))
            .min_by_key(|r| (std::cmp::Reverse(r.row.priority), r.live_attempts, r.row.id))
            .map(|r| r.row.id)
        else {
            return Ok(None);
        };
        let fleet_slots = self.eligible_slots(run_id);
        let overhead_ms = self.overhead(&self.runs[&run_id].row.runner);
        let run = self.runs.get_mut(&run_id).expect("chosen from the map");
        if run.row.status == RunStatus::Queued {
            // The store first: if the write fails, nothing has been taken from the queue.
            let mut row = run.row.clone();
            row.status = RunStatus::Running;
            row.started_ms = now.ms;
            self.store.update_run_status(&row)?;
            run.row = row;
            self.effects
                .events
                .push(pb::run_event::Event::Progress(run.summary()));
        }
        let solo = self.solo_for(&self.runs[&run_id], worker);
        let run = self.runs.get_mut(&run_id).expect("chosen from the map");
        let (kind, tests) = if run.discover_pending {
            run.discover_pending = false;
            run.discover_handouts += 1;
            (AttemptKind::Discover, Vec::new())
        } else if let Some(pos) = solo {
            (AttemptKind::Run, vec![run.solo.remove(pos)])
        } else {
            let ctx = ShardContext {
                slots: fleet_slots,
                running_ms: run.running_ms,
                overhead_ms,
            };
            (AttemptKind::Run, run.queue.next_shard(ctx))
        };
        let attempt_id = AttemptId::new();
        let shard_id = ShardId::new();
        let row = crate::store::AttemptRow {
            id: attempt_id,
            run: run_id,
            worker,
            shard: shard_id,
            discover: kind == AttemptKind::Discover,
            tests: tests.clone(),
            started_ms: now.ms,
        };
        if let Err(e) = self.store.insert_attempt(&row) {
            // Nothing was handed out: put the tests back.
            for &i in &tests {
                run.requeue(i);
            }
            if kind == AttemptKind::Discover {
                run.discover_pending = true;
            }
            return Err(e.into());
        }
        for &i in &tests {
            let t = &mut run.tests[i as usize];
            t.leased = Some(attempt_id);
            t.handouts += 1;
            run.running_ms += t.plan.estimate_ms;
        }
        run.running += tests.len() as u32;
        run.live_attempts += 1;
        run.row.shards += 1;
        let shard = pb::Shard {
            shard_id: shard_id.to_string(),
            attempt_id: attempt_id.to_string(),
            run_id: run_id.to_string(),
            kind: match kind {
                AttemptKind::Run => pb::ShardKind::Run as i32,
                AttemptKind::Discover => pb::ShardKind::Discover as i32,
            },
            runner: run.row.runner.clone(),
            suite: run.row.suite.clone(),
            revision: run.row.revision.clone(),
            tests: tests.iter().map(|&i| run.tests[i as usize].id.clone()).collect(),
            policy: Some(run.row.policy.to_wire()),
            lease_ms: self.cfg.lease.as_millis() as u64,
        };
        self.attempts.insert(
            attempt_id,
            Attempt {
                shard: shard_id,
                run: run_id,
                worker,
                kind,
                total: tests.len() as u32,
                pending: tests,
                reported_ms: 0,
                lease_until: now.at + self.cfg.lease,
                started_ms: now.ms,
            },
        );
        self.workers
            .get_mut(&worker)
            .expect("checked above")
            .attempts
            .insert(attempt_id);
        Ok(Some(shard))
    }

    /// The position in `run.solo` of the first test `worker` should take: one it has not failed
    /// or lost, or one it has when no other live worker free of that history could take it.
    fn solo_for(&self, run: &RunState, worker: WorkerId) -> Option<usize> {
        run.solo.iter().position(|&i| {
            let avoid = &run.tests[i as usize].retry.avoid;
            !avoid.contains(&worker)
                || !self.workers.values().any(|o| {
                    o.row.id != worker
                        && o.liveness == WorkerLiveness::Live
                        && !avoid.contains(&o.row.id)
                        && !run.excluded.contains(&o.row.id)
                        && o.runners.get(&run.row.runner) == Some(&run.kind)
                        && labels::satisfies(&o.row.labels, &run.row.labels)
                })
        })
    }

    /// Quarantines `test` automatically when its flake rate has passed the threshold.
    fn auto_quarantine(&mut self, suite: &str, test: &str, now: Now) -> Result<(), Error> {
        let Some(f) = self.store.flakiness_of(suite, test)? else {
            return Ok(());
        };
        if !self.proposes_quarantine(&f) {
            return Ok(());
        }
        let reason = format!(
            "flaked in {} of {} runs ({:.1} %), past the {:.1} % threshold",
            f.flakes,
            f.runs,
            100.0 * flake_rate(&f),
            100.0 * self.cfg.quarantine_threshold
        );
        info!(suite, test, %reason, "quarantined automatically");
        self.store.add_quarantine(&QuarantineRow {
            suite: suite.to_owned(),
            test_id: test.to_owned(),
            reason,
            added_by: "shardgate".into(),
            added_ms: now.ms,
            automatic: true,
        })?;
        Ok(())
    }

    fn proposes_quarantine(&self, f: &FlakinessRow) -> bool {
        f.runs >= self.cfg.quarantine_min_runs && flake_rate(f) >= self.cfg.quarantine_threshold
    }

    /// Takes the oldest pending deploy and marks it running (committed before the caller hears
    /// of it, so the hook runs at most once even if the coordinator dies during it).
    pub fn start_next_deploy(&mut self, now: Now) -> Result<Option<DeployRow>, Error> {
        let Some(mut d) = self.store.next_pending_deploy()? else {
            return Ok(None);
        };
        if !self
            .store
            .update_deploy(&d.id, "pending", "running", now.ms, "")?
        {
            return Ok(None);
        }
        d.state = "running".into();
        d.started_ms = now.ms;
        info!(deploy = %d.id, run = %d.run_id, revision = %d.revision, "rollout starting");
        Ok(Some(d))
    }

    /// Records how a running deploy ended.
    pub fn finish_deploy(&mut self, id: &str, state: &str, detail: &str, now: Now) -> Result<(), Error> {
        if !self.store.update_deploy(id, "running", state, now.ms, detail)? {
            return Err(Error::FailedPrecondition(format!("deploy '{id}' is not running")));
        }
        info!(deploy = %id, state, "rollout ended");
        Ok(())
    }

    /// The deploy log and how often deploys happen.
    pub fn list_deploys(&self, limit: u32, now: Now) -> Result<pb::ListDeploysResponse, Error> {
        let limit = if limit == 0 { 20 } else { limit.min(10_000) };
        let deploys = self.store.deploys(None, limit)?;
        let last = self.store.last_started_deploy()?;
        const DAY_MS: u64 = 24 * 3600 * 1000;
        Ok(pb::ListDeploysResponse {
            last_started_at_ms: last.as_ref().map(|d| d.started_ms).unwrap_or(0),
            last_requested_by: last.map(|d| d.requested_by).unwrap_or_default(),
            last_day: self.store.deploys_since(now.ms.saturating_sub(DAY_MS))?,
            last_week: self.store.deploys_since(now.ms.saturating_sub(7 * DAY_MS))?,
            deploys: deploys
                .into_iter()
                .map(|d| pb::Deploy {
                    deploy_id: d.id,
                    run_id: d.run_id.to_string(),
                    suite: d.suite,
                    revision: d.revision,
                    requested_by: d.requested_by,
                    authors: d.authors,
                    created_at_ms: d.created_ms,
                    started_at_ms: d.started_ms,
                    finished_at_ms: d.finished_ms,
                    state: d.state,
                    detail: d.detail,
                })
                .collect(),
        })
    }

    /// The flakiest tests of `suite`.
    pub fn list_flaky(&self, suite: &str, limit: u32) -> Result<Vec<pb::FlakyTest>, Error> {
        if suite.is_empty() {
            return Err(Error::invalid("suite", "name the suite"));
        }
        let limit = if limit == 0 { 50 } else { limit.min(10_000) };
        let quarantined: HashSet<String> = self
            .store
            .quarantine(Some(suite))?
            .into_iter()
            .map(|q| q.test_id)
            .collect();
        Ok(self
            .store
            .flakiness(suite, limit)?
            .into_iter()
            .map(|f| pb::FlakyTest {
                suite: suite.to_owned(),
                flake_rate: flake_rate(&f),
                quarantined: quarantined.contains(&f.test_id),
                propose_quarantine: self.proposes_quarantine(&f) && !quarantined.contains(&f.test_id),
                test_id: f.test_id,
                runs: f.runs,
                failures: f.failures,
                flakes: f.flakes,
                flips: f.flips,
                last_flake_at_ms: f.last_flake_ms,
                last_run_at_ms: f.last_run_ms,
            })
            .collect())
    }

    pub fn add_quarantine(
        &mut self,
        req: pb::AddQuarantineRequest,
        now: Now,
    ) -> Result<pb::QuarantineEntry, Error> {
        for (field, value) in [
            ("suite", &req.suite),
            ("test_id", &req.test_id),
            ("reason", &req.reason),
            ("added_by", &req.added_by),
        ] {
            if value.trim().is_empty() {
                return Err(Error::invalid(field, format!("{field} must not be empty")));
            }
            if value.len() > 4096 {
                return Err(Error::invalid(
                    field,
                    format!("{field} is longer than 4096 bytes"),
                ));
            }
        }
        let row = QuarantineRow {
            suite: req.suite,
            test_id: req.test_id,
            reason: req.reason,
            added_by: req.added_by,
            added_ms: now.ms,
            automatic: false,
        };
        self.store.add_quarantine(&row)?;
        info!(suite = %row.suite, test = %row.test_id, by = %row.added_by, "quarantined");
        Ok(quarantine_entry(row))
    }

    pub fn remove_quarantine(&mut self, suite: &str, test: &str) -> Result<bool, Error> {
        let removed = self.store.remove_quarantine(suite, test)?;
        if removed {
            info!(suite, test, "quarantine lifted");
        }
        Ok(removed)
    }

    pub fn list_quarantine(&self, suite: &str) -> Result<Vec<pb::QuarantineEntry>, Error> {
        let suite = (!suite.is_empty()).then_some(suite);
        Ok(self
            .store
            .quarantine(suite)?
            .into_iter()
            .map(quarantine_entry)
            .collect())
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
            .filter(|w| {
                w.liveness == WorkerLiveness::Live
                    && w.runners.get(&r.row.runner) == Some(&r.kind)
                    && labels::satisfies(&w.row.labels, &r.row.labels)
            })
            .map(|w| w.row.slots as usize)
            .sum();
        self.runs.get_mut(&run).expect("checked above").fleet_slots = Some((version, n));
        n
    }

    fn live_attempt(&self, worker: WorkerId, attempt: AttemptId) -> Result<&Attempt, Error> {
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
        self.live_attempt(worker, attempt_id)?;
        self.touch(worker, now)?;
        let attempt = &self.attempts[&attempt_id];
        if attempt.kind != AttemptKind::Run {
            return Err(Error::FailedPrecondition(format!(
                "attempt '{attempt_id}' is a discovery; report its tests with ReportDiscovery"
            )));
        }
        let run_id = attempt.run;
        let Some(run) = self.runs.get(&run_id) else {
            return Ok(pb::ReportResultsResponse {
                accepted: 0,
                stop: true,
            });
        };
        let worker_name = self
            .workers
            .get(&worker)
            .map(|w| w.row.name.clone())
            .unwrap_or_default();
        let mut rows = Vec::with_capacity(results.len());
        let mut retry: Vec<(u32, String, String)> = Vec::new();
        let mut seen = HashSet::new();
        for r in results {
            let outcome = Outcome::from_wire(r.outcome).ok_or_else(|| {
                Error::invalid(
                    "results",
                    format!("test '{}' has no valid outcome ({})", r.test_id, r.outcome),
                )
            })?;
            let Some(&idx) = attempt
                .pending
                .iter()
                .find(|&&i| run.tests[i as usize].id == r.test_id)
            else {
                warn!(attempt = %attempt_id, test = %r.test_id, "result for a test this attempt does not hold; not counted");
                continue;
            };
            if !seen.insert(idx) {
                continue;
            }
            let t = &run.tests[idx as usize];
            let failed = matches!(outcome, Outcome::Failed | Outcome::TimedOut);
            if failed && t.retry.failures < t.retries {
                // Not counted yet: the test runs again, and only then do we know whether it is
                // broken or flaky.
                retry.push((
                    idx,
                    cap(&r.detail, 1024),
                    cap(&r.output, self.cfg.max_output_bytes),
                ));
                continue;
            }
            let failures = t.retry.failures;
            let (outcome, detail, output) = match (&t.retry.first_failure, outcome) {
                (Some((d, o, w)), Outcome::Passed) => (
                    Outcome::Flaky,
                    format!(
                        "passed on attempt {} after {failures} failure(s); first failure on {w}: {d}",
                        failures + 1,
                    ),
                    o.clone(),
                ),
                (Some(_), _) if failed => (
                    outcome,
                    format!(
                        "failed {} of {} attempts: {}",
                        failures + 1,
                        failures + 1,
                        r.detail
                    ),
                    r.output.clone(),
                ),
                _ => (outcome, r.detail.clone(), r.output.clone()),
            };
            rows.push(ResultRow {
                idx,
                test_id: t.id.clone(),
                history: t.hist.update(outcome, r.duration_ms, now.ms),
                outcome,
                duration_ms: r.duration_ms,
                attempts: run.tests[idx as usize].handouts,
                worker: worker_name.clone(),
                detail: cap(&detail, 1024),
                output: cap(&output, self.cfg.max_output_bytes),
                at_ms: now.ms,
            });
        }
        // The retry state of failed tests is stored with the results: a restart must not grant
        // an extra retry.
        let mut states = Vec::with_capacity(retry.len());
        for (idx, detail, output) in &retry {
            let mut st = run.tests[*idx as usize].retry.clone();
            st.failures += 1;
            if st.first_failure.is_none() {
                st.first_failure = Some((detail.clone(), output.clone(), worker_name.clone()));
            }
            if !st.avoid.contains(&worker) {
                st.avoid.push(worker);
            }
            states.push((*idx, st));
        }
        let refs: Vec<(u32, &RetryState)> = states.iter().map(|(i, st)| (*i, st)).collect();
        let written = self.store.record_results(run_id, &run.row.suite, &rows, &refs)?;
        if self.cfg.auto_quarantine {
            let suite = run.row.suite.clone();
            let flaky: Vec<String> = rows
                .iter()
                .filter(|r| r.outcome == Outcome::Flaky && !run.tests[r.idx as usize].quarantined)
                .map(|r| r.test_id.clone())
                .collect();
            for test in flaky {
                self.auto_quarantine(&suite, &test, now)?;
            }
        }
        debug_assert_eq!(
            written,
            rows.len(),
            "memory and store agree on which tests are open"
        );
        let lease = self.cfg.lease;
        let attempt = self.attempts.get_mut(&attempt_id).expect("checked live above");
        attempt.lease_until = now.at + lease;
        let counted: HashSet<u32> = rows
            .iter()
            .map(|r| r.idx)
            .chain(retry.iter().map(|r| r.0))
            .collect();
        attempt.pending.retain(|i| !counted.contains(i));
        attempt.reported_ms += rows.iter().map(|r| r.duration_ms).sum::<u64>();
        let run = self.runs.get_mut(&run_id).expect("checked above");
        if !states.is_empty() {
            for (idx, st) in states {
                let t = &mut run.tests[idx as usize];
                t.retry = st;
                t.hist = t.hist.update(Outcome::Failed, 0, now.ms);
                t.leased = None;
                run.running -= 1;
                run.running_ms -= t.plan.estimate_ms;
                info!(run = %run_id, test = %t.id, failures = t.retry.failures, "test failed; running it again");
                run.requeue(idx);
            }
            self.effects.work_added = true;
        }
        for r in &rows {
            let t = &mut run.tests[r.idx as usize];
            t.hist = r.history;
            run.running -= 1;
            run.running_ms -= t.plan.estimate_ms;
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
        let accepted = rows.len() as u32;
        let confirmed = rows.iter().find(|r| {
            matches!(r.outcome, Outcome::Failed | Outcome::TimedOut) && !run.tests[r.idx as usize].quarantined
        });
        if let (true, Some(r)) = (run.row.policy.fail_fast, confirmed)
            && run.done_total() as usize != run.tests.len()
        {
            let open = run.tests.len() - run.done_total() as usize;
            let message = format!(
                "fail-fast: '{}' failed after {} attempt(s); {open} test(s) left unrun were cancelled, verdict {} ms after the start",
                r.test_id,
                r.attempts,
                now.ms.saturating_sub(run.row.started_ms)
            );
            info!(run = %run_id, test = %r.test_id, "fail-fast: the run fails now");
            self.finish_run(run_id, RunStatus::Failed, message, now)?;
        } else if run.done_total() as usize == run.tests.len() {
            self.conclude(run_id, now)?;
        }
        Ok(pb::ReportResultsResponse {
            accepted,
            stop: !self.runs.contains_key(&run_id),
        })
    }

    /// Takes the test list a discovery attempt found.
    pub fn discovery(
        &mut self,
        worker: WorkerId,
        attempt_id: AttemptId,
        tests: Vec<String>,
        error: &str,
        now: Now,
    ) -> Result<(), Error> {
        let attempt = self.live_attempt(worker, attempt_id)?;
        if attempt.kind != AttemptKind::Discover {
            return Err(Error::FailedPrecondition(format!(
                "attempt '{attempt_id}' is not a discovery"
            )));
        }
        let run_id = attempt.run;
        let worker_name = self
            .workers
            .get(&worker)
            .map(|w| w.row.name.clone())
            .unwrap_or_default();
        let kind = self
            .runs
            .get(&run_id)
            .map(|r| r.kind)
            .ok_or_else(|| Error::FailedPrecondition(format!("run '{run_id}' ended")))?;
        self.forget_attempt(attempt_id);
        let failure = if !error.is_empty() {
            Some(format!("discovery failed on worker {worker_name}: {error}"))
        } else if tests.is_empty() {
            Some(format!("discovery on worker {worker_name} found no tests"))
        } else {
            validate::test_list(kind, &tests)
                .err()
                .map(|e| format!("discovery on worker {worker_name} returned a bad test list: {e}"))
        };
        if let Some(message) = failure {
            warn!(run = %run_id, %message, "discovery failed");
            self.finish_run(run_id, RunStatus::Errored, message, now)?;
            return Ok(());
        }
        self.store.add_tests(run_id, 0, &tests)?;
        let (suite, policy) = {
            let r = &self.runs[&run_id];
            (r.row.suite.clone(), r.row.policy)
        };
        let quarantined = self.store.mark_quarantined(run_id, &suite)?;
        let (mut slots, plans) = self.plan(&suite, tests, policy, now)?;
        for i in quarantined {
            slots[i as usize].quarantined = true;
        }
        let run = self.runs.get_mut(&run_id).expect("checked above");
        run.tests = slots;
        run.queue = RunQueue::new(&plans);
        info!(run = %run_id, tests = run.tests.len(), worker = %worker_name, "tests discovered");
        self.effects
            .events
            .push(pb::run_event::Event::Progress(run.summary()));
        self.effects.work_added = true;
        Ok(())
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
        match self.live_attempt(worker, attempt_id) {
            Ok(_) => {}
            // The attempt already ended (its run finished, its lease expired): nothing is left
            // to requeue, and finishing twice is harmless.
            Err(_) if !self.attempts.contains_key(&attempt_id) => {
                return Ok(pb::FinishShardResponse { requeued: 0 });
            }
            Err(e) => return Err(e),
        }
        let worker_name = self
            .workers
            .get(&worker)
            .map(|w| w.row.name.clone())
            .unwrap_or_default();
        let reason = if draining {
            RequeueReason::Deregistered(worker_name)
        } else if error.is_empty() {
            RequeueReason::NoResult(worker_name)
        } else {
            // The runner failed on this worker: send the shard's tests elsewhere.
            let run = self.attempts[&attempt_id].run;
            if let Some(r) = self.runs.get_mut(&run) {
                r.excluded.insert(worker);
            }
            RequeueReason::RunnerError(cap(error, 2048))
        };
        let a = &self.attempts[&attempt_id];
        if a.pending.is_empty() && a.kind == AttemptKind::Run && a.total > 0 {
            // A whole shard's wall time minus its tests' time is what one hand-out costs.
            let runner = self.runs.get(&a.run).map(|r| r.row.runner.clone());
            let sample = now.ms.saturating_sub(a.started_ms).saturating_sub(a.reported_ms) as f64;
            if let Some(runner) = runner {
                let initial = self.cfg.initial_overhead.as_millis() as f64;
                let o = self.overhead_ms.entry(runner).or_insert(initial);
                *o += 0.2 * (sample - *o);
            }
        }
        let requeued = self.end_attempt(attempt_id, reason, now)?;
        Ok(pb::FinishShardResponse { requeued })
    }

    /// Expires attempts whose lease ran out and marks silent workers lost.
    pub fn tick(&mut self, now: Now) -> Result<(), Error> {
        let expired: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.lease_until <= now.at)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // Ending one attempt can end its run, and with it the run's other attempts.
            let Some(worker) = self.attempts.get(&id).map(|a| a.worker) else {
                continue;
            };
            let name = self
                .workers
                .get(&worker)
                .map(|w| w.row.name.clone())
                .unwrap_or_default();
            warn!(attempt = %id, worker = %name, "lease expired");
            self.end_attempt(id, RequeueReason::LeaseExpired(name), now)?;
        }
        let lease = self.cfg.lease;
        let lost: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.liveness == WorkerLiveness::Live && w.last_seen + lease <= now.at)
            .map(|w| w.row.id)
            .collect();
        for id in lost {
            let w = self.workers.get_mut(&id).expect("listed above");
            w.liveness = WorkerLiveness::Lost;
            self.fleet_version += 1;
            w.row.state = WorkerLiveness::Lost.as_str().to_owned();
            warn!(worker = %id, name = %w.row.name, "worker lost");
            let row = w.row.clone();
            self.store.upsert_worker(&row)?;
        }
        Ok(())
    }

    /// Removes an attempt from the maps without touching its tests.
    fn forget_attempt(&mut self, id: AttemptId) -> Option<Attempt> {
        let a = self.attempts.remove(&id)?;
        if let Err(e) = self.store.delete_attempt(id) {
            // A stale row only makes a restarted coordinator hold the tests for one lease.
            warn!(attempt = %id, error = %e, "failed to delete a finished attempt");
        }
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.attempts.remove(&id);
        }
        if let Some(r) = self.runs.get_mut(&a.run) {
            r.live_attempts -= 1;
        }
        Some(a)
    }

    /// Ends an attempt and requeues its unfinished tests, or gives up on a test that has been
    /// handed out too often and records it as an infrastructure error.
    fn end_attempt(&mut self, id: AttemptId, reason: RequeueReason, now: Now) -> Result<u32, Error> {
        let Some(a) = self.forget_attempt(id) else {
            return Ok(0);
        };
        let Some(run) = self.runs.get_mut(&a.run) else {
            return Ok(0);
        };
        if a.kind == AttemptKind::Discover {
            if run.discover_handouts >= run.row.policy.max_infra_attempts {
                let message = format!(
                    "discovery got no answer after {} attempts: {}",
                    run.discover_handouts,
                    reason.describe()
                );
                self.finish_run(a.run, RunStatus::Errored, message, now)?;
            } else {
                run.discover_pending = true;
                self.effects.work_added = true;
            }
            return Ok(0);
        }
        let max = run.row.policy.max_infra_attempts;
        // A drained worker handing its tests back is no fault of the tests; any other end
        // without a result counts against them.
        let lost_on = match &reason {
            RequeueReason::Deregistered(_) => None,
            RequeueReason::LeaseExpired(w) | RequeueReason::NoResult(w) => Some(w.clone()),
            RequeueReason::RunnerError(_) => Some(
                self.workers
                    .get(&a.worker)
                    .map(|w| w.row.name.clone())
                    .unwrap_or_default(),
            ),
        };
        let mut give_up = Vec::new();
        let mut states = Vec::new();
        for &i in &a.pending {
            let Some(name) = &lost_on else { break };
            let t = &run.tests[i as usize];
            let mut st = t.retry.clone();
            st.lost += 1;
            match st.lost_on.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 = reason.describe(),
                None => st.lost_on.push((name.clone(), reason.describe())),
            }
            if !st.avoid.contains(&a.worker) {
                st.avoid.push(a.worker);
            }
            let workers = st.lost_on.len() as u32;
            // Tried on `max` different workers (or lost twice that often on fewer): a test that
            // keeps taking its worker down is reported, not allowed to take down the fleet.
            if workers >= max || st.lost >= 2 * max {
                let evidence: Vec<&str> = st.lost_on.iter().map(|(_, r)| r.as_str()).collect();
                give_up.push(ResultRow {
                    idx: i,
                    test_id: t.id.clone(),
                    history: t.hist,
                    outcome: Outcome::InfraError,
                    duration_ms: 0,
                    attempts: t.handouts,
                    worker: String::new(),
                    detail: format!(
                        "no result after {} lost attempts on {workers} worker(s); it may take its worker down: {}",
                        st.lost,
                        evidence.join("; ")
                    ),
                    output: String::new(),
                    at_ms: now.ms,
                });
            } else {
                states.push((i, st));
            }
        }
        // The attempt's tests are no longer running, whatever happens to them next.
        for &i in &a.pending {
            let t = &mut run.tests[i as usize];
            t.leased = None;
            run.running_ms -= t.plan.estimate_ms;
        }
        run.running -= a.pending.len() as u32;
        if !give_up.is_empty() || !states.is_empty() {
            let refs: Vec<(u32, &RetryState)> = states.iter().map(|(i, st)| (*i, st)).collect();
            if let Err(e) = self.store.record_results(a.run, &run.row.suite, &give_up, &refs) {
                // Nothing was written: the tests go back as they were, so none is lost.
                for &i in &a.pending {
                    run.requeue(i);
                }
                self.effects.work_added = true;
                return Err(e.into());
            }
        }
        for r in &give_up {
            run.count(r.idx, Outcome::InfraError);
        }
        for (i, st) in states {
            run.tests[i as usize].retry = st;
        }
        let mut requeued = 0;
        for &i in &a.pending {
            if !run.tests[i as usize].done {
                run.requeue(i);
                requeued += 1;
            }
        }
        if requeued > 0 {
            info!(run = %a.run, requeued, reason = %reason.describe(), "tests requeued");
            self.effects.work_added = true;
        }
        self.effects
            .events
            .push(pb::run_event::Event::Progress(run.summary()));
        if run.done_total() as usize == run.tests.len() {
            self.conclude(a.run, now)?;
        }
        Ok(requeued)
    }

    /// All tests of `run` have a counted result: write the verdict.
    fn conclude(&mut self, run: RunId, now: Now) -> Result<(), Error> {
        let r = &self.runs[&run];
        let strict = r.row.policy.strict_flaky;
        let green = Outcome::ALL
            .iter()
            .filter(|o| !o.is_green() || (strict && **o == Outcome::Flaky))
            .all(|o| r.reds(*o) == 0);
        let (status, message) = if green {
            (RunStatus::Passed, String::new())
        } else {
            (RunStatus::Failed, String::new())
        };
        if status == RunStatus::Passed
            && let Some(authors) = self.store.rollout_request(run)?
        {
            // Stored with the verdict, in the same batch: a passed gate that asked for a
            // rollout always has its deploy, and the schema allows one per run.
            let r = &self.runs[&run];
            let deploy = DeployRow {
                id: uuid::Uuid::now_v7().to_string(),
                run_id: run,
                suite: r.row.suite.clone(),
                revision: r.row.revision.clone(),
                requested_by: r.row.requested_by.clone(),
                authors,
                created_ms: now.ms,
                started_ms: 0,
                finished_ms: 0,
                state: "pending".into(),
                detail: String::new(),
            };
            self.store.insert_deploy(&deploy)?;
            info!(run = %run, deploy = %deploy.id, "gate passed: rollout queued");
            self.effects.deploy_added = true;
        }
        self.finish_run(run, status, message, now).map(|_| ())
    }

    /// Moves an active run to a terminal status and drops its live attempts (their workers are
    /// told to stop at their next heartbeat or report).
    fn finish_run(
        &mut self,
        run: RunId,
        status: RunStatus,
        message: String,
        now: Now,
    ) -> Result<pb::RunSummary, Error> {
        debug_assert!(status.is_terminal());
        let r = self.runs.get(&run).ok_or_else(|| Error::not_found("run", run))?;
        let started = if r.row.started_ms == 0 {
            now.ms
        } else {
            r.row.started_ms
        };
        let mut row = r.row.clone();
        row.status = status;
        row.message = message;
        row.started_ms = started;
        row.finished_ms = now.ms;
        self.store.update_run_status(&row)?;
        let mut r = self.runs.remove(&run).expect("checked above");
        r.row = row;
        let live: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.run == run)
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            self.forget_attempt(id);
        }
        let mut summary = r.summary();
        // Tests that were running when the run ended are no longer running.
        if let Some(c) = summary.counts.as_mut() {
            c.queued += c.running;
            c.running = 0;
        }
        info!(run = %run, status = %status, "run ended");
        self.effects
            .events
            .push(pb::run_event::Event::Finished(summary.clone()));
        Ok(summary)
    }
}

impl Core {
    /// Checks that the core's bookkeeping agrees with itself: every open test is either waiting
    /// in its run's queue exactly once or held by exactly one live attempt, and the counts
    /// match. Panics with what is wrong.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for (id, a) in &self.attempts {
            let run = self.runs.get(&a.run).expect("a live attempt's run is active");
            let w = self
                .workers
                .get(&a.worker)
                .expect("a live attempt's worker is known");
            assert!(w.attempts.contains(id), "worker does not list its attempt");
            assert_eq!(
                w.runners.get(&run.row.runner),
                Some(&run.kind),
                "worker lacks the run's runner"
            );
            assert!(
                labels::satisfies(&w.row.labels, &run.row.labels),
                "labels violated"
            );
            for &i in &a.pending {
                let t = &run.tests[i as usize];
                assert!(!t.done, "a done test is pending in an attempt");
                assert_eq!(t.leased, Some(*id), "test {} leased elsewhere", t.id);
            }
        }
        for w in self.workers.values() {
            assert!(w.attempts.len() as u32 <= w.row.slots, "worker over its slots");
            for a in &w.attempts {
                assert!(self.attempts.contains_key(a), "worker lists a dead attempt");
            }
        }
        for run in self.runs.values() {
            let mut queued = vec![0u32; run.tests.len()];
            for i in run.queue.indexes().chain(run.solo.iter().copied()) {
                queued[i as usize] += 1;
            }
            for &i in &run.solo {
                assert!(
                    run.tests[i as usize].runs_alone(),
                    "a solo test that may share a shard"
                );
            }
            let mut running = 0;
            for (i, t) in run.tests.iter().enumerate() {
                match (t.done, t.leased) {
                    (true, None) => assert_eq!(queued[i], 0, "a done test is queued"),
                    (false, Some(a)) => {
                        running += 1;
                        assert_eq!(queued[i], 0, "a leased test is queued");
                        let att = self.attempts.get(&a).expect("leased to a live attempt");
                        assert!(att.pending.contains(&(i as u32)));
                    }
                    (false, None) => {
                        assert_eq!(queued[i], 1, "test {} lost: neither queued nor leased", t.id)
                    }
                    (true, Some(_)) => panic!("test {} done and leased", t.id),
                }
            }
            assert_eq!(run.running, running, "running count");
            assert_eq!(
                run.done_total() as usize + running as usize + run.queue.len() + run.solo.len(),
                run.tests.len()
            );
        }
    }
}

fn flake_rate(f: &FlakinessRow) -> f64 {
    f.flakes as f64 / f.runs.max(1) as f64
}

fn quarantine_entry(q: QuarantineRow) -> pb::QuarantineEntry {
    pb::QuarantineEntry {
        suite: q.suite,
        test_id: q.test_id,
        reason: q.reason,
        added_by: q.added_by,
        added_at_ms: q.added_ms,
        automatic: q.automatic,
    }
}

fn summary_of(row: &RunRow, counts: pb::RunCounts) -> pb::RunSummary {
    pb::RunSummary {
        run_id: row.id.to_string(),
        suite: row.suite.clone(),
        revision: row.revision.clone(),
        requested_by: row.requested_by.clone(),
        runner: row.runner.clone(),
        labels: labels::to_wire(&row.labels),
        status: row.status.to_wire(),
        counts: Some(counts),
        created_at_ms: row.created_ms,
        started_at_ms: row.started_ms,
        finished_at_ms: row.finished_ms,
        message: row.message.clone(),
        discover: row.discover,
        priority: row.priority,
        shards: row.shards,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, saying how much was cut.
fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… {} bytes cut]", &s[..end], s.len() - end)
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
