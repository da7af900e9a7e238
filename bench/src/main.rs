//! `shardgate-bench`: measurements that back shardgate's speed claims, each printing ratios
//! measured side by side in one run.
//!
//! - `sim`: scheduling strategies on the same synthetic workloads in simulated time.
//! - `chaos`: faulted runs on real processes, checked by the history checker.
//! - `flaky`: false reds per retry policy on a suite with flaky tests.
//! - `reads`: hand-out latency with readers and during a large submission.
//! - `checkouts`: a worktree per revision against the shared-directory profile.

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod chaos;
mod checkouts;
mod flaky;
mod load;
mod mem;
mod peers;
mod reads;
mod real;
mod sim;
mod watchers;
mod workload;

#[derive(Debug, Parser)]
#[command(name = "shardgate-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Strategies side by side on the IMVU shape, then sweeps over σ and the number of slots.
    Sim(SimArgs),
    /// The real scheduling core (no network) on a very large run: time per hand-out and memory.
    Scale(ScaleArgs),
    /// A real coordinator over gRPC under many simulated workers: results and hand-outs per second.
    Load(load::LoadArgs),
    /// The coordinator and real worker processes running sleep-based exec tests, twice.
    Real(real::RealArgs),
    /// Faulted runs on real processes, checked for lost and double-counted results.
    Chaos(chaos::ChaosArgs),
    /// False-red rate of retry policies on a suite with flaky tests, through the real core.
    Flaky(flaky::FlakyArgs),
    /// Hand-out latency alone, with 50 readers of a 100,000-test run, and during a
    /// 1,000,000-test submission.
    Reads(reads::ReadsArgs),
    /// A 50,000-test run alone, then followed by 200 watchers (gRPC and server-sent events):
    /// makespan and hand-out latency side by side.
    Watchers(watchers::WatchersArgs),
    /// `shardgate local` against `pytest -n N` and `cargo nextest run -j N`: first and later runs.
    Peers(peers::PeersArgs),
    /// A worktree per revision against the shared-directory profile: time to the first result
    /// on a new, the same and the previous revision, and the disk each holds.
    Checkouts(checkouts::CheckoutsArgs),
}

#[derive(Debug, clap::Args)]
struct ScaleArgs {
    #[arg(long, default_value_t = 1_000_000)]
    tests: usize,
    #[arg(long, default_value_t = 2000)]
    workers: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct SimArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-hand-out overhead in milliseconds.
    #[arg(long, default_value_t = 500.0)]
    overhead_ms: f64,
    /// Slots for the IMVU table.
    #[arg(long, default_value_t = 36)]
    slots: usize,
    /// Only the IMVU shape, no sweeps.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sim(a) => run_sim(a),
        Command::Scale(a) => run_scale(a),
        Command::Load(a) => tokio::runtime::Runtime::new()?.block_on(load::run(a)),
        Command::Real(a) => real::run(a),
        Command::Chaos(a) => chaos::run(a),
        Command::Flaky(a) => flaky::run(a),
        Command::Reads(a) => tokio::runtime::Runtime::new()?.block_on(reads::run(a)),
        Command::Watchers(a) => tokio::runtime::Runtime::new()?.block_on(watchers::run(a)),
        Command::Peers(a) => peers::run(a),
        Command::Checkouts(a) => checkouts::run(a),
    }
}

fn print_table(title: &str, rows: &[sim::Result]) {
    println!("\n{title}");
    println!(
        "  {:<24} {:>10} {:>8} {:>9} {:>7} {:>14}",
        "strategy", "makespan", "÷ LB", "hand-outs", "idle", "first failure"
    );
    for r in rows {
        let ff = r
            .first_failure_ms
            .map(|f| format!("{:.0} s", f / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<24} {:>8.0} s {:>7.3}× {:>9} {:>6.1}% {:>14}",
            r.strategy,
            r.makespan_ms / 1000.0,
            r.ratio,
            r.handouts,
            r.idle_share * 100.0,
            ff
        );
    }
}

fn run_sim(a: SimArgs) -> anyhow::Result<()> {
    let mut report = serde_json::Map::new();
    let shape = workload::Shape::imvu(a.seed);
    let w = workload::generate(&shape);
    let slots = a.slots;
    let rows = sim::compare(&w, slots, a.overhead_ms)?;
    print_table(
        &format!(
            "IMVU shape: {} tests, {:.2} machine-hours, longest {:.0} s, {slots} slots, LB {:.0} s, {} ms per hand-out, seed {}",
            shape.tests,
            w.total_ms() / 3_600_000.0,
            w.longest_ms() / 1000.0,
            w.lower_bound_ms(slots) / 1000.0,
            a.overhead_ms,
            a.seed
        ),
        &rows,
    );
    report.insert("imvu".into(), serde_json::to_value(&rows)?);

    // The first run of the suite: nothing has history; the run learns from its own results.
    // Giants (0.1 % of the tests at 100–300× the mean, in any file) are a tail that no order
    // can foresee without history, so the shape is also shown without them.
    for (label, key, giants) in [
        (
            "No history: the same shape's first run",
            "no_history",
            shape.giants,
        ),
        ("No history, no giants", "no_history_no_giants", 0.0),
    ] {
        let wc = workload::generate(&workload::Shape {
            new: 1.0,
            giants,
            ..shape
        });
        let cold = vec![
            sim::static_count(&wc, slots, a.overhead_ms),
            sim::greedy_one(&wc, slots, a.overhead_ms),
            sim::shardgate(&wc, slots, a.overhead_ms, false)?,
        ];
        print_table(
            &format!("{label} (LB {:.0} s)", wc.lower_bound_ms(slots) / 1000.0),
            &cold,
        );
        report.insert(key.into(), serde_json::to_value(&cold)?);
    }

    // Fail-first: 1 % of the tests failed recently and fail again.
    let ff_shape = workload::Shape {
        recent_failures: 0.01,
        ..shape
    };
    let wf = workload::generate(&ff_shape);
    let ff = vec![
        sim::greedy_one(&wf, slots, a.overhead_ms),
        sim::shardgate(&wf, slots, a.overhead_ms, false)?,
        sim::shardgate(&wf, slots, a.overhead_ms, true)?,
    ];
    print_table(
        "Fail-first: the same shape with 1 % of tests failing again after a recent failure",
        &ff,
    );
    report.insert("fail_first".into(), serde_json::to_value(&ff)?);

    if !a.quick {
        let slots = 36;
        let mut sweep = Vec::new();
        for sigma in [1.0, 1.2, 1.4, 1.6, 1.8, 2.0] {
            let w = workload::generate(&workload::Shape { sigma, ..shape });
            let rows = sim::compare(&w, slots, a.overhead_ms)?;
            print_table(
                &format!(
                    "σ = {sigma}, {slots} slots, LB {:.0} s",
                    w.lower_bound_ms(slots) / 1000.0
                ),
                &rows,
            );
            sweep.push(serde_json::json!({ "sigma": sigma, "slots": slots, "results": rows }));
        }
        for slots in [8, 16, 36, 64, 128, 256, 512] {
            let rows = sim::compare(&w, slots, a.overhead_ms)?;
            print_table(
                &format!(
                    "σ = 1.6, {slots} slots, LB {:.0} s",
                    w.lower_bound_ms(slots) / 1000.0
                ),
                &rows,
            );
            sweep.push(serde_json::json!({ "sigma": 1.6, "slots": slots, "results": rows }));
        }
        println!("\nSweep summary: makespan ÷ LB per strategy");
        let names = [
            "static count",
            "static hash",
            "static timing (LPT)",
            "queue, one test a time",
            "shardgate",
        ];
        println!("  {:<22} {}", "point", names.map(|n| format!("{n:>24}")).join(""));
        for p in &sweep {
            let label = format!("σ {} · {} slots", p["sigma"], p["slots"]);
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    p["results"]
                        .as_array()
                        .and_then(|rs| rs.iter().find(|r| r["strategy"] == *n))
                        .and_then(|r| r["ratio"].as_f64())
                        .map(|x| format!("{:>23.3}×", x))
                        .unwrap_or_default()
                })
                .collect();
            println!("  {label:<22} {}", cells.join(""));
        }
        report.insert("sweeps".into(), serde_json::Value::Array(sweep));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn run_scale(a: ScaleArgs) -> anyhow::Result<()> {
    let shape = workload::Shape {
        tests: a.tests,
        machine_hours: a.tests as f64 * 1.056 / 3600.0,
        ..workload::Shape::imvu(a.seed)
    };
    let w = workload::generate(&shape);
    let dir = tempfile::tempdir()?;
    let store = shardgate_coordinator::store::SqliteStore::open(&dir.path().join("scale.db"))?;
    let before = mem::rss_bytes();
    let started = std::time::Instant::now();
    let mut run = sim::drive_core(&w, a.workers, 500.0, false, store)?;
    let wall = started.elapsed().as_secs_f64();
    let peak = mem::peak_rss_bytes();
    let n = run.acquire_ns.len();
    let p50 = mem::quantile(&mut run.acquire_ns, 0.5);
    let p99 = mem::quantile(&mut run.acquire_ns, 0.99);
    let max = mem::quantile(&mut run.acquire_ns, 1.0);
    println!(
        "scale: {} tests, {} workers, real scheduling core and SQLite store, no network",
        a.tests, a.workers
    );
    println!("  submit (validate, store, plan)   {:.2} s", run.submit_s);
    println!("  hand-outs                        {n}");
    println!(
        "  time per hand-out                p50 {:.1} µs, p99 {:.1} µs, max {:.1} ms",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3,
        max as f64 / 1e6
    );
    println!(
        "  memory                           {:.0} B per test after submit; peak RSS {:.0} MiB (workload itself included)",
        (run.rss_after_submit.saturating_sub(before)) as f64 / a.tests as f64,
        peak as f64 / (1024.0 * 1024.0)
    );
    println!("  simulated makespan / LB          {:.3}×", run.result.ratio);
    println!(
        "  wall time for the whole run      {wall:.1} s ({:.0} results stored per second)",
        a.tests as f64 / wall
    );
    Ok(())
}
