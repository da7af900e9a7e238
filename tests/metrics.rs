//! `/metrics` read by a Prometheus text-format parser after known runs: the counts must be
//! those of the runs, and the autoscaler's metric (named in `deploy/k8s/autoscaler.yaml`) must
//! be there.

mod harness;

use harness::{Cluster, http_get, wait_for};
use prometheus_parse::{Scrape, Value};

fn scrape(cluster: &Cluster) -> Scrape {
    let (code, body) = http_get(&cluster.http_addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("/metrics is Prometheus text")
}

/// The value of the sample named `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

#[test]
fn metrics_match_known_runs() {
    let cluster = Cluster::builder().workers(2).slots(2).start();
    // A green run of 6, then a red one of 4 with one failure (no retries).
    let green = harness::suite(&cluster.root, 6, &[], "0");
    let ran = cluster.run_tests(&green, &[]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let red_root = cluster.root.join("red");
    let red: Vec<String> = harness::suite(&red_root, 4, &[2], "0")
        .into_iter()
        .map(|t| format!("red/{t}"))
        .collect();
    let ran = cluster.run_tests(&red, &["--retries", "0"]);
    assert_eq!(ran.code, 1, "{ran:?}");

    let s = wait_for(
        "the last results to be counted",
        std::time::Duration::from_secs(10),
        || {
            let s = scrape(&cluster);
            (value(&s, "shardgate_tests_total", &[("outcome", "passed")]) == Some(9.0)).then_some(s)
        },
    );
    assert_eq!(
        value(&s, "shardgate_tests_total", &[("outcome", "failed")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "shardgate_runs", &[("state", "passed")]), Some(1.0));
    assert_eq!(value(&s, "shardgate_runs", &[("state", "failed")]), Some(1.0));
    assert_eq!(value(&s, "shardgate_runs", &[("state", "running")]), Some(0.0));
    assert_eq!(
        value(&s, "shardgate_runs_ended_total", &[("state", "passed")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "shardgate_runs_ended_total", &[("state", "failed")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "shardgate_retries_total", &[]), Some(0.0));
    assert_eq!(value(&s, "shardgate_workers", &[("state", "live")]), Some(2.0));
    assert_eq!(value(&s, "shardgate_slots", &[("state", "total")]), Some(4.0));
    assert_eq!(value(&s, "shardgate_slots", &[("state", "busy")]), Some(0.0));
    // Every hand-out and report was timed, every batch commit too.
    for h in [
        "shardgate_handout_latency_seconds",
        "shardgate_report_latency_seconds",
        "shardgate_store_commit_latency_seconds",
    ] {
        let n = value(&s, h, &[]).unwrap_or_else(|| panic!("{h} missing"));
        assert!(n >= 1.0, "{h}: {n}");
    }
    // Nothing waits: the autoscaler reads a zero for the runner the fleet offers.
    assert_eq!(
        value(&s, "shardgate_queue_depth", &[("runner", "exec")]),
        Some(0.0)
    );

    // The metric the Kubernetes autoscaler scales on is one this coordinator serves.
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/autoscaler.yaml")).unwrap();
    let name = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("metricName:"))
        .map(str::trim)
        .expect("the autoscaler names its metric");
    assert!(
        s.samples.iter().any(|x| x.metric == name),
        "{name} is not in /metrics"
    );
}

#[test]
fn queue_depth_counts_what_waits_for_a_slot() {
    // One slot, a run of 5 slow tests: while the first shard runs, the rest wait.
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = harness::suite(&cluster.root, 5, &[], "0.5");
    let mut child = cluster.follow(&tests, &[], std::process::Stdio::null());
    let depth = wait_for("tests to queue", std::time::Duration::from_secs(20), || {
        let s = scrape(&cluster);
        let d = value(&s, "shardgate_queue_depth", &[("runner", "exec")])?;
        let running = value(&s, "shardgate_runs", &[("state", "running")]).unwrap_or(0.0);
        (d > 0.0 && running == 1.0).then_some(d)
    });
    assert!(depth <= 4.0, "{depth}");
    assert!(child.wait().unwrap().success());
    let s = scrape(&cluster);
    assert_eq!(
        value(&s, "shardgate_queue_depth", &[("runner", "exec")]),
        Some(0.0)
    );
}
