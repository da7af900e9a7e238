//! The client commands that talk to a coordinator about runs: run, watch, status, cancel,
//! runs, workers.

use std::time::Duration;

use anyhow::Context;
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
    let run = resp.run.context("the coordinator sent no run")?;
    if c.output.json {
        println!("{}", serde_json::to_string_pretty(&RunReport::new(&run, &[]))?);
    } else {
        let status = RunStatus::from_wire(run.status);
        println!(
            "run {}: {}",
            c.run_id,
            status.map(RunStatus::as_str).unwrap_or("?")
        );
    }
    Ok(exit::PASSED)
}

pub(crate) async fn runs(l: ListArgs) -> anyhow::Result<u8> {
    let mut client = run_client(connect(&l.conn).await?);
    let runs = client
        .list_runs(pb::ListRunsRequest {
            limit: l.limit.clamp(1, 1000),
        })
        .await
        .map_err(|s| refused("failed to list runs", s))?
        .into_inner()
        .runs;
    let reports: Vec<RunReport> = runs.iter().map(|r| RunReport::new(r, &[])).collect();
    if l.output.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        if reports.is_empty() {
            println!("no runs yet");
        } else {
            print!("{}", runs_table(&reports));
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

/// The runs as a table with a header, each column as wide as its widest cell.
fn runs_table(reports: &[RunReport]) -> String {
    let header = ["RUN", "STATUS", "TESTS", "FAILED", "SUITE", "REVISION", "BY"];
    let rows: Vec<[String; 7]> = reports
        .iter()
        .map(|r| {
            [
                r.run_id.clone(),
                r.status.as_str().to_owned(),
                r.counts.total.to_string(),
                (r.counts.failed + r.counts.timed_out + r.counts.infra_error).to_string(),
                r.suite.clone(),
                r.revision.clone(),
                r.requested_by.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let last = i + 1 == cells.len();
            // Numbers right-aligned, text left-aligned; no trailing spaces.
            if i == 2 || i == 3 {
                out.push_str(&format!("{cell:>w$}"));
            } else if last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}"));
            }
            if !last {
                out.push_str("  ");
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_table_has_a_header_and_aligned_columns() {
        let mut a = RunReport::new(&Default::default(), &[]);
        a.run_id = "r-1".into();
        a.suite = "a-long-suite-name".into();
        a.revision = "abc".into();
        a.requested_by = "ci".into();
        a.counts.total = 1200;
        let mut b = a.clone();
        b.run_id = "r-2".into();
        b.suite = "s".into();
        b.counts.total = 3;
        b.counts.failed = 1;
        let t = runs_table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("RUN  STATUS"), "{t}");
        let col = |l: &str, name: &str| lines[0].find(name).map(|i| &l[i..]).unwrap().to_owned();
        assert!(
            col(lines[1], "SUITE").starts_with("a-long-suite-name  abc"),
            "{t}"
        );
        assert!(
            col(lines[2], "SUITE").starts_with("s                  abc"),
            "{t}"
        );
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{t:?}");
    }
}
