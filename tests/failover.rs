//! Coordinators that share a PostgreSQL database: one leads, the other stands by and sends
//! callers to the leader; when the leader is killed with SIGKILL in the middle of a run, the
//! standby takes the lead, resumes the run, and the run ends with the verdict a fault-free run
//! gives, every test counted exactly once.

mod harness;

use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::postgres::PgServer;
use harness::proxy::Proxy;
use harness::{Cluster, client, http_get, suite, wait_for};

#[test]
fn a_standby_takes_over_when_the_leader_is_killed_mid_run() {
    let mut cluster = Cluster::builder().on_postgres().workers(0).slots(1).start();
    let standby = cluster.start_standby();
    assert_eq!(standby["role"], "standby", "{standby}");
    let standby_grpc = format!("http://{}", standby["grpc_addr"].as_str().unwrap());
    let standby_http = standby["http_addr"].as_str().unwrap().to_owned();

    // A standby names the leader to callers, over gRPC and HTTP.
    let asked = client(&["runs", "--coordinator", &standby_grpc]);
    assert_ne!(asked.code, 0);
    assert!(
        asked.stderr.contains("standby") && asked.stderr.contains(&cluster.grpc_addr),
        "{}",
        asked.stderr
    );
    let (code, body) = http_get(&standby_http, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&cluster.grpc_addr), "{body}");
    // A client given both addresses finds the leader, whichever comes first.
    let both = format!("{standby_grpc},http://{}", cluster.grpc_addr);
    let listed = client(&["runs", "--json", "--coordinator", &both]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);

    for _ in 0..3 {
        cluster.add_worker();
    }
    cluster.wait_for_live_workers(3);
    let tests = suite(&cluster.root, 30, &[7], "0.3");
    let follower = cluster.follow(&tests, &[], Stdio::piped());
    wait_for("a few results before the crash", Duration::from_secs(60), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        let run = runs.as_array()?.first()?.clone();
        let c = &run["counts"];
        (c["passed"].as_u64()? + c["failed"].as_u64()? >= 5).then_some(())
    });
    cluster.kill_coordinator();
    let killed = Instant::now();
    wait_for("the standby to take the lead", Duration::from_secs(30), || {
        matches!(http_get(&standby_http, "/readyz"), Ok((200, _))).then_some(())
    });
    eprintln!(
        "failover: the standby was ready {:?} after the kill",
        killed.elapsed()
    );

    let out = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the verdict of the suite (one failing test): {stderr}\n{}",
        cluster.logs()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "failed");
    let got = harness::outcomes_once(&report);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), tests);
    for (id, outcome) in &got {
        let want = if id == "t/007.sh" { "failed" } else { "passed" };
        assert_eq!(outcome, want, "{id}");
    }
    // The workers followed the new leader.
    assert!(
        cluster.worker_log_count("following the coordinator that leads") >= 1,
        "{}",
        cluster.logs()
    );
}

/// The leader cut off from PostgreSQL (a black hole, not a refusal) cannot renew its lease:
/// it stops by itself, the standby takes the lead once the lease has run out, and the run ends
/// as a fault-free run does.
#[test]
fn a_leader_cut_off_from_postgres_steps_down_and_the_standby_finishes_the_run() {
    let pg = PgServer::shared();
    let direct = pg.database();
    let name = direct.rsplit('/').next().unwrap().to_owned();
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port()).parse().unwrap()).unwrap();
    let proxied = format!("postgres://postgres@{}/{name}", proxy.addr());
    let mut cluster = Cluster::builder().db(&proxied).workers(0).slots(1).start();
    cluster.db = direct.into();
    let standby = cluster.start_standby();
    assert_eq!(standby["role"], "standby", "{standby}");
    let standby_http = standby["http_addr"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        cluster.add_worker();
    }
    cluster.wait_for_live_workers(3);
    let tests = suite(&cluster.root, 30, &[7], "0.3");
    let follower = cluster.follow(&tests, &[], Stdio::piped());
    wait_for("a few results before the cut", Duration::from_secs(60), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        let run = runs.as_array()?.first()?.clone();
        let c = &run["counts"];
        (c["passed"].as_u64()? + c["failed"].as_u64()? >= 5).then_some(())
    });
    proxy.cut();
    let cut = Instant::now();
    let status = cluster
        .wait_coordinator_exit(Duration::from_secs(60))
        .expect("the cut-off leader stops by itself");
    assert_eq!(status.code(), Some(70), "{}", cluster.logs());
    wait_for("the standby to take the lead", Duration::from_secs(60), || {
        matches!(http_get(&standby_http, "/readyz"), Ok((200, _))).then_some(())
    });
    eprintln!(
        "failover: the standby was ready {:?} after the cut",
        cut.elapsed()
    );
    assert!(
        cluster.logs().contains("can no longer show it leads"),
        "{}",
        cluster.logs()
    );

    let out = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", cluster.logs());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = harness::outcomes_once(&report);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), tests);
    assert_eq!(got.values().filter(|o| *o == "failed").count(), 1);
}
