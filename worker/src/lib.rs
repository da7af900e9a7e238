//! The shardgate worker: registers with the coordinator, asks for shards while it has free
//! slots, runs their tests with a runner, streams each result back as it finishes, and keeps its
//! leases alive with heartbeats.

#![forbid(unsafe_code)]

pub mod agent;
pub mod check;
pub mod gotest;
pub mod health;
pub mod junit;
pub mod libtest;
pub mod output;
pub mod process;
pub mod profile;
pub mod runners;

pub use agent::{Config, run};
