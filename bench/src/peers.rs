//! `shardgate local` against the tools people already have, on the same machine and slots:
//! a PyPI project's suite under `pytest -n N` (pytest-xdist) and a crates.io crate's suite under
//! `cargo nextest run -j N`, each against `shardgate local --pytest DIR` / `--nextest DIR` with
//! N workers of one slot: its first run (no history) and the runs after it; with
//! `--cargo-test` the crate under `--cargo-test` too, and with `--go-test` a Go module under
//! `go test -p N`. Wall time of the
//! whole command, as a user waits for it; each of shardgate's runs is read against the peer
//! runs just before and after it, and `--repeats` repeats the whole sequence.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct PeersArgs {
    /// Slots: pytest-xdist's and nextest's `-j`, and `shardgate local --workers` (1 slot each).
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// The PyPI project whose sdist's suite runs under pytest (`""` to skip).
    #[arg(long, default_value = "more-itertools==11.2.1")]
    pub pypi: String,
    /// The crate (`name-version`, from this machine's cargo registry or fetched with cargo)
    /// whose suite runs under nextest (`""` to skip).
    #[arg(long, default_value = "itertools-0.15.0")]
    pub krate: String,
    /// Also run the crate's suite with `shardgate local --cargo-test`, against
    /// `cargo nextest run -j N` and against `cargo test --tests`.
    #[arg(long)]
    pub cargo_test: bool,
    /// A Go module whose suite runs under `shardgate local --go-test`, against
    /// `go test -count=1 -p N ./...` (`-count=1`: go's result cache would answer a later run
    /// without running a test): a directory, or `go-cmp` for the Debian package of
    /// github.com/google/go-cmp 0.5.9 (`golang-github-google-go-cmp-dev`, installed with apt
    /// if missing). `""` skips it.
    #[arg(long, default_value = "")]
    pub go_test: String,
    /// shardgate runs after the first one.
    #[arg(long, default_value_t = 2)]
    pub later: usize,
    /// Times the whole sequence (a fresh history, the first run, the later runs) is repeated;
    /// the medians and ranges over the repeats are printed.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
}

/// Wall time of `cmd` in seconds; fails when it fails.
fn timed(cmd: &mut Command, what: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("could not start {what}"))?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(s)
}

fn shardgate_local(bins: &Path, kind: &str, dir: &Path, slots: usize, db: &Path) -> Command {
    let mut c = Command::new(bins.join("shardgate"));
    c.arg("local")
        .arg(format!("--{kind}"))
        .arg(dir)
        .args(["--workers", &slots.to_string(), "--json", "--db"])
        .arg(db);
    c
}

/// Times shardgate's first and later runs, each between two runs of the peer, `--repeats`
/// times over (each repeat from a fresh history); prints a row per run: its median wall time
/// and its median ratio to the mean of the two peer runs around it, with the ratios' range.
/// A peer run beside each of ours, rather than one before and one after them all, keeps this
/// machine's drift (it moves by ±5 % over a minute) out of the ratios.
fn compare(
    a: &PeersArgs,
    bins: &Path,
    title: &str,
    peer: &mut dyn FnMut() -> anyhow::Result<f64>,
    kind: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let label = |i: usize| {
        if i == 0 {
            "shardgate local, first run".to_owned()
        } else {
            format!("shardgate local, run {}", i + 1)
        }
    };
    let mut peers = Vec::new();
    // Per run of the sequence: (wall, ratio) in each repeat.
    let mut ours: Vec<Vec<(f64, f64)>> = vec![Vec::new(); a.later + 1];
    for _ in 0..a.repeats.max(1) {
        let history = tempfile::tempdir()?;
        let db = history.path().join("history.db");
        let mut before = peer()?;
        peers.push(before);
        for (i, runs) in ours.iter_mut().enumerate() {
            let s = timed(&mut shardgate_local(bins, kind, dir, a.slots, &db), &label(i))?;
            let after = peer()?;
            peers.push(after);
            runs.push((s, s / ((before + after) / 2.0)));
            before = after;
        }
    }
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let repeats = a.repeats.max(1);
    println!(
        "\n{title}, {} slots, {repeats} repeat{}",
        a.slots,
        if repeats == 1 { "" } else { "s" }
    );
    println!("  {:<34} {:>9} {:>9}", "command (median)", "wall", "÷ peer");
    let (lo, hi) = range(&peers);
    println!(
        "  {:<34} {:>7.2} s {:>8.3}×   ({} runs, {lo:.2}–{hi:.2} s)",
        "peer",
        crate::mem::median(peers.clone()),
        1.0,
        peers.len()
    );
    for (i, runs) in ours.into_iter().enumerate() {
        let ratios: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let (lo, hi) = range(&ratios);
        println!(
            "  {:<34} {:>7.2} s {:>8.3}×   (÷ the peer runs beside it: {lo:.3}–{hi:.3}×)",
            label(i),
            crate::mem::median(runs.iter().map(|r| r.0).collect()),
            crate::mem::median(ratios),
        );
    }
    Ok(())
}

/// A copy of crate `name_version` from cargo's registry (fetched with cargo if missing).
fn crate_project(name_version: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(home.join("registry/src"))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join(name_version))
            .find(|p| p.is_dir())
    };
    let src = match find() {
        Some(p) => p,
        None => {
            // A throwaway package that depends on it makes cargo fetch it.
            let (name, version) = name_version.rsplit_once('-').context("--krate is name-version")?;
            let pkg = dir.join("fetch");
            std::fs::create_dir_all(pkg.join("src"))?;
            std::fs::write(pkg.join("src/lib.rs"), "")?;
            std::fs::write(
                pkg.join("Cargo.toml"),
                format!(
                    "[package]\nname = \"fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n[dependencies]\n{name} = \"={version}\"\n[workspace]\n"
                ),
            )?;
            timed(
                Command::new("cargo").arg("fetch").current_dir(&pkg),
                "cargo fetch",
            )?;
            find().context("cargo fetched the crate, but it is not in the registry")?
        }
    };
    let dst = dir.join(name_version);
    timed(Command::new("cp").arg("-r").arg(&src).arg(&dst), "cp")?;
    Ok(dst)
}

pub fn run(a: PeersArgs) -> anyhow::Result<()> {
    let bins = crate::real::bin_dir()?;
    anyhow::ensure!(
        bins.join("shardgate").exists(),
        "shardgate not found next to this binary: run `cargo build --release` first"
    );
    let work = tempfile::tempdir()?;
    let slots = a.slots.to_string();
    if !a.pypi.is_empty() {
        timed(
            Command::new("python3").args(["-c", "import pytest, xdist"]),
            "pytest and pytest-xdist (python3 -m pip install pytest pytest-xdist)",
        )?;
        let dir =
            shardgate_testkit::pypi::sdist(&a.pypi, &work.path().join("pypi")).map_err(anyhow::Error::msg)?;
        let mut xdist = || {
            timed(
                Command::new("python3")
                    .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", &slots])
                    .current_dir(&dir),
                "pytest -n",
            )
        };
        compare(
            &a,
            &bins,
            &format!(
                "{} under pytest: `pytest -n {slots}` (pytest-xdist) as the peer",
                a.pypi
            ),
            &mut xdist,
            "pytest",
            &dir,
        )?;
    }
    if !a.krate.is_empty() {
        let dir = crate_project(&a.krate, work.path())?;
        // Both measure running the tests, not building them.
        timed(
            Command::new("cargo")
                .args(["nextest", "run", "--no-run"])
                .current_dir(&dir),
            "cargo nextest run --no-run (cargo install cargo-nextest)",
        )?;
        let mut nextest = || {
            timed(
                Command::new("cargo")
                    .args(["nextest", "run", "-j", &slots])
                    .current_dir(&dir),
                "cargo nextest run",
            )
        };
        compare(
            &a,
            &bins,
            &format!(
                "{} under nextest: `cargo nextest run -j {slots}` as the peer",
                a.krate
            ),
            &mut nextest,
            "nextest",
            &dir,
        )?;
        if a.cargo_test {
            timed(
                Command::new("cargo")
                    .args(["test", "--tests", "--no-run"])
                    .current_dir(&dir),
                "cargo test --no-run",
            )?;
            compare(
                &a,
                &bins,
                &format!(
                    "{} under cargo test: `cargo nextest run -j {slots}` as the peer",
                    a.krate
                ),
                &mut nextest,
                "cargo-test",
                &dir,
            )?;
            let mut cargo_test = || {
                timed(
                    Command::new("cargo")
                        .args(["test", "--tests", "--quiet"])
                        .current_dir(&dir),
                    "cargo test",
                )
            };
            compare(
                &a,
                &bins,
                &format!("{} under cargo test: `cargo test --tests` as the peer", a.krate),
                &mut cargo_test,
                "cargo-test",
                &dir,
            )?;
        }
    }
    if !a.go_test.is_empty() {
        let dir = go_module(&a.go_test, work.path())?;
        // Both measure running the tests: the packages are compiled into go's cache first.
        timed(
            Command::new("go")
                .args(["test", "-count=1", "-run", "^$", "./..."])
                .current_dir(&dir),
            "go test (apt-get install golang-go)",
        )?;
        let mut go = || {
            timed(
                Command::new("go")
                    .args(["test", "-count=1", "-p", &slots, "./..."])
                    .current_dir(&dir),
                "go test -p",
            )
        };
        compare(
            &a,
            &bins,
            &format!(
                "{} under go test: `go test -count=1 -p {slots} ./...` as the peer",
                a.go_test
            ),
            &mut go,
            "go-test",
            &dir,
        )?;
    }
    Ok(())
}

/// A writable copy of the Go module `what`: a directory, or `go-cmp` (Debian's package).
fn go_module(what: &str, work: &Path) -> anyhow::Result<PathBuf> {
    let src = if what == "go-cmp" {
        let dir = PathBuf::from("/usr/share/gocode/src/github.com/google/go-cmp");
        if !dir.join("go.mod").exists() {
            timed(
                Command::new("apt-get").args(["install", "-y", "-qq", "golang-github-google-go-cmp-dev"]),
                "apt-get install golang-github-google-go-cmp-dev",
            )?;
        }
        dir
    } else {
        PathBuf::from(what)
    };
    anyhow::ensure!(src.join("go.mod").exists(), "{} holds no go.mod", src.display());
    let dst = work.join("go-module");
    timed(
        Command::new("cp").arg("-rL").arg(&src).arg(&dst),
        "copying the Go module",
    )?;
    Ok(dst)
}
