//! False reds from flaky tests, through the real scheduling core (in-memory store, so the
//! flakiness history it keeps is the one it uses). A suite of 2,000 tests of which 2 % are
//! flaky, each failing an attempt with a 10 % chance, none truly broken, runs again and again;
//! every policy runs the same seeded sequence side by side. A second phase breaks one random
//! test per run (possibly a flaky one) and checks every such run is red.
//!
//! Expected figures, from the policy: a test with no flaky history is red after `r + 1`
//! failures in a row (`p^(r+1)`); with a history, after `rf + 1`. A flaky test that flaked in an
//! earlier run has a history, so the false-red rate falls as the history fills: for the history
//! each run starts with, `P(red) = 1 - Π_flaky (1 - p^(attempts))`.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, pb};
use shardgate_coordinator::core::Core;
use shardgate_coordinator::model::Now;
use shardgate_coordinator::store::SqliteStore;
use shardgate_coordinator::{CoreConfig, actor};

#[derive(Debug, Clone, clap::Args)]
pub struct FlakyArgs {
    /// Runs of the suite per policy.
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
    #[arg(long, default_value_t = 2000)]
    pub tests: usize,
    /// Share of the tests that are flaky.
    #[arg(long, default_value_t = 0.02)]
    pub flaky_share: f64,
    /// Chance that one attempt of a flaky test fails.
    #[arg(long, default_value_t = 0.10)]
    pub fail_chance: f64,
    /// Runs with one truly broken test, per policy.
    #[arg(long, default_value_t = 200)]
    pub broken_runs: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only the policies whose name contains this (e.g. `default`).
    #[arg(long)]
    pub only: Option<String>,
}

struct Policy {
    name: &'static str,
    retries: u32,
    flaky_retries: u32,
}

#[derive(Default)]
struct Tally {
    runs: usize,
    red: usize,
    red_after_warmup: usize,
    attempts: u64,
    base: u64,
    broken_runs: usize,
    broken_caught: usize,
    expected_red: f64,
    expected_after_warmup: f64,
}

pub fn run(a: FlakyArgs) -> anyhow::Result<()> {
    let policies = [
        Policy {
            name: "no retries",
            retries: 0,
            flaky_retries: 0,
        },
        Policy {
            name: "2 fixed retries",
            retries: 2,
            flaky_retries: 2,
        },
        Policy {
            name: "4 fixed retries",
            retries: 4,
            flaky_retries: 4,
        },
        Policy {
            name: "default: 2, 4 if flaky history",
            retries: 2,
            flaky_retries: 4,
        },
    ];
    let flaky_n = (a.tests as f64 * a.flaky_share).round() as usize;
    let warmup = a.runs / 10;
    println!(
        "false reds: {} tests, {flaky_n} flaky failing {:.0} % of attempts, none broken; {} runs per policy (first {warmup} are warm-up), seed {}",
        a.tests,
        a.fail_chance * 100.0,
        a.runs,
        a.seed
    );
    println!(
        "  {:<32} {:>8} {:>10} {:>10} {:>11} {:>11} {:>10} {:>14}",
        "policy",
        "red runs",
        "per 1,000",
        "expected",
        "after w-up",
        "expected",
        "extra time",
        "broken caught"
    );
    for p in policies
        .iter()
        .filter(|p| a.only.as_ref().is_none_or(|o| p.name.contains(o.as_str())))
    {
        let started = Instant::now();
        let t = simulate(&a, p, flaky_n, warmup)?;
        let per_k = |n: usize, runs: usize| 1000.0 * n as f64 / runs.max(1) as f64;
        println!(
            "  {:<32} {:>8} {:>10.2} {:>10.2} {:>11.2} {:>11.2} {:>8.2} % {:>8}/{:<5} ({:.0} s)",
            p.name,
            t.red,
            per_k(t.red, t.runs),
            1000.0 * t.expected_red / t.runs as f64,
            per_k(t.red_after_warmup, t.runs - warmup),
            1000.0 * t.expected_after_warmup / (t.runs - warmup) as f64,
            100.0 * (t.attempts - t.base) as f64 / t.base as f64,
            t.broken_caught,
            t.broken_runs,
            started.elapsed().as_secs_f64()
        );
        if t.broken_caught != t.broken_runs {
            anyhow::bail!("policy '{}' let a broken test through", p.name);
        }
    }
    println!(
        "  (per 1,000: false-red runs per 1,000 runs, measured; expected: what the policy gives for the history each run had; after w-up: the same after the warm-up runs)"
    );
    Ok(())
}

fn simulate(a: &FlakyArgs, p: &Policy, flaky_n: usize, warmup: usize) -> anyhow::Result<Tally> {
    let mut rng = StdRng::seed_from_u64(a.seed);
    let cfg = CoreConfig {
        retries: p.retries,
        flaky_retries: p.flaky_retries,
        ..CoreConfig::default()
    };
    let now0 = Now::real();
    let mut core = Core::open(cfg, SqliteStore::open(std::path::Path::new(":memory:"))?, now0)?;
    let worker = crate::sim::register_exec_worker(&mut core, "sim", 64, now0)?;
    let ids: Vec<String> = (0..a.tests).map(|i| format!("t/{i:04}")).collect();
    // The flaky tests are spread over the suite.
    let step = a.tests / flaky_n.max(1);
    let is_flaky = |i: usize| flaky_n > 0 && i.is_multiple_of(step) && i / step < flaky_n;
    let mut has_history = vec![false; a.tests];
    let mut t = Tally::default();
    let q = a.fail_chance;
    for k in 0..a.runs + a.broken_runs {
        let broken = (k >= a.runs).then(|| rng.random_range(0..a.tests));
        // The policy's own expectation for this run, from what the history holds now.
        if broken.is_none() {
            // P(red) = 1 - P(every flaky test passes within its attempts).
            let green: f64 = (0..a.tests)
                .filter(|&i| is_flaky(i))
                .map(|i| {
                    let r = if has_history[i] {
                        p.retries.max(p.flaky_retries)
                    } else {
                        p.retries
                    };
                    1.0 - q.powi(r as i32 + 1)
                })
                .product();
            let e = 1.0 - green;
            t.expected_red += e;
            if k >= warmup {
                t.expected_after_warmup += e;
            }
        }
        let now = now0.after(std::time::Duration::from_secs(60 * k as u64));
        let run: RunId = core
            .submit(
                pb::SubmitRunRequest {
                    suite: "flaky".into(),
                    revision: format!("r{k}"),
                    runner: "exec".into(),
                    tests: ids.clone(),
                    ..Default::default()
                },
                now,
            )?
            .run_id
            .parse()?;
        let mut in_batch = 0;
        core.begin_batch()?;
        while let Some(shard) = core.acquire(worker, now)? {
            let attempt: AttemptId = shard.attempt_id.parse()?;
            let results = shard
                .tests
                .iter()
                .map(|id| {
                    let i: usize = id[2..].parse().expect("our ids");
                    let fails = broken == Some(i) || (is_flaky(i) && rng.random_bool(q));
                    t.attempts += 1;
                    pb::TestResult {
                        test_id: id.clone(),
                        outcome: if fails { Outcome::Failed } else { Outcome::Passed }.to_wire(),
                        duration_ms: 1,
                        ..Default::default()
                    }
                })
                .collect();
            core.report(worker, attempt, results, now)?;
            core.finish(worker, attempt, "", false, now)?;
            in_batch += 1;
            if in_batch == actor::MAX_BATCH {
                core.commit_batch()?;
                core.begin_batch()?;
                in_batch = 0;
            }
        }
        core.commit_batch()?;
        t.base += a.tests as u64;
        let resp = core.get_run(run, true)?;
        let status = RunStatus::from_wire(resp.run.as_ref().map(|r| r.status).unwrap_or(0));
        let red = status != Some(RunStatus::Passed);
        for r in &resp.results {
            if Outcome::from_wire(r.outcome) == Some(Outcome::Flaky) {
                let i: usize = r.test_id[2..].parse()?;
                has_history[i] = true;
            }
        }
        match broken {
            None => {
                t.runs += 1;
                if red {
                    t.red += 1;
                    if k >= warmup {
                        t.red_after_warmup += 1;
                    }
                }
            }
            Some(_) => {
                t.broken_runs += 1;
                if red {
                    t.broken_caught += 1;
                }
            }
        }
        // A run left open would hold its tests; every run must end.
        anyhow::ensure!(status.is_some_and(RunStatus::is_terminal), "run {k} did not end");
    }
    Ok(t)
}
