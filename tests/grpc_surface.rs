//! The coordinator's public surface beyond the run path: standard gRPC health and reflection
//! (so grpcurl and other languages' tooling work), the HTTP health and JSON endpoints, and
//! request-size limits.

mod harness;

use harness::Cluster;
use shardgate_common::pb;
use shardgate_common::pb::run_service_client::RunServiceClient;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn http_get(addr: &str, path: &str) -> (u16, String) {
    harness::http_get(addr, path).unwrap()
}

#[tokio::test]
async fn health_reflection_http_and_limits() {
    let cluster = Cluster::builder().workers(0).start();
    let channel = tonic::transport::Endpoint::from_shared(cluster.url())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "shardgate.v1.RunService",
        "shardgate.v1.WorkerService",
        "shardgate.v1.DashboardService",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "shardgate.v1.RunService",
        "shardgate.v1.WorkerService",
        "shardgate.v1.DashboardService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    let (code, body) = http_get(&cluster.http_addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = http_get(&cluster.http_addr, "/api/runs");
    assert_eq!((code, body.as_str()), (200, "[]"));
    let (code, body) = http_get(&cluster.http_addr, "/api/runs/nope");
    assert_eq!(code, 400);
    assert!(body.contains("'nope' is not a valid run id"), "{body}");

    // A request beyond the size limit is refused and the coordinator keeps serving.
    let mut runs = RunServiceClient::new(channel).max_encoding_message_size(usize::MAX);
    let huge = pb::SubmitRunRequest {
        suite: "s".into(),
        revision: "r".into(),
        runner: "exec".into(),
        tests: (0..1_400_000)
            .map(|i| format!("some/rather/long/path/to/a/test/number/{i:08}.sh"))
            .collect(),
        ..Default::default()
    };
    let err = runs.submit_run(huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    let listed = runs
        .list_runs(pb::ListRunsRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty());
}

/// A `SubmitRunRequest` whose `suite` (field 1) carries raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawSubmit {
    #[prost(bytes = "vec", tag = "1")]
    suite: Vec<u8>,
}

/// A gRPC client for hand-made requests (a `RawSubmit` where a method expects its own message).
async fn raw_client(cluster: &Cluster) -> tonic::client::Grpc<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(cluster.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    grpc
}

#[test]
fn invalid_utf8_in_a_request_is_an_invalid_argument_not_an_internal_error() {
    let cluster = Cluster::builder().workers(0).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut grpc = raw_client(&cluster).await;
        let codec = tonic_prost::ProstCodec::<RawSubmit, shardgate_common::pb::SubmitRunResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/shardgate.v1.RunService/SubmitRun");
        grpc.unary(
            tonic::Request::new(RawSubmit {
                suite: vec![0xff, 0xfe, b'x'],
            }),
            path,
            codec,
        )
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
}

#[tokio::test]
async fn a_watch_of_a_finished_run_begins_with_its_snapshot() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = harness::suite(&cluster.root, 2, &[], "0");
    // The client is another process: blocking on it here holds up nothing of ours.
    let run = cluster.run_tests(&tests, &[]).json()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut client = RunServiceClient::connect(cluster.url()).await.unwrap();
    let mut stream = client
        .watch_run(pb::WatchRunRequest { run_id: run })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        kinds.push(match ev.event.unwrap() {
            pb::run_event::Event::Snapshot(s) => format!("snapshot {}", s.counts.unwrap().passed),
            pb::run_event::Event::Finished(s) => format!("finished {}", s.counts.unwrap().passed),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(kinds, ["snapshot 2", "finished 2"]);
}

#[tokio::test]
async fn the_deploy_log_of_one_run_names_a_bad_run_id() {
    use shardgate_common::pb::gate_service_client::GateServiceClient;
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let mut gate = GateServiceClient::connect(cluster.url()).await.unwrap();
    let status = gate
        .list_deploys(pb::ListDeploysRequest {
            limit: 5,
            run_id: "not-a-run".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("run_id"), "{status:?}");
    // A well-formed id of a run that made no deploy: an empty list, the log's counts as ever.
    let none = gate
        .list_deploys(pb::ListDeploysRequest {
            limit: 5,
            run_id: shardgate_common::RunId::new().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.deploys.is_empty());
    assert_eq!((none.last_day, none.last_week), (0, 0));
}

/// `WatchRun` is answered outside tonic's generated service (pre-framed bursts on the watch
/// threads): its errors still reach a client as gRPC statuses that name the problem.
#[tokio::test]
async fn a_watch_of_an_unknown_or_malformed_run_is_a_clear_status() {
    let cluster = Cluster::builder().workers(0).start();
    let mut client = RunServiceClient::connect(cluster.url()).await.unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let status = client
        .watch_run(pb::WatchRunRequest {
            run_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains(&unknown), "{status:?}");
    let status = client
        .watch_run(pb::WatchRunRequest {
            run_id: "not-a-run".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("run_id"), "{status:?}");
    // A request that is not a WatchRunRequest at all.
    let mut grpc = raw_client(&cluster).await;
    let codec = tonic_prost::ProstCodec::<RawSubmit, pb::RunEvent>::default();
    let path = http::uri::PathAndQuery::from_static("/shardgate.v1.RunService/WatchRun");
    let status = grpc
        .server_streaming(
            tonic::Request::new(RawSubmit {
                suite: vec![0xff, 0xfe, b'x'],
            }),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("WatchRunRequest"), "{status:?}");
}
