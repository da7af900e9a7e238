//! A coordinator killed with SIGKILL in the middle of a run and started again on the same port
//! and database: the workers ride through it and keep their shards, the client following the
//! run reconnects, and the run ends with the verdict a fault-free run gives, every test counted
//! exactly once.

mod harness;

use std::process::Stdio;
use std::time::Duration;

use harness::{Cluster, suite, wait_for};

#[test]
fn a_coordinator_killed_mid_run_is_not_a_build_failure() {
    let mut cluster = Cluster::builder().workers(3).slots(1).start();
    let tests = suite(&cluster.root, 30, &[7], "0.3");
    let follower = cluster.follow(&tests, &[], Stdio::piped());
    wait_for("a few results before the crash", Duration::from_secs(30), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        let run = runs.as_array()?.first()?.clone();
        let c = &run["counts"];
        (c["passed"].as_u64()? + c["failed"].as_u64()? >= 5).then_some(())
    });
    cluster.restart_coordinator();

    let out = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the verdict of the suite (one failing test): {stderr}\n{}",
        cluster.logs()
    );
    assert!(stderr.contains("reconnected to the coordinator"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "failed");
    let got = harness::outcomes_once(&report);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), tests);
    for (id, outcome) in &got {
        assert_eq!(
            outcome,
            if id == "t/007.sh" { "failed" } else { "passed" },
            "{id}"
        );
    }
}
