//! The coordinator's HTTP side: probes (`/healthz` answered by the scheduler thread, so it
//! proves that thread alive; `/readyz`), Prometheus `/metrics`, the JSON API, server-sent
//! events, and the web dashboard (`web.rs`). Everything but `/healthz` is served by the read
//! side, never by the scheduler. Errors are JSON of one shape everywhere:
//! `{"error": "<what went wrong>"}`, unknown routes included.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use shardgate_common::report::RunReport;
use shardgate_common::{Error, RunId, RunStatus, pb};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::actor::Handle;
use crate::model::Now;
use crate::read::ReadSide;
use crate::store::RunFilter;
use crate::watch::{self, Followed, Seen};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub handle: Handle,
    pub reads: ReadSide,
    /// True once the coordinator is shutting down: not ready.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub fn router(handle: Handle, reads: ReadSide, stopping: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/junit", get(get_run_junit))
        .route("/api/runs/{id}/progress", get(run_progress))
        .route("/api/runs/{id}/events", get(run_events))
        .route("/api/events", get(all_events))
        .route("/api/workers", get(list_workers))
        .route("/api/deploys", get(list_deploys))
        .route("/api/flaky", get(list_flaky))
        .route("/api/quarantine", get(list_quarantine))
        .merge(crate::web::routes())
        .fallback(not_found)
        .with_state(AppState {
            handle,
            reads,
            stopping,
        })
}

/// An error as the JSON API answers it.
pub struct ApiError(pub Error);

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match &self.0 {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::FailedPrecondition(_) => StatusCode::CONFLICT,
            Error::ResourceExhausted(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(serde_json::json!({ "error": self.0.to_string() })),
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// A gRPC call sent to the HTTP port gets a gRPC answer that says so (any other answer reads
/// as a garbled stream to a gRPC client).
pub async fn refuse_grpc(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return next.run(req).await;
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/grpc"),
            (
                header::HeaderName::from_static("grpc-status"),
                "12", // UNIMPLEMENTED
            ),
            (
                header::HeaderName::from_static("grpc-message"),
                "this is the coordinator's HTTP port (--http-addr); gRPC is served on --grpc-addr",
            ),
        ],
    )
        .into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(Error::NotFound {
        what: "route",
        id: uri.path().to_owned(),
    })
}

async fn healthz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    // Answering proves the scheduler thread is alive, not just the HTTP server.
    app.handle.call(|_, _| Ok(())).await?;
    Ok("ok\n")
}

/// Ready: not shutting down, the scheduler answers, the store can be read.
async fn readyz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if *app.stopping.borrow() {
        return Err(Error::Unavailable("shutting down".into()).into());
    }
    app.handle.call(|_, _| Ok(())).await?;
    app.reads.store_ready().await?;
    Ok(Json(serde_json::json!({ "ready": true })))
}

async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let gauges = app.reads.gauges().await?;
    let text = app.handle.metrics().render(&gauges);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Which runs a page of runs shows.
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    pub suite: Option<String>,
    /// A run status: queued, running, passed, failed, cancelled, errored.
    pub state: Option<String>,
    /// Who requested the runs.
    pub who: Option<String>,
    /// Runs created before this time (ms since the epoch): the next page.
    pub before: Option<u64>,
    pub limit: Option<u32>,
}

impl RunsQuery {
    pub fn filter(&self) -> Result<RunFilter, Error> {
        let nonempty = |s: &Option<String>| s.as_ref().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let state = nonempty(&self.state);
        if let Some(s) = &state {
            s.parse::<RunStatus>().map_err(|_| {
                Error::invalid(
                    "state",
                    format!(
                        "'{s}' is not a run state; use one of {}",
                        RunStatus::ALL
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        }
        Ok(RunFilter {
            suite: nonempty(&self.suite),
            status: state,
            requested_by: nonempty(&self.who),
            before_ms: self.before,
            limit: self.limit.unwrap_or(50),
        })
    }
}

async fn list_runs(
    State(app): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Vec<RunReport>>, ApiError> {
    let runs = app.reads.search_runs(q.filter()?).await?;
    Ok(Json(runs.iter().map(|r| RunReport::new(r, &[])).collect()))
}

async fn get_run(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    // Rendered off the async workers: a large run's JSON is megabytes.
    let body = app.reads.run_report_json(id).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The run as JUnit XML (Surefire's dialect), for CI pages that read JUnit.
async fn get_run_junit(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    let xml = app.reads.run_junit(id).await?;
    Ok(([(header::CONTENT_TYPE, "application/xml; charset=utf-8")], xml).into_response())
}

/// A shard as JSON.
pub fn shard_json(s: &pb::ShardProgress) -> serde_json::Value {
    serde_json::json!({
        "attempt_id": s.attempt_id,
        "shard_id": s.shard_id,
        "worker": s.worker,
        "tests": s.tests,
        "done": s.done,
        "started_at_ms": s.started_at_ms,
        "ended_at_ms": s.ended_at_ms,
        "state": s.state,
        "current_test": s.current_test,
        "estimated_ms": s.estimated_ms,
    })
}

/// A run's progress: its summary and every shard, ended ones included (its timeline).
async fn run_progress(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    let (p, deploy) = app.reads.progress_and_deploy(id).await?;
    let run = p.runs.first().map(|r| RunReport::new(r, &[]));
    Ok(Json(serde_json::json!({
        "run": run,
        "shards": p.shards.iter().map(shard_json).collect::<Vec<_>>(),
        "deploy": deploy.as_ref().map(deploy_json),
    })))
}

/// One run event as JSON, for server-sent events.
pub fn event_json(seq: u64, event: &pb::run_event::Event) -> (&'static str, serde_json::Value) {
    use pb::run_event::Event;
    match event {
        Event::Snapshot(s) => ("snapshot", run_json(seq, s)),
        Event::Progress(s) => ("progress", run_json(seq, s)),
        Event::Finished(s) => ("finished", run_json(seq, s)),
        Event::TestFinished(t) => (
            "test_finished",
            serde_json::json!({
                "seq": seq,
                "run_id": t.run_id,
                "result": t.result.as_ref().map(shardgate_common::report::TestReport::from),
                "counts": t.counts.as_ref().map(shardgate_common::report::Counts::from),
            }),
        ),
    }
}

fn run_json(seq: u64, s: &pb::RunSummary) -> serde_json::Value {
    serde_json::json!({ "seq": seq, "run": RunReport::new(s, &[]) })
}

/// One server-sent event, framed: `event`, `id` when given, one `data` line per line of
/// `data`, and the blank line that ends it.
pub fn sse_frame(name: &str, id: Option<u64>, data: &str) -> Bytes {
    let mut f = BytesMut::with_capacity(data.len() + name.len() + 32);
    f.put_slice(b"event: ");
    f.put_slice(name.as_bytes());
    f.put_u8(b'\n');
    if let Some(id) = id {
        f.put_slice(format!("id: {id}\n").as_bytes());
    }
    for line in data.split('\n') {
        f.put_slice(b"data: ");
        f.put_slice(line.trim_end_matches('\r').as_bytes());
        f.put_u8(b'\n');
    }
    f.put_u8(b'\n');
    f.freeze()
}

/// What an event stream sends when it has been quiet this long, so that proxies keep it open.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A `text/event-stream` response of pre-framed events. The frames waiting when the stream is
/// polled leave together, as one chunk (a burst of a watch is one write, not one per event);
/// a comment goes out after a quiet [`SSE_KEEP_ALIVE`].
fn sse<S>(frames: S) -> Response
where
    S: tokio_stream::Stream<Item = Bytes> + Send + 'static,
{
    let chunks = futures_util::StreamExt::ready_chunks(frames, 512)
        .map(|frames| match <[Bytes; 1]>::try_from(frames) {
            Ok([one]) => one,
            Err(many) => {
                let mut chunk = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
                for f in &many {
                    chunk.put_slice(f);
                }
                chunk.freeze()
            }
        })
        .timeout(SSE_KEEP_ALIVE)
        .map(|chunk| Ok::<_, Infallible>(chunk.unwrap_or_else(|_| Bytes::from_static(b": keep-alive\n\n"))));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

/// Server-sent events of one run: a snapshot, then its events, then `finished`.
async fn run_events(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    let rx = watch::follow_run(&app.handle, &app.reads, id).await?;
    let frames = ReceiverStream::new(rx).map(|r| match r {
        Ok(burst) => {
            let frames: Vec<Bytes> = burst.iter().map(followed_frame).collect();
            frames.concat().into()
        }
        Err(e) => sse_frame(
            "error",
            None,
            &serde_json::json!({ "error": e.to_string() }).to_string(),
        ),
    });
    Ok(sse(frames))
}

/// A followed event's frame: a published event's is made once, for every watcher of it.
fn followed_frame(f: &Followed) -> Bytes {
    match f {
        Followed::Shared(p) => p
            .sse
            .get_or_init(|| {
                let (name, data) = event_json(p.seq, &p.event);
                sse_frame(name, Some(p.seq), &data.to_string())
            })
            .clone(),
        Followed::Own(ev) => match &ev.event {
            Some(e) => {
                let (name, data) = event_json(ev.seq, e);
                sse_frame(name, Some(ev.seq), &data.to_string())
            }
            None => Bytes::from_static(b": empty\n\n"),
        },
    }
}

/// Server-sent events of every run, light: each event names its run and carries its counts
/// (no output); `resync` when the watcher fell behind and should read afresh.
async fn all_events(State(app): State<AppState>) -> Response {
    let rx = watch::follow_all(&app.handle);
    let frames = ReceiverStream::new(rx).map(|seen| match seen {
        Seen::Event(p) => p
            .sse_light
            .get_or_init(|| {
                use pb::run_event::Event;
                let (name, counts, status) = match &p.event {
                    Event::TestFinished(t) => ("test_finished", t.counts, None),
                    Event::Snapshot(s) => ("snapshot", s.counts, Some(s.status)),
                    Event::Progress(s) => ("progress", s.counts, Some(s.status)),
                    Event::Finished(s) => ("finished", s.counts, Some(s.status)),
                };
                let data = serde_json::json!({
                    "seq": p.seq,
                    "run_id": p.run_id(),
                    "status": status.and_then(RunStatus::from_wire),
                    "counts": counts.as_ref().map(shardgate_common::report::Counts::from),
                });
                sse_frame(name, Some(p.seq), &data.to_string())
            })
            .clone(),
        Seen::Resync => sse_frame("resync", None, "{}"),
    });
    sse(frames)
}

#[derive(Deserialize)]
struct SuiteQuery {
    suite: Option<String>,
    limit: Option<u32>,
}

async fn list_flaky(
    State(app): State<AppState>,
    Query(q): Query<SuiteQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let suite = q.suite.unwrap_or_else(|| "default".into());
    let tests = app.reads.list_flaky(suite, q.limit.unwrap_or(50)).await?;
    Ok(Json(
        serde_json::to_value(tests).map_err(|e| Error::Internal(e.to_string()))?,
    ))
}

async fn list_quarantine(
    State(app): State<AppState>,
    Query(q): Query<SuiteQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let suite = q.suite.unwrap_or_default();
    let entries = app.reads.list_quarantine(suite).await?;
    Ok(Json(
        serde_json::to_value(entries).map_err(|e| Error::Internal(e.to_string()))?,
    ))
}

/// A worker as JSON.
pub fn worker_json(w: &pb::WorkerInfo) -> serde_json::Value {
    serde_json::json!({
        "worker_id": w.worker_id,
        "name": w.name,
        "slots": w.slots,
        "busy_slots": w.busy_slots,
        "state": w.state,
        "draining": w.draining,
        "last_seen_ms": w.last_seen_ms,
        "labels": w.labels.iter().map(|l| (l.key.clone(), l.value.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "runners": w.runners.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        "unavailable_runners": w.unavailable_runners.iter().map(|u| (u.name.clone(), u.reason.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

#[derive(Deserialize)]
struct WorkersQuery {
    /// Also workers that left or were lost long ago (`gone`).
    include_gone: Option<bool>,
}

async fn list_workers(
    State(app): State<AppState>,
    Query(q): Query<WorkersQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let workers = app.reads.list_workers(q.include_gone.unwrap_or(false)).await?;
    Ok(Json(serde_json::Value::Array(
        workers.iter().map(worker_json).collect(),
    )))
}

/// A deploy as JSON.
pub fn deploy_json(d: &pb::Deploy) -> serde_json::Value {
    serde_json::json!({
        "deploy_id": d.deploy_id,
        "run_id": d.run_id,
        "suite": d.suite,
        "revision": d.revision,
        "requested_by": d.requested_by,
        "authors": d.authors,
        "state": d.state,
        "created_at_ms": d.created_at_ms,
        "started_at_ms": d.started_at_ms,
        "finished_at_ms": d.finished_at_ms,
        "detail": d.detail,
    })
}

#[derive(Deserialize)]
struct DeploysQuery {
    limit: Option<u32>,
    /// Only the deploy of this run.
    run: Option<String>,
}

/// The deploy board's data: the last deploy, how many today and this week, the log (or only
/// the deploy of `?run=`).
async fn list_deploys(
    State(app): State<AppState>,
    Query(q): Query<DeploysQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = q
        .run
        .as_deref()
        .map(|r| RunId::parse_field("run", r))
        .transpose()?;
    let d = app
        .reads
        .list_deploys(q.limit.unwrap_or(20), run, Now::real())
        .await?;
    Ok(Json(serde_json::json!({
        "last_started_at_ms": d.last_started_at_ms,
        "last_requested_by": d.last_requested_by,
        "last_day": d.last_day,
        "last_week": d.last_week,
        "deploys": d.deploys.iter().map(deploy_json).collect::<Vec<_>>(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_frame_has_its_name_id_one_data_line_per_line_and_a_blank_line() {
        assert_eq!(
            &sse_frame("progress", Some(7), r#"{"seq":7}"#)[..],
            b"event: progress\nid: 7\ndata: {\"seq\":7}\n\n"
        );
        // A line break in the data would end the field: each line is a `data` line of its
        // own, which a reader joins back with line breaks.
        assert_eq!(
            &sse_frame("error", None, "a\r\nb")[..],
            b"event: error\ndata: a\ndata: b\n\n"
        );
    }

    #[tokio::test]
    async fn frames_waiting_together_leave_as_one_chunk_in_order() {
        use http_body_util::BodyExt;
        let frames: Vec<Bytes> = (0..3)
            .map(|i| sse_frame("test_finished", Some(i), "{}"))
            .collect();
        let resp = sse(tokio_stream::iter(frames.clone()));
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, frames.concat(), "one chunk, in order");
        assert!(
            body.frame().await.is_none(),
            "and the stream ends with its events"
        );
    }
}
