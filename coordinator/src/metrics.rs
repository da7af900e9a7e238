//! Prometheus metrics, served as text at `/metrics`.
//!
//! Counters and histograms are kept as things happen: the actor adds what each committed batch
//! counted (results by outcome from its events, runs by end state, attempts by how they ended,
//! retries) and times its commits; the services time hand-outs and reports; watch streams time
//! how far behind the event stream they send. Gauges (runs by state, queue depth, the fleet)
//! are computed from committed state when scraped, on the read side's threads, so a scrape
//! never touches the scheduler.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use shardgate_common::{Outcome, RunStatus, pb};

/// A metric's labels.
pub type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// What the core counted in one message, kept (like its events) only if the message succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreCount {
    /// A failed test goes round again.
    Retry,
    /// An attempt ended, as the shard log names it ("finished", "lease expired", …).
    AttemptEnded(&'static str),
}

/// Every metric of one coordinator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tests: Family<Labels, Counter>,
    runs_ended: Family<Labels, Counter>,
    attempts_ended: Family<Labels, Counter>,
    retries: Counter,
    rollouts: Family<Labels, Counter>,
    watch_resyncs: Counter,
    /// Spans the trace exporter dropped because its collector did not keep up.
    pub trace_spans_dropped: Counter,
    pub handout_seconds: Histogram,
    pub report_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub event_lag_seconds: Histogram,
    runs: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    workers: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
    watchers: Gauge,
}

/// Latency buckets from 100 µs to about 30 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("shardgate"),
            tests: Family::default(),
            runs_ended: Family::default(),
            attempts_ended: Family::default(),
            retries: Counter::default(),
            rollouts: Family::default(),
            watch_resyncs: Counter::default(),
            trace_spans_dropped: Counter::default(),
            handout_seconds: latency(),
            report_seconds: latency(),
            commit_seconds: latency(),
            event_lag_seconds: latency(),
            runs: Family::default(),
            queue_depth: Family::default(),
            workers: Family::default(),
            slots: Family::default(),
            watchers: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "tests",
            "Counted test results by outcome (flaky: failed then passed on a retry; infra_error: given up after losing its workers)",
            m.tests.clone(),
        );
        r.register(
            "runs_ended",
            "Runs that reached a terminal state, by state",
            m.runs_ended.clone(),
        );
        r.register(
            "attempts_ended",
            "Shard attempts that ended, by how (finished, lease expired, drained, no result, runner error, run ended)",
            m.attempts_ended.clone(),
        );
        r.register(
            "retries",
            "Failed tests handed out again to tell a flake from a regression",
            m.retries.clone(),
        );
        r.register(
            "rollouts",
            "Rollouts by outcome (succeeded, failed, rolled_back, unknown)",
            m.rollouts.clone(),
        );
        r.register(
            "watch_resyncs",
            "Watchers that fell behind the event stream and were sent a fresh snapshot",
            m.watch_resyncs.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans of run traces dropped because the OTLP collector (--otlp-endpoint) did not keep up",
            m.trace_spans_dropped.clone(),
        );
        r.register_with_unit(
            "handout_latency",
            "Time the scheduler took to form and store a shard for a free slot",
            Unit::Seconds,
            m.handout_seconds.clone(),
        );
        r.register_with_unit(
            "report_latency",
            "Time from a worker's results arriving to their being counted and durable",
            Unit::Seconds,
            m.report_seconds.clone(),
        );
        r.register_with_unit(
            "store_commit_latency",
            "Time to commit one group of messages to the store",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register_with_unit(
            "event_stream_lag",
            "Time from an event's publication to its sending on a watch stream",
            Unit::Seconds,
            m.event_lag_seconds.clone(),
        );
        r.register(
            "runs",
            "Stored runs by state (queued and running ones are the active runs)",
            m.runs.clone(),
        );
        r.register(
            "queue_depth",
            "Tests waiting for a slot, by runner and the labels their runs ask for: the autoscaling signal",
            m.queue_depth.clone(),
        );
        r.register(
            "workers",
            "Known workers by state (live, lost, gone), and live ones busy or draining",
            m.workers.clone(),
        );
        r.register("slots", "Slots of live workers: total and busy", m.slots.clone());
        r.register(
            "watchers",
            "Open watch streams (gRPC and SSE)",
            m.watchers.clone(),
        );
        m
    }

    /// Counts what one committed batch produced.
    pub fn committed(&self, events: &[pb::run_event::Event], counts: &[CoreCount]) {
        use pb::run_event::Event;
        for e in events {
            match e {
                Event::TestFinished(t) => {
                    let outcome = t
                        .result
                        .as_ref()
                        .and_then(|r| Outcome::from_wire(r.outcome))
                        .map_or("unknown", Outcome::as_str);
                    self.tests.get_or_create(&labels(&[("outcome", outcome)])).inc();
                }
                Event::Finished(s) => {
                    let state = RunStatus::from_wire(s.status).map_or("unknown", RunStatus::as_str);
                    self.runs_ended.get_or_create(&labels(&[("state", state)])).inc();
                }
                Event::Snapshot(_) | Event::Progress(_) => {}
            }
        }
        for c in counts {
            match c {
                CoreCount::Retry => {
                    self.retries.inc();
                }
                CoreCount::AttemptEnded(how) => {
                    self.attempts_ended.get_or_create(&labels(&[("how", how)])).inc();
                }
            }
        }
    }

    /// A rollout ended with `outcome`.
    pub fn rollout(&self, outcome: &str) {
        self.rollouts
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
    }

    pub fn watch_resynced(&self) {
        self.watch_resyncs.inc();
    }

    /// Counts an open watch stream until the guard drops.
    pub fn watching(self: &std::sync::Arc<Self>) -> WatchGuard {
        self.watchers.inc();
        WatchGuard(self.clone())
    }

    /// Sets the gauges from committed state and renders everything as Prometheus text.
    pub fn render(&self, state: &GaugeState) -> String {
        self.runs.clear();
        for (status, n) in &state.runs {
            self.runs
                .get_or_create(&labels(&[("state", status)]))
                .set(*n as i64);
        }
        self.queue_depth.clear();
        for ((runner, sel), n) in &state.queue_depth {
            self.queue_depth
                .get_or_create(&labels(&[("runner", runner), ("labels", sel)]))
                .set(*n as i64);
        }
        self.workers.clear();
        for (s, n) in &state.workers {
            self.workers
                .get_or_create(&labels(&[("state", s)]))
                .set(*n as i64);
        }
        self.slots.clear();
        self.slots
            .get_or_create(&labels(&[("state", "total")]))
            .set(state.slots_total as i64);
        self.slots
            .get_or_create(&labels(&[("state", "busy")]))
            .set(state.slots_busy as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Keeps the watchers gauge up while a watch stream is open.
#[derive(Debug)]
pub struct WatchGuard(std::sync::Arc<Metrics>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

/// The values of the gauges, read from committed state at scrape time.
#[derive(Debug, Default)]
pub struct GaugeState {
    /// Stored runs per state; every state appears, with 0 when none.
    pub runs: BTreeMap<String, u64>,
    /// Queued tests per (runner, label selector).
    pub queue_depth: BTreeMap<(String, String), u64>,
    /// Workers per state: live, lost, gone, and live ones busy and draining.
    pub workers: BTreeMap<String, u64>,
    pub slots_total: u64,
    pub slots_busy: u64,
}

impl GaugeState {
    /// From the stored run counts and the live view.
    pub fn from_parts(stored_runs: &[(String, u64)], live: &crate::read::LiveView) -> Self {
        let mut g = GaugeState::default();
        for s in RunStatus::ALL {
            g.runs.insert(s.as_str().to_owned(), 0);
        }
        for (status, n) in stored_runs {
            g.runs.insert(status.clone(), *n);
        }
        for run in live.runs.values() {
            let s = &run.summary;
            let queued = s.counts.as_ref().map_or(0, |c| c.queued) as u64;
            let sel = s
                .labels
                .iter()
                .map(|l| format!("{}={}", l.key, l.value))
                .collect::<Vec<_>>()
                .join(",");
            *g.queue_depth.entry((s.runner.clone(), sel)).or_default() += queued;
        }
        // Every runner a live worker offers has a series, 0 when nothing waits, so that an
        // autoscaler's query has a value to read.
        for w in live.workers.values().filter(|w| w.state == "live") {
            for r in &w.runners {
                g.queue_depth.entry((r.name.clone(), String::new())).or_default();
            }
        }
        for st in ["live", "lost", "gone", "busy", "draining"] {
            g.workers.insert(st.to_owned(), 0);
        }
        for w in live.workers.values() {
            *g.workers.entry(w.state.clone()).or_default() += 1;
            if w.state == "live" {
                g.slots_total += u64::from(w.slots);
                g.slots_busy += u64::from(w.busy_slots);
                if w.busy_slots > 0 {
                    *g.workers.entry("busy".into()).or_default() += 1;
                }
                if w.draining {
                    *g.workers.entry("draining".into()).or_default() += 1;
                }
            }
        }
        g
    }
}

/// Seconds since `start`, for a histogram.
pub fn since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
