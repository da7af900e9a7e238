//! `shardgate-bench checkouts`: what a workspace per revision costs, side by side with the
//! shared-directory profile, on a generated git repository of many files.
//!
//! Both set-ups run the same one-test JUnit suite through the worker's own runner (no
//! coordinator: what is measured is the worker's path from a shard to its first result). For
//! each of `--revisions` commits, in order: a shard of the new revision, a second shard of it
//! (warm), and a shard of the revision before it (a switch back, as when two runs overlap or a
//! revision is re-run). Printed: the median time to the first result of each kind for the `git`
//! source and for the setup profile, their ratio, and the disk each holds at the end.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shardgate_worker::runners::{Proof, Runner};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct CheckoutsArgs {
    /// Files in the repository.
    #[arg(long, default_value_t = 5000)]
    files: usize,
    /// Revisions run, one after another.
    #[arg(long, default_value_t = 50)]
    revisions: usize,
    /// The git source's `max_checkouts`.
    #[arg(long, default_value_t = 8)]
    max_checkouts: usize,
    #[arg(long)]
    json: bool,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A repository of `files` files (100 to a directory) and `revisions` commits, each changing
/// ten files; the full hashes, oldest first.
fn make_repo(dir: &Path, files: usize, revisions: usize) -> anyhow::Result<Vec<String>> {
    git(dir, &["init", "--quiet", "--initial-branch=main"])?;
    std::fs::write(
        dir.join("run.sh"),
        "echo '<testsuite><testcase name=\"a\" time=\"0.001\"/></testsuite>' > \"$1\"\n",
    )?;
    for i in 0..files {
        let d = dir.join(format!("src/m{:03}", i / 100));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join(format!("f{i}.txt")),
            format!("file {i}\n{}\n", "x".repeat(200)),
        )?;
    }
    let mut commits = Vec::new();
    for r in 0..revisions {
        for k in 0..10 {
            let i = (r * 37 + k * 101) % files;
            std::fs::write(
                dir.join(format!("src/m{:03}/f{i}.txt", i / 100)),
                format!("file {i} at revision {r}\n"),
            )?;
        }
        git(dir, &["add", "-A"])?;
        git(dir, &["commit", "--quiet", "-m", &format!("r{r}")])?;
        commits.push(git(dir, &["rev-parse", "HEAD"])?);
    }
    Ok(commits)
}

/// Time from a shard's start to its first result.
async fn first_result(runner: &Runner, revision: &str, run: &str) -> anyhow::Result<Duration> {
    let (tx, mut rx) = mpsc::channel(4);
    let started = Instant::now();
    let cancel = CancellationToken::new();
    let tests = vec!["a".to_owned()];
    let proof = Proof::default();
    let running = runner.run_shard_proven(
        &tests,
        revision,
        run,
        Duration::from_secs(60),
        &cancel,
        tx,
        &proof,
    );
    let first = async {
        let r = rx.recv().await;
        (started.elapsed(), r)
    };
    let (ran, (elapsed, got)) = tokio::join!(running, first);
    ran.map_err(|e| anyhow::anyhow!("shard of {revision} failed: {e}"))?;
    let (_, r) = got.ok_or_else(|| anyhow::anyhow!("no result for {revision}"))?;
    anyhow::ensure!(
        r.outcome == shardgate_common::Outcome::Passed,
        "{revision}: {:?}",
        r.outcome
    );
    anyhow::ensure!(proof.get() == revision, "{revision} proven as {}", proof.get());
    Ok(elapsed)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[derive(Debug, Default)]
struct Costs {
    first: Duration,
    new: Vec<Duration>,
    warm: Vec<Duration>,
    switch: Vec<Duration>,
}

async fn measure(runner: &Runner, commits: &[String]) -> anyhow::Result<Costs> {
    let mut c = Costs::default();
    for (i, rev) in commits.iter().enumerate() {
        let run = format!("run-{i}");
        let t = first_result(runner, rev, &run).await?;
        if i == 0 {
            c.first = t;
        } else {
            c.new.push(t);
        }
        c.warm.push(first_result(runner, rev, &run).await?);
        if i > 0 {
            c.switch
                .push(first_result(runner, &commits[i - 1], &format!("re-{i}")).await?);
        }
    }
    Ok(c)
}

fn runner_of(profile: &str) -> anyhow::Result<Runner> {
    let mut r = shardgate_worker::profile::parse(profile, 4096)?;
    r.remove("src")
        .ok_or_else(|| anyhow::anyhow!("the profile has no runner 'src'"))
}

pub fn run(args: CheckoutsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.revisions >= 2, "--revisions must be at least 2");
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo)?;
    eprintln!(
        "making a repository of {} files and {} revisions",
        args.files, args.revisions
    );
    let commits = make_repo(&repo, args.files, args.revisions)?;
    let checkouts = tmp.path().join("checkouts");
    let git_profile = format!(
        r#"[runners.src]
kind = "junit"
git = "{}"
checkouts = "{}"
max_checkouts = {}
run = ["sh", "run.sh", "{{junit}}", "{{tests}}"]
id = "name"
"#,
        repo.display(),
        checkouts.display(),
        args.max_checkouts
    );
    let shared = tmp.path().join("shared");
    git(
        tmp.path(),
        &[
            "clone",
            "--quiet",
            &repo.display().to_string(),
            &shared.display().to_string(),
        ],
    )?;
    let shared_profile = format!(
        r#"[runners.src]
kind = "junit"
workdir = "{d}"
setup = ["git", "-C", "{d}", "checkout", "--force", "--quiet", "{{revision}}"]
revision_check = ["git", "rev-parse", "HEAD"]
run = ["sh", "run.sh", "{{junit}}", "{{tests}}"]
id = "name"
"#,
        d = shared.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    eprintln!("git source…");
    let g = rt.block_on(measure(&runner_of(&git_profile)?, &commits))?;
    let git_disk = shardgate_worker::runners::workspace::dir_size(&checkouts);
    let trees = std::fs::read_dir(checkouts.join("trees"))?.count();
    eprintln!("setup profile…");
    let s = rt.block_on(measure(&runner_of(&shared_profile)?, &commits))?;
    let shared_disk = shardgate_worker::runners::workspace::dir_size(&shared);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rows = [
        ("first run on the worker", g.first, s.first),
        ("new revision (median)", median(g.new), median(s.new)),
        ("same revision again (median)", median(g.warm), median(s.warm)),
        (
            "back to the revision before (median)",
            median(g.switch),
            median(s.switch),
        ),
    ];
    if args.json {
        let j: Vec<_> = rows
            .iter()
            .map(|(what, a, b)| serde_json::json!({"what": what, "git_ms": ms(*a), "setup_ms": ms(*b)}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "files": args.files, "revisions": args.revisions,
                "first_result": j,
                "git_disk_bytes": git_disk, "git_worktrees": trees,
                "setup_disk_bytes": shared_disk,
            })
        );
        return Ok(());
    }
    println!(
        "time to the first result, {} files, {} revisions, one worker (ms):",
        args.files, args.revisions
    );
    println!("{:<40} {:>10} {:>14} {:>8}", "", "git", "setup profile", "ratio");
    for (what, a, b) in rows {
        println!(
            "{what:<40} {:>10.1} {:>14.1} {:>7.2}x",
            ms(a),
            ms(b),
            ms(a) / ms(b).max(0.001)
        );
    }
    println!(
        "disk after {} revisions: git {:.1} MiB ({} worktrees, max_checkouts {}, mirror included); setup profile {:.1} MiB (one checkout)",
        args.revisions,
        git_disk as f64 / (1 << 20) as f64,
        trees,
        args.max_checkouts,
        shared_disk as f64 / (1 << 20) as f64
    );
    Ok(())
}
