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
    /// Most runs one requester (the token's identity) may have queued or running at once.
    pub max_active_runs_per_requester: usize,
    /// Most tests without a result one requester may have in its active runs at once.
    pub max_open_tests_per_requester: usize,
    /// How long a run may wait with no live worker able to take it, when it does not say.
    pub queue_timeout: Duration,
    /// How long the captured output of a finished run's tests is kept; forever when `None`.
    pub keep_output: Option<Duration>,
    /// Hand what committed batches produced to the trace exporter ([`crate::otlp`]): set when
    /// an OTLP endpoint is configured.
    pub trace: bool,
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
            max_active_runs_per_requester: 50,
            max_open_tests_per_requester: 4_000_000,
            queue_timeout: Duration::from_secs(600),
            keep_output: None,
            trace: false,
        }
    }
}

/// Most retries of a failed test a run may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Most workers a test may lose before it is an infrastructure error.
pub const MAX_INFRA_ATTEMPTS: u32 = 20;
/// Longest per-test timeout a run may ask for: a day.
pub const MAX_TEST_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Longest a run may ask to wait for a worker that can take it: a week.
pub const MAX_QUEUE_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

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
    /// 0 in runs stored before it existed: the coordinator's default then.
    #[serde(default)]
    pub queue_timeout_ms: u64,
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

    /// The policy a run asked for with the coordinator's defaults filled in; numbers out of
    /// range are refused, not capped.
    pub fn resolve(wire: Option<&pb::RunPolicy>, cfg: &CoreConfig) -> Result<Self, shardgate_common::Error> {
        use shardgate_common::Error;
        let wire = wire.cloned().unwrap_or_default();
        let bound = |field: &'static str, v: u64, max: u64, unit: &str| {
            if v > max {
                Err(Error::invalid(
                    field,
                    format!("{v}{unit} is more than the {max}{unit} allowed"),
                ))
            } else {
                Ok(())
            }
        };
        bound(
            "policy.retries",
            wire.retries.unwrap_or(0).into(),
            MAX_RETRIES.into(),
            "",
        )?;
        bound(
            "policy.flaky_retries",
            wire.flaky_retries.unwrap_or(0).into(),
            MAX_RETRIES.into(),
            "",
        )?;
        bound(
            "policy.max_infra_attempts",
            wire.max_infra_attempts.into(),
            MAX_INFRA_ATTEMPTS.into(),
            "",
        )?;
        bound(
            "policy.test_timeout_ms",
            wire.test_timeout_ms,
            MAX_TEST_TIMEOUT_MS,
            " ms",
        )?;
        bound(
            "policy.queue_timeout_ms",
            wire.queue_timeout_ms,
            MAX_QUEUE_TIMEOUT_MS,
            " ms",
        )?;
        if let (Some(r), Some(f)) = (wire.retries, wire.flaky_retries)
            && f < r
        {
            return Err(Error::invalid(
                "policy.flaky_retries",
                format!(
                    "{f} is fewer than the {r} retries every test gets; tests with a flaky history get at least as many"
                ),
            ));
        }
        Ok(Self {
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
            retries: wire.retries.unwrap_or(cfg.retries),
            strict_flaky: wire.strict_flaky,
            fail_fast: wire.fail_fast,
            flaky_retries: wire.flaky_retries.unwrap_or(cfg.flaky_retries),
            queue_timeout_ms: if wire.queue_timeout_ms == 0 {
                cfg.queue_timeout.as_millis() as u64
            } else {
                wire.queue_timeout_ms
            },
        })
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
            queue_timeout_ms: self.queue_timeout_ms,
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
