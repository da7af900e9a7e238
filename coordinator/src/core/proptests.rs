//! Property tests of the scheduling core: random interleavings of submissions, registrations,
//! hand-outs, partial reports, finished and expired attempts, cancellations and restarts.
//! After every step the core's bookkeeping must agree with itself; at every hand-out the shard
//! must hold one run's tests for a runner and labels the worker has; and when the fleet drains
//! every run, every test has exactly one counted result.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, WorkerId, pb};

use super::Core;
use crate::model::{CoreConfig, Now};
use crate::store::SqliteStore;

#[derive(Debug, Clone)]
enum Op {
    Register {
        linux: bool,
        alt: bool,
    },
    Submit {
        tests: usize,
        alt: bool,
        linux: bool,
        priority: i32,
        fail_fast: bool,
    },
    Acquire {
        worker: usize,
    },
    Report {
        worker: usize,
        count: usize,
        fail: bool,
    },
    Finish {
        worker: usize,
    },
    Tick {
        secs: u64,
    },
    Cancel {
        run: usize,
    },
    Deregister {
        worker: usize,
    },
    /// The coordinator restarts on the same database.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<bool>(), any::<bool>()).prop_map(|(linux, alt)| Op::Register { linux, alt }),
        2 => (1usize..25, any::<bool>(), any::<bool>(), 0i32..3, any::<bool>())
            .prop_map(|(tests, alt, linux, priority, fail_fast)| Op::Submit { tests, alt, linux, priority, fail_fast }),
        6 => (0usize..8).prop_map(|worker| Op::Acquire { worker }),
        6 => (0usize..8, 0usize..6, any::<bool>()).prop_map(|(worker, count, fail)| Op::Report { worker, count, fail }),
        3 => (0usize..8).prop_map(|worker| Op::Finish { worker }),
        2 => (1u64..15).prop_map(|secs| Op::Tick { secs }),
        1 => (0usize..6).prop_map(|run| Op::Cancel { run }),
        1 => (0usize..8).prop_map(|worker| Op::Deregister { worker }),
        1 => Just(Op::Restart),
    ]
}

struct Sim {
    core: Core,
    db: std::path::PathBuf,
    now: Now,
    workers: Vec<WorkerId>,
    /// Live shards per worker, as the worker sees them: attempt and tests not yet reported.
    shards: HashMap<WorkerId, Vec<(AttemptId, Vec<String>)>>,
    worker_runners: HashMap<WorkerId, (bool, bool)>,
    runs: Vec<(RunId, usize, bool, bool)>,
}

impl Sim {
    fn register(&mut self, linux: bool, alt: bool) -> WorkerId {
        let mut runners = vec![pb::RunnerInfo {
            name: "exec".into(),
            kind: pb::RunnerKind::Exec as i32,
        }];
        if alt {
            runners.push(pb::RunnerInfo {
                name: "alt".into(),
                kind: pb::RunnerKind::Exec as i32,
            });
        }
        let labels = if linux {
            vec![pb::Label {
                key: "os".into(),
                value: "linux".into(),
            }]
        } else {
            vec![]
        };
        let resp = self
            .core
            .register(
                pb::RegisterRequest {
                    name: format!("w{}", self.workers.len()),
                    slots: 2,
                    labels,
                    runners,
                },
                self.now,
            )
            .unwrap();
        let id: WorkerId = resp.worker_id.parse().unwrap();
        self.workers.push(id);
        self.worker_runners.insert(id, (linux, alt));
        id
    }

    fn acquire(&mut self, w: WorkerId) {
        let Ok(Some(shard)) = self.core.acquire(w, self.now) else {
            return;
        };
        let (linux, alt) = self.worker_runners[&w];
        let run = self
            .runs
            .iter()
            .find(|r| r.0.to_string() == shard.run_id)
            .expect("a shard of a submitted run");
        let want_alt = run.2;
        let want_linux = run.3;
        assert_eq!(
            shard.runner,
            if want_alt { "alt" } else { "exec" },
            "one run, its runner"
        );
        assert!(!want_alt || alt, "worker without the runner got the run");
        assert!(!want_linux || linux, "label constraint violated");
        assert!(!shard.tests.is_empty());
        let prefix = format!(
            "r{}/",
            self.runs
                .iter()
                .position(|r| r.0.to_string() == shard.run_id)
                .unwrap()
        );
        assert!(
            shard.tests.iter().all(|t| t.starts_with(&prefix)),
            "a shard mixes runs"
        );
        self.shards
            .entry(w)
            .or_default()
            .push((shard.attempt_id.parse().unwrap(), shard.tests));
    }

    fn report(&mut self, w: WorkerId, count: usize, fail: bool) {
        let Some(list) = self.shards.get_mut(&w) else {
            return;
        };
        let Some((attempt, tests)) = list.first_mut() else {
            return;
        };
        let n = count.min(tests.len());
        let results: Vec<pb::TestResult> = tests
            .drain(..n)
            .map(|t| pb::TestResult {
                test_id: t,
                outcome: if fail { Outcome::Failed } else { Outcome::Passed }.to_wire(),
                duration_ms: 5,
                ..Default::default()
            })
            .collect();
        let attempt = *attempt;
        // A stale attempt is refused; that is a legal answer, not a failure.
        let _ = self.core.report(w, attempt, results, self.now);
    }

    fn finish(&mut self, w: WorkerId) {
        let Some(list) = self.shards.get_mut(&w) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let (attempt, _) = list.remove(0);
        let _ = self.core.finish(w, attempt, "", false, self.now);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn every_test_ends_with_exactly_one_result(ops in prop::collection::vec(op(), 1..120)) {
        let now = Now::real();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let core = Core::open(CoreConfig::default(), SqliteStore::open(&db).unwrap(), now).unwrap();
        let mut sim = Sim { core, db, now, workers: vec![], shards: HashMap::new(), worker_runners: HashMap::new(), runs: vec![] };
        sim.register(false, false);
        for op in ops {
            match op {
                Op::Register { linux, alt } => { sim.register(linux, alt); }
                Op::Submit { tests, alt, linux, priority, fail_fast } => {
                    let k = sim.runs.len();
                    let req = pb::SubmitRunRequest {
                        suite: "p".into(),
                        revision: "r".into(),
                        runner: if alt { "alt" } else { "exec" }.into(),
                        labels: if linux { vec![pb::Label { key: "os".into(), value: "linux".into() }] } else { vec![] },
                        tests: (0..tests).map(|i| format!("r{k}/t{i}")).collect(),
                        priority,
                        policy: Some(pb::RunPolicy { fail_fast, ..Default::default() }),
                        ..Default::default()
                    };
                    // "alt" is unknown until some worker registers it.
                    if let Ok(s) = sim.core.submit(req, sim.now) {
                        sim.runs.push((s.run_id.parse().unwrap(), tests, alt, linux));
                    }
                }
                Op::Acquire { worker } => {
                    let w = sim.workers[worker % sim.workers.len()];
                    sim.acquire(w);
                }
                Op::Report { worker, count, fail } => {
                    let w = sim.workers[worker % sim.workers.len()];
                    sim.report(w, count, fail);
                }
                Op::Finish { worker } => {
                    let w = sim.workers[worker % sim.workers.len()];
                    sim.finish(w);
                }
                Op::Tick { secs } => {
                    sim.now = sim.now.after(Duration::from_secs(secs));
                    sim.core.tick(sim.now).unwrap();
                }
                Op::Cancel { run } => {
                    if let Some(r) = sim.runs.get(run) {
                        let _ = sim.core.cancel(r.0, "test", sim.now);
                    }
                }
                Op::Restart => {
                    // The old core (and its connection) goes first; the new one loads the store.
                    let fresh = SqliteStore::open(Path::new(":memory:")).unwrap();
                    let placeholder = Core::open(CoreConfig::default(), fresh, sim.now).unwrap();
                    drop(std::mem::replace(&mut sim.core, placeholder));
                    sim.core = Core::open(CoreConfig::default(), SqliteStore::open(&sim.db).unwrap(), sim.now).unwrap();
                }
                Op::Deregister { worker } => {
                    let w = sim.workers[worker % sim.workers.len()];
                    let _ = sim.core.deregister(w, sim.now);
                    sim.shards.remove(&w);
                }
            }
            sim.core.check_invariants();
        }
        // Drain: a worker that can take everything runs every open run to its end.
        sim.now = sim.now.after(Duration::from_secs(60));
        sim.core.tick(sim.now).unwrap();
        let w = sim.register(true, true);
        for _ in 0..10_000 {
            sim.acquire(w);
            sim.report(w, usize::MAX, false);
            sim.finish(w);
            sim.core.check_invariants();
            let open = sim.runs.iter().any(|r| {
                !RunStatus::from_wire(sim.core.summary(r.0).unwrap().status).unwrap().is_terminal()
            });
            if !open {
                break;
            }
        }
        for (id, n, _, _) in &sim.runs {
            let got = sim.core.get_run(*id, true).unwrap();
            let status = RunStatus::from_wire(got.run.unwrap().status).unwrap();
            prop_assert!(status.is_terminal(), "run {id} did not end: {status}");
            prop_assert_eq!(got.results.len(), *n);
            let summary = sim.core.summary(*id).unwrap();
            // A cancelled run, or one that failed fast, leaves tests unrun.
            if status != RunStatus::Cancelled && !summary.message.starts_with("fail-fast") {
                for r in &got.results {
                    prop_assert!(Outcome::from_wire(r.outcome).is_some(), "test {} has no result", r.test_id);
                }
            }
        }
    }
}
