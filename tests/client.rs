//! The client as a CI job step uses it, on real processes: an interrupt (SIGINT, or a job
//! timeout's SIGTERM) cancels the run it submitted; a closed stdout ends it quietly with the
//! run's exit code; `--detach` submits and prints the id.

mod harness;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Cluster, free_port, suite, wait_for};

/// The id of the cluster's only run, once it has one.
fn the_run(cluster: &Cluster) -> String {
    wait_for("the run to be submitted", Duration::from_secs(20), || {
        let runs = cluster.client(&["runs", "--json"]).json();
        runs.as_array()?
            .first()
            .and_then(|r| r["run_id"].as_str().map(str::to_owned))
    })
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn an_interrupted_client_cancels_its_run_and_exits_1() {
    for sig in ["-INT", "-TERM"] {
        let cluster = Cluster::builder().workers(1).slots(1).start();
        let tests = suite(&cluster.root, 4, &[], "30");
        let mut child = cluster.follow(&tests, &[], Stdio::piped());
        let run = the_run(&cluster);
        wait_for("a test to start", Duration::from_secs(20), || {
            let r = cluster.client(&["status", &run, "--json"]).json();
            (r["counts"]["running"].as_u64()? > 0).then_some(())
        });
        signal(child.id(), sig);
        let mut stdout = String::new();
        child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(1), "{sig}: {stderr}");
        assert!(stderr.contains(&format!("run {run} cancelled")), "{stderr}");
        let report: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(report["verdict"], "cancelled", "{report}");
        // The coordinator agrees, and says who stopped it.
        let r = cluster.client(&["status", &run, "--json"]).json();
        assert_eq!(r["status"], "cancelled", "{r}");
        assert!(
            r["message"].as_str().unwrap().contains("client interrupted"),
            "{r}"
        );
    }
}

#[test]
fn a_closed_stdout_ends_the_client_with_the_runs_code_not_a_panic() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    for (failing, code) in [(vec![], 0), (vec![1], 1)] {
        let tests = suite(&cluster.root, 3, &failing, "0");
        let mut child = cluster.follow(&tests, &[], Stdio::piped());
        drop(child.stdout.take());
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn detach_prints_the_run_id_and_watch_follows_it_later() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let tests = suite(&cluster.root, 3, &[2], "0");
    let r = cluster.run_tests(&tests, &["--detach"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run = r.json()["run_id"].as_str().unwrap().to_owned();
    let w = cluster.client(&["watch", &run, "--json"]);
    assert_eq!(w.code, 1, "{}", w.stderr);
    assert_eq!(w.json()["verdict"], "failed");
}

#[test]
fn a_run_no_worker_can_take_is_refused_or_ends_after_its_queue_timeout() {
    let mut cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = suite(&cluster.root, 2, &[], "0");
    // Labels no known worker carries: refused at submit, naming what is missing.
    let r = cluster.run_tests(&tests, &["--labels", "os=windows"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no known worker offering runner 'exec' carries labels os=windows"),
        "{}",
        r.stderr
    );
    // Its only capable worker gone: the run ends after its queue timeout, saying why.
    cluster.stop_worker(0);
    let r = cluster.run_tests(&tests, &["--queue-timeout", "1s"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["verdict"], "errored", "{report}");
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("no live worker could take this run"),
        "{report}"
    );
}

#[test]
fn the_config_file_is_read_and_flags_and_variables_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    suite(&root, 4, &[], "0");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "exec_root = \"{}\"\ncheck-sample = 3\njson = true\n",
            root.display()
        ),
    )
    .unwrap();
    let check = |extra: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(harness::bin("shardgate-worker"))
            .arg("--config")
            .arg(&config)
            .arg("--check")
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v[0]["ran"].as_array().unwrap().len())
    };
    assert_eq!(
        check(&[], &[]),
        (Some(0), 3),
        "the file's exec_root, sample and json"
    );
    assert_eq!(check(&["--check-sample", "1"], &[]), (Some(0), 1), "a flag wins");

    std::fs::write(&config, "exec_root = \"/x\"\nslot = 4\n").unwrap();
    let out = Command::new(harness::bin("shardgate-worker"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown key 'slot'"), "{stderr}");

    let coordinator = dir.path().join("coordinator.toml");
    std::fs::write(&coordinator, "grpc_addr = \"127.0.0.1:0\"\nlease = \"soon\"\n").unwrap();
    let out = Command::new(harness::bin("shardgate-coordinator"))
        .arg("--config")
        .arg(&coordinator)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'soon' is not a duration"),
        "checked as the flag is: {stderr}"
    );
}

#[test]
fn errors_name_the_fix_and_say_each_cause_once() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    // The HTTP port given where the gRPC one belongs.
    let r = harness::client(&["runs", "--coordinator", &format!("http://{}", cluster.http_addr)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("is it the coordinator's HTTP port (--http-addr)?"),
        "{}",
        r.stderr
    );
    // A bare host:port is a plaintext URL.
    let bare = cluster.url().trim_start_matches("http://").to_owned();
    let r = harness::client(&["runs", "--coordinator", &bare]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Nothing listening: one line, each cause once.
    let r = harness::client(&["runs", "--coordinator", "http://127.0.0.1:1"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert_eq!(r.stderr.matches("tcp connect error").count(), 1, "{}", r.stderr);
}

#[test]
fn a_test_missing_from_the_exec_root_is_an_error_that_names_it_counted_once() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let mut tests = suite(&cluster.root, 2, &[], "0");
    tests.push("t/typo.sh".to_owned());
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let t = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "t/typo.sh")
        .unwrap()
        .clone();
    assert_eq!(t["outcome"], "infra_error", "{t}");
    assert_eq!(t["attempts"], 1, "no retries of a test that is not there: {t}");
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("no such test: 't/typo.sh'"),
        "{t}"
    );
}

#[test]
fn the_coordinator_listens_on_a_host_name_and_logs_plain_text_to_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(harness::bin("shardgate-coordinator"))
        .args(["--grpc-addr", "localhost:0", "--http-addr", "localhost:0", "--db"])
        .arg(dir.path().join("c.db"))
        .env("SHARDGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = harness::coordinator_ready(&mut child);
    let grpc = ready["grpc_addr"].as_str().unwrap().to_owned();
    assert!(
        grpc.starts_with("127.0.0.1:") || grpc.starts_with("[::1]:"),
        "{grpc}"
    );
    let http = ready["http_addr"].as_str().unwrap().to_owned();
    wait_for("the HTTP port", Duration::from_secs(10), || {
        matches!(harness::http_get(&http, "/healthz"), Ok((200, _))).then_some(())
    });
    signal(child.id(), "-TERM");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {stderr:?}"
    );
}

#[test]
fn a_workers_probes_say_alive_and_ready_only_once_registered() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let start = |coordinator: &str| {
        let port = free_port();
        let child = Command::new(harness::bin("shardgate-worker"))
            .args(["--coordinator", coordinator, "--name", "probed", "--health-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--exec-root")
            .arg(&cluster.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, format!("127.0.0.1:{port}"))
    };
    let probe = |addr: &str, path: &str| harness::http_get(addr, path).ok();

    // No coordinator there: alive, not ready.
    let (mut lonely, addr) = start("http://127.0.0.1:1");
    wait_for("the probe port", Duration::from_secs(10), || {
        probe(&addr, "/healthz")
    });
    assert_eq!(probe(&addr, "/healthz").unwrap().0, 200);
    let (code, body) = probe(&addr, "/readyz").unwrap();
    assert_eq!(
        (code, body.trim()),
        (503, "not registered with the coordinator yet")
    );
    lonely.kill().unwrap();
    lonely.wait().unwrap();

    let (mut worker, addr) = start(&cluster.url());
    wait_for("the worker to be ready", Duration::from_secs(10), || {
        probe(&addr, "/readyz").filter(|(code, _)| *code == 200)
    });
    worker.kill().unwrap();
    worker.wait().unwrap();
}
