//! Direct reads and self-checks for embedded callers and tests, which drive the core without an
//! actor or a read side.

use std::sync::RwLock;

use shardgate_common::labels;
use shardgate_common::{Error, RunId, pb};

use super::Core;
use crate::read::{self, ReadConfig, Snapshot};

impl Core {
    /// A run with its results, read through the writer's own connection. Servers answer this
    /// from the read side instead; this is for the benchmarks and tests that hold the core.
    pub fn get_run(&self, id: RunId, include_results: bool) -> Result<pb::GetRunResponse, Error> {
        let live = RwLock::new(self.live_view());
        read::get_run(self.store.as_ref(), &Snapshot::of(&live), id, include_results)
    }

    /// The newest runs, as [`Core::get_run`] reads them.
    pub fn list_runs(&self, limit: u32) -> Result<Vec<pb::RunSummary>, Error> {
        let live = RwLock::new(self.live_view());
        read::list_runs(self.store.as_ref(), &Snapshot::of(&live), limit)
    }

    /// The flakiest tests of `suite`, as [`Core::get_run`] reads them.
    pub fn list_flaky(&self, suite: &str, limit: u32) -> Result<Vec<pb::FlakyTest>, Error> {
        read::list_flaky(self.store.as_ref(), ReadConfig::from(&self.cfg), suite, limit)
    }

    /// The quarantine of `suite` (or every suite), as [`Core::get_run`] reads it.
    pub fn list_quarantine(&self, suite: &str) -> Result<Vec<pb::QuarantineEntry>, Error> {
        read::list_quarantine(self.store.as_ref(), suite)
    }

    /// Checks that the core's bookkeeping agrees with itself: every open test is either waiting
    /// in its run's queue exactly once or held by exactly one live attempt, and the counts
    /// match. Panics with what is wrong.
    pub fn check_invariants(&self) {
        for (run_id, run) in &self.runs {
            for (due, held) in run.outstanding.iter() {
                assert!(
                    self.attempts
                        .get(held)
                        .is_some_and(|h| h.run == *run_id && h.due_ms == *due),
                    "the run's outstanding work holds an attempt that is not live in it"
                );
            }
        }
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
