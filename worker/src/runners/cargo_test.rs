//! cargo test (libtest): names as test ids, listed with `--list --format terse`, results read
//! from libtest's plain output.

use super::batch::{CommandRunner, IdFormat, Shard, deliver, found};
use super::{BoxFuture, Commands, RunnerError, Tool, ToolSpec};
use crate::process::{self, Ending};

#[derive(Debug)]
pub struct CargoTest;

impl Tool for CargoTest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.id.is_some() {
            return Err("cargo test ids are libtest names; remove id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: spec.run.cloned().unwrap_or_else(run),
            id: IdFormat::Name,
        })
    }

    fn writes_junit(&self) -> bool {
        false
    }

    fn parse_listing(&self, stdout: &str) -> Vec<String> {
        crate::libtest::list(stdout)
    }

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(run_shard(runner, shard))
    }
}

/// cargo test's listing command: `NAME: test` per line, per test binary.
fn list() -> Vec<String> {
    ["cargo", "test", "--quiet", "--", "--list", "--format", "terse"]
        .map(String::from)
        .to_vec()
}

/// cargo test's run command: every test binary runs the names it has, exactly.
fn run() -> Vec<String> {
    ["cargo", "test", "--no-fail-fast", "--", "--exact", "{tests}"]
        .map(String::from)
        .to_vec()
}

/// `cargo test`: results read from libtest's plain output. libtest prints no per-test time
/// on stable Rust, so each test is given an equal share of the shard's wall time.
async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let Shard {
        tests,
        revision,
        cancel,
        results,
        limit,
        ..
    } = shard;
    let cmd = runner.command(&runner.cfg.run, tests, "", revision);
    let finished = process::run(cmd, Some(limit), cancel, 16 * 1024 * 1024).await;
    if finished.ending == Ending::Cancelled {
        return Ok(());
    }
    let mut parsed = crate::libtest::parse(&finished.output);
    if parsed.is_empty() && finished.ending != Ending::TimedOut {
        return Err(runner.no_tests("cargo test reported no tests", finished));
    }
    let share = finished.duration / tests.len().max(1) as u32;
    let runs = tests
        .iter()
        .map(|t| {
            let run = match parsed.remove(t) {
                Some(r) => found(r.outcome, share, r.output),
                None => runner.missing("cargo test printed no line for this test", &finished, None),
            };
            (t.clone(), run)
        })
        .collect();
    deliver(runs, &finished, &results).await
}
