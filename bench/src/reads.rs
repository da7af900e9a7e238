//! Hand-outs while others read or submit: the read side and staged submissions keep the
//! scheduler free. One coordinator in this process (SQLite file store, gRPC and HTTP on
//! loopback), simulated workers taking shards from a running run, and three phases measured
//! side by side:
//!
//! 1. **quiet**: hand-outs alone;
//! 2. **readers**: the same while `--readers` clients fetch `GET /api/runs/{id}` of a finished
//!    `--big-tests` run (every result) in a loop;
//! 3. **submission**: the same while a `--huge-tests` run is submitted over gRPC.
//!
//! It prints AcquireShard latency p50/p99 per phase and the ratios to the quiet phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shardgate_common::pb;
use shardgate_common::pb::run_service_client::RunServiceClient;
use shardgate_common::pb::worker_service_client::WorkerServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::mem::quantile;

#[derive(Debug, Clone, clap::Args)]
pub struct ReadsArgs {
    /// Simulated workers (one slot each) taking shards.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Time each simulated shard takes on its worker, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub shard_ms: u64,
    /// Clients reading the big run in a loop in the readers phase.
    #[arg(long, default_value_t = 50)]
    pub readers: usize,
    /// Tests of the finished run the readers fetch.
    #[arg(long, default_value_t = 100_000)]
    pub big_tests: usize,
    /// Tests of the run submitted in the submission phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub huge_tests: usize,
    /// Length of the quiet and readers phases.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

type Rpc = RunServiceClient<Channel>;

pub async fn run(a: ReadsArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let http_addr = http.local_addr()?.to_string();
    let stop_server = CancellationToken::new();
    let config = shardgate_coordinator::Config::new(dir.path().join("reads.db"));
    let server = tokio::spawn(shardgate_coordinator::run(
        config,
        grpc,
        Some(http),
        stop_server.clone().cancelled_owned(),
    ));
    let ch = Endpoint::from_shared(url)?.tcp_nodelay(true).connect().await?;
    let mut workers = Vec::new();
    for i in 0..a.workers {
        workers.push(crate::load::register_exec_worker(&ch, &format!("reads-{i}")).await?);
    }
    let mut rpc = RunServiceClient::new(ch.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    println!(
        "reads: {} simulated workers ({} ms per shard), a coordinator with a SQLite file store",
        a.workers, a.shard_ms
    );

    // The run the readers fetch: finished, every result stored.
    let big = submit(&mut rpc, "big", a.big_tests).await?;
    let filled = Instant::now();
    drive(
        &ch,
        &workers,
        Duration::ZERO,
        None,
        Arc::new(Latencies::default()),
        Some(&big),
    )
    .await?;
    wait_finished(&mut rpc, &big).await?;
    println!(
        "  the read target: a finished run of {} tests, filled in {:.1} s",
        a.big_tests,
        filled.elapsed().as_secs_f64()
    );
    let (code, bytes) = http_get(&http_addr, &format!("/api/runs/{big}")).await?;
    anyhow::ensure!(code == 200, "GET /api/runs/{big} answered {code}");
    println!(
        "  GET /api/runs/{{id}} of it: {:.1} MB of JSON",
        bytes.len() as f64 / 1e6
    );

    // The run hand-outs come from in every phase.
    let work = submit(&mut rpc, "work", 400_000).await?;
    let pace = Duration::from_millis(a.shard_ms);

    let quiet = Arc::new(Latencies::default());
    drive(&ch, &workers, pace, Some(a.duration), quiet.clone(), None).await?;

    let busy = Arc::new(Latencies::default());
    let stop_readers = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    // The readers stand for dashboards on other machines: in this process they run on their own
    // threads, at the lowest priority, so that they measure the coordinator, not this machine's
    // two cores shared with them.
    let reader_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(shardgate_coordinator::read::lower_priority)
        .enable_all()
        .build()?;
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..a.readers {
        let (addr, path) = (http_addr.clone(), format!("/api/runs/{big}"));
        let (stop, reads) = (stop_readers.clone(), reads.clone());
        readers.spawn_on(
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let (code, _) = http_get(&addr, &path).await?;
                    anyhow::ensure!(code == 200, "a read answered {code}");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
            reader_rt.handle(),
        );
    }
    drive(&ch, &workers, pace, Some(a.duration), busy.clone(), None).await?;
    stop_readers.store(true, Ordering::Relaxed);
    while let Some(r) = readers.join_next().await {
        r??;
    }
    reader_rt.shutdown_background();

    let during = Arc::new(Latencies::default());
    let submitting = Arc::new(AtomicBool::new(true));
    let driver = {
        let (ch, workers, during, submitting) =
            (ch.clone(), workers.clone(), during.clone(), submitting.clone());
        tokio::spawn(async move {
            let mut rounds = 0;
            // Measure from before the submission starts until it is acknowledged.
            while submitting.load(Ordering::Relaxed) || rounds == 0 {
                drive(
                    &ch,
                    &workers,
                    pace,
                    Some(Duration::from_millis(500)),
                    during.clone(),
                    None,
                )
                .await?;
                rounds += 1;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The build trigger is another machine too: its client (building and encoding 1,000,000
    // ids) runs on its own low-priority threads.
    let trigger_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(shardgate_coordinator::read::lower_priority)
        .enable_all()
        .build()?;
    let t = Instant::now();
    let huge = {
        let (mut rpc, n) = (rpc.clone(), a.huge_tests);
        trigger_rt
            .spawn(async move { submit(&mut rpc, "huge", n).await })
            .await??
    };
    let submit_s = t.elapsed().as_secs_f64();
    trigger_rt.shutdown_background();
    submitting.store(false, Ordering::Relaxed);
    driver.await??;
    for run in [&work, &huge] {
        let _ = rpc
            .cancel_run(pb::CancelRunRequest {
                run_id: run.clone(),
                reason: "bench over".into(),
            })
            .await;
    }

    let (q50, q99) = quiet.p50_p99().await;
    let (b50, b99) = busy.p50_p99().await;
    let (d50, d99) = during.p50_p99().await;
    let read_n = reads.load(Ordering::Relaxed);
    println!("\n  phase                       hand-outs   p50 ms   p99 ms   p99 / quiet");
    println!(
        "  quiet                       {:>9}   {q50:>6.2}   {q99:>6.2}   1.00",
        quiet.len().await
    );
    println!(
        "  {:>3} readers ({read_n:>5} reads)  {:>9}   {b50:>6.2}   {b99:>6.2}   {:.2}",
        a.readers,
        busy.len().await,
        b99 / q99
    );
    println!(
        "  {:>7}-test submission      {:>9}   {d50:>6.2}   {d99:>6.2}   {:.2}",
        a.huge_tests,
        during.len().await,
        d99 / q99
    );
    println!(
        "  the {}-test submission took {submit_s:.1} s; readers fetched {:.1} runs per second",
        a.huge_tests,
        read_n as f64 / a.duration.as_secs_f64()
    );
    println!(
        "  targets: p99 with readers within 1.5x of quiet ({}), p99 during the submission under 50 ms ({})",
        if b99 <= 1.5 * q99 { "met" } else { "NOT met" },
        if d99 < 50.0 { "met" } else { "NOT met" }
    );
    stop_server.cancel();
    server.await??;
    Ok(())
}

#[derive(Default)]
struct Latencies(Mutex<Vec<u64>>);

impl Latencies {
    async fn push(&self, ns: u64) {
        self.0.lock().await.push(ns);
    }

    async fn len(&self) -> usize {
        self.0.lock().await.len()
    }

    /// p50 and p99 in milliseconds.
    async fn p50_p99(&self) -> (f64, f64) {
        let mut v = self.0.lock().await;
        (
            quantile(&mut v, 0.5) as f64 / 1e6,
            quantile(&mut v, 0.99) as f64 / 1e6,
        )
    }
}

async fn submit(rpc: &mut Rpc, suite: &str, n: usize) -> anyhow::Result<String> {
    let tests = (0..n).map(|i| format!("{suite}/{i:07}.sh")).collect();
    Ok(rpc
        .submit_run(pb::SubmitRunRequest {
            suite: suite.into(),
            revision: "r".into(),
            runner: "exec".into(),
            tests,
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

async fn wait_finished(rpc: &mut Rpc, run: &str) -> anyhow::Result<()> {
    for _ in 0..600 {
        let r = rpc
            .get_run(pb::GetRunRequest {
                run_id: run.into(),
                include_results: false,
            })
            .await?
            .into_inner()
            .run
            .unwrap_or_default();
        if r.finished_at_ms > 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("run {run} did not finish within a minute")
}

/// Every worker takes shards (each taking `pace`, results reported in one batch) for `length`,
/// or until `until_done` has nothing left to hand out; hand-out latencies go to `lat`.
async fn drive(
    ch: &Channel,
    workers: &[String],
    pace: Duration,
    length: Option<Duration>,
    lat: Arc<Latencies>,
    until_done: Option<&String>,
) -> anyhow::Result<()> {
    let deadline = length.map(|l| tokio::time::Instant::now() + l);
    let mut tasks = tokio::task::JoinSet::new();
    for w in workers {
        let (mut client, w, lat) = (WorkerServiceClient::new(ch.clone()), w.clone(), lat.clone());
        let only = until_done.cloned();
        tasks.spawn(async move {
            while deadline.is_none_or(|d| tokio::time::Instant::now() < d) {
                let asked = Instant::now();
                let shard = client
                    .acquire_shard(pb::AcquireShardRequest {
                        worker_id: w.clone(),
                        wait_ms: 100,
                    })
                    .await?
                    .into_inner()
                    .shard;
                let Some(shard) = shard else {
                    if only.is_some() {
                        break;
                    }
                    continue;
                };
                lat.push(asked.elapsed().as_nanos() as u64).await;
                tokio::time::sleep(pace).await;
                let results = shard
                    .tests
                    .iter()
                    .map(|t| pb::TestResult {
                        test_id: t.clone(),
                        outcome: pb::Outcome::Passed as i32,
                        duration_ms: 1,
                        output: "ok\n".repeat(20),
                        ..Default::default()
                    })
                    .collect();
                client
                    .report_results(pb::ReportResultsRequest {
                        worker_id: w.clone(),
                        attempt_id: shard.attempt_id.clone(),
                        results,
                        tested_commit: String::new(),
                    })
                    .await?;
                client
                    .finish_shard(pb::FinishShardRequest {
                        worker_id: w.clone(),
                        attempt_id: shard.attempt_id,
                        error: String::new(),
                        draining: false,
                        unknown_revision: false,
                    })
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// `GET path` over HTTP/1.1; the status code and the whole response, head included.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, buf))
}
