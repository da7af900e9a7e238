//! The gRPC services. Each handler checks and parses its request, then sends what changes
//! state to the scheduler actor and what only reads to the read side; none of them holds
//! scheduling state. Errors go through the one mapping in `shardgate_common::error`.

use std::pin::Pin;
use std::time::Duration;

use shardgate_common::pb::dashboard_service_server::DashboardService;
use shardgate_common::pb::gate_service_server::GateService;
use shardgate_common::pb::run_service_server::RunService;
use shardgate_common::pb::worker_service_server::WorkerService;
use shardgate_common::{AttemptId, RunId, WorkerId, pb};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::actor::Handle;
use crate::auth::caller;
use crate::read::ReadSide;
use crate::store::Reads;

/// Longest time an `AcquireShard` call waits for work.
pub const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Services {
    handle: Handle,
    reads: ReadSide,
    /// The store's read connections, for planning large submissions off the actor.
    store: std::sync::Arc<dyn Reads + Send + Sync>,
    /// Which connection each worker last called on (see `liveness`).
    peers: std::sync::Arc<crate::liveness::Peers>,
}

impl std::fmt::Debug for dyn Reads + Send + Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reads")
    }
}

impl Services {
    pub fn new(handle: Handle, reads: ReadSide, store: std::sync::Arc<dyn Reads + Send + Sync>) -> Self {
        Self {
            handle,
            reads,
            store,
            peers: Default::default(),
        }
    }

    /// The record of which connection each worker called on.
    pub fn peers(&self) -> std::sync::Arc<crate::liveness::Peers> {
        self.peers.clone()
    }

    /// What a `WatchRun` call follows (see `watch::follow_run`).
    pub async fn follow_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<crate::watch::Burst, shardgate_common::Error>>, Status>
    {
        let id = run_id(&req.into_inner().run_id)?;
        Ok(crate::watch::follow_run(&self.handle, &self.reads, id).await?)
    }
}

fn run_id(s: &str) -> Result<RunId, Status> {
    Ok(RunId::parse_field("run_id", s)?)
}

fn worker_id(s: &str) -> Result<WorkerId, Status> {
    Ok(WorkerId::parse_field("worker_id", s)?)
}

fn attempt_id(s: &str) -> Result<AttemptId, Status> {
    Ok(AttemptId::parse_field("attempt_id", s)?)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RunService for Services {
    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let who = caller(&req);
        let mut req = req.into_inner();
        if who.known() {
            // Who asked is who the credential says, not what the request claims.
            req.requested_by = who.name;
        }
        let run =
            crate::submit::submit(&self.handle, self.store.clone(), &self.reads.background(), req).await?;
        Ok(Response::new(pb::SubmitRunResponse {
            run_id: run.run_id.clone(),
            run: Some(run),
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::GetRunResponse>, Status> {
        let req = req.into_inner();
        let id = run_id(&req.run_id)?;
        let resp = self.reads.get_run(id, req.include_results).await?;
        Ok(Response::new(resp))
    }

    type WatchRunStream = EventStream;

    /// The coordinator answers `WatchRun` with pre-encoded events (`watch_grpc.rs`); this is
    /// the same stream for a server made of the generated service alone.
    async fn watch_run(&self, req: Request<pb::WatchRunRequest>) -> Result<Response<EventStream>, Status> {
        let rx = self.follow_run(req).await?;
        Ok(Response::new(Box::pin(crate::watch::messages(
            rx,
            crate::watch::Followed::to_wire,
        ))))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let who = caller(&req);
        let req = req.into_inner();
        let id = run_id(&req.run_id)?;
        let run = self
            .handle
            .call(move |core, now| core.cancel_as(id, &req.reason, &who, now))
            .await?;
        Ok(Response::new(pb::CancelRunResponse { run: Some(run) }))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let limit = req.into_inner().limit;
        let runs = self.reads.list_runs(limit).await?;
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }
}

#[tonic::async_trait]
impl WorkerService for Services {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let resp = self
            .handle
            .call(move |core, now| core.register_as(req, &who, now))
            .await?;
        if let Ok(w) = resp.worker_id.parse() {
            self.peers.seen(peer, w);
        }
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let w = worker_id(&req.worker_id)?;
        self.peers.seen(peer, w);
        Ok(Response::new(
            self.handle
                .call(move |core, now| {
                    core.authorize_worker(w, &who, false)?;
                    let resp = core.heartbeat(w, &req.attempt_ids, now)?;
                    core.set_unavailable(w, &req.unavailable_runners)?;
                    core.set_draining(w, req.draining);
                    Ok(resp)
                })
                .await?,
        ))
    }

    async fn acquire_shard(
        &self,
        req: Request<pb::AcquireShardRequest>,
    ) -> Result<Response<pb::AcquireShardResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let w = worker_id(&req.worker_id)?;
        self.peers.seen(peer, w);
        self.handle
            .call({
                let who = who.clone();
                move |core, _| core.authorize_worker(w, &who, false)
            })
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_ACQUIRE_WAIT);
        let notify = self.handle.work_notify();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let asked = std::time::Instant::now();
            if let Some(shard) = self.handle.call(move |core, now| core.acquire(w, now)).await? {
                self.handle
                    .metrics()
                    .handout_seconds
                    .observe(crate::metrics::since(asked));
                return Ok(Response::new(pb::AcquireShardResponse { shard: Some(shard) }));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(Response::new(pb::AcquireShardResponse { shard: None }));
                }
                _ = self.handle.shutting_down() => {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
            }
        }
    }

    async fn report_results(
        &self,
        req: Request<pb::ReportResultsRequest>,
    ) -> Result<Response<pb::ReportResultsResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let w = worker_id(&req.worker_id)?;
        self.peers.seen(peer, w);
        let a = attempt_id(&req.attempt_id)?;
        let arrived = std::time::Instant::now();
        let resp = self
            .handle
            .call(move |core, now| {
                core.authorize_worker(w, &who, false)?;
                core.report_proven(w, a, req.results, &req.tested_commit, now)
            })
            .await?;
        self.handle
            .metrics()
            .report_seconds
            .observe(crate::metrics::since(arrived));
        Ok(Response::new(resp))
    }

    async fn report_discovery(
        &self,
        req: Request<pb::ReportDiscoveryRequest>,
    ) -> Result<Response<pb::ReportDiscoveryResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let w = worker_id(&req.worker_id)?;
        self.peers.seen(peer, w);
        let a = attempt_id(&req.attempt_id)?;
        self.handle
            .call(move |core, now| {
                core.authorize_worker(w, &who, false)?;
                core.discovery_proven(w, a, req.tests, &req.error, &req.tested_commit, now)
            })
            .await?;
        Ok(Response::new(pb::ReportDiscoveryResponse {}))
    }

    async fn finish_shard(
        &self,
        req: Request<pb::FinishShardRequest>,
    ) -> Result<Response<pb::FinishShardResponse>, Status> {
        let who = caller(&req);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let w = worker_id(&req.worker_id)?;
        self.peers.seen(peer, w);
        let a = attempt_id(&req.attempt_id)?;
        Ok(Response::new(
            self.handle
                .call(move |core, now| {
                    core.authorize_worker(w, &who, false)?;
                    if req.unknown_revision && !req.error.is_empty() && !req.draining {
                        core.finish_unknown_revision(w, a, &req.error, now)
                    } else {
                        core.finish(w, a, &req.error, req.draining, now)
                    }
                })
                .await?,
        ))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let who = caller(&req);
        let w = worker_id(&req.into_inner().worker_id)?;
        self.handle
            .call(move |core, now| {
                core.authorize_worker(w, &who, true)?;
                core.deregister(w, now)
            })
            .await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}

#[tonic::async_trait]
impl DashboardService for Services {
    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let include_gone = req.into_inner().include_gone;
        let workers = self.reads.list_workers(include_gone).await?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn run_progress(
        &self,
        req: Request<pb::RunProgressRequest>,
    ) -> Result<Response<pb::RunProgressResponse>, Status> {
        let req = req.into_inner();
        let run = if req.run_id.is_empty() {
            None
        } else {
            Some(run_id(&req.run_id)?)
        };
        Ok(Response::new(self.reads.progress(run, req.include_ended).await?))
    }
}

#[tonic::async_trait]
impl GateService for Services {
    async fn list_flaky(
        &self,
        req: Request<pb::ListFlakyRequest>,
    ) -> Result<Response<pb::ListFlakyResponse>, Status> {
        let req = req.into_inner();
        let tests = self.reads.list_flaky(req.suite, req.limit).await?;
        Ok(Response::new(pb::ListFlakyResponse { tests }))
    }

    async fn add_quarantine(
        &self,
        req: Request<pb::AddQuarantineRequest>,
    ) -> Result<Response<pb::QuarantineEntry>, Status> {
        let who = caller(&req);
        let mut req = req.into_inner();
        if who.known() {
            req.added_by = who.name;
        }
        Ok(Response::new(
            self.handle
                .call(move |core, now| core.add_quarantine(req, now))
                .await?,
        ))
    }

    async fn remove_quarantine(
        &self,
        req: Request<pb::RemoveQuarantineRequest>,
    ) -> Result<Response<pb::RemoveQuarantineResponse>, Status> {
        let req = req.into_inner();
        let removed = self
            .handle
            .call(move |core, _| core.remove_quarantine(&req.suite, &req.test_id))
            .await?;
        Ok(Response::new(pb::RemoveQuarantineResponse { removed }))
    }

    async fn list_deploys(
        &self,
        req: Request<pb::ListDeploysRequest>,
    ) -> Result<Response<pb::ListDeploysResponse>, Status> {
        let req = req.into_inner();
        let run = (!req.run_id.is_empty())
            .then(|| RunId::parse_field("run_id", &req.run_id))
            .transpose()?;
        Ok(Response::new(
            self.reads
                .list_deploys(req.limit, run, crate::model::Now::real())
                .await?,
        ))
    }

    async fn list_quarantine(
        &self,
        req: Request<pb::ListQuarantineRequest>,
    ) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        let suite = req.into_inner().suite;
        let entries = self.reads.list_quarantine(suite).await?;
        Ok(Response::new(pb::ListQuarantineResponse { entries }))
    }
}
