//! `/metrics` read by a Prometheus text-format parser after known runs: the counts must be
//! those of the runs, and the autoscaler's metric (named in `deploy/k8s/autoscaler.yaml`) must
//! be there. A run's trace, as an OTLP collector receives it (`--otlp-endpoint`).

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

/// What the test's OTLP collector received.
type Received = std::sync::Arc<std::sync::Mutex<Vec<otlp::trace::v1::Span>>>;

use opentelemetry_proto::tonic as otlp;

/// A collector that keeps every span it is sent.
struct Collector(Received);

#[tonic::async_trait]
impl otlp::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<otlp::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::collector::trace::v1::ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone());
            assert!(
                format!("{service:?}").contains("shardgate-coordinator"),
                "{service:?}"
            );
            got.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Starts a collector on a port of its own, on a runtime of its own; its URL and what it
/// received.
fn collector() -> (String, Received) {
    let received = Received::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = otlp::collector::trace::v1::trace_service_server::TraceServiceServer::new(Collector(
        received.clone(),
    ));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    });
    (url, received)
}

fn attr(s: &otlp::trace::v1::Span, key: &str) -> Option<String> {
    use otlp::common::v1::any_value::Value;
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
        .map(|v| match v {
            Value::StringValue(s) => s,
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
}

/// A red run of 8 tests (the fourth fails) on a coordinator that sends its traces to a
/// collector of the test's, with `args`: the run's trace id, its tests, and every span the
/// collector received once it had the run's.
fn traced_run(args: &[&str]) -> (Vec<u8>, Vec<String>, Vec<otlp::trace::v1::Span>) {
    let (url, received) = collector();
    let mut coordinator_args = vec!["--otlp-endpoint", &url];
    coordinator_args.extend_from_slice(args);
    let cluster = Cluster::builder()
        .workers(2)
        .slots(2)
        .coordinator_args(&coordinator_args)
        .start();
    let tests = harness::suite(&cluster.root, 8, &[3], "0");
    let ran = cluster.run_tests(&tests, &["--retries", "0"]);
    assert_eq!(ran.code, 1, "one test fails: {ran:?}");
    let run_id: uuid::Uuid = ran.json()["run_id"].as_str().unwrap().parse().unwrap();
    // The run's span goes last (it ends with the verdict), after its shards and tests.
    let spans = wait_for(
        "the run's span at the collector",
        std::time::Duration::from_secs(20),
        || {
            let got = received.lock().unwrap();
            got.iter().any(|s| s.name == "run it").then(|| got.clone())
        },
    );
    (run_id.as_bytes().to_vec(), tests, spans)
}

/// The sum of the shard spans' `done`.
fn done_in_shards(spans: &[otlp::trace::v1::Span]) -> u32 {
    spans
        .iter()
        .filter(|s| s.name == "shard")
        .map(|s| attr(s, "shardgate.shard.done").unwrap().parse::<u32>().unwrap())
        .sum()
}

#[test]
fn a_run_is_sent_to_the_otlp_collector_as_one_trace_of_shards_and_tests() {
    let (trace_id, tests, spans) = traced_run(&[]);
    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "every span is in the run's trace, whose id is the run's id"
    );
    let of =
        |name: &str| -> Vec<&otlp::trace::v1::Span> { spans.iter().filter(|s| s.name == name).collect() };
    let run = of("run it");
    assert_eq!(run.len(), 1, "one run span");
    let run = run[0];
    assert!(run.parent_span_id.is_empty(), "the run is the trace's root");
    let status = run.status.clone().unwrap();
    assert_eq!(
        (status.code, status.message.as_str()),
        (2, "failed"),
        "ERROR, failed"
    );
    assert_eq!(attr(run, "shardgate.tests.passed").as_deref(), Some("7"));
    assert_eq!(attr(run, "shardgate.tests.failed").as_deref(), Some("1"));
    assert_eq!(attr(run, "shardgate.run.status").as_deref(), Some("failed"));
    assert!(run.end_time_unix_nano > run.start_time_unix_nano);

    let shards = of("shard");
    assert!(!shards.is_empty());
    assert!(shards.iter().all(|s| s.parent_span_id == run.span_id));
    assert!(
        shards
            .iter()
            .all(|s| s.start_time_unix_nano >= run.start_time_unix_nano
                && s.end_time_unix_nano <= run.end_time_unix_nano),
        "shards lie within the run"
    );
    let shard_ids: std::collections::HashSet<_> = shards.iter().map(|s| s.span_id.clone()).collect();
    assert_eq!(shard_ids.len(), shards.len(), "one span per attempt");
    let done = done_in_shards(&spans);
    let states: Vec<_> = shards
        .iter()
        .map(|s| {
            (
                attr(s, "shardgate.shard.tests"),
                attr(s, "shardgate.shard.done"),
                attr(s, "shardgate.shard.state"),
            )
        })
        .collect();
    assert_eq!(done, 8, "the attempts' results add up to the run's: {states:?}");

    // One span per test, named by its id, under the attempt that ran it.
    let mut names: Vec<&str> = spans
        .iter()
        .filter(|s| shard_ids.contains(&s.parent_span_id))
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    let mut want: Vec<&str> = tests.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(names, want, "each test once");
    let failed = spans.iter().find(|s| s.name == tests[3]).unwrap();
    assert_eq!(attr(failed, "shardgate.test.outcome").as_deref(), Some("failed"));
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(2));
    assert_eq!(spans.len(), 1 + shards.len() + 8, "nothing else: {spans:#?}");
}

#[test]
fn only_results_that_are_not_green_get_spans_with_otlp_test_spans_failed() {
    let (trace_id, tests, spans) = traced_run(&["--otlp-test-spans", "failed"]);
    assert!(spans.iter().all(|s| s.trace_id == trace_id));
    let test_spans: Vec<&str> = spans
        .iter()
        .filter(|s| s.name != "shard" && s.name != "run it")
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(test_spans, [tests[3].as_str()], "the failure alone");
    // The run's and shards' spans still count every result.
    assert_eq!(done_in_shards(&spans), 8);
    let run = spans.iter().find(|s| s.name == "run it").unwrap();
    assert_eq!(attr(run, "shardgate.tests.passed").as_deref(), Some("7"));
}
