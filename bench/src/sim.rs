//! Scheduling strategies replayed in simulated time on the same workload: the static splits
//! the peers use, a one-test-at-a-time queue, and shardgate's own scheduling core (the real
//! `Core`, with an in-memory store, driven by a discrete-event loop instead of a network).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, WorkerId, pb};
use shardgate_coordinator::core::Core;
use shardgate_coordinator::model::{CoreConfig, Now};
use shardgate_coordinator::store::{HistoryStore, SqliteStore};

use crate::workload::Workload;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Result {
    pub strategy: &'static str,
    pub makespan_ms: f64,
    pub ratio: f64,
    pub handouts: usize,
    /// Slot time spent neither running tests nor paying overhead, as a share of all slot time.
    pub idle_share: f64,
    /// When the first failing test's result was known.
    pub first_failure_ms: Option<f64>,
}

fn result(strategy: &'static str, w: &Workload, slots: usize, busy: &[f64], handouts: usize) -> Result {
    let makespan = busy.iter().copied().fold(0.0, f64::max);
    let idle: f64 = busy.iter().map(|b| makespan - b).sum();
    Result {
        strategy,
        makespan_ms: makespan,
        ratio: makespan / w.lower_bound_ms(slots),
        handouts,
        idle_share: idle / (makespan * slots as f64),
        first_failure_ms: None,
    }
}

/// Every slot gets one fixed shard up front.
fn static_split(
    name: &'static str,
    w: &Workload,
    slots: usize,
    overhead: f64,
    slot_of: impl Fn(usize) -> usize,
) -> Result {
    let mut busy = vec![overhead; slots];
    for (i, d) in w.actual_ms.iter().enumerate() {
        busy[slot_of(i)] += d;
    }
    result(name, w, slots, &busy, slots)
}

/// nextest `--partition count:k/N`: test i goes to shard i mod N.
pub fn static_count(w: &Workload, slots: usize, overhead: f64) -> Result {
    static_split("static count", w, slots, overhead, |i| i % slots)
}

/// nextest `--partition hash:k/N`: by a hash of the test's id.
pub fn static_hash(w: &Workload, slots: usize, overhead: f64) -> Result {
    static_split("static hash", w, slots, overhead, |i| {
        let mut h = DefaultHasher::new();
        w.ids[i].hash(&mut h);
        (h.finish() % slots as u64) as usize
    })
}

/// CircleCI / pytest-split: longest-processing-time-first on the history's estimates, new tests
/// at the mean estimate, fixed before the run.
pub fn static_timing(w: &Workload, slots: usize, overhead: f64) -> Result {
    let known: Vec<f64> = w.history.values().map(|h| h.estimate_ms).collect();
    let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
    let mut order: Vec<(f64, usize)> = w
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (w.history.get(id).map(|h| h.estimate_ms).unwrap_or(mean), i))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut planned: BinaryHeap<Reverse<(u64, usize)>> = (0..slots).map(|s| Reverse((0, s))).collect();
    let mut slot = vec![0; w.ids.len()];
    for (est, i) in order {
        let Reverse((load, s)) = planned.pop().expect("slots > 0");
        slot[i] = s;
        planned.push(Reverse((load + est as u64, s)));
    }
    static_split("static timing (LPT)", w, slots, overhead, |i| slot[i])
}

/// Knapsack Pro Queue Mode / pytest-xdist `load`: each free slot takes the next single test.
pub fn greedy_one(w: &Workload, slots: usize, overhead: f64) -> Result {
    let mut free: BinaryHeap<Reverse<(u64, usize)>> = (0..slots).map(|s| Reverse((0, s))).collect();
    let mut busy = vec![0.0; slots];
    let mut first_failure: Option<f64> = None;
    for (i, d) in w.actual_ms.iter().enumerate() {
        let Reverse((t, s)) = free.pop().expect("slots > 0");
        let end = t as f64 + overhead + d;
        busy[s] = end;
        if w.failing[i] {
            first_failure = Some(first_failure.map_or(end, |f| f.min(end)));
        }
        free.push(Reverse((end as u64, s)));
    }
    let mut r = result("queue, one test a time", w, slots, &busy, w.ids.len());
    r.first_failure_ms = first_failure;
    r
}

/// shardgate: the coordinator's real scheduling core, one worker per slot, each asking for a
/// shard whenever it is free; a shard costs `overhead` before its first test starts.
pub fn shardgate(w: &Workload, slots: usize, overhead: f64, fail_first: bool) -> anyhow::Result<Result> {
    let store = SqliteStore::open(Path::new(":memory:"))?;
    Ok(drive_core(w, slots, overhead, fail_first, store)?.result)
}

/// What driving the real core measured besides the schedule.
#[derive(Debug)]
pub struct CoreRun {
    pub result: Result,
    /// Wall-clock time of each `acquire` that handed out a shard, in nanoseconds.
    pub acquire_ns: Vec<u64>,
    /// Wall-clock time to submit the run (validation, storing, planning), in seconds.
    pub submit_s: f64,
    /// Resident memory right after the submission, in bytes.
    pub rss_after_submit: u64,
}

/// Drives the real core through a whole run in simulated time on `store`.
pub fn drive_core(
    w: &Workload,
    slots: usize,
    overhead: f64,
    fail_first: bool,
    store: SqliteStore,
) -> anyhow::Result<CoreRun> {
    let base = Now::real();
    let at = |ms: f64| base.after(Duration::from_micros((ms * 1000.0) as u64));
    let cfg = CoreConfig {
        initial_overhead: Duration::from_millis(overhead as u64),
        // Nothing is lost in this simulation: leases never expire.
        lease: Duration::from_secs(10 * 24 * 3600),
        ..CoreConfig::default()
    };
    let mut store = store;
    // Recent failures happened an hour before this run.
    let entries: Vec<_> = w
        .history
        .iter()
        .map(|(k, v)| {
            let mut h = *v;
            if h.last_failed_ms > 0 {
                h.last_failed_ms = base.ms - 3_600_000;
            }
            (k.clone(), h)
        })
        .collect();
    store.put_history("sim", &entries)?;
    let mut core = Core::open(cfg, store, base)?;
    let mut workers = Vec::with_capacity(slots);
    for s in 0..slots {
        workers.push(register_exec_worker(&mut core, &format!("w{s}"), 1, base)?);
    }
    let index: HashMap<&str, usize> = w.ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    let submit_started = std::time::Instant::now();
    let summary = core.submit(
        pb::SubmitRunRequest {
            suite: "sim".into(),
            revision: "r".into(),
            runner: "exec".into(),
            tests: w.ids.clone(),
            policy: Some(pb::RunPolicy {
                fail_first,
                ..Default::default()
            }),
            ..Default::default()
        },
        base,
    )?;
    let run: RunId = summary.run_id.parse()?;
    let submit_s = submit_started.elapsed().as_secs_f64();
    let rss_after_submit = crate::mem::rss_bytes();
    let mut acquire_ns = Vec::new();

    // Events at integer microseconds, in time order; ties by insertion order.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        Done { slot: usize, test: usize, last: bool },
        Free { slot: usize },
    }
    let mut events: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |events: &mut BinaryHeap<_>, t: f64, e: Ev| {
        seq += 1;
        events.push(Reverse(((t * 1000.0) as u64, seq, e)));
    };
    for s in 0..slots {
        push(&mut events, 0.0, Ev::Free { slot: s });
    }
    let mut attempt_of: Vec<Option<AttemptId>> = vec![None; slots];
    // Slots that asked and got nothing: a worker asks again, so they ask again when a shard
    // ends or a test fails (which may free work for them: a retry that must go elsewhere).
    let mut idle: Vec<usize> = Vec::new();
    let mut busy = vec![0.0; slots];
    let mut handouts = 0;
    let mut first_failure: Option<f64> = None;
    // Group commits as the coordinator's actor makes them.
    let mut in_batch = 0;
    core.begin_batch()?;
    while let Some(Reverse((t_us, _, ev))) = events.pop() {
        in_batch += 1;
        if in_batch == shardgate_coordinator::actor::MAX_BATCH {
            core.commit_batch()?;
            core.begin_batch()?;
            in_batch = 0;
        }
        let t = t_us as f64 / 1000.0;
        match ev {
            Ev::Free { slot } => {
                if let Some(a) = attempt_of[slot].take() {
                    core.finish(workers[slot], a, "", false, at(t))?;
                }
                let asked = std::time::Instant::now();
                let Some(shard) = core.acquire(workers[slot], at(t))? else {
                    idle.push(slot);
                    continue;
                };
                acquire_ns.push(asked.elapsed().as_nanos() as u64);
                handouts += 1;
                attempt_of[slot] = Some(shard.attempt_id.parse()?);
                let mut end = t + overhead;
                let n = shard.tests.len();
                if std::env::var_os("SIM_TRACE").is_some() {
                    let work: f64 = shard.tests.iter().map(|id| w.actual_ms[index[id.as_str()]]).sum();
                    let new = shard
                        .tests
                        .iter()
                        .filter(|id| !w.history.contains_key(id.as_str()))
                        .count();
                    eprintln!(
                        "t={:.1}s slot={slot} tests={n} new={new} work={:.1}s",
                        t / 1000.0,
                        work / 1000.0
                    );
                }
                for (k, id) in shard.tests.iter().enumerate() {
                    let i = index[id.as_str()];
                    end += w.actual_ms[i];
                    push(
                        &mut events,
                        end,
                        Ev::Done {
                            slot,
                            test: i,
                            last: k + 1 == n,
                        },
                    );
                }
                busy[slot] = end;
            }
            Ev::Done { slot, test, last } => {
                let a = attempt_of[slot].expect("a shard is running");
                let outcome = if w.failing[test] {
                    Outcome::Failed
                } else {
                    Outcome::Passed
                };
                if w.failing[test] && first_failure.is_none() {
                    first_failure = Some(t);
                }
                let r = pb::TestResult {
                    test_id: w.ids[test].clone(),
                    outcome: outcome.to_wire(),
                    duration_ms: w.actual_ms[test] as u64,
                    ..Default::default()
                };
                core.report(workers[slot], a, vec![r], at(t))?;
                if last {
                    push(&mut events, t, Ev::Free { slot });
                }
                if last || w.failing[test] {
                    for s in idle.drain(..) {
                        push(&mut events, t, Ev::Free { slot: s });
                    }
                }
            }
        }
    }
    core.commit_batch()?;
    let status = RunStatus::from_wire(core.summary(run)?.status);
    anyhow::ensure!(
        matches!(status, Some(RunStatus::Passed | RunStatus::Failed)),
        "the simulated run did not end: {status:?}"
    );
    let mut r = result(
        if fail_first {
            "shardgate, fail-first"
        } else {
            "shardgate"
        },
        w,
        slots,
        &busy,
        handouts,
    );
    r.first_failure_ms = first_failure;
    Ok(CoreRun {
        result: r,
        acquire_ns,
        submit_s,
        rss_after_submit,
    })
}

/// Every strategy on one workload.
pub fn compare(w: &Workload, slots: usize, overhead: f64) -> anyhow::Result<Vec<Result>> {
    Ok(vec![
        static_count(w, slots, overhead),
        static_hash(w, slots, overhead),
        static_timing(w, slots, overhead),
        greedy_one(w, slots, overhead),
        shardgate(w, slots, overhead, false)?,
    ])
}

/// Registers a worker offering the `exec` runner with the core directly.
pub fn register_exec_worker(core: &mut Core, name: &str, slots: u32, now: Now) -> anyhow::Result<WorkerId> {
    let resp = core.register(
        pb::RegisterRequest {
            name: name.into(),
            slots,
            labels: vec![],
            runners: vec![pb::RunnerInfo {
                name: "exec".into(),
                kind: pb::RunnerKind::Exec as i32,
            }],
        },
        now,
    )?;
    Ok(resp.worker_id.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Shape, generate};

    #[test]
    fn shardgate_beats_the_static_splits_on_a_small_suite() {
        let w = generate(&Shape {
            tests: 2000,
            machine_hours: 0.5,
            ..Shape::imvu(7)
        });
        let rows = compare(&w, 12, 500.0).unwrap();
        let ours = rows.iter().find(|r| r.strategy == "shardgate").unwrap();
        for r in &rows {
            assert!(
                r.ratio >= 1.0 - 1e-9,
                "{} beat the lower bound: {r:?}",
                r.strategy
            );
            if r.strategy != "shardgate" {
                assert!(
                    ours.makespan_ms < r.makespan_ms,
                    "{} was faster: {rows:#?}",
                    r.strategy
                );
            }
        }
        assert!(ours.ratio < 1.1, "{ours:?}");
    }
}
