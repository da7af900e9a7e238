//! The coordinator's HTTP side: `/healthz` (answered by the scheduler thread, so it proves that
//! thread alive) and a JSON API served by the read side, never by the scheduler. The dashboard
//! page and `/metrics` will hang off this router.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use shardgate_common::report::RunReport;
use shardgate_common::{Error, RunId};

use crate::actor::Handle;
use crate::read::ReadSide;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub handle: Handle,
    pub reads: ReadSide,
}

pub fn router(handle: Handle, reads: ReadSide) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/junit", get(get_run_junit))
        .route("/api/workers", get(list_workers))
        .route("/api/flaky", get(list_flaky))
        .route("/api/quarantine", get(list_quarantine))
        .with_state(AppState { handle, reads })
}

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::FailedPrecondition(_) => StatusCode::CONFLICT,
            Error::ResourceExhausted(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, Json(serde_json::json!({ "error": self.0.to_string() }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

async fn healthz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    // Answering proves the scheduler thread is alive, not just the HTTP server.
    app.handle.call(|_, _| Ok(())).await?;
    Ok("ok\n")
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
}

async fn list_runs(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<RunReport>>, ApiError> {
    let runs = app.reads.list_runs(q.limit.unwrap_or(50)).await?;
    Ok(Json(runs.iter().map(|r| RunReport::new(r, &[])).collect()))
}

async fn get_run(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    // Rendered off the async workers: a large run's JSON is megabytes.
    let body = app.reads.run_report_json(id).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The run as JUnit XML (Surefire's dialect), for CI pages that read JUnit.
async fn get_run_junit(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    let xml = app.reads.run_junit(id).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        xml,
    )
        .into_response())
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

async fn list_workers(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let workers = app.reads.list_workers(true).await?;
    let v: Vec<_> = workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "worker_id": w.worker_id,
                "name": w.name,
                "slots": w.slots,
                "busy_slots": w.busy_slots,
                "state": w.state,
                "last_seen_ms": w.last_seen_ms,
                "labels": w.labels.iter().map(|l| (l.key.clone(), l.value.clone())).collect::<std::collections::BTreeMap<_, _>>(),
                "runners": w.runners.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                "unavailable_runners": w.unavailable_runners.iter().map(|u| (u.name.clone(), u.reason.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    Ok(Json(serde_json::Value::Array(v)))
}
