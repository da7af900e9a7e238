//! The scheduling core: the one owner of runs, tests, workers and attempts. It is plain
//! synchronous code; the actor in `actor.rs` feeds it one message at a time on its own thread,
//! and unit tests drive it directly with a stepped clock.
//!
//! - `state`: the core's memory and the [`Effects`] a message produces.
//! - `atomic`: every message in a savepoint, shaped decide → write → apply.
//! - `recovery`: opening on a store, resuming unfinished runs.
//! - `runs`: submission (whole or staged), cancellation, discovery, a run's end.
//! - `fleet`: registration, heartbeats, liveness, deregistration.
//! - `handout`: which run gets a free slot, forming and handing out its shard.
//! - `report`: counting reported results, fail-fast and the verdict they may bring.
//! - `attempts`: the end of an attempt (finished, drained, expired) and what its tests become.
//! - `gate`: quarantine changes and deploy transitions.
//! - `live`: what the read side shows of memory.
//!
//! The policies the core applies are pure functions in `crate::policy`; shard forming is
//! `crate::scheduler`.

mod atomic;
mod attempts;
mod check;
mod fleet;
mod gate;
mod handout;
mod live;
mod recovery;
mod report;
mod runs;
mod state;

pub(crate) use attempts::ended_in_failure;
pub use recovery::{DurableTest, DurableView};
pub use runs::{PlannedTests, PreparedRun};
pub use state::{Core, Effects};

#[cfg(test)]
mod faults;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
