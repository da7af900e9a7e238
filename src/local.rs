//! `shardgate local`: a coordinator and N workers inside this process, talking real gRPC over
//! loopback, against an exec root on this machine. The same output and exit codes as
//! `shardgate run`; nothing to install or start.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use shardgate_common::labels::Labels;
use shardgate_common::pb;
use shardgate_common::pb::dashboard_service_client::DashboardServiceClient;
use shardgate_worker::runners::ExecRunner;
use shardgate_worker::runners::Runner;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::LocalArgs;
use crate::servers::{MAX_OUTPUT_BYTES, core_config};
use crate::{connect, submit};

pub async fn run(a: LocalArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(a.slots >= 1, "--slots must be at least 1");
    let exec = ExecRunner::new(&a.exec_root, MAX_OUTPUT_BYTES).context("invalid --exec-root")?;
    let req = submit::submit_request("exec", &a.source, &a.submit)?;

    let tmp = tempfile::tempdir().context("failed to create a temporary directory")?;
    let db = a.db.clone().unwrap_or_else(|| tmp.path().join("shardgate.db"));
    let mut config = shardgate_coordinator::Config::new(db);
    config.core = core_config(&a.tuning)?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("failed to bind a loopback port")?;
    let url = format!("http://{}", listener.local_addr()?);

    // Workers stop first so they can hand back work and deregister while the coordinator still
    // serves.
    let stop = CancellationToken::new();
    let stop_coordinator = CancellationToken::new();
    let coordinator = {
        let stop = stop_coordinator.clone();
        tokio::spawn(async move {
            shardgate_coordinator::run(config, listener, None, stop.cancelled_owned()).await
        })
    };
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let cfg = shardgate_worker::Config {
            token: None,
            tls: Default::default(),
            redact: Default::default(),
            coordinator: url.clone(),
            name: format!("local-{}", i + 1),
            slots: a.slots,
            labels: Labels::new(),
            runners: BTreeMap::from([("exec".to_owned(), Runner::Exec(exec.clone()))]),
            drain_grace: Duration::from_secs(5),
            start_check: false,
            health: None,
            faults: Default::default(),
        };
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            shardgate_worker::run(cfg, stop.cancelled_owned()).await
        }));
    }

    let result = async {
        let ch = connect::connect_url(&url, None).await?;
        wait_for_workers(ch.clone(), a.workers as usize).await?;
        submit::submit_and_follow(
            ch,
            req,
            a.submit.reconnect_for,
            &a.output,
            a.submit.wait_rollout,
            false,
        )
        .await
    }
    .await;

    stop.cancel();
    for w in workers {
        if let Ok(Err(e)) = w.await {
            tracing::warn!(error = %e, "local worker failed");
        }
    }
    stop_coordinator.cancel();
    match coordinator.await {
        Ok(Err(e)) if result.is_ok() => return Err(e).context("the local coordinator failed"),
        _ => {}
    }
    result
}

/// Waits until `n` workers are registered and live.
async fn wait_for_workers(ch: connect::Channel, n: usize) -> anyhow::Result<()> {
    let mut client = DashboardServiceClient::new(ch);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live = client
            .list_workers(pb::ListWorkersRequest { include_gone: false })
            .await
            .context("failed to list the local workers")?
            .into_inner()
            .workers
            .iter()
            .filter(|w| w.state == "live")
            .count();
        if live >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {live} of {n} local workers registered within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
