//! End-to-end tests of the walking skeleton: a real coordinator, three real workers, the real
//! client, a 200-test exec suite.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use harness::{Cluster, client, script, suite, wait_for};

/// Each test's outcome by id, checking that no id appears twice.
fn outcomes(report: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in report["tests"].as_array().expect("tests array") {
        let id = t["id"].as_str().unwrap().to_owned();
        let prev = out.insert(id.clone(), t["outcome"].as_str().unwrap_or("none").to_owned());
        assert!(prev.is_none(), "test {id} has two results");
    }
    out
}

#[test]
fn a_green_suite_of_200_tests_over_three_workers_passes_with_one_result_each() {
    let cluster = Cluster::builder().workers(3).slots(2).start();
    let tests = suite(&cluster.root, 200, &[], "0.02");
    let ran = cluster.run_tests(&tests, &[]);
    assert_eq!(ran.code, 0, "stderr:\n{}\n{}", ran.stderr, cluster.logs());
    let report = ran.json();
    assert_eq!(report["verdict"], "passed");
    assert_eq!(report["counts"]["total"], 200);
    assert_eq!(report["counts"]["passed"], 200);
    let got = outcomes(&report);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        tests,
        "every submitted test, and nothing else"
    );
    assert!(got.values().all(|o| o == "passed"));
    let workers: BTreeSet<&str> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect();
    assert_eq!(
        workers,
        BTreeSet::from(["w1", "w2", "w3"]),
        "the suite was sharded over every worker"
    );
    for t in report["tests"].as_array().unwrap() {
        assert_eq!(t["attempts"], 1, "{t}");
    }
}

#[test]
fn one_failing_test_fails_the_gate_and_survives_a_coordinator_restart() {
    let mut cluster = Cluster::builder().workers(3).slots(2).start();
    let tests = suite(&cluster.root, 200, &[137], "0.01");
    let ran = cluster.run_tests(&tests, &[]);
    assert_eq!(ran.code, 1, "stderr:\n{}\n{}", ran.stderr, cluster.logs());
    let report = ran.json();
    assert_eq!(report["verdict"], "failed");
    let got = outcomes(&report);
    assert_eq!(got.len(), 200);
    for (id, outcome) in &got {
        let want = if id == "t/137.sh" { "failed" } else { "passed" };
        assert_eq!(outcome, want, "{id}");
    }
    let failed = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "t/137.sh")
        .unwrap();
    assert_eq!(failed["detail"], "failed 3 of 3 attempts: exit status 1");
    assert_eq!(
        failed["attempts"], 3,
        "a failing test is run twice more before it counts"
    );
    assert_eq!(failed["output"], "test 137\n");

    // The text summary names the failed test and shows its output.
    let run_id = report["run_id"].as_str().unwrap().to_owned();
    let text = cluster.client(&["status", &run_id]);
    assert_eq!(text.code, 1);
    assert!(
        text.stdout
            .contains("FAILED      t/137.sh  (failed 3 of 3 attempts: exit status 1;"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("| test 137"), "{}", text.stdout);

    cluster.kill_coordinator();
    let down = cluster.client(&["status", &run_id]);
    assert_eq!(down.code, 2);
    assert!(
        down.stderr.contains("failed to connect to the coordinator"),
        "{}",
        down.stderr
    );

    cluster.restart_coordinator();
    let after = cluster.client(&["status", &run_id, "--json"]);
    assert_eq!(after.code, 1, "{}", after.stderr);
    let after = after.json();
    assert_eq!(after["verdict"], "failed");
    assert_eq!(
        outcomes(&after),
        got,
        "every result is still there after a kill -9 and restart"
    );
    assert_eq!(after["counts"], report["counts"]);
}

#[test]
fn discovery_runs_on_a_worker() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let tests = suite(&cluster.root, 30, &[], "0");
    std::fs::write(cluster.root.join("t/notes.txt"), "not executable, not a test").unwrap();
    let r = cluster.client(&["run", "--runner", "exec", "--discover", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, cluster.logs());
    let got = outcomes(&r.json());
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), tests);
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code_2_and_the_coordinator_keeps_serving() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    suite(&cluster.root, 3, &[], "0");
    let dir = cluster.dir.path();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let ok_list = file("ok.txt", "t/000.sh\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--runner".into(),
                "pytest".into(),
                "--tests-file".into(),
                ok_list.clone(),
            ],
            "the coordinator refused the run: invalid runner: unknown runner 'pytest': no worker has registered it (known runners: exec)",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                file("empty.txt", "# nothing\n"),
            ],
            "invalid tests: the run has no tests",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                file("dup.txt", "t/000.sh\nt/001.sh\nt/000.sh\n"),
            ],
            "invalid tests: duplicate test id 't/000.sh'",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                file("up.txt", "../x\n"),
            ],
            "invalid tests: test id '../x' escapes the runner's root with '..'",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                file("abs.txt", "/etc/passwd\n"),
            ],
            "invalid tests: test id '/etc/passwd' is an absolute path",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                dir.join("missing.txt").to_str().unwrap().into(),
            ],
            "failed to read tests file",
        ),
        (
            vec!["status".into(), "01a2165b-0000-7000-8000-000000000000".into()],
            "run '01a2165b-0000-7000-8000-000000000000' not found",
        ),
        (
            vec!["status".into(), "not-a-uuid".into()],
            "invalid run_id: 'not-a-uuid' is not a valid run id",
        ),
        (
            vec![
                "run".into(),
                "--runner".into(),
                "exec".into(),
                "--tests-file".into(),
                ok_list.clone(),
                "--labels".into(),
                "os".into(),
            ],
            "label 'os' is not of the form key=value",
        ),
    ];
    for (args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = cluster.client(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{args:?}: stderr {:?} should contain {want:?}",
            r.stderr
        );
    }
    // An unreachable coordinator.
    let r = client(&[
        "run",
        "--coordinator",
        "http://127.0.0.1:9",
        "--runner",
        "exec",
        "--tests-file",
        &ok_list,
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("failed to connect to the coordinator at http://127.0.0.1:9"),
        "{}",
        r.stderr
    );
    // A usage error.
    let r = client(&["run", "--runner", "exec"]);
    assert_eq!(r.code, 2);

    // None of it was stored, and the coordinator still takes a good run.
    let runs = cluster.client(&["runs", "--json"]);
    assert_eq!(
        runs.json().as_array().unwrap().len(),
        0,
        "refused runs are not stored"
    );
    let r = cluster.client(&["run", "--runner", "exec", "--tests-file", &ok_list, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn cancel_stops_a_run_on_its_workers_within_seconds() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let marker = cluster.dir.path().join("finished");
    for i in 0..4 {
        script(
            &cluster.root,
            &format!("slow/{i}.sh"),
            &format!("sleep 30\ntouch {}", marker.display()),
        );
    }
    script(&cluster.root, "quick.sh", "exit 0");
    let slow: Vec<String> = (0..4).map(|i| format!("slow/{i}.sh")).collect();
    let follower = cluster.follow(&slow, &[], std::process::Stdio::null());
    let run_id = wait_for(
        "the run to start on both workers",
        Duration::from_secs(20),
        || {
            let runs = cluster.client(&["runs", "--json"]).json();
            let run = runs.as_array()?.first()?.clone();
            (run["counts"]["running"] == 2).then(|| run["run_id"].as_str().unwrap().to_owned())
        },
    );
    let started = std::time::Instant::now();
    let c = cluster.client(&["cancel", &run_id, "--reason", "superseded by r2"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let out = follower.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cancelled run does not pass the gate"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "cancelled");
    assert_eq!(report["message"], "cancelled: superseded by r2");

    // Both workers are free again well before the 30 s tests would have ended.
    let r = cluster.run_tests(&["quick.sh".to_owned()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_for("both workers idle", Duration::from_secs(10), || {
        let w = cluster.client(&["workers", "--json"]).json();
        w.as_array()?.iter().all(|w| w["busy_slots"] == 0).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(!marker.exists(), "a cancelled test ran to its end");
}

#[test]
fn local_mode_runs_the_demo_suite() {
    // A copy: a local run keeps its history in the project's directory.
    let tmp = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let demo = &tmp.path().join("demo").display().to_string();
    let r = client(&["local", "--workers", "4", "--exec-root", demo, "--discover"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(": PASSED: 21 tests"), "{}", r.stdout);
    let history = tmp.path().join("demo/.shardgate");
    assert!(
        history.join("local.db").is_file(),
        "the history is kept in the project"
    );
    assert_eq!(
        std::fs::read_to_string(history.join(".gitignore"))
            .unwrap()
            .lines()
            .last(),
        Some("*")
    );
    let out = std::process::Command::new(harness::bin("shardgate"))
        .args([
            "local",
            "--workers",
            "4",
            "--exec-root",
            demo,
            "--discover",
            "--json",
        ])
        .env("SHARDGATE_DEMO_FAIL", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = outcomes(&report);
    assert_eq!(got["unit/checkout_totals.sh"], "failed");
    assert_eq!(got.values().filter(|o| *o == "passed").count(), 20);
    // Every test's duration is in the project's history for the next run to be planned by.
    use shardgate_coordinator::store::{Reads, SqliteStore};
    let store = SqliteStore::open(&history.join("local.db")).unwrap();
    let known = store.history(report["suite"].as_str().unwrap()).unwrap();
    assert_eq!(known.len(), 21, "{known:?}");
}

#[test]
fn a_flaky_test_is_retried_and_reported_and_strict_mode_fails_the_gate() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let marker = |name: &str| cluster.dir.path().join(name).display().to_string();
    // Fails on its first run (it leaves a marker), passes afterwards.
    let flaky = |m: String| {
        format!("if [ -e {m} ]; then echo second; exit 0; fi\ntouch {m}\necho first try fails\nexit 1")
    };
    script(&cluster.root, "flaky.sh", &flaky(marker("m1")));
    script(&cluster.root, "flaky2.sh", &flaky(marker("m2")));
    script(&cluster.root, "broken.sh", "echo broken; exit 2");
    script(&cluster.root, "fine.sh", "exit 0");

    let r = cluster.run_tests(&["flaky.sh".into(), "broken.sh".into(), "fine.sh".into()], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let by_id: BTreeMap<&str, &serde_json::Value> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), t))
        .collect();
    assert_eq!(by_id["flaky.sh"]["outcome"], "flaky");
    assert_eq!(by_id["flaky.sh"]["attempts"], 2);
    assert_eq!(
        by_id["flaky.sh"]["output"], "first try fails\n",
        "the failure's output is kept"
    );
    assert_eq!(by_id["broken.sh"]["outcome"], "failed");
    assert_eq!(by_id["broken.sh"]["attempts"], 3);
    assert_eq!(by_id["fine.sh"]["attempts"], 1);
    assert_eq!(report["counts"]["flaky"], 1);

    // Flaky alone passes the gate by default and is reported; strict mode fails it.
    std::fs::remove_file(marker("m1")).unwrap();
    let r = cluster.run_tests(&["flaky.sh".into(), "fine.sh".into()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["counts"]["flaky"], 1);
    let text = cluster.client(&["status", r.json()["run_id"].as_str().unwrap()]);
    assert!(
        text.stdout
            .contains("FLAKY       flaky.sh  (passed on attempt 2 after 1 failure(s)"),
        "{}",
        text.stdout
    );
    let r = cluster.run_tests(&["flaky2.sh".into()], &["--strict-flaky"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json()["verdict"], "failed");
}
