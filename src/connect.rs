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
pub async fn connect(conn: &Connection) -> anyhow::Result<Channel> {
    let endpoint = shardgate_common::tls::endpoint(&conn.coordinator, &conn.credential.tls())
        .map_err(anyhow::Error::msg)?;
    connect_endpoint(endpoint, &conn.coordinator, conn.credential.secret()?.as_deref()).await
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
