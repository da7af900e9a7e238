//! Connecting to the coordinator and turning its refusals into errors that say what it said.

use std::time::Duration;

use anyhow::Context;
use shardgate_common::auth::AuthChannel;
use shardgate_common::pb::run_service_client::RunServiceClient;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

use crate::args::Connection;

/// The connection every client command uses: it sends the credential with each call.
pub type Channel = AuthChannel;

/// Connects to the coordinator `conn` names, with its credential.
///
/// Several comma-separated addresses are coordinators that share a PostgreSQL database: the
/// channel connects to the first that answers and follows the one that leads.
pub async fn connect(conn: &Connection) -> anyhow::Result<Channel> {
    let token = conn.credential.secret()?;
    let urls: Vec<&str> = conn
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let mut endpoints = Vec::new();
    for url in &urls {
        let endpoint =
            shardgate_common::tls::endpoint(url, &conn.credential.tls()).map_err(anyhow::Error::msg)?;
        endpoints.push((url.to_string(), endpoint));
    }
    if endpoints.len() <= 1 {
        let (url, endpoint) = endpoints
            .pop()
            .ok_or_else(|| anyhow::anyhow!("--coordinator names no address"))?;
        return connect_endpoint(endpoint, &url, token.as_deref()).await;
    }
    // The first that answers comes first; the others connect when calls move to them.
    let mut channels = Vec::new();
    let mut errors = Vec::new();
    for (url, endpoint) in endpoints {
        let endpoint = endpoint.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true);
        if channels.is_empty() {
            match endpoint.connect().await {
                Ok(ch) => channels.insert(0, (url, ch)),
                Err(e) => {
                    errors.push(format!("{url}: {e}"));
                    channels.push((url, endpoint.connect_lazy()));
                    continue;
                }
            }
        } else {
            channels.push((url, endpoint.connect_lazy()));
        }
    }
    anyhow::ensure!(
        errors.len() < urls.len(),
        "failed to connect to any coordinator: {}",
        errors.join("; ")
    );
    let channel = AuthChannel::following(channels, token.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid --token: {e}"))?;
    // A standby answers UNAVAILABLE and names the leader, which the channel then follows: one
    // cheap read per address finds it.
    for _ in 0..urls.len() {
        let asked = run_client(channel.clone())
            .list_runs(shardgate_common::pb::ListRunsRequest { limit: 1 })
            .await;
        match asked {
            Err(s) if s.code() == Code::Unavailable => continue,
            _ => break,
        }
    }
    Ok(channel)
}

/// Connects to a plaintext coordinator at `url` (the embedded one).
pub async fn connect_url(url: &str, token: Option<&str>) -> anyhow::Result<Channel> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).with_context(|| format!("invalid coordinator URL '{url}'"))?;
    connect_endpoint(endpoint, url, token).await
}

/// Connects eagerly, so an unreachable coordinator is reported at once and by address. The
/// channel reconnects by itself afterwards.
async fn connect_endpoint(endpoint: Endpoint, url: &str, token: Option<&str>) -> anyhow::Result<Channel> {
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("failed to connect to the coordinator at {url}"))?;
    AuthChannel::new(channel, token).map_err(|e| anyhow::anyhow!("invalid --token: {e}"))
}

pub(crate) fn run_client(ch: Channel) -> RunServiceClient<Channel> {
    RunServiceClient::new(ch)
        .max_decoding_message_size(shardgate_common::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shardgate_common::limits::MAX_MESSAGE_BYTES)
}

/// Turns a refusal into an error that says what the coordinator said.
pub(crate) fn refused(what: &str, s: Status) -> anyhow::Error {
    match s.code() {
        Code::Unavailable => anyhow::anyhow!("{what}: the coordinator is unreachable: {}", s.message()),
        Code::Unauthenticated => anyhow::anyhow!("{what}: not authenticated: {}", s.message()),
        Code::PermissionDenied => anyhow::anyhow!("{what}: permission denied: {}", s.message()),
        // An HTTP server answered without gRPC: most likely the coordinator's HTTP port.
        _ if s.message().starts_with("grpc-status header missing")
            || s.message().starts_with("this is the coordinator's HTTP port") =>
        {
            anyhow::anyhow!(
                "{what}: that address answers HTTP but not gRPC ({}): is it the coordinator's HTTP port (--http-addr)? Give its gRPC address (--grpc-addr, port 7070 by default)",
                s.message()
            )
        }
        _ => anyhow::anyhow!("{what}: {}", s.message()),
    }
}

pub(crate) fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}
