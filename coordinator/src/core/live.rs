//! What the core shows the read side: the live state of active runs (counts with what is
//! running, shard progress) and of the fleet, which only memory knows. The actor copies the
//! parts a batch changed into the shared [`LiveView`] after the batch committed.

use shardgate_common::{Error, RunId, pb};

use shardgate_common::AttemptId;

use super::Core;
use super::state::{Attempt, RunState};
use crate::read::{LiveRun, LiveView, SHARDS_REFRESH};
use crate::store::summary_of;

impl Core {
    /// A run's summary: from memory when active, from the store otherwise.
    pub fn summary(&self, run: RunId) -> Result<pb::RunSummary, Error> {
        if let Some(r) = self.runs.get(&run) {
            return Ok(r.summary());
        }
        let (row, counts) = self
            .store
            .run_with_counts(run)?
            .ok_or_else(|| Error::not_found("run", run))?;
        Ok(summary_of(&row, counts.to_wire()))
    }

    /// Attempt `id` as shard progress: `state` "running" while it runs, else how it ended.
    pub(crate) fn shard_progress(
        &self,
        id: AttemptId,
        a: &Attempt,
        state: &str,
        ended_ms: u64,
    ) -> pb::ShardProgress {
        let run = self.runs.get(&a.run);
        let test = |i: u32| run.and_then(|r| r.tests.get(i as usize));
        pb::ShardProgress {
            attempt_id: id.to_string(),
            run_id: a.run.to_string(),
            worker: self.worker_name(a.worker),
            tests: a.total,
            done: a.total - a.pending.len() as u32,
            started_at_ms: a.started_ms,
            shard_id: a.shard.to_string(),
            current_test: if ended_ms == 0 {
                a.pending
                    .first()
                    .and_then(|&i| test(i))
                    .map(|t| t.id.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            ended_at_ms: ended_ms,
            state: state.to_owned(),
            // While it runs, what is left of it; once it ended, the whole shard's.
            estimated_ms: if ended_ms == 0 {
                run.map_or(0.0, |r| r.estimate_ms(&a.pending))
            } else {
                a.estimate_ms
            }
            .round() as u64,
        }
    }

    fn live_run(&self, r: &RunState) -> LiveRun {
        let mut shards: Vec<_> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.run == r.row.id)
            .map(|(id, a)| self.shard_progress(*id, a, "running", 0))
            .collect();
        shards.sort_by(|a, b| a.attempt_id.cmp(&b.attempt_id));
        LiveRun {
            summary: r.summary(),
            shards,
            shards_at: Some(std::time::Instant::now()),
            shards_stale: false,
        }
    }

    /// Everything live, as a fresh view.
    pub fn live_view(&self) -> LiveView {
        let mut view = LiveView::default();
        for r in self.runs.values() {
            view.runs.insert(r.row.id, self.live_run(r));
        }
        for w in self.workers.values() {
            view.workers.insert(w.row.id, w.to_wire());
        }
        view
    }

    /// Rebuilds the shard lists that [`Core::refresh_live`] left stale and that are due; whether
    /// some are still stale (the actor asks again at its next turn).
    pub fn refresh_stale_shards(&self, view: &mut LiveView) -> bool {
        let mut stale = false;
        for (id, live) in view.runs.iter_mut() {
            if !live.shards_stale {
                continue;
            }
            match self.runs.get(id) {
                Some(r) if live.shards_at.is_none_or(|t| t.elapsed() >= SHARDS_REFRESH) => {
                    *live = self.live_run(r);
                }
                Some(_) => stale = true,
                None => live.shards_stale = false,
            }
        }
        stale
    }

    /// Copies what changed into `view`: changed runs (dropped once ended) and workers. A run's
    /// counts are always copied; its shard list at most every [`SHARDS_REFRESH`]. Returns
    /// whether a shard list was left stale.
    pub fn refresh_live(
        &self,
        view: &mut LiveView,
        runs: &std::collections::HashSet<RunId>,
        workers: &std::collections::HashSet<shardgate_common::WorkerId>,
    ) -> bool {
        let mut stale = false;
        for id in runs {
            match self.runs.get(id) {
                // The counts at once; the shard list when it is due (building it walks every
                // live attempt).
                Some(r) => match view.runs.get_mut(id) {
                    Some(live) if live.shards_at.is_some_and(|t| t.elapsed() < SHARDS_REFRESH) => {
                        live.summary = r.summary();
                        live.shards_stale = true;
                        stale = true;
                    }
                    _ => {
                        view.runs.insert(*id, self.live_run(r));
                    }
                },
                None => {
                    view.runs.remove(id);
                }
            }
        }
        for id in workers {
            match self.workers.get(id) {
                Some(w) => {
                    view.workers.insert(*id, w.to_wire());
                }
                None => {
                    view.workers.remove(id);
                }
            }
        }
        stale
    }
}
