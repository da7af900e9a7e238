//! Watching runs: the coordinator's one event stream (the actor's broadcast channel), followed
//! by the gRPC `WatchRun` and the HTTP server-sent events alike.
//!
//! Every watch of a run begins with a snapshot; after it come the run's events in order, none
//! missed and none twice (the snapshot carries the sequence number of the last event it
//! reflects, and older ones are skipped). Buffers are bounded and the publisher never waits: a
//! watcher that reads too slowly falls behind the broadcast channel, and then gets a fresh
//! snapshot (the run's state now) instead of the events it missed, so a slow or stuck watcher
//! costs the scheduler nothing.

use std::sync::Arc;

use shardgate_common::{Error, RunId, RunStatus, pb};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;
use tracing::warn;

use crate::actor::{Handle, Published};
use crate::metrics;
use crate::read::ReadSide;

/// Bursts a watch buffers for its reader before it falls behind.
pub const WATCH_BUFFER: usize = 64;

/// At most this many events leave in one burst.
const BURST_MAX: usize = 1024;

/// How long a watch gathers events before it sends them on together.
pub const WATCH_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// The event stream as one watch reads it: in bursts. The first event after a quiet spell
/// goes at once, with whatever is already waiting behind it; then the watch waits a tick
/// before it looks again. So a watch wakes about ten times a second however busy the run, and
/// a burst goes to its reader as one message (a gRPC `WatchRun` writes it as one chunk of
/// framed messages, an HTTP response as one write) instead of event by event: a hundred watchers of a busy run cost
/// the coordinator little. A run's end cuts the tick short: whoever waits for a verdict (a
/// build trigger, `shardgate run`, `shardgate local`) gets it as it is published.
struct Bursts {
    rx: broadcast::Receiver<Arc<Published>>,
    /// Completes when the coordinator stops serving: the stream is closed then.
    closing: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Changes when a run ends ([`Handle::run_ends`]).
    ends: tokio::sync::watch::Receiver<u64>,
    /// A burst went out: wait a tick before the next.
    sent: bool,
    /// What ended the last burst early (the watch fell behind, the stream closed), for the
    /// next call.
    ended: Option<RecvError>,
}

impl Bursts {
    fn new(handle: &Handle) -> Self {
        Self::with(handle.subscribe(), handle.shutting_down(), handle.run_ends())
    }

    fn with(
        rx: broadcast::Receiver<Arc<Published>>,
        closing: tokio_util::sync::WaitForCancellationFutureOwned,
        ends: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        Self {
            rx,
            closing: Box::pin(closing),
            ends,
            sent: false,
            ended: None,
        }
    }

    async fn next(&mut self) -> Result<Vec<Arc<Published>>, RecvError> {
        if let Some(e) = self.ended.take() {
            return Err(e);
        }
        let Self {
            rx,
            closing,
            ends,
            sent,
            ..
        } = self;
        let first = tokio::select! {
            // Closing wins over the tick and waiting events: a stopping server waits for nobody.
            biased;
            _ = closing => return Err(RecvError::Closed),
            p = async {
                if *sent {
                    tokio::select! {
                        () = tokio::time::sleep(WATCH_TICK) => {}
                        // A run ended since the last burst was gathered: its `finished` is
                        // on the stream already.
                        Ok(()) = ends.changed() => {}
                    }
                }
                rx.recv().await
            } => p?,
        };
        // Every run's end counted from here on is after what this burst gathers, or in it.
        self.ends.borrow_and_update();
        let mut burst = vec![first];
        self.sent = true;
        while burst.len() < BURST_MAX {
            match self.rx.try_recv() {
                Ok(p) => burst.push(p),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(n)) => {
                    self.ended = Some(RecvError::Lagged(n));
                    break;
                }
                Err(TryRecvError::Closed) => {
                    self.ended = Some(RecvError::Closed);
                    break;
                }
            }
        }
        Ok(burst)
    }
}

/// What a run's watch sends its reader: the events of one burst, in order.
pub type Burst = Vec<Followed>;

/// A run's watch as gRPC messages, each event made by `f`; an error is the stream's last item.
/// (For the generated service's `watch_run`, a server made of it alone; the coordinator
/// answers `WatchRun` in `watch_grpc.rs`.)
pub fn messages<T: Send + 'static>(
    rx: mpsc::Receiver<Result<Burst, Error>>,
    f: fn(&Followed) -> T,
) -> impl tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send {
    futures_util::StreamExt::flat_map(tokio_stream::wrappers::ReceiverStream::new(rx), move |r| {
        futures_util::stream::iter(match r {
            Ok(burst) => burst.iter().map(|e| Ok(f(e))).collect(),
            Err(e) => vec![Err(tonic::Status::from(e))],
        })
    })
}

/// One event of a watch: shared with every other watcher (a published event), or its own (a
/// snapshot taken for it).
#[derive(Debug, Clone)]
pub enum Followed {
    Shared(Arc<Published>),
    Own(Box<pb::RunEvent>),
}

impl Followed {
    pub fn seq(&self) -> u64 {
        match self {
            Followed::Shared(p) => p.seq,
            Followed::Own(e) => e.seq,
        }
    }

    /// The event on the wire.
    pub fn to_wire(&self) -> pb::RunEvent {
        match self {
            Followed::Shared(p) => pb::RunEvent {
                seq: p.seq,
                event: Some(p.event.clone()),
            },
            Followed::Own(e) => (**e).clone(),
        }
    }
}

/// Follows run `id`: a snapshot, its events, and its `finished` (the stream ends after it),
/// in bursts.
pub async fn follow_run(
    handle: &Handle,
    reads: &ReadSide,
    id: RunId,
) -> Result<mpsc::Receiver<Result<Burst, Error>>, Error> {
    // Subscribe before taking the snapshot: every event after the snapshot's sequence number
    // is then in the receiver, and those before it are skipped.
    let mut rx = Bursts::new(handle);
    let first = snapshot(reads, id).await?;
    let handle = handle.clone();
    let reads = reads.clone();
    let (tx, out) = mpsc::channel(WATCH_BUFFER);
    let wanted = id.to_string();
    tokio::spawn(async move {
        let _watching = handle.metrics().watching();
        let (mut seq, summary) = first;
        // Every watch begins with a snapshot; an ended run's is followed by its `finished`.
        if !send_snapshot(&tx, seq, summary).await {
            return;
        }
        loop {
            match rx.next().await {
                Ok(burst) => {
                    let mut out = Vec::with_capacity(burst.len());
                    let mut end = false;
                    for p in burst {
                        if p.seq <= seq || p.run_id() != wanted {
                            continue;
                        }
                        seq = p.seq;
                        end = matches!(p.event, pb::run_event::Event::Finished(_));
                        out.push(Followed::Shared(p));
                        if end {
                            break;
                        }
                    }
                    if !out.is_empty() && (!send(&handle, &tx, out).await || end) {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    warn!(run = %id, skipped = n, "watch fell behind; sending a new snapshot");
                    handle.metrics().watch_resynced();
                    rx = Bursts::new(&handle);
                    match snapshot(&reads, id).await {
                        Ok((s, summary)) => {
                            seq = s;
                            if !send_snapshot(&tx, seq, summary).await {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                Err(RecvError::Closed) => {
                    let _ = tx
                        .send(Err(Error::Unavailable("the coordinator is shutting down".into())))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(out)
}

/// What a watch of every run receives.
#[derive(Debug, Clone)]
pub enum Seen {
    Event(Arc<Published>),
    /// The watcher fell behind and missed events: whatever it shows, it should read afresh.
    Resync,
}

/// Follows every run's events, with no snapshot (a page of runs reads its own).
pub fn follow_all(handle: &Handle) -> mpsc::Receiver<Seen> {
    let mut rx = Bursts::new(handle);
    let handle = handle.clone();
    let (tx, out) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let _watching = handle.metrics().watching();
        loop {
            let seen = match rx.next().await {
                Ok(burst) => {
                    handle
                        .metrics()
                        .event_lag_seconds
                        .observe(metrics::since(burst[0].at));
                    burst.into_iter().map(Seen::Event).collect()
                }
                Err(RecvError::Lagged(_)) => {
                    handle.metrics().watch_resynced();
                    rx = Bursts::new(&handle);
                    vec![Seen::Resync]
                }
                Err(RecvError::Closed) => return,
            };
            for s in seen {
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        }
    });
    out
}

/// Sends a burst of published events; the lag observed is its first (oldest) event's.
async fn send(handle: &Handle, tx: &mpsc::Sender<Result<Burst, Error>>, burst: Burst) -> bool {
    if let Some(Followed::Shared(p)) = burst.first() {
        handle.metrics().event_lag_seconds.observe(metrics::since(p.at));
    }
    tx.send(Ok(burst)).await.is_ok()
}

/// Sends a snapshot, followed by `finished` when the run has ended. False when the stream is
/// over.
async fn send_snapshot(tx: &mpsc::Sender<Result<Burst, Error>>, seq: u64, summary: pb::RunSummary) -> bool {
    use pb::run_event::Event;
    let ended = RunStatus::from_wire(summary.status).is_some_and(RunStatus::is_terminal);
    let mut events = vec![Event::Snapshot(summary.clone())];
    if ended {
        events.push(Event::Finished(summary));
    }
    let burst = events
        .into_iter()
        .map(|event| {
            Followed::Own(Box::new(pb::RunEvent {
                seq,
                event: Some(event),
            }))
        })
        .collect();
    tx.send(Ok(burst)).await.is_ok() && !ended
}

/// The run's summary with the sequence number of the last event it reflects, read from the
/// live view (an active run) or the store (an ended one), never from the scheduler: however
/// many watchers start or fall behind, they cost it nothing. Call it after subscribing.
async fn snapshot(reads: &ReadSide, id: RunId) -> Result<(u64, pb::RunSummary), Error> {
    let (seq, live) = {
        let view = reads.live().read().unwrap_or_else(|p| p.into_inner());
        (view.seq, view.runs.get(&id).map(|r| r.summary.clone()))
    };
    match live {
        Some(summary) => Ok((seq, summary)),
        // Not active: ended (its stored summary is final) or unknown.
        None => Ok((seq, reads.get_run(id, false).await?.run.unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use shardgate_common::{Outcome, RunId, WorkerId, pb};

    use super::*;
    use crate::core::Core;
    use crate::model::{CoreConfig, Now};
    use crate::store::SqliteStore;

    fn published(seq: u64, event: pb::run_event::Event) -> Arc<Published> {
        Arc::new(Published {
            seq,
            event,
            at: std::time::Instant::now(),
            sse: Default::default(),
            sse_light: Default::default(),
            wire: Default::default(),
        })
    }

    /// After a burst a watch waits a tick before it looks again, unless a run ended: its
    /// `finished` goes at once (time is paused: a tick waited for would show on the clock).
    #[tokio::test(start_paused = true)]
    async fn a_runs_end_goes_out_without_waiting_for_the_tick() {
        let (tx, rx) = broadcast::channel(16);
        let (ended, ends) = tokio::sync::watch::channel(0u64);
        let closing = tokio_util::sync::CancellationToken::new();
        let mut bursts = Bursts::with(rx, closing.clone().cancelled_owned(), ends);
        let summary = || pb::RunSummary {
            run_id: "r".into(),
            ..Default::default()
        };
        tx.send(published(1, pb::run_event::Event::Progress(summary())))
            .unwrap();
        assert_eq!(bursts.next().await.unwrap().len(), 1);
        let start = tokio::time::Instant::now();

        // Progress waits for the tick.
        tx.send(published(2, pb::run_event::Event::Progress(summary())))
            .unwrap();
        assert_eq!(bursts.next().await.unwrap()[0].seq, 2);
        assert_eq!(start.elapsed(), WATCH_TICK);

        // A run's end, published as the actor's publisher publishes it (the event, then the
        // count), does not.
        let start = tokio::time::Instant::now();
        tx.send(published(3, pb::run_event::Event::Finished(summary())))
            .unwrap();
        ended.send_modify(|n| *n += 1);
        assert_eq!(bursts.next().await.unwrap()[0].seq, 3);
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);

        // The events behind a run's end go with it; that end, once gathered in a burst,
        // does not cut the next tick short.
        let start = tokio::time::Instant::now();
        tx.send(published(4, pb::run_event::Event::Finished(summary())))
            .unwrap();
        ended.send_modify(|n| *n += 1);
        tx.send(published(5, pb::run_event::Event::Progress(summary())))
            .unwrap();
        let burst = bursts.next().await.unwrap();
        assert_eq!(burst.iter().map(|p| p.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);
        let start = tokio::time::Instant::now();
        tx.send(published(6, pb::run_event::Event::Progress(summary())))
            .unwrap();
        assert_eq!(bursts.next().await.unwrap()[0].seq, 6);
        assert_eq!(start.elapsed(), WATCH_TICK);
    }

    /// A watcher that does not read while a run produces far more events than the stream
    /// holds is not waited for; when it reads again it gets a fresh snapshot, and the snapshot
    /// plus what follows still adds up to the run's final counts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watcher_that_falls_behind_gets_a_fresh_snapshot_and_misses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let core = Core::open(CoreConfig::default(), store, Now::real()).unwrap();
        let handle = crate::actor::spawn_with(core, std::time::Duration::from_millis(50), 16);
        let worker: WorkerId = handle
            .call(|c, now| {
                c.register(
                    pb::RegisterRequest {
                        name: "w".into(),
                        slots: 1,
                        runners: vec![pb::RunnerInfo {
                            name: "exec".into(),
                            kind: pb::RunnerKind::Exec as i32,
                        }],
                        ..Default::default()
                    },
                    now,
                )
            })
            .await
            .unwrap()
            .worker_id
            .parse()
            .unwrap();
        let n = WATCH_BUFFER * 4;
        let tests: Vec<String> = (0..n).map(|i| format!("t{i}.sh")).collect();
        let run: RunId = handle
            .call(move |c, now| {
                c.submit(
                    pb::SubmitRunRequest {
                        suite: "s".into(),
                        revision: "r".into(),
                        runner: "exec".into(),
                        tests,
                        ..Default::default()
                    },
                    now,
                )
            })
            .await
            .unwrap()
            .run_id
            .parse()
            .unwrap();
        let reader =
            std::sync::Arc::new(crate::store::SqliteReader::open(&dir.path().join("db"), 1).unwrap());
        let reads = ReadSide::new(
            reader,
            handle.live(),
            crate::read::ReadConfig::from(&CoreConfig::default()),
            1,
        );
        let mut rx = follow_run(&handle, &reads, run).await.unwrap();
        // The worker runs everything, one result per call, while the watcher reads nothing.
        let mut reported = 0;
        while reported < n {
            let shard = handle
                .call(move |c, now| c.acquire(worker, now))
                .await
                .unwrap()
                .expect("work is left");
            let attempt: shardgate_common::AttemptId = shard.attempt_id.parse().unwrap();
            for t in shard.tests {
                let outcome = if reported % 97 == 0 {
                    Outcome::Skipped
                } else {
                    Outcome::Passed
                };
                let result = pb::TestResult {
                    test_id: t,
                    outcome: outcome.to_wire(),
                    duration_ms: 1,
                    ..Default::default()
                };
                handle
                    .call(move |c, now| c.report(worker, attempt, vec![result], now))
                    .await
                    .unwrap();
                reported += 1;
            }
            handle
                .call(move |c, now| c.finish(worker, attempt, "", false, now))
                .await
                .unwrap();
        }
        // Now it reads.
        let (mut snapshots, mut tally, mut finished) = (0, [0u32; 7], None);
        let mut events = Vec::new();
        while let Some(burst) = rx.recv().await {
            events.extend(burst.unwrap());
        }
        for ev in events {
            match ev.to_wire().event.unwrap() {
                pb::run_event::Event::Snapshot(s) => {
                    snapshots += 1;
                    let c = s.counts.unwrap();
                    tally = [
                        0,
                        c.passed,
                        c.failed,
                        c.skipped,
                        c.flaky,
                        c.timed_out,
                        c.infra_error,
                    ];
                }
                pb::run_event::Event::TestFinished(t) => tally[t.result.unwrap().outcome as usize] += 1,
                pb::run_event::Event::Finished(s) => finished = s.counts,
                pb::run_event::Event::Progress(_) => {}
            }
        }
        let fin = finished.expect("the watch ends with the run's end");
        assert_eq!(fin.passed + fin.skipped, n as u32);
        assert!(
            snapshots >= 2,
            "the watcher fell behind and was sent a fresh snapshot"
        );
        assert_eq!(
            tally,
            [
                0,
                fin.passed,
                fin.failed,
                fin.skipped,
                fin.flaky,
                fin.timed_out,
                fin.infra_error
            ]
        );
    }
}
