//! Pure scheduling decisions, free of I/O and of the core's bookkeeping, so that unit tests,
//! property tests and the simulator in `shardgate-bench` run exactly the code the coordinator
//! runs.
//!
//! - [`History`] is a test's duration estimate, kept per (suite, test id) and updated from every
//!   result: an exponentially weighted mean of passing runs whose samples are clamped to a band
//!   around the current estimate, so one slow outlier moves it only a little.
//! - [`plan`] gives every test of a run an estimate, including tests with no history (cold
//!   start): the mean of known tests that share its path prefix, else the suite's mean. Cold
//!   tests are *sorted* as if they were long (at least the suite's 99th percentile), so they go
//!   out early, when a surprise giant among them can still be absorbed.
//! - [`Learning`] is what a run learns about those tests from its own results: per prefix
//!   group, with a probe of every group first, re-planning the waiting ones as results come.
//! - [`RunQueue`] holds a run's waiting tests, longest (sort key) first, and forms each shard on
//!   demand: a test whose estimate is a large part of the work left per slot goes out alone;
//!   otherwise tests are batched up to a target that balances the per-shard overhead against the
//!   imbalance a coarse shard causes at the end (`sqrt(2 · overhead · work per slot)`), capped at
//!   a third of the work left per slot, so shards shrink as the run drains. The work left
//!   counts, of each shard out on a worker, only what is left until it is due to end
//!   ([`Outstanding`]). For a runner that pays a start-up cost per unit a shard touches
//!   (nextest, per test binary), a shard is filled with its first test's unit first
//!   ([`RunQueue::next_shard_by`]).

use serde::{Deserialize, Serialize};
use shardgate_common::Outcome;

mod learning;
mod outstanding;
mod queue;

pub use learning::{Learning, plan};
pub use outstanding::Outstanding;
pub use queue::{Batch, RunQueue, ShardContext, target_ms};

/// Weight of a new sample in the duration estimate.
const ALPHA: f64 = 0.3;
/// A sample counts as at most this many times the estimate (and at least its inverse).
const DAMP: f64 = 3.0;
/// The per-shard overhead assumed at least, whatever is measured: it keeps shards from
/// shrinking to single short tests when hand-outs are nearly free for the worker but still
/// cost the coordinator a round trip and a write.
pub const MIN_OVERHEAD_MS: f64 = 50.0;
/// Estimate for a test when the suite has no history at all.
pub const DEFAULT_ESTIMATE_MS: f64 = 1000.0;
/// Tests with no history are sorted as if they took this quantile of the known estimates: only
/// the longest known tests go before them, so a surprise giant among them starts early.
const COLD_QUANTILE: f64 = 0.999;
/// A recent failure (within this many runs' worth of time) sends a test first under fail-first.
pub const RECENT_FAILURE_MS: u64 = 7 * 24 * 3600 * 1000;

/// What the store keeps about one test of one suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Estimated duration in milliseconds; 0 while no passing run was seen.
    pub estimate_ms: f64,
    /// Passing runs that fed the estimate.
    pub samples: u32,
    /// When the test last failed (wall-clock ms), 0 if never.
    pub last_failed_ms: u64,
}

impl History {
    /// Folds one result into the history.
    pub fn update(self, outcome: Outcome, duration_ms: u64, now_ms: u64) -> Self {
        let d = duration_ms as f64;
        let mut h = self;
        match outcome {
            Outcome::Passed | Outcome::Flaky => {
                if h.samples == 0 || h.estimate_ms <= 0.0 {
                    h.estimate_ms = d;
                } else {
                    let clamped = d.clamp(h.estimate_ms / DAMP, h.estimate_ms * DAMP);
                    h.estimate_ms += ALPHA * (clamped - h.estimate_ms);
                }
                h.samples = h.samples.saturating_add(1);
                if outcome == Outcome::Flaky {
                    h.last_failed_ms = now_ms;
                }
            }
            Outcome::Failed => h.last_failed_ms = now_ms,
            Outcome::TimedOut => {
                // It ran at least this long: never estimate it shorter.
                h.estimate_ms = h.estimate_ms.max(d);
                h.last_failed_ms = now_ms;
            }
            Outcome::Skipped | Outcome::InfraError => {}
        }
        h
    }

    pub fn known(&self) -> bool {
        self.samples > 0 && self.estimate_ms > 0.0
    }
}

/// A test's place in the plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Expected duration, for the work accounting.
    pub estimate_ms: f64,
    /// Order key: larger goes out earlier.
    pub key: f64,
    /// No history: the estimate is a guess.
    pub cold: bool,
}

/// Options of the plan a run asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Tests that failed recently go first, for an early red signal.
    pub fail_first: bool,
}

/// Added to the order key of a test that failed recently, under fail-first: ahead of
/// everything that did not, still longest first among them.
pub(crate) const FAIL_FIRST_KEY: f64 = 1e12;

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    pub(super) fn plans(est: &[f64]) -> Vec<Plan> {
        est.iter()
            .map(|&e| Plan {
                estimate_ms: e,
                key: e,
                cold: false,
            })
            .collect()
    }

    pub(super) fn ctx(slots: usize) -> ShardContext {
        ShardContext {
            slots,
            running_ms: 0.0,
            overhead_ms: 100.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_passing_runs_and_damps_outliers() {
        let h = History::default().update(Outcome::Passed, 1000, 1);
        assert_eq!(h.estimate_ms, 1000.0);
        let h = h.update(Outcome::Passed, 100_000, 2);
        // The outlier counts as 3 s: 1000 + 0.3 · 2000.
        assert_eq!(h.estimate_ms, 1600.0);
        let h = h.update(Outcome::Failed, 5, 3);
        assert_eq!((h.estimate_ms, h.last_failed_ms), (1600.0, 3));
        let h = h.update(Outcome::TimedOut, 60_000, 4);
        assert_eq!(h.estimate_ms, 60_000.0);
        assert_eq!(h.update(Outcome::InfraError, 1, 5), h);
    }
}
