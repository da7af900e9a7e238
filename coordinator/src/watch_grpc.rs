//! `WatchRun` over gRPC with every published event encoded once for all its watchers, as the
//! server-sent events are rendered once: the run service's other methods go to the generated
//! service, `WatchRun` to a stream of pre-encoded messages. So a hundred gRPC watchers of a
//! busy run cost the coordinator a hundred copies of each event's bytes, not a hundred clones
//! and encodings of it.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use shardgate_common::pb;
use shardgate_common::pb::run_service_server::RunServiceServer;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use shardgate_common::limits::MAX_MESSAGE_BYTES;

use crate::service::Services;
use crate::watch::Followed;

const WATCH_RUN: &str = "/shardgate.v1.RunService/WatchRun";

/// The run service, with `WatchRun` answered from pre-encoded events.
#[derive(Clone)]
pub struct RunServiceWithWatch {
    inner: RunServiceServer<Services>,
    services: Services,
}

impl RunServiceWithWatch {
    pub fn new(inner: RunServiceServer<Services>, services: Services) -> Self {
        Self { inner, services }
    }
}

impl NamedService for RunServiceWithWatch {
    const NAME: &'static str = <RunServiceServer<Services> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for RunServiceWithWatch
where
    B: Body + Send + 'static,
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
        let method = Watch(self.services.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(PreEncoded)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

struct Watch(Services);

type WatchStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Bytes, Status>> + Send>>;

impl ServerStreamingService<pb::WatchRunRequest> for Watch {
    type Response = Bytes;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchRunRequest>) -> Self::Future {
        let services = self.0.clone();
        Box::pin(async move {
            let rx = services.follow_run(request).await?;
            Ok(Response::new(
                Box::pin(crate::watch::messages(rx, encoded)) as WatchStream
            ))
        })
    }
}

/// A followed event's message bytes: a published event's are made once and shared.
fn encoded(f: &Followed) -> Bytes {
    match f {
        Followed::Shared(p) => p.wire().clone(),
        Followed::Own(e) => Bytes::from(e.encode_to_vec()),
    }
}

/// Encodes messages that are already encoded; decodes the request as prost does.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = pb::WatchRunRequest;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for PreEncoded {
    type Item = pb::WatchRunRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::WatchRunRequest>, Status> {
        pb::WatchRunRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed WatchRunRequest: {e}")))
    }
}
