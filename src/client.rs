//! The client commands that talk to a coordinator about runs: run, watch, status, cancel,
//! runs, workers.

use std::time::Duration;

use shardgate_common::pb::dashboard_service_client::DashboardServiceClient;
use shardgate_common::report::RunReport;
use shardgate_common::{RunStatus, pb};

use crate::args::{CancelArgs, ListArgs, RunArgs, RunRef};
use crate::connect::{connect, refused, run_client};
use crate::display::Progress;
use crate::exit;
use crate::submit::{follow, report, submit_and_follow, submit_request};

pub(crate) async fn run(a: RunArgs) -> anyhow::Result<u8> {
    let req = submit_request(&a.runner, &a.source, &a.submit)?;
    let ch = connect(&a.conn).await?;
    let wait = a.submit.wait_rollout;
    submit_and_follow(ch, req, a.submit.reconnect_for, &a.output, wait, a.detach).await
}

pub(crate) async fn watch(r: RunRef) -> anyhow::Result<u8> {
    let mut client = run_client(connect(&r.conn).await?);
    let mut progress = Progress::new();
    follow(&mut client, &r.run_id, Duration::from_secs(600), &mut progress).await?;
    progress.finish();
    report(&mut client, &r.run_id, &r.output).await
}

pub(crate) async fn status(r: RunRef) -> anyhow::Result<u8> {
    let mut client = run_client(connect(&r.conn).await?);
    report(&mut client, &r.run_id, &r.output).await
}

pub(crate) async fn cancel(c: CancelArgs) -> anyhow::Result<u8> {
    let mut client = run_client(connect(&c.conn).await?);
    let resp = client
        .cancel_run(pb::CancelRunRequest {
            run_id: c.run_id.clone(),
            reason: c.reason,
        })
        .await
        .map_err(|s| refused("failed to cancel the run", s))?
        .into_inner();
    let status = resp.run.and_then(|r| RunStatus::from_wire(r.status));
    println!(
        "run {}: {}",
        c.run_id,
        status.map(RunStatus::as_str).unwrap_or("?")
    );
    Ok(exit::PASSED)
}

pub(crate) async fn runs(l: ListArgs) -> anyhow::Result<u8> {
    let mut client = run_client(connect(&l.conn).await?);
    let runs = client
        .list_runs(pb::ListRunsRequest { limit: 50 })
        .await
        .map_err(|s| refused("failed to list runs", s))?
        .into_inner()
        .runs;
    let reports: Vec<RunReport> = runs.iter().map(|r| RunReport::new(r, &[])).collect();
    if l.output.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in reports {
            println!(
                "{}  {:<9} {:>6} tests  {:<12} {:<12} {}",
                r.run_id,
                r.status.as_str(),
                r.counts.total,
                r.suite,
                r.revision,
                r.requested_by
            );
        }
    }
    Ok(exit::PASSED)
}

pub(crate) async fn workers(l: ListArgs) -> anyhow::Result<u8> {
    let mut client = DashboardServiceClient::new(connect(&l.conn).await?);
    let workers = client
        .list_workers(pb::ListWorkersRequest { include_gone: false })
        .await
        .map_err(|s| refused("failed to list workers", s))?
        .into_inner()
        .workers;
    if l.output.json {
        let v: Vec<_> = workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.worker_id, "name": w.name, "slots": w.slots,
                    "busy_slots": w.busy_slots, "state": w.state,
                    "runners": w.runners.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                    "labels": w.labels.iter().map(|l| format!("{}={}", l.key, l.value)).collect::<Vec<_>>(),
                    "unavailable_runners": w.unavailable_runners.iter()
                        .map(|u| (u.name.clone(), serde_json::Value::from(u.reason.clone())))
                        .collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for w in workers {
            let labels: Vec<String> = w
                .labels
                .iter()
                .map(|l| format!("{}={}", l.key, l.value))
                .collect();
            println!(
                "{:<20} {:<5} {}/{} slots busy  {}",
                w.name,
                w.state,
                w.busy_slots,
                w.slots,
                labels.join(",")
            );
            for u in &w.unavailable_runners {
                println!("    runner '{}' unavailable: {}", u.name, u.reason);
            }
        }
    }
    Ok(exit::PASSED)
}
