//! Start-up of the `shardgate-coordinator` and `shardgate-worker` binaries: turn arguments into
//! library configs, bind listeners, and run until a shutdown signal.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context;
use shardgate_common::labels;
use shardgate_coordinator::CoreConfig;
use shardgate_coordinator::rollout::RolloutConfig;
use shardgate_worker::runners::ExecRunner;
use shardgate_worker::runners::Runner;
use tokio::net::TcpListener;

use crate::args::{CoordinatorArgs, CoordinatorTuning, RolloutArgs, WorkerArgs};
use crate::util;

/// Longest output kept per test.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

pub fn core_config(t: &CoordinatorTuning) -> anyhow::Result<CoreConfig> {
    anyhow::ensure!(
        t.lease > t.heartbeat,
        "--lease ({:?}) must be longer than --heartbeat ({:?})",
        t.lease,
        t.heartbeat
    );
    anyhow::ensure!(
        t.max_infra_attempts >= 1,
        "--max-infra-attempts must be at least 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&t.quarantine_threshold),
        "--quarantine-threshold is a rate between 0 and 1, not {}",
        t.quarantine_threshold
    );
    Ok(CoreConfig {
        lease: t.lease,
        heartbeat_interval: t.heartbeat,
        max_infra_attempts: t.max_infra_attempts,
        max_output_bytes: MAX_OUTPUT_BYTES,
        retries: t.default_retries.min(10),
        flaky_retries: t.default_flaky_retries.min(10),
        quarantine_threshold: t.quarantine_threshold,
        quarantine_min_runs: t.quarantine_min_runs.max(1),
        auto_quarantine: t.auto_quarantine,
        max_active_runs_per_requester: t.max_active_runs.max(1),
        max_open_tests_per_requester: t.max_open_tests.max(1),
        queue_timeout: t.default_queue_timeout.max(std::time::Duration::from_millis(1)),
        keep_output: t.keep_output,
        ..CoreConfig::default()
    })
}

fn argv(flag: &str, json: &Option<String>) -> anyhow::Result<Option<Vec<String>>> {
    json.as_deref()
        .map(|j| {
            serde_json::from_str::<Vec<String>>(j).map_err(|e| {
                anyhow::anyhow!("{flag} must be a JSON array of strings (argv, no shell), like '[\"/usr/bin/deploy\", \"--prod\"]': {e}")
            })
        })
        .transpose()
}

pub fn rollout_config(a: &RolloutArgs) -> anyhow::Result<RolloutConfig> {
    let cfg = RolloutConfig {
        command: argv("--rollout-command", &a.rollout_command)?,
        url: a.rollout_url.clone(),
        verify: argv("--verify-command", &a.verify_command)?,
        rollback: argv("--rollback-command", &a.rollback_command)?,
        timeout: a.hook_timeout,
    };
    cfg.check().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// Binds the address `flag` gave; an error names the flag.
async fn bind(flag: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {flag} {addr}"))
}

/// Serves until SIGTERM or SIGINT. Prints one JSON line with the bound addresses on stdout once
/// listening, so scripts and tests that ask for port 0 learn the ports.
pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut config = shardgate_coordinator::Config::new(args.db.clone());
    config.core = core_config(&args.tuning)?;
    config.rollout = rollout_config(&args.rollout)?;
    anyhow::ensure!(
        args.tuning.event_buffer >= 16,
        "--event-buffer must be at least 16"
    );
    config.event_buffer = args.tuning.event_buffer;
    config.disconnect_grace = Some(args.tuning.disconnect_grace).filter(|g| !g.is_zero());
    if let Some(url) = &args.otlp_endpoint {
        let otlp = shardgate_coordinator::otlp::OtlpConfig {
            endpoint: url.clone(),
            ca_cert: args.otlp_ca_cert.clone(),
            test_spans: args.otlp_test_spans.parse().map_err(anyhow::Error::msg)?,
        };
        otlp.check().map_err(anyhow::Error::msg)?;
        tracing::info!(endpoint = %url, "sending each run's trace to the OTLP collector");
        config.otlp = Some(otlp);
    }
    if let Some(path) = &args.tokens {
        let tokens = shardgate_coordinator::auth::Tokens::load(path)?;
        tracing::info!(tokens = tokens.len(), "credentials required");
        config.auth = shardgate_coordinator::auth::Auth::with_tokens(tokens);
    }
    config.insecure_no_auth = args.insecure_no_auth;
    config.connections = shardgate_coordinator::conn::ConnLimits {
        max: args
            .max_connections
            .unwrap_or_else(shardgate_coordinator::conn::default_max_connections),
        idle: args.idle_timeout,
    };
    anyhow::ensure!(config.connections.max > 0, "--max-connections must be at least 1");
    anyhow::ensure!(
        config.connections.idle >= std::time::Duration::from_secs(1),
        "--idle-timeout must be at least 1s"
    );
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(shardgate_coordinator::server::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        });
    }
    let grpc = bind("--grpc-addr", args.grpc_addr).await?;
    let http = bind("--http-addr", args.http_addr).await?;
    let watch = match args.watch_addr {
        Some(addr) => Some(bind("--watch-addr", addr).await?),
        None => None,
    };
    config.advertise = (
        args.advertise_grpc_addr
            .clone()
            .unwrap_or(grpc.local_addr()?.to_string()),
        args.advertise_http_addr
            .clone()
            .unwrap_or(http.local_addr()?.to_string()),
    );
    // The database next: the addresses are printed only by a coordinator that holds it.
    let opened = shardgate_coordinator::server::open(config)?;
    // Refused before it says it serves.
    let mut addrs = vec![grpc.local_addr()?, http.local_addr()?];
    addrs.extend(watch.as_ref().map(TcpListener::local_addr).transpose()?);
    opened.check_exposure(&addrs)?;
    let mut ready = serde_json::json!({
        "grpc_addr": grpc.local_addr()?.to_string(),
        "http_addr": http.local_addr()?.to_string(),
        "role": opened.role(),
    });
    if let Some(w) = &watch {
        ready["watch_addr"] = w.local_addr()?.to_string().into();
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{ready}")?;
    out.flush()?;
    drop(out);
    let listeners = shardgate_coordinator::Listeners {
        grpc,
        http: Some(http),
        watch,
    };
    opened.serve_on(listeners, util::shutdown_signal()).await?;
    Ok(())
}

pub fn worker_config(args: &WorkerArgs) -> anyhow::Result<shardgate_worker::Config> {
    let mut runners = match &args.runners {
        Some(path) => shardgate_worker::profile::load(path, MAX_OUTPUT_BYTES)?,
        None => BTreeMap::new(),
    };
    if let Some(root) = &args.exec_root {
        let exec = ExecRunner::new(root, MAX_OUTPUT_BYTES).context("invalid --exec-root")?;
        anyhow::ensure!(
            !runners.contains_key("exec"),
            "--exec-root defines the runner 'exec', and so does --runners: keep one"
        );
        runners.insert("exec".to_owned(), Runner::Exec(exec));
    }
    anyhow::ensure!(
        !runners.is_empty(),
        "the worker has no runner: give --exec-root DIR or --runners FILE"
    );
    let slots = match args.slots {
        Some(0) => anyhow::bail!("--slots must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    };
    Ok(shardgate_worker::Config {
        token: args.credential.secret()?,
        redact: shardgate_worker::agent::Redact::new(&args.redact).map_err(anyhow::Error::msg)?,
        tls: shardgate_common::tls::ClientTls {
            ca_cert: args.credential.ca_cert.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
        },
        coordinator: args.coordinator.clone(),
        name: args.name.clone().unwrap_or_else(util::hostname),
        slots,
        labels: labels::parse("labels", &args.labels)?,
        runners,
        drain_grace: args.drain_grace,
        start_check: args.start_check == crate::args::StartCheck::List,
        health: args.health_addr,
        faults: shardgate_worker::agent::Faults {
            duplicate_reports: args.fault_duplicate_reports,
            delay_reports: args.fault_delay_reports,
            delay: args.fault_delay,
        },
    })
}

/// Runs a worker until SIGTERM or SIGINT, then drains; with `--check`, checks its runners and
/// exits.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let config = worker_config(&args)?;
    if args.check {
        return check_runners(&args, &config).await;
    }
    shardgate_worker::run(config, util::shutdown_signal()).await?;
    Ok(())
}

/// `shardgate-worker --check`: every runner checked in turn, a report each.
async fn check_runners(args: &WorkerArgs, config: &shardgate_worker::Config) -> anyhow::Result<()> {
    use shardgate_worker::check::{self, Depth};
    let mut reports = Vec::new();
    for (name, runner) in &config.runners {
        let depth = Depth::Full {
            sample: args.check_sample,
        };
        let timeout = std::time::Duration::from_secs(300);
        let report = check::check(name, runner, depth, &args.check_revision, timeout).await;
        if !args.json {
            print!("{}", check::render(std::slice::from_ref(&report)));
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.runner.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CheckFailed(failed.join(", ")).into())
    }
}

/// Some runners failed their check.
#[derive(Debug)]
pub struct CheckFailed(String);

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "runner(s) failed their check: {}", self.0)
    }
}

impl std::error::Error for CheckFailed {}

/// `shardgate-coordinator backup`: an online copy of the database.
pub fn backup(args: &crate::args::BackupArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !shardgate_coordinator::store::postgres::is_url(&args.db.to_string_lossy()),
        "backup copies a SQLite file; back up a PostgreSQL database with PostgreSQL's own tools (pg_dump, or your provider's snapshots)"
    );
    shardgate_coordinator::store::sqlite::backup(&args.db, &args.to)?;
    println!("backed up {} to {}", args.db.display(), args.to.display());
    Ok(())
}
