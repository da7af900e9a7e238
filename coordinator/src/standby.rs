//! A standby coordinator: several coordinators share one PostgreSQL database, one leads and
//! the others wait to take over. A standby listens on its ports all along, so that callers
//! learn where the leader is: every gRPC call gets `UNAVAILABLE` with the leader's address in
//! its message and in the `x-shardgate-leader` header (workers and clients given several
//! addresses follow it); HTTP reads are redirected to the leader's HTTP address; `/healthz`
//! answers, `/readyz` does not (a load balancer sends nothing to a standby).
//!
//! Every quarter of a lease it asks for the lead again; once it has it, it stops answering
//! as a standby and serves as the leader on the same listening sockets, resuming every
//! unfinished run as a restart does.

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::store::postgres::Leader;

pub use shardgate_common::auth::LEADER_HEADER;

/// What a standby knows of the leader, refreshed each time it asks for the lead.
pub type KnownLeader = Arc<RwLock<Leader>>;

/// The standby's answer to any gRPC call.
fn grpc_refusal(leader: &Leader) -> Response {
    let message = format!(
        "this coordinator is a standby; the leader is {} at {}",
        leader.holder,
        if leader.grpc_addr.is_empty() {
            "an unknown address"
        } else {
            &leader.grpc_addr
        }
    );
    let mut r = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/grpc"),
            (
                header::HeaderName::from_static("grpc-status"),
                "14", // UNAVAILABLE: try again, elsewhere
            ),
        ],
    )
        .into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert(header::HeaderName::from_static("grpc-message"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&leader.grpc_addr) {
        h.insert(header::HeaderName::from_static(LEADER_HEADER), v);
    }
    r
}

/// The standby's answer on its gRPC port.
async fn on_grpc(State(leader): State<KnownLeader>, _req: Request) -> Response {
    let leader = leader.read().unwrap_or_else(|p| p.into_inner()).clone();
    grpc_refusal(&leader)
}

/// The standby's answer on its HTTP port.
async fn on_http(State((leader, https)): State<(KnownLeader, bool)>, req: Request) -> Response {
    let leader = leader.read().unwrap_or_else(|p| p.into_inner()).clone();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return grpc_refusal(&leader);
    }
    let body = |status: StatusCode| {
        (
            status,
            axum::Json(serde_json::json!({
                "error": format!("this coordinator is a standby; the leader is {}", leader.holder),
                "role": "standby",
                "leader": {
                    "holder": leader.holder,
                    "grpc_addr": leader.grpc_addr,
                    "http_addr": leader.http_addr,
                    "epoch": leader.epoch,
                },
            })),
        )
            .into_response()
    };
    match req.uri().path() {
        // Alive, but not ready: nothing should be sent here.
        "/healthz" => (StatusCode::OK, "standby\n").into_response(),
        "/readyz" => body(StatusCode::SERVICE_UNAVAILABLE),
        _ if req.method() == axum::http::Method::GET && !leader.http_addr.is_empty() => {
            let scheme = if https { "https" } else { "http" };
            let to = format!(
                "{scheme}://{}{}",
                leader.http_addr,
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")
            );
            match HeaderValue::from_str(&to) {
                Ok(v) => (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, v)]).into_response(),
                Err(_) => body(StatusCode::SERVICE_UNAVAILABLE),
            }
        }
        _ => body(StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// The standby's routers: one for the gRPC port, one for the HTTP port.
pub fn routers(leader: KnownLeader, https: bool) -> (axum::Router, axum::Router) {
    let grpc = axum::Router::new().fallback(on_grpc).with_state(leader.clone());
    let http = axum::Router::new().fallback(on_http).with_state((leader, https));
    (grpc, http)
}

/// A second handle on a listening socket: the standby answers on one while the other waits
/// for the leader's servers, so the port never closes on the way.
pub fn share(l: TcpListener) -> std::io::Result<(TcpListener, TcpListener)> {
    let std = l.into_std()?;
    let other = std.try_clone()?;
    Ok((TcpListener::from_std(std)?, TcpListener::from_std(other)?))
}
