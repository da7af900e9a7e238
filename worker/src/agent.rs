//! The worker agent: registration, the heartbeat loop, one loop per slot that acquires and runs
//! shards, and the phased shutdown (stop taking work, drain under a grace period, then kill what
//! is left and hand it back).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::RngExt;
use shardgate_common::auth::AuthChannel;
use shardgate_common::labels::{self, Labels};
use shardgate_common::pb::worker_service_client::WorkerServiceClient;
use shardgate_common::{AttemptId, WorkerId, pb};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::runners::{Proof, RunnerError, Runners, TestRun};

/// How long an `AcquireShard` call may wait on the coordinator for work.
const ACQUIRE_WAIT: Duration = Duration::from_secs(10);
/// Most results in one report.
const MAX_RESULTS_PER_REPORT: usize = 256;
/// How long a report keeps being retried through coordinator outages before the attempt is
/// given up (its lease will have run out by then anyway).
const REPORT_RETRY_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    /// The coordinator's gRPC URL, e.g. `http://coordinator:7070`; several, comma-separated,
    /// for coordinators that share a PostgreSQL database (calls go to the one that leads).
    pub coordinator: String,
    pub name: String,
    pub slots: u32,
    pub labels: Labels,
    pub runners: Runners,
    /// On shutdown, how long running tests may go on before they are killed and handed back.
    pub drain_grace: Duration,
    /// Faults to inject, for the chaos suite; none by default.
    pub faults: Faults,
    /// The worker's credential (sent as a bearer token), when the coordinator needs one.
    pub token: Option<String>,
    /// How the coordinator's TLS is checked, and this worker's certificate under mTLS.
    pub tls: shardgate_common::tls::ClientTls,
    /// Patterns masked in test output and details before they leave the worker.
    pub redact: Redact,
    /// Check each runner (directory, program, listing) at start-up in the background; the
    /// ones that fail are reported unavailable until a re-check passes.
    pub start_check: bool,
    /// Where to serve `/healthz` and `/readyz` for probes, when at all.
    pub health: Option<std::net::SocketAddr>,
}

/// Secrets a test may print (`DB_PASSWORD=…`), masked on the worker so they never reach the
/// coordinator, its database or anyone who reads a run.
#[derive(Debug, Clone, Default)]
pub struct Redact {
    patterns: Vec<regex::Regex>,
}

impl Redact {
    /// Compiles `patterns` (regular expressions); a bad one is refused with its text.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| regex::Regex::new(p).map_err(|e| format!("invalid --redact pattern '{p}': {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// `text` with every match replaced by `[redacted]`.
    pub fn apply(&self, text: String) -> String {
        let mut text = text;
        for p in &self.patterns {
            if p.is_match(&text) {
                text = p.replace_all(&text, "[redacted]").into_owned();
            }
        }
        text
    }
}

/// Faults the worker injects into its own traffic so the chaos suite can check that the
/// coordinator shrugs them off. Probabilities are per report.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Send a report a second time once it was acknowledged.
    pub duplicate_reports: f64,
    /// Hold a report back for `delay` before sending it.
    pub delay_reports: f64,
    pub delay: Duration,
}

impl Faults {
    fn roll(p: f64) -> bool {
        p > 0.0 && rand::rng().random_bool(p.min(1.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid coordinator URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("the coordinator refused the registration: {0}")]
    Refused(String),
    #[error("the worker has no runners: give --exec-root or --runners")]
    NoRunners,
    #[error("{0}")]
    Health(String),
}

struct Shared {
    cfg: Config,
    client: WorkerServiceClient<AuthChannel>,
    worker_id: RwLock<Option<WorkerId>>,
    heartbeat: RwLock<Duration>,
    /// Serialises re-registration so that one lost registration leads to one new one.
    registering: tokio::sync::Mutex<()>,
    /// Live attempts and the token that stops each.
    active: Mutex<HashMap<AttemptId, CancellationToken>>,
    /// Fires when the worker stops taking work.
    draining: CancellationToken,
    /// Fires when running tests must be killed.
    kill: CancellationToken,
    /// Runners that failed the worker's own check, and why; sent with every heartbeat.
    unavailable: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    fn id(&self) -> Option<WorkerId> {
        *self.worker_id.read().expect("worker id lock")
    }

    /// Registers, retrying transient failures with backoff until it works or the worker drains.
    /// `stale` is the id that was found to be unknown; when another task already replaced it,
    /// nothing is done.
    async fn register(&self, stale: Option<WorkerId>) -> Result<(), AgentError> {
        let _guard = self.registering.lock().await;
        if self.id() != stale {
            return Ok(());
        }
        let req = pb::RegisterRequest {
            name: self.cfg.name.clone(),
            slots: self.cfg.slots,
            labels: labels::to_wire(&self.cfg.labels),
            runners: self
                .cfg
                .runners
                .iter()
                .map(|(name, r)| pb::RunnerInfo {
                    name: name.clone(),
                    kind: r.kind().to_wire(),
                })
                .collect(),
        };
        let mut backoff = Backoff::new();
        let mut failures = 0u32;
        loop {
            match self.client.clone().register(req.clone()).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let id = WorkerId::parse_field("worker_id", &resp.worker_id)
                        .map_err(|e| AgentError::Refused(e.to_string()))?;
                    *self.heartbeat.write().expect("heartbeat lock") =
                        Duration::from_millis(resp.heartbeat_interval_ms.max(100));
                    *self.worker_id.write().expect("worker id lock") = Some(id);
                    info!(worker = %id, name = %self.cfg.name, slots = self.cfg.slots, "registered");
                    return Ok(());
                }
                Err(s) if is_transient(&s) => {
                    // Said at once, then every 30th try: an operator sees why nothing happens
                    // without a line per retry.
                    if failures.is_multiple_of(30) {
                        warn!(coordinator = %self.cfg.coordinator, error = %s.message(), "coordinator not reachable; retrying registration");
                    } else {
                        debug!(error = %s.message(), "coordinator not reachable; retrying registration");
                    }
                    failures += 1;
                    if !backoff.wait(&self.draining).await {
                        return Ok(());
                    }
                }
                Err(s) => return Err(AgentError::Refused(s.message().to_owned())),
            }
        }
    }
}

/// Runs the worker until `shutdown` completes, then drains.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    if cfg.runners.is_empty() {
        return Err(AgentError::NoRunners);
    }
    // Several addresses (`a,b,c`) are coordinators on one database: calls go to the leader.
    let mut channels = Vec::new();
    for url in cfg
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        let endpoint = shardgate_common::tls::endpoint(url, &cfg.tls).map_err(|reason| AgentError::Url {
            url: url.to_owned(),
            reason,
        })?;
        // A partition is silence, not an error: HTTP/2 pings find a dead connection within a
        // few seconds, and no call may wait forever (the longest is the acquire long-poll).
        let channel = endpoint
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .timeout(ACQUIRE_WAIT + Duration::from_secs(10))
            .connect_lazy();
        channels.push((url.to_owned(), channel));
    }
    let channel =
        AuthChannel::following(channels, cfg.token.as_deref()).map_err(|reason| AgentError::Url {
            url: cfg.coordinator.clone(),
            reason,
        })?;
    let shared = Arc::new(Shared {
        client: WorkerServiceClient::new(channel),
        worker_id: RwLock::new(None),
        heartbeat: RwLock::new(Duration::from_secs(2)),
        registering: tokio::sync::Mutex::new(()),
        active: Mutex::new(HashMap::new()),
        draining: CancellationToken::new(),
        kill: CancellationToken::new(),
        unavailable: Mutex::new(BTreeMap::new()),
        cfg,
    });
    tokio::pin!(shutdown);
    let health_stop = CancellationToken::new();
    let _stop_health = health_stop.clone().drop_guard();
    if let Some(addr) = shared.cfg.health {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Health(format!("failed to listen on {addr} for probes: {e}")))?;
        info!(addr = %listener.local_addr().unwrap_or(addr), "probes served on /healthz and /readyz");
        let state: Arc<dyn crate::health::Readiness> = shared.clone();
        tokio::spawn(crate::health::serve(listener, state, health_stop.clone()));
    }

    tokio::select! {
        r = shared.register(None) => r?,
        _ = &mut shutdown => return Ok(()),
    }

    let heartbeat_done = CancellationToken::new();
    let hb = tokio::spawn(heartbeat_loop(shared.clone(), heartbeat_done.clone()));
    if shared.cfg.start_check {
        tokio::spawn(start_check_loop(shared.clone()));
    }
    let mut slots = JoinSet::new();
    for slot in 0..shared.cfg.slots {
        let span = info_span!("slot", slot);
        slots.spawn(slot_loop(shared.clone()).instrument(span));
    }

    shutdown.await;
    info!(
        grace_ms = shared.cfg.drain_grace.as_millis() as u64,
        "draining: no new shards"
    );
    shared.draining.cancel();
    let drained = tokio::time::timeout(shared.cfg.drain_grace, async {
        while slots.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("drain grace ran out; killing running tests and handing them back");
        shared.kill.cancel();
        while slots.join_next().await.is_some() {}
    }
    heartbeat_done.cancel();
    let _ = hb.await;
    if let Some(id) = shared.id() {
        let req = pb::DeregisterRequest {
            worker_id: id.to_string(),
        };
        match tokio::time::timeout(Duration::from_secs(5), shared.client.clone().deregister(req)).await {
            Ok(Ok(_)) => info!(worker = %id, "deregistered"),
            Ok(Err(s)) => warn!(error = %s.message(), "failed to deregister"),
            Err(_) => warn!("failed to deregister: the coordinator did not answer"),
        }
    }
    Ok(())
}

async fn heartbeat_loop(shared: Arc<Shared>, done: CancellationToken) {
    loop {
        let interval = *shared.heartbeat.read().expect("heartbeat lock");
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(id) = shared.id() else { continue };
        let attempts: Vec<String> = shared
            .active
            .lock()
            .expect("active lock")
            .keys()
            .map(ToString::to_string)
            .collect();
        let unavailable = shared
            .unavailable
            .lock()
            .expect("unavailable lock")
            .iter()
            .map(|(name, reason)| pb::UnavailableRunner {
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect();
        let req = pb::HeartbeatRequest {
            worker_id: id.to_string(),
            attempt_ids: attempts,
            unavailable_runners: unavailable,
            draining: shared.draining.is_cancelled(),
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(interval.max(Duration::from_secs(1)) * 2);
        match shared.client.clone().heartbeat(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                {
                    let active = shared.active.lock().expect("active lock");
                    for a in &resp.cancel_attempt_ids {
                        if let Some(token) = a.parse().ok().and_then(|a: AttemptId| active.get(&a)) {
                            info!(attempt = %a, "coordinator stopped the attempt");
                            token.cancel();
                        }
                    }
                }
                if resp.reregister {
                    warn!(worker = %id, "coordinator does not know this worker; registering again");
                    if let Err(e) = shared.register(Some(id)).await {
                        warn!(error = %e, "re-registration failed");
                    }
                }
            }
            Err(s) => debug!(error = %s.message(), "heartbeat failed"),
        }
    }
}

impl crate::health::Readiness for Shared {
    fn ready(&self) -> Result<(), &'static str> {
        if self.draining.is_cancelled() {
            Err("draining")
        } else if self.id().is_none() {
            Err("not registered with the coordinator yet")
        } else {
            Ok(())
        }
    }
}

/// How often runners that failed the start-up check are checked again.
const RECHECK: Duration = Duration::from_secs(60);

/// Checks every runner (directory, program, listing) once, then the failed ones every
/// [`RECHECK`] until they pass or the worker drains; the heartbeat carries what failed.
async fn start_check_loop(shared: Arc<Shared>) {
    use crate::check::{self, Depth};
    let mut pending: Vec<String> = shared.cfg.runners.keys().cloned().collect();
    while !pending.is_empty() {
        let mut failed = Vec::new();
        for name in &pending {
            let runner = &shared.cfg.runners[name];
            let report = tokio::select! {
                _ = shared.draining.cancelled() => return,
                r = check::check(name, runner, Depth::Light, "HEAD", Duration::from_secs(300)) => r,
            };
            let mut unavailable = shared.unavailable.lock().expect("unavailable lock");
            if report.ok {
                if unavailable.remove(name).is_some() {
                    info!(runner = %name, "runner passed its check again; available");
                }
            } else {
                warn!(runner = %name, problem = %report.summary, "runner failed its check; the coordinator will give it no shards (see shardgate-worker --check)");
                unavailable.insert(name.clone(), shared.cfg.redact.apply(report.summary));
                failed.push(name.clone());
            }
        }
        pending = failed;
        if pending.is_empty() {
            return;
        }
        tokio::select! {
            _ = shared.draining.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

async fn slot_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    while !shared.draining.is_cancelled() {
        let Some(id) = shared.id() else {
            if !backoff.wait(&shared.draining).await {
                return;
            }
            continue;
        };
        let req = pb::AcquireShardRequest {
            worker_id: id.to_string(),
            wait_ms: ACQUIRE_WAIT.as_millis() as u64,
        };
        let mut client = shared.client.clone();
        let resp = tokio::select! {
            _ = shared.draining.cancelled() => return,
            r = client.acquire_shard(req) => r,
        };
        match resp {
            Ok(resp) => {
                backoff.reset();
                if let Some(shard) = resp.into_inner().shard {
                    let span = info_span!("shard", attempt = %shard.attempt_id, run = %shard.run_id);
                    run_shard(&shared, id, shard).instrument(span).await;
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                warn!(worker = %id, "coordinator does not know this worker; registering again");
                if let Err(e) = shared.register(Some(id)).await {
                    warn!(error = %e, "re-registration failed");
                    if !backoff.wait(&shared.draining).await {
                        return;
                    }
                }
            }
            Err(s) => {
                debug!(error = %s.message(), "acquire failed");
                if !backoff.wait(&shared.draining).await {
                    return;
                }
            }
        }
    }
}

/// Runs one shard to its end and tells the coordinator.
async fn run_shard(shared: &Shared, worker: WorkerId, shard: pb::Shard) {
    let Ok(attempt) = shard.attempt_id.parse::<AttemptId>() else {
        warn!(attempt = %shard.attempt_id, "coordinator sent a bad attempt id");
        return;
    };
    let token = shared.kill.child_token();
    shared
        .active
        .lock()
        .expect("active lock")
        .insert(attempt, token.clone());
    let proof = Proof::pinned(&shard.tested_commit);
    let mut unknown_revision = false;
    let error = match shared.cfg.runners.get(&shard.runner) {
        None => format!("worker {} has no runner '{}'", shared.cfg.name, shard.runner),
        Some(runner) if shard.kind == pb::ShardKind::Discover as i32 => {
            let (tests, error) = match runner
                .discover_for_run(&shard.revision, &shard.run_id, &proof)
                .await
            {
                Ok(t) => (t, String::new()),
                Err(e) => (Vec::new(), e.to_string()),
            };
            info!(tests = tests.len(), "discovered tests");
            let req = pb::ReportDiscoveryRequest {
                worker_id: worker.to_string(),
                attempt_id: attempt.to_string(),
                tests,
                error,
                tested_commit: proof.get(),
            };
            let client = shared.client.clone();
            if let Err(s) = retry(&token, || {
                let mut c = client.clone();
                let r = req.clone();
                async move { c.report_discovery(r).await }
            })
            .await
            {
                warn!(error = %s.message(), "failed to report discovery");
            }
            String::new()
        }
        Some(runner) => {
            let timeout = Duration::from_millis(
                shard
                    .policy
                    .as_ref()
                    .map(|p| p.test_timeout_ms)
                    .unwrap_or(0)
                    .max(1),
            );
            let (tx, rx) = mpsc::channel(64);
            let reporter = report_loop(shared, worker, attempt, token.clone(), rx, &proof);
            let running = runner.run_shard_proven(
                &shard.tests,
                &shard.revision,
                &shard.run_id,
                timeout,
                &token,
                tx,
                &proof,
            );
            let (ran, ()) = tokio::join!(running, reporter);
            if shared.kill.is_cancelled() {
                "worker shutting down".to_owned()
            } else if let Err(e) = ran {
                unknown_revision = matches!(e, RunnerError::UnknownRevision(_));
                let e = e.to_string();
                warn!(error = %e.lines().next().unwrap_or_default(), "runner failed; handing the shard back");
                e
            } else {
                String::new()
            }
        }
    };
    shared.active.lock().expect("active lock").remove(&attempt);
    let req = pb::FinishShardRequest {
        worker_id: worker.to_string(),
        attempt_id: attempt.to_string(),
        error,
        draining: shared.kill.is_cancelled(),
        unknown_revision,
    };
    let never = CancellationToken::new();
    let client = shared.client.clone();
    if let Err(s) = retry(&never, || {
        let mut c = client.clone();
        let r = req.clone();
        async move { c.finish_shard(r).await }
    })
    .await
    {
        debug!(error = %s.message(), "failed to finish shard");
    }
}

/// Reports each result as the runner produces it. A refusal (the attempt is no longer live)
/// stops the attempt: its tests belong to someone else now.
async fn report_loop(
    shared: &Shared,
    worker: WorkerId,
    attempt: AttemptId,
    token: CancellationToken,
    mut rx: mpsc::Receiver<(String, TestRun)>,
    proof: &Proof,
) {
    while let Some(first) = rx.recv().await {
        // Results that finished while the last report was in flight go together.
        let mut batch = vec![first];
        while batch.len() < MAX_RESULTS_PER_REPORT {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let req = pb::ReportResultsRequest {
            worker_id: worker.to_string(),
            attempt_id: attempt.to_string(),
            results: batch
                .into_iter()
                .map(|(test_id, run)| pb::TestResult {
                    test_id,
                    outcome: run.outcome.to_wire(),
                    duration_ms: run.duration.as_millis() as u64,
                    attempts: 0,
                    worker: shared.cfg.name.clone(),
                    output: shared.cfg.redact.apply(run.output),
                    detail: shared.cfg.redact.apply(run.detail),
                    quarantined: false,
                })
                .collect(),
            tested_commit: proof.get(),
        };
        let faults = &shared.cfg.faults;
        if Faults::roll(faults.delay_reports) {
            info!(
                delay_ms = faults.delay.as_millis() as u64,
                "fault: holding a report back"
            );
            tokio::time::sleep(faults.delay).await;
        }
        let client = shared.client.clone();
        let never = CancellationToken::new();
        let send = || {
            let mut c = client.clone();
            let r = req.clone();
            async move { c.report_results(r).await }
        };
        let mut sent = retry(&never, send).await;
        if sent.is_ok() && Faults::roll(faults.duplicate_reports) {
            let again = retry(&never, send).await;
            info!(accepted = ?again.as_ref().map(|r| r.accepted).ok(), "fault: sent a report twice");
            if let (Ok(first), Ok(second)) = (&mut sent, again) {
                first.stop |= second.stop;
            }
        }
        match sent {
            Ok(resp) if resp.stop => {
                info!("coordinator wants no more results from this attempt");
                token.cancel();
                return;
            }
            Ok(_) => {}
            Err(s) => {
                warn!(error = %s.message(), "result refused; stopping the attempt");
                token.cancel();
                return;
            }
        }
    }
}

/// gRPC codes that mean "try again": the coordinator is restarting or unreachable.
fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Internal
            | Code::Aborted
    )
}

/// Calls `f` until it succeeds, fails for good, `stop` fires or the retry budget is spent.
async fn retry<T, F, Fut>(stop: &CancellationToken, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let deadline = tokio::time::Instant::now() + REPORT_RETRY_FOR;
    let mut backoff = Backoff::new();
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if is_transient(&s) && tokio::time::Instant::now() < deadline => {
                if !backoff.wait(stop).await {
                    return Err(s);
                }
            }
            Err(s) => return Err(s),
        }
    }
}

/// Exponential backoff with full jitter, from 100 ms up to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// Sleeps for the next delay; false when `stop` fired first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let ms = rand::rng().random_range(self.next.as_millis() as u64 / 2..=self.next.as_millis() as u64);
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
        }
    }
}

#[cfg(test)]
mod redact_tests {
    use super::Redact;

    #[test]
    fn matches_are_masked_and_bad_patterns_refused() {
        let r = Redact::new(&["DB_PASSWORD=\\S+".into(), "sg_[0-9a-f]{64}".into()]).unwrap();
        let out = r.apply(format!(
            "connect DB_PASSWORD=hunter2 ok\ntoken sg_{}",
            "ab".repeat(32)
        ));
        assert_eq!(out, "connect [redacted] ok\ntoken [redacted]");
        assert_eq!(Redact::default().apply("as is".into()), "as is");
        assert!(
            Redact::new(&["(".into()])
                .unwrap_err()
                .contains("invalid --redact pattern '('")
        );
    }
}
