//! Coordinator configuration and the run policy as it is resolved and stored.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shardgate_common::pb;

/// Scheduling settings of the coordinator (the CLI fills them from flags).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// How long an attempt lives without a heartbeat or report from its worker.
    pub lease: Duration,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// Per-test timeout when a run does not ask for one.
    pub default_test_timeout: Duration,
    /// Hand-outs of a test whose attempts keep getting lost before it is an infra error.
    pub max_infra_attempts: u32,
    /// Longest captured output kept per test, in bytes.
    pub max_output_bytes: usize,
    /// Assumed cost of one shard hand-out until it has been measured.
    pub initial_overhead: Duration,
    /// Runs again of a failed test when the run does not say.
    pub retries: u32,
    /// Runs again of a failed test with a flaky history when the run does not say.
    pub flaky_retries: u32,
    /// A test whose flake rate reaches this (over at least `quarantine_min_runs` counted runs)
    /// is proposed for quarantine, or quarantined when `auto_quarantine` is set.
    pub quarantine_threshold: f64,
    pub quarantine_min_runs: u32,
    pub auto_quarantine: bool,
    /// A rollout hook is configured: runs may ask for a rollout.
    pub rollout_configured: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            default_test_timeout: Duration::from_secs(300),
            max_infra_attempts: 3,
            max_output_bytes: 64 * 1024,
            initial_overhead: Duration::from_millis(500),
            retries: 2,
            flaky_retries: 4,
            quarantine_threshold: 0.05,
            quarantine_min_runs: 10,
            auto_quarantine: false,
            rollout_configured: false,
        }
    }
}

/// A run's policy with every default filled in, as stored with the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub test_timeout_ms: u64,
    pub max_infra_attempts: u32,
    #[serde(default)]
    pub fail_first: bool,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub strict_flaky: bool,
    #[serde(default)]
    pub fail_fast: bool,
    #[serde(default)]
    pub flaky_retries: u32,
}

impl Policy {
    /// Retries a test gets: more when it has a flaky history, so that a known flake does not
    /// turn the run red, while a new failure of a test that never flaked stays a fast red.
    pub fn retries_for(&self, flaky_history: bool) -> u32 {
        if flaky_history {
            self.retries.max(self.flaky_retries)
        } else {
            self.retries
        }
    }

    pub fn resolve(wire: Option<&pb::RunPolicy>, cfg: &CoreConfig) -> Self {
        let wire = wire.cloned().unwrap_or_default();
        Self {
            test_timeout_ms: if wire.test_timeout_ms == 0 {
                cfg.default_test_timeout.as_millis() as u64
            } else {
                wire.test_timeout_ms
            },
            max_infra_attempts: if wire.max_infra_attempts == 0 {
                cfg.max_infra_attempts
            } else {
                wire.max_infra_attempts
            },
            fail_first: wire.fail_first,
            retries: wire.retries.unwrap_or(cfg.retries).min(10),
            strict_flaky: wire.strict_flaky,
            fail_fast: wire.fail_fast,
            flaky_retries: wire.flaky_retries.unwrap_or(cfg.flaky_retries).min(10),
        }
    }

    pub fn to_wire(self) -> pb::RunPolicy {
        pb::RunPolicy {
            test_timeout_ms: self.test_timeout_ms,
            max_infra_attempts: self.max_infra_attempts,
            fail_first: self.fail_first,
            retries: Some(self.retries),
            strict_flaky: self.strict_flaky,
            fail_fast: self.fail_fast,
            flaky_retries: Some(self.flaky_retries),
        }
    }
}

/// The current time as both a monotonic instant (for leases) and wall-clock milliseconds (for
/// what is stored and shown). Passed into the core so tests control time.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub ms: u64,
}

impl Now {
    pub fn real() -> Self {
        Self {
            at: Instant::now(),
            ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// `d` later, for tests that step time.
    pub fn after(self, d: Duration) -> Self {
        Self {
            at: self.at + d,
            ms: self.ms + d.as_millis() as u64,
        }
    }
}
