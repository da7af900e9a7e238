//! Credentials per role on real processes: every role is refused the others' calls over gRPC
//! and HTTP; who acted is the credential, not what a request claims; a worker name and the
//! attempts of a worker belong to the identity that registered it; a failing suite stays red
//! and starts no deploy whatever a rogue worker reports; no secret reaches a log; and without
//! credentials the coordinator serves loopback only.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Cluster, bin, client, http_get_with, script, suite, wait_for};
use shardgate_common::auth::AuthChannel;
use shardgate_common::pb;
use shardgate_common::pb::worker_service_client::WorkerServiceClient;
use tonic::Code;

fn refused(r: &harness::Ran, why: &str) {
    assert_eq!(r.code, 2, "{why}: {}", r.stderr);
}

#[test]
fn each_role_is_refused_the_calls_of_the_others_over_grpc_and_http() {
    let cluster = Cluster::builder().workers(1).slots(2).with_tokens().start();
    let tests = suite(&cluster.root, 3, &[], "0");
    let file = cluster.dir.path().join("tests.txt");
    std::fs::write(&file, tests.join("\n")).unwrap();
    let run = |who: &str| {
        cluster.client_as(
            who,
            &[
                "run",
                "--runner",
                "exec",
                "--suite",
                "it",
                "--revision",
                "r1",
                "--requested-by",
                "mallory",
                "--json",
                "--tests-file",
                file.to_str().unwrap(),
            ],
        )
    };

    // No token, an unknown one: not authenticated.
    let r = cluster.client_as("", &["runs"]);
    refused(&r, "no token");
    assert!(
        r.stderr.contains("not authenticated") && r.stderr.contains("--token"),
        "{}",
        r.stderr
    );
    let r = client(&["runs", "--coordinator", &cluster.url(), "--token", "sg_nope"]);
    refused(&r, "unknown token");
    assert!(r.stderr.contains("unknown or malformed token"), "{}", r.stderr);

    // The worker credential does the worker service only.
    let r = cluster.client_as("fleet", &["runs"]);
    refused(&r, "a worker token reads");
    assert!(
        r.stderr.contains("permission denied") && r.stderr.contains("role 'worker'"),
        "{}",
        r.stderr
    );
    refused(&run("fleet"), "a worker token submits");

    // A viewer reads, and does nothing else.
    assert_eq!(cluster.client_as("board", &["runs", "--json"]).code, 0);
    refused(&run("board"), "a viewer submits");

    // A trigger submits; who asked is the token's name, whatever the request says.
    let r = run("ci");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["requested_by"], "ci");
    let run_id = report["run_id"].as_str().unwrap().to_owned();
    assert_eq!(cluster.client_as("board", &["status", &run_id, "--json"]).code, 0);
    // Watching is reading (WatchRun has a handler of its own, behind the same check).
    refused(&cluster.client_as("", &["watch", &run_id]), "no token watches");
    refused(
        &cluster.client_as("fleet", &["watch", &run_id]),
        "a worker token watches",
    );
    let watched = cluster.client_as("board", &["watch", &run_id, "--json"]);
    assert_eq!(watched.code, 0, "{}", watched.stderr);

    // Quarantine is the admin's, recorded under its name.
    let add = [
        "quarantine",
        "add",
        "--suite",
        "it",
        "t/000.sh",
        "--reason",
        "x",
        "--by",
        "mallory",
    ];
    refused(&cluster.client_as("ci", &add), "a trigger quarantines");
    refused(&cluster.client_as("board", &add), "a viewer quarantines");
    assert_eq!(cluster.client_as("ops", &add).code, 0);
    let list = cluster
        .client_as("board", &["quarantine", "list", "--json"])
        .json();
    assert_eq!(list[0]["added_by"], "ops");

    // HTTP: 401 without a token, 403 for the worker role, 200 for readers; health is open.
    let get = |path: &str, who: Option<&str>| {
        let token = who.map(|w| cluster.secrets[w].as_str());
        http_get_with(&cluster.http_addr, path, token).unwrap()
    };
    assert_eq!(get("/api/runs", None).0, 401);
    assert_eq!(
        get(&format!("/api/runs/{run_id}"), None).0,
        401,
        "output needs a reader"
    );
    assert_eq!(get("/api/runs", Some("fleet")).0, 403);
    assert_eq!(get("/api/workers", Some("board")).0, 200);
    assert_eq!(get(&format!("/api/runs/{run_id}/junit"), Some("ci")).0, 200);
    assert_eq!(get("/healthz", None).0, 200);

    // No secret in any log.
    let logs = cluster.logs();
    for (name, secret) in &cluster.secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "the secret of '{name}' is in a log"
        );
    }
}

#[test]
fn a_trigger_cancels_only_its_own_runs_and_the_cancel_names_who() {
    let cluster = Cluster::builder().workers(1).slots(1).with_tokens().start();
    let tests = suite(&cluster.root, 4, &[], "5");
    let file = cluster.dir.path().join("tests.txt");
    std::fs::write(&file, tests.join("\n")).unwrap();
    let follower = Command::new(bin("shardgate"))
        .args([
            "run",
            "--runner",
            "exec",
            "--suite",
            "it",
            "--revision",
            "r1",
            "--json",
        ])
        .arg("--tests-file")
        .arg(&file)
        .args(["--coordinator", &cluster.url(), "--token", &cluster.secrets["ci"]])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_id = wait_for("the run to start", Duration::from_secs(30), || {
        let runs = cluster.client_as("board", &["runs", "--json"]).json();
        runs.as_array()?.first()?["run_id"].as_str().map(str::to_owned)
    });
    let r = cluster.client_as("other-ci", &["cancel", &run_id, "--reason", "mine now"]);
    refused(&r, "another trigger cancels");
    assert!(r.stderr.contains("may cancel only its own runs"), "{}", r.stderr);
    let r = cluster.client_as("ci", &["cancel", &run_id, "--reason", "superseded"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = follower.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "cancelled");
    assert_eq!(report["message"], "cancelled: by ci: superseded");
}

/// The watch port (`--watch-addr`) serves readers with the credentials the gRPC port asks for,
/// and refuses every worker call with a status that says where workers connect.
#[test]
fn the_watch_port_serves_readers_with_the_same_credentials_and_no_worker_calls() {
    let cluster = Cluster::builder()
        .workers(1)
        .slots(2)
        .with_tokens()
        .coordinator_args(&["--watch-addr", "127.0.0.1:0"])
        .start();
    let watch_port = cluster
        .watch_addr
        .clone()
        .expect("the ready line names the watch port");
    let watch_url = format!("http://{watch_port}");
    let tests = suite(&cluster.root, 3, &[], "0");
    let run_args = cluster.run_args(&tests, &[]);
    let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let on_watch_port = |token: &str, args: &[&str]| {
        let mut argv = args.to_vec();
        argv.extend(["--coordinator", &watch_url]);
        if !token.is_empty() {
            argv.extend(["--token", token]);
        }
        client(&argv)
    };
    // A run submitted on the watch port (the run service is there too) and followed there.
    let ran = on_watch_port(&cluster.secrets["ci"], &run_args);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let report = ran.json();
    assert_eq!(report["verdict"], "passed");
    assert_eq!(report["requested_by"], "ci");
    let run_id = report["run_id"].as_str().unwrap();
    let watched = on_watch_port(&cluster.secrets["board"], &["watch", run_id, "--json"]);
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    assert!(watched.stdout.contains("passed"), "{}", watched.stdout);
    refused(
        &on_watch_port("", &["watch", run_id]),
        "no token watches on the watch port",
    );
    refused(
        &on_watch_port(&cluster.secrets["fleet"], &["watch", run_id]),
        "a worker token watches on the watch port",
    );
    refused(
        &on_watch_port(&cluster.secrets["board"], &run_args),
        "a viewer submits on the watch port",
    );

    // A worker's calls are not served there, whatever its credential, and it is told why.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(watch_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut worker =
            WorkerServiceClient::new(AuthChannel::new(ch.clone(), Some(&cluster.secrets["fleet"])).unwrap());
        let e = worker.register(register_req("w9")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
        assert!(e.message().contains("--grpc-addr"), "{e:?}");
        // Its health (open, as on the gRPC port) names what it serves, and only that.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let status = |service: &str| tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        for service in ["", "shardgate.v1.RunService", "shardgate.v1.DashboardService"] {
            let r = health.check(status(service)).await.unwrap().into_inner();
            assert_eq!(
                r.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service:?}"
            );
        }
        let e = health
            .check(status("shardgate.v1.WorkerService"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    });
    // Nothing of it reached the fleet: one worker, the cluster's own.
    let fleet = cluster.client(&["workers", "--json"]).json();
    assert_eq!(fleet.as_array().map(Vec::len), Some(1), "{fleet}");
}

async fn worker_client(cluster: &Cluster, token: Option<&str>) -> WorkerServiceClient<AuthChannel> {
    let ch = tonic::transport::Endpoint::from_shared(cluster.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerServiceClient::new(AuthChannel::new(ch, token).unwrap())
}

fn register_req(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        name: name.into(),
        slots: 1,
        labels: vec![],
        runners: vec![pb::RunnerInfo {
            name: "exec".into(),
            kind: pb::RunnerKind::Exec as i32,
        }],
    }
}

#[test]
fn a_rogue_worker_can_neither_take_a_name_nor_report_into_another_workers_attempt() {
    let marker = tempfile::tempdir().unwrap();
    let deployed = marker.path().join("deployed");
    let hook = format!(r#"["/bin/sh", "-c", "echo $RUN_ID >> {}"]"#, deployed.display());
    let cluster = Cluster::builder()
        .workers(1)
        .slots(1)
        .with_tokens()
        .coordinator_args(&["--rollout-command", &hook])
        .start();
    // A failing test that takes long enough for the attack.
    script(&cluster.root, "t/broken.sh", "sleep 3; echo real failure; exit 1");
    let follower = cluster.follow(
        &["t/broken.sh".to_string()],
        &["--retries", "0", "--rollout"],
        Stdio::null(),
    );
    let shard = wait_for("the real worker's attempt", Duration::from_secs(30), || {
        let p = cluster.client(&["workers", "--json"]).json();
        let w = p.as_array()?.first()?.clone();
        (w["busy_slots"].as_u64()? == 1).then_some(w["worker_id"].as_str()?.to_owned())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The attempt id leaks (say, from a dashboard).
        let ch = tonic::transport::Endpoint::from_shared(cluster.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let dash = pb::dashboard_service_client::DashboardServiceClient::new(
            AuthChannel::new(ch, Some(&cluster.secrets["board"])).unwrap(),
        );
        // The live shard list follows a hand-out within a quarter of a second.
        let attempt = harness::poll_until_async(std::time::Instant::now() + Duration::from_secs(10), || {
            let mut dash = dash.clone();
            async move {
                let progress = dash
                    .run_progress(pb::RunProgressRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                progress.shards.first().map(|s| s.attempt_id.clone())
            }
        })
        .await
        .expect("a shard in the run's progress");
        let passed = vec![pb::TestResult {
            test_id: "t/broken.sh".into(),
            outcome: pb::Outcome::Passed as i32,
            ..Default::default()
        }];

        // Anonymous: not authenticated.
        let mut anon = worker_client(&cluster, None).await;
        let e = anon.register(register_req("w1")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

        // Another identity cannot take the live worker's name...
        let mut rogue = worker_client(&cluster, Some(&cluster.secrets["rogue"])).await;
        let e = rogue.register(register_req("w1")).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("held by a live worker of another identity"),
            "{e:?}"
        );
        // ...nor report, heartbeat or finish as that worker...
        let report = pb::ReportResultsRequest {
            worker_id: shard.clone(),
            attempt_id: attempt.clone(),
            results: passed.clone(),
            tested_commit: String::new(),
        };
        let e = rogue.report_results(report).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = rogue
            .finish_shard(pb::FinishShardRequest {
                worker_id: shard.clone(),
                attempt_id: attempt.clone(),
                error: "forged".into(),
                draining: false,
                unknown_revision: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = rogue
            .deregister(pb::DeregisterRequest {
                worker_id: shard.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // ...nor report into its attempt from a worker of its own.
        let own = rogue
            .register(register_req("rogue-1"))
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let e = rogue
            .report_results(pb::ReportResultsRequest {
                worker_id: own,
                attempt_id: attempt.clone(),
                results: passed,
                tested_commit: String::new(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::FailedPrecondition | Code::PermissionDenied),
            "{e:?}"
        );
    });

    // The real failure stands: red, exit 1, no deploy.
    let out = follower.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["tests"][0]["outcome"], "failed");
    assert_eq!(report["tests"][0]["worker"], "w1");
    let deploys = cluster.client(&["deploys", "--json"]).json();
    assert!(deploys["deploys"].as_array().unwrap().is_empty(), "{deploys}");
    assert!(!deployed.exists(), "the rollout hook never ran");
}

#[test]
fn without_credentials_only_loopback_is_served_unless_insecure_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: &[&str]| {
        Command::new(bin("shardgate-coordinator"))
            .args(["--grpc-addr", "0.0.0.0:0", "--http-addr", "127.0.0.1:0"])
            .arg("--db")
            .arg(dir.path().join("db.sqlite"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = start(&[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("refusing to serve 0.0.0.0") && stderr.contains("--tokens"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it never said it was serving");

    let mut child = start(&["--insecure-no-auth"]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("grpc_addr"), "it serves when told to: {line:?}");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WITHOUT CREDENTIALS"),
        "it says so loudly: {stderr}"
    );
}

#[test]
fn a_secret_a_test_prints_is_masked_before_it_leaves_the_worker() {
    let cluster = Cluster::builder()
        .workers(1)
        .slots(1)
        .worker_env("SHARDGATE_REDACT", "DB_PASSWORD=\\S+\nsg_[0-9a-f]{64}")
        .start();
    script(
        &cluster.root,
        "t/leaky.sh",
        "echo connecting with DB_PASSWORD=hunter2; exit 1",
    );
    let r = cluster.run_tests(&["t/leaky.sh".to_string()], &["--retries", "0"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let output = r.json()["tests"][0]["output"].as_str().unwrap().to_owned();
    assert!(output.contains("connecting with [redacted]"), "{output}");
    assert!(!cluster.logs().contains("hunter2") && !r.stdout.contains("hunter2"));
}
