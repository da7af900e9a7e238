//! A real coordinator over gRPC under many simulated workers on many connections, in two phases:
//!
//! 1. **saturated**: every worker acquires shards and reports results as fast as it can, in
//!    batches as a real worker sends results that finish together: the most results per second
//!    the coordinator stores.
//! 2. **paced**: the same workers, each test taking `--paced-test-ms` and reported on its own as
//!    a real worker does: the hand-out latency a fleet of that size sees.
//!
//! The coordinator runs in this process on a loopback port with a SQLite file store, exactly as
//! the binary runs it; the simulated workers speak the public WorkerService protocol. Both
//! phases are bounded in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shardgate_common::pb;
use shardgate_common::pb::run_service_client::RunServiceClient;
use shardgate_common::pb::worker_service_client::WorkerServiceClient;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::mem::quantile;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Simulated workers (one slot each).
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// gRPC connections the workers share.
    #[arg(long, default_value_t = 250)]
    pub connections: usize,
    /// Tests in the run.
    #[arg(long, default_value_t = 400_000)]
    pub tests: usize,
    /// Most results in one report, as a worker batches results that finish together.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Length of each phase.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Run only this phase (`saturated` or `paced`).
    #[arg(long)]
    pub only: Option<String>,
    /// How long one test takes in the paced phase, in milliseconds (each varies by ±50 %).
    #[arg(long, default_value_t = 500)]
    pub paced_test_ms: u64,
    /// Also run every phase on PostgreSQL and print both stores side by side: a
    /// `postgres://` URL of an empty database, or `auto` for a server of the bench's own
    /// (Debian's binaries, a temporary directory, removed at the end).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Each simulated worker heartbeats this often (±10 %), naming its attempt, as real
    /// workers do every 2 s; 0 for none.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
}

/// One phase's numbers, for the side-by-side table.
#[derive(Debug, Clone)]
struct PhaseNumbers {
    phase: &'static str,
    results_per_s: f64,
    acquire_p50_ms: f64,
    acquire_p99_ms: f64,
    report_p99_ms: f64,
}

#[derive(Default)]
struct Stats {
    results: AtomicU64,
    handouts: AtomicU64,
    acquire_ns: Mutex<Vec<u64>>,
    /// Each worker's first hand-out: every worker asking at the same moment.
    first_acquire_ns: Mutex<Vec<u64>>,
    report_ns: Mutex<Vec<u64>>,
}

pub async fn run(a: LoadArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sqlite = run_on(&a, dir.path().join("load.db"), "a SQLite file store").await?;
    let Some(pg) = &a.postgres else {
        return Ok(());
    };
    let server = (pg == "auto").then(shardgate_testkit::postgres::PgServer::start);
    let url = match &server {
        Some(s) => s.database(),
        None => pg.clone(),
    };
    println!();
    let postgres = run_on(&a, std::path::PathBuf::from(&url), "a PostgreSQL store").await?;
    println!("\nside by side (SQLite | PostgreSQL | ratio):");
    for (s, p) in sqlite.iter().zip(&postgres) {
        println!(
            "  {:<9} results/s {:>7.0} | {:>7.0} | {:.2}×   AcquireShard p50 {:.2} | {:.2} ms   p99 {:.2} | {:.2} ms ({:.2}×)   ReportResults p99 {:.2} | {:.2} ms",
            s.phase,
            s.results_per_s,
            p.results_per_s,
            p.results_per_s / s.results_per_s,
            s.acquire_p50_ms,
            p.acquire_p50_ms,
            s.acquire_p99_ms,
            p.acquire_p99_ms,
            p.acquire_p99_ms / s.acquire_p99_ms.max(0.001),
            s.report_p99_ms,
            p.report_p99_ms,
        );
    }
    Ok(())
}

async fn run_on(a: &LoadArgs, db: std::path::PathBuf, store: &str) -> anyhow::Result<Vec<PhaseNumbers>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?.to_string();
    let stop_server = CancellationToken::new();
    let config = shardgate_coordinator::Config::new(db);
    let server = tokio::spawn(shardgate_coordinator::run(
        config,
        listener,
        Some(http),
        stop_server.clone().cancelled_owned(),
    ));

    let mut channels = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        channels.push(
            Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    // Register every worker before the run exists, so every one of them competes for it.
    let rss_before = crate::mem::rss_bytes();
    let mut workers = Vec::with_capacity(a.workers);
    for i in 0..a.workers {
        let ch = channels[i % channels.len()].clone();
        let id = register_exec_worker(&ch, &format!("load-{i}")).await?;
        workers.push((ch, id));
    }
    let per_worker = crate::mem::rss_bytes().saturating_sub(rss_before) as f64 / a.workers.max(1) as f64;
    let mut runs = RunServiceClient::new(channels[0].clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    println!(
        "load: {} simulated workers on {} gRPC connections, a coordinator with {store}, {:?} per phase, heartbeats every {:?}",
        a.workers, a.connections, a.duration, a.heartbeat
    );
    println!(
        "  memory                 {:.1} KiB of RSS per registered worker (the coordinator's state and the simulated worker's own, in this one process)",
        per_worker / 1024.0
    );
    let mut failures = Vec::new();
    let mut numbers = Vec::new();
    for (phase, batch, test_ms) in [("saturated", a.batch, 0), ("paced", 1, a.paced_test_ms)] {
        if a.only.as_deref().is_some_and(|o| o != phase) {
            continue;
        }
        let submitted = Instant::now();
        let tests: Vec<String> = (0..a.tests).map(|i| format!("{phase}/{i:07}.sh")).collect();
        let run_id = runs
            .submit_run(pb::SubmitRunRequest {
                suite: format!("load-{phase}"),
                revision: "r".into(),
                runner: "exec".into(),
                tests,
                ..Default::default()
            })
            .await?
            .into_inner()
            .run_id;
        eprintln!(
            "{phase}: submitted {} tests in {:.1} s",
            a.tests,
            submitted.elapsed().as_secs_f64()
        );
        let stats = Arc::new(Stats::default());
        let done = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + a.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for (ch, worker_id) in &workers {
            let (ch, worker_id) = (ch.clone(), worker_id.clone());
            let (stats, done) = (stats.clone(), done.clone());
            let pace = Duration::from_millis(test_ms);
            let (attempt_tx, attempt_rx) = tokio::sync::watch::channel(String::new());
            if !a.heartbeat.is_zero() {
                tasks.spawn(heartbeats(
                    ch.clone(),
                    worker_id.clone(),
                    a.heartbeat,
                    attempt_rx,
                    deadline,
                    done.clone(),
                ));
            }
            tasks.spawn(async move {
                worker(ch, worker_id, batch, pace, deadline, stats, done, attempt_tx).await
            });
        }
        // The coordinator's own histogram from the end of the start-up burst on, as the
        // latencies below count the hand-outs after each worker's first.
        while stats.first_acquire_ns.lock().await.len() < a.workers
            && tokio::time::Instant::now() < deadline
            && !done.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let handouts_before = handout_histogram(&http_addr).await?;
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let wall = started.elapsed().as_secs_f64();
        // What the store holds is what counts. Cancel the rest so the next phase has the fleet.
        let run = runs
            .get_run(pb::GetRunRequest {
                run_id: run_id.clone(),
                include_results: false,
            })
            .await?
            .into_inner()
            .run
            .unwrap_or_default();
        let _ = runs
            .cancel_run(pb::CancelRunRequest {
                run_id,
                reason: "load phase over".into(),
            })
            .await;
        let c = run.counts.unwrap_or_default();
        let stored = (c.passed + c.failed + c.skipped + c.flaky + c.timed_out + c.infra_error) as u64;
        let results = stats.results.load(Ordering::Relaxed);
        let handouts = stats.handouts.load(Ordering::Relaxed);
        let mut acq = stats.acquire_ns.lock().await;
        let mut burst = stats.first_acquire_ns.lock().await;
        let mut rep = stats.report_ns.lock().await;
        println!(
            "\n{phase}: reports of up to {batch} results{}, {wall:.1} s",
            if test_ms > 0 {
                format!(", {test_ms} ms per test")
            } else {
                ", no time per test".into()
            }
        );
        println!(
            "  results acknowledged   {results} ({:.0} per second); stored and counted: {stored}",
            results as f64 / wall
        );
        println!(
            "  hand-outs              {handouts} ({:.0} per second)",
            handouts as f64 / wall
        );
        println!(
            "  AcquireShard latency   p50 {:.2} ms, p99 {:.2} ms over {} hand-outs after each worker's first",
            quantile(&mut acq, 0.5) as f64 / 1e6,
            quantile(&mut acq, 0.99) as f64 / 1e6,
            acq.len()
        );
        let server_p99 = handout_histogram(&http_addr)
            .await?
            .p99_bound_since(&handouts_before);
        println!(
            "  AcquireShard p99 in the coordinator (its own hand-out histogram, from the call's arrival to its reply, this phase's hand-outs): at most {:.1} ms",
            server_p99 * 1e3
        );
        println!(
            "  start-up burst         {} workers asking at once: all served within {:.0} ms (p50 {:.0} ms)",
            burst.len(),
            quantile(&mut burst, 1.0) as f64 / 1e6,
            quantile(&mut burst, 0.5) as f64 / 1e6
        );
        println!(
            "  ReportResults latency  p50 {:.2} ms, p99 {:.2} ms",
            quantile(&mut rep, 0.5) as f64 / 1e6,
            quantile(&mut rep, 0.99) as f64 / 1e6
        );
        numbers.push(PhaseNumbers {
            phase,
            results_per_s: results as f64 / wall,
            acquire_p50_ms: quantile(&mut acq, 0.5) as f64 / 1e6,
            acquire_p99_ms: quantile(&mut acq, 0.99) as f64 / 1e6,
            report_p99_ms: quantile(&mut rep, 0.99) as f64 / 1e6,
        });
        if stored != results {
            failures.push(format!(
                "{phase}: acknowledged {results} results but the store counts {stored}"
            ));
        }
    }
    stop_server.cancel();
    server.await??;
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(numbers)
}

/// The coordinator's hand-out latency histogram as `/metrics` shows it: cumulative counts
/// per upper bound (seconds), smallest bound first.
#[derive(Debug, Default, Clone)]
pub(crate) struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    /// The observations made since `before`.
    pub(crate) fn since(&self, before: &Histogram) -> Histogram {
        Histogram(
            self.0
                .iter()
                .map(|&(le, n)| (le, n - before.0.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
                .collect(),
        )
    }

    /// Both sets of observations (the same buckets).
    pub(crate) fn add(&mut self, other: &Histogram) {
        if self.0.is_empty() {
            self.0 = other.0.clone();
            return;
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.1 += theirs.1;
        }
    }

    /// The `q` quantile, interpolated linearly within its bucket as Prometheus'
    /// `histogram_quantile` does (the buckets grow by 2.5×, so this is an estimate).
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let total = self.0.last().map_or(0.0, |c| c.1);
        let rank = q * total;
        let mut below = (0.0, 0.0);
        for &(le, n) in &self.0 {
            if n >= rank {
                if le.is_infinite() {
                    return below.0;
                }
                let share = if n > below.1 {
                    (rank - below.1) / (n - below.1)
                } else {
                    1.0
                };
                return below.0 + (le - below.0) * share;
            }
            below = (le, n);
        }
        f64::NAN
    }

    /// The smallest bucket bound under which 99 % of the observations made since `before` fall.
    fn p99_bound_since(&self, before: &Histogram) -> f64 {
        let counts = self.since(before).0;
        let total = counts.last().map_or(0.0, |c| c.1);
        counts
            .iter()
            .find(|c| c.1 >= 0.99 * total)
            .map_or(f64::INFINITY, |c| c.0)
    }
}

pub(crate) async fn handout_histogram(http_addr: &str) -> anyhow::Result<Histogram> {
    let (code, body) = crate::reads::http_get(http_addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "GET /metrics answered {code}");
    let text = String::from_utf8_lossy(&body);
    // The response's head ends at the first blank line.
    let text = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let mut buckets: Vec<(f64, f64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "shardgate_handout_latency_seconds")
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(h) => Some(h.iter().map(|b| (b.less_than, b.count)).collect()),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no hand-out histogram in /metrics"))?;
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Histogram(buckets))
}

/// Registers a simulated one-slot worker offering the `exec` runner; its id.
pub async fn register_exec_worker(ch: &Channel, name: &str) -> anyhow::Result<String> {
    Ok(WorkerServiceClient::new(ch.clone())
        .register(pb::RegisterRequest {
            name: name.into(),
            slots: 1,
            labels: vec![],
            runners: vec![pb::RunnerInfo {
                name: "exec".into(),
                kind: pb::RunnerKind::Exec as i32,
            }],
        })
        .await?
        .into_inner()
        .worker_id)
}

/// A simulated worker's heartbeats, naming the attempt it runs, until the phase ends.
async fn heartbeats(
    ch: Channel,
    worker_id: String,
    every: Duration,
    attempt: tokio::sync::watch::Receiver<String>,
    deadline: tokio::time::Instant,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut client = WorkerServiceClient::new(ch);
    // Spread over the interval, as workers started at different times are.
    tokio::time::sleep(every.mul_f64(rand::random_range(0.0..1.0))).await;
    while tokio::time::Instant::now() < deadline && !done.load(Ordering::Relaxed) {
        let current = attempt.borrow().clone();
        client
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                attempt_ids: if current.is_empty() { vec![] } else { vec![current] },
                ..Default::default()
            })
            .await?;
        // In short steps, so the phase does not wait for a heartbeat after the run drained.
        let next = tokio::time::Instant::now() + every.mul_f64(rand::random_range(0.9..1.1));
        while tokio::time::Instant::now() < next.min(deadline) && !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    ch: Channel,
    worker_id: String,
    batch: usize,
    pace: Duration,
    deadline: tokio::time::Instant,
    stats: Arc<Stats>,
    done: Arc<AtomicBool>,
    attempt: tokio::sync::watch::Sender<String>,
) -> anyhow::Result<()> {
    let mut client = WorkerServiceClient::new(ch);
    let mut first = true;
    while tokio::time::Instant::now() < deadline && !done.load(Ordering::Relaxed) {
        let asked = Instant::now();
        let resp = client
            .acquire_shard(pb::AcquireShardRequest {
                worker_id: worker_id.clone(),
                wait_ms: 200,
            })
            .await?
            .into_inner();
        let Some(shard) = resp.shard else {
            // Nothing left to hand out: the run is drained.
            done.store(true, Ordering::Relaxed);
            break;
        };
        let took = asked.elapsed().as_nanos() as u64;
        if first {
            stats.first_acquire_ns.lock().await.push(took);
            first = false;
        } else {
            stats.acquire_ns.lock().await.push(took);
        }
        stats.handouts.fetch_add(1, Ordering::Relaxed);
        attempt.send_replace(shard.attempt_id.clone());
        for chunk in shard.tests.chunks(batch) {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if !pace.is_zero() {
                // Tests vary around the pace, so workers drift apart as real ones do.
                let f: f64 = rand::random_range(0.5..1.5);
                tokio::time::sleep(pace.mul_f64(f) * chunk.len() as u32).await;
            }
            let results = chunk
                .iter()
                .map(|t| pb::TestResult {
                    test_id: t.clone(),
                    outcome: pb::Outcome::Passed as i32,
                    duration_ms: pace.as_millis() as u64,
                    ..Default::default()
                })
                .collect();
            let sent = Instant::now();
            let r = client
                .report_results(pb::ReportResultsRequest {
                    worker_id: worker_id.clone(),
                    attempt_id: shard.attempt_id.clone(),
                    results,
                    tested_commit: String::new(),
                })
                .await?
                .into_inner();
            stats
                .report_ns
                .lock()
                .await
                .push(sent.elapsed().as_nanos() as u64);
            stats.results.fetch_add(r.accepted as u64, Ordering::Relaxed);
        }
        client
            .finish_shard(pb::FinishShardRequest {
                worker_id: worker_id.clone(),
                attempt_id: shard.attempt_id.clone(),
                error: String::new(),
                draining: false,
                unknown_revision: false,
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn a_quantile_is_interpolated_within_its_bucket_and_since_subtracts_the_earlier_counts() {
        let inf = f64::INFINITY;
        let before = Histogram(vec![(0.001, 10.0), (0.0025, 10.0), (0.00625, 10.0), (inf, 10.0)]);
        let now = Histogram(vec![
            (0.001, 10.0),
            (0.0025, 60.0),
            (0.00625, 110.0),
            (inf, 110.0),
        ]);
        let h = now.since(&before);
        assert_eq!(
            h.0,
            vec![(0.001, 0.0), (0.0025, 50.0), (0.00625, 100.0), (inf, 100.0)]
        );
        assert!((h.quantile(0.5) - 0.0025).abs() < 1e-12);
        assert!((h.quantile(0.75) - 0.004375).abs() < 1e-12);
        let mut both = h.clone();
        both.add(&h);
        assert!((both.quantile(0.75) - 0.004375).abs() < 1e-12);
        assert_eq!(both.0[3].1, 200.0);
        assert_eq!(now.p99_bound_since(&before), 0.00625);
    }
}
