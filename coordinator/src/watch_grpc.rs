//! `WatchRun` over gRPC with every published event encoded once for all its watchers, as the
//! server-sent events are rendered once: the run service's other methods go to the generated
//! service, `WatchRun` to a response written here.
//!
//! A watch costs the threads that serve the workers' calls as little as it can: its task (the
//! snapshot, following the event stream, picking out its run's events) runs on threads of its
//! own at the lowest CPU priority, and each burst it hands over reaches the gRPC connection as
//! one chunk of ready-framed messages (a 5-byte prefix and the event's shared bytes each), not
//! as hundreds of messages that tonic's encoder would take one by one. Measured with
//! `shardgate-bench watchers --kind grpc`: a hundred gRPC watchers of a busy run cost the
//! hand-outs in front of them much less than when each event went through tonic's encoder on
//! the serving threads.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use shardgate_common::pb;
use shardgate_common::pb::run_service_server::RunServiceServer;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::server::NamedService;

use shardgate_common::limits::MAX_MESSAGE_BYTES;

use crate::service::Services;
use crate::watch::Followed;

const WATCH_RUN: &str = "/shardgate.v1.RunService/WatchRun";

/// The run service, with `WatchRun` answered from pre-encoded events.
#[derive(Clone)]
pub struct RunServiceWithWatch {
    inner: RunServiceServer<Services>,
    services: Services,
    /// Where watches run: threads at the lowest CPU priority.
    watches: tokio::runtime::Handle,
}

impl RunServiceWithWatch {
    pub fn new(
        inner: RunServiceServer<Services>,
        services: Services,
        watches: tokio::runtime::Handle,
    ) -> Self {
        Self {
            inner,
            services,
            watches,
        }
    }
}

impl NamedService for RunServiceWithWatch {
    const NAME: &'static str = <RunServiceServer<Services> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for RunServiceWithWatch
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_RUN {
            return tower::Service::call(&mut self.inner, req);
        }
        let (services, watches) = (self.services.clone(), self.watches.clone());
        Box::pin(async move {
            Ok(match watch(services, watches, req).await {
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Answers one `WatchRun`: its request read, its watch started on the watch threads, and a
/// response whose body is the watch's bursts.
async fn watch<B>(
    services: Services,
    watches: tokio::runtime::Handle,
    req: http::Request<B>,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let message = read_request(body).await?;
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    // The watch's own task is spawned by `follow_run` on the runtime it is called from.
    let rx = watches
        .spawn(async move { services.follow_run(request).await })
        .await
        .map_err(|e| Status::unavailable(format!("the watch could not start: {e}")))??;
    let mut response = http::Response::new(tonic::body::Body::new(WatchBody { rx, ended: false }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The request's one message: a 5-byte prefix (not compressed, its length) and a
/// `WatchRunRequest`.
async fn read_request<B>(body: B) -> Result<pb::WatchRunRequest, Status>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let bytes = http_body_util::Limited::new(body, MAX_MESSAGE_BYTES + 5)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("failed to read the WatchRunRequest: {e}")))?
        .to_bytes();
    let Some((prefix, message)) = bytes.split_at_checked(5) else {
        return Err(Status::invalid_argument(
            "the WatchRun call carried no request message",
        ));
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "a compressed WatchRunRequest: this coordinator takes requests uncompressed",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len != message.len() {
        return Err(Status::invalid_argument(format!(
            "the WatchRun call carried {} bytes after its prefix, which announces {len}: one request message expected",
            message.len()
        )));
    }
    pb::WatchRunRequest::decode(message)
        .map_err(|e| Status::invalid_argument(format!("malformed WatchRunRequest: {e}")))
}

/// A watch's response body: each burst one chunk of framed messages, then the call's status
/// as trailers (an error the watch ended with, or OK when its run finished).
struct WatchBody {
    rx: mpsc::Receiver<Result<crate::watch::Burst, shardgate_common::Error>>,
    ended: bool,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(self.rx.poll_recv(cx)) {
            Some(Ok(burst)) => return Poll::Ready(Some(Ok(Frame::data(framed(&burst))))),
            Some(Err(e)) => Status::from(e),
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsayable) = status.add_header(&mut trailers) {
            // Only a message that cannot be a header gets here: the code alone then.
            Status::new(unsayable.code(), "")
                .add_header(&mut trailers)
                .map_err(|_| Status::internal("the watch's status could not be written"))?;
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// A burst as gRPC messages back to back, each with its prefix (not compressed, its length).
fn framed(burst: &[Followed]) -> Bytes {
    let messages: Vec<Bytes> = burst.iter().map(encoded).collect();
    let mut out = BytesMut::with_capacity(messages.iter().map(|m| m.len() + 5).sum());
    for m in messages {
        out.put_u8(0);
        out.put_u32(m.len() as u32);
        out.put(m);
    }
    out.freeze()
}

/// A followed event's message bytes: a published event's are made once and shared.
fn encoded(f: &Followed) -> Bytes {
    match f {
        Followed::Shared(p) => p.wire().clone(),
        Followed::Own(e) => Bytes::from(e.encode_to_vec()),
    }
}

/// The worker service on the watch port: every call is refused with a status that says where
/// workers connect. (A worker's connection is how its death is noticed, and its calls must not
/// wait behind watchers on low-priority threads.)
#[derive(Debug, Clone, Copy)]
pub struct NoWorkersHere;

impl NamedService for NoWorkersHere {
    const NAME: &'static str =
        <pb::worker_service_server::WorkerServiceServer<Services> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for NoWorkersHere {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(Status::unimplemented(
            "this is the coordinator's watch port (--watch-addr), for dashboards and other watchers: workers connect to its gRPC address (--grpc-addr)",
        )
        .into_http()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames a client's decoder reads back: prefix, length, message, for each event.
    #[test]
    fn a_burst_is_its_messages_each_with_its_prefix() {
        let events: Vec<Followed> = (1..=3)
            .map(|seq| Followed::Own(Box::new(pb::RunEvent { seq, event: None })))
            .collect();
        let mut bytes = framed(&events);
        let mut seen = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0, "no message is compressed");
            let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            let message = bytes.slice(5..5 + len);
            seen.push(pb::RunEvent::decode(message).unwrap().seq);
            bytes = bytes.slice(5 + len..);
        }
        assert_eq!(seen, [1, 2, 3]);
    }
}
