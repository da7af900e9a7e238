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
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tracing::warn;

use crate::actor::{Handle, Published};
use crate::metrics;

/// Events a watch buffers for its reader before it falls behind.
pub const WATCH_BUFFER: usize = 256;

/// Follows run `id`: a snapshot, its events, and its `finished` (the stream ends after it).
pub async fn follow_run(
    handle: &Handle,
    id: RunId,
) -> Result<mpsc::Receiver<Result<pb::RunEvent, Error>>, Error> {
    // Subscribe before taking the snapshot: every event after the snapshot's sequence number
    // is then in the receiver, and those before it are skipped.
    let mut rx = handle.subscribe();
    let first = snapshot(handle, id).await?;
    let handle = handle.clone();
    let (tx, out) = mpsc::channel(WATCH_BUFFER);
    let wanted = id.to_string();
    tokio::spawn(async move {
        let _watching = handle.metrics().watching();
        let (mut seq, summary) = first;
        // Every watch begins with a snapshot; an ended run's is followed by its `finished`.
        if !send_snapshot(&tx, seq, summary, true).await {
            return;
        }
        loop {
            match rx.recv().await {
                Ok(p) => {
                    if p.seq <= seq || p.run_id() != wanted {
                        continue;
                    }
                    seq = p.seq;
                    let end = matches!(p.event, pb::run_event::Event::Finished(_));
                    if !send(&handle, &tx, &p).await || end {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    warn!(run = %id, skipped = n, "watch fell behind; sending a new snapshot");
                    handle.metrics().watch_resynced();
                    rx = handle.subscribe();
                    match snapshot(&handle, id).await {
                        Ok((s, summary)) => {
                            seq = s;
                            if !send_snapshot(&tx, seq, summary, false).await {
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
    let mut rx = handle.subscribe();
    let handle = handle.clone();
    let (tx, out) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let _watching = handle.metrics().watching();
        loop {
            let seen = match rx.recv().await {
                Ok(p) => {
                    handle
                        .metrics()
                        .event_lag_seconds
                        .observe(p.at.elapsed().as_secs_f64());
                    Seen::Event(p)
                }
                Err(RecvError::Lagged(_)) => {
                    handle.metrics().watch_resynced();
                    rx = handle.subscribe();
                    Seen::Resync
                }
                Err(RecvError::Closed) => return,
            };
            if tx.send(seen).await.is_err() {
                return;
            }
        }
    });
    out
}

async fn send(handle: &Handle, tx: &mpsc::Sender<Result<pb::RunEvent, Error>>, p: &Published) -> bool {
    handle.metrics().event_lag_seconds.observe(metrics::since(p.at));
    tx.send(Ok(pb::RunEvent {
        seq: p.seq,
        event: Some(p.event.clone()),
    }))
    .await
    .is_ok()
}

/// Sends a snapshot, and `finished` when the run has ended (after the snapshot when `both`,
/// instead of it otherwise). False when the stream is over.
async fn send_snapshot(
    tx: &mpsc::Sender<Result<pb::RunEvent, Error>>,
    seq: u64,
    summary: pb::RunSummary,
    both: bool,
) -> bool {
    use pb::run_event::Event;
    let ended = RunStatus::from_wire(summary.status).is_some_and(RunStatus::is_terminal);
    let mut events = Vec::with_capacity(2);
    if !ended || both {
        events.push(Event::Snapshot(summary.clone()));
    }
    if ended {
        events.push(Event::Finished(summary));
    }
    for event in events {
        if tx
            .send(Ok(pb::RunEvent {
                seq,
                event: Some(event),
            }))
            .await
            .is_err()
        {
            return false;
        }
    }
    !ended
}

/// The run's summary with the sequence number of the last event it reflects.
async fn snapshot(handle: &Handle, id: RunId) -> Result<(u64, pb::RunSummary), Error> {
    let h = handle.clone();
    // Runs on the actor thread: the events of earlier batches are published (`last_seq`) and
    // those of earlier messages in this batch will be numbered next, so the sum is exactly the
    // number of the last event this summary reflects.
    handle
        .call(move |core, _| Ok((h.last_seq() + core.pending_events() as u64, core.summary(id)?)))
        .await
}
