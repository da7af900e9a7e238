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
    let unpack = tempfile::tempdir_in(&cache).unwrap();
    let project = shardgate_testkit::pypi::sdist(&format!("{PROJECT}=={VERSION}"), unpack.path()).unwrap();
    // Publish atomically so concurrent test binaries never see half a directory.
    let _ = std::fs::rename(project, &dir);
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

/// Runs a suite discovered by `runner` with a 3 s test timeout and no retries.
fn run_strictly(cluster: &Cluster, runner: &str, suite: &str) -> harness::Ran {
    run_with(
        cluster,
        runner,
        suite,
        &["--test-timeout", "3s", "--retries", "0"],
    )
}

/// `shardgate run --json` of a suite discovered by `runner`, with `extra` flags.
fn run_with(cluster: &Cluster, runner: &str, suite: &str, extra: &[&str]) -> harness::Ran {
    let mut args = vec![
        "run",
        "--runner",
        runner,
        "--suite",
        suite,
        "--discover",
        "--json",
    ];
    args.extend_from_slice(extra);
    cluster.client(&args)
}

/// Runs a suite discovered by `runner` over the cluster; returns the client's result, its JSON
/// report and each test's outcome, checking no test is reported twice.
fn run_discovered(
    cluster: &Cluster,
    runner: &str,
    suite: &str,
) -> (harness::Ran, serde_json::Value, BTreeMap<String, String>) {
    let r = run_with(cluster, runner, suite, &[]);
    let report = r.json();
    assert!(
        report["tests"].is_array(),
        "no tests in the report: {report}\n{}\n{}",
        r.stderr,
        cluster.logs()
    );
    let ours = harness::outcomes_once(&report);
    (r, report, ours)
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
    let (r, report, ours) = run_discovered(&cluster, "pytest", "six");
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

#[test]
fn shardgate_local_runs_the_pypi_projects_suite_with_pytest_and_no_profile() {
    require_pytest();
    let dir = project_dir();
    let direct = direct_pytest(&dir);
    // No runner file, no coordinator, no workers to start: one command, as a newcomer types it.
    let r = harness::client(&[
        "local",
        "--pytest",
        dir.to_str().unwrap(),
        "--workers",
        "2",
        "--json",
    ]);
    let report = r.json();
    let ours = harness::outcomes_once(&report);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        direct.keys().collect::<Vec<_>>(),
        "discovered the same tests as the direct run: {}",
        r.stderr
    );
    for (id, status) in &direct {
        assert_eq!(ours[id], expected_outcome(status), "{id}: pytest said {status}");
    }
    let has_failure = direct.values().any(|s| s == "FAILED");
    assert_eq!(r.code, if has_failure { 1 } else { 0 }, "{}", r.stderr);
}

/// The Rust crate: strsim 0.11.1 (96 tests, no dependencies), from the local cargo registry,
/// where building this workspace puts it (clap depends on it).
const CRATE: &str = "strsim-0.11.1";

fn crate_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cargo"));
    let registry = home.join("registry").join("src");
    let source = std::fs::read_dir(&registry)
        .unwrap_or_else(|e| panic!("no cargo registry at {}: {e}", registry.display()))
        .filter_map(Result::ok)
        .map(|e| e.path().join(CRATE))
        .find(|p| p.join("Cargo.toml").exists())
        .unwrap_or_else(|| {
            panic!(
                "{CRATE} is not in {}: run `cargo fetch` first",
                registry.display()
            )
        });
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("crates")
        .join(CRATE);
    if !dir.join("Cargo.toml").exists() {
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let tmp = tempfile::tempdir_in(dir.parent().unwrap()).unwrap();
        let status = Command::new("cp")
            .arg("-r")
            .arg(&source)
            .arg(tmp.path().join("c"))
            .status()
            .unwrap();
        assert!(status.success());
        // The copy sits under this workspace's target directory: make it a workspace of its own.
        let manifest = tmp.path().join("c/Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, format!("{text}\n[workspace]\n")).unwrap();
        let _ = std::fs::rename(tmp.path().join("c"), &dir);
    }
    dir
}

/// Each test's status in one direct `cargo nextest run`, by `<binary-id> <test name>`.
fn direct_nextest(dir: &Path) -> BTreeMap<String, String> {
    let out = Command::new("cargo")
        .args(["nextest", "run", "--no-fail-fast", "--color", "never"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let mut got = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((status, rest)) = line.split_once(' ') else {
            continue;
        };
        if !matches!(
            status,
            "PASS" | "FAIL" | "SKIP" | "TIMEOUT" | "SIGSEGV" | "SIGABRT"
        ) {
            continue;
        }
        // "[   0.007s] (1/96) strsim tests::bigrams_iterator"
        let Some((_, rest)) = rest.split_once("] ") else {
            continue;
        };
        let rest = match rest.strip_prefix('(') {
            Some(r) => r.split_once(") ").map(|(_, r)| r).unwrap_or(r),
            None => rest,
        };
        got.insert(rest.trim().to_owned(), status.to_owned());
    }
    got
}

#[test]
fn a_rust_crates_suite_under_nextest_sharded_over_three_workers_matches_a_direct_run() {
    let dir = crate_dir();
    let direct = direct_nextest(&dir);
    assert!(
        direct.len() >= 90,
        "the direct run found only {} tests: {direct:?}",
        direct.len()
    );

    let profile = nextest_profile(&dir);
    let cluster = Cluster::builder().workers(3).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "nextest", "strsim");
    assert_eq!(ours.keys().collect::<Vec<_>>(), direct.keys().collect::<Vec<_>>());
    for (id, status) in &direct {
        let want = match status.as_str() {
            "PASS" => "passed",
            "SKIP" => "skipped",
            "TIMEOUT" => "timed_out",
            _ => "failed",
        };
        if ours[id] != want {
            let ours = report["tests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == id.as_str());
            panic!(
                "{id}: nextest said {status}, shardgate says {}\n{ours:#?}\n{}",
                ours.map(|t| t["outcome"].to_string()).unwrap_or_default(),
                cluster.logs()
            );
        }
    }
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(report["shards"].as_u64().unwrap() >= 3, "{}", report["shards"]);
}

#[test]
fn the_same_crate_under_cargo_test_matches_its_libtest_outcomes() {
    let dir = crate_dir();
    let direct = direct_nextest(&dir);
    let profile = format!(
        "[runners.cargo]\nkind = \"cargo-test\"\nworkdir = \"{}\"\n",
        dir.display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "cargo", "strsim-libtest");
    assert_eq!(r.code, 0, "{}", r.stderr);
    // libtest names are nextest's names without the binary id; strsim's are unique.
    let names: Vec<String> = direct
        .keys()
        .map(|k| k.split_once(' ').unwrap().1.to_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(ours.keys().cloned().collect::<Vec<_>>(), sorted);
    for (id, status) in &direct {
        let name = id.split_once(' ').unwrap().1;
        let want = if status == "PASS" { "passed" } else { "failed" };
        assert_eq!(ours[name], want, "{name}");
    }
    assert!(report["shards"].as_u64().unwrap() >= 2);
}

#[test]
fn the_nextest_runner_reads_its_results_whatever_the_target_directory() {
    // A shared target directory (common in CI) moved nextest's JUnit file away from where the
    // runner looked: every test became an infrastructure error.
    let dir = crate_dir();
    let target = tempfile::tempdir().unwrap();
    let profile = nextest_profile(&dir);
    let cluster = Cluster::builder()
        .workers(1)
        .slots(1)
        .runners(&profile)
        .worker_env("CARGO_TARGET_DIR", target.path().to_str().unwrap())
        .start();
    let (r, report, ours) = run_discovered(&cluster, "nextest", "strsim-shared-target");
    assert_eq!(r.code, 0, "{}\n{report}", r.stderr);
    assert!(ours.values().all(|o| o == "passed"), "{ours:?}");
    assert!(ours.len() >= 90);
}

/// Writes `files` (path, text) under `dir`.
fn write_tree(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

/// A pytest project set up the ways real ones are: `addopts` that change the listing's format
/// (`-ra -q`) and need the cache (`--ff`), a `src/` layout with `pythonpath` and `testpaths`,
/// tests inherited from a base class in another module, parametrized ids with spaces,
/// brackets, slashes, `::` and non-ASCII, output on stdout, stderr and the log, a fixture
/// error, xfail, xpass and skip, and a test that hangs when `HANG` is set.
const PYTEST_PROJECT: &[(&str, &str)] = &[
    (
        "pyproject.toml",
        "[tool.pytest.ini_options]\naddopts = \"-ra -q --ff\"\ntestpaths = [\"tests\"]\npythonpath = [\"src\"]\n",
    ),
    ("src/calc/__init__.py", "def add(a, b):\n    return a + b\n"),
    (
        "tests/base_cases.py",
        "from calc import add\n\nclass BaseCases:\n    def test_inherited(self):\n        assert add(1, 2) == 3\n\n    def test_inherited_fails(self):\n        assert add(1, 2) == 4\n",
    ),
    (
        "tests/test_inherit.py",
        "from base_cases import BaseCases\n\nclass TestInherit(BaseCases):\n    def test_own(self):\n        pass\n",
    ),
    (
        "tests/test_params.py",
        "import pytest\n\n@pytest.mark.parametrize(\"v\", [\"a b\", \"x[1]\", \"p/q\", \"a::b\", \"Äpfel\"])\ndef test_p(v):\n    assert v != \"p/q\"\n",
    ),
    (
        "tests/test_output.py",
        "import logging, sys\n\ndef test_fails_with_output():\n    print(\"to-stdout\")\n    sys.stderr.write(\"to-stderr\\n\")\n    logging.getLogger(\"app\").error(\"to-log\")\n    assert 1 == 2\n",
    ),
    (
        "tests/test_marks.py",
        "import os, time, pytest\n\n@pytest.fixture\ndef db():\n    raise RuntimeError(\"no database\")\n\ndef test_fixture_error(db):\n    pass\n\n@pytest.mark.xfail\ndef test_xfail():\n    assert False\n\n@pytest.mark.xfail\ndef test_xpass():\n    pass\n\n@pytest.mark.skip(reason=\"not here\")\ndef test_skip():\n    pass\n\ndef test_hangs():\n    if os.environ.get(\"HANG\"):\n        time.sleep(600)\n\nclass TestPlain:\n    def test_method(self):\n        pass\n",
    ),
];

#[test]
fn a_pytest_project_with_its_own_addopts_layout_and_odd_ids_matches_a_direct_run() {
    require_pytest();
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), PYTEST_PROJECT);
    // The direct run, without the project's addopts (so `-v` prints node ids).
    let out = Command::new("python3")
        .args(["-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-v"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut direct = BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("::")) {
        for status in ["PASSED", "FAILED", "SKIPPED", "XFAIL", "XPASS", "ERROR"] {
            if let Some(pos) = line.rfind(&format!(" {status}")) {
                direct.insert(line[..pos].to_owned(), status.to_owned());
                break;
            }
        }
    }
    assert_eq!(direct.len(), 15, "{text}");

    let profile = format!(
        "[runners.pytest]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\", HANG = \"1\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let r = run_strictly(&cluster, "pytest", "setups");
    let report = r.json();
    let tests = report["tests"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}\n{}", r.stderr));
    let ours: BTreeMap<String, &serde_json::Value> = tests
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_owned(), t))
        .collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        direct.keys().collect::<Vec<_>>(),
        "discovery found what pytest runs, inherited and odd ids included\n{report}"
    );
    let hung = "tests/test_marks.py::test_hangs";
    for (id, status) in &direct {
        let want = if id == hung {
            "timed_out"
        } else {
            expected_outcome(status)
        };
        assert_eq!(
            ours[id]["outcome"], want,
            "{id}: pytest said {status}\n{:#}",
            ours[id]
        );
    }
    // The failure's captured stdout, stderr and log come back with it.
    let output = ours["tests/test_output.py::test_fails_with_output"]["output"]
        .as_str()
        .unwrap();
    for text in ["to-stdout", "to-stderr", "to-log", "assert 1 == 2"] {
        assert!(output.contains(text), "{text} missing from:\n{output}");
    }
    assert!(
        ours[hung]["detail"].as_str().unwrap().contains("test timeout"),
        "{:#}",
        ours[hung]
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        !dir.path().join(".pytest_cache").exists(),
        "the project's tree is left alone"
    );
}

/// A crate with a `#[should_panic]` test, an ignored one, a plain one and one whose child
/// process prints past libtest's capture, without a newline.
const CARGO_PROJECT: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        "[package]\nname = \"setups\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    ),
    (
        "src/lib.rs",
        "pub fn add(a: u32, b: u32) -> u32 { a + b }\n\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn adds() { assert_eq!(super::add(1, 2), 3); }\n\n    #[test]\n    #[should_panic(expected = \"overflow\")]\n    fn overflows() { super::add(u32::MAX, 1); }\n\n    #[test]\n    #[ignore]\n    fn slow() {}\n\n    #[test]\n    fn child_prints() {\n        let s = std::process::Command::new(\"sh\").args([\"-c\", \"printf uncaptured\"]).status().unwrap();\n        assert!(s.success());\n    }\n}\n",
    ),
];

/// The same crate plus a `harness = false` test target that fails and lists nothing.
const CARGO_HARNESS_FALSE: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        "[package]\nname = \"setups\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[[test]]\nname = \"custom\"\npath = \"tests/custom.rs\"\nharness = false\n\n[workspace]\n",
    ),
    (
        "tests/custom.rs",
        "fn main() {\n    if std::env::args().any(|a| a == \"--list\") { return; }\n    eprintln!(\"custom harness: 1 check failed\");\n    std::process::exit(1);\n}\n",
    ),
];

#[test]
fn cargo_test_counts_should_panic_tests_and_never_passes_a_failing_custom_harness() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), CARGO_PROJECT);
    // One test thread, as some projects set: libtest prints a name before its test runs.
    let profile = format!(
        "[runners.cargo]\nkind = \"cargo-test\"\nworkdir = \"{}\"\nenv = {{ RUST_TEST_THREADS = \"1\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "cargo", "setups");
    let want: BTreeMap<String, String> = [
        ("tests::adds", "passed"),
        ("tests::child_prints", "passed"),
        ("tests::overflows", "passed"),
        ("tests::slow", "skipped"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(ours, want, "{report}");
    assert_eq!(r.code, 0, "{}", r.stderr);

    // `cargo test` fails on the custom harness (exit 101) while every line it printed says ok:
    // that is no pass.
    write_tree(dir.path(), CARGO_HARNESS_FALSE);
    let direct = Command::new("cargo")
        .arg("test")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!direct.status.success(), "the direct run fails");
    let (r, report, ours) = run_discovered(&cluster, "cargo", "setups");
    assert_ne!(report["verdict"], "passed", "{report}");
    assert_ne!(r.code, 0, "{report}");
    // The custom harness is a test of its own, failed in its own words; the rest pass.
    assert_eq!(report["verdict"], "failed", "{report}");
    let custom = "setups::custom (custom harness)";
    assert_eq!(ours[custom], "failed", "{report}");
    let t = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == custom)
        .unwrap();
    assert!(
        t["output"]
            .as_str()
            .unwrap_or_default()
            .contains("custom harness: 1 check failed"),
        "{t}"
    );
    assert_eq!(ours["tests::adds"], "passed", "{report}");

    // Through cargo (the profile's own commands, here the defaults written out), every shard
    // runs the failing target: the run stops once with the reason as its message.
    let profile = format!(
        "[runners.cargo]\nkind = \"cargo-test\"\nworkdir = \"{}\"\nenv = {{ SHARDGATE_CARGO_TEST_DIRECT = \"0\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, _) = run_discovered(&cluster, "cargo", "setups-cargo");
    assert_ne!(r.code, 0, "{report}");
    assert_eq!(report["verdict"], "errored", "{report}");
    let message = report["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("outside these tests") && message.contains("custom harness: 1 check failed"),
        "the reason names the tool's failure in its own words: {report}"
    );
    let passed = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["outcome"] == "passed")
        .count();
    assert_eq!(passed, 0, "{report}");
}

#[test]
fn cargo_test_keeps_one_name_in_two_test_binaries_apart_and_accepts_the_bare_name() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"twice\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
            ),
            (
                "src/lib.rs",
                "#[test]\nfn same() {}\n\n#[test]\nfn only_lib() {\n    assert_eq!(std::env::var(\"CARGO_PKG_NAME\").unwrap(), \"twice\");\n    assert!(std::path::Path::new(\"Cargo.toml\").exists(), \"in the package's directory\");\n}\n",
            ),
            (
                "tests/it.rs",
                "#[test]\nfn same() {\n    panic!(\"the integration test fails\");\n}\n",
            ),
        ],
    );
    let profile = format!(
        "[runners.cargo]\nkind = \"cargo-test\"\nworkdir = \"{}\"\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "cargo", "twice");
    let want: BTreeMap<String, String> = [
        ("only_lib", "passed"),
        ("twice same", "passed"),
        ("twice::it same", "failed"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(
        ours, want,
        "nextest's count, not cargo test's folded one: {report}"
    );
    assert_eq!(r.code, 1, "{}", r.stderr);

    // An older listing's bare name runs in every binary that has it, and keeps the worst.
    let list = dir.path().join("tests.txt");
    std::fs::write(&list, "same\nonly_lib\n").unwrap();
    let r = cluster.client(&[
        "run",
        "--runner",
        "cargo",
        "--suite",
        "twice-old",
        "--retries",
        "0",
        "--json",
        "--tests-file",
        list.to_str().unwrap(),
    ]);
    let j = r.json();
    let outcome = |id: &str| {
        j["tests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["outcome"]
            .clone()
    };
    assert_eq!(outcome("same"), "failed", "{j}");
    assert_eq!(outcome("only_lib"), "passed", "{j}");
    assert_eq!(r.code, 1);
}

/// A crate with its own nextest configuration (retries, a store directory of its own), a test
/// that fails once and then passes, and one that hangs when `HANG` is set.
const NEXTEST_PROJECT: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        "[package]\nname = \"nx\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    ),
    (
        ".config/nextest.toml",
        "[store]\ndir = \"nextest-store\"\n\n[profile.default]\nretries = 2\n",
    ),
    (
        "src/lib.rs",
        "#[cfg(test)]\nmod tests {\n    #[test]\n    fn quick() {}\n\n    #[test]\n    fn fails_once() {\n        let marker = std::path::Path::new(env!(\"CARGO_MANIFEST_DIR\")).join(\"failed-once\");\n        if !marker.exists() {\n            std::fs::write(&marker, \"\").unwrap();\n            panic!(\"first attempt fails\");\n        }\n    }\n\n    #[test]\n    fn hangs() {\n        if std::env::var_os(\"HANG\").is_some() {\n            std::thread::sleep(std::time::Duration::from_secs(600));\n        }\n    }\n}\n",
    ),
];

#[test]
fn nextest_holds_the_test_timeout_and_the_projects_retries_do_not_hide_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), NEXTEST_PROJECT);
    let profile = format!(
        "[runners.nextest]\nkind = \"nextest\"\nworkdir = \"{}\"\nenv = {{ HANG = \"1\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(1).slots(1).runners(&profile).start();
    let r = run_strictly(&cluster, "nextest", "nx");
    let report = r.json();
    let outcome = |name: &str| {
        report["tests"]
            .as_array()
            .unwrap_or_else(|| panic!("{report}\n{}", r.stderr))
            .iter()
            .find(|t| t["id"] == format!("nx tests::{name}").as_str())
            .map(|t| t["outcome"].as_str().unwrap_or("none").to_owned())
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    assert_eq!(outcome("quick"), "passed", "{report}");
    assert_eq!(
        outcome("fails_once"),
        "failed",
        "with --retries 0 a failure counts, whatever nextest's own retries: {report}"
    );
    assert_eq!(outcome("hangs"), "timed_out", "{report}");
    assert_eq!(r.code, 1, "{}", r.stderr);
}

#[test]
fn a_runner_that_cannot_read_its_results_stops_the_run_once_with_its_own_words() {
    let work = tempfile::tempdir().unwrap();
    let profile = format!(
        "[runners.broken]\nkind = \"junit\"\nworkdir = \"{}\"\nrun = [\"sh\", \"-c\", \"echo 'wrote no report to' $0\", \"{{junit}}\", \"{{tests}}\"]\n",
        work.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let tests: Vec<String> = (0..60).map(|i| format!("t.case{i}")).collect();
    let file = work.path().join("tests.txt");
    std::fs::write(&file, tests.join("\n")).unwrap();
    let r = cluster.client(&[
        "run",
        "--runner",
        "broken",
        "--suite",
        "broken",
        "--json",
        "--tests-file",
        file.to_str().unwrap(),
    ]);
    let report = r.json();
    assert_eq!(report["verdict"], "errored", "{report}");
    assert_eq!(r.code, 2, "{}", r.stderr);
    let message = report["message"].as_str().unwrap();
    assert!(
        message.contains("shards in a row") && message.contains("no JUnit file"),
        "{message}"
    );
    // Three failed shards, not three hand-outs per test.
    assert!(report["shards"].as_u64().unwrap() <= 4, "{report}");
}

/// A Go module: top-level tests passing, failing and skipped, a non-ASCII name, subtests, a
/// fuzz target whose seed corpus fails, an example, and a package with `TestMain`.
const GO_PROJECT: &[(&str, &str)] = &[
    ("go.mod", "module example.com/gs\n\ngo 1.19\n"),
    ("a/a.go", "package a\n\nfunc Add(x, y int) int { return x + y }\n"),
    ("a/a_test.go", A_TEST),
    ("b/b_test.go", B_TEST),
];
const A_TEST: &str = "package a\n\nimport (\n\t\"fmt\"\n\t\"testing\"\n)\n\nfunc TestPass(t *testing.T) {\n\tif Add(1, 2) != 3 {\n\t\tt.Fatal(\"add\")\n\t}\n}\n\nfunc TestFail(t *testing.T) { t.Fatalf(\"want 4, got %d\", Add(1, 2)) }\n\nfunc TestÄpfel(t *testing.T) {}\n\nfunc TestSub(t *testing.T) {\n\tt.Run(\"good\", func(t *testing.T) {})\n\tt.Run(\"bad case\", func(t *testing.T) { t.Error(\"sub failed\") })\n}\n\nfunc TestSkipped(t *testing.T) { t.Skip(\"not here\") }\n\nfunc FuzzParse(f *testing.F) {\n\tf.Add(\"ok\")\n\tf.Add(\"bad\")\n\tf.Fuzz(func(t *testing.T, s string) {\n\t\tif s == \"bad\" {\n\t\t\tt.Fatal(\"bad input\")\n\t\t}\n\t})\n}\n\nfunc ExampleAdd() {\n\tfmt.Println(Add(2, 2))\n\t// Output: 4\n}\n";
const B_TEST: &str = "package b\n\nimport (\n\t\"os\"\n\t\"testing\"\n)\n\nvar ready bool\n\nfunc TestMain(m *testing.M) {\n\tready = true\n\tos.Exit(m.Run())\n}\n\nfunc TestReady(t *testing.T) {\n\tif !ready {\n\t\tt.Fatal(\"TestMain did not run\")\n\t}\n}\n";

fn go_command(dir: &Path) -> Command {
    let found = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "go is required for the go test runner tests: apt-get install golang-go"
    );
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod");
    cmd
}

/// Each top-level test's status in one direct `go test -v ./...`, by `<package> <name>`.
fn direct_go_test(dir: &Path) -> BTreeMap<String, String> {
    let out = go_command(dir).args(["test", "-v", "./..."]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pending = Vec::new();
    let mut got = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("--- ") {
            let (status, rest) = rest.split_once(": ").unwrap();
            let name = rest.split(' ').next().unwrap();
            pending.push((name.to_owned(), status.to_owned()));
        } else if let Some(pkg) = line
            .strip_prefix("ok  \t")
            .or_else(|| line.strip_prefix("FAIL\t"))
        {
            let pkg = pkg.split('\t').next().unwrap();
            for (name, status) in pending.drain(..) {
                got.insert(format!("{pkg} {name}"), status);
            }
        }
    }
    got
}

#[test]
fn a_go_module_with_fuzz_targets_unicode_names_subtests_and_test_main_matches_a_direct_run() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), GO_PROJECT);
    let direct = direct_go_test(dir.path());
    assert_eq!(direct.len(), 8, "{direct:?}");
    let profile = format!(
        "[runners.go]\nkind = \"go-test\"\nworkdir = \"{}\"\nenv = {{ GOPROXY = \"off\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "go", "gs");
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        direct.keys().collect::<Vec<_>>(),
        "every test go runs is discovered, fuzz targets and Unicode names included\n{report}"
    );
    for (id, status) in &direct {
        let want = match status.as_str() {
            "PASS" => "passed",
            "SKIP" => "skipped",
            _ => "failed",
        };
        assert_eq!(ours[id], want, "{id}: go said {status}\n{report}");
    }
    assert_eq!(r.code, 1, "{}", r.stderr);
}

/// Runs `shardgate-worker --check` with the runner profile `toml`: exit code and stdout.
fn worker_check(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("runners.toml");
    std::fs::write(&profile, toml).unwrap();
    let out = Command::new(harness::bin("shardgate-worker"))
        .arg("--check")
        .arg("--runners")
        .arg(&profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn worker_check_reports_a_good_profile_and_names_what_is_wrong_with_broken_ones() {
    require_pytest();
    let project = tempfile::tempdir().unwrap();
    write_tree(project.path(), PYTEST_PROJECT);
    let good = format!(
        "[runners.py]\nkind = \"pytest\"\nworkdir = \"{}\"\n",
        project.path().display()
    );
    let (code, text) = worker_check(&good);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("runner 'py' (pytest): ok: 15 tests listed; ran 3 and read their results"),
        "{text}"
    );

    let missing_tool = format!(
        "[runners.j]\nkind = \"junit\"\nworkdir = \"{}\"\nlist = [\"mytool\", \"--list\"]\nrun = [\"mytool\", \"--junit\", \"{{junit}}\", \"{{tests}}\"]\n",
        project.path().display()
    );
    let (code, text) = worker_check(&missing_tool);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("runner 'j' (junit): FAILED: program 'mytool' not found"),
        "{text}"
    );

    let (code, text) = worker_check("[runners.py]\nkind = \"pytest\"\nworkdir = \"/nonexistent/checkout\"\n");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("workdir '/nonexistent/checkout' is not a directory"),
        "{text}"
    );

    // The tool writes its report somewhere else than {junit}.
    let lost_junit = format!(
        "[runners.py]\nkind = \"junit\"\nworkdir = \"{0}\"\nlist = [\"python3\", \"-m\", \"pytest\", \"--collect-only\", \"-q\", \"-o\", \"addopts=\"]\nrun = [\"python3\", \"-m\", \"pytest\", \"-o\", \"addopts=\", \"--junitxml={0}/elsewhere.xml\", \"--\", \"{{tests}}\", \"--junit-target={{junit}}\"]\n",
        project.path().display()
    );
    let (code, text) = worker_check(&lost_junit);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAILED: running 3 listed tests failed"), "{text}");
}

#[test]
fn a_runner_that_fails_the_start_up_check_is_shown_unavailable_and_gets_no_shards() {
    let profile = "[runners.py]\nkind = \"pytest\"\nworkdir = \"/nonexistent/checkout\"\n";
    let cluster = Cluster::builder().workers(1).slots(1).runners(profile).start();
    let workers = harness::wait_for(
        "the broken runner reported",
        std::time::Duration::from_secs(20),
        || {
            let w = cluster.client(&["workers", "--json"]).json();
            (!w[0]["unavailable_runners"]["py"].is_null()).then_some(w)
        },
    );
    let reason = workers[0]["unavailable_runners"]["py"].as_str().unwrap();
    assert!(reason.contains("is not a directory"), "{reason}");
    assert!(
        workers[0]["unavailable_runners"].get("exec").is_none(),
        "the good runner stays available: {workers}"
    );
    let r = cluster.run_tests(&harness::suite(&cluster.root, 2, &[], "0"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_pytest_project_running_xdist_doctests_and_its_own_junitxml_in_addopts_matches_a_direct_run() {
    require_pytest();
    let xdist = Command::new("python3")
        .args(["-c", "import xdist"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        xdist,
        "pytest-xdist is required: python3 -m pip install pytest-xdist==3.6.1"
    );
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            (
                "pytest.ini",
                "[pytest]\naddopts = -n 2 --doctest-modules --junitxml=own.xml\n",
            ),
            (
                "calc.py",
                "def add(a, b):\n    \"\"\"\n    >>> add(1, 2)\n    3\n    >>> add(2, 2)\n    5\n    \"\"\"\n    return a + b\n",
            ),
            (
                "test_calc.py",
                "import pytest\nfrom calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n\ndef test_wrong():\n    assert add(1, 2) == 4\n\n@pytest.mark.parametrize(\"x\", [1, 2, 3])\ndef test_many(x):\n    assert add(x, 0) == x\n",
            ),
        ],
    );
    // The direct run without xdist (so `-v` prints node ids), with the project's doctests.
    let out = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-o",
            "addopts=--doctest-modules",
            "-p",
            "no:cacheprovider",
            "-v",
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut direct = BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("::")) {
        for status in ["PASSED", "FAILED"] {
            if let Some(pos) = line.rfind(&format!(" {status}")) {
                direct.insert(line[..pos].to_owned(), expected_outcome(status).to_owned());
            }
        }
    }
    assert_eq!(direct.len(), 6, "{text}");
    let profile = format!(
        "[runners.pytest]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "pytest", "xdist");
    assert_eq!(ours, direct, "{report}");
    assert_eq!(r.code, 1, "{}", r.stderr);
}

#[test]
fn a_cargo_test_shard_stopped_at_its_limit_names_the_test_that_hung() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"hang\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
            ),
            (
                "src/lib.rs",
                "#[test]\nfn quick() {}\n\n#[test]\nfn hangs() {\n    if std::env::var_os(\"HANG\").is_some() {\n        std::thread::sleep(std::time::Duration::from_secs(600));\n    }\n}\n",
            ),
        ],
    );
    let profile = format!(
        "[runners.cargo]\nkind = \"cargo-test\"\nworkdir = \"{}\"\nshard_timeout = \"5s\"\nenv = {{ HANG = \"1\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(1).slots(1).runners(&profile).start();
    let r = cluster.client(&[
        "run",
        "--runner",
        "cargo",
        "--suite",
        "hang",
        "--discover",
        "--retries",
        "0",
        "--json",
    ]);
    let report = r.json();
    let outcome = |id: &str| {
        report["tests"]
            .as_array()
            .unwrap_or_else(|| panic!("{report}"))
            .iter()
            .find(|t| t["id"] == id)
            .map(|t| t["outcome"].as_str().unwrap_or("none").to_owned())
    };
    assert_eq!(outcome("quick").as_deref(), Some("passed"), "{report}");
    assert_eq!(outcome("hangs").as_deref(), Some("timed_out"), "{report}");
    assert_eq!(r.code, 1, "{}", r.stderr);
}

/// A pytest suite of 60 quick tests in 4 files whose every pytest session leaves a line in
/// `$SESSIONS`, and one test that fails on its first run only.
fn sessions_project(dir: &Path) {
    let mut files: Vec<(String, String)> = vec![(
        "conftest.py".into(),
        "import os\n\ndef pytest_configure(config):\n    with open(os.environ['SESSIONS'], 'a') as f:\n        f.write('session %d listing=%s warm=%s\\n' % (os.getpid(), config.option.collectonly, config.getoption('shardgate_serve', None)))\n".into(),
    )];
    for f in 0..4 {
        let mut body = String::from("import os\n\n");
        for t in 0..15 {
            body.push_str(&format!("def test_{t}():\n    assert {t} + 1 > {t}\n\n"));
        }
        if f == 3 {
            body.push_str(
                "def test_flaky():\n    m = os.environ['SESSIONS'] + '.flaked'\n    if not os.path.exists(m):\n        open(m, 'w').close()\n        assert False, 'first run fails'\n",
            );
        }
        files.push((format!("tests/test_f{f}.py"), body));
    }
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_tree(dir, &refs);
}

#[test]
fn pytest_shards_run_in_one_warm_pytest_per_slot_and_a_retry_gets_a_fresh_one() {
    require_pytest();
    for warm in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        sessions_project(dir.path());
        let sessions = dir.path().join("sessions.txt");
        let profile = format!(
            "[runners.pytest]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\", SESSIONS = \"{}\", SHARDGATE_PYTEST_WARM = \"{}\" }}\n",
            dir.path().display(),
            sessions.display(),
            if warm { "1" } else { "0" }
        );
        let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
        let (r, report, ours) = run_discovered(&cluster, "pytest", "warm");
        assert_eq!(r.code, 0, "{}\n{report}", r.stderr);
        assert_eq!(ours.len(), 61, "{report}");
        assert_eq!(ours["tests/test_f3.py::test_flaky"], "flaky");
        assert!(ours.values().filter(|o| *o == "passed").count() == 60);
        let shards = report["shards"].as_u64().unwrap();
        // Sessions that ran tests (the workers' start-up checks only list them).
        let log = std::fs::read_to_string(&sessions).unwrap();
        let started = log.lines().filter(|l| l.contains("listing=False")).count() as u64;
        if warm {
            // The listing's pytest serves one slot's shards, one more serves the other slot's,
            // and the retry of the flaky test, if its worker ran it already, a fresh one.
            assert!(shards >= 5, "enough shards to tell: {shards}");
            assert!(
                started <= 3,
                "{started} pytest sessions for {shards} shards:\n{log}\n{}",
                cluster.logs()
            );
        } else {
            assert_eq!(
                started,
                shards - 1,
                "one pytest per shard but the listing's:\n{log}"
            );
        }
    }
}

#[test]
fn a_warm_pytest_never_serves_the_next_run_so_edited_code_is_not_missed() {
    require_pytest();
    let dir = tempfile::tempdir().unwrap();
    let write = |body: &str| {
        let tests: String = (0..6)
            .map(|i| format!("def test_{i}():\n    assert {body}\n\n"))
            .collect();
        write_tree(dir.path(), &[("tests/test_edit.py", &tests)]);
    };
    write("True");
    let profile = format!(
        "[runners.pytest]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n",
        dir.path().display()
    );
    // Two workers: the run ends on one of them, and the other's pytest is left idle.
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, _) = run_discovered(&cluster, "pytest", "edited");
    assert_eq!(r.code, 0, "{report}");
    // The same revision (nobody checks out anything), the code edited in place, and the
    // tests named (no listing, which would start a fresh pytest anyway).
    write("False");
    let ids: Vec<String> = (0..6).map(|i| format!("tests/test_edit.py::test_{i}")).collect();
    all_fail_by_name(&cluster, "pytest", &ids, dir.path());
}

/// Runs `ids` by name (no listing) on `runner` and checks that every one of them failed.
fn all_fail_by_name(cluster: &Cluster, runner: &str, ids: &[String], dir: &Path) {
    let list = dir.join("tests.txt");
    std::fs::write(&list, ids.join("\n")).unwrap();
    let r = cluster.client(&[
        "run",
        "--runner",
        runner,
        "--suite",
        "edited",
        "--json",
        "--tests-file",
        list.to_str().unwrap(),
    ]);
    let ours = harness::outcomes_once(&r.json());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        ours.len() == ids.len() && ours.values().all(|o| o == "failed"),
        "{ours:?}"
    );
}

/// Writes crate `name` into `dir` (a workspace of its own) whose library holds `tests`, the
/// body of its `#[cfg(test)] mod tests`.
fn unit_test_crate(dir: &Path, name: &str, tests: &str) {
    write_tree(
        dir,
        &[
            (
                "Cargo.toml",
                &format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n"
                ),
            ),
            ("src/lib.rs", &format!("#[cfg(test)]\nmod tests {{\n{tests}}}\n")),
        ],
    );
}

/// A runners file with one nextest profile, `nextest`, for the crate in `dir`.
fn nextest_profile(dir: &Path) -> String {
    format!(
        "[runners.nextest]\nkind = \"nextest\"\nworkdir = \"{}\"\n",
        dir.display()
    )
}

/// Once a worker has recorded a run's build, the shards that go through nextest start it
/// without cargo (`cargo-nextest nextest run`, in the environment cargo gives its subcommands): the tests of every shard
/// still see what `cargo nextest run` gives them, `CARGO` first (trybuild and its like start
/// cargo from it).
#[test]
fn nextest_started_without_cargo_still_gives_the_tests_cargos_environment() {
    let dir = tempfile::tempdir().unwrap();
    let tests: String = (0..12)
        .map(|i| {
            format!(
                "    #[test]\n    fn t{i}() {{\n        let cargo = std::env::var_os(\"CARGO\").expect(\"CARGO is set\");\n        assert!(std::path::Path::new(&cargo).is_file(), \"{{cargo:?}}\");\n        assert_eq!(std::env::var(\"NEXTEST\").as_deref(), Ok(\"1\"));\n    }}\n"
            )
        })
        .collect();
    unit_test_crate(dir.path(), "cargoenv", &tests);
    // Shards through nextest, not started by the worker (see the next tests for those).
    let profile = nextest_profile(dir.path()) + "env = { SHARDGATE_NEXTEST_DIRECT = \"0\" }\n";
    // One slot: every shard of the run goes to the one worker, which records the build once.
    let cluster = Cluster::builder().workers(1).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "nextest", "cargoenv");
    assert_eq!(r.code, 0, "{report}");
    assert_eq!(ours.len(), 12, "{ours:?}");
    assert!(ours.values().all(|o| o == "passed"), "{ours:?}");
    assert!(report["shards"].as_u64().unwrap() >= 3, "{}", report["shards"]);
}

#[test]
fn nextest_builds_once_per_run_so_edited_code_is_not_missed() {
    let dir = tempfile::tempdir().unwrap();
    let write = |body: &str| {
        let tests: String = (0..6)
            .map(|i| format!("    #[test]\n    fn t{i}() {{ assert!({body}); }}\n"))
            .collect();
        unit_test_crate(dir.path(), "edited", &tests);
    };
    write("true");
    let profile = nextest_profile(dir.path());
    let cluster = Cluster::builder().workers(2).slots(1).runners(&profile).start();
    let (r, report, ours) = run_discovered(&cluster, "nextest", "edited");
    assert_eq!(r.code, 0, "{report}");
    assert_eq!(ours.len(), 6, "{ours:?}");
    // The same revision, the code edited in place, the tests named (no listing, which would
    // build): the next run's shards must not run the binaries the first run built.
    write("false");
    let ids: Vec<String> = ours.keys().cloned().collect();
    all_fail_by_name(&cluster, "nextest", &ids, dir.path());
}

/// A test body that writes what it was started with (its arguments, directory, environment
/// and the name of the process that started it) to `seen/<test name>.<pid>` in the crate.
const DUMP: &str = "        let mut s = format!(\"args={:?}\\ncwd={}\\n\", std::env::args().skip(1).collect::<Vec<_>>(), std::env::current_dir().unwrap().display());\n        let mut env: Vec<_> = std::env::vars().collect();\n        env.sort();\n        for (k, v) in env { s += &format!(\"env {k}={v:?}\\n\"); }\n        let stat = std::fs::read_to_string(\"/proc/self/stat\").unwrap();\n        let ppid = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().to_owned();\n        let parent = std::fs::read_to_string(format!(\"/proc/{ppid}/comm\")).unwrap();\n        s += &format!(\"parent={}\\n\", parent.trim());\n        let dir = std::path::Path::new(env!(\"CARGO_MANIFEST_DIR\")).join(\"seen\");\n        std::fs::create_dir_all(&dir).unwrap();\n        let name = std::env::var(\"NEXTEST_TEST_NAME\").unwrap();\n        std::fs::write(dir.join(format!(\"{name}.{}\", std::process::id())), s).unwrap();\n";

/// What the tests of a run wrote with [`DUMP`], by test name; emptied for the next run.
fn take_seen(dir: &Path) -> BTreeMap<String, String> {
    let seen = dir.join("seen");
    let mut got = BTreeMap::new();
    for e in std::fs::read_dir(&seen).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy();
        let test = name.split('.').next().unwrap().to_owned();
        assert!(
            got.insert(test.clone(), std::fs::read_to_string(&p).unwrap())
                .is_none(),
            "{test} ran twice"
        );
    }
    std::fs::remove_dir_all(&seen).unwrap();
    got
}

/// nextest's tests started by the worker from its record of how nextest starts each binary
/// (`nextest_direct.rs`) see exactly what nextest gives them, and end exactly as under nextest:
/// a failure, an abort and a hang are the same results whichever starts them.
#[test]
fn nextest_tests_started_without_nextest_see_what_nextest_gives_them_and_end_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut tests: String = (0..6)
        .map(|i| format!("    #[test]\n    fn t{i}() {{\n{DUMP}    }}\n"))
        .collect();
    tests += "    #[test]\n    fn fails() { assert_eq!(1 + 1, 3); }\n";
    tests += "    #[test]\n    fn aborts() { std::process::abort(); }\n";
    // Blocks until the test timeout kills it: no sleep to outlast.
    tests += "    #[test]\n    fn hangs() { while std::env::var_os(\"HANG\").is_some() { std::thread::park(); } }\n";
    // Output that looks like libtest's from a test that then fails.
    tests += "    #[test]\n    fn says_it_passed() { println!(\"test result: ok. 1 passed; 0 failed;\"); panic!(\"no\"); }\n";
    unit_test_crate(dir.path(), "started", &tests);
    let profiles = format!(
        "[runners.direct]\nkind = \"nextest\"\nworkdir = \"{0}\"\nenv = {{ HANG = \"1\" }}\n\n[runners.nextest]\nkind = \"nextest\"\nworkdir = \"{0}\"\nenv = {{ HANG = \"1\", SHARDGATE_NEXTEST_DIRECT = \"0\" }}\n",
        dir.path().display()
    );
    let cluster = Cluster::builder().workers(1).slots(1).runners(&profiles).start();
    let run = |runner: &str| {
        let r = run_strictly(&cluster, runner, "started");
        let ours = harness::outcomes_once(&r.json());
        assert_eq!(r.code, 1, "{}\n{}", r.stderr, cluster.logs());
        (ours, take_seen(dir.path()))
    };
    let (direct, seen_direct) = run("direct");
    let (nextest, seen_nextest) = run("nextest");
    let outcome = |name: &str| nextest[&format!("started tests::{name}")].as_str();
    assert_eq!(
        (
            outcome("t0"),
            outcome("fails"),
            outcome("aborts"),
            outcome("hangs"),
            outcome("says_it_passed")
        ),
        ("passed", "failed", "failed", "timed_out", "failed"),
        "{nextest:?}"
    );
    assert_eq!(direct, nextest, "the same outcomes whichever starts the tests");
    assert_eq!(seen_direct.len(), 6, "{seen_direct:?}");
    assert_eq!(
        seen_direct.keys().collect::<Vec<_>>(),
        seen_nextest.keys().collect::<Vec<_>>()
    );
    // Two runs of nextest differ in their run id, and the second profile names its switch.
    let comparable = |s: &str| -> String {
        s.lines()
            .filter(|l| {
                ![
                    "env NEXTEST_RUN_ID=",
                    "env NEXTEST_ATTEMPT_ID=",
                    "env SHARDGATE_NEXTEST_DIRECT=",
                    "parent=",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    for (name, d) in &seen_direct {
        let n = &seen_nextest[name];
        assert!(
            d.contains("\nparent=shardgate-work"),
            "{name} was not started by the worker:\n{d}"
        );
        assert!(
            n.contains("\nparent=cargo-nextest"),
            "{name} was not started by nextest:\n{n}"
        );
        let (d, n) = (comparable(d), comparable(n));
        let only = |a: &str, b: &str| -> Vec<String> {
            a.lines()
                .filter(|l| !b.lines().any(|m| m == *l))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            (only(&d, &n), only(&n, &d)),
            (vec![], vec![]),
            "{name}: what only the worker's start gave, and only nextest's"
        );
        let id = |s: &str| {
            s.lines()
                .find(|l| l.starts_with("env NEXTEST_ATTEMPT_ID="))
                .map(|l| l.split_once(':').map(|(_, r)| r.to_owned()))
        };
        assert_eq!(
            id(&seen_direct[name]),
            id(&seen_nextest[name]),
            "{name}: the attempt id past the run id"
        );
    }
}

/// A worker keeps the last run's listing and record of how nextest starts the test binaries
/// only while the binaries are unchanged: a test added between two runs is listed.
#[test]
fn the_last_runs_nextest_listing_is_kept_only_while_the_test_binaries_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let write = |n: usize| {
        let tests: String = (0..n)
            .map(|i| format!("    #[test]\n    fn t{i}() {{}}\n"))
            .collect();
        unit_test_crate(dir.path(), "kept", &tests);
    };
    write(3);
    let profile = nextest_profile(dir.path());
    let cluster = Cluster::builder().workers(1).slots(1).runners(&profile).start();
    const KEPT: &str = "test binaries unchanged";
    let (_, _, ours) = run_discovered(&cluster, "nextest", "kept");
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert_eq!(cluster.worker_log_count(KEPT), 0);
    let (_, _, ours) = run_discovered(&cluster, "nextest", "kept");
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert_eq!(cluster.worker_log_count(KEPT), 1, "{}", cluster.logs());
    write(4);
    let (r, _, ours) = run_discovered(&cluster, "nextest", "kept");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        [
            "kept tests::t0",
            "kept tests::t1",
            "kept tests::t2",
            "kept tests::t3"
        ],
        "the added test is listed and run"
    );
    assert_eq!(cluster.worker_log_count(KEPT), 1, "{}", cluster.logs());
}
