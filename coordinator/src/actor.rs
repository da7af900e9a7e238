//! The scheduler actor: one thread owns the [`Core`] (and through it the database connection)
//! and runs the messages that service handlers send it, one at a time. Handlers never lock
//! scheduling state; they await a reply.
//!
//! Group commit: the actor takes every message that is waiting (up to [`MAX_BATCH`]) and runs
//! them inside one database transaction, each in its own savepoint, rolled back with the
//! events it produced when the message fails (see `core/atomic.rs`: a failed message changes
//! neither the disk nor memory). Only after the transaction committed does it copy what changed
//! into the read side's [`LiveView`], send the replies and publish what the core produced: run
//! events go to one broadcast channel (the coordinator's internal event stream, which watch
//! streams follow), and new work wakes the `AcquireShard` calls that are waiting for it. So a
//! reply, an event and a read always describe durable state. If a commit fails (or a savepoint
//! cannot be closed) the core's memory no longer matches the disk, so the process stops and a
//! restart reloads the store (fail-stop).
//!
//! Events go to the broadcast channel through a publisher thread, in order, so that the
//! scheduler never waits on the channel's lock (which watchers on low-priority threads take).
//!
//! The actor only runs what changes state; reads, and watches' snapshots, go to the read side
//! (`read.rs`, `watch.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use shardgate_common::{Error, pb};
use tokio::sync::{Notify, broadcast, oneshot};
use tracing::{error, info};

use crate::core::Core;
use crate::metrics::{self, Metrics};
use crate::model::Now;
use crate::read::LiveView;

/// Runs on the core and returns the reply to send once the batch is durable.
type Job = Box<dyn FnOnce(&mut Core, Now) -> Reply + Send>;
type Reply = Box<dyn FnOnce() + Send>;

/// Most messages in one group commit.
pub const MAX_BATCH: usize = 512;

/// One published event, numbered in the order the core produced it.
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: u64,
    pub event: pb::run_event::Event,
    /// When it was published, for the event-stream lag.
    pub at: Instant,
    /// The event as a run's server-sent events show it (its whole frame), made once for every
    /// watcher that asks.
    pub sse: std::sync::OnceLock<bytes::Bytes>,
    /// The event as the light stream of every run shows it (its whole frame), made once.
    pub sse_light: std::sync::OnceLock<bytes::Bytes>,
    /// The event as a `RunEvent` message's bytes, made once for every gRPC watcher.
    pub wire: std::sync::OnceLock<bytes::Bytes>,
}

impl Published {
    /// The event as a `RunEvent` message's bytes (encoded by the first watcher that asks).
    pub fn wire(&self) -> &bytes::Bytes {
        self.wire.get_or_init(|| {
            use prost::Message;
            let e = pb::RunEvent {
                seq: self.seq,
                event: Some(self.event.clone()),
            };
            bytes::Bytes::from(e.encode_to_vec())
        })
    }

    /// The run the event is about.
    pub fn run_id(&self) -> &str {
        use pb::run_event::Event;
        match &self.event {
            Event::Snapshot(s) | Event::Finished(s) | Event::Progress(s) => &s.run_id,
            Event::TestFinished(t) => &t.run_id,
        }
    }
}

/// A cheap, cloneable handle to the actor.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Job>,
    events: broadcast::Sender<Arc<Published>>,
    work: Arc<Notify>,
    seq: Arc<AtomicU64>,
    deploys: Arc<Notify>,
    live: Arc<RwLock<LiveView>>,
    metrics: Arc<Metrics>,
    /// Cancelled when the coordinator begins to stop: every wait on it ends then.
    closing: tokio_util::sync::CancellationToken,
    /// Counts the runs that ended, bumped once their `finished` events are on the event
    /// stream (see [`Handle::run_ends`]).
    ends: tokio::sync::watch::Receiver<u64>,
    /// The trace exporter, when an OTLP endpoint is configured.
    tracer: Option<crate::otlp::Tracer>,
}

impl Handle {
    /// Sends the spans still queued for the trace collector, waiting at most `limit`.
    pub async fn flush_traces(&self, limit: Duration) {
        if let Some(t) = &self.tracer {
            t.flush(limit).await;
        }
    }

    /// Ends every call that waits on the coordinator, now and from now on: watches and
    /// `AcquireShard` long polls get `UNAVAILABLE`, the coordinator is shutting down. A server
    /// stopping gracefully waits for its open calls, and a watch of a run would otherwise hold
    /// it until the run ends, an idle worker's long poll for up to its wait.
    pub fn begin_shutdown(&self) {
        self.closing.cancel();
    }

    /// Completes once [`Handle::begin_shutdown`] was called.
    pub fn shutting_down(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.closing.clone().cancelled_owned()
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live state the actor publishes after each commit, for the read side.
    pub fn live(&self) -> Arc<RwLock<LiveView>> {
        self.live.clone()
    }

    /// Completes when a deploy may be waiting (a permit is kept if nobody waits yet).
    pub async fn deploy_added(&self) {
        self.deploys.notified().await
    }

    /// Runs `f` on the core and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Core, Now) -> Result<T, Error> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |core, now| {
            let result = core.atomically(|c| f(c, now));
            Box::new(move || {
                // The caller may have gone away; nothing to do then.
                let _ = reply.send(result);
            })
        });
        self.tx
            .send(job)
            .map_err(|_| Error::Unavailable("the scheduler has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the scheduler has stopped".into()))?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }

    /// Changes each time a run ends, after its `finished` event is on the event stream, so a
    /// watch that waits between bursts can send a verdict without waiting.
    pub fn run_ends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ends.clone()
    }

    /// The sequence number of the last event numbered (published, or on its way to the
    /// broadcast channel through the publisher thread).
    pub fn last_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Completes when new work may be available. Create it before asking for work, so that
    /// work queued in between is not missed.
    pub fn work_notify(&self) -> Arc<Notify> {
        self.work.clone()
    }
}

/// Events the broadcast channel holds by default for its slowest watcher.
pub const EVENT_BUFFER: usize = 16 * 1024;

/// Starts the actor thread. It stops when every [`Handle`] is dropped.
pub fn spawn(core: Core, tick: Duration) -> Handle {
    spawn_with(core, tick, EVENT_BUFFER)
}

/// [`spawn`] with an event stream that holds `event_buffer` events for its slowest watcher.
pub fn spawn_with(core: Core, tick: Duration, event_buffer: usize) -> Handle {
    spawn_traced(core, tick, event_buffer, None).expect("no endpoint to check")
}

/// [`spawn_with`], exporting each run's trace to the OTLP/gRPC collector at `otlp` (see
/// [`crate::otlp`]; the core must have been opened with `CoreConfig::trace`).
pub fn spawn_traced(
    core: Core,
    tick: Duration,
    event_buffer: usize,
    otlp: Option<&crate::otlp::OtlpConfig>,
) -> Result<Handle, String> {
    let metrics = Arc::new(Metrics::new());
    let tracer = otlp
        .map(|to| crate::otlp::Tracer::start(to, metrics.trace_spans_dropped.clone()))
        .transpose()?;
    let (tx, rx) = mpsc::channel::<Job>();
    let (events, _) = broadcast::channel(event_buffer.max(1));
    let (ended, ends) = tokio::sync::watch::channel(0u64);
    let handle = Handle {
        tx,
        events,
        work: Arc::new(Notify::new()),
        seq: Arc::new(AtomicU64::new(0)),
        deploys: Arc::new(Notify::new()),
        live: Arc::new(RwLock::new(core.live_view())),
        metrics,
        closing: Default::default(),
        ends,
        tracer,
    };
    let h = handle.clone();
    // Events reach the broadcast channel through a thread of their own: the channel's lock is
    // also taken by watchers, some on low-priority threads, and the scheduler must never wait
    // for one of those to be scheduled again. It ends when the scheduler does.
    let (publish, to_publish) = mpsc::channel::<Vec<Arc<Published>>>();
    let events = h.events;
    std::thread::Builder::new()
        .name("shardgate-publish".into())
        .spawn(move || {
            for batch in to_publish {
                let mut finished = false;
                for p in batch {
                    finished |= matches!(p.event, pb::run_event::Event::Finished(_));
                    // No subscriber is fine: nobody is watching.
                    let _ = events.send(p);
                }
                if finished {
                    ended.send_modify(|n| *n += 1);
                }
            }
        })
        .expect("failed to spawn the event publisher thread");
    // The thread holds only the parts it publishes to, not a sender, so dropping every handle
    // ends it.
    let out = Outputs {
        publish,
        work: h.work,
        seq: h.seq,
        deploys: h.deploys,
        live: h.live,
        metrics: h.metrics,
        trace: h.tracer,
    };
    std::thread::Builder::new()
        .name("shardgate-scheduler".into())
        .spawn(move || run(core, rx, tick, out))
        .expect("failed to spawn the scheduler thread");
    Ok(handle)
}

/// Where the actor publishes what its batches produced.
struct Outputs {
    /// To the publisher thread, in order.
    publish: mpsc::Sender<Vec<Arc<Published>>>,
    work: Arc<Notify>,
    seq: Arc<AtomicU64>,
    deploys: Arc<Notify>,
    live: Arc<RwLock<LiveView>>,
    metrics: Arc<Metrics>,
    trace: Option<crate::otlp::Tracer>,
}

fn run(mut core: Core, rx: mpsc::Receiver<Job>, tick: Duration, out: Outputs) {
    let mut next_tick = Instant::now() + tick;
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    // Whether a run's shard list in the live view waits for its next rebuild.
    let mut stale_shards = false;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Err(e) = core.begin_batch() {
            fail_stop(&e.to_string());
        }
        if let Some(job) = first {
            replies.push(job(&mut core, Now::real()));
            while replies.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => replies.push(job(&mut core, Now::real())),
                    Err(_) => break,
                }
            }
        }
        if Instant::now() >= next_tick {
            if let Err(e) = core.tick(Now::real()) {
                error!(error = %e, "scheduler tick failed");
            }
            next_tick = Instant::now() + tick;
        }
        if let Some(why) = core.poisoned() {
            fail_stop(why);
        }
        let committing = Instant::now();
        if let Err(e) = core.commit_batch() {
            fail_stop(&e.to_string());
        }
        out.metrics.commit_seconds.observe(metrics::since(committing));
        let mut effects = core.take_effects();
        out.metrics.committed(&effects.events, &effects.counts);
        if let Some(t) = &out.trace {
            let mut traced = std::mem::take(&mut effects.traced);
            traced.extend(effects.events.iter().filter_map(|e| match e {
                pb::run_event::Event::Finished(s) => Some(crate::otlp::Traced::Run(s.clone())),
                _ => None,
            }));
            if !traced.is_empty() {
                t.send(traced);
            }
        }
        if !effects.runs_changed.is_empty()
            || !effects.workers_changed.is_empty()
            || !effects.events.is_empty()
        {
            let mut view = out.live.write().unwrap_or_else(|p| p.into_inner());
            stale_shards |= core.refresh_live(&mut view, &effects.runs_changed, &effects.workers_changed);
            if stale_shards {
                stale_shards = core.refresh_stale_shards(&mut view);
            }
            // The events about to be published are numbered from here; only this thread
            // numbers them.
            view.seq = out.seq.load(Ordering::SeqCst) + effects.events.len() as u64;
        } else if stale_shards {
            // A shard list left behind by a busy moment catches up once it is due.
            let mut view = out.live.write().unwrap_or_else(|p| p.into_inner());
            stale_shards = core.refresh_stale_shards(&mut view);
        }
        for reply in replies.drain(..) {
            reply();
        }
        if !effects.events.is_empty() {
            let batch: Vec<_> = effects
                .events
                .into_iter()
                .map(|event| {
                    Arc::new(Published {
                        seq: out.seq.fetch_add(1, Ordering::SeqCst) + 1,
                        event,
                        at: Instant::now(),
                        sse: std::sync::OnceLock::new(),
                        sse_light: std::sync::OnceLock::new(),
                        wire: std::sync::OnceLock::new(),
                    })
                })
                .collect();
            // The publisher outlives the scheduler loop; a send fails only at exit.
            let _ = out.publish.send(batch);
        }
        if effects.work_added {
            out.work.notify_waiters();
        }
        if effects.deploy_added {
            out.deploys.notify_one();
        }
    }
    info!("scheduler stopped");
}

/// The store failed to make a batch durable: memory is ahead of the disk. Stopping the process
/// is the only safe move; a restart reloads the truth from the store.
fn fail_stop(error: &str) -> ! {
    error!(
        error,
        "failed to commit to the store; stopping so a restart can reload it"
    );
    std::process::exit(70);
}
