//! The files in `deploy/` as a user gets them: every YAML document parses, and the fields that
//! keep a fleet safe are there (probes, a preStop drain, a termination grace that covers the
//! drain, the coordinator's volume, resources, the autoscaler's metric); the systemd units are
//! hardened; the example configuration files are accepted by the binaries and the runner
//! profile parser; the Dockerfile builds both targets as a non-root user.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

fn docs(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// Seconds in a duration like "60s" or "2m".
fn seconds(s: &str) -> i64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().unwrap_or_else(|_| panic!("not a duration: {s}"));
    match unit {
        "s" | "" => n,
        "m" => n * 60,
        u => panic!("unit {u} in {s}"),
    }
}

fn env<'a>(container: &'a Yaml, name: &str) -> Option<&'a str> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
}

#[test]
fn the_kubernetes_workers_drain_within_their_grace_and_have_probes_and_resources() {
    let docs = docs("k8s/worker.yaml");
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let probe_port = c["readinessProbe"]["httpGet"]["port"].as_str().unwrap();
    assert!(
        c["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p["name"].as_str() == Some(probe_port)),
        "the probe port is declared"
    );
    assert!(
        env(c, "SHARDGATE_HEALTH_ADDR").is_some(),
        "the worker serves its probes"
    );
    let drain = seconds(env(c, "SHARDGATE_DRAIN_GRACE").expect("a drain grace"));
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace > drain, "grace {grace}s must cover the drain {drain}s");
    let pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_vec()
        .expect("a preStop drain");
    assert!(
        pre_stop
            .iter()
            .any(|a| a.as_str().is_some_and(|s| s.contains("kill -TERM")))
    );
    for k in ["requests", "limits"] {
        assert!(!c["resources"][k]["memory"].is_badvalue(), "resources.{k}.memory");
    }
    assert!(env(c, "SHARDGATE_TOKEN_FILE").is_some(), "workers authenticate");
    assert!(
        env(c, "SHARDGATE_COORDINATOR").unwrap().starts_with("https://"),
        "and talk TLS"
    );
}

#[test]
fn the_kubernetes_coordinator_keeps_its_database_on_a_volume_behind_tls_and_tokens() {
    let docs = docs("k8s/coordinator.yaml");
    let set = kind(&docs, "StatefulSet");
    assert_eq!(
        set["spec"]["replicas"].as_i64(),
        Some(1),
        "one writer per database"
    );
    let claim = &set["spec"]["volumeClaimTemplates"][0];
    let c = &set["spec"]["template"]["spec"]["containers"][0];
    let db = env(c, "SHARDGATE_DB").unwrap();
    let mount = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim["metadata"]["name"])
        .expect("the claim is mounted");
    assert!(
        db.starts_with(mount["mountPath"].as_str().unwrap()),
        "{db} is on the volume"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let args: Vec<&str> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    for flag in ["--tokens", "--tls-cert", "--tls-key"] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    assert!(!c["resources"]["requests"]["memory"].is_badvalue());
    let service = kind(&docs, "Service");
    let ports: Vec<i64> = service["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [7070, 7080]);
}

#[test]
fn the_kubernetes_coordinators_on_postgres_stand_by_and_route_to_the_leader() {
    let docs = docs("k8s/coordinator-ha.yaml");
    let d = kind(&docs, "Deployment");
    assert!(
        d["spec"]["replicas"].as_i64().unwrap() >= 2,
        "a leader and a standby"
    );
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let db = c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("SHARDGATE_DB"))
        .expect("SHARDGATE_DB is set");
    assert_eq!(
        db["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("shardgate-postgres"),
        "the database URL (with its password) comes from a Secret"
    );
    // Ready only while leading, so the Service routes to the leader; alive as a standby too.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let args: Vec<&str> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    for flag in [
        "--tokens",
        "--tls-cert",
        "--tls-key",
        "--advertise-grpc-addr",
        "--advertise-http-addr",
    ] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    assert!(
        d["spec"]["volumeClaimTemplates"].is_badvalue(),
        "no volume: the state is in PostgreSQL"
    );
    let service = kind(&docs, "Service");
    assert_eq!(service["spec"]["ports"].as_vec().unwrap().len(), 2);
}

#[test]
fn the_autoscaler_scales_the_worker_deployment_on_the_queue_metric() {
    let docs = docs("k8s/autoscaler.yaml");
    let so = kind(&docs, "ScaledObject");
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("shardgate-worker")
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(
        trigger["metadata"]["metricName"].as_str(),
        Some("shardgate_queue_depth")
    );
}

#[test]
fn compose_gives_the_coordinator_a_volume_and_the_workers_a_drain() {
    let docs = docs("compose.yaml");
    let services = &docs[0]["services"];
    let coordinator = &services["coordinator"];
    assert!(
        coordinator["volumes"][0]
            .as_str()
            .unwrap()
            .ends_with(":/var/lib/shardgate"),
        "the database's directory is a volume"
    );
    assert!(coordinator["environment"]["SHARDGATE_TOKENS"].as_str().is_some());
    let worker = &services["worker"];
    assert!(
        worker["ports"].is_badvalue(),
        "workers publish no port, so --scale works"
    );
    let drain = seconds(worker["environment"]["SHARDGATE_DRAIN_GRACE"].as_str().unwrap());
    let stop = seconds(worker["stop_grace_period"].as_str().unwrap());
    assert!(
        stop > drain,
        "stop_grace_period {stop}s covers the drain {drain}s"
    );
    assert_eq!(worker["stop_signal"].as_str(), Some("SIGTERM"));
    assert!(worker["environment"]["SHARDGATE_TOKEN_FILE"].as_str().is_some());
}

#[test]
fn the_dockerfile_builds_both_targets_as_a_non_root_user_with_healthchecks() {
    let text = read("docker/Dockerfile");
    for target in ["AS build", "AS coordinator", "AS worker"] {
        assert!(text.contains(target), "{target}");
    }
    let finals: Vec<&str> = text
        .split("\nFROM ")
        .filter(|s| s.starts_with("runtime AS"))
        .collect();
    assert_eq!(finals.len(), 2, "the coordinator and worker stages");
    for stage in finals {
        assert!(stage.contains("USER shardgate"), "non-root: {stage}");
        assert!(stage.contains("HEALTHCHECK"), "healthcheck: {stage}");
    }
    assert!(text.contains("ARG BUILDER_IMAGE=") && text.contains("ARG RUNTIME_IMAGE="));
}

#[test]
fn the_systemd_units_are_hardened_and_stop_within_the_drain() {
    for unit in ["shardgate-coordinator.service", "shardgate-worker.service"] {
        let text = read(&format!("systemd/{unit}"));
        let value = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{unit}: no {k}"))
                .to_owned()
        };
        for k in [
            "NoNewPrivileges",
            "ProtectSystem",
            "PrivateTmp",
            "RestrictSUIDSGID",
        ] {
            value(k);
        }
        assert_eq!(value("User"), "shardgate", "{unit}");
        assert_eq!(
            value("RestartPreventExitStatus"),
            "2",
            "no restart loop on a bad config"
        );
    }
    let worker = read("systemd/shardgate-worker.service");
    let stop = worker
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .map(seconds)
        .unwrap();
    assert!(worker.contains("--drain-grace 60s") && stop > 60, "{stop}");
}

#[test]
fn the_example_configuration_files_are_accepted() {
    for (bin, file) in [
        ("shardgate-coordinator", "examples/coordinator.toml"),
        ("shardgate-worker", "examples/worker.toml"),
    ] {
        // --version after --config: every key of the file must be a flag of the binary.
        let out = Command::new(harness::bin(bin))
            .arg("--config")
            .arg(deploy(file))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runners = read("examples/runners.toml");
    let parsed = shardgate_worker::profile::parse(&runners, 1024).unwrap();
    assert_eq!(parsed.keys().collect::<Vec<_>>(), ["go", "py", "rust"]);
    // The tokens file has the shape the coordinator reads.
    let tokens: toml::Table = read("examples/tokens.toml").parse().unwrap();
    for (name, t) in tokens["tokens"].as_table().unwrap() {
        assert!(
            t["role"].as_str().is_some() && t["sha256"].as_str().unwrap().len() == 64,
            "{name}"
        );
    }
}

#[test]
fn the_ci_examples_gate_the_deploy_on_the_run() {
    let gh = docs("ci/github-actions.yml");
    assert_eq!(gh[0]["jobs"]["deploy"]["needs"].as_str(), Some("test"));
    let steps = gh[0]["jobs"]["test"]["steps"].as_vec().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["run"].as_str().is_some_and(|r| r.contains("shardgate run")))
    );
    let gl = docs("ci/gitlab-ci.yml");
    assert_eq!(gl[0]["deploy"]["needs"][0].as_str(), Some("gate"));
    assert!(
        gl[0]["gate"]["script"][0]
            .as_str()
            .unwrap()
            .starts_with("shardgate run")
    );
}

#[test]
fn the_end_to_end_script_is_executable_and_parses() {
    use std::os::unix::fs::PermissionsExt;
    let script = deploy("e2e.sh");
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert!(mode & 0o111 != 0, "deploy/e2e.sh is executable");
    let out = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // It cleans up whatever happens.
    assert!(read("e2e.sh").contains("trap cleanup EXIT"));
}
