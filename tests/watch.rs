//! Watching a run: a watch always begins with a snapshot, and its events from there on add up
//! to the run's final counts, whether it joined at the start or mid-run, read quickly or
//! slowly. A watcher that never reads holds up nothing.

mod harness;

use std::io::Write;
use std::time::Duration;

use harness::{Cluster, http_get, wait_for};
use shardgate_common::pb;
use shardgate_common::pb::run_service_client::RunServiceClient;

/// What one watcher saw: the counts it added up (the last snapshot's, plus each result after
/// it), the run's counts in `finished`, and how many snapshots and results it got.
#[derive(Debug, Default)]
struct Seen {
    tallied: [u32; 7],
    finished: Option<pb::RunCounts>,
    snapshots: u32,
    results: u32,
}

fn done(c: &pb::RunCounts) -> [u32; 7] {
    [
        0,
        c.passed,
        c.failed,
        c.skipped,
        c.flaky,
        c.timed_out,
        c.infra_error,
    ]
}

/// Watches `run` to its end, waiting `delay` after each event (a slow reader); `started` is
/// told when the first result arrives.
async fn watch(
    url: String,
    run: String,
    delay: Duration,
    results_seen: tokio::sync::watch::Sender<u32>,
) -> Seen {
    let mut client = RunServiceClient::connect(url).await.unwrap();
    let mut stream = client
        .watch_run(pb::WatchRunRequest { run_id: run })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    let mut last_seq = 0;
    let mut first = true;
    while let Some(ev) = stream.message().await.unwrap() {
        let event = ev.event.unwrap();
        if first {
            assert!(
                matches!(event, pb::run_event::Event::Snapshot(_)),
                "a watch begins with a snapshot, not {event:?}"
            );
            first = false;
        }
        match event {
            pb::run_event::Event::Snapshot(s) => {
                // A fresh start: the snapshot is the truth as of its sequence number.
                seen.snapshots += 1;
                seen.tallied = done(&s.counts.unwrap());
                // Whoever waits for this watch to begin: it has.
                results_seen.send_modify(|_| {});
            }
            pb::run_event::Event::TestFinished(t) => {
                assert!(ev.seq > last_seq, "events in order: {} after {last_seq}", ev.seq);
                let outcome = t.result.unwrap().outcome as usize;
                seen.tallied[outcome] += 1;
                seen.results += 1;
                results_seen.send_replace(seen.results);
            }
            pb::run_event::Event::Finished(s) => {
                seen.finished = s.counts;
            }
            pb::run_event::Event::Progress(_) => {}
        }
        last_seq = last_seq.max(ev.seq);
        if !delay.is_zero() {
            // The slow reader itself: it takes `delay` over each event (what the test is
            // about), it does not wait for anything to happen.
            tokio::time::sleep(delay).await;
        }
    }
    seen
}

fn detach(cluster: &Cluster, tests: &[String], extra: &[&str]) -> String {
    let mut args = vec!["--detach"];
    args.extend_from_slice(extra);
    let ran = cluster.run_tests(tests, &args);
    assert_eq!(ran.code, 0, "{ran:?}");
    ran.json()["run_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_joining_mid_run_ends_with_the_same_counts_as_one_from_the_start() {
    let cluster = Cluster::builder().workers(2).slots(2).start();
    // 60 short tests, two of which fail (and are retried once before they count). Each waits
    // (30 s at most) for A's watch to begin, so that A sees every result however slowly this
    // machine starts it.
    let go = cluster.dir.path().join("go");
    let tests: Vec<String> = (0..60)
        .map(|i| {
            let id = format!("t/{i:03}.sh");
            let exit = u8::from([7, 41].contains(&i));
            let wait = format!(
                "n=0; while [ ! -e {} ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done",
                go.display()
            );
            harness::script(&cluster.root, &id, &format!("{wait}\nsleep 0.05\nexit {exit}"));
            id
        })
        .collect();
    let run = detach(&cluster, &tests, &["--retries", "1"]);
    let (tx_a, _) = tokio::sync::watch::channel(0);
    let mut a_progress = tx_a.subscribe();
    let from_start = tokio::spawn(watch(cluster.url(), run.clone(), Duration::ZERO, tx_a));
    a_progress.changed().await.expect("A's snapshot");
    std::fs::write(&go, "").unwrap();
    // B joins once A has seen a quarter of the results.
    a_progress.wait_for(|n| *n >= 15).await.unwrap();
    let (tx_b, _) = tokio::sync::watch::channel(0);
    let late = tokio::spawn(watch(cluster.url(), run.clone(), Duration::ZERO, tx_b));
    let (a, b) = (from_start.await.unwrap(), late.await.unwrap());

    let fin = a.finished.expect("A saw the run finish");
    assert_eq!(Some(fin), b.finished, "both saw the same final counts");
    assert_eq!((fin.passed, fin.failed), (58, 2));
    for (who, w) in [("from the start", &a), ("joined late", &b)] {
        assert_eq!(
            w.tallied,
            done(&fin),
            "the watcher {who} added up {:?}",
            w.tallied
        );
    }
    assert!(
        b.results < a.results,
        "B joined late: {} vs {}",
        b.results,
        a.results
    );
    assert_eq!(a.results, 60, "every result once, from the start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_holds_up_nothing_and_a_slow_one_catches_up() {
    // A small event buffer, so that watchers that read slowly fall behind within one run.
    let cluster = Cluster::builder()
        .workers(2)
        .slots(2)
        .coordinator_args(&["--event-buffer", "16"])
        .start();
    let tests = harness::suite(&cluster.root, 400, &[], "0");
    let run = detach(&cluster, &tests, &[]);

    // Two watchers that never read: a gRPC stream and a server-sent events connection.
    let mut stuck_grpc = RunServiceClient::connect(cluster.url()).await.unwrap();
    let _stuck_stream = stuck_grpc
        .watch_run(pb::WatchRunRequest { run_id: run.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut stuck_sse = std::net::TcpStream::connect(&cluster.http_addr).unwrap();
    write!(
        stuck_sse,
        "GET /api/runs/{run}/events HTTP/1.1\r\nHost: shardgate\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    // And one that reads, slowly.
    let (tx, _) = tokio::sync::watch::channel(0);
    let slow = tokio::spawn(watch(cluster.url(), run.clone(), Duration::from_millis(5), tx));

    // The run ends regardless.
    let path = format!("/api/runs/{run}");
    let finished = wait_for("the run to end", Duration::from_secs(120), || {
        let (code, body) = http_get(&cluster.http_addr, &path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["verdict"].is_string()).then_some(v)
    });
    assert_eq!(finished["verdict"], "passed", "{finished}");
    assert_eq!(finished["counts"]["passed"], 400);

    let w = tokio::time::timeout(Duration::from_secs(60), slow)
        .await
        .expect("the slow watcher reaches the end")
        .unwrap();
    let fin = w.finished.expect("the slow watcher saw the end");
    assert_eq!(fin.passed, 400);
    assert_eq!(w.tallied, done(&fin), "after {} snapshots", w.snapshots);
    drop(stuck_sse);
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// A coordinator that stops ends its watches (gRPC `WatchRun` on both of its gRPC ports, the
/// HTTP events) with a status that says so, instead of waiting for their runs to end (its
/// watchers then follow it to its next start), and the long poll of its idle slot too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_coordinator_ends_its_watches_instead_of_waiting_for_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Without the disconnect grace, and with a long lease: the busy worker's test, requeued
    // when its connection closes or its lease ends, would end the idle worker's poll by itself.
    let mut cluster = Cluster::builder()
        .workers(1)
        .slots(1)
        .lease("30s", "2s")
        .coordinator_args(&["--watch-addr", "127.0.0.1:0", "--disconnect-grace", "off"])
        .start();
    harness::script(&cluster.root, "t/long.sh", "sleep 60");
    let run = detach(&cluster, &["t/long.sh".to_owned()], &[]);
    let mut streams = Vec::new();
    for addr in [cluster.grpc_addr.clone(), cluster.watch_addr.clone().unwrap()] {
        let mut client = RunServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let mut stream = client
            .watch_run(pb::WatchRunRequest { run_id: run.clone() })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(
            matches!(first.event, Some(pb::run_event::Event::Snapshot(_))),
            "{first:?}"
        );
        streams.push(stream);
    }
    // Health watches too (a load balancer's), on both gRPC ports: they see NOT_SERVING first.
    let mut health = Vec::new();
    for addr in [cluster.grpc_addr.clone(), cluster.watch_addr.clone().unwrap()] {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
        let mut stream = client
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "shardgate.v1.RunService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, SERVING, "{addr}");
        health.push(stream);
    }
    let mut sse = tokio::net::TcpStream::connect(&cluster.http_addr).await.unwrap();
    sse.write_all(format!("GET /api/runs/{run}/events HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&body).contains("event: snapshot") {
        let n = sse.read(&mut buf).await.unwrap();
        assert!(n > 0, "the event stream closed before its snapshot");
        body.extend_from_slice(&buf[..n]);
    }

    // A second worker, idle: it waits in `AcquireShard` from its registration, 10 s at a time.
    cluster.add_worker();
    cluster.wait_for_live_workers(2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cluster.coordinator_pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The run goes on for a minute and the idle worker's poll for 9 s or more: a coordinator
    // that waited for either would still be up.
    let status = cluster
        .wait_coordinator_exit(Duration::from_secs(5))
        .expect("the coordinator stops with watches and a long poll open");
    assert!(status.success(), "{status:?}");
    for mut stream in streams {
        let ended = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the watch ended as if its run had finished"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        assert!(ended.message().contains("shutting down"), "{ended:?}");
    }
    for mut stream in health {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = stream.message().await {
            seen.push(m.status);
        }
        assert_eq!(
            seen,
            [NOT_SERVING],
            "what a health watch saw after the stop began"
        );
    }
    sse.read_to_end(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("event: error") && body.contains("shutting down"),
        "{body}"
    );
}
