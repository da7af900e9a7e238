//! Rollout: the coordinator's own hook runs once per passed run that asked for it, one at a
//! time, never for a red run, never twice — not even when the coordinator is killed during the
//! hook (that deploy is shown as `unknown`). The deploy log lists them.

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::{Cluster, script, wait_for};

/// A cluster whose coordinator rolls out with a hook script made from `body`, which may name
/// files in the returned directory as `{dir}`.
fn cluster_with_hook(body: &str) -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    script(
        dir.path(),
        "hook.sh",
        &body.replace("{dir}", dir.path().to_str().unwrap()),
    );
    let argv = serde_json::json!([dir.path().join("hook.sh").to_str().unwrap()]).to_string();
    let cluster = Cluster::builder()
        .workers(2)
        .slots(1)
        .coordinator_args(&["--rollout-command", &argv])
        .start();
    (cluster, dir)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn deploys(cluster: &Cluster) -> serde_json::Value {
    cluster.client(&["deploys", "--json"]).json()
}

/// Waits until the deploy log holds `n` deploys, none of them pending or running.
fn settled(cluster: &Cluster, n: usize) -> serde_json::Value {
    wait_for(&format!("{n} settled deploys"), Duration::from_secs(60), || {
        let log = deploys(cluster);
        let list = log["deploys"].as_array()?;
        (list.len() == n
            && list
                .iter()
                .all(|d| d["state"] != "pending" && d["state"] != "running"))
        .then_some(log)
    })
}

#[test]
fn the_hook_runs_once_per_passed_run_that_asked_for_it() {
    let (cluster, dir) = cluster_with_hook(
        "echo \"$RUN_ID $REVISION $SUITE $REQUESTED_BY $AUTHORS $DEPLOY_ID\" >> {dir}/deployed.log",
    );
    let log = dir.path().join("deployed.log");
    script(&cluster.root, "t/ok.sh", "exit 0");
    script(&cluster.root, "t/bad.sh", "exit 1");
    let ok = ["t/ok.sh".to_string()];
    let red = ["t/ok.sh".to_string(), "t/bad.sh".to_string()];

    let first = cluster.run_tests(&ok, &["--rollout", "--author", "ann", "--author", "bob"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let failed = cluster.run_tests(&red, &["--rollout"]);
    assert_eq!(failed.code, 1);
    let no_rollout = cluster.run_tests(&ok, &[]);
    assert_eq!(no_rollout.code, 0);
    let second = cluster.run_tests(&ok, &["--rollout"]);
    assert_eq!(second.code, 0);

    let log_json = settled(&cluster, 2);
    let got = lines(&log);
    assert_eq!(got.len(), 2, "one line per passed run that asked: {got:?}");
    let run = |r: &harness::Ran| r.json()["run_id"].as_str().unwrap().to_owned();
    assert!(
        got[0].starts_with(&format!("{} r1 it tests ann,bob ", run(&first))),
        "{got:?}"
    );
    assert!(
        got[1].starts_with(&format!("{} r1 it tests ", run(&second))),
        "{got:?}"
    );
    let list = log_json["deploys"].as_array().unwrap();
    assert!(list.iter().all(|d| d["state"] == "succeeded"), "{log_json}");
    assert_eq!(list[1]["authors"], serde_json::json!(["ann", "bob"]));
    assert_eq!(log_json["last_day"], 2);
    assert_eq!(log_json["last_requested_by"], "tests");
    let text = cluster.client(&["deploys"]);
    assert!(
        text.stdout.contains("by tests") && text.stdout.contains("2 in the last day"),
        "{}",
        text.stdout
    );

    // Each run finds its own deploy: by the client, over HTTP, and in its progress.
    let mine = cluster
        .client(&["deploys", "--json", "--run", &run(&first)])
        .json();
    let mine = mine["deploys"].as_array().unwrap();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["run_id"], run(&first).as_str());
    assert_eq!(mine[0]["authors"], serde_json::json!(["ann", "bob"]));
    let none = cluster.client(&["deploys", "--run", &run(&no_rollout)]);
    assert!(
        none.stdout
            .contains(&format!("run {} made no deploy", run(&no_rollout))),
        "{}",
        none.stdout
    );
    let get = |path: &str| {
        let (code, body) = harness::http_get(&cluster.http_addr, path).unwrap();
        (code, serde_json::from_str::<serde_json::Value>(&body).unwrap())
    };
    let (code, over_http) = get(&format!("/api/deploys?run={}", run(&second)));
    assert_eq!(code, 200);
    assert_eq!(
        over_http["deploys"][0]["run_id"],
        run(&second).as_str(),
        "{over_http}"
    );
    assert_eq!(over_http["deploys"].as_array().unwrap().len(), 1);
    let (code, bad) = get("/api/deploys?run=not-a-run");
    assert_eq!(code, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap_or_default().contains("run"), "{bad}");
    let (_, progress) = get(&format!("/api/runs/{}/progress", run(&second)));
    assert_eq!(progress["deploy"]["state"], "succeeded", "{progress}");
    let (_, progress) = get(&format!("/api/runs/{}/progress", run(&failed)));
    assert!(
        progress["deploy"].is_null(),
        "a red run deploys nothing: {progress}"
    );
}

#[test]
fn a_rollout_interrupted_by_a_coordinator_crash_is_unknown_and_never_rerun() {
    let (mut cluster, dir) = cluster_with_hook(
        "echo \"$RUN_ID\" >> {dir}/started.log\nif [ -e {dir}/hang ]; then sleep 60; fi\nexit 0",
    );
    let started = dir.path().join("started.log");
    let hang = dir.path().join("hang");
    std::fs::write(&hang, "").unwrap();
    script(&cluster.root, "t/ok.sh", "exit 0");
    let ok = ["t/ok.sh".to_string()];
    let first = cluster.run_tests(&ok, &["--rollout"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    wait_for("the hook to start", Duration::from_secs(30), || {
        (!lines(&started).is_empty()).then_some(())
    });
    cluster.restart_coordinator();
    std::fs::remove_file(&hang).unwrap();

    let second = cluster.run_tests(&ok, &["--rollout"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let log = settled(&cluster, 2);
    let list = log["deploys"].as_array().unwrap();
    let run = |r: &harness::Ran| r.json()["run_id"].as_str().unwrap().to_owned();
    let state_of = |run_id: &str| {
        list.iter()
            .find(|d| d["run_id"] == run_id)
            .map(|d| d["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state_of(&run(&first)).as_deref(), Some("unknown"), "{log}");
    assert_eq!(state_of(&run(&second)).as_deref(), Some("succeeded"), "{log}");
    // Deploys run in order, so had the first been started again it would be here before the
    // second.
    assert_eq!(lines(&started), vec![run(&first), run(&second)]);
}

#[test]
fn a_run_cannot_ask_for_a_rollout_the_coordinator_has_no_hook_for() {
    let cluster = Cluster::builder().workers(1).start();
    script(&cluster.root, "t/ok.sh", "exit 0");
    let r = cluster.run_tests(&["t/ok.sh".to_string()], &["--rollout"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("this coordinator has no rollout hook"),
        "{}",
        r.stderr
    );
    let r = cluster.run_tests(&["t/ok.sh".to_string()], &["--author", "ann"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("ask for a rollout too"), "{}", r.stderr);
    assert!(
        cluster
            .client(&["runs", "--json"])
            .json()
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing stored"
    );
}

#[test]
fn wait_rollout_exits_with_the_deploys_outcome() {
    // The hook fails when "mallory" is among the authors, and succeeds otherwise.
    let (cluster, _dir) = cluster_with_hook(
        "echo \"deploying $REVISION by $AUTHORS\"\nif [ \"$AUTHORS\" = mallory ]; then echo no capacity; exit 4; fi",
    );
    script(&cluster.root, "t/ok.sh", "exit 0");
    let ok = ["t/ok.sh".to_string()];
    let good = cluster.run_tests(&ok, &["--rollout", "--wait-rollout"]);
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert_eq!(good.json()["deploy"]["state"], "succeeded");
    let bad = cluster.run_tests(&ok, &["--rollout", "--wait-rollout", "--author", "mallory"]);
    assert_eq!(bad.code, 1, "a failed rollout fails the command: {}", bad.stderr);
    let deploy = &bad.json()["deploy"];
    assert_eq!(deploy["state"], "failed");
    let detail = deploy["detail"].as_str().unwrap();
    assert!(
        detail.contains("rollout hook: exit status: 4\ndeploying r1 by mallory\nno capacity"),
        "{detail}"
    );
    let r = cluster.run_tests(&ok, &["--wait-rollout"]);
    assert_eq!(r.code, 2, "--wait-rollout needs --rollout");
}
