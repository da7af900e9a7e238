//! Real test runners on suites nobody here wrote: the test suite of a real open-source Python
//! project from PyPI, discovered and sharded over four workers with the built-in pytest runner,
//! must give every test the outcome that one direct `pytest` run gives it.
//!
//! Needs `python3` with pytest (`.ci/run` installs pytest 8.3.5) and PyPI for the download,
//! which is cached under the target directory.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::Cluster;

/// The project: six 1.16.0, whose sdist ships `test_six.py` (200 tests).
const PROJECT: &str = "six";
const VERSION: &str = "1.16.0";

fn require_pytest() {
    let ok = Command::new("python3")
        .args(["-m", "pytest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3 with pytest is required: python3 -m pip install pytest==8.3.5"
    );
}

/// The unpacked sdist, downloaded once per target directory.
fn project_dir() -> PathBuf {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pypi");
    let dir = cache.join(format!("{PROJECT}-{VERSION}"));
    if dir.join("test_six.py").exists() {
        return dir;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let dl = tempfile::tempdir_in(&cache).unwrap();
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
        ])
        .arg(dl.path())
        .arg(format!("{PROJECT}=={VERSION}"))
        .status()
        .unwrap();
    assert!(status.success(), "pip download {PROJECT}=={VERSION} failed");
    let tarball = dl.path().join(format!("{PROJECT}-{VERSION}.tar.gz"));
    let unpack = tempfile::tempdir_in(&cache).unwrap();
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(unpack.path())
        .status()
        .unwrap();
    assert!(status.success(), "failed to unpack {}", tarball.display());
    // Publish atomically so concurrent test binaries never see half a directory.
    let _ = std::fs::rename(unpack.path().join(format!("{PROJECT}-{VERSION}")), &dir);
    dir
}

/// Each test's status in one direct `pytest -v` run, by node id.
fn direct_pytest(dir: &Path) -> BTreeMap<String, String> {
    let out = Command::new("python3")
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut got = BTreeMap::new();
    for line in text.lines() {
        if !line.contains("::") {
            continue;
        }
        for status in ["PASSED", "FAILED", "SKIPPED", "XFAIL", "XPASS", "ERROR"] {
            if let Some(pos) = line.find(&format!(" {status}")) {
                got.insert(line[..pos].to_owned(), status.to_owned());
                break;
            }
        }
    }
    got
}

/// What shardgate calls each pytest status.
fn expected_outcome(status: &str) -> &'static str {
    match status {
        "PASSED" | "XPASS" => "passed",
        "SKIPPED" | "XFAIL" => "skipped",
        _ => "failed",
    }
}

#[test]
fn a_pypi_projects_pytest_suite_sharded_over_four_workers_matches_a_direct_run() {
    require_pytest();
    let dir = project_dir();
    let direct = direct_pytest(&dir);
    assert!(
        direct.len() >= 150,
        "the direct run found only {} tests",
        direct.len()
    );

    let profile = format!(
        "[runners.pytest]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n",
        dir.display()
    );
    let cluster = Cluster::builder().workers(4).slots(1).runners(&profile).start();
    let r = cluster.client(&[
        "run",
        "--runner",
        "pytest",
        "--suite",
        "six",
        "--discover",
        "--json",
    ]);
    let report = r.json();
    let mut ours = BTreeMap::new();
    for t in report["tests"].as_array().unwrap() {
        ours.insert(
            t["id"].as_str().unwrap().to_owned(),
            t["outcome"].as_str().unwrap_or("none").to_owned(),
        );
    }
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        direct.keys().collect::<Vec<_>>(),
        "discovery found the same tests as the direct run"
    );
    for (id, status) in &direct {
        assert_eq!(ours[id], expected_outcome(status), "{id}: pytest said {status}");
    }
    let has_failure = direct.values().any(|s| s == "FAILED");
    assert_eq!(r.code, if has_failure { 1 } else { 0 }, "{}", r.stderr);
    let workers: std::collections::BTreeSet<&str> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["worker"].as_str())
        .collect();
    assert!(workers.len() >= 2, "the suite was sharded: {workers:?}");
    assert!(report["shards"].as_u64().unwrap() >= 4, "{}", report["shards"]);
}
