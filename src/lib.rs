//! The `shardgate` command line: the client (`run`, `watch`, `status`, `cancel`, `runs`,
//! `workers`, `flaky`, `quarantine`), the embedded `local` mode, and the argument parsing and start-up of the
//! `shardgate-coordinator` and `shardgate-worker` binaries. The binaries themselves are thin.

#![forbid(unsafe_code)]

/// mimalloc rather than the system allocator: a coordinator rendering megabytes of JSON for
/// dashboards frees large blocks all the time, and glibc returns them with `munmap`, which takes
/// the process-wide memory-map lock and stalls every other thread, the scheduler included
/// (`shardgate-bench reads`: hand-out p99 with 50 readers 2.2x of quiet with glibc, 1.3x or less
/// with mimalloc).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod args;
pub mod cli;
pub mod client;
pub mod config;
pub mod connect;
pub mod display;
pub mod gate;
pub mod local;
pub mod servers;
pub mod submit;
pub mod util;

/// Exit codes, part of the contract (see the README).
pub mod exit {
    /// The gate passed.
    pub const PASSED: u8 = 0;
    /// The gate failed (a test failed, or the run was cancelled).
    pub const FAILED: u8 = 1;
    /// Usage, connection, configuration or infrastructure error; or the run errored.
    pub const ERROR: u8 = 2;
}
