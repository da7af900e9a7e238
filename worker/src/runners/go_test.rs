//! go test: `<package> <Name>` test ids, listed per package with `-list`, results from
//! test2json.
//!
//! **Compiled once per run**: a worker compiles each package's test binary the first time a
//! shard of the run needs it (`go test -c`, then the `go vet` checks `go test` runs), and each
//! shard then runs the binary itself, as `go test` would (in the package's directory, with
//! `-test.paniconexit0 -test.timeout=10m0s -test.run '^(A|B)$'`), under Go's own `test2json`
//! (from `go env GOTOOLDIR`): no `go` start, build check or link per shard. A binary is never
//! reused by another run, so code edited between two runs is never missed. Where the toolchain
//! cannot be asked (`go list` or `go env` fail, no `test2json`), or with
//! `SHARDGATE_GO_TEST_DIRECT=0`, each shard runs `go test -json -count=1 -run … PKG`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

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

/// The run whose test binaries a worker compiles, and where (`None`: the toolchain could not
/// be asked, so shards go through `go test`).
pub(super) type CompiledRun = (String, Option<Arc<Compiled>>);

/// A run's test binaries on this worker, compiled as shards need them.
#[derive(Debug)]
pub(super) struct Compiled {
    dir: tempfile::TempDir,
    test2json: PathBuf,
    /// Each package's source directory, by import path.
    sources: HashMap<String, PathBuf>,
    /// Each package's binary once compiled, or what compiling it said.
    binaries: std::sync::Mutex<HashMap<String, Arc<OnceBinary>>>,
    /// Numbers the binaries' files.
    made: std::sync::atomic::AtomicUsize,
}

/// A package's test binary once compiled, or what compiling it said.
type OnceBinary = tokio::sync::OnceCell<Result<PathBuf, String>>;

/// The checks `go test` runs `go vet` with before a package's tests.
const VET_CHECKS: [&str; 8] = [
    "-atomic",
    "-bool",
    "-buildtags",
    "-errorsas",
    "-ifaceassert",
    "-nilfunc",
    "-printf",
    "-stringintconv",
];

/// The run's compiled binaries on this worker, set up by its first shard here.
async fn compiled_for(runner: &CommandRunner, revision: &str, run: &str) -> Option<Arc<Compiled>> {
    if super::nextest::turned_off(runner, "SHARDGATE_GO_TEST_DIRECT") {
        return None;
    }
    if run.is_empty() {
        return prepare(runner, revision).await.map(Arc::new);
    }
    let mut held = runner.go_build.lock().await;
    if let Some((r, c)) = &*held
        && r == run
    {
        return c.clone();
    }
    let c = prepare(runner, revision).await.map(Arc::new);
    *held = Some((run.to_owned(), c.clone()));
    c
}

/// Asks the toolchain where `test2json` is and where each package's sources are.
async fn prepare(runner: &CommandRunner, revision: &str) -> Option<Compiled> {
    let ask = |argv: &[&str]| {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let mut cmd = runner.command(&argv, &[], "", revision);
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        async move {
            let out = cmd.output().await.ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let (tooldir, list) = tokio::join!(
        ask(&["go", "env", "GOTOOLDIR"]),
        ask(&["go", "list", "-f", "{{.ImportPath}}\t{{.Dir}}", "./..."])
    );
    let test2json = PathBuf::from(tooldir?.trim()).join("test2json");
    if !test2json.is_file() {
        return None;
    }
    let sources = list?
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(pkg, dir)| (pkg.to_owned(), PathBuf::from(dir)))
        .collect();
    Some(Compiled {
        dir: tempfile::tempdir().ok()?,
        test2json,
        sources,
        binaries: Default::default(),
        made: Default::default(),
    })
}

impl Compiled {
    /// `pkg`'s test binary, compiled (and vetted) the first time it is asked for.
    async fn binary(&self, runner: &CommandRunner, revision: &str, pkg: &str) -> Result<PathBuf, String> {
        let cell = self
            .binaries
            .lock()
            .expect("go binaries lock")
            .entry(pkg.to_owned())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let out = self.dir.path().join(format!("{n}.test"));
            let build: Vec<String> = ["go", "test", "-c", "-o", "{out}", "{pkg}"]
                .map(String::from)
                .to_vec();
            let mut vet: Vec<String> = vec!["go".into(), "vet".into()];
            vet.extend(VET_CHECKS.map(String::from));
            vet.push("{pkg}".into());
            let out_s = out.display().to_string();
            let vars = [
                ("{out}", out_s.as_str()),
                ("{pkg}", pkg),
                ("{revision}", revision),
            ];
            let run = |argv: Vec<String>| {
                let mut cmd = runner.command_with(&argv, &[], &vars);
                cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
                async move { cmd.output().await }
            };
            let (built, vetted) = tokio::join!(run(build), run(vet));
            for (what, r) in [("go test -c", built), ("go vet", vetted)] {
                let o = r.map_err(|e| format!("{what} {pkg} could not start: {e}"))?;
                if !o.status.success() {
                    return Err(format!(
                        "{what} {pkg} failed ({}):\n{}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
            }
            if out.is_file() {
                Ok(out)
            } else {
                Err(format!("go test -c {pkg} wrote no test binary"))
            }
        })
        .await
        .clone()
    }
}

/// `go test`: per package of the shard, its test binary under test2json, or one
/// `go test -json -run '^(A|B)$' PKG`.
async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let Shard {
        tests,
        revision,
        cancel,
        results,
        limit,
        ..
    } = shard;
    let compiled = compiled_for(runner, revision, shard.run).await;
    let deadline = std::time::Instant::now() + limit;
    let mut by_pkg: BTreeMap<&str, Vec<(&String, &str)>> = BTreeMap::new();
    for t in tests {
        let (pkg, name) = crate::gotest::split(t).unwrap_or((t.as_str(), ""));
        by_pkg.entry(pkg).or_default().push((t, name));
    }
    for (pkg, group) in by_pkg {
        let names: Vec<&str> = group.iter().map(|(_, n)| *n).collect();
        let pattern = crate::gotest::run_pattern(&names);
        let direct = match compiled.as_ref().and_then(|c| Some((c, c.sources.get(pkg)?))) {
            Some((c, source)) => {
                let binary = c.binary(runner, revision, pkg).await.map_err(RunnerError::Tool)?;
                Some((c, source, binary))
            }
            None => None,
        };
        let cmd = match &direct {
            Some((c, source, binary)) => {
                let argv: Vec<String> = [
                    "{test2json}",
                    "-t",
                    "-p",
                    "{pkg}",
                    "{binary}",
                    "-test.v",
                    "-test.paniconexit0",
                    "-test.timeout=10m0s",
                    "-test.run",
                    "{pattern}",
                ]
                .map(String::from)
                .to_vec();
                let (t, b) = (c.test2json.display().to_string(), binary.display().to_string());
                let vars = [
                    ("{test2json}", t.as_str()),
                    ("{binary}", &b),
                    ("{pattern}", &pattern),
                    ("{pkg}", pkg),
                ];
                let mut cmd = runner.command_with(&argv, &[], &vars);
                cmd.current_dir(source);
                cmd
            }
            None => {
                let argv: Vec<String> = ["go", "test", "-json", "-count=1", "-run", "{pattern}", "{pkg}"]
                    .map(String::from)
                    .to_vec();
                runner.command_with(
                    &argv,
                    &[],
                    &[("{pattern}", &pattern), ("{pkg}", pkg), ("{revision}", revision)],
                )
            }
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let finished = process::run(cmd, Some(left), cancel, 16 * 1024 * 1024).await;
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
