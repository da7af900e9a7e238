//! Limits and checks on what a trigger submits: test ids, names, suite sizes. The coordinator
//! checks at submission so that a bad run is refused with a clear error instead of failing on a
//! worker; the worker checks again before it touches the file system.

use std::collections::HashSet;
use std::path::{Component, Path};

use crate::error::Error;
use crate::model::RunnerKind;

/// Longest test id accepted, in bytes.
pub const MAX_TEST_ID_LEN: usize = 4096;
/// Most tests in one run.
pub const MAX_TESTS_PER_RUN: usize = 2_000_000;
/// Longest suite, revision, requester or runner name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest free-text reason (a cancel's, a quarantine's), in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Most labels on a run or a worker.
pub const MAX_LABELS: usize = 32;

/// At most the first 40 characters of `s`, for an error message that must not echo a large
/// input back.
pub fn prefix(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// Checks a one-line free-text field such as a reason: at most `max` bytes, no control
/// characters (a newline or an escape sequence would forge lines in a listing).
pub fn text(field: &'static str, value: &str, max: usize, required: bool) -> Result<(), Error> {
    if required && value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!(
                "'{}' is {} bytes long, at most {max} allowed",
                prefix(value),
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("'{}' contains a control character", prefix(value)),
        ));
    }
    Ok(())
}

/// Checks a short free-text field such as the suite or the revision.
pub fn name(field: &'static str, value: &str, required: bool) -> Result<(), Error> {
    if required && value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, at most {MAX_NAME_LEN} allowed", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("'{}' contains a control character", prefix(value)),
        ));
    }
    Ok(())
}

/// Checks a test id named on its own (a quarantine entry): non-empty, within size, no control
/// characters.
pub fn test_id_text(field: &'static str, id: &str) -> Result<(), Error> {
    text(field, id, MAX_TEST_ID_LEN, true)
}

/// Checks one test id against the rules every runner shares and those of its kind.
pub fn test_id(kind: RunnerKind, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid("tests", "a test id is empty"));
    }
    if id.len() > MAX_TEST_ID_LEN {
        return Err(Error::invalid(
            "tests",
            format!(
                "test id '{}…' is {} bytes long, at most {MAX_TEST_ID_LEN} allowed",
                id.chars().take(40).collect::<String>(),
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "tests",
            format!("test id '{}' contains a control character", prefix(id)),
        ));
    }
    match kind {
        RunnerKind::Exec => exec_test_id(id),
        // These ids become argv items of the runner's command: one starting with '-' would be
        // read as an option.
        RunnerKind::Pytest
        | RunnerKind::Junit
        | RunnerKind::Nextest
        | RunnerKind::CargoTest
        | RunnerKind::GoTest
            if id.starts_with('-') =>
        {
            Err(Error::invalid(
                "tests",
                format!("test id '{id}' starts with '-' and would be read as an option"),
            ))
        }
        // The id becomes part of a filterset: `binary_id(=BIN) & test(=NAME)`.
        RunnerKind::Nextest => match id.split_once(' ') {
            Some((bin, name))
                if !bin.is_empty()
                    && !name.is_empty()
                    && !id.contains(['(', ')', ',', '|', '&', '\'', '"']) =>
            {
                Ok(())
            }
            _ => Err(Error::invalid(
                "tests",
                format!(
                    "test id '{id}' is not '<binary-id> <test name>' as `cargo nextest list -T oneline` prints it"
                ),
            )),
        },
        // The name becomes part of a `-run` regular expression: only identifier characters
        // (Go's: Unicode letters and digits, and underscores).
        RunnerKind::GoTest => match id.rsplit_once(' ') {
            Some((pkg, name))
                if !pkg.is_empty()
                    && !name.is_empty()
                    && name.chars().all(|c| c.is_alphanumeric() || c == '_') =>
            {
                Ok(())
            }
            _ => Err(Error::invalid(
                "tests",
                format!("test id '{id}' is not '<package> <TestName>' as the go-test runner lists them"),
            )),
        },
        RunnerKind::Pytest | RunnerKind::Junit | RunnerKind::CargoTest => Ok(()),
    }
}

/// An exec test id is a relative path that stays under the runner's root: no absolute paths, no
/// `..`, no `.` segments (so each test has exactly one spelling).
fn exec_test_id(id: &str) -> Result<(), Error> {
    let path = Path::new(id);
    if path.is_absolute() {
        return Err(Error::invalid(
            "tests",
            format!(
                "test id '{id}' is an absolute path; exec test ids are paths relative to the runner's root"
            ),
        ));
    }
    for c in path.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => {
                return Err(Error::invalid(
                    "tests",
                    format!("test id '{id}' escapes the runner's root with '..'"),
                ));
            }
            _ => {
                return Err(Error::invalid(
                    "tests",
                    format!("test id '{id}' is not a plain relative path"),
                ));
            }
        }
    }
    if id.ends_with('/') || id.contains("//") || id.starts_with("./") || id.contains("/./") {
        return Err(Error::invalid(
            "tests",
            format!("test id '{id}' is not in canonical form (no empty or '.' segments)"),
        ));
    }
    Ok(())
}

/// Checks a whole test list: non-empty, within size, every id valid, no duplicates.
pub fn test_list(kind: RunnerKind, tests: &[String]) -> Result<(), Error> {
    if tests.is_empty() {
        return Err(Error::invalid("tests", "the run has no tests"));
    }
    if tests.len() > MAX_TESTS_PER_RUN {
        return Err(Error::invalid(
            "tests",
            format!(
                "the run has {} tests, at most {MAX_TESTS_PER_RUN} allowed",
                tests.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(tests.len());
    for t in tests {
        test_id(kind, t)?;
        if !seen.insert(t.as_str()) {
            return Err(Error::invalid(
                "tests",
                format!("duplicate test id '{}'", prefix(t)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(ids: &[&str]) -> Result<(), Error> {
        test_list(
            RunnerKind::Exec,
            &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn accepts_relative_paths() {
        list(&["a", "dir/b.sh", "x/y/z"]).unwrap();
    }

    #[test]
    fn refuses_escapes_absolute_paths_and_duplicates_by_name() {
        let e = list(&["../x"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid tests: test id '../x' escapes the runner's root with '..'"
        );
        let e = list(&["a/../../x"]).unwrap_err().to_string();
        assert!(e.contains("escapes"), "{e}");
        let e = list(&["/etc/passwd"]).unwrap_err().to_string();
        assert!(e.contains("'/etc/passwd' is an absolute path"), "{e}");
        let e = list(&["a", "b", "a"]).unwrap_err().to_string();
        assert_eq!(e, "invalid tests: duplicate test id 'a'");
        let e = list(&[]).unwrap_err().to_string();
        assert_eq!(e, "invalid tests: the run has no tests");
        let e = list(&["./a"]).unwrap_err().to_string();
        assert!(e.contains("not"), "{e}");
        let e = list(&["a\nb"]).unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
        let e = list(&[""]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn command_runner_ids_may_not_look_like_options() {
        test_id(RunnerKind::Pytest, "tests/test_a.py::test_b[x y]").unwrap();
        let e = test_id(RunnerKind::Pytest, "--rootdir=/")
            .unwrap_err()
            .to_string();
        assert!(e.contains("would be read as an option"), "{e}");
        test_id(RunnerKind::Junit, "../anything/goes").unwrap();
    }

    #[test]
    fn names_have_limits() {
        name("suite", "unit", true).unwrap();
        assert!(name("suite", " ", true).is_err());
        name("requested_by", "", false).unwrap();
        assert!(name("revision", &"x".repeat(300), true).is_err());
    }
}
