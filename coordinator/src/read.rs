//! The read side: everything that only reads (the JSON API, `GetRun`, `ListRuns`, the
//! dashboard and gate lists, JUnit export) is served here, on threads of the lowest CPU
//! priority with read-only connections, never on the scheduler thread, so readers never queue
//! behind hand-outs and hand-outs never queue (or wait for a core) behind readers.
//!
//! Consistency: a read sees committed state. Stored data comes from the last committed
//! transaction; the live part (counts with what is running, shard progress, the fleet), which
//! only the core's memory has, comes from a [`LiveView`] the actor updates after each commit.
//! A page of runs is one query, whatever its length.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use shardgate_common::report::RunReport;
use shardgate_common::{Error, RunId, WorkerId, pb};
use tokio::sync::Semaphore;

use crate::model::{CoreConfig, Now};
use crate::policy;
use crate::store::{Reads, RunFilter, summary_of};

/// An active run as the core last committed it.
#[derive(Debug, Clone)]
pub struct LiveRun {
    pub summary: pb::RunSummary,
    /// The run's running shards, rebuilt at most every [`SHARDS_REFRESH`] (a fleet of
    /// thousands of workers holds thousands of them, and reports arrive every millisecond).
    pub shards: Vec<pb::ShardProgress>,
    /// When `shards` was built.
    pub shards_at: Option<std::time::Instant>,
    /// Whether the run changed since `shards` was built.
    pub shards_stale: bool,
}

/// How stale a run's shard list in the live view may get; its counts are always current.
pub const SHARDS_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// The live state only memory knows, copied out by the actor after each commit.
#[derive(Debug, Clone, Default)]
pub struct LiveView {
    pub runs: HashMap<RunId, LiveRun>,
    pub workers: BTreeMap<WorkerId, pb::WorkerInfo>,
    /// The sequence number of the last event this view reflects: the events of the batch that
    /// wrote it are published right after, so a watcher that subscribed before reading the
    /// view receives every later one.
    pub seq: u64,
}

/// The settings the read side needs to present what it reads.
#[derive(Debug, Clone, Copy)]
pub struct ReadConfig {
    pub quarantine_threshold: f64,
    pub quarantine_min_runs: u32,
}

impl From<&CoreConfig> for ReadConfig {
    fn from(c: &CoreConfig) -> Self {
        Self {
            quarantine_threshold: c.quarantine_threshold,
            quarantine_min_runs: c.quarantine_min_runs,
        }
    }
}

/// Threads at the lowest CPU priority for work that must never slow the scheduler: reads,
/// rendering large responses, planning large submissions. However many readers come, the
/// scheduler thread and the RPCs in front of it get the CPU first.
pub struct Background {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background").finish_non_exhaustive()
    }
}

impl Background {
    /// Starts `threads` threads; they stop when the pool is dropped.
    pub fn start(threads: usize) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("shardgate-read-{i}"))
                .spawn(move || {
                    if let Err(e) =
                        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
                    {
                        tracing::warn!(error = ?e, "failed to lower the read thread's priority");
                    }
                    loop {
                        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        };
                        job();
                    }
                })
                .expect("failed to start a read thread");
        }
        Arc::new(Self { jobs: Mutex::new(tx) })
    }

    /// Runs `f` on the pool and awaits its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| Error::Unavailable("the read threads have stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("a read thread failed".into()))
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19 on Linux), for work that must
/// never take the CPU from the scheduler.
pub fn lower_priority() {
    if let Err(e) = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min) {
        tracing::warn!(error = ?e, "failed to lower a thread's priority");
    }
}

/// Gives the calling thread the least claim on the CPU there is: Linux's `SCHED_IDLE` (nice 19
/// where that is refused, or on other systems). Beside a smaller share than nice 19, a thread
/// under `SCHED_IDLE` gives up its core the moment a normal thread wakes, where a nice-19
/// thread may first finish its slice (a millisecond or more on a busy machine): for threads
/// that write to many watchers, whose turn must never come before a worker's call.
pub fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle).is_ok() {
            return;
        }
    }
    lower_priority();
}

/// The read side of one coordinator.
#[derive(Clone)]
pub struct ReadSide {
    reads: Arc<dyn Reads + Send + Sync>,
    live: Arc<RwLock<LiveView>>,
    cfg: ReadConfig,
    /// Reads running at once; the rest wait here, not on the scheduler.
    permits: Arc<Semaphore>,
    pool: Arc<Background>,
}

impl std::fmt::Debug for ReadSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSide").finish_non_exhaustive()
    }
}

impl ReadSide {
    pub fn new(
        reads: Arc<dyn Reads + Send + Sync>,
        live: Arc<RwLock<LiveView>>,
        cfg: ReadConfig,
        concurrency: usize,
    ) -> Self {
        Self {
            reads,
            live,
            cfg,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            pool: Background::start(concurrency),
        }
    }

    /// The low-priority threads reads run on, for other work that must not slow the scheduler.
    pub fn background(&self) -> Arc<Background> {
        self.pool.clone()
    }

    /// Runs `f` on the blocking pool with the store and a view of the live state.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Reads, &Snapshot<'_>, ReadConfig) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the read side has stopped".into()))?;
        let reads = self.reads.clone();
        let live = self.live.clone();
        let cfg = self.cfg;
        self.pool
            .run(move || {
                let snapshot = Snapshot { live: &live };
                f(reads.as_ref(), &snapshot, cfg)
            })
            .await?
    }

    /// The live view, shared with the actor (watchers read their snapshots from it).
    pub fn live(&self) -> &Arc<RwLock<LiveView>> {
        &self.live
    }

    pub async fn get_run(&self, id: RunId, include_results: bool) -> Result<pb::GetRunResponse, Error> {
        self.read(move |r, live, _| get_run(r, live, id, include_results))
            .await
    }

    /// A run with every result as the JSON report, rendered on the read side's thread.
    pub async fn run_report_json(&self, id: RunId) -> Result<Vec<u8>, Error> {
        self.read(move |r, live, _| {
            let resp = get_run(r, live, id, true)?;
            let report = RunReport::new(&resp.run.unwrap_or_default(), &resp.results);
            serde_json::to_vec(&report)
                .map_err(|e| Error::Internal(format!("failed to render run '{id}': {e}")))
        })
        .await
    }

    /// A run as JUnit XML, rendered on the read side's thread.
    pub async fn run_junit(&self, id: RunId) -> Result<String, Error> {
        self.read(move |r, live, _| {
            let resp = get_run(r, live, id, true)?;
            Ok(shardgate_common::junit::to_junit(&RunReport::new(
                &resp.run.unwrap_or_default(),
                &resp.results,
            )))
        })
        .await
    }

    pub async fn list_runs(&self, limit: u32) -> Result<Vec<pb::RunSummary>, Error> {
        self.read(move |r, live, _| list_runs(r, live, limit)).await
    }

    /// A page of runs that match `filter` (at most 1,000; 50 by default).
    pub async fn search_runs(&self, mut filter: RunFilter) -> Result<Vec<pb::RunSummary>, Error> {
        filter.limit = if filter.limit == 0 {
            50
        } else {
            filter.limit.min(1000)
        };
        self.read(move |r, live, _| {
            Ok(r.runs_search(&filter)?
                .into_iter()
                .map(|(row, counts)| match live.run(row.id) {
                    Some(l) => l.summary,
                    None => summary_of(&row, counts.to_wire()),
                })
                .collect())
        })
        .await
    }

    /// What a run's page shows: its summary, every shard (its timeline) and its notable
    /// results (at most `limit`).
    pub async fn run_page(&self, id: RunId, limit: u32) -> Result<RunPage, Error> {
        self.read(move |r, live, _| {
            let p = progress(r, live, Some(id), true)?;
            Ok(RunPage {
                run: p.runs.into_iter().next().unwrap_or_default(),
                shards: p.shards,
                notable: r.notable_results(id, limit)?,
                deploy: r.deploy_of_run(id)?.map(|d| d.to_wire()),
            })
        })
        .await
    }

    /// The values of the metrics' gauges, from committed state.
    pub async fn gauges(&self) -> Result<crate::metrics::GaugeState, Error> {
        self.read(move |r, live, _| {
            let stored = r.runs_by_status()?;
            Ok(live.with(|v| crate::metrics::GaugeState::from_parts(&stored, v)))
        })
        .await
    }

    /// Answers when the store can be read.
    pub async fn store_ready(&self) -> Result<(), Error> {
        self.read(move |r, _, _| {
            r.runs_page(1)?;
            Ok(())
        })
        .await
    }

    pub async fn list_workers(&self, include_gone: bool) -> Result<Vec<pb::WorkerInfo>, Error> {
        self.read(move |_, live, _| Ok(live.workers(include_gone))).await
    }

    pub async fn progress(
        &self,
        run: Option<RunId>,
        include_ended: bool,
    ) -> Result<pb::RunProgressResponse, Error> {
        self.read(move |r, live, _| progress(r, live, run, include_ended))
            .await
    }

    pub async fn list_flaky(&self, suite: String, limit: u32) -> Result<Vec<pb::FlakyTest>, Error> {
        self.read(move |r, _, cfg| list_flaky(r, cfg, &suite, limit))
            .await
    }

    pub async fn list_quarantine(&self, suite: String) -> Result<Vec<pb::QuarantineEntry>, Error> {
        self.read(move |r, _, _| list_quarantine(r, &suite)).await
    }

    /// The deploy log (only the deploy of `run` when given) and how often deploys happen.
    pub async fn list_deploys(
        &self,
        limit: u32,
        run: Option<RunId>,
        now: Now,
    ) -> Result<pb::ListDeploysResponse, Error> {
        self.read(move |r, _, _| list_deploys(r, limit, run, now)).await
    }

    /// A run's progress with its shards, and its deploy.
    pub async fn progress_and_deploy(
        &self,
        run: RunId,
    ) -> Result<(pb::RunProgressResponse, Option<pb::Deploy>), Error> {
        self.read(move |r, live, _| {
            Ok((
                progress(r, live, Some(run), true)?,
                r.deploy_of_run(run)?.map(|d| d.to_wire()),
            ))
        })
        .await
    }
}

/// A run's page: summary, shards (ended and running), notable results.
#[derive(Debug, Clone)]
pub struct RunPage {
    pub run: pb::RunSummary,
    pub shards: Vec<pb::ShardProgress>,
    pub notable: Vec<pb::TestResult>,
    /// The deploy its passing made, if any.
    pub deploy: Option<pb::Deploy>,
}

/// The live view as one read sees it.
pub struct Snapshot<'a> {
    live: &'a RwLock<LiveView>,
}

impl<'a> Snapshot<'a> {
    /// A snapshot of a view that is not shared (tests drive the core without an actor).
    pub fn of(live: &'a RwLock<LiveView>) -> Self {
        Self { live }
    }

    fn with<T>(&self, f: impl FnOnce(&LiveView) -> T) -> T {
        f(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn run(&self, id: RunId) -> Option<LiveRun> {
        self.with(|v| v.runs.get(&id).cloned())
    }

    fn workers(&self, include_gone: bool) -> Vec<pb::WorkerInfo> {
        let mut out: Vec<_> = self.with(|v| {
            v.workers
                .values()
                .filter(|w| include_gone || w.state != "gone")
                .cloned()
                .collect()
        });
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.worker_id.cmp(&b.worker_id)));
        out
    }
}

/// A run's summary (live when active) and, when asked, every result.
pub fn get_run(
    reads: &dyn Reads,
    live: &Snapshot<'_>,
    id: RunId,
    include_results: bool,
) -> Result<pb::GetRunResponse, Error> {
    // The stored row first: when the live view no longer has the run, its end is stored.
    let stored = reads.run_with_counts(id)?;
    let summary = match (live.run(id), stored) {
        (Some(l), _) => l.summary,
        (None, Some((row, counts))) => summary_of(&row, counts.to_wire()),
        (None, None) => return Err(Error::not_found("run", id)),
    };
    let results = if include_results {
        reads.results(id)?
    } else {
        Vec::new()
    };
    Ok(pb::GetRunResponse {
        run: Some(summary),
        results,
    })
}

/// The newest runs, newest first (at most 1,000; 50 by default), from one query.
pub fn list_runs(reads: &dyn Reads, live: &Snapshot<'_>, limit: u32) -> Result<Vec<pb::RunSummary>, Error> {
    let limit = if limit == 0 { 50 } else { limit.min(1000) };
    Ok(reads
        .runs_page(limit)?
        .into_iter()
        .map(|(row, counts)| match live.run(row.id) {
            Some(l) => l.summary,
            None => summary_of(&row, counts.to_wire()),
        })
        .collect())
}

/// Progress of one run, or of every active run, with the shards out on workers.
pub fn progress(
    reads: &dyn Reads,
    live: &Snapshot<'_>,
    run: Option<RunId>,
    include_ended: bool,
) -> Result<pb::RunProgressResponse, Error> {
    match run {
        Some(id) => {
            let summary = get_run(reads, live, id, false)?.run.unwrap_or_default();
            // The live shards first, the log second: an attempt that ends in between is then
            // in both, and its logged end wins.
            let running = live.run(id).map(|l| l.shards).unwrap_or_default();
            let mut shards = if include_ended {
                reads.shard_log(id)?
            } else {
                Vec::new()
            };
            let ended: HashSet<String> = shards.iter().map(|s| s.attempt_id.clone()).collect();
            shards.extend(running.into_iter().filter(|s| !ended.contains(&s.attempt_id)));
            Ok(pb::RunProgressResponse {
                runs: vec![summary],
                shards,
            })
        }
        None => live.with(|v| {
            let mut runs: Vec<&LiveRun> = v.runs.values().collect();
            runs.sort_by(|a, b| a.summary.run_id.cmp(&b.summary.run_id));
            let mut shards: Vec<pb::ShardProgress> =
                runs.iter().flat_map(|r| r.shards.iter().cloned()).collect();
            shards.sort_by(|a, b| a.attempt_id.cmp(&b.attempt_id));
            Ok(pb::RunProgressResponse {
                runs: runs.iter().map(|r| r.summary.clone()).collect(),
                shards,
            })
        }),
    }
}

/// The flakiest tests of `suite`, with whether each is quarantined or proposed for it.
pub fn list_flaky(
    reads: &dyn Reads,
    cfg: ReadConfig,
    suite: &str,
    limit: u32,
) -> Result<Vec<pb::FlakyTest>, Error> {
    if suite.is_empty() {
        return Err(Error::invalid("suite", "name the suite"));
    }
    let limit = if limit == 0 { 50 } else { limit.min(10_000) };
    let quarantined: HashSet<String> = reads
        .quarantine(Some(suite))?
        .into_iter()
        .map(|q| q.test_id)
        .collect();
    Ok(reads
        .flakiness(suite, limit)?
        .into_iter()
        .map(|f| {
            let q = quarantined.contains(&f.test_id);
            pb::FlakyTest {
                suite: suite.to_owned(),
                flake_rate: policy::flake_rate(&f),
                quarantined: q,
                propose_quarantine: !q
                    && policy::proposes_quarantine(&f, cfg.quarantine_min_runs, cfg.quarantine_threshold),
                test_id: f.test_id,
                runs: f.runs,
                failures: f.failures,
                flakes: f.flakes,
                flips: f.flips,
                last_flake_at_ms: f.last_flake_ms,
                last_run_at_ms: f.last_run_ms,
            }
        })
        .collect())
}

pub fn list_quarantine(reads: &dyn Reads, suite: &str) -> Result<Vec<pb::QuarantineEntry>, Error> {
    let suite = (!suite.is_empty()).then_some(suite);
    Ok(reads
        .quarantine(suite)?
        .into_iter()
        .map(|q| q.to_wire())
        .collect())
}

/// The deploy log (only the deploy of `run` when given) and how often deploys happen.
pub fn list_deploys(
    reads: &dyn Reads,
    limit: u32,
    run: Option<RunId>,
    now: Now,
) -> Result<pb::ListDeploysResponse, Error> {
    let limit = if limit == 0 { 20 } else { limit.min(10_000) };
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let last = reads.last_started_deploy()?;
    Ok(pb::ListDeploysResponse {
        last_started_at_ms: last.as_ref().map(|d| d.started_ms).unwrap_or(0),
        last_requested_by: last.map(|d| d.requested_by).unwrap_or_default(),
        last_day: reads.deploys_since(now.ms.saturating_sub(DAY_MS))?,
        last_week: reads.deploys_since(now.ms.saturating_sub(7 * DAY_MS))?,
        deploys: match run {
            Some(run) => reads
                .deploy_of_run(run)?
                .into_iter()
                .map(|d| d.to_wire())
                .collect(),
            None => reads.deploys(limit)?.into_iter().map(|d| d.to_wire()).collect(),
        },
    })
}
