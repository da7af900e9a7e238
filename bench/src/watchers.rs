//! Watchers do not slow a run: the same run of `--tests` paced tests on `--workers` simulated
//! workers, first with nobody watching, then with `--watchers` clients following it to its end
//! (half over gRPC `WatchRun` on the coordinator's watch port, `--grpc-port main` for its main
//! gRPC port, half over the HTTP server-sent events of `/api/runs/{id}/events`). One
//! coordinator in this process (SQLite file store, gRPC, the watch port and HTTP on loopback),
//! as the binary runs it. It prints the makespan and AcquireShard p50/p99 of
//! each, and the ratios (target ≤ 1.05).
//!
//! The hand-out latency is read in the run's steady state: every hand-out but each worker's
//! first. The first ones are the opening wave, every worker asking in the same millisecond: a
//! hundred calls served in one or two batches, the last of them waiting for all the others. In a
//! later run (sized shards, ~950 hand-outs in all) that wave is a tenth of the hand-outs, so a
//! p99 over everything is the wave's own length, not the latency of a hand-out. The wave is
//! printed on its own: the time until the last worker had its first shard.
//!
//! The watchers stand for dashboards on other machines: in this process they run on threads of
//! their own, by default under Linux's `SCHED_IDLE` policy (they run when nothing else wants
//! the cores), so that the ratio measures what serving them costs the coordinator, not this
//! machine's two cores shared with 200 clients decoding every event; for the same reason they
//! read each event only as far as counting it takes (`--decode` makes the gRPC ones decode
//! every event, as an application would). `--watcher-priority low`
//! runs them at nice 19 instead, `normal` as any thread: both measure the machine as much as
//! the coordinator. A watcher that falls behind is resynchronised by the coordinator (a fresh
//! snapshot), as a slow dashboard would be; the events delivered are printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shardgate_common::pb;
use shardgate_common::pb::run_service_client::RunServiceClient;
use shardgate_common::pb::worker_service_client::WorkerServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::load::{Histogram, handout_histogram};
use crate::mem::quantile;

#[derive(Debug, Clone, clap::Args)]
pub struct WatchersArgs {
    /// Tests in the run.
    #[arg(long, default_value_t = 50_000)]
    pub tests: usize,
    /// Simulated one-slot workers.
    #[arg(long, default_value_t = 100)]
    pub workers: usize,
    /// Time each test takes on its worker, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub test_ms: u64,
    /// Clients following the run (half gRPC, half server-sent events).
    #[arg(long, default_value_t = 200)]
    pub watchers: usize,
    /// Which watchers: `both` (half gRPC, half SSE), `grpc`, `sse`, or `relay`: the control
    /// for what this machine's loopback costs, one SSE watcher whose bytes are copied, as they
    /// come, to `--watchers` − 1 plain TCP connections over loopback (the same traffic through
    /// the kernel, with the coordinator serving one watcher).
    #[arg(long, default_value = "both", value_parser = ["both", "grpc", "sse", "relay"])]
    pub kind: String,
    /// Rounds of (alone, watched), after one warm-up run.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The watchers' threads: `idle` (Linux `SCHED_IDLE`), `low` (nice 19) or `normal`.
    #[arg(long, default_value = "idle", value_parser = ["idle", "low", "normal"])]
    pub watcher_priority: String,
    /// The gRPC watchers decode every event, as an application would; by default they read
    /// each only as far as counting it takes (its sequence number and whether it ends the run),
    /// as the SSE watchers do.
    #[arg(long)]
    pub decode: bool,
    /// Where the gRPC watchers connect: the coordinator's watch port (`--watch-addr`, served
    /// on threads of its own at the lowest priority) or its main gRPC port, beside the workers.
    #[arg(long, default_value = "watch", value_parser = ["watch", "main"])]
    pub grpc_port: String,
}

#[derive(Debug, Default)]
struct Trial {
    makespan: Duration,
    /// CPU seconds of this process but the watchers' own threads: the coordinator and the
    /// simulated workers (the same in every trial).
    cpu_s: f64,
    /// Of it, the coordinator's threads at the lowest priority (HTTP, gRPC watch port).
    low_cpu_s: f64,
    /// Every hand-out's latency but each worker's first, as the worker saw it.
    acquire_ns: Vec<u64>,
    /// The opening wave: from the run's start until the last worker had its first shard.
    opening: Duration,
    /// The coordinator's own hand-out histogram over the trial (from each call's arrival to
    /// its reply, without the simulated workers' side of the connection), after the opening wave.
    served: Histogram,
    events: u64,
}

pub async fn run(a: WatchersArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let watch = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let http_addr = http.local_addr()?.to_string();
    let watch_url = match a.grpc_port.as_str() {
        "main" => url.clone(),
        _ => format!("http://{}", watch.local_addr()?),
    };
    let stop_server = CancellationToken::new();
    let config = shardgate_coordinator::Config::new(dir.path().join("watchers.db"));
    let listeners = shardgate_coordinator::Listeners {
        grpc,
        http: Some(http),
        watch: Some(watch),
    };
    let server = tokio::spawn(shardgate_coordinator::run_on(
        config,
        listeners,
        stop_server.clone().cancelled_owned(),
    ));
    // The simulated workers (their tasks and their connections' own) run on threads of their
    // own, as workers on other machines would: the coordinator's runtime serves only the
    // coordinator, and a hand-out's latency is the coordinator's plus the client's turn.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-worker")
        .enable_all()
        .build()?;
    let mut channels = Vec::new();
    for _ in 0..8 {
        let endpoint = Endpoint::from_shared(url.clone())?.tcp_nodelay(true);
        channels.push(sim_rt.spawn(async move { endpoint.connect().await }).await??);
    }
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let ch = channels[i % channels.len()].clone();
        let id = crate::load::register_exec_worker(&ch, &format!("watched-{i}")).await?;
        workers.push((ch, id));
    }
    let priority: fn() = match a.watcher_priority.as_str() {
        "idle" => shardgate_coordinator::read::idle_priority,
        "low" => shardgate_coordinator::read::lower_priority,
        _ => || {},
    };
    let watcher_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("watcher")
        .on_thread_start(priority)
        .enable_all()
        .build()?;
    println!(
        "watchers: a run of {} tests of {} ms on {} simulated workers, a coordinator with a SQLite file store; watcher threads at {} priority; gRPC watchers on the {} port, {}",
        a.tests,
        a.test_ms,
        a.workers,
        a.watcher_priority,
        a.grpc_port,
        if a.decode {
            "decoding every event"
        } else {
            "counting events without decoding them"
        }
    );
    // A first run warms the store and the history (every trial runs the same suite, so each
    // has the same duration history); then alone and watched alternate (ABBA), so that drift
    // on this machine weighs on both alike.
    let rts = (&watcher_rt, &sim_rt);
    let warm = trial(&a, &channels[0], &workers, 0, &watch_url, &http_addr, rts).await?;
    println!("  warm-up run: makespan {:.2} s", warm.makespan.as_secs_f64());
    let (mut alone, mut watched) = (Trial::default(), Trial::default());
    // Each round's p99, alone and watched: the spread of the unwatched rounds is this machine's
    // own noise, against which the watched rounds are read.
    let mut round_p99: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut round_served: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut round_opening: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=a.rounds {
        let mut order = [
            (0, "nobody watching", 0, &mut alone),
            (1, "watched", a.watchers, &mut watched),
        ];
        // Alone first in odd rounds, watched first in even ones: a drift of this machine
        // within a round weighs on both alike.
        if round % 2 == 0 {
            order.reverse();
        }
        for (k, name, n, total) in order {
            let mut t = trial(&a, &channels[0], &workers, n, &watch_url, &http_addr, rts).await?;
            round_p99[k].push(quantile(&mut t.acquire_ns, 0.99) as f64 / 1e6);
            round_served[k].push(t.served.quantile(0.99) * 1e3);
            round_opening[k].push(t.opening.as_secs_f64() * 1e3);
            println!(
                "  round {round}, {name:<16} makespan {:>6.2} s   AcquireShard p50 {:>5.2} ms  p99 {:>6.2} ms (in the coordinator ≈ {:>5.2} ms) over {} hand-outs   opening wave {:>5.1} ms   CPU {:>5.2} s   events delivered {}",
                t.makespan.as_secs_f64(),
                quantile(&mut t.acquire_ns, 0.5) as f64 / 1e6,
                quantile(&mut t.acquire_ns, 0.99) as f64 / 1e6,
                t.served.quantile(0.99) * 1e3,
                t.acquire_ns.len(),
                t.opening.as_secs_f64() * 1e3,
                t.cpu_s,
                t.events
            );
            total.served.add(&t.served);
            total.makespan += t.makespan;
            total.opening += t.opening;
            total.cpu_s += t.cpu_s;
            total.low_cpu_s += t.low_cpu_s;
            total.acquire_ns.append(&mut t.acquire_ns);
            total.events += t.events;
        }
    }
    let p99 = |t: &mut Trial| quantile(&mut t.acquire_ns, 0.99).max(1) as f64;
    let who = match a.kind.as_str() {
        "grpc" => format!("{} watchers (gRPC)", a.watchers),
        "sse" => format!("{} watchers (SSE)", a.watchers),
        "relay" => format!(
            "1 SSE watcher relayed to {} loopback readers (the control)",
            a.watchers.saturating_sub(1)
        ),
        _ => format!(
            "{} watchers ({} gRPC, {} SSE)",
            a.watchers,
            a.watchers.div_ceil(2),
            a.watchers / 2
        ),
    };
    println!(
        "  over {} rounds, {who} ÷ nobody watching: makespan {:.3}×, AcquireShard p99 {:.3}× (target ≤ 1.05), opening wave {:.3}×",
        a.rounds,
        watched.makespan.as_secs_f64() / alone.makespan.as_secs_f64(),
        p99(&mut watched) / p99(&mut alone),
        watched.opening.as_secs_f64() / alone.opening.as_secs_f64()
    );
    println!(
        "  AcquireShard p99 in the coordinator (its own histogram, from a call's arrival to its reply, interpolated within buckets that grow by 2.5×): {:.2} ms watched, {:.2} ms alone: {:.3}×",
        watched.served.quantile(0.99) * 1e3,
        alone.served.quantile(0.99) * 1e3,
        watched.served.quantile(0.99) / alone.served.quantile(0.99)
    );
    let span = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}–{hi:.2} ms")
    };
    let higher = round_p99[0]
        .iter()
        .zip(&round_p99[1])
        .filter(|(a, w)| w > a)
        .count();
    println!(
        "  CPU of the coordinator and the simulated workers (the watchers' own threads not counted): {:.2} s a run watched, {:.2} s alone: serving {} watchers cost {:.2} s of CPU a run",
        watched.cpu_s / a.rounds as f64,
        alone.cpu_s / a.rounds as f64,
        a.watchers,
        (watched.cpu_s - alone.cpu_s) / a.rounds as f64
    );
    let normal = |t: &Trial| (t.cpu_s - t.low_cpu_s) / a.rounds as f64;
    println!(
        "    of which on the coordinator's lowest-priority threads (HTTP, watch port) {:.2} s, and on all other threads {:.2} s ({:.2} s watched, {:.2} s alone)",
        (watched.low_cpu_s - alone.low_cpu_s) / a.rounds as f64,
        normal(&watched) - normal(&alone),
        normal(&watched),
        normal(&alone)
    );
    println!(
        "  per round, AcquireShard p99: nobody watching {}, watched {}; watched above its round's unwatched in {higher} of {} rounds",
        span(&round_p99[0]),
        span(&round_p99[1]),
        a.rounds
    );
    println!(
        "  per round, the opening wave ({} workers asking at once): nobody watching {}, watched {}",
        a.workers,
        span(&round_opening[0]),
        span(&round_opening[1])
    );
    // One bad round (a stall of this VM's disk or CPU) sets a pooled p99; the median of the
    // rounds' own ratios is what most rounds saw.
    let median_ratio =
        |p: &[Vec<f64>; 2]| crate::mem::median(p[1].iter().zip(&p[0]).map(|(w, a)| w / a).collect());
    println!(
        "  median over the rounds of watched ÷ unwatched AcquireShard p99: {:.3}× as the workers see it, {:.3}× in the coordinator",
        median_ratio(&round_p99),
        median_ratio(&round_served)
    );
    watcher_rt.shutdown_background();
    sim_rt.shutdown_background();
    stop_server.cancel();
    server.await??;
    Ok(())
}

/// The coordinator's threads at the lowest CPU priority that serve watchers.
const LOW_PRIORITY_THREADS: &[&str] = &["shardgate-http", "shardgate-watch"];

#[allow(clippy::too_many_arguments)]
async fn trial(
    a: &WatchersArgs,
    ch: &Channel,
    workers: &[(Channel, String)],
    watchers: usize,
    watch_url: &str,
    http_addr: &str,
    (watcher_rt, sim_rt): (&tokio::runtime::Runtime, &tokio::runtime::Runtime),
) -> anyhow::Result<Trial> {
    let mut rpc = RunServiceClient::new(ch.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let tests: Vec<String> = (0..a.tests).map(|i| format!("t/{i:06}.sh")).collect();
    let run_id = rpc
        .submit_run(pb::SubmitRunRequest {
            suite: "watchers".into(),
            revision: "r".into(),
            runner: "exec".into(),
            tests,
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    // The watchers connect, and have their snapshot, before the first hand-out, and follow the
    // run to its end.
    let events = Arc::new(AtomicU64::new(0));
    let mut watching = tokio::task::JoinSet::new();
    let mut watch_channels = Vec::new();
    for _ in 0..watchers.clamp(1, 10) {
        watch_channels.push(
            watcher_rt
                .spawn({
                    let url = watch_url.to_owned();
                    async move { Endpoint::from_shared(url)?.connect().await }
                })
                .await??,
        );
    }
    // Each watcher says when it has its snapshot: the run starts once every one has, so that
    // the watches' start (a snapshot each, read by the read side) is not part of the run.
    let ready = Arc::new(AllIn {
        expected: watchers,
        ..Default::default()
    });
    let mut grpc_seen = 0;
    // The relay stands for all the watchers; the other kinds are a watcher each.
    let relay = a.kind == "relay";
    if relay && watchers > 0 {
        let sinks = watcher_rt.spawn(loopback_readers(watchers - 1)).await??;
        // The readers are connected: each is in; the SSE watcher tells of itself.
        for _ in &sinks {
            ready.one_more();
        }
        watching.spawn_on(
            sse_watch(
                http_addr.to_owned(),
                run_id.clone(),
                events.clone(),
                ready.clone(),
                sinks,
            ),
            watcher_rt.handle(),
        );
    }
    for i in 0..if relay { 0 } else { watchers } {
        let (run, events) = (run_id.clone(), events.clone());
        let grpc = match a.kind.as_str() {
            "grpc" => true,
            "sse" => false,
            _ => i % 2 == 0,
        };
        if grpc {
            // Spread over the connections (10 watchers or so each, as dashboards on several
            // machines would be).
            let ch = watch_channels[grpc_seen % watch_channels.len()].clone();
            grpc_seen += 1;
            watching.spawn_on(
                grpc_watch(ch, run, events, ready.clone(), a.decode),
                watcher_rt.handle(),
            );
        } else {
            watching.spawn_on(
                sse_watch(http_addr.to_owned(), run, events, ready.clone(), Vec::new()),
                watcher_rt.handle(),
            );
        }
    }
    if watchers > 0 {
        tokio::time::timeout(Duration::from_secs(60), ready.all.notified())
            .await
            .map_err(|_| anyhow::anyhow!("the watchers did not all have their snapshot within 60 s"))?;
    }
    let started = Instant::now();
    let cpu_before = crate::mem::cpu_s_except("watcher");
    let low_before = crate::mem::cpu_s_of(LOW_PRIORITY_THREADS);
    let acquire_ns = Arc::new(Mutex::new(Vec::new()));
    let opened = Arc::new(AllIn {
        expected: workers.len(),
        ..Default::default()
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (ch, id) in workers {
        tasks.spawn_on(
            paced_worker(
                ch.clone(),
                id.clone(),
                Duration::from_millis(a.test_ms),
                acquire_ns.clone(),
                opened.clone(),
            ),
            sim_rt.handle(),
        );
    }
    // The coordinator's histogram is read from the end of the opening wave (a hand-out or two
    // that overlap it are counted: negligible against ~900).
    opened.all.notified().await;
    let opening = started.elapsed();
    let served_before = handout_histogram(http_addr).await?;
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let makespan = started.elapsed();
    while let Some(r) = watching.join_next().await {
        r??;
    }
    let cpu_s = crate::mem::cpu_s_except("watcher") - cpu_before;
    let low_cpu_s = crate::mem::cpu_s_of(LOW_PRIORITY_THREADS) - low_before;
    let served = handout_histogram(http_addr).await?.since(&served_before);
    let acquire_ns = std::mem::take(&mut *acquire_ns.lock().await);
    Ok(Trial {
        makespan,
        cpu_s,
        low_cpu_s,
        acquire_ns,
        opening,
        served,
        events: events.load(Ordering::Relaxed),
    })
}

/// Counts `expected` parties in (the workers' answers to their first `AcquireShard`, the
/// watchers' snapshots) and tells whoever waits once all are.
#[derive(Debug, Default)]
struct AllIn {
    expected: usize,
    answered: AtomicUsize,
    /// Told once every party is in.
    all: tokio::sync::Notify,
}

impl AllIn {
    fn one_more(&self) {
        if self.answered.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            self.all.notify_one();
        }
    }
}

/// A one-slot worker: takes shards until none is left, each test taking `pace` (±50 %) and
/// reported as it finishes, as a real worker does.
async fn paced_worker(
    ch: Channel,
    worker_id: String,
    pace: Duration,
    acquire_ns: Arc<Mutex<Vec<u64>>>,
    opened: Arc<AllIn>,
) -> anyhow::Result<()> {
    let mut client = WorkerServiceClient::new(ch);
    let mut first = true;
    loop {
        let asked = Instant::now();
        let shard = client
            .acquire_shard(pb::AcquireShardRequest {
                worker_id: worker_id.clone(),
                wait_ms: 200,
            })
            .await?
            .into_inner()
            .shard;
        if std::mem::take(&mut first) {
            opened.one_more();
        } else if shard.is_some() {
            acquire_ns.lock().await.push(asked.elapsed().as_nanos() as u64);
        }
        let Some(shard) = shard else { return Ok(()) };
        for t in &shard.tests {
            let f: f64 = rand::random_range(0.5..1.5);
            tokio::time::sleep(pace.mul_f64(f)).await;
            client
                .report_results(pb::ReportResultsRequest {
                    worker_id: worker_id.clone(),
                    attempt_id: shard.attempt_id.clone(),
                    results: vec![pb::TestResult {
                        test_id: t.clone(),
                        outcome: pb::Outcome::Passed as i32,
                        duration_ms: pace.as_millis() as u64,
                        ..Default::default()
                    }],
                    tested_commit: String::new(),
                })
                .await?;
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
}

/// A `RunEvent` as a watcher that only counts events reads it: its sequence number and
/// whether it is the run's `finished`; the other fields are skipped, not decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct Counted {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "bytes", optional, tag = "4")]
    finished: Option<bytes::Bytes>,
}

/// Follows the run over gRPC `WatchRun` to its `finished`. Either as an application would,
/// decoding every event (`--decode`), or, by default, reading each one only as far as it takes
/// to count it (as the SSE watchers do): the watchers stand for dashboards on other machines,
/// and what this process spends decoding 10 million events is this machine's cores taken
/// from the coordinator, not a cost of serving them.
async fn grpc_watch(
    ch: Channel,
    run: String,
    events: Arc<AtomicU64>,
    ready: Arc<AllIn>,
    decode: bool,
) -> anyhow::Result<()> {
    let request = pb::WatchRunRequest { run_id: run };
    let mut first = true;
    let mut seen = |finished: bool| {
        events.fetch_add(1, Ordering::Relaxed);
        if std::mem::take(&mut first) {
            ready.one_more();
        }
        finished
    };
    if decode {
        let mut stream = RunServiceClient::new(ch).watch_run(request).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            if seen(matches!(ev.event, Some(pb::run_event::Event::Finished(_)))) {
                break;
            }
        }
        return Ok(());
    }
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<pb::WatchRunRequest, Counted>::default();
    let path = http::uri::PathAndQuery::from_static("/shardgate.v1.RunService/WatchRun");
    let mut stream = grpc
        .server_streaming(tonic::Request::new(request), path, codec)
        .await?
        .into_inner();
    while let Some(ev) = stream.message().await? {
        if seen(ev.finished.is_some()) {
            break;
        }
    }
    Ok(())
}

/// `n` plain TCP connections over loopback, each read to its end and thrown away by a task on
/// this runtime: the writing halves are returned.
async fn loopback_readers(n: usize) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let to = listener.local_addr()?;
    let mut sinks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sink, (mut source, _)) =
            tokio::try_join!(tokio::net::TcpStream::connect(to), listener.accept())?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(source.read(&mut buf).await, Ok(k) if k > 0) {}
        });
        sinks.push(sink);
    }
    Ok(sinks)
}

/// Follows the run's server-sent events to its end; each chunk read also goes on to every
/// one of `relay` (`--kind relay`), and its events are counted as delivered there too.
async fn sse_watch(
    addr: String,
    run: String,
    events: Arc<AtomicU64>,
    ready: Arc<AllIn>,
    mut relay: Vec<tokio::net::TcpStream>,
) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(&addr).await?;
    s.write_all(
        format!("GET /api/runs/{run}/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail = String::new();
    let mut first = true;
    loop {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the event stream closed before the run finished");
        for sink in &mut relay {
            sink.write_all(&buf[..n]).await?;
        }
        tail.push_str(&String::from_utf8_lossy(&buf[..n]));
        let seen = tail.matches("\nevent: ").count() + usize::from(tail.starts_with("event: "));
        events.fetch_add((seen * (1 + relay.len())) as u64, Ordering::Relaxed);
        if seen > 0 && std::mem::take(&mut first) {
            ready.one_more();
        }
        if tail.contains("event: finished") {
            return Ok(());
        }
        // Keep only the last partial line for the next read.
        let keep = tail.rfind('\n').map_or(0, |i| i + 1);
        tail.drain(..keep);
    }
}
