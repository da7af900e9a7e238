//! Drives real shardgate processes on loopback for the integration tests and the chaos
//! benchmark: clusters of a coordinator and workers ([`cluster`]), a TCP proxy that partitions
//! one worker from the coordinator ([`proxy`]), and the seeded chaos campaign with its history
//! checker ([`chaos`]).

pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod postgres;
pub mod proxy;
pub mod pypi;

pub use cluster::{
    Cluster, ClusterBuilder, Ran, TOKENS, bin, bin_dir, client, coordinator_ready, free_port, http_get,
    http_get_with, on_postgres, outcomes_once, poll_until, poll_until_async, script, suite, test_db,
    wait_for,
};
