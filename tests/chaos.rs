//! The chaos suite: seeded runs on real coordinator and worker processes while workers are
//! killed with SIGKILL mid-shard, the coordinator is killed and restarted mid-run, a worker is
//! cut off past its lease and healed, and every worker duplicates and delays some of its
//! reports. After each run the history checker (in `shardgate-testkit`) asserts that every
//! submitted test has exactly one counted result, that nothing else was counted, that every
//! counted test ran, and that outcomes and verdict equal a fault-free run's.
//!
//! A second campaign runs two coordinators on one PostgreSQL database and adds the leader
//! killed, the leader cut off from the database and the standby killed to the faults.
//!
//! `SHARDGATE_CHAOS_SEED` replays one seed; the benchmark (`shardgate-bench chaos`) runs the
//! same campaign at scale with the default lease.

mod harness;

use harness::chaos::{ChaosConfig, campaign};

#[test]
fn no_infrastructure_fault_loses_or_double_counts_a_result() {
    let seed = std::env::var("SHARDGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261126);
    let report = campaign(&ChaosConfig::quick(seed, 6));
    eprintln!(
        "seed {seed}: {} runs, faults {:?}, requeue p50 {:?} max {:?}, extra work {:.1}%",
        report.runs,
        report.faults,
        report.requeue_quantile(0.5),
        report.requeue_quantile(1.0),
        100.0 * report.extra_ms as f64 / report.work_ms.max(1) as f64
    );
    assert!(
        report.is_clean(),
        "{}\n{}",
        report.problems.join("\n"),
        report.logs.join("\n")
    );
    assert!(report.runs >= 6, "{} runs", report.runs);
    // The campaign did inject faults of every kind (a checker that saw none proves nothing).
    for kind in [
        "worker killed (SIGKILL)",
        "worker partitioned past its lease",
        "coordinator killed (SIGKILL) and restarted",
        "report duplicated",
    ] {
        assert!(
            report.faults.get(kind).copied().unwrap_or(0) > 0,
            "no '{kind}' in {:?}",
            report.faults
        );
    }
}

/// The same campaign with two coordinators on one PostgreSQL database: the leader killed with
/// SIGKILL, the leader cut off from the database through a proxy (it must stop, and its late
/// writes are fenced), the standby killed, workers killed; every run asks for a rollout, and
/// each passed run's hook runs at most once.
#[test]
fn no_failover_loses_or_double_counts_a_result_or_rolls_out_twice() {
    let seed = std::env::var("SHARDGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261130);
    let report = campaign(&ChaosConfig::quick_failover(seed, 6));
    eprintln!(
        "seed {seed}: {} runs, faults {:?}, failover p50 {:?} max {:?}",
        report.runs,
        report.faults,
        report.failover_quantile(0.5),
        report.failover_quantile(1.0),
    );
    assert!(
        report.is_clean(),
        "{}\n{}",
        report.problems.join("\n"),
        report.logs.join("\n")
    );
    assert!(report.runs >= 6, "{} runs", report.runs);
    assert!(
        !report.failover_times.is_empty(),
        "no failover happened: {:?}",
        report.faults
    );
    assert!(report.rollouts > 0, "no rollout hook ran: the check saw nothing");
}
