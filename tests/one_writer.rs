//! One writer per database: a second coordinator on a live coordinator's database refuses to
//! start and names the holder; once the holder is killed with SIGKILL a new coordinator takes
//! the database over at once, with no clean-up, and resumes the run. And a database cannot
//! vanish silently: removed while the coordinator runs, it stops.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Cluster, bin, suite, wait_for};

#[test]
fn a_second_coordinator_is_refused_and_takes_over_once_the_holder_is_killed() {
    let mut cluster = Cluster::builder().workers(2).slots(1).start();
    let tests = suite(&cluster.root, 12, &[3], "0.2");
    let follower = cluster.follow(&tests, &[], Stdio::piped());
    wait_for("a first result", Duration::from_secs(30), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        let c = runs.as_array()?.first()?["counts"].clone();
        (c["passed"].as_u64()? + c["failed"].as_u64()? >= 1).then_some(())
    });

    let holder = cluster.coordinator_pid().unwrap();
    let second = Command::new(bin("shardgate-coordinator"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--db")
        .arg(&cluster.db)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is held by another coordinator") && stderr.contains(&format!("pid {holder}")),
        "{stderr}"
    );
    assert!(second.stdout.is_empty(), "it never said it was serving");

    // The holder dies hard; its replacement starts on the same database and finishes the run.
    cluster.restart_coordinator();
    let out = follower.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        )
    });
    assert_eq!(out.status.code(), Some(1), "one failing test");
    assert_eq!(report["tests"].as_array().unwrap().len(), tests.len());
    assert_eq!(report["counts"]["failed"], 1);
}

#[test]
fn a_database_removed_while_the_coordinator_runs_stops_it_before_it_acknowledges_more() {
    let mut cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = suite(&cluster.root, 20, &[], "0.2");
    let follower = cluster.follow(&tests, &["--reconnect-for", "2s"], Stdio::piped());
    wait_for("a first result", Duration::from_secs(30), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        let c = runs.as_array()?.first()?["counts"].clone();
        (c["passed"].as_u64()? >= 1).then_some(())
    });
    std::fs::remove_file(&cluster.db).unwrap();
    let status = cluster
        .wait_coordinator_exit(Duration::from_secs(30))
        .expect("the coordinator stops by itself");
    assert_eq!(status.code(), Some(70), "{}", cluster.logs());
    let logs = cluster.logs();
    assert!(logs.contains("was removed while the coordinator ran"), "{logs}");
    let out = follower.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no verdict without a store");
}

#[test]
fn a_live_database_is_backed_up_and_a_coordinator_starts_on_the_copy() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = suite(&cluster.root, 3, &[], "0");
    let run = cluster.run_tests(&tests, &[]).json()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    let backup = |to: &std::path::Path| {
        Command::new(bin("shardgate-coordinator"))
            .arg("backup")
            .arg("--db")
            .arg(&cluster.db)
            .arg("--to")
            .arg(to)
            .output()
            .unwrap()
    };
    let out = backup(&copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Never over an existing file.
    let again = backup(&copy);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    // The copy is a database a coordinator serves, with the run in it.
    let mut restored = Command::new(bin("shardgate-coordinator"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--db"])
        .arg(&copy)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = harness::coordinator_ready(&mut restored);
    let url = format!("http://{}", ready["grpc_addr"].as_str().unwrap());
    let r = harness::client(&["status", &run, "--json", "--coordinator", &url]);
    restored.kill().unwrap();
    restored.wait().unwrap();
    assert_eq!(r.json()["verdict"], "passed", "{}", r.stderr);
}
