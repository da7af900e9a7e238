//! The built-in `exec` runner: a test is an executable file under a root directory and its id
//! is the path relative to the root. It passes when it exits 0, is skipped when it exits 77 (the
//! automake convention), and fails otherwise. Test ids never go through a shell.
//!
//! Each test runs in its own process group with its output (stdout and stderr interleaved in
//! one pipe) captured up to a cap. On a timeout or a cancellation the whole group is killed; the
//! group is also killed after the test exits, so stray background processes do not outlive it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardgate_common::{Outcome, RunnerKind, validate};
use tokio_util::sync::CancellationToken;

use super::TestRun;
use crate::process::{self, Ending};

/// Exit status that marks a test as skipped.
pub const SKIP_EXIT_CODE: i32 = 77;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("failed to read exec root '{path}': {error}")]
    Root { path: String, error: std::io::Error },
    #[error("exec root '{0}' is not a directory")]
    NotADirectory(String),
}

#[derive(Debug, Clone)]
pub struct ExecRunner {
    root: PathBuf,
    max_output: usize,
}

impl ExecRunner {
    /// A runner rooted at `root`, which must be a readable directory.
    pub fn new(root: &Path, max_output: usize) -> Result<Self, ExecError> {
        let root = root.canonicalize().map_err(|error| ExecError::Root {
            path: root.display().to_string(),
            error,
        })?;
        if !root.is_dir() {
            return Err(ExecError::NotADirectory(root.display().to_string()));
        }
        Ok(Self { root, max_output })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lists every executable regular file under the root, as sorted relative paths. Hidden
    /// files and directories (names starting with '.') and symbolic links are skipped.
    pub fn discover(&self) -> Result<Vec<String>, ExecError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let err = |error| ExecError::Root {
                path: dir.display().to_string(),
                error,
            };
            for entry in std::fs::read_dir(&dir).map_err(err)? {
                let entry = entry.map_err(err)?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                let meta = entry.metadata().map_err(err)?;
                let path = entry.path();
                if meta.is_dir() {
                    dirs.push(path);
                } else if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                    let rel = path.strip_prefix(&self.root).expect("walked from the root");
                    if let Some(rel) = rel.to_str() {
                        out.push(rel.to_owned());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Runs one test. A bad id or a file that cannot be started is a failed test, with the
    /// reason in `detail`; an id with no file under the root is an infrastructure error that
    /// names it.
    pub async fn run_test(&self, id: &str, timeout: Duration, cancel: &CancellationToken) -> TestRun {
        let started = Instant::now();
        let failed = |detail: String| TestRun {
            outcome: Outcome::Failed,
            duration: started.elapsed(),
            output: String::new(),
            detail,
        };
        if let Err(e) = validate::test_id(RunnerKind::Exec, id) {
            return failed(e.to_string());
        }
        let path = self.root.join(id);
        // A symbolic link inside the root must not lead out of it.
        match path.canonicalize() {
            Ok(real) if real.starts_with(&self.root) => {}
            Ok(real) => {
                return failed(format!(
                    "test '{id}' resolves to '{}', outside the exec root",
                    real.display()
                ));
            }
            // Not a failure of the test, and no use running again: an error that names it,
            // counted once.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return TestRun {
                    outcome: Outcome::InfraError,
                    duration: started.elapsed(),
                    output: String::new(),
                    detail: format!(
                        "no such test: '{id}' is not under the exec root '{}' on this worker (is its checkout at the run's revision?)",
                        self.root.display()
                    ),
                };
            }
            Err(e) => return failed(format!("failed to start test '{id}': {e}")),
        }
        let mut cmd = tokio::process::Command::new(&path);
        cmd.current_dir(&self.root).env("SHARDGATE_TEST_ID", id);
        let done = process::run(cmd, Some(timeout), cancel, self.max_output).await;
        let (outcome, detail) = match &done.ending {
            Ending::Exited(0) => (Outcome::Passed, String::new()),
            Ending::Exited(SKIP_EXIT_CODE) => {
                (Outcome::Skipped, format!("exit status {SKIP_EXIT_CODE} (skip)"))
            }
            Ending::Exited(_) | Ending::Signaled(_) => (Outcome::Failed, done.ending.describe(None)),
            Ending::TimedOut => (Outcome::TimedOut, done.ending.describe(Some(timeout))),
            Ending::Cancelled => (Outcome::InfraError, "cancelled".to_owned()),
            Ending::NotStarted(e) => (Outcome::Failed, format!("failed to start test '{id}': {e}")),
            Ending::Lost(e) => (
                Outcome::InfraError,
                format!("failed to wait for test '{id}': {e}"),
            ),
        };
        TestRun {
            outcome,
            duration: done.duration,
            output: done.output,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn runner(root: &Path) -> ExecRunner {
        ExecRunner::new(root, 1024).unwrap()
    }

    #[tokio::test]
    async fn outcomes_follow_exit_codes_and_output_is_captured() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "ok.sh", "echo out; echo err >&2; exit 0");
        script(dir.path(), "bad.sh", "echo broken; exit 3");
        script(dir.path(), "skip.sh", "exit 77");
        let r = runner(dir.path());
        let c = CancellationToken::new();
        let t = Duration::from_secs(10);
        let ok = r.run_test("ok.sh", t, &c).await;
        assert_eq!(ok.outcome, Outcome::Passed);
        assert_eq!(ok.output, "out\nerr\n");
        let bad = r.run_test("bad.sh", t, &c).await;
        assert_eq!(
            (bad.outcome, bad.detail.as_str()),
            (Outcome::Failed, "exit status 3")
        );
        assert_eq!(bad.output, "broken\n");
        assert_eq!(r.run_test("skip.sh", t, &c).await.outcome, Outcome::Skipped);
        let missing = r.run_test("nope.sh", t, &c).await;
        assert_eq!(missing.outcome, Outcome::InfraError, "not a failure of a test");
        assert!(
            missing
                .detail
                .contains("no such test: 'nope.sh' is not under the exec root"),
            "{}",
            missing.detail
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survivor");
        // The child in the background would write the marker if it outlived the kill.
        script(
            dir.path(),
            "hang.sh",
            &format!("(sleep 2; touch {}) &\nsleep 30", marker.display()),
        );
        let r = runner(dir.path());
        let started = Instant::now();
        let run = r
            .run_test("hang.sh", Duration::from_millis(300), &CancellationToken::new())
            .await;
        assert_eq!(run.outcome, Outcome::TimedOut);
        assert_eq!(run.detail, "timed out after 300 ms");
        assert!(started.elapsed() < Duration::from_secs(10));
        // Poll for longer than the background child would have needed.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            assert!(!marker.exists(), "a process of the timed-out test survived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn ids_that_escape_the_root_are_refused_without_running() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        script(dir.path(), "outside.sh", "exit 0");
        std::os::unix::fs::symlink(dir.path().join("outside.sh"), root.join("link.sh")).unwrap();
        let r = runner(&root);
        let c = CancellationToken::new();
        for id in ["../outside.sh", "/bin/true"] {
            let run = r.run_test(id, Duration::from_secs(5), &c).await;
            assert_eq!(run.outcome, Outcome::Failed, "{id}");
            assert!(run.detail.contains("invalid tests"), "{id}: {}", run.detail);
        }
        let run = r.run_test("link.sh", Duration::from_secs(5), &c).await;
        assert!(run.detail.contains("outside the exec root"), "{}", run.detail);
    }

    #[test]
    fn discovery_lists_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "b/t2.sh", "exit 0");
        script(dir.path(), "a.sh", "exit 0");
        script(dir.path(), ".hidden/t.sh", "exit 0");
        std::fs::write(dir.path().join("README"), "not a test").unwrap();
        assert_eq!(runner(dir.path()).discover().unwrap(), vec!["a.sh", "b/t2.sh"]);
    }
}
