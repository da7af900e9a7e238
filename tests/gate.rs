//! The gate beyond retries: flakiness history and `shardgate flaky`, quarantine, fail-fast and
//! the JUnit export, through the real binaries.

mod harness;

use std::collections::BTreeMap;

use harness::{Cluster, script};

fn by_id(report: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_owned(), t.clone()))
        .collect()
}

#[test]
fn a_quarantined_failing_test_runs_is_reported_and_cannot_fail_the_gate() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    script(&cluster.root, "t/bad.sh", "echo still broken; exit 1");
    script(&cluster.root, "t/good.sh", "exit 0");
    let tests = ["t/bad.sh".to_string(), "t/good.sh".to_string()];

    let bad = cluster.client(&["quarantine", "add", "--suite", "it", "t/bad.sh"]);
    assert_eq!(bad.code, 2, "a reason is required: {}", bad.stderr);
    let add = cluster.client(&[
        "quarantine",
        "add",
        "--suite",
        "it",
        "t/bad.sh",
        "--reason",
        "JIRA-1: broken by the vendor",
        "--by",
        "alice",
    ]);
    assert_eq!(add.code, 0, "{}", add.stderr);
    let list = cluster.client(&["quarantine", "list", "--json"]).json();
    assert_eq!(list[0]["test_id"], "t/bad.sh");
    assert_eq!(list[0]["added_by"], "alice");
    assert_eq!(list[0]["reason"], "JIRA-1: broken by the vendor");

    let junit = cluster.dir.path().join("junit.xml");
    let r = cluster.run_tests(&tests, &["--junit", junit.to_str().unwrap()]);
    assert_eq!(r.code, 0, "quarantined: the gate passes: {}", r.stderr);
    let report = r.json();
    let t = by_id(&report);
    assert_eq!(t["t/bad.sh"]["outcome"], "failed", "it still ran and is reported");
    assert_eq!(t["t/bad.sh"]["quarantined"], true);
    assert_eq!(t["t/bad.sh"]["attempts"], 3);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"<property name="quarantined" value="true"/>"#),
        "{xml}"
    );
    assert!(xml.contains("<failure message=\"failed 3 of 3 attempts"), "{xml}");
    assert_eq!(xml.matches("<rerunFailure").count(), 2, "{xml}");
    // The same document over HTTP.
    let run_id = report["run_id"].as_str().unwrap();
    let (code, body) = harness::http_get(&cluster.http_addr, &format!("/api/runs/{run_id}/junit")).unwrap();
    assert_eq!(code, 200);
    assert_eq!(body, xml);

    let rm = cluster.client(&["quarantine", "remove", "--suite", "it", "t/bad.sh"]);
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    let again = cluster.client(&["quarantine", "remove", "--suite", "it", "t/bad.sh"]);
    assert_eq!(again.code, 2);
    assert!(
        again.stderr.contains("t/bad.sh is not quarantined in suite it"),
        "{}",
        again.stderr
    );
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 1, "no longer quarantined: red");
}

#[test]
fn flaky_history_is_kept_and_listed_and_buys_more_retries() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    let count = cluster.dir.path().join("count");
    // Fails until it has run `$1` times in all (a counter file), then passes.
    let flaky = |fails: u32| {
        format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\nif [ $n -le {fails} ]; then echo fail $n; exit 1; fi\nexit 0",
            c = count.display()
        )
    };
    script(&cluster.root, "t/flaky.sh", &flaky(1));
    script(&cluster.root, "t/steady.sh", "exit 0");
    let tests = ["t/flaky.sh".to_string(), "t/steady.sh".to_string()];
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(by_id(&r.json())["t/flaky.sh"]["outcome"], "flaky");

    let listed = cluster.client(&["flaky", "--suite", "it", "--json"]).json();
    let list = listed.as_array().unwrap();
    assert_eq!(list.len(), 1, "only the flaky test: {listed}");
    assert_eq!(list[0]["test_id"], "t/flaky.sh");
    assert_eq!(
        (list[0]["runs"].as_u64(), list[0]["flakes"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(list[0]["flake_rate"], 1.0);
    let text = cluster.client(&["flaky", "--suite", "it"]);
    assert!(
        text.stdout.contains("100.0%") && text.stdout.contains("t/flaky.sh"),
        "{}",
        text.stdout
    );

    // Now it fails four times in a row: with its flaky history it has four retries and is
    // flaky again, not red.
    std::fs::remove_file(&count).unwrap();
    script(&cluster.root, "t/flaky.sh", &flaky(4));
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let t = by_id(&r.json());
    assert_eq!(
        (&t["t/flaky.sh"]["outcome"], &t["t/flaky.sh"]["attempts"]),
        (&"flaky".into(), &5.into())
    );
}

#[test]
fn fail_fast_ends_the_run_at_the_first_confirmed_failure() {
    let cluster = Cluster::builder().workers(2).slots(1).start();
    script(&cluster.root, "t/a-broken.sh", "exit 1");
    let mut tests = vec!["t/a-broken.sh".to_string()];
    for i in 0..20 {
        let id = format!("t/slow{i:02}.sh");
        script(&cluster.root, &id, "sleep 2");
        tests.push(id);
    }
    let r = cluster.run_tests(&tests, &["--fail-fast", "--retries", "0"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["verdict"], "failed");
    let message = report["message"].as_str().unwrap();
    assert!(
        message.starts_with("fail-fast: 't/a-broken.sh' failed after 1 attempt(s)"),
        "{message}"
    );
    let unrun = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["outcome"].is_null())
        .count();
    assert!(
        unrun >= 15,
        "most of the suite never ran: {unrun} unrun\n{report}"
    );
}
