//! The scheduler with real processes: a `shardgate-coordinator` process and N
//! `shardgate-worker` processes on this machine run a suite of sleep-based exec tests twice —
//! the first run with no history, the second with the history of the first — and each run's
//! measured makespan is set against its lower bound computed from the durations measured in
//! that same run.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::workload::{lower_bound_ms, normal};

#[derive(Debug, Clone, clap::Args)]
pub struct RealArgs {
    /// Worker processes (one slot each).
    #[arg(long, default_value_t = 36)]
    pub workers: usize,
    /// Tests in the suite.
    #[arg(long, default_value_t = 600)]
    pub tests: usize,
    /// Aim for a run of about this many seconds at the lower bound.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How durations relate to the suite's layout: `files` (tests of one directory resemble
    /// each other, and the two long tests sit in the slowest one, listed last), `scattered`
    /// (durations independent of the layout, a long test listed last: nothing can tell it is
    /// long before it runs), or `both`, one after the other.
    #[arg(long, value_enum, default_value_t = Layout::Both)]
    pub shape: Layout,
    /// Keep the coordinator's database here (its shard log shows each hand-out), instead of
    /// in a temporary directory.
    #[arg(long)]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Layout {
    Files,
    Scattered,
    Both,
}

/// Tests per directory in the `files` layout.
const PER_FILE: usize = 15;

/// The directory that holds this binary and its siblings (`cargo build --release` builds all).
pub(crate) fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("binary has no directory")?.to_owned())
}

fn cpu_seconds(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat: user and system time in clock ticks (100 per second).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes the suite; returns its ids and the total of its sleeps in seconds.
fn write_suite(root: &Path, a: &RealArgs, layout: Layout) -> anyhow::Result<(Vec<String>, f64)> {
    let mut rng = StdRng::seed_from_u64(a.seed);
    let files = a.tests.div_ceil(PER_FILE);
    // Per-directory factors, the slowest directory last (`files` only).
    let mut factor: Vec<f64> = match layout {
        Layout::Files => (0..files).map(|_| 0.6 * normal(&mut rng)).collect(),
        _ => vec![0.0; files],
    };
    let slowest = factor.iter().copied().fold(f64::MIN, f64::max);
    if let Some(last) = factor.iter().position(|&f| f == slowest) {
        factor.swap(last, files - 1);
    }
    // Log-normal (σ = 1) with two long tests, scaled to about `seconds` per slot in total.
    let mut d: Vec<f64> = (0..a.tests)
        .map(|i| {
            let z = match layout {
                Layout::Files => factor[i / PER_FILE] + 0.8 * normal(&mut rng),
                _ => normal(&mut rng),
            };
            // Capped at 2.5 σ, so the lower bound is the work per slot rather than one test.
            z.min(2.5).exp()
        })
        .collect();
    let scale = a.seconds * a.workers as f64 * 0.9 / d.iter().sum::<f64>();
    for x in &mut d {
        *x *= scale;
    }
    // Two long tests at 40 % of the target run time, placed late in the list.
    let n = d.len();
    d[n - 1] = a.seconds * 0.4;
    match layout {
        Layout::Files => d[n - 2] = a.seconds * 0.4,
        _ => d[n / 2] = a.seconds * 0.4,
    }
    let mut ids = Vec::new();
    for (i, secs) in d.iter().enumerate() {
        let id = match layout {
            Layout::Files => format!("dir{:02}/t{i:04}.sh", i / PER_FILE),
            _ => format!("group{:02}/t{i:04}.sh", i % 17),
        };
        let p = root.join(&id);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, format!("#!/bin/sh\nsleep {secs:.3}\n"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        ids.push(id);
    }
    Ok((ids, d.iter().sum()))
}

pub fn run(a: RealArgs) -> anyhow::Result<()> {
    let bins = bin_dir()?;
    for b in ["shardgate", "shardgate-coordinator", "shardgate-worker"] {
        if !bins.join(b).exists() {
            bail!(
                "{} not found next to this binary: run `cargo build --release` in the workspace first",
                b
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("suite");
    let layouts = match a.shape {
        Layout::Both => vec![Layout::Files, Layout::Scattered],
        one => vec![one],
    };
    let mut suites = Vec::new();
    for &layout in &layouts {
        let (ids, nominal) = write_suite(&root, &a, layout)?;
        let list = dir.path().join(format!("tests-{layout:?}.txt"));
        std::fs::write(&list, ids.join("\n"))?;
        suites.push((layout, list, nominal));
    }

    let log = |name: &str| std::fs::File::create(dir.path().join(name));
    let mut coordinator = Command::new(bins.join("shardgate-coordinator"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--db")
        .arg(a.db.clone().unwrap_or_else(|| dir.path().join("db.sqlite")))
        .stdout(Stdio::piped())
        .stderr(log("coordinator.log")?)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(coordinator.stdout.take().unwrap()).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).context("coordinator did not start")?;
    let url = format!("http://{}", ready["grpc_addr"].as_str().unwrap_or_default());
    let pid = coordinator.id();
    let mut procs = Procs(vec![coordinator]);
    for i in 0..a.workers {
        procs.0.push(
            Command::new(bins.join("shardgate-worker"))
                .args([
                    "--coordinator",
                    &url,
                    "--name",
                    &format!("w{i:02}"),
                    "--slots",
                    "1",
                ])
                .arg("--exec-root")
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(log(&format!("worker-{i}.log"))?)
                .spawn()?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(bins.join("shardgate"))
            .args(["workers", "--coordinator", &url, "--json"])
            .output()?;
        let live = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter(|w| w["state"] == "live").count())
            })
            .unwrap_or(0);
        if live == a.workers {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {live} of {} workers registered", a.workers);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (layout, list, nominal) in &suites {
        println!(
            "real, {} layout: {} worker processes (1 slot each), {} sleep-based exec tests ({:.0} s of sleep in all), one coordinator process",
            format!("{layout:?}").to_lowercase(),
            a.workers,
            a.tests,
            nominal
        );
        run_twice(&bins, &url, pid, &format!("real-{layout:?}"), list, a.workers)?;
    }
    Ok(())
}

/// Runs the suite in `list` twice, the first time with no history, and prints each run's
/// makespan against its lower bound.
fn run_twice(
    bins: &Path,
    url: &str,
    pid: u32,
    suite: &str,
    list: &Path,
    workers: usize,
) -> anyhow::Result<()> {
    println!(
        "  {:<28} {:>10} {:>10} {:>8} {:>9} {:>14}",
        "run", "makespan", "LB", "÷ LB", "hand-outs", "coord. CPU"
    );
    for (label, first) in [("first run (no history)", true), ("second run (history)", false)] {
        let cpu_before = cpu_seconds(pid);
        let out = Command::new(bins.join("shardgate"))
            .args([
                "run",
                "--coordinator",
                url,
                "--runner",
                "exec",
                "--suite",
                suite,
                "--json",
                "--tests-file",
            ])
            .arg(list)
            .stderr(Stdio::null())
            .output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("run printed no JSON")?;
        if report["verdict"] != "passed" {
            bail!("the run did not pass: {}", report["verdict"]);
        }
        let cpu = cpu_seconds(pid) - cpu_before;
        let tests = report["tests"].as_array().context("no tests")?;
        let durations: Vec<f64> = tests
            .iter()
            .map(|t| t["duration_ms"].as_f64().unwrap_or(0.0))
            .collect();
        let lb = lower_bound_ms(&durations, workers);
        let makespan = report["makespan_ms"].as_f64().unwrap_or(0.0);
        let handouts = report["shards"].as_u64().unwrap_or(0);
        println!(
            "  {label:<28} {:>8.1} s {:>8.1} s {:>7.3}× {:>9} {:>12.2} s",
            makespan / 1000.0,
            lb / 1000.0,
            makespan / lb,
            handouts,
            cpu
        );
        if first {
            let b = blind_orders(&durations, workers, BLIND_ORDERS);
            println!(
                "  {:<28} median {:.3}×, p10–p90 {:.3}–{:.3}×, within 1.10× in {:.1} % of them",
                format!("{BLIND_ORDERS} duration-blind orders"),
                b.median,
                b.p10,
                b.p90,
                b.within_110 * 100.0
            );
        }
    }
    Ok(())
}

/// How many random orders [`blind_orders`] tries.
const BLIND_ORDERS: usize = 1000;

/// Makespan ÷ lower bound of an order that knows nothing of durations, over random orders.
#[derive(Debug, Clone, Copy)]
struct Blind {
    p10: f64,
    median: f64,
    p90: f64,
    /// Share of the orders within 1.10× of the lower bound.
    within_110: f64,
}

/// What a scheduler that cannot tell tests apart before they run could do with these measured
/// durations at best: each of `orders` random orders handed out one test at a time to the
/// first free of `slots` slots, at no cost per hand-out. When durations are independent of
/// the tests' names, every order such a scheduler may choose is one of these, so their spread
/// is the first run's floor; a run below it learned something.
fn blind_orders(durations: &[f64], slots: usize, orders: usize) -> Blind {
    use rand::seq::SliceRandom;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let slots = slots.max(1);
    let lb = lower_bound_ms(durations, slots);
    if lb <= 0.0 || orders == 0 {
        return Blind {
            p10: 1.0,
            median: 1.0,
            p90: 1.0,
            within_110: 1.0,
        };
    }
    let mut rng = StdRng::seed_from_u64(1);
    let mut order = durations.to_vec();
    let mut ratios: Vec<f64> = (0..orders)
        .map(|_| {
            order.shuffle(&mut rng);
            // Free times in whole microseconds, so the heap orders integers.
            let mut free: BinaryHeap<Reverse<u64>> = (0..slots).map(|_| Reverse(0)).collect();
            for d in &order {
                let Reverse(t) = free.pop().expect("one entry per slot");
                free.push(Reverse(t + (d * 1000.0) as u64));
            }
            let end = free.into_iter().map(|Reverse(t)| t).max().unwrap_or(0);
            end as f64 / 1000.0 / lb
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    Blind {
        p10: at(0.1),
        median: at(0.5),
        p90: at(0.9),
        within_110: ratios.iter().filter(|&&r| r <= 1.10).count() as f64 / ratios.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blind_orders_find_no_better_than_the_bound_and_suffer_from_a_giant() {
        // Equal tests: every order is at the bound.
        let b = blind_orders(&[10.0; 40], 4, 50);
        assert!((b.median - 1.0).abs() < 1e-9 && b.within_110 == 1.0, "{b:?}");
        // One giant worth a slot's whole share, among equal tests: it lands at a random place,
        // so most orders start it late.
        let mut d = vec![1.0; 300];
        d.push(100.0);
        let b = blind_orders(&d, 4, 400);
        assert!(b.median > 1.3 && b.p10 >= 1.0 && b.p90 > b.median, "{b:?}");
        assert!(b.within_110 < 0.2, "{b:?}");
    }
}
