//! Submitting a run and following it to its verdict (and, when asked, its deploy). Following
//! rides through coordinator restarts: the watch stream is re-opened with backoff until the
//! run's verdict arrives or `--reconnect-for` runs out.

use std::time::Duration;

use anyhow::{Context, bail};
use shardgate_common::pb::run_service_client::RunServiceClient;
use shardgate_common::report::RunReport;
use shardgate_common::{RunStatus, labels, pb};

use crate::args::{RunOutput, SubmitOptions, TestSource};
use crate::connect::{Channel, is_transient, refused, run_client};
use crate::display::{Progress, print_report};
use crate::{exit, util};

/// Builds the submission from the command line.
pub fn submit_request(
    runner: &str,
    source: &TestSource,
    opts: &SubmitOptions,
) -> anyhow::Result<pb::SubmitRunRequest> {
    let tests = match &source.tests_file {
        Some(path) => util::read_tests_file(path)?,
        None => Vec::new(),
    };
    Ok(pb::SubmitRunRequest {
        suite: opts.suite.clone(),
        revision: opts.revision.clone(),
        requested_by: opts.requested_by.clone().unwrap_or_else(util::current_user),
        runner: runner.to_owned(),
        labels: labels::to_wire(&labels::parse("labels", &opts.labels)?),
        tests,
        discover: source.discover,
        policy: Some(pb::RunPolicy {
            test_timeout_ms: opts.test_timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
            max_infra_attempts: 0,
            fail_first: opts.fail_first,
            retries: opts.retries,
            strict_flaky: opts.strict_flaky,
            fail_fast: opts.fail_fast,
            flaky_retries: opts.flaky_retries,
            queue_timeout_ms: opts
                .queue_timeout
                .map(|d| d.as_millis().max(1) as u64)
                .unwrap_or(0),
        }),
        priority: opts.priority,
        rollout: opts.rollout,
        authors: opts.authors.clone(),
    })
}

/// Submits, follows to the verdict, prints the report and returns the exit code.
pub async fn submit_and_follow(
    ch: Channel,
    req: pb::SubmitRunRequest,
    reconnect_for: Duration,
    out: &RunOutput,
    wait_rollout: bool,
    detach: bool,
) -> anyhow::Result<u8> {
    let mut client = run_client(ch.clone());
    let resp = client
        .submit_run(req)
        .await
        .map_err(|s| refused("the coordinator refused the run", s))?
        .into_inner();
    if detach {
        // For jobs that should not wait: the id, alone on stdout (or in a JSON document).
        if out.json {
            println!("{}", serde_json::json!({ "run_id": resp.run_id }));
        } else {
            println!("{}", resp.run_id);
        }
        return Ok(exit::PASSED);
    }
    let mut progress = Progress::new();
    progress.note(&format!("submitted run {}", resp.run_id));
    // A CI job's timeout (SIGTERM) or Ctrl-C must not leave the run occupying the fleet.
    tokio::select! {
        followed = follow(&mut client, &resp.run_id, reconnect_for, &mut progress) => {
            followed?;
        }
        _ = util::shutdown_signal() => {
            progress.finish();
            return interrupted(&mut client, &resp.run_id, out).await;
        }
    }
    progress.finish();
    let mut report = fetch_report_through_outages(&mut client, &resp.run_id, reconnect_for).await?;
    let mut code = exit_code(report.status);
    if wait_rollout && report.status == RunStatus::Passed {
        progress.note("gate passed; waiting for the rollout");
        let deploy = wait_for_deploy(ch, &resp.run_id, reconnect_for).await?;
        code = match deploy.state.as_str() {
            "succeeded" => exit::PASSED,
            "failed" | "rolled_back" => exit::FAILED,
            _ => exit::ERROR,
        };
        report.deploy = Some(deploy);
    }
    util::exit_on_closed_output(code);
    emit(&report, out)?;
    Ok(code)
}

/// How long an interrupted client waits for its cancel to land.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// The first SIGINT or SIGTERM while following: cancels the run ("client interrupted"), waits
/// briefly for the cancel to land, prints the run and exits 1; a second signal exits at once
/// with 2.
async fn interrupted(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    out: &RunOutput,
) -> anyhow::Result<u8> {
    eprintln!("interrupted: cancelling run {run_id} (interrupt again to exit at once)");
    let cancel = async {
        let req = pb::CancelRunRequest {
            run_id: run_id.to_owned(),
            reason: "client interrupted".into(),
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(CANCEL_WAIT);
        client.cancel_run(req).await
    };
    let cancelled = tokio::select! {
        r = tokio::time::timeout(CANCEL_WAIT, cancel) => r,
        _ = util::shutdown_signal() => {
            eprintln!("interrupted again: exiting; run {run_id} may still be going");
            return Ok(exit::ERROR);
        }
    };
    match cancelled {
        Ok(Ok(_)) => {
            eprintln!("run {run_id} cancelled");
            let mut report = fetch_report(client, run_id).await?;
            if report.status == RunStatus::Passed || report.status == RunStatus::Failed {
                // The verdict came first: it stands.
                let code = exit_code(report.status);
                emit(&report, out)?;
                return Ok(code);
            }
            report.status = RunStatus::Cancelled;
            emit(&report, out)?;
            Ok(exit::FAILED)
        }
        Ok(Err(s)) => Err(refused(
            &format!("interrupted, and failed to cancel run {run_id}"),
            s,
        )),
        Err(_) => bail!("interrupted, and the cancel of run {run_id} did not land within {CANCEL_WAIT:?}"),
    }
}

/// An outage of the coordinator as a client that asks again sees it: when it began, and the
/// pause before the next try (200 ms, doubling up to 3 s). One that lasts `limit` is given up
/// on (at once, with a zero limit).
#[derive(Debug)]
struct Outage {
    limit: Duration,
    since: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Outage {
    const FIRST_PAUSE: Duration = Duration::from_millis(200);
    const LONGEST_PAUSE: Duration = Duration::from_secs(3);

    fn new(limit: Duration) -> Self {
        Self {
            limit,
            since: None,
            delay: Self::FIRST_PAUSE,
        }
    }

    /// The coordinator answered: true when that ends an outage.
    fn ended(&mut self) -> bool {
        self.delay = Self::FIRST_PAUSE;
        self.since.take().is_some()
    }

    /// The coordinator did not answer: `None` once the outage has lasted its limit (give up),
    /// else whether this try began it.
    fn lost(&mut self) -> Option<bool> {
        let began = self.since.is_none();
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        (since.elapsed() < self.limit).then_some(began)
    }

    /// Waits before the next try, longer each time.
    async fn pause(&mut self) {
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::LONGEST_PAUSE);
    }
}

/// Polls the deploy log until the deploy of `run_id` has ended.
async fn wait_for_deploy(
    ch: Channel,
    run_id: &str,
    reconnect_for: Duration,
) -> anyhow::Result<shardgate_common::report::DeployReport> {
    let mut gate = shardgate_common::pb::gate_service_client::GateServiceClient::new(ch);
    let mut outage = Outage::new(reconnect_for);
    loop {
        // Asks for this run's deploy; a coordinator that predates `run_id` sends its log.
        let ask = pb::ListDeploysRequest {
            limit: 1000,
            run_id: run_id.to_owned(),
        };
        match gate.list_deploys(ask).await {
            Ok(log) => {
                outage.ended();
                let d = log
                    .into_inner()
                    .deploys
                    .into_iter()
                    .find(|d| d.run_id == run_id)
                    .context("the gate passed but the run has no deploy")?;
                if d.state != "pending" && d.state != "running" {
                    return Ok(shardgate_common::report::DeployReport {
                        deploy_id: d.deploy_id,
                        state: d.state,
                        started_at_ms: d.started_at_ms,
                        finished_at_ms: d.finished_at_ms,
                        detail: d.detail,
                    });
                }
            }
            Err(s) if is_transient(&s) => {
                if outage.lost().is_none() {
                    return Err(refused("lost the coordinator while waiting for the rollout", s));
                }
            }
            Err(s) => return Err(refused("failed to follow the rollout", s)),
        }
        // The deploy log is polled at the same pace through an outage.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Follows a run's events until it ends, reconnecting through outages.
pub async fn follow(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    reconnect_for: Duration,
    progress: &mut Progress,
) -> anyhow::Result<pb::RunSummary> {
    let mut outage = Outage::new(reconnect_for);
    loop {
        let req = pb::WatchRunRequest {
            run_id: run_id.to_owned(),
        };
        match client.watch_run(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            if outage.ended() {
                                progress.note("reconnected to the coordinator");
                            }
                            progress.event(&ev);
                            if let Some(pb::run_event::Event::Finished(s)) = ev.event {
                                return Ok(s);
                            }
                        }
                        Ok(None) => break,
                        Err(s) if is_transient(&s) => break,
                        Err(s) => return Err(refused("failed to follow the run", s)),
                    }
                }
            }
            Err(s) if is_transient(&s) => {}
            Err(s) => return Err(refused("failed to follow the run", s)),
        }
        match outage.lost() {
            Some(true) => progress.note("lost the coordinator; reconnecting"),
            Some(false) => {}
            None => bail!(
                "the coordinator was unreachable for longer than --reconnect-for ({reconnect_for:?}); run {run_id} may still be going"
            ),
        }
        outage.pause().await;
    }
}

/// Fetches the run with its results, prints it, and maps the verdict to an exit code.
pub(crate) async fn report(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    out: &RunOutput,
) -> anyhow::Result<u8> {
    let report = fetch_report(client, run_id).await?;
    util::exit_on_closed_output(exit_code(report.status));
    emit(&report, out)?;
    Ok(exit_code(report.status))
}

/// Writes the report: JUnit to its file when asked, then text or JSON on stdout.
fn emit(report: &RunReport, out: &RunOutput) -> anyhow::Result<()> {
    if let Some(path) = &out.junit {
        std::fs::write(path, shardgate_common::junit::to_junit(report))
            .with_context(|| format!("failed to write JUnit XML to {}", path.display()))?;
    }
    print_report(report, out.json)?;
    Ok(())
}

async fn fetch_report(client: &mut RunServiceClient<Channel>, run_id: &str) -> anyhow::Result<RunReport> {
    fetch_report_through_outages(client, run_id, Duration::ZERO).await
}

/// The same, asking again through an outage of up to `reconnect_for` (a coordinator that
/// restarts or fails over just as the run ends).
async fn fetch_report_through_outages(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    reconnect_for: Duration,
) -> anyhow::Result<RunReport> {
    let mut outage = Outage::new(reconnect_for);
    let resp = loop {
        let req = pb::GetRunRequest {
            run_id: run_id.to_owned(),
            include_results: true,
        };
        match client.get_run(req).await {
            Ok(resp) => break resp.into_inner(),
            Err(s) if is_transient(&s) => {
                if outage.lost().is_none() {
                    return Err(refused("failed to get the run", s));
                }
            }
            Err(s) => return Err(refused("failed to get the run", s)),
        }
        outage.pause().await;
    };
    let run = resp.run.context("the coordinator sent a run without a summary")?;
    Ok(RunReport::new(&run, &resp.results))
}

pub fn exit_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Passed => exit::PASSED,
        RunStatus::Failed | RunStatus::Cancelled => exit::FAILED,
        RunStatus::Errored | RunStatus::Queued | RunStatus::Running => exit::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_outage_backs_off_and_is_given_up_after_its_limit() {
        let mut outage = Outage::new(Duration::from_secs(5));
        assert_eq!(outage.lost(), Some(true), "the first failed try begins it");
        let started = tokio::time::Instant::now();
        let mut pauses = Vec::new();
        while outage.lost().is_some() {
            let before = tokio::time::Instant::now();
            outage.pause().await;
            pauses.push(before.elapsed().as_millis());
        }
        assert_eq!(pauses, [200, 400, 800, 1600, 3000], "doubling up to 3 s");
        assert!(started.elapsed() >= Duration::from_secs(5));
        // An answer ends it, and the next outage starts from the first pause again.
        assert!(outage.ended());
        assert!(!outage.ended(), "no outage to end");
        assert_eq!(outage.lost(), Some(true));
        let before = tokio::time::Instant::now();
        outage.pause().await;
        assert_eq!(before.elapsed(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_limit_gives_up_at_the_first_failure() {
        assert_eq!(Outage::new(Duration::ZERO).lost(), None);
    }
}
