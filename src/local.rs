//! `shardgate local`: a coordinator and N workers inside this process, talking real gRPC over
//! loopback, against an exec root on this machine. The same output and exit codes as
//! `shardgate run`; nothing to install or start.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use shardgate_common::labels::Labels;
use shardgate_common::pb;
use shardgate_common::pb::dashboard_service_client::DashboardServiceClient;
use shardgate_worker::runners::{ExecRunner, Runner, Runners};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::LocalArgs;
use crate::servers::{MAX_OUTPUT_BYTES, core_config};
use crate::{connect, submit};

pub async fn run(a: LocalArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(a.slots >= 1, "--slots must be at least 1");
    let (runner, runners, lists_tests) = local_runners(&a)?;
    let mut source = a.source.to_source();
    if source.tests_file.is_none() && !source.discover {
        // A runner that lists its own tests does so when none were named.
        anyhow::ensure!(
            lists_tests,
            "name the tests: --tests-file FILE, or --discover to have a worker list them"
        );
        source.discover = true;
    }
    let req = submit::submit_request(&runner, &source, &a.submit)?;

    let tmp = tempfile::tempdir().context("failed to create a temporary directory")?;
    let db = match &a.db {
        Some(db) => db.clone(),
        None => history_db(&a).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the history is not kept this time (give --db FILE to keep it)");
            tmp.path().join("shardgate.db")
        }),
    };
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
            runners: runners.clone(),
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

/// The runner the run uses, the runners every local worker offers, and whether the run
/// discovers its tests when none are named (every kind but `exec`, whose tests are files).
fn local_runners(a: &LocalArgs) -> anyhow::Result<(String, Runners, bool)> {
    if let Some(root) = &a.exec_root {
        let exec = ExecRunner::new(root, MAX_OUTPUT_BYTES).context("invalid --exec-root")?;
        let runners = BTreeMap::from([("exec".to_owned(), Runner::Exec(exec))]);
        return Ok(("exec".into(), runners, false));
    }
    if let Some(path) = &a.runners {
        let runners = shardgate_worker::profile::load(path, MAX_OUTPUT_BYTES)?;
        let name = match &a.runner {
            Some(n) if runners.contains_key(n) => n.clone(),
            Some(n) => bail!(
                "--runner '{n}' is not a profile of {} (it has: {})",
                path.display(),
                runners.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            None if runners.len() == 1 => runners.keys().next().expect("one").clone(),
            None => bail!(
                "{} has several profiles ({}); choose one with --runner",
                path.display(),
                runners.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        let discover = !matches!(runners.get(&name), Some(Runner::Exec(_)));
        return Ok((name, runners, discover));
    }
    let (kind, flag, dir) = [
        ("pytest", "--pytest", &a.pytest),
        ("cargo-test", "--cargo-test", &a.cargo_test),
        ("nextest", "--nextest", &a.nextest),
        ("go-test", "--go-test", &a.go_test),
    ]
    .into_iter()
    .find_map(|(kind, flag, dir)| dir.as_ref().map(|d| (kind, flag, d)))
    .context("name the suite: --exec-root, --runners, --pytest, --cargo-test, --nextest or --go-test")?;
    let workdir = std::fs::canonicalize(dir).with_context(|| format!("{flag} {}", dir.display()))?;
    anyhow::ensure!(workdir.is_dir(), "{flag} {} is not a directory", dir.display());
    // The same profile a worker's runners file would hold, so it is checked the same way.
    let mut profile = toml::Table::new();
    profile.insert("kind".into(), kind.into());
    profile.insert("workdir".into(), workdir.display().to_string().into());
    let mut table = toml::Table::new();
    table.insert(kind.into(), profile.into());
    let mut file = toml::Table::new();
    file.insert("runners".into(), table.into());
    let runners = shardgate_worker::profile::parse(&toml::to_string(&file)?, MAX_OUTPUT_BYTES)
        .with_context(|| format!("{flag} {}", dir.display()))?;
    Ok((kind.into(), runners, true))
}

/// Where a local run keeps its history unless `--db` says: `.shardgate/local.db` in the
/// project's directory (the current directory for `--runners`), beside a `.gitignore` that
/// keeps it out of version control, as pytest does with `.pytest_cache`. So the second run of
/// a project is scheduled by the first one's measured durations.
fn history_db(a: &LocalArgs) -> anyhow::Result<std::path::PathBuf> {
    let project = [&a.exec_root, &a.pytest, &a.cargo_test, &a.nextest, &a.go_test]
        .into_iter()
        .find_map(|d| d.clone())
        .map_or_else(std::env::current_dir, Ok)?;
    let dir = project.join(".shardgate");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "# created by shardgate local\n*\n")
            .with_context(|| format!("cannot write {}", ignore.display()))?;
    }
    Ok(dir.join("local.db"))
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
