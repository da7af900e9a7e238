//! Worker faults one at a time, on real processes: a drained worker hands its tests back at
//! once; a killed worker's tests come back when its connection closes, not after its lease; a worker cut off past its lease loses its shard, has its late results refused and then
//! takes new work; a test that kills its worker is tried on a few different workers and then
//! reported as an infrastructure error while the rest of the run passes.

mod harness;

use std::process::{Child, Stdio};
use std::time::Duration;

use harness::{Cluster, script, wait_for};

/// Starts `shardgate run --json` on `tests` in the background.
fn follow(cluster: &Cluster, tests: &[&str]) -> Child {
    let tests: Vec<String> = tests.iter().map(|t| t.to_string()).collect();
    cluster.follow(&tests, &[], Stdio::piped())
}

/// Waits for the client to exit within `timeout`; returns its exit code and JSON report.
fn verdict(cluster: &Cluster, mut c: Child, timeout: Duration) -> (i32, serde_json::Value) {
    wait_for("the run to end", timeout, || c.try_wait().unwrap());
    let out = c.wait_with_output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn result<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    let hits: Vec<_> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"] == id)
        .collect();
    assert_eq!(hits.len(), 1, "{id} counted once: {report}");
    hits[0]
}

/// The index of the worker whose process is `pid`.
fn worker_with_pid(cluster: &Cluster, pid: u32) -> usize {
    (0..cluster.worker_count())
        .find(|&i| cluster.worker_pid(i) == Some(pid))
        .expect("the test's parent is one of our workers")
}

/// A test that runs for a minute the first time (recording its worker's pid) and passes at once
/// after that.
fn slow_first_time(cluster: &Cluster, id: &str) -> std::path::PathBuf {
    let marker = cluster.dir.path().join(format!("{id}.pid").replace('/', "_"));
    script(
        &cluster.root,
        id,
        &format!(
            "m='{m}'\nif [ -e \"$m\" ]; then exit 0; fi\necho $PPID > \"$m.tmp\" && mv \"$m.tmp\" \"$m\"\nsleep 60",
            m = marker.display()
        ),
    );
    marker
}

#[test]
fn a_drained_worker_hands_its_running_tests_back_at_once() {
    // A 30 s lease: only the hand-back, not the lease, can requeue the test within the deadline.
    let mut cluster = Cluster::builder()
        .workers(2)
        .slots(1)
        .lease("30s", "1s")
        .worker_env("SHARDGATE_DRAIN_GRACE", "1s")
        .start();
    let marker = slow_first_time(&cluster, "t/slow.sh");
    let run = follow(&cluster, &["t/slow.sh"]);
    let pid: u32 = wait_for("the slow test to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    let drained = worker_with_pid(&cluster, pid);
    let status = cluster.stop_worker(drained).unwrap();
    assert!(status.success(), "a drain is a clean exit: {status:?}");

    let (code, report) = verdict(&cluster, run, Duration::from_secs(20));
    assert_eq!(code, 0, "{report}");
    let t = result(&report, "t/slow.sh");
    assert_eq!(t["outcome"], "passed");
    assert_eq!(t["attempts"], 2);
    assert_ne!(t["worker"], cluster.worker_name(drained));
    let workers = cluster.http_json("/api/workers?include_gone=true").unwrap();
    let gone = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == cluster.worker_name(drained))
        .unwrap();
    assert_eq!(gone["state"], "gone", "it deregistered: {workers}");
}

#[test]
fn a_killed_workers_shard_comes_back_when_its_connection_closes_not_after_its_lease() {
    // A 30 s lease: only the closed connection, not the lease, can requeue the test in time.
    let mut cluster = Cluster::builder().workers(2).slots(1).lease("30s", "1s").start();
    let marker = slow_first_time(&cluster, "t/slow.sh");
    let run = follow(&cluster, &["t/slow.sh"]);
    let pid: u32 = wait_for("the slow test to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    let killed = worker_with_pid(&cluster, pid);
    let name = cluster.worker_name(killed).to_owned();
    let t0 = std::time::Instant::now();
    cluster.kill_worker(killed);
    wait_for(
        "the killed worker's shard to be taken back",
        Duration::from_secs(15),
        || {
            let workers = cluster.http_json("/api/workers")?;
            workers
                .as_array()?
                .iter()
                .any(|w| w["name"] == name.as_str() && w["busy_slots"] == 0 && w["state"] == "lost")
                .then_some(())
        },
    );
    eprintln!("requeued {:?} after the kill", t0.elapsed());

    let (code, report) = verdict(&cluster, run, Duration::from_secs(20));
    assert_eq!(code, 0, "{report}");
    let t = result(&report, "t/slow.sh");
    assert_eq!((&t["outcome"], &t["attempts"]), (&"passed".into(), &2.into()));
    assert_ne!(t["worker"], name.as_str());
    assert!(
        cluster.logs().contains("worker disconnected"),
        "{}",
        cluster.logs()
    );
}

#[test]
fn a_partitioned_worker_loses_its_shard_its_late_results_are_refused_and_it_comes_back() {
    let cluster = Cluster::builder().workers(2).slots(1).proxied().start();
    // The first run of this test ends during the cut: its result can only arrive late.
    let marker = cluster.dir.path().join("late.pid");
    script(
        &cluster.root,
        "t/late.sh",
        &format!(
            "m='{m}'\nif [ -e \"$m\" ]; then exit 0; fi\necho $PPID > \"$m.tmp\" && mv \"$m.tmp\" \"$m\"\nsleep 2",
            m = marker.display()
        ),
    );
    let quick = harness::suite(&cluster.root, 10, &[], "0.2");
    let run = follow(&cluster, &["t/late.sh"]);
    let pid: u32 = wait_for("the test to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    let cut = worker_with_pid(&cluster, pid);
    cluster.link(cut).cut();
    // The coordinator takes the shard back once the lease (3 s) runs out...
    let name = cluster.worker_name(cut).to_owned();
    wait_for(
        "the cut-off worker's shard to be taken back",
        Duration::from_secs(30),
        || {
            let workers = cluster.http_json("/api/workers")?;
            workers
                .as_array()?
                .iter()
                .any(|w| w["name"] == name.as_str() && w["busy_slots"] == 0)
                .then_some(())
        },
    );
    cluster.link(cut).heal();

    let (code, report) = verdict(&cluster, run, Duration::from_secs(30));
    assert_eq!(code, 0, "{report}");
    let t = result(&report, "t/late.sh");
    assert_eq!((&t["outcome"], &t["attempts"]), (&"passed".into(), &2.into()));
    assert_ne!(
        t["worker"],
        name.as_str(),
        "the late result was not the one counted"
    );
    // ...and the worker's late result is refused once it can be heard again.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    harness::poll_until(deadline, || {
        (cluster.worker_log_count("result refused; stopping the attempt") > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("never told:\n{}", cluster.logs()));

    // It takes new work after the partition.
    let ids: Vec<&str> = quick.iter().map(String::as_str).collect();
    let (code, report) = verdict(&cluster, follow(&cluster, &ids), Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    let on_it = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["worker"] == name.as_str())
        .count();
    assert!(on_it > 0, "the healed worker ran nothing: {report}");
}

#[test]
fn a_test_that_kills_its_worker_is_given_up_after_three_different_workers() {
    let cluster = Cluster::builder().workers(4).slots(1).start();
    script(&cluster.root, "t/poison.sh", "kill -9 $PPID\nsleep 30");
    let mut tests = harness::suite(&cluster.root, 8, &[], "0.1");
    tests.push("t/poison.sh".into());
    let ids: Vec<&str> = tests.iter().map(String::as_str).collect();
    let (code, report) = verdict(&cluster, follow(&cluster, &ids), Duration::from_secs(90));
    assert_eq!(code, 1, "an infrastructure error fails the gate: {report}");
    let p = result(&report, "t/poison.sh");
    assert_eq!(p["outcome"], "infra_error");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("on 3 worker(s)"), "{detail}");
    for id in &tests[..8] {
        assert_eq!(result(&report, id)["outcome"], "passed", "{id}: {report}");
    }
    // One worker is left: the fleet was not taken down.
    let live = cluster.client(&["workers", "--json"]).json();
    let live = live
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "live")
        .count();
    assert_eq!(live, 1);
}
