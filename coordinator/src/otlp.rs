//! OpenTelemetry trace export (`--otlp-endpoint`): each run is one trace, sent over OTLP/gRPC
//! to a collector (the OpenTelemetry Collector, Jaeger, Tempo...).
//!
//! - The trace's id is the run's id (both are 128 bits), so a run's trace is found by the id
//!   `shardgate run` prints.
//! - A **run** span, from the submission to the verdict; its status is OK for a passed run and
//!   ERROR otherwise. Sent when the run ends.
//! - A **shard** span per attempt, child of the run's, from the hand-out to the attempt's end
//!   (worker, tests, how it ended). Sent when the attempt ends.
//! - A **test** span per counted result, child of its attempt's: it ends when the result
//!   reached the coordinator and starts the test's reported duration before that (runners
//!   that report at a shard's end show their tests ending together).
//!
//! Only what a committed batch of the scheduler produced is sent, so a trace never shows a
//! result the store does not hold. Export never slows the scheduler: its thread hands items
//! to a bounded queue without waiting (they become spans on the exporter's own low-priority
//! thread), and a full queue (a collector that is down or slow)
//! drops spans and counts them (`shardgate_trace_spans_dropped_total`), with a warning.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prometheus_client::metrics::counter::Counter;
use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, pb};
use tokio::sync::{mpsc, oneshot};

/// Spans the queue holds for the collector; more are dropped.
pub const QUEUE: usize = 64 * 1024;
/// Most spans in one export request.
const MAX_BATCH: usize = 2048;
/// How long spans wait in the queue for more to share their request.
const LINGER: Duration = Duration::from_millis(500);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the scheduler hands to the exporter after a commit (only when tracing is on).
#[derive(Debug, Clone)]
pub enum Traced {
    /// A counted result of `attempt`, taken in at `at_ms`.
    Test {
        run: RunId,
        attempt: AttemptId,
        at_ms: u64,
        result: pb::TestResult,
    },
    /// An attempt ended (its timeline entry).
    Shard(pb::ShardProgress),
    /// A run ended.
    Run(pb::RunSummary),
}

enum Item {
    /// Made into a span on the exporter's task, not the scheduler's thread.
    Traced(Box<Traced>),
    /// Send everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// The scheduler's side of the exporter: cheap to clone, never waits.
#[derive(Debug, Clone)]
pub struct Tracer {
    tx: mpsc::Sender<Item>,
    dropped: Counter,
    test_spans: TestSpans,
}

impl Tracer {
    /// Starts exporting to the collector `to` names. The collector need not be up: the
    /// connection is made when spans are sent, and again after a failure. Spans dropped are
    /// counted in `dropped`.
    ///
    /// The spans are made, encoded and sent on a thread of their own at the lowest CPU
    /// priority (as the read side and the watches are), so that a run's 50,000 spans take no
    /// turn from the workers' calls and the scheduler. It ends when every `Tracer` is gone.
    pub fn start(to: &OtlpConfig, dropped: Counter) -> Result<Self, String> {
        let endpoint = to
            .check()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(EXPORT_TIMEOUT);
        let (tx, rx) = mpsc::channel(QUEUE);
        let name = to.endpoint.clone();
        std::thread::Builder::new()
            .name("shardgate-otlp".into())
            .spawn(move || {
                crate::read::idle_priority();
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "could not start the trace exporter; no spans are sent");
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = TraceServiceClient::new(endpoint.connect_lazy());
                    export(client, rx, name).await;
                });
            })
            .map_err(|e| format!("failed to start the trace exporter's thread: {e}"))?;
        Ok(Self {
            tx,
            dropped,
            test_spans: to.test_spans,
        })
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Queues the spans of what a commit produced.
    pub fn send(&self, items: Vec<Traced>) {
        for t in items.into_iter().filter(|t| self.test_spans.keeps(t)) {
            if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Item::Traced(Box::new(t)))
                && self.dropped.inc() == 0
            {
                tracing::warn!(
                    queue = QUEUE,
                    "the trace collector does not keep up: spans are being dropped"
                );
            }
        }
    }

    /// Sends what is queued, waiting at most `limit` (a stopping coordinator's last spans).
    pub async fn flush(&self, limit: Duration) {
        let (done, sent) = oneshot::channel();
        let flushed = async {
            if self.tx.send(Item::Flush(done)).await.is_ok() {
                let _ = sent.await;
            }
        };
        if tokio::time::timeout(limit, flushed).await.is_err() {
            tracing::warn!(?limit, "the trace collector did not take the last spans in time");
        }
    }
}

/// Where the spans go.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC URL: `http://HOST:4317`, or `https://` for TLS.
    pub endpoint: String,
    /// For TLS, the CA the collector's certificate must chain to (PEM); the public web roots
    /// when `None`.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Which counted results get a span of their own.
    pub test_spans: TestSpans,
}

/// Which test results get a span (`--otlp-test-spans`): a suite of 50,000 tests makes a trace
/// of 50,000 spans, more than some trace stores keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TestSpans {
    /// Every counted result.
    #[default]
    All,
    /// Results that are not green (failed, timed out, infra error): the run's and shards'
    /// spans still show everything else.
    Failed,
    /// None: a trace of the run and its shards only.
    None,
}

impl std::str::FromStr for TestSpans {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "failed" => Ok(Self::Failed),
            "none" => Ok(Self::None),
            other => Err(format!("--otlp-test-spans is all, failed or none, not '{other}'")),
        }
    }
}

impl TestSpans {
    /// Whether `t` is sent.
    pub fn keeps(self, t: &Traced) -> bool {
        match (self, t) {
            (Self::All, _) | (_, Traced::Run(_) | Traced::Shard(_)) => true,
            (Self::None, Traced::Test { .. }) => false,
            (Self::Failed, Traced::Test { result, .. }) => {
                !Outcome::from_wire(result.outcome).is_some_and(Outcome::is_green)
            }
        }
    }
}

impl OtlpConfig {
    /// The collector's endpoint, or an error that names what is wrong with the settings.
    pub fn check(&self) -> Result<tonic::transport::Endpoint, String> {
        let url = self.endpoint.as_str();
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(format!(
                "--otlp-endpoint '{url}' needs a scheme: http://HOST:4317, or https:// for TLS"
            ));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("--otlp-endpoint '{url}' is not a URL: {e}"))?;
        if !https {
            if self.ca_cert.is_some() {
                return Err(format!(
                    "--otlp-ca-cert is for a collector over TLS: use an https:// --otlp-endpoint, not '{url}'"
                ));
            }
            return Ok(endpoint);
        }
        let tls = tonic::transport::ClientTlsConfig::new();
        let tls = match &self.ca_cert {
            Some(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| format!("failed to read --otlp-ca-cert '{}': {e}", p.display()))?;
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        endpoint
            .tls_config(tls)
            .map_err(|e| format!("invalid TLS settings for --otlp-endpoint '{url}': {e}"))
    }
}

/// Gathers spans into requests and sends them, until every [`Tracer`] is gone.
async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<Item>,
    endpoint: String,
) {
    let mut failing = false;
    let mut batch: Vec<Span> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match rx.recv().await {
            Some(i) => i,
            None => return,
        };
        let mut flushed = Vec::new();
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Item::Traced(t)) => batch.push(span_of(*t)),
                Some(Item::Flush(done)) => {
                    flushed.push(done);
                    break;
                }
                None => {}
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(i)) => next = Some(i),
                // Every sender is gone (send what is left) or the linger is over.
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let spans = batch.len();
            let request = request(std::mem::take(&mut batch));
            match client.export(request).await {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!(endpoint = %endpoint, "the trace collector takes spans again");
                    }
                }
                Err(e) => {
                    // Once per outage, not once per request.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            endpoint = %endpoint,
                            error = %e.message(),
                            code = ?e.code(),
                            spans,
                            "could not send spans to the trace collector; dropping them"
                        );
                    }
                }
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "shardgate-coordinator"),
                    kv("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "shardgate".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A run's trace id: the run id's 128 bits.
fn trace_id(run: &RunId) -> Vec<u8> {
    run.as_uuid().as_bytes().to_vec()
}

/// A span id from a UUID: its last 64 bits (random in the v4 and v7 ids shardgate makes),
/// never all zero (OTLP's "no span").
fn span_id_of(id: uuid::Uuid) -> Vec<u8> {
    let b = id.as_bytes();
    let mut s: [u8; 8] = b[8..16].try_into().expect("8 bytes");
    if s == [0; 8] {
        s[7] = 1;
    }
    s.to_vec()
}

/// The run span's id.
fn run_span_id(run: &RunId) -> Vec<u8> {
    span_id_of(run.as_uuid())
}

/// An attempt's shard span's id.
fn shard_span_id(attempt: &AttemptId) -> Vec<u8> {
    span_id_of(attempt.as_uuid())
}

fn kv(key: &str, value: impl Into<Value>) -> KeyValue {
    let value = match value.into() {
        Value::S(s) => any_value::Value::StringValue(s),
        Value::I(i) => any_value::Value::IntValue(i),
        Value::B(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

enum Value {
    S(String),
    I(i64),
    B(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::S(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::S(s)
    }
}
impl From<u64> for Value {
    fn from(i: u64) -> Self {
        Value::I(i64::try_from(i).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::I(i.into())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::B(b)
    }
}

fn nanos(ms: u64) -> u64 {
    ms.saturating_mul(1_000_000)
}

fn status(code: status::StatusCode, message: String) -> Option<Status> {
    Some(Status {
        message,
        code: code as i32,
    })
}

/// A span of `run`'s trace: its id and its parent's (empty for the root), its name, when it
/// began and ended (ms since the epoch; an end before the beginning is taken as the beginning).
fn span(
    run: &RunId,
    (span_id, parent_span_id): (Vec<u8>, Vec<u8>),
    name: String,
    (start_ms, end_ms): (u64, u64),
    attributes: Vec<KeyValue>,
    status: Option<Status>,
) -> Span {
    Span {
        trace_id: trace_id(run),
        span_id,
        parent_span_id,
        name,
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: nanos(start_ms),
        end_time_unix_nano: nanos(end_ms.max(start_ms)),
        attributes,
        status,
        ..Default::default()
    }
}

fn span_of(t: Traced) -> Span {
    match t {
        Traced::Run(r) => run_span(r),
        Traced::Shard(s) => shard_span(s),
        Traced::Test {
            run,
            attempt,
            at_ms,
            result,
        } => test_span(&run, &attempt, at_ms, result),
    }
}

fn run_span(r: pb::RunSummary) -> Span {
    let run: RunId = r.run_id.parse().unwrap_or_default();
    let c = r.counts.unwrap_or_default();
    let verdict = RunStatus::from_wire(r.status);
    let verdict_name = verdict.map_or("unknown", RunStatus::as_str);
    let status = match verdict {
        Some(RunStatus::Passed) => status(status::StatusCode::Ok, String::new()),
        _ if r.message.is_empty() => status(status::StatusCode::Error, verdict_name.to_owned()),
        _ => status(
            status::StatusCode::Error,
            format!("{verdict_name}: {}", r.message),
        ),
    };
    let name = format!("run {}", r.suite);
    let attributes = vec![
        kv("shardgate.run.id", r.run_id),
        kv("shardgate.suite", r.suite),
        kv("shardgate.revision", r.revision),
        kv("shardgate.requested_by", r.requested_by),
        kv("shardgate.runner", r.runner),
        kv("shardgate.run.status", verdict_name),
        kv(
            "shardgate.run.queued_ms",
            r.started_at_ms.saturating_sub(r.created_at_ms),
        ),
        kv("shardgate.run.shards", r.shards),
        kv("shardgate.tests.total", c.total),
        kv("shardgate.tests.passed", c.passed),
        kv("shardgate.tests.failed", c.failed),
        kv("shardgate.tests.flaky", c.flaky),
        kv("shardgate.tests.skipped", c.skipped),
        kv("shardgate.tests.timed_out", c.timed_out),
        kv("shardgate.tests.infra_error", c.infra_error),
    ];
    span(
        &run,
        (run_span_id(&run), Vec::new()),
        name,
        (r.created_at_ms, r.finished_at_ms),
        attributes,
        status,
    )
}

fn shard_span(s: pb::ShardProgress) -> Span {
    let run: RunId = s.run_id.parse().unwrap_or_default();
    let attempt: AttemptId = s.attempt_id.parse().unwrap_or_default();
    let status = if crate::core::ended_in_failure(&s.state) {
        status(status::StatusCode::Error, s.state.clone())
    } else {
        None
    };
    let attributes = vec![
        kv("shardgate.attempt.id", s.attempt_id),
        kv("shardgate.shard.id", s.shard_id),
        kv("shardgate.worker", s.worker),
        kv("shardgate.shard.tests", s.tests),
        kv("shardgate.shard.done", s.done),
        kv("shardgate.shard.state", s.state),
        kv("shardgate.shard.estimated_ms", s.estimated_ms),
    ];
    span(
        &run,
        (shard_span_id(&attempt), run_span_id(&run)),
        "shard".into(),
        (s.started_at_ms, s.ended_at_ms),
        attributes,
        status,
    )
}

fn test_span(run: &RunId, attempt: &AttemptId, at_ms: u64, r: pb::TestResult) -> Span {
    let outcome = Outcome::from_wire(r.outcome);
    let outcome_name = outcome.map_or("unknown", Outcome::as_str);
    let status = match outcome {
        Some(o) if !o.is_green() => {
            let message = if r.detail.is_empty() {
                outcome_name.to_owned()
            } else {
                format!("{outcome_name}: {}", r.detail)
            };
            status(status::StatusCode::Error, message)
        }
        Some(_) | None => None,
    };
    let mut attributes = vec![
        kv("shardgate.test.outcome", outcome_name),
        kv("shardgate.test.duration_ms", r.duration_ms),
        kv("shardgate.test.attempts", r.attempts),
        kv("shardgate.worker", r.worker),
    ];
    if !r.detail.is_empty() {
        attributes.push(kv("shardgate.test.detail", r.detail));
    }
    if r.quarantined {
        attributes.push(kv("shardgate.test.quarantined", true));
    }
    let mut id: [u8; 8] = rand::random();
    if id == [0; 8] {
        id[7] = 1;
    }
    span(
        run,
        (id.to_vec(), shard_span_id(attempt)),
        r.test_id,
        (at_ms.saturating_sub(r.duration_ms), at_ms),
        attributes,
        status,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_spans_share_its_id_as_their_trace_and_nest() {
        let run = RunId::new();
        let attempt = AttemptId::new();
        let shard = span_of(Traced::Shard(pb::ShardProgress {
            attempt_id: attempt.to_string(),
            run_id: run.to_string(),
            worker: "w1".into(),
            tests: 2,
            done: 2,
            started_at_ms: 1_000,
            ended_at_ms: 3_000,
            state: "lease expired".into(),
            ..Default::default()
        }));
        let test = span_of(Traced::Test {
            run,
            attempt,
            at_ms: 2_500,
            result: pb::TestResult {
                test_id: "t/a.sh".into(),
                outcome: pb::Outcome::Failed as i32,
                duration_ms: 700,
                detail: "exit status 1".into(),
                ..Default::default()
            },
        });
        let whole = span_of(Traced::Run(pb::RunSummary {
            run_id: run.to_string(),
            suite: "s".into(),
            status: pb::RunStatus::Failed as i32,
            created_at_ms: 500,
            finished_at_ms: 3_100,
            ..Default::default()
        }));
        assert_eq!(whole.trace_id, run.as_uuid().as_bytes().to_vec());
        assert!(
            [&shard, &test].iter().all(|s| s.trace_id == whole.trace_id),
            "one trace per run"
        );
        assert_eq!(shard.parent_span_id, whole.span_id);
        assert_eq!(test.parent_span_id, shard.span_id);
        assert!(whole.parent_span_id.is_empty(), "the run is the root");
        assert_eq!(
            (test.start_time_unix_nano, test.end_time_unix_nano),
            (1_800_000_000, 2_500_000_000),
            "a test ends when its result came and starts its duration before"
        );
        let code = |s: &Span| s.status.as_ref().map(|s| (s.code, s.message.clone()));
        assert_eq!(
            code(&test),
            Some((status::StatusCode::Error as i32, "failed: exit status 1".into()))
        );
        assert_eq!(
            code(&shard),
            Some((status::StatusCode::Error as i32, "lease expired".into()))
        );
        assert_eq!(
            code(&whole),
            Some((status::StatusCode::Error as i32, "failed".into()))
        );
        assert_eq!(whole.name, "run s");
    }

    #[test]
    fn test_spans_can_be_limited_to_results_that_are_not_green() {
        let test = |outcome: Outcome| Traced::Test {
            run: RunId::new(),
            attempt: AttemptId::new(),
            at_ms: 1,
            result: pb::TestResult {
                outcome: outcome.to_wire(),
                ..Default::default()
            },
        };
        let shard = Traced::Shard(pb::ShardProgress::default());
        let run = Traced::Run(pb::RunSummary::default());
        let kept = |which: TestSpans| -> Vec<bool> {
            [
                Outcome::Passed,
                Outcome::Flaky,
                Outcome::Failed,
                Outcome::TimedOut,
            ]
            .map(|o| which.keeps(&test(o)))
            .to_vec()
        };
        assert_eq!(kept("all".parse().unwrap()), [true; 4]);
        assert_eq!(kept("failed".parse().unwrap()), [false, false, true, true]);
        assert_eq!(kept("none".parse().unwrap()), [false; 4]);
        for which in [TestSpans::All, TestSpans::Failed, TestSpans::None] {
            assert!(which.keeps(&shard) && which.keeps(&run), "{which:?}");
        }
        assert!(
            "some"
                .parse::<TestSpans>()
                .unwrap_err()
                .contains("all, failed or none")
        );
    }

    #[test]
    fn a_collector_that_hangs_costs_the_scheduler_nothing_and_drops_are_counted() {
        // A collector that takes the connection and never answers: the exporter holds one
        // request's spans while it waits, the queue fills behind it, and `send` never waits.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hung.local_addr().unwrap().port();
        let to = |endpoint: &str, ca_cert: Option<&str>| OtlpConfig {
            endpoint: endpoint.to_owned(),
            ca_cert: ca_cert.map(Into::into),
            test_spans: TestSpans::All,
        };
        let tracer =
            Tracer::start(&to(&format!("http://127.0.0.1:{port}"), None), Counter::default()).unwrap();
        let run = RunId::new();
        let summary = pb::RunSummary {
            run_id: run.to_string(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        tracer.send(vec![Traced::Run(summary); QUEUE + MAX_BATCH + 100]);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(tracer.dropped() >= 100, "{}", tracer.dropped());
        drop(hung);
        // Bad settings are named; TLS to a collector with public roots or a CA of its own.
        assert!(
            Tracer::start(&to("collector:4317", None), Counter::default())
                .unwrap_err()
                .contains("needs a scheme")
        );
        assert!(to("https://collector:4317", None).check().is_ok());
        let err = to("http://collector:4317", Some("/ca.pem")).check().unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err = to("https://collector:4317", Some("/nonexistent/ca.pem"))
            .check()
            .unwrap_err();
        assert!(err.contains("--otlp-ca-cert '/nonexistent/ca.pem'"), "{err}");
    }
}
