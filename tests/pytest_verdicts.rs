//! A red pytest is never green, and one crash takes no innocent test with it: generated pytest
//! projects whose modules fail to collect, whose session fails at its end, and whose tests end
//! their own interpreter, each run with warm pytests (the default) and without.
//!
//! Needs `python3` with pytest (`scripts/test` installs pytest 8.3.5).

mod harness;

use std::path::Path;

use harness::{Cluster, Ran};

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (rel, body) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
}

/// The two modes a pytest profile runs in: warm pytests (the default) and one per shard.
const MODES: [&str; 2] = ["1", "0"];

fn cluster(dir: &Path, warm: &str, workers: usize) -> Cluster {
    let profile = format!(
        "[runners.py]\nkind = \"pytest\"\nworkdir = \"{}\"\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\", SHARDGATE_PYTEST_WARM = \"{warm}\" }}\n",
        dir.display()
    );
    Cluster::builder()
        .workers(workers)
        .slots(1)
        .runners(&profile)
        .start()
}

fn run(cluster: &Cluster, suite: &str, extra: &[&str]) -> Ran {
    let mut args = vec!["run", "--runner", "py", "--suite", suite, "--discover", "--json"];
    args.extend_from_slice(extra);
    cluster.client(&args)
}

fn outcome<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no result for {id}: {report}"))
}

const GOOD: &str = "def test_one():\n    pass\n\ndef test_two():\n    pass\n";

#[test]
fn modules_that_fail_to_collect_are_failed_results_of_their_own_and_the_run_is_red() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("tests/test_good.py", GOOD),
            (
                "tests/test_import.py",
                "import not_installed_anywhere\n\ndef test_x():\n    pass\n",
            ),
            ("tests/test_syntax.py", "def test_y(:\n    pass\n"),
        ],
    );
    for warm in MODES {
        let cluster = cluster(dir.path(), warm, 2);
        let r = run(&cluster, &format!("collect-{warm}"), &["--retries", "0"]);
        let j = r.json();
        assert_eq!(j["status"], "failed", "warm={warm}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(r.code, 1);
        for good in ["tests/test_good.py::test_one", "tests/test_good.py::test_two"] {
            assert_eq!(outcome(&j, good)["outcome"], "passed", "warm={warm}");
        }
        let import = outcome(&j, "tests/test_import.py");
        assert_eq!(import["outcome"], "failed", "warm={warm}: {import}");
        assert!(
            import["detail"]
                .as_str()
                .unwrap()
                .contains("No module named 'not_installed_anywhere'"),
            "the tool's own words: {import}"
        );
        let syntax = outcome(&j, "tests/test_syntax.py");
        assert_eq!(syntax["outcome"], "failed", "warm={warm}: {syntax}");
        assert!(
            syntax["detail"]
                .as_str()
                .unwrap()
                .starts_with("failed to collect"),
            "{syntax}"
        );
        assert_eq!(j["counts"]["total"], 4, "{j}");
    }
}

#[test]
fn a_session_that_fails_at_its_end_is_never_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("tests/test_good.py", GOOD),
            (
                "conftest.py",
                "def pytest_sessionfinish(session, exitstatus):\n    session.exitstatus = 3\n",
            ),
        ],
    );
    for warm in MODES {
        let cluster = cluster(dir.path(), warm, 2);
        // The listing's session fails.
        let r = run(&cluster, &format!("end-{warm}"), &[]);
        let j = r.json();
        assert_ne!(j["status"], "passed", "warm={warm}: {}", r.stdout);
        assert_ne!(r.code, 0);
        let said = format!("{} {}", j["message"], j["tests"]);
        assert!(
            said.contains("exit status 3") || said.contains("exit status: 3"),
            "the tool's ending is named (warm={warm}): {said}"
        );
        // Given tests: each shard's session fails, and so does every worker's check of the
        // runner; the run errors at its queue timeout, naming the tool's ending.
        let list = dir.path().join("tests.txt");
        std::fs::write(
            &list,
            "tests/test_good.py::test_one\ntests/test_good.py::test_two\n",
        )
        .unwrap();
        let r = cluster.client(&[
            "run",
            "--runner",
            "py",
            "--suite",
            &format!("end-given-{warm}"),
            "--json",
            "--tests-file",
            list.to_str().unwrap(),
            "--queue-timeout",
            "3s",
        ]);
        let j = r.json();
        assert_ne!(j["status"], "passed", "warm={warm}: {}", r.stdout);
        assert_ne!(r.code, 0);
        let said = format!("{} {}", j["message"], j["tests"]);
        assert!(
            said.contains("exit status 3") || said.contains("exit status: 3"),
            "warm={warm}: {said}"
        );
    }
}

/// 23 tests in one module; `test_killer` ends its interpreter with `how`.
fn crash_project(dir: &Path, how: &str) {
    let mut body = String::from("import os, signal\n\n");
    for i in 0..22 {
        body.push_str(&format!("def test_ok_{i:02}():\n    pass\n\n"));
    }
    body.push_str(&format!("def test_killer():\n    {how}\n"));
    write(dir, &[("tests/test_crash.py", &body)]);
}

#[test]
fn a_test_that_ends_its_pytest_is_the_only_one_charged_on_a_first_run_and_with_history() {
    for (name, how) in [
        ("sigkill", "os.kill(os.getpid(), signal.SIGKILL)"),
        ("exit0", "os._exit(0)"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        crash_project(dir.path(), how);
        for warm in MODES {
            let cluster = cluster(dir.path(), warm, 2);
            // A first run, then one with history (bigger shards).
            for round in ["first", "later"] {
                let r = run(&cluster, &format!("crash-{name}-{warm}"), &["--retries", "1"]);
                let j = r.json();
                let ctx = format!("{name} warm={warm} {round}");
                assert_eq!(j["status"], "failed", "{ctx}: {}", r.stdout);
                assert_eq!(j["counts"]["passed"], 22, "{ctx}: {j}");
                assert_eq!(j["counts"]["infra_error"], 0, "{ctx}: {j}");
                let killer = outcome(&j, "tests/test_crash.py::test_killer");
                assert_eq!(killer["outcome"], "failed", "{ctx}: {killer}");
                assert!(
                    killer["detail"].as_str().unwrap().contains("while this test ran"),
                    "the JSON says which test ended pytest ({ctx}): {killer}"
                );
                assert_eq!(
                    killer["attempts"], 2,
                    "retried like any failure ({ctx}): {killer}"
                );
            }
        }
    }
}

#[test]
fn skips_and_xfails_keep_the_tools_outcomes_reasons_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("tests/test_good.py", GOOD),
            (
                "tests/test_optional.py",
                "import pytest\nnp = pytest.importorskip('not_installed_numpy')\n\ndef test_np():\n    pass\n",
            ),
            (
                "tests/test_marks.py",
                concat!(
                    "import pytest\n\n",
                    "def test_skip_in_body():\n    pytest.skip('no network here')\n\n",
                    "@pytest.mark.skip(reason='not on this platform')\ndef test_skip_mark():\n    pass\n\n",
                    "@pytest.mark.xfail(reason='bug 1234')\ndef test_xfail():\n    assert False\n\n",
                    "@pytest.mark.xfail(reason='fixed upstream?')\ndef test_xpass():\n    pass\n",
                ),
            ),
        ],
    );
    for warm in MODES {
        let cluster = cluster(dir.path(), warm, 2);
        let r = run(&cluster, &format!("skips-{warm}"), &[]);
        let j = r.json();
        assert_eq!(j["status"], "passed", "warm={warm}: {}\n{}", r.stdout, r.stderr);
        // pytest's own summary: 2 passed, 3 skipped (the module counts once), 1 xfailed,
        // 1 xpassed.
        assert_eq!(j["counts"]["total"], 7, "warm={warm}: {j}");
        let module = outcome(&j, "tests/test_optional.py");
        assert_eq!(module["outcome"], "skipped", "warm={warm}: {module}");
        assert!(
            module["detail"].as_str().unwrap().contains("not_installed_numpy"),
            "warm={warm}: {module}"
        );
        for (id, outcome_, detail) in [
            (
                "tests/test_marks.py::test_skip_in_body",
                "skipped",
                "no network here",
            ),
            (
                "tests/test_marks.py::test_skip_mark",
                "skipped",
                "not on this platform",
            ),
            ("tests/test_marks.py::test_xfail", "skipped", "xfailed: bug 1234"),
            (
                "tests/test_marks.py::test_xpass",
                "passed",
                "xpassed: fixed upstream?",
            ),
        ] {
            let t = outcome(&j, id);
            assert_eq!(t["outcome"], outcome_, "warm={warm}: {t}");
            assert_eq!(t["detail"], detail, "warm={warm}: {t}");
        }
    }
}
