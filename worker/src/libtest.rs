//! Reading libtest's plain output (`cargo test`): `test NAME ... ok|FAILED|ignored` per test,
//! and the `---- NAME stdout ----` sections that hold a failed test's output. A name that ran in
//! more than one test binary keeps its worst outcome.

use std::collections::HashMap;

use shardgate_common::Outcome;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibtestResult {
    pub outcome: Outcome,
    pub output: String,
}

/// Per test name, its outcome and (for failures) its captured output.
pub fn parse(text: &str) -> HashMap<String, LibtestResult> {
    let mut out: HashMap<String, LibtestResult> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, status)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        // `#[should_panic]` tests are listed by name and reported with a suffix.
        let name = name.strip_suffix(" - should panic").unwrap_or(name);
        let outcome = match status.trim() {
            "ok" => Outcome::Passed,
            "FAILED" => Outcome::Failed,
            s if s.starts_with("ignored") => Outcome::Skipped,
            _ => continue,
        };
        let rank = |o: Outcome| match o {
            Outcome::Failed => 2,
            Outcome::Passed => 1,
            _ => 0,
        };
        let e = out.entry(name.to_owned()).or_insert(LibtestResult {
            outcome,
            output: String::new(),
        });
        if rank(outcome) > rank(e.outcome) {
            e.outcome = outcome;
        }
    }
    // Failure output: from "---- NAME stdout ----" to the next section or the "failures:" list.
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            current = Some(name.to_owned());
            continue;
        }
        if line == "failures:" || line.starts_with("test result:") {
            current = None;
            continue;
        }
        if let Some(name) = &current
            && let Some(r) = out.get_mut(name)
            && r.output.len() < 64 * 1024
        {
            r.output.push_str(line);
            r.output.push('\n');
        }
    }
    out
}

/// Test names from `cargo test -- --list --format terse` (`NAME: test`), in order, without
/// duplicates across test binaries. Doc tests (`src/lib.rs - item (line N)`) are left out:
/// rustdoc does not select them by exact name, so they cannot be sharded.
pub fn list(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|n| !(n.contains(" - ") && n.ends_with(')') && n.contains("(line ")))
        .filter(|n| seen.insert(n.to_string()))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_outcomes_and_failure_output() {
        let text = "\
running 3 tests
test tests::a ... ok
test tests::b ... FAILED
test tests::c ... ignored, needs a database
test tests::p - should panic ... ok

failures:

---- tests::b stdout ----
thread 'tests::b' panicked at src/lib.rs:9:5:
assertion failed: 1 == 2

failures:
    tests::b

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out

running 1 test
test tests::a ... FAILED
";
        let r = parse(text);
        assert_eq!(
            r["tests::a"].outcome,
            Outcome::Failed,
            "the worst outcome across binaries"
        );
        assert_eq!(r["tests::c"].outcome, Outcome::Skipped);
        assert_eq!(
            r["tests::p"].outcome,
            Outcome::Passed,
            "the should-panic suffix is no part of the name"
        );
        assert!(
            r["tests::b"].output.contains("assertion failed: 1 == 2"),
            "{:?}",
            r["tests::b"]
        );
        assert!(!r["tests::b"].output.contains("test result"));
    }

    #[test]
    fn lists_tests_once() {
        let text = "a::b: test\nbench_x: benchmark\na::b: test\nsrc/lib.rs - f (line 3): test\n";
        assert_eq!(list(text), vec!["a::b"], "doc tests cannot be selected exactly");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_output_never_panics(s in "(test [a-z:]{0,6} \\.\\.\\. (ok|FAILED|ignored)\n|---- [a-z]{0,4} stdout ----\n|failures:\n|.{0,20}\n){0,20}") {
            let _ = parse(&s);
            let _ = list(&s);
        }
    }
}
