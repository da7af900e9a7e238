//! The chaos benchmark: many faulted runs on real coordinator and worker processes with the
//! coordinator's default lease and heartbeat, in several clusters side by side (the tests
//! sleep, so clusters barely compete for CPU). Prints the faults injected, what the history
//! checker found (lost and double-counted results must be 0), how long the coordinator took to
//! take a dead or cut-off worker's shards back, and the extra work the faults caused.

use std::time::Duration;

use shardgate_testkit::chaos::{ChaosConfig, ChaosReport, campaign};

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Faulted runs in all.
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Clusters running side by side; the runs are split between them.
    #[arg(long, default_value_t = 5)]
    pub parallel: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Workers per cluster (two slots each).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Tests per run, each sleeping 0.1–0.8 s.
    #[arg(long, default_value_t = 40)]
    pub tests: usize,
    /// The coordinator's lease and heartbeat (its defaults).
    #[arg(long, default_value = "10s")]
    pub lease: String,
    #[arg(long, default_value = "2s")]
    pub heartbeat: String,
    #[arg(long)]
    pub json: bool,
    /// Two coordinators on one PostgreSQL database (a server of the bench's own), with the
    /// leader killed, the leader cut off from the database and the standby killed among the
    /// faults; prints the failover times too.
    #[arg(long)]
    pub failover: bool,
}

pub fn run(a: ChaosArgs) -> anyhow::Result<()> {
    let parallel = a.parallel.clamp(1, a.runs.max(1));
    let handles: Vec<_> = (0..parallel)
        .map(|p| {
            let runs = a.runs / parallel + usize::from(p < a.runs % parallel);
            let cfg = ChaosConfig {
                seed: a.seed.wrapping_mul(1000).wrapping_add(p as u64),
                runs,
                workers: a.workers,
                slots: 2,
                tests: a.tests,
                test_ms: (100, 800),
                lease: a.lease.clone(),
                heartbeat: a.heartbeat.clone(),
                duplicate_reports: 0.1,
                delay_reports: 0.05,
                report_delay: "1s".into(),
                run_deadline: Duration::from_secs(300),
                failover: a.failover,
            };
            std::thread::spawn(move || campaign(&cfg))
        })
        .collect();
    let mut all = ChaosReport::default();
    for h in handles {
        all.merge(h.join().map_err(|_| anyhow::anyhow!("a campaign panicked"))?);
    }
    let q = |x: f64| all.requeue_quantile(x).map(|d| d.as_secs_f64());
    let fq = |x: f64| all.failover_quantile(x).map(|d| d.as_secs_f64());
    let extra = all.extra_ms as f64 / all.work_ms.max(1) as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "runs": all.runs,
                "faults": all.faults,
                "faults_total": all.faults_total(),
                "lost_results": all.lost_results,
                "double_counted": all.double_counted,
                "unexpected_results": all.unexpected_results,
                "phantom_results": all.phantom_results,
                "wrong_outcomes": all.wrong_outcomes,
                "wrong_verdicts": all.wrong_verdicts,
                "requeue_s": {"p50": q(0.5), "p95": q(0.95), "max": q(1.0), "n": all.requeue_times.len()},
                "requeue_by_fault_s": all.requeue_by.iter().map(|(k, v)| (k.to_string(), serde_json::json!({
                    "p50": all.requeue_quantile_of(k, 0.5).map(|d| d.as_secs_f64()),
                    "max": all.requeue_quantile_of(k, 1.0).map(|d| d.as_secs_f64()),
                    "n": v.len(),
                }))).collect::<serde_json::Map<_, _>>(),
                "failover_s": {"p50": fq(0.5), "max": fq(1.0), "n": all.failover_times.len()},
                "wrong_rollouts": all.wrong_rollouts,
                "extra_work": extra,
                "wall_s": all.wall.as_secs_f64(),
                "skipped_faults": all.skipped_faults,
                "problems": all.problems,
            })
        );
    } else {
        println!(
            "chaos: {} faulted runs in {} clusters (seed {}), lease {} / heartbeat {}, {:.0} s",
            all.runs,
            parallel,
            a.seed,
            a.lease,
            a.heartbeat,
            all.wall.as_secs_f64()
        );
        println!(
            "faults injected: {} ({} more found no live worker to hit)",
            all.faults_total(),
            all.skipped_faults
        );
        for (k, v) in &all.faults {
            println!("  {k:<45} {v:>6}");
        }
        println!("history checker:");
        for (k, v, must_be_zero) in [
            ("lost results", all.lost_results, true),
            ("double-counted results", all.double_counted, true),
            ("results for tests never submitted", all.unexpected_results, true),
            ("results for tests that never ran", all.phantom_results, true),
            ("outcomes unlike a fault-free run", all.wrong_outcomes, true),
            ("verdicts unlike a fault-free run", all.wrong_verdicts, true),
            (
                "rollout hooks run twice, or for a red run",
                all.wrong_rollouts,
                true,
            ),
        ] {
            let mark = if must_be_zero && v > 0 {
                "  <-- must be 0"
            } else {
                ""
            };
            println!("  {k:<45} {v:>6}{mark}");
        }
        let fmt = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
        println!(
            "death/cut -> shards requeued ({} busy workers): p50 {}, p95 {}, max {} (target <= 15 s)",
            all.requeue_times.len(),
            fmt(q(0.5)),
            fmt(q(0.95)),
            fmt(q(1.0))
        );
        for (fault, times) in &all.requeue_by {
            println!(
                "  after {fault}: p50 {}, max {} ({} busy workers)",
                fmt(all.requeue_quantile_of(fault, 0.5).map(|d| d.as_secs_f64())),
                fmt(all.requeue_quantile_of(fault, 1.0).map(|d| d.as_secs_f64())),
                times.len()
            );
        }
        if a.failover {
            println!(
                "leader killed/cut -> standby leads ({} failovers): p50 {}, max {} (target <= 15 s)",
                all.failover_times.len(),
                fmt(fq(0.5)),
                fmt(fq(1.0))
            );
        }
        println!(
            "extra work: {:.1} % ({:.0} s re-run beyond a fault-free run's {:.0} s)",
            100.0 * extra,
            all.extra_ms as f64 / 1000.0,
            all.work_ms as f64 / 1000.0
        );
        for p in all.problems.iter().take(20) {
            println!("PROBLEM: {p}");
        }
    }
    if !all.is_clean() {
        if let Ok(path) = std::env::var("SHARDGATE_CHAOS_LOGS") {
            std::fs::write(&path, all.logs.join("\n"))?;
            eprintln!("logs written to {path}");
        }
        anyhow::bail!("the history checker found problems (set SHARDGATE_CHAOS_LOGS=FILE for the logs)");
    }
    Ok(())
}
