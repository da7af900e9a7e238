//! go test: `<package> <Name>` test ids, listed per package with `-list`, a shard run as one
//! `go test -json -run '^(A|B)$' PKG` per package with results from test2json.

use std::collections::BTreeMap;

use shardgate_common::Outcome;

use super::batch::{CommandRunner, IdFormat, Shard, deliver, found};
use super::{BoxFuture, Commands, RunnerError, Tool, ToolSpec};
use crate::process::{self, Ending};

#[derive(Debug)]
pub struct GoTest;

impl Tool for GoTest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.run.is_some() || spec.id.is_some() {
            return Err("go test builds its own run commands and ids; remove run and id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: vec!["{tests}".to_owned()],
            id: IdFormat::Name,
        })
    }

    fn writes_junit(&self) -> bool {
        false
    }

    fn parse_listing(&self, stdout: &str) -> Vec<String> {
        crate::gotest::list(stdout)
    }

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(run_shard(runner, shard))
    }
}

/// go test's listing command: names per package, each package closed by `ok  <pkg>`.
fn list() -> Vec<String> {
    ["go", "test", "-list", ".", "./..."].map(String::from).to_vec()
}

/// `go test`: one `go test -json -run '^(A|B)$' PKG` per package of the shard.
async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let Shard {
        tests,
        revision,
        cancel,
        results,
        limit,
        ..
    } = shard;
    let mut by_pkg: BTreeMap<&str, Vec<(&String, &str)>> = BTreeMap::new();
    for t in tests {
        let (pkg, name) = crate::gotest::split(t).unwrap_or((t.as_str(), ""));
        by_pkg.entry(pkg).or_default().push((t, name));
    }
    for (pkg, group) in by_pkg {
        let names: Vec<&str> = group.iter().map(|(_, n)| *n).collect();
        let pattern = crate::gotest::run_pattern(&names);
        let argv: Vec<String> = ["go", "test", "-json", "-count=1", "-run", "{pattern}", "{pkg}"]
            .map(String::from)
            .to_vec();
        let cmd = runner.command_with(
            &argv,
            &[],
            &[("{pattern}", &pattern), ("{pkg}", pkg), ("{revision}", revision)],
        );
        let finished = process::run(cmd, Some(limit), cancel, 16 * 1024 * 1024).await;
        if finished.ending == Ending::Cancelled {
            return Ok(());
        }
        let mut parsed = crate::gotest::parse(&finished.output);
        if parsed.is_empty() && finished.ending != Ending::TimedOut {
            return Err(runner.no_tests(&format!("go test reported no tests for package {pkg}"), finished));
        }
        let runs = group
            .into_iter()
            .map(|(id, name)| {
                let run = match parsed.remove(name) {
                    Some(r) if r.outcome != Outcome::InfraError => found(r.outcome, r.duration, r.output),
                    other => runner.missing(
                        "go test reported no end for this test",
                        &finished,
                        other.map(|r| r.output),
                    ),
                };
                (id.clone(), run)
            })
            .collect();
        deliver(runs, &finished, &results).await?;
    }
    Ok(())
}
