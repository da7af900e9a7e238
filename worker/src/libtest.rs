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
///
/// A test's line may be broken by output that bypasses libtest's capture (a child process, or
/// with one test thread, where the name is printed before the test runs): `test x ... hellook`
/// or `test x ... hello` with `ok` on a later line both count. The closing `failures:` list of
/// each test binary is read too, so a failure is never missed.
pub fn parse(text: &str) -> HashMap<String, LibtestResult> {
    let mut out: HashMap<String, LibtestResult> = HashMap::new();
    let mut record = |name: &str, outcome: Outcome| {
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
    };
    // A test whose status did not follow its name on the same line.
    let mut pending: Option<String> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some((name, status)) = line.strip_prefix("test ").and_then(|r| r.split_once(" ... ")) {
            // `#[should_panic]` tests are listed by name and reported with a suffix.
            let name = name.strip_suffix(" - should panic").unwrap_or(name);
            pending = None;
            match status_of(status, true) {
                Some(o) => record(name, o),
                None => pending = Some(name.to_owned()),
            }
            continue;
        }
        if line == "failures:" {
            // The closing list (names, indented) rather than the output section (`---- `).
            if lines
                .peek()
                .is_some_and(|l| l.starts_with("    ") && !l.trim().is_empty())
            {
                while let Some(l) = lines.next_if(|l| l.starts_with("    ") && !l.trim().is_empty()) {
                    let name = l.trim();
                    record(
                        name.strip_suffix(" - should panic").unwrap_or(name),
                        Outcome::Failed,
                    );
                }
            }
            continue;
        }
        if let Some(name) = &pending
            && let Some(o) = status_of(line, false)
        {
            record(name, o);
            pending = None;
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

/// libtest's status word: alone, or (`trailing`) after output that ran into it.
fn status_of(text: &str, trailing: bool) -> Option<Outcome> {
    let t = text.trim();
    match t {
        "ok" => return Some(Outcome::Passed),
        "FAILED" => return Some(Outcome::Failed),
        _ if t.starts_with("ignored") => return Some(Outcome::Skipped),
        _ => {}
    }
    if !trailing {
        return None;
    }
    if t.ends_with("FAILED") {
        Some(Outcome::Failed)
    } else if t.ends_with("ok") {
        Some(Outcome::Passed)
    } else {
        None
    }
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
    fn output_that_breaks_a_line_does_not_lose_the_result() {
        let text = "\
running 4 tests
test a::child ... hellook
test a::one_thread ... partial output
more output
ok
test a::bad ... oops
FAILED
test a::hidden ... x

failures:

---- a::bad stdout ----
boom

failures:
    a::bad
    a::hidden

test result: FAILED. 2 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out
";
        let r = parse(text);
        assert_eq!(r["a::child"].outcome, Outcome::Passed);
        assert_eq!(r["a::one_thread"].outcome, Outcome::Passed);
        assert_eq!(r["a::bad"].outcome, Outcome::Failed);
        assert!(r["a::bad"].output.contains("boom"));
        assert_eq!(
            r["a::hidden"].outcome,
            Outcome::Failed,
            "from the closing failures list"
        );
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
